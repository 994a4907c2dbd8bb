"""batch_renorm with every batch-norm option, against float64 NumPy written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normlib

EPS = 1e-5


def np_renorm(x, running_mean, running_var, r_max, d_max, eps=EPS):
    """Ioffe (2017) on one batch (rows of x), float64: y and the batch's biased moments."""
    x = np.asarray(x, np.float64)
    mu, var = x.mean(0), x.var(0)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(np.sqrt(var + eps) / sigma, 1 / r_max, r_max)
    d = np.clip((mu - running_mean) / sigma, -d_max, d_max)
    return (x - mu) / np.sqrt(var + eps) * r + d, mu, var


def _data(shape=(24, 3), offset=50.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.5, 3, shape[-1]) + offset).astype(np.float32)


def _state():
    s = normlib.init_batch_norm(3)
    return s._replace(mean=jnp.full(3, 49.0), var=jnp.full(3, 2.0))


def _close(a, b, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


def test_virtual_batch_size_renormalizes_each_chunk():
    x, state = _data(), _state()
    y, new = normlib.batch_renorm(x, state, training=True, r_max=1.5, d_max=0.5,
                                  virtual_batch_size=6, momentum=0.9)
    chunks = [np_renorm(c, 49.0, 2.0, 1.5, 0.5) for c in x.reshape(4, 6, 3)]
    _close(y, np.concatenate([c[0] for c in chunks]))
    mean = np.mean([c[1] for c in chunks], 0)
    var = np.mean([c[2] for c in chunks], 0)
    _close(new.mean, 0.9 * 49.0 + 0.1 * mean)
    _close(new.var, 0.9 * 2.0 + 0.1 * var)
    # Not the whole batch's renorm: the chunks differ from it.
    whole, _, _ = np_renorm(x, 49.0, 2.0, 1.5, 0.5)
    assert np.abs(np.asarray(y) - whole).max() > 1e-2


@pytest.mark.parametrize('zero_debias', [False, True])
def test_unbiased_running_var_and_zero_debias(zero_debias):
    x, state = _data(), _state()
    y, new = normlib.batch_renorm(x, state, training=True, r_max=2.0, d_max=1.0, momentum=0.9,
                                  unbiased_running_var=True, zero_debias=zero_debias)
    ref, mu, var = np_renorm(x, 49.0, 2.0, 2.0, 1.0)
    _close(y, ref)
    unbiased = var * 24 / 23
    if zero_debias:  # the first update replaces the prior
        _close(new.mean, mu)
        _close(new.var, unbiased)
    else:
        _close(new.mean, 0.9 * 49.0 + 0.1 * mu)
        _close(new.var, 0.9 * 2.0 + 0.1 * unbiased)


def test_axis_index_groups_renormalize_each_group():
    x, state = _data((32, 3)), _state()
    groups = [[0, 1], [2, 3]]
    shards = x.reshape(4, 8, 3)
    f = functools.partial(normlib.batch_renorm, state=state, training=True, r_max=1.5,
                          d_max=0.5, axis_name='b', axis_index_groups=groups)
    y, new = jax.vmap(lambda v: f(v), axis_name='b')(shards)
    for members in groups:
        data = np.concatenate([shards[i] for i in members])
        ref, mu, var = np_renorm(data, 49.0, 2.0, 1.5, 0.5)
        _close(np.concatenate([y[i] for i in members]), ref)
        for i in members:
            _close(new.mean[i], 0.99 * 49.0 + 0.01 * mu)
            _close(new.var[i], 0.99 * 2.0 + 0.01 * var)


def test_ghost_renorm_matches_ghost_batch_norm_at_r_max_1():
    # r_max = 1, d_max = 0 is batch norm, chunk by chunk too.
    x, state = _data(), _state()
    y_re, s_re = normlib.batch_renorm(x, state, training=True, r_max=1.0, d_max=0.0,
                                      virtual_batch_size=8)
    y_bn, s_bn = normlib.batch_norm(x, state, training=True, virtual_batch_size=8)
    _close(y_re, np.asarray(y_bn, np.float64), rtol=1e-6, atol=1e-6)
    for a, b in zip(s_re, s_bn):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('p', [1.0, 3.0])
def test_lp_batch_norm_virtual_batch_size_normalizes_each_chunk(p):
    x, state = _data(), _state()
    y, new = normlib.lp_batch_norm(x, state, p=p, training=True, virtual_batch_size=12,
                                   momentum=0.5)
    refs, spreads = [], []
    for c in x.reshape(2, 12, 3).astype(np.float64):
        d = c - c.mean(0)
        s = np.mean(np.abs(d) ** p, 0) ** (1 / p)
        refs.append(d / np.sqrt(s ** 2 + EPS))
        spreads.append(s ** 2)
    _close(y, np.concatenate(refs), rtol=1e-4, atol=1e-4)
    _close(new.var, 0.5 * 2.0 + 0.5 * np.mean(spreads, 0), rtol=1e-4)
