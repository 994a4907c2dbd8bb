"""Random shapes, axes and dtypes: standardized outputs, invariance to scale and shift."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import normlib as nl

EPS = 1e-30  # below float32 resolution of any variance drawn here, so invariance is exact
# Output tolerance per dtype: a few units of the output's rounding for |y| <= ~4.
DTYPES = {'float32': (jnp.float32, 1e-4), 'float16': (jnp.float16, 4e-3),
          'bfloat16': (jnp.bfloat16, 3e-2)}


@st.composite
def shapes_and_axes(draw):
    """A shape of rank 2-3 and a proper, non-empty subset of its axes (some negative)."""
    rank = draw(st.integers(2, 3))
    shape = tuple(draw(st.lists(st.sampled_from([2, 3, 5]), min_size=rank, max_size=rank)))
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    axes = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    return shape, axes


@functools.partial(jax.jit, static_argnames='axes')
def _normalize(x, x_affine, x_scaled, axes):
    """batch_norm keeping ``axes``; layer_norm and rms_norm reducing them."""
    features = tuple(x.shape[a] for a in sorted(a % x.ndim for a in axes))

    def bn(x):
        return nl.batch_norm(x, nl.init_batch_norm(features), training=True, axis=axes,
                             epsilon=EPS)[0]

    def ln(x):
        return nl.layer_norm(x, axis=axes, epsilon=EPS)

    def rms(x):
        return nl.rms_norm(x, axis=axes, epsilon=EPS)

    # vmap over (original, transformed) keeps one normalizer of each kind in the compiled graph.
    pair, scaled = jnp.stack([x, x_affine]), jnp.stack([x, x_scaled])
    (bn, bn_t), (ln, ln_t) = jax.vmap(bn)(pair), jax.vmap(ln)(pair)
    rms, rms_t = jax.vmap(rms)(scaled)
    return (bn, ln, rms), (bn_t, ln_t, rms_t)


def _f64(v):
    return np.asarray(v).astype(np.float64)  # NumPy casts (no JAX op to compile)


def _check_standardized(y, x64, reduced, tol, what, center=True):
    """Per group: mean 0 and variance v / (v + eps), v the input's variance (or mean square)."""
    y = _f64(y)
    if center:
        np.testing.assert_allclose(y.mean(axis=reduced), 0, atol=tol, err_msg=what)
        v, spread = x64.var(axis=reduced), y.var(axis=reduced)
    else:
        v, spread = np.mean(x64 ** 2, axis=reduced), np.mean(y ** 2, axis=reduced)
    np.testing.assert_allclose(spread, v / (v + EPS), atol=4 * tol, err_msg=what)


def _rounding(x64, reduced):
    """float32 rounding of x relative to its spread: max |x| / std per group, times eps."""
    return 2.0 ** -24 * np.max(np.max(np.abs(x64), axis=reduced) / x64.std(axis=reduced))


# Ten examples: fixed layouts and dtypes are swept in test_batch_norm.py and test_layer_norm.py.
@settings(max_examples=10, deadline=None)
@given(case=shapes_and_axes(), dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16),
       log_std=st.floats(-1, 1), offset=st.floats(-100, 100), log_a=st.floats(-2, 2),
       b=st.floats(-100, 100))
def test_standardized_and_invariant_to_scale_and_shift(case, dtype, seed, log_std, offset,
                                                       log_a, b):
    shape, axes = case
    dtype, tol = DTYPES[dtype]
    rank = len(shape)
    kept = tuple(sorted(a % rank for a in axes))
    others = tuple(i for i in range(rank) if i not in kept)
    rng = np.random.default_rng(seed)
    std = 10.0 ** log_std
    x = (std * (offset + rng.normal(size=shape))).astype(dtype)
    x64 = _f64(x)
    if dtype == jnp.float32:
        a, shift = 10.0 ** log_a, b * std
    else:  # exact in low precision: a power of two and no shift
        a, shift = 2.0 ** round(log_a), 0.0
    x_affine = (a * x64 + shift).astype(dtype)
    x_scaled = (a * x64).astype(dtype)

    (bn, ln, rms), (bn_t, ln_t, rms_t) = _normalize(x, x_affine, x_scaled, axes)

    for y in (bn, ln, rms, bn_t, ln_t, rms_t):
        assert y.dtype == dtype and y.shape == shape
    _check_standardized(bn, x64, others, tol, 'batch_norm')
    _check_standardized(ln, x64, kept, tol, 'layer_norm')
    _check_standardized(rms, x64, kept, tol, 'rms_norm', center=False)

    # Invariance, up to the output's rounding and the float32 rounding of the transformed input.
    for name, y, y_t, reduced, transformed in [('batch_norm', bn, bn_t, others, x_affine),
                                               ('layer_norm', ln, ln_t, kept, x_affine),
                                               ('rms_norm', rms, rms_t, kept, x_scaled)]:
        inputs = 0.0 if dtype != jnp.float32 else 4 * (
            _rounding(x64, reduced) + _rounding(_f64(transformed), reduced))
        np.testing.assert_allclose(_f64(y_t), _f64(y), atol=2 * tol + inputs, err_msg=name)
