"""lp_normalize across float32's whole range, against float64 NumPy scaled by max|x|."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import normlib as nl
from _reference import np_lp_norm, np_lp_normalize

PS = [1.0, 2.0, 3.0, 30.0, math.inf]
# Small enough that no vector below is floored (their norms are >= 3e-30).
TINY_EPSILON = 1e-36


def np_lp_normalize_vjp(x, p, g, epsilon):
    """The gradient of sum(g * y) in float64: (g - <g, y> v) / N, or g / epsilon where floored.

    ``v = dN/dx = sign(y) |y|**(p-1)`` (the indicator of the largest entry for
    p = inf, which the rows used here have exactly one of).
    """
    y, norm = np_lp_normalize(x, p, epsilon=epsilon), np_lp_norm(x, p)
    g = np.asarray(g, np.float64)
    if math.isinf(p):
        v = np.sign(y) * (np.abs(x) == np.max(np.abs(x), axis=-1, keepdims=True))
    else:
        v = np.sign(y) * np.abs(y) ** (p - 1)
    floored = norm < epsilon
    return np.where(floored, g / epsilon,
                    (g - np.sum(g * y, axis=-1, keepdims=True) * v) / np.where(floored, 1, norm))


def _range_rows():
    """Rows whose squares or powers over- or underflow float32, and random rows from 1e-30
    to 1e30."""
    width = 6
    rows = [[3e19, 4e19], [-3e19, 4e19], [3e-30, 4e-30], [30.0, 40.0], [3e-3, 4e-3],
            [1e38, 1e-38, -2e37], [-1e-38, 3e38, 1e38], [3e38, -3e38, 3e38, 3e38],
            [3e37, 1e-30, -4e37, 1e-38], [1e-30, -3e-30, 2e-30]]
    x = np.zeros((len(rows), width), np.float32)
    for i, row in enumerate(rows):
        x[i, :len(row)] = row
    rng = np.random.default_rng(0)
    scales = 10.0 ** np.arange(-30, 31, 5)
    random = rng.normal(size=(len(scales), width)) * scales[:, None]
    return np.concatenate([x, random.astype(np.float32)])


X = _range_rows()


W = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)


@jax.jit
def _y_and_grad(x):
    """y and the gradient of sum(W * y) for every p."""
    def loss(x, p):
        return jnp.sum(W * nl.lp_normalize(x, p, epsilon=TINY_EPSILON))
    return {str(p): (nl.lp_normalize(x, p, epsilon=TINY_EPSILON), jax.grad(loss)(x, p))
            for p in PS}


@pytest.fixture(scope='module')
def range_results():
    return _y_and_grad(X)


@pytest.mark.parametrize('p', PS)
def test_matches_float64_across_the_range(p, range_results):
    y, _ = range_results[str(p)]
    assert y.dtype == jnp.float32
    expected = np_lp_normalize(X, p, epsilon=TINY_EPSILON)
    # Entries of y below float32's normal range (1e-38 next to 1e38) come out 0.
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize('p', PS)
def test_gradient_matches_float64_across_the_range(p, range_results):
    _, grad = range_results[str(p)]
    assert np.all(np.isfinite(grad))
    expected = np_lp_normalize_vjp(X, p, W, TINY_EPSILON)
    # Per row, relative to its largest entry (1 / ||x|| spans 1e-38 to 1e30),
    # except rows with norms near 1e38, whose gradients are subnormal.
    scale = np.max(np.abs(expected), axis=-1, keepdims=True)
    normal = np.max(np.abs(X), axis=-1) < 1e37
    assert normal.sum() == len(X) - 4
    np.testing.assert_allclose((grad / scale)[normal], (expected / scale)[normal],
                               rtol=0, atol=2e-5 if p == 30 else 2e-6)


def test_power_of_two_scaling_changes_no_bit():
    # y(2**k x) = y(x), even where 2**k x squared or powered overflows or
    # underflows float32 (bit for bit for p = 1, 2 and inf; within rounding
    # for other p, whose scaled path measures entries relative to the largest),
    # and 2**k grad(2**k x) = grad(x).
    rng = np.random.default_rng(2)
    x = (rng.uniform(0.5, 2.0, size=X.shape) * rng.choice([-1, 1], size=X.shape)).astype(np.float32)
    results = _y_and_grad(x)
    for k in (-100, -50, 50, 100):
        c = np.float32(2.0 ** k)
        for p, (scaled_y, scaled_grad) in _y_and_grad(x * c).items():
            y, grad = results[p]
            if float(p) in (1.0, 2.0, math.inf):
                np.testing.assert_array_equal(scaled_y, y, err_msg=f'p={p}, 2**{k}')
            else:
                np.testing.assert_allclose(scaled_y, y, rtol=1e-6, atol=1e-6,
                                           err_msg=f'p={p}, 2**{k}')
            np.testing.assert_allclose(scaled_grad * c, grad, rtol=1e-5,
                                       atol=1e-6 * float(np.abs(grad).max()),
                                       err_msg=f'p={p}, 2**{k}')


def test_ordinary_data_unchanged():
    # Against the plain formula, where it neither overflows nor underflows.
    x = np.random.default_rng(3).normal(size=(16, 64)).astype(np.float32)

    @jax.jit
    def run(x):
        def plain(p):
            norm = (jnp.max(jnp.abs(x), axis=-1, keepdims=True) if math.isinf(p) else
                    jnp.sum(jnp.abs(x) ** p, axis=-1, keepdims=True) ** (1 / p))
            return x / jnp.maximum(norm, 1e-12)
        return {str(p): (nl.lp_normalize(x, p), plain(p)) for p in (1.0, 2.0, math.inf)}

    for p, (y, plain) in run(x).items():
        np.testing.assert_allclose(y, plain, rtol=2e-7, atol=0, err_msg=p)


def test_epsilon_floor():
    tiny = np.array([[3e-30, 4e-30, 0]], np.float32)
    huge = np.array([[3e37, 4e37, 0], [3e37, -4e37, 1e37]], np.float32)
    large = huge / np.float32(10)

    @jax.jit
    def run(tiny, huge, large):
        out = {}
        for p in PS:
            grad = jax.grad(lambda x, p=p: jnp.sum(nl.lp_normalize(x, p, epsilon=1e37)[:, 0]))(
                large)
            out[str(p)] = (nl.lp_normalize(tiny, p), nl.lp_normalize(tiny, p, epsilon=1e-30),
                           nl.lp_normalize(huge, p, epsilon=1e38), grad)
        return out

    for p, (floored, above, huge_floored, grad) in run(tiny, huge, large).items():
        # Norms below epsilon: x / epsilon, also near float32's largest values.
        np.testing.assert_allclose(floored, tiny / 1e-12, rtol=1e-6, err_msg=p)
        np.testing.assert_allclose(huge_floored, huge / 1e38, rtol=1e-6, err_msg=p)
        np.testing.assert_allclose(grad, np.array([[1e-37, 0, 0]] * 2), rtol=1e-6, err_msg=p)
        # Just above epsilon the norm divides.
        np.testing.assert_allclose(above, np_lp_normalize(tiny, float(p), epsilon=1e-30),
                                   rtol=2e-6, err_msg=p)


def test_zero_finite_derivatives_forward_and_reverse():
    x = np.zeros((2, 3), np.float32)
    x[1] = [0.0, 2e30, -1e-30]
    w = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)

    @jax.jit
    def run(x):
        out = {}
        for p in PS:
            def loss(x, p=p):
                return jnp.sum(jnp.sin(nl.lp_normalize(x, p)) * w)
            _, jvp = jax.jvp(functools.partial(nl.lp_normalize, p=p), (x,), (jnp.ones_like(x),))
            out[str(p)] = (nl.lp_normalize(x, p)[0], jax.grad(loss)(x), jax.hessian(loss)(x), jvp)
        return out

    for p, (y, *derivatives) in run(x).items():
        np.testing.assert_array_equal(y, np.zeros(3), err_msg=p)
        for d in derivatives:
            assert np.all(np.isfinite(d)), p


def test_check_grads_second_order_float64():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        # Away from 0, ties and the floor: every norm is smooth there.
        x = rng.uniform(0.5, 2.0, size=(2, 4)) * rng.choice([-1.0, 1.0], size=(2, 4))
        x[0, 1] = 3.0
        f = jax.jit(lambda x: (nl.lp_normalize(x, 2.0), nl.lp_normalize(x, 30.0)))
        check_grads(f, (x,), order=2, modes=['fwd', 'rev'], rtol=1e-4)
        # Far outside float32 (and, for p = 30, outside float64's powers),
        # the derivatives scale exactly: by 2**-k and 2**-2k at 2**k x.
        w = rng.normal(size=x.shape)

        @jax.jit
        def derivatives(x):
            def loss(x):
                return sum(jnp.sum(w * jnp.sin(nl.lp_normalize(x, p, epsilon=1e-300)))
                           for p in PS)
            return jax.grad(loss)(x), jax.hessian(loss)(x)

        grad, hessian = derivatives(x)
        for k in (-300, 300):
            c = 2.0 ** k
            scaled_grad, scaled_hessian = derivatives(c * x)
            # The scaled path (taken at 2**k x) and the plain one agree to rounding.
            np.testing.assert_allclose(scaled_grad * c, grad, rtol=1e-12)
            np.testing.assert_allclose(scaled_hessian * c * c, hessian, rtol=1e-12, atol=1e-12)


def test_jvp_vmap_and_jacobians_at_the_extremes():
    x = np.array([[3e19, -4e19, 1e19], [3e-30, 4e-30, -1e-30]], np.float32)
    t = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

    @jax.jit
    def run(x, t):
        out = {}
        for p in (2.0, 30.0):
            f = functools.partial(nl.lp_normalize, p=p, epsilon=TINY_EPSILON)
            y, dy = jax.jvp(f, (x,), (t,))
            out[p] = (y, dy, jax.linearize(f, x)[1](t), jax.vmap(f)(x),
                      jax.vmap(jax.jacrev(f))(x), jax.vmap(jax.jacfwd(f))(x))
        return out

    for p, (y, dy, linear, batched, jac_rev, jac_fwd) in run(x, t).items():
        np.testing.assert_allclose(y, np_lp_normalize(x, p, epsilon=TINY_EPSILON), rtol=2e-6)
        np.testing.assert_allclose(linear, dy, rtol=1e-6)
        np.testing.assert_array_equal(batched, y)
        # Reverse and forward mode round differently; compare per row, relative to its scale.
        scale = np.max(np.abs(jac_fwd), axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(jac_rev / scale, jac_fwd / scale, atol=1e-6)
        # dy/dx = (I - y v^T) / N on each row, though the rows' norms differ by 1e49.
        for i, row in enumerate(x):
            yr, norm = np_lp_normalize(row, p, epsilon=TINY_EPSILON), np_lp_norm(row, p)
            expected = np.eye(3) - np.outer(yr, np.sign(yr) * np.abs(yr) ** (p - 1))
            np.testing.assert_allclose(jac_rev[i] * norm, expected, atol=2e-6)
            np.testing.assert_allclose(dy[i] * norm, expected @ t[i], rtol=1e-5, atol=1e-5)


def test_bfloat16_input():
    x = jnp.asarray([[3e19, 4e19, 0], [30, 40, 0], [1e38, -1e-38, 3e37], [3e-30, 4e-30, 0]],
                    jnp.bfloat16)

    @jax.jit
    def run(x):
        def loss(x, p):
            return jnp.sum(nl.lp_normalize(x, p).astype(jnp.float32)[:, 0])
        return {str(p): (nl.lp_normalize(x, p, epsilon=TINY_EPSILON), jax.grad(loss)(x, p))
                for p in PS}

    for p, (y, grad) in run(x).items():
        assert y.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)),
                                   np_lp_normalize(x.astype(jnp.float32), float(p),
                                                   epsilon=TINY_EPSILON),
                                   rtol=1e-2, atol=1e-30, err_msg=p)
        assert np.all(np.isfinite(grad.astype(jnp.float32))), p
