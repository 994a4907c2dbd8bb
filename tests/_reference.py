"""What several test files compare with: float64 NumPy references (one per
formula), Flax's two-pass moments taken through its public BatchNorm, and the
comparison helpers."""

import functools
import math

import jax
import numpy as np
from flax import linen as fnn


def np_moments(x, axes, mask=None, *, center=True, ddof=0):
    """float64 (complex128 for complex x) mean and variance ``mean(|x - mean|**2)``
    of the valid entries over ``axes``, kept as size-1 axes. ``center=False``
    gives a zero mean and the mean square; ``ddof=1`` the unbiased variance.
    Groups without a valid entry give NaN."""
    x = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    count = valid.sum(axis=axes, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = (np.where(valid, x, 0).sum(axis=axes, keepdims=True) / count if center
                else np.zeros(count.shape, x.dtype))
        var = np.where(valid, np.abs(x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / (
            count - ddof)
    return mean, var


def np_standardize(x, axes, *, epsilon, center=True, mask=None):
    """float64 ``(x - mean) / sqrt(var + epsilon)`` over ``axes`` (valid entries only)."""
    mean, var = np_moments(x, axes, mask, center=center)
    return (np.asarray(x, mean.dtype) - mean) / np.sqrt(var + epsilon)


def np_lp_norm(x, p, axis=-1):
    """float64 ``||x||_p`` along ``axis`` (kept), taken as ``m ||x / m||_p`` with
    ``m = max|x|`` so that no power over- or underflows."""
    x = np.asarray(x, np.float64)
    largest = np.max(np.abs(x), axis=axis, keepdims=True)
    if math.isinf(p):
        return largest
    m = np.where(largest > 0, largest, 1)
    return m * np.sum((np.abs(x) / m) ** p, axis=axis, keepdims=True) ** (1 / p)


def np_lp_normalize(x, p, axis=-1, epsilon=1e-12):
    """float64 ``x / max(||x||_p, epsilon)``."""
    return np.asarray(x, np.float64) / np.maximum(np_lp_norm(x, p, axis), epsilon)


def np_lp_batch_norm(x, p, mask=None, epsilon=1e-5):
    """float64 ``(y, mean, spread)`` of Lp batch norm over axis 0 of (n, features)
    data: ``spread = (mean |x - mean|**p)**(1/p)``, taken in units of the largest
    deviation, and ``y = (x - mean) / sqrt(spread**2 + epsilon)``."""
    x = np.asarray(x, np.float64)
    mean, _ = np_moments(x, 0, mask)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    d = np.where(valid, np.abs(x - mean), 0)
    top = d.max(0)
    if math.isinf(p):
        spread = top
    else:
        unit = np.where(top > 0, top, 1)
        spread = unit * (np.sum((d / unit) ** p, 0) / valid.sum(0)) ** (1 / p)
    return (x - mean) / np.sqrt(spread ** 2 + epsilon), mean[0], spread


@functools.lru_cache(maxsize=None)
def _flax_batch_stats(ndim, kept):
    module = fnn.BatchNorm(use_running_average=False, axis=kept, momentum=0.0,
                           use_fast_variance=False, use_scale=False, use_bias=False)

    @jax.jit
    def run(x, mask):
        variables = module.init(jax.random.key(0), x, mask=mask)
        _, updates = module.apply(variables, x, mask=mask, mutable=['batch_stats'])
        return updates['batch_stats']['mean'], updates['batch_stats']['var']

    return run


def flax_two_pass_moments(x, axes, mask=None):
    """Flax's float32 two-pass moments over ``axes``, in float64 and flattened:
    ``flax.linen.BatchNorm(use_fast_variance=False, momentum=0)`` keeping the
    other axes, whose running statistics are then the batch's."""
    axes = tuple(a % np.ndim(x) for a in np.atleast_1d(axes))
    kept = tuple(i for i in range(np.ndim(x)) if i not in axes)
    mask = np.ones(np.shape(x), bool) if mask is None else np.broadcast_to(mask, np.shape(x))
    mean, var = _flax_batch_stats(np.ndim(x), kept)(x, mask)
    return np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1)


def random_input(shape=(4, 3, 5, 6), offset=2.0, seed=0, dtype=np.float32):
    """Test input, made with NumPy: every distinct eager JAX op costs a compile."""
    return (np.random.default_rng(seed).normal(size=shape) * 3.0 + offset).astype(dtype)


def assert_close(actual, expected, tol=2e-5):
    """``actual`` equals ``expected`` to ``tol``, relative to the larger of 1 and max|expected|."""
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(expected).max())))
