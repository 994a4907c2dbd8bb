"""lp_normalize, l2_normalize and l1_normalize against float64 NumPy and torch."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import normlib as nl
from _reference import np_lp_normalize

PS = [1.0, 2.0, 3.0, 0.5, math.inf]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(3, 4, 5)) * 2).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero vector along the last axis
    x[1, :, 2] = 0.0  # an all-zero vector along axis 1, and zero entries elsewhere
    return x


AXES = [-1, 1, 0]


@pytest.fixture(scope='module')
def jit_results():
    """Every (p, axis) under one jax.jit, plus the l1/l2 shorthands."""
    x = _inputs()

    @jax.jit
    def run(x):
        out = {f'{p}, {axis}': nl.lp_normalize(x, p, axis=axis) for p in PS for axis in AXES}
        out['tuple'] = nl.lp_normalize(x, 3.0, axis=(1, 2))
        out['l2'] = nl.l2_normalize(x, axis=1)
        out['l1'] = nl.l1_normalize(x)
        out['eps'] = nl.lp_normalize(1e-3 * x, epsilon=0.5)
        return out

    return x, run(x)


@pytest.mark.parametrize('p', PS)
@pytest.mark.parametrize('axis', AXES)
def test_matches_numpy_and_torch(p, axis, jit_results, torch):
    x, results = jit_results
    y = results[f'{p}, {axis}']
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, np_lp_normalize(x, p, axis), rtol=1e-5, atol=1e-6)
    expected = torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float64)), p=p, dim=axis)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_tuple_axes_shorthands_and_epsilon(jit_results):
    x, results = jit_results
    np.testing.assert_allclose(results['tuple'], np_lp_normalize(x, 3.0, (1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results['l2'], np_lp_normalize(x, 2.0, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results['l1'], np_lp_normalize(x, 1.0, -1), rtol=1e-5, atol=1e-6)
    # Norms below epsilon are floored: the output is x / epsilon.
    assert np.max(np.sqrt(np.sum((1e-3 * x.astype(np.float64)) ** 2, -1))) < 0.5
    np.testing.assert_allclose(results['eps'], 1e-3 * x / 0.5, rtol=1e-5, atol=1e-9)


def test_without_jit():
    x = _inputs(1)
    for p in (2.0, 0.5):
        np.testing.assert_allclose(nl.lp_normalize(x, p), np_lp_normalize(x, p),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nl.l2_normalize(x), np_lp_normalize(x, 2.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nl.l1_normalize(x), np_lp_normalize(x, 1.0), rtol=1e-5, atol=1e-6)


def test_zero_gives_zero_and_finite_gradients():
    # Rows are normalized independently: an all-zero block and a block with zero entries.
    x = np.concatenate([_inputs(2), np.zeros((3, 4, 5), np.float32)])
    w = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)

    @jax.jit
    def run(x):
        def loss(x, p):
            return jnp.sum(w * nl.lp_normalize(x, p))
        return {str(p): (nl.lp_normalize(x, p), jax.grad(loss)(x, p)) for p in PS}

    for p, (y, grad) in run(x).items():
        np.testing.assert_array_equal(y[3:], np.zeros((3, 4, 5)), err_msg=p)
        np.testing.assert_array_equal(y[0, 0], np.zeros(5), err_msg=p)
        assert np.all(np.isfinite(grad)), p


def test_smallest_epsilon_zero_vector_and_gradient():
    # The smallest epsilon allowed: x = 0 gives 0, its gradient is w / epsilon
    # (finite, about 1e38); a nonzero vector is unaffected.
    tiny = float(np.finfo(np.float32).tiny)
    x = np.zeros((2, 3), np.float32)
    x[1] = [3.0, -4.0, 0.0]
    w = np.array([[1.0, -2.0, 0.5], [1.0, 1.0, 1.0]], np.float32)

    @jax.jit
    def run(x):
        def loss(x, p):
            return jnp.sum(w * nl.lp_normalize(x, p, epsilon=tiny))
        return {str(p): (nl.lp_normalize(x, p, epsilon=tiny), jax.grad(loss)(x, p)) for p in PS}

    for p, (y, grad) in run(x).items():
        np.testing.assert_array_equal(y[0], np.zeros(3), err_msg=p)
        np.testing.assert_allclose(y[1], np_lp_normalize(x[1], float(p)), rtol=1e-6, err_msg=p)
        np.testing.assert_allclose(grad[0], w[0] / np.float64(tiny), rtol=1e-6, err_msg=p)


def test_epsilon_below_the_smallest_normal_is_rejected():
    # XLA flushes it to 0, and x = 0 would then give 0 / 0.
    with pytest.raises(ValueError, match='epsilon must be at least 1.17549e-38'):
        nl.lp_normalize(jnp.ones(3), epsilon=1e-40)
    with jax.enable_x64(True):  # float64 norms allow a smaller epsilon
        y = nl.lp_normalize(jnp.zeros(3, jnp.float64), epsilon=1e-300)
    np.testing.assert_array_equal(y, np.zeros(3))


def test_check_grads_second_order():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        # Entries away from 0 and without ties: every norm is smooth there.
        x = rng.uniform(0.5, 2.0, size=(2, 4)) * rng.choice([-1.0, 1.0], size=(2, 4))
        x[0, 1] = 3.0

        def f(x):
            return tuple(nl.lp_normalize(x, p) for p in (2.0, 0.5, math.inf))

        check_grads(jax.jit(f), (x,), order=2, modes=['rev'])


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_input_norm_in_float32(dtype):
    # 300**2 * 8 overflows float16; a float32 norm does not.
    x = jnp.asarray(np.full((2, 8), 300.0) * np.array([[1.0], [-2.0]]), dtype)
    y = jax.jit(nl.l2_normalize)(x)
    assert y.dtype == dtype
    expected = np_lp_normalize(np.asarray(x.astype(jnp.float32)), 2.0)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=1e-2)


def test_composes_with_vmap():
    x = _inputs(5)
    y = jax.jit(jax.vmap(lambda v: nl.lp_normalize(v, 3.0, axis=0), in_axes=1, out_axes=1))(x)
    chex.assert_trees_all_close(y, np_lp_normalize(x, 3.0, axis=0).astype(np.float32), rtol=1e-5,
                                atol=1e-6)
