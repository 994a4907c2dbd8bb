"""Hostile input and Flax conformance: each test here failed before it was fixed.

References are float64 NumPy written here, and flax.linen/flax.nnx where
normlib promises Flax's behaviour.
"""

import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import normlib as nl
import normlib.linen as nln
import normlib.nnx as nnn
from _reference import np_lp_batch_norm, np_moments, np_standardize

RNG = np.random.default_rng(11)


def complex_data(shape, offset=3 - 2j):
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape) + offset).astype(
        np.complex64)


# 1. axis_name matters only for batch statistics.

def test_evaluation_with_axis_name_runs_outside_a_mapped_context():
    x = jnp.asarray(RNG.standard_normal((8, 3)), jnp.float32)
    state = nl.BatchNormState(jnp.full(3, 0.5), jnp.full(3, 4.0), jnp.zeros((), jnp.int32))
    expected = (np.asarray(x, np.float64) - 0.5) / np.sqrt(4.0 + 1e-5)
    for run in (lambda f: f(), lambda f: jax.jit(f)()):
        y, same = run(lambda: nl.batch_norm(x, state, training=False, axis_name='batch'))
        np.testing.assert_allclose(y, expected, rtol=1e-6)
        for got, want in zip(same, state):
            np.testing.assert_array_equal(got, want)
    module = nln.BatchNorm(use_running_average=True, axis_name='batch')
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_allclose(module.apply(variables, x), np.asarray(x) / np.sqrt(1 + 1e-5),
                               rtol=1e-6)
    layer = nnn.BatchNorm(3, axis_name='batch', rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x, use_running_average=True),
                               np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="axis 'batch' is not bound"):
        nl.batch_norm(x, state, training=True, axis_name='batch')


# 2. Complex input, as flax.linen accepts it.

@pytest.mark.parametrize('mask', [False, True])
def test_complex_batch_norm_matches_float64_and_keeps_complex_running_mean(mask):
    x = complex_data((64, 5))
    m = (RNG.random((64, 5)) < 0.7) if mask else None
    state = nl.init_batch_norm(5, dtype=jnp.complex64)
    assert state.mean.dtype == jnp.complex64 and state.var.dtype == jnp.float32
    scale = jnp.asarray(RNG.random(5) + 0.5, jnp.float32)
    bias = jnp.asarray(RNG.standard_normal(5), jnp.float32)

    @jax.jit
    def run(x):
        y, new = nl.batch_norm(x, state, scale, bias, training=True, momentum=0.9, mask=m)
        return y, new, nl.batch_norm(x, new, training=False)[0]

    y, new, y_eval = run(x)
    mean, var = np_moments(x, 0, m)
    expected = ((x.astype(np.complex128) - mean) / np.sqrt(var + 1e-5) * np.asarray(scale)
                + np.asarray(bias))
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(y, expected, atol=2e-6)
    np.testing.assert_allclose(new.mean, 0.1 * mean[0], atol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * var[0], rtol=1e-6)
    assert new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(
        y_eval, (x - np.asarray(new.mean)) / np.sqrt(np.asarray(new.var) + 1e-5), atol=2e-6)


def test_complex_per_example_normalizers_match_float64():
    x = complex_data((4, 6, 8))
    x128 = x.astype(np.complex128)
    y = jax.jit(lambda x: {'layer': nl.layer_norm(x), 'rms': nl.rms_norm(x),
                           'instance': nl.instance_norm(x),
                           'group': nl.group_norm(x, num_groups=2)})(x)
    np.testing.assert_allclose(y['layer'], np_standardize(x, -1, epsilon=1e-6), atol=2e-6)
    np.testing.assert_allclose(y['rms'], np_standardize(x, -1, epsilon=1e-6, center=False),
                               atol=2e-6)
    np.testing.assert_allclose(y['instance'], np_standardize(x, 1, epsilon=1e-6), atol=2e-6)
    grouped = x128.reshape(4, 6, 2, 4)
    np.testing.assert_allclose(y['group'],
                               np_standardize(grouped, (1, 3), epsilon=1e-6).reshape(x.shape),
                               atol=2e-6)


def test_complex_flax_modules_match_flax_linen():
    x = jnp.asarray(complex_data((16, 3)))
    x128 = np.asarray(x, np.complex128)
    mean, var = np_moments(x128, -1)
    rms = np.sqrt((np.abs(x128) ** 2).mean(-1, keepdims=True) + 1e-6)
    for ours, theirs, kw, expected in (
            (nln.LayerNorm, fnn.LayerNorm, {}, (x128 - mean) / np.sqrt(var + 1e-6)),
            (nln.RMSNorm, fnn.RMSNorm, {}, x128 / rms),
            (nln.GroupNorm, fnn.GroupNorm, {'num_groups': 1}, (x128 - mean) / np.sqrt(var + 1e-6))):
        def both(x, ours=ours(**kw), theirs=theirs(**kw)):
            variables = theirs.init(jax.random.key(0), x)
            return ours.apply(variables, x), theirs.apply(variables, x)

        y, y_flax = jax.jit(both)(x)
        np.testing.assert_allclose(y, expected, atol=2e-6)
        # flax's default (fast) variance loses digits on these 3-entry rows
        np.testing.assert_allclose(y, y_flax, atol=3e-5)

    @jax.jit
    def batch_norms(x):
        variables = fnn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
        outs = []
        for module in (fnn.BatchNorm(), nln.BatchNorm()):
            y, updates = module.apply(variables, x, use_running_average=False,
                                      mutable=['batch_stats'])
            outs.append((y, updates['batch_stats']['mean'], updates['batch_stats']['var'],
                         module.apply({**variables, **updates}, x, use_running_average=True)))
        return outs

    outs = batch_norms(x)
    for ours, theirs in zip(*outs):
        np.testing.assert_allclose(ours, theirs, atol=3e-6)
    layer = nnn.BatchNorm(3, rngs=nnx.Rngs(0))
    nnx.jit(lambda layer, x: layer(x, use_running_average=False))(layer, x)
    assert layer.mean[...].dtype == jnp.complex64  # flax.nnx drops the imaginary part here
    np.testing.assert_allclose(layer.mean[...], outs[0][1], atol=1e-6)


def test_complex_gradients_forward_and_reverse():
    x = jnp.asarray(complex_data((6, 3)))
    mask = jnp.asarray(RNG.random((6, 3)) < 0.8).at[0].set(True)
    with jax.enable_x64(True):
        x64 = x.astype(jnp.complex128)
        state = nl.init_batch_norm(3, dtype=jnp.complex128)
        # jit: each transformation compiles once instead of running op by op
        check_grads(jax.jit(lambda v: nl.batch_norm(v, state, training=True, mask=mask)[0]),
                    (x64,), order=2, modes=('fwd', 'rev'))
        check_grads(jax.jit(lambda v: nl.layer_norm(v, mask=mask)), (x64,), order=2,
                    modes=('fwd', 'rev'))
        check_grads(jax.jit(lambda v: nl.rms_norm(v)), (x64,), order=1, modes=('fwd', 'rev'))


def test_complex_sharded_equals_global_batch():
    x = jnp.asarray(complex_data((4, 16, 3), offset=100 + 50j))
    state = nl.init_batch_norm(3, dtype=jnp.complex64)

    @jax.jit
    def run(x):
        return (jax.vmap(lambda v: nl.batch_norm(v, state, training=True, axis_name='i'),
                         axis_name='i', out_axes=(0, None))(x),
                nl.batch_norm(x.reshape(64, 3), state, training=True))

    (y, new), (y1, new1) = run(x)
    np.testing.assert_allclose(y.reshape(64, 3), y1, atol=2e-6)
    np.testing.assert_allclose(new.mean, new1.mean, atol=1e-6)
    np.testing.assert_allclose(new.var, new1.var, rtol=1e-6)


def test_complex_is_rejected_clearly_where_unsupported():
    x = jnp.asarray(complex_data((8, 3)))
    with pytest.raises(TypeError, match='complex input needs a complex running mean'):
        nl.batch_norm(x, nl.init_batch_norm(3), training=True)
    for f in (lambda: nl.l1_batch_norm(x, nl.init_batch_norm(3, jnp.complex64), training=True),
              lambda: nl.batch_renorm(x, nl.init_batch_norm(3, jnp.complex64), training=True,
                                      r_max=3, d_max=5)):
        with pytest.raises(TypeError,
                           match='x must have a real floating-point dtype, got complex64'):
            f()


# 3. Instance norm with nothing to reduce.

@pytest.mark.parametrize('shape, axis', [((4, 3), -1), ((4, 5, 3), (1, 2))])
def test_instance_norm_with_no_axis_left_returns_the_bias_like_flax(shape, axis):
    x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    bias = jnp.asarray(RNG.standard_normal(shape[1:]), jnp.float32)

    @jax.jit
    def run(x):
        variables = fnn.InstanceNorm(feature_axes=axis).init(jax.random.key(0), x)
        variables = jax.tree.map(lambda v: v + 0.25, variables)
        return (nl.instance_norm(x, jnp.ones(shape[1:]), bias, axis=axis),
                jax.grad(lambda v: nl.instance_norm(v, axis=axis).sum())(x),
                nln.InstanceNorm(feature_axes=axis).apply(variables, x),
                fnn.InstanceNorm(feature_axes=axis).apply(variables, x))

    y, grad, module, flax_module = run(x)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, shape))
    np.testing.assert_array_equal(grad, 0)
    np.testing.assert_allclose(module, flax_module)


# 4. A feature with no valid entry.

def test_all_masked_feature_is_normalized_with_the_running_statistics():
    x = jnp.asarray(RNG.standard_normal((16, 3)) * 3 + 5, jnp.float32)
    mask = np.ones((16, 3), bool)
    mask[:, 1] = False
    state = nl.BatchNormState(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 9.0, 16.0]),
                              jnp.asarray(7, jnp.int32))
    x64 = np.asarray(x, np.float64)
    for name, run in {
            'batch_norm': lambda v: nl.batch_norm(v, state, training=True, mask=mask),
            'ghost': lambda v: nl.batch_norm(v, state, training=True, mask=mask,
                                             virtual_batch_size=8),
            'renorm': lambda v: nl.batch_renorm(v, state, training=True, mask=mask, r_max=3,
                                                d_max=5),
            'l1': lambda v: nl.l1_batch_norm(v, state, training=True, mask=mask)}.items():
        (y, new), grad = jax.jit(lambda v, run=run: (
            run(v), jax.grad(lambda v: (run(v)[0] ** 2).sum())(v)))(x)
        np.testing.assert_allclose(y[:, 1], (x64[:, 1] - 2) / np.sqrt(9 + 1e-5), rtol=1e-6,
                                   err_msg=name)
        assert float(new.mean[1]) == 2.0 and float(new.var[1]) == 9.0, name
        assert np.isfinite(grad).all(), name
        np.testing.assert_allclose(grad[:, 1], 2 * np.asarray(y[:, 1]) / np.sqrt(9 + 1e-5),
                                   rtol=1e-5, err_msg=name)


def test_all_masked_row_gives_the_bias_with_zero_gradient():
    x = jnp.asarray(RNG.standard_normal((3, 8)) * 3 + 5, jnp.float32)
    mask = np.ones((3, 8), bool)
    mask[1] = False
    bias = jnp.asarray(RNG.standard_normal(8), jnp.float32)
    y, grad, rms = jax.jit(lambda x: (
        nl.layer_norm(x, jnp.full(8, 2.0), bias, mask=mask),
        jax.grad(lambda v: (nl.layer_norm(v, mask=mask) ** 2).sum())(x),
        nl.rms_norm(x, mask=mask)))(x)
    np.testing.assert_array_equal(y[1], bias)
    expected = np_standardize(x, -1, epsilon=1e-6, mask=mask)
    np.testing.assert_allclose(y[0], expected[0] * 2 + bias, rtol=1e-5)
    np.testing.assert_array_equal(grad[1], 0)
    np.testing.assert_array_equal(rms[1], 0)


# 6. Empty batches.

@pytest.mark.parametrize('variant', ['plain', 'masked', 'ghost', 'l1', 'renorm'])
def test_empty_batch_returns_empty_output_and_unchanged_state(variant):
    state = nl.BatchNormState(jnp.asarray([1.0, 2.0]), jnp.asarray([3.0, 4.0]),
                              jnp.asarray(5, jnp.int32))
    x = jnp.zeros((0, 7, 2), jnp.float32)
    run = {
        'plain': lambda v: nl.batch_norm(v, state, training=True),
        'masked': lambda v: nl.batch_norm(v, state, training=True, mask=jnp.ones(v.shape, bool)),
        'ghost': lambda v: nl.batch_norm(v, state, training=True, virtual_batch_size=4),
        'l1': lambda v: nl.l1_batch_norm(v, state, training=True),
        'renorm': lambda v: nl.batch_renorm(v, state, training=True, r_max=3, d_max=5),
    }[variant]
    (y, new), grad = jax.jit(lambda v: (run(v), jax.grad(lambda v: run(v)[0].sum())(v)))(x)
    assert y.shape == x.shape
    for got, want in zip(new, state):
        np.testing.assert_array_equal(got, want)
    assert grad.shape == x.shape


# 7. Non-finite padding.

@pytest.mark.parametrize('variant', ['batch_norm', 'l1', 'renorm', 'layer_norm'])
def test_nan_and_inf_in_masked_entries_leave_gradients_untouched(variant):
    x = RNG.standard_normal((12, 4)).astype(np.float32)
    mask = np.ones((12, 4), bool)
    mask[:3] = False
    poisoned = x.copy()
    poisoned[0], poisoned[1], poisoned[2] = np.nan, np.inf, -np.inf
    state = nl.init_batch_norm(4)
    run = {
        'batch_norm': lambda v, s: nl.batch_norm(v, state, s, training=True, mask=mask)[0],
        'l1': lambda v, s: nl.l1_batch_norm(v, state, s, training=True, mask=mask)[0],
        'renorm': lambda v, s: nl.batch_renorm(v, state, s, training=True, mask=mask,
                                               r_max=3.0, d_max=5.0)[0],
        'layer_norm': lambda v, s: nl.layer_norm(v.T, s[:, None] * jnp.ones((4, 12)),
                                                 mask=mask.T).T,
    }[variant]

    def loss(v, s):
        return (jnp.where(mask, run(v, s), 0) ** 2).sum()

    scale = jnp.asarray([1.0, 2.0, 0.5, 1.5])
    grad_and_y = jax.jit(lambda v, s: (jax.grad(loss, argnums=(0, 1))(v, s), run(v, s)))
    (clean, y_clean), (dirty, y_dirty) = grad_and_y(x, scale), grad_and_y(poisoned, scale)
    np.testing.assert_allclose(dirty[0][3:], clean[0][3:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y_dirty)[3:], np.asarray(y_clean)[3:], rtol=1e-6)


# 8. zero_debias at momentum 1.

def test_zero_debias_with_momentum_one_is_the_average_of_all_batches():
    batches = [jnp.asarray(RNG.standard_normal((32, 3)) * (i + 1) + i, jnp.float32)
               for i in range(4)]
    state = nl.init_batch_norm(3)
    step = jax.jit(lambda b, state: nl.batch_norm(b, state, training=True, momentum=1.0,
                                                  zero_debias=True)[1])
    for b in batches:
        state = step(b, state)
    stacked = np.stack([np.asarray(b, np.float64) for b in batches])
    assert np.isfinite(state.mean).all()
    np.testing.assert_allclose(state.mean, stacked.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(state.var, stacked.var(1).mean(0), rtol=1e-5)


# 9. Hand-built state.

@pytest.mark.parametrize('state, match', [
    (nl.BatchNormState(jnp.zeros(3, jnp.float16), jnp.ones(3, jnp.float16),
                       jnp.zeros((), jnp.int32)), r'state.mean must be float32 or wider.*float16'),
    (nl.BatchNormState(jnp.zeros(3), jnp.ones(3, jnp.bfloat16), jnp.zeros((), jnp.int32)),
     r'state.var must be float32 or wider, got bfloat16'),
    (nl.BatchNormState(jnp.zeros(3), jnp.ones(3), 0), r'state.count must be an array, got int'),
    (nl.BatchNormState([0.0] * 3, jnp.ones(3), jnp.zeros((), jnp.int32)),
     r'state.mean must be an array, got list'),
    (nl.BatchNormState(jnp.zeros(3), jnp.ones(3), jnp.zeros(())),
     r'state.count must be an integer array'),
])
def test_hand_built_state_is_validated(state, match):
    with pytest.raises(TypeError, match=match):
        nl.batch_norm(jnp.ones((4, 3)), state, training=True)


@pytest.mark.parametrize('bad', [4.5, True, '4', (2, 1.5)])
def test_init_batch_norm_rejects_non_integers(bad):
    with pytest.raises(TypeError, match='num_features must be an int or a tuple of ints'):
        nl.init_batch_norm(bad)


def test_init_batch_norm_takes_numpy_integers():
    assert nl.init_batch_norm(np.int64(4)).mean.shape == (4,)


# 10. Overflow.

@jax.jit
def _layer_and_rms_norm(x):
    return nl.layer_norm(x), nl.rms_norm(x)


@pytest.mark.parametrize('magnitude', [1e-30, 1.0, 1e18, 2.0 ** 60, 1e19, 1e25, 1e30, 1e37])
def test_layer_and_rms_norm_are_right_across_the_float32_range(magnitude):
    x = (RNG.standard_normal((4, 64)) * magnitude).astype(np.float32)
    layer, rms = _layer_and_rms_norm(x)
    grouped = jax.jit(nl.group_norm, static_argnames='num_groups')(
        x.reshape(4, 8, 8), num_groups=1).reshape(4, 64)
    expected = np_standardize(x, -1, epsilon=1e-6)
    np.testing.assert_allclose(layer, expected, atol=2e-6)
    np.testing.assert_allclose(rms, np_standardize(x, -1, epsilon=1e-6, center=False), atol=2e-6)
    np.testing.assert_allclose(grouped, expected * np.sqrt(1 + 1e-6) / np.sqrt(1 + 1e-5),
                               atol=2e-5)


def test_layer_norm_at_float32_extremes_and_its_gradient():
    x = np.array([[3e38, -3e38, 1e38, 0.0], [3.0, -3.0, 1.0, 0.0]], np.float32)
    layer, rms = _layer_and_rms_norm(x)
    np.testing.assert_allclose(layer, np_standardize(x, -1, epsilon=1e-6), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rms, np_standardize(x, -1, epsilon=1e-6, center=False),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer[0], layer[1], rtol=1e-6)
    # A row whose sums overflow is taken again scaled; one at 1e18 is not, and its
    # gradient is the unscaled row's over 1e18.
    grad = jax.grad(lambda v: (nl.layer_norm(v) ** 3).sum())
    scaled, ref = jax.jit(lambda a, b: (grad(a), grad(b)))(x[1:] * np.float32(1e18), x[1:])
    np.testing.assert_allclose(scaled * 1e18, ref, rtol=1e-5)


def test_scaling_is_exact_across_the_threshold():
    """A power-of-two multiple normalizes to the same output whether its sums
    overflow (and it is taken again scaled) or not."""
    x = jnp.asarray(RNG.standard_normal((8, 32)), jnp.float32) * 2.0 ** 58
    normalize = jax.jit(lambda x: nl.layer_norm(x, epsilon=1e-30))
    outputs = [np.asarray(normalize(x * 2.0 ** k)) for k in range(5)]
    for y in outputs[1:]:
        np.testing.assert_array_equal(y, outputs[0])


# 11. Messages and dtypes.

def test_scale_that_does_not_broadcast_names_the_argument():
    with pytest.raises(ValueError, match=r'scale has shape \(2, 5, 1\), which does not broadcast'):
        nl.layer_norm(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 1)))
    with pytest.raises(ValueError, match=r'scale has shape \(2, 5, 1\), which does not broadcast'):
        nl.rms_norm(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 1)))


@pytest.mark.parametrize('dtype', [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_input_computes_in_float32(dtype):
    x = jnp.asarray(RNG.standard_normal((64, 4)) * 2 + 1, jnp.float32).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    state = nl.init_batch_norm(4)
    (y, new), layer = jax.jit(lambda x: (
        nl.batch_norm(x, state, jnp.ones(4, dtype), training=True), nl.layer_norm(x)))(x)
    assert y.dtype == dtype
    mean, _ = np_moments(x64, 0)
    np.testing.assert_allclose(new.mean, 0.01 * mean[0], rtol=1e-5)
    np.testing.assert_allclose(y.astype(jnp.float32), np_standardize(x64, 0, epsilon=1e-5),
                               rtol=0.13, atol=0.02)
    np.testing.assert_allclose(layer.astype(jnp.float32), np_standardize(x64, -1, epsilon=1e-6),
                               rtol=0.13, atol=0.02)


def test_virtual_batch_size_takes_numpy_integers_and_rejects_floats():
    x = jnp.asarray(RNG.standard_normal((8, 3)), jnp.float32)
    state = nl.init_batch_norm(3)
    a, _ = nl.batch_norm(x, state, training=True, virtual_batch_size=np.int64(4))
    b, _ = nl.batch_norm(x, state, training=True, virtual_batch_size=4)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match='virtual_batch_size must be a positive int'):
        nl.batch_norm(x, state, training=True, virtual_batch_size=4.0)
    assert math.isfinite(float(a.sum()))


@pytest.mark.parametrize('kwargs', [dict(feature_axes=(1, 2)),
                                    dict(reduction_axes=(1, 2), feature_axes=-1),
                                    dict(reduction_axes=-2, feature_axes=(1, 3))])
def test_layer_and_rms_norm_params_on_axes_that_are_not_normalized_match_flax(kwargs):
    x = jnp.asarray(RNG.standard_normal((2, 3, 4, 5)), jnp.float32)
    for name in ('LayerNorm', 'RMSNorm'):
        theirs = getattr(fnn, name)(**kwargs)
        variables = jax.jit(theirs.init)(jax.random.key(1), x)
        variables = jax.tree.map(lambda v: v + RNG.standard_normal(v.shape).astype(v.dtype),
                                 variables)
        # flax's own two-pass path for LayerNorm (its fast variance loses digits)
        oracle = (getattr(fnn, name)(**kwargs, use_fast_variance=False)
                  if name == 'LayerNorm' else theirs)
        got, expected = jax.jit(lambda v, x, ours=getattr(nln, name)(**kwargs), oracle=oracle: (
            ours.apply(v, x), oracle.apply(v, x)))(variables, x)
        np.testing.assert_allclose(got, expected, atol=3e-6, err_msg=name)


def test_instance_norm_batch_axis_message_matches_flax():
    for module in (nln.InstanceNorm(feature_axes=0), fnn.InstanceNorm(feature_axes=0)):
        with pytest.raises(ValueError, match='The channel axes cannot include the leading'
                                             ' dimension as this is assumed to be the batch axis'):
            module.init(jax.random.key(1), jnp.ones((2, 3, 4, 5)))


def _strict_cases(dtype='float32'):
    """Every public normalizer as ``f(x, scale, bias, axis_name)``: x is (8, 6)."""
    state = nl.init_batch_norm(6, dtype=jnp.complex64 if dtype == 'complex64' else jnp.float32)
    bn = dict(training=True, momentum=0.9)
    return {
        'batch_norm': lambda x, s, b, n: nl.batch_norm(x, state, s, b, axis_name=n, **bn),
        'batch_norm eval': lambda x, s, b, n: nl.batch_norm(x, state, s, b, training=False),
        'batch_norm mask': lambda x, s, b, n: nl.batch_norm(x, state, s, b, axis_name=n,
                                                            mask=x > 0, **bn),
        'ghost batch norm': lambda x, s, b, n: nl.batch_norm(x, state, s, b, axis_name=n,
                                                             virtual_batch_size=4, **bn),
        'batch_renorm': lambda x, s, b, n: nl.batch_renorm(x, state, s, b, axis_name=n,
                                                           r_max=2.0, d_max=1.0, **bn),
        'lp_batch_norm': lambda x, s, b, n: nl.lp_batch_norm(x, state, s, b, p=3.0, axis_name=n,
                                                             **bn),
        'l1_batch_norm': lambda x, s, b, n: nl.l1_batch_norm(x, state, s, b, axis_name=n, **bn),
        'layer_norm': lambda x, s, b, n: nl.layer_norm(x, s, b, axis_name=n),
        'rms_norm': lambda x, s, b, n: nl.rms_norm(x, s, axis_name=n),
        'group_norm': lambda x, s, b, n: nl.group_norm(x[None], s, b, num_groups=2),
        'instance_norm': lambda x, s, b, n: nl.instance_norm(x[None, None], s, b),
        'l2_normalize': lambda x, s, b, n: nl.l2_normalize(x),
    }


# These refuse complex input with a clear error (real statistics, or a real
# renormalization and norm).
_REAL_ONLY = {'lp_batch_norm', 'l1_batch_norm', 'batch_renorm', 'l2_normalize'}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'complex64'])
def test_strict_rank_and_dtype_promotion(dtype):
    # As Equinox's test setup and many codebases run: no implicit broadcasting
    # of ranks, no implicit mixing of dtypes (a bfloat16 x with bfloat16 scale,
    # complex x with real counts and variances inside).
    rng = np.random.default_rng(30)
    x = rng.standard_normal((4, 8, 6)) + 3
    if dtype == 'complex64':
        x = x + 1j * rng.standard_normal((4, 8, 6))
    x = jnp.asarray(x, dtype)
    scale, bias = jnp.asarray(rng.random(6) + 0.5, dtype), jnp.asarray(rng.random(6), dtype)
    report = []
    with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
        for name, f in _strict_cases(dtype).items():
            if dtype == 'complex64' and name in _REAL_ONLY:
                continue

            def out(x, n=None, f=f):
                return jnp.real(jax.tree.leaves(f(x, scale, bias, n))[0]).astype(jnp.float32)
            try:  # promotion is checked while tracing: nothing needs to run
                jax.eval_shape(jax.grad(lambda x: jnp.sum(jnp.sin(out(x)))), x[0])
                jax.eval_shape(jax.vmap(jax.grad(lambda v: jnp.sum(jnp.sin(out(v, 'i')))),
                                        axis_name='i'), x)
            except Exception as error:  # noqa: BLE001 - every failure is reported
                report.append(f'{name}: {type(error).__name__}: {str(error)[:200]}')
    assert not report, '\n'.join(report)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'complex64'])
def test_flax_modules_under_strict_promotion(dtype):
    rng = np.random.default_rng(31)
    x = rng.standard_normal((4, 8, 6)) + 3
    if dtype == 'complex64':  # complex parameters too, as Flax's modules take them
        x = x + 1j * rng.standard_normal((4, 8, 6))
    x = jnp.asarray(x, dtype)
    kw = dict(dtype=dtype, param_dtype=dtype)
    report = []
    with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
        linen = {'BatchNorm': nln.BatchNorm(use_running_average=False, **kw),
                 'BatchNorm eval': nln.BatchNorm(use_running_average=True, **kw),
                 'LayerNorm': nln.LayerNorm(**kw), 'RMSNorm': nln.RMSNorm(**kw),
                 'GroupNorm': nln.GroupNorm(num_groups=2, **kw),
                 'InstanceNorm': nln.InstanceNorm(**kw)}
        for name, module in linen.items():
            try:
                variables = jax.eval_shape(module.init, jax.random.key(0), x)
                jax.eval_shape(lambda v, x: module.apply(v, x, mutable=True), variables, x)
            except Exception as error:  # noqa: BLE001 - every failure is reported
                report.append(f'linen {name}: {type(error).__name__}: {str(error)[:200]}')
        synced = nln.BatchNorm(use_running_average=False, axis_name='i', **kw)
        try:
            variables = jax.eval_shape(synced.init, jax.random.key(0), x[0])
            jax.eval_shape(lambda v, x: jax.vmap(lambda x: synced.apply(v, x, mutable=True),
                                                 axis_name='i')(x), variables, x)
        except Exception as error:  # noqa: BLE001
            report.append(f'linen BatchNorm axis_name: {type(error).__name__}: {str(error)[:200]}')
        for name, make in {'BatchNorm': lambda r: nnn.BatchNorm(6, rngs=r, **kw),
                           'LayerNorm': lambda r: nnn.LayerNorm(6, rngs=r, **kw),
                           'RMSNorm': lambda r: nnn.RMSNorm(6, rngs=r, **kw),
                           'GroupNorm': lambda r: nnn.GroupNorm(6, num_groups=2, rngs=r, **kw),
                           'InstanceNorm': lambda r: nnn.InstanceNorm(6, rngs=r, **kw)}.items():
            try:
                module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
                nnx.eval_shape(lambda m, x: m(x), module, x)
                if name == 'BatchNorm':
                    module.eval()
                    nnx.eval_shape(lambda m, x: m(x), module, x)
            except Exception as error:  # noqa: BLE001
                report.append(f'nnx {name}: {type(error).__name__}: {str(error)[:200]}')
    assert not report, '\n'.join(report)


def _constant_features(n, features=16, seed=12):
    """Features constant over n rows, at magnitudes from 1e-3 to 1e3 (not powers of two)."""
    rng = np.random.default_rng(seed)
    row = rng.normal(size=(1, features)) * 10.0 ** rng.uniform(-3, 3, size=(1, features))
    return np.repeat(row.astype(np.float32), n, 0)


@pytest.mark.parametrize('n', [3, 7, 10, 300, 3000])
def test_constant_features_normalize_to_exactly_the_bias(n):
    x = np.concatenate([_constant_features(n, seed=seed) for seed in range(8)], axis=1)
    x = x[:, :16] if n > 100 else x
    features = x.shape[1]
    bias = np.linspace(-1, 1, features).astype(np.float32)
    state = nl.init_batch_norm(features)
    ones = np.ones(x.shape, bool)

    outputs = jax.jit(lambda x: {
        'batch_norm': nl.batch_norm(x, state, bias=bias, training=True)[0],
        'masked': nl.batch_norm(x, state, bias=bias, training=True, mask=ones)[0],
        'layer_norm': nl.layer_norm(x.T),
    })(x)
    for shards in (3, 5):  # counts that are not powers of two
        rows = n // shards * shards
        if rows:  # jitted: XLA may contract a recomputed anchor into a fused multiply-add
            outputs[f'sync{shards}'] = jax.jit(jax.vmap(
                lambda v: nl.batch_norm(v, state, bias=bias, training=True, axis_name='b')[0],
                axis_name='b'))(x[:rows].reshape(shards, -1, features)).reshape(rows, features)
    for name, y in outputs.items():
        expected = np.zeros_like(y) if name == 'layer_norm' else np.broadcast_to(bias, y.shape)
        np.testing.assert_array_equal(y, expected, err_msg=name)


def test_constant_rows_at_the_float32_limit_give_the_bias():
    x = np.full((4, 8), 3e38, np.float32)
    np.testing.assert_array_equal(nl.layer_norm(x), np.zeros_like(x))
    np.testing.assert_array_equal(nl.group_norm(x.reshape(4, 2, 4), num_groups=2),
                                  np.zeros((4, 2, 4), np.float32))
    np.testing.assert_array_equal(nl.rms_norm(x), np.ones_like(x))


def test_nnx_scan_over_layers_on_constant_input_stays_exact():
    # Flax's NNX scan-over-layers pattern on jnp.ones: every layer sees features that are
    # constant over the batch, so each BatchNorm must return exactly its bias (0).
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(10, 10, rngs=rngs)
            self.bn = nnn.BatchNorm(10, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x), use_running_average=False))

    blocks = nnx.vmap(Block, in_axes=0, out_axes=0)(nnx.Rngs(0).split(5))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, x):
        return block(x)

    y = forward(blocks, jnp.ones((3, 10)))
    np.testing.assert_array_equal(y, np.zeros((3, 10), np.float32))


@pytest.mark.parametrize('p', [80, 200])
def test_lp_batch_norm_with_large_p_neither_overflows_nor_underflows(p):
    x = (RNG.normal(size=(512, 3)) * 3 + 1).astype(np.float32)
    y, state = nl.lp_batch_norm(x, nl.init_batch_norm(3), p=p, training=True, momentum=0.0)
    expected, _, spread = np_lp_batch_norm(x, p)
    np.testing.assert_allclose(np.sqrt(state.var), spread, rtol=1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_lp_batch_norm_inf_on_an_empty_batch_returns_an_empty_y():
    state = nl.init_batch_norm(3)
    y, new = nl.lp_batch_norm(jnp.zeros((0, 3)), state, p=float('inf'), training=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)


def test_lp_normalize_checks_the_range_of_the_norm_not_only_of_the_power_sum():
    # p = 0.5: the power sum of five entries of 3e37 is 2.7e19, its square 7.5e38 overflows.
    y = nl.lp_normalize(jnp.full((5,), 3e37), p=0.5)
    np.testing.assert_allclose(y, np.full(5, 1 / 25), rtol=1e-6)


@pytest.mark.parametrize('fn', [
    lambda x, e: nl.layer_norm(x, epsilon=e), lambda x, e: nl.rms_norm(x, epsilon=e),
    lambda x, e: nl.batch_norm(x, nl.init_batch_norm(4), training=True, epsilon=e)[0],
    lambda x, e: nl.group_norm(x, num_groups=2, epsilon=e),
    lambda x, e: nl.lp_normalize(x, epsilon=e)])
def test_epsilon_that_xla_flushes_to_zero_is_rejected(fn):
    with pytest.raises(ValueError, match='epsilon must be at least 1.17549e-38'):
        fn(jnp.ones((2, 4)), 1e-45)
    assert np.isfinite(np.asarray(fn(jnp.ones((2, 4)), 1.2e-38))).all()


@pytest.mark.parametrize('shape', [(3, 0), (2, 0, 4)])
@pytest.mark.parametrize('name', ['layer_norm', 'rms_norm', 'group_norm', 'instance_norm',
                                  'lp_normalize', 'linf_normalize'])
def test_zero_size_reduced_axis_gives_an_empty_output(name, shape):
    fn = {'layer_norm': nl.layer_norm, 'rms_norm': nl.rms_norm,
          'group_norm': lambda x: nl.group_norm(x, num_groups=1),
          'instance_norm': nl.instance_norm, 'lp_normalize': nl.lp_normalize,
          'linf_normalize': lambda x: nl.lp_normalize(x, p=float('inf'))}[name]
    x = jnp.zeros(shape)
    assert fn(x).shape == shape
    assert jax.jit(fn)(x).shape == shape


_EXPORTED = {
    'batch_norm': lambda x, s: nl.batch_norm(x, s, training=True),
    'grad': lambda x, s: jax.grad(lambda x: jnp.sum(nl.batch_norm(x, s, training=True)[0] ** 3))(x),
    'masked': lambda x, s: nl.batch_norm(x, s, training=True, mask=x > 0.5),
    'lp': lambda x, s: nl.lp_batch_norm(x, s, p=3, training=True),
    'l1': lambda x, s: nl.l1_batch_norm(x, s, training=True),
    'renorm': lambda x, s: nl.batch_renorm(x, s, training=True, r_max=3.0, d_max=5.0),
    'evaluation': lambda x, s: nl.batch_norm(x, s, training=False),
}


@pytest.mark.parametrize('name', list(_EXPORTED))
def test_export_with_a_symbolic_batch_serializes_and_runs(name):
    from jax import export
    fn = _EXPORTED[name]
    batch, = export.symbolic_shape('n')
    state = nl.BatchNormState(jnp.full(4, 0.5), jnp.full(4, 2.0), jnp.array(3, jnp.int32))
    exported = export.export(jax.jit(fn))(jax.ShapeDtypeStruct((batch, 4), jnp.float32), state)
    restored = export.deserialize(exported.serialize())
    for n in (5, 300):  # below and above the anchor's sample size
        x = jnp.asarray(RNG.normal(size=(n, 4)).astype(np.float32) * 3 + 100)
        got, want = restored.call(x, state), jax.jit(fn)(x, state)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f'{name}, n={n}')


def test_exported_linen_training_step_with_a_symbolic_batch():
    from jax import export
    module = nln.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.ones((2, 3)))
    step = jax.jit(lambda v, x: module.apply(v, x, mutable=['batch_stats']))
    batch, = export.symbolic_shape('n')
    exported = export.export(step)(variables, jax.ShapeDtypeStruct((batch, 3), jnp.float32))
    restored = export.deserialize(exported.serialize())
    x = jnp.asarray(RNG.normal(size=(9, 3)).astype(np.float32) + 1e3)
    chex_leaves = zip(jax.tree.leaves(restored.call(variables, x)),
                      jax.tree.leaves(step(variables, x)))
    for g, w in chex_leaves:
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@jax.jit
def _every_normalizer(x):
    """Every normalizer of the (6, 8) x, on one device and sharded over 's' by vmap."""
    state = nl.init_batch_norm(8)

    def shards(f, v, in_axes):
        return jax.vmap(f, axis_name='s', in_axes=in_axes, out_axes=in_axes)(v)

    return {
        'batch_norm': nl.batch_norm(x, state, training=True, epsilon=1e-30)[0],
        'batch_norm masked': nl.batch_norm(x, state, training=True, epsilon=1e-30,
                                           mask=np.ones(x.shape, bool))[0],
        'batch_norm synced': shards(lambda v: nl.batch_norm(
            v, state, training=True, epsilon=1e-30, axis_name='s')[0], x.reshape(3, 2, 8),
            0).reshape(6, 8),
        'layer_norm sharded': shards(lambda v: nl.layer_norm(v, epsilon=1e-30, axis_name='s'),
                                     x.reshape(6, 4, 2), 1).reshape(6, 8),
        'rms_norm sharded': shards(lambda v: nl.rms_norm(v, epsilon=1e-30, axis_name='s'),
                                   x.reshape(6, 4, 2), 1).reshape(6, 8),
        'group_norm sharded': shards(lambda v: nl.group_norm(v, num_groups=1, epsilon=1e-30,
                                                             axis_name='s'),
                                     x.reshape(6, 4, 2), 1).reshape(6, 8),
    }


@pytest.mark.parametrize('magnitude', [1.0, 1e20, 1e30, 3e37])
def test_every_normalizer_is_right_up_to_float32s_largest_values_sharded_or_not(magnitude):
    base = RNG.normal(size=(6, 8)).astype(np.float64)
    x = (base / np.abs(base).max() * magnitude).astype(np.float32)
    bn_ref, ln_ref = np_standardize(x, 0, epsilon=0), np_standardize(x, 1, epsilon=0)
    rms_ref = np_standardize(x, 1, epsilon=0, center=False)
    refs = {'batch_norm': bn_ref, 'batch_norm masked': bn_ref, 'batch_norm synced': bn_ref,
            'layer_norm sharded': ln_ref, 'rms_norm sharded': rms_ref,
            'group_norm sharded': ln_ref}
    for name, y in _every_normalizer(x).items():
        np.testing.assert_allclose(y, refs[name], rtol=2e-5, atol=2e-5, err_msg=name)


def test_overflow_safety_under_vmap_with_one_member_out_of_range():
    # The check that sends batch statistics to the scaled pass is one answer for a vmapped
    # batch: members in range and out of range are both right, in one program.
    base = RNG.normal(size=(3, 6, 4))
    x = (base * np.array([1.0, 1e30, 1e-3])[:, None, None]).astype(np.float32)
    state = nl.init_batch_norm(4)
    y = jax.jit(jax.vmap(lambda v: nl.batch_norm(v, state, training=True, epsilon=1e-30)[0]))(x)
    np.testing.assert_allclose(y, np_standardize(x, 1, epsilon=0), rtol=2e-5, atol=2e-5)
    g = jax.jit(jax.grad(lambda v: jnp.sum(jax.vmap(lambda u: nl.batch_norm(
        u, state, training=True)[0])(v)[0] ** 3)))(x)
    assert np.isfinite(np.asarray(g)).all()
