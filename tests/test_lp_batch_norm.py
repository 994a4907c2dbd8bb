"""lp_batch_norm (Santurkar et al., 2018) against float64 NumPy written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import normlib as nl
from _reference import np_lp_batch_norm

RNG = np.random.default_rng(13)
EPS = 1e-5
PS = [1.0, 1.5, 2.0, 3.0, 30.0, math.inf]


@pytest.mark.parametrize('p', PS)
@pytest.mark.parametrize('offset', [0.0, 1e4, 1e6])
@pytest.mark.parametrize('masked', [False, True])
def test_matches_float64(p, offset, masked):
    x = (RNG.standard_normal((96, 5)) * 3 + offset).astype(np.float32)
    mask = (RNG.random((96, 5)) < 0.7) if masked else None
    state = nl.init_batch_norm(5)
    y, new = nl.lp_batch_norm(jnp.asarray(x), state, p=p, training=True, mask=mask,
                              momentum=0.9)
    y_ref, mean, spread = np_lp_batch_norm(x, p, mask)
    np.testing.assert_allclose(y, y_ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(new.mean, 0.1 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * spread ** 2, rtol=1e-6)
    y_eval, same = nl.lp_batch_norm(jnp.asarray(x), new, p=p, training=False)
    np.testing.assert_array_equal(y_eval, nl.batch_norm(jnp.asarray(x), new, training=False)[0])


def test_p2_is_batch_norm_and_l1_is_p1_scaled():
    x = jnp.asarray(RNG.standard_normal((64, 4)) * 2 + 1e5, jnp.float32)
    state = nl.init_batch_norm(4)
    y2, s2 = nl.lp_batch_norm(x, state, p=2, training=True)
    y, s = nl.batch_norm(x, state, training=True)
    np.testing.assert_allclose(y2, y, atol=1e-6)
    np.testing.assert_allclose(s2.var, s.var, rtol=1e-6)
    y1, s1 = nl.l1_batch_norm(x, state, training=True, momentum=0.0)
    d = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    spread = math.sqrt(math.pi / 2) * np.abs(d).mean(0)
    np.testing.assert_allclose(y1, d / np.sqrt(spread ** 2 + EPS), atol=2e-6)
    np.testing.assert_allclose(s1.var, spread ** 2, rtol=1e-6)


@pytest.mark.parametrize('p', [3.0, math.inf])
def test_gradients_forward_and_reverse_second_order(p):
    with jax.enable_x64(True):
        x = jnp.asarray(RNG.standard_normal((12, 3)), jnp.float64)
        mask = jnp.asarray(RNG.random((12, 3)) < 0.8).at[:2].set(True)
        state = nl.init_batch_norm(3, jnp.float64)
        scale = jnp.asarray([1.0, 2.0, 0.5])
        f = jax.jit(lambda v, s: nl.lp_batch_norm(v, state, s, p=p, training=True, mask=mask)[0])
        check_grads(f, (x, scale), order=2, modes=('fwd', 'rev'), eps=1e-4)


@pytest.mark.parametrize('p', [3.0, math.inf])
def test_nan_padding_leaves_gradients_untouched(p):
    x = RNG.standard_normal((12, 4)).astype(np.float32)
    mask = np.ones((12, 4), bool)
    mask[:2] = False
    poisoned = x.copy()
    poisoned[0], poisoned[1] = np.nan, np.inf
    state = nl.init_batch_norm(4)

    def loss(v, s):
        return (jnp.where(mask, nl.lp_batch_norm(v, state, s, p=p, training=True,
                                                 mask=mask)[0], 0) ** 2).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    clean, dirty = grad(jnp.asarray(x), jnp.ones(4)), grad(jnp.asarray(poisoned), jnp.ones(4))
    np.testing.assert_allclose(dirty[0][2:], clean[0][2:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-5)


@pytest.mark.parametrize('p', [3.0, 20.0, math.inf])  # 20: in units of the largest deviation
def test_sharded_equals_global_batch(p):
    x = jnp.asarray(RNG.standard_normal((4, 16, 3)) * 2 + 1e4, jnp.float32)
    mask = jnp.asarray(RNG.random((4, 16, 3)) < 0.7)
    w = jnp.asarray(RNG.standard_normal((4, 16, 3)), jnp.float32)
    state = nl.init_batch_norm(3)

    def run(v, m):
        return nl.lp_batch_norm(v, state, p=p, training=True, mask=m, axis_name='i')

    def single(v):
        return nl.lp_batch_norm(v.reshape(64, 3), state, p=p, training=True,
                                mask=mask.reshape(64, 3))

    def mapped(v):
        return jax.vmap(run, axis_name='i', out_axes=(0, None))(v, mask)

    mesh = Mesh(np.array(jax.devices()[:4]), ('i',))
    sharded = jax.shard_map(lambda v, m: run(v[0], m[0]), mesh=mesh, in_specs=(P('i'), P('i')),
                            out_specs=(P('i'), P()))

    def with_gradient(f):
        """f(x) and the gradient of sum(w * y): across devices too (at p = inf, through
        the largest deviation)."""
        return jax.jit(lambda v: (f(v), jax.grad(lambda v: jnp.sum(w * f(v)[0].reshape(
            w.shape)))(v)))

    (y1, new1), g1 = with_gradient(single)(x)
    (y, new), gv = with_gradient(mapped)(x)
    (y4, new4), g4 = with_gradient(lambda v: sharded(v, mask))(x)
    np.testing.assert_allclose(y.reshape(64, 3), y1, atol=2e-6)
    np.testing.assert_allclose(new.var, new1.var, rtol=1e-6)
    np.testing.assert_allclose(y4.reshape(64, 3), y1, atol=2e-6)
    np.testing.assert_allclose(new4.mean, new1.mean, rtol=1e-6)
    gp = jax.pmap(jax.grad(lambda v, m, w: jnp.sum(w * run(v, m)[0])), axis_name='i',
                  devices=jax.devices()[:4])(x, mask, w)
    for g in (gv, g4, gp):
        np.testing.assert_allclose(g, g1, atol=2e-5)


def test_large_p_neither_overflows_nor_underflows():
    for scale in (1e-3, 1.0, 1e3):
        x = (RNG.standard_normal((64, 2)) * scale).astype(np.float32)
        y, _ = nl.lp_batch_norm(jnp.asarray(x), nl.init_batch_norm(2), p=60.0, training=True,
                                epsilon=1e-30)
        y_ref, _, _ = np_lp_batch_norm(x, 60.0, epsilon=1e-30)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4)


@pytest.mark.parametrize('p', [0.0, -1.0, 'two'])
def test_bad_p_is_rejected(p):
    with pytest.raises((ValueError, TypeError), match='p must'):
        nl.lp_batch_norm(jnp.ones((4, 2)), nl.init_batch_norm(2), p=p, training=True)
