"""batch_norm against float64 NumPy, flax.linen and torch, on hostile data."""

import functools

import chex
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normlib as nl
from _reference import np_moments

EPS = 1e-5
STATIC = ('training', 'axis', 'momentum', 'epsilon', 'unbiased_running_var', 'zero_debias')
# One jitted entry point: tests with equal shapes and settings share its compilations.
batch_norm_jit = jax.jit(nl.batch_norm, static_argnames=STATIC)


def _feature_axes(axis, ndim):
    axis = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axis))


def np_batch_norm(x, axis, scale=None, bias=None, *, mask=None, epsilon=EPS):
    """Float64 reference: ``(y, batch mean, biased batch var, count)``."""
    x = np.asarray(x, np.float64)
    features = _feature_axes(axis, x.ndim)
    reduced = tuple(i for i in range(x.ndim) if i not in features)
    feature_shape = tuple(x.shape[a] for a in features)
    broadcast = tuple(d if i in features else 1 for i, d in enumerate(x.shape))
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = valid.sum(reduced, keepdims=True)
    mean, var = np_moments(x, reduced, mask)
    y = (x - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(broadcast)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(broadcast)
    return y, mean.reshape(feature_shape), var.reshape(feature_shape), n.reshape(feature_shape)


def random_state(rng, features, count=3):
    return nl.BatchNormState(
        jnp.asarray(rng.normal(size=features), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, size=features), jnp.float32),
        jnp.asarray(count, jnp.int32))


def random_affine(rng, features):
    return (rng.uniform(0.5, 1.5, features).astype(np.float32),
            rng.normal(size=features).astype(np.float32))


LAYOUTS = {
    'NC': ((16, 5), -1),
    'NHWC': ((4, 3, 3, 5), -1),
    'NCHW': ((4, 5, 3, 3), 1),
    'NLC': ((4, 6, 5), -1),
    'NDHWC': ((2, 3, 2, 3, 5), -1),
    'tuple_axes': ((4, 3, 5, 2), (1, 3)),
    'tuple_axes_negative': ((3, 4, 2, 5), (-1, 1)),
}


def _layout(name):
    shape, axis = LAYOUTS[name]
    features = tuple(shape[a] for a in _feature_axes(axis, len(shape)))
    broadcast = tuple(d if i in _feature_axes(axis, len(shape)) else 1 for i, d in enumerate(shape))
    return shape, axis, features, broadcast


def _layout_inputs(seed):
    rng = np.random.default_rng(seed)
    inputs = {}
    for name in LAYOUTS:
        shape, _, features, _ = _layout(name)
        x = (3.0 * rng.normal(size=shape) + 2.0).astype(np.float32)
        inputs[name] = (x, random_state(rng, features), *random_affine(rng, features))
    return inputs


@pytest.fixture(scope='module')
def layout_results():
    """Every layout in both modes, computed under one jax.jit (one compilation)."""
    inputs = _layout_inputs(0)

    @jax.jit
    def run(inputs):
        return {(name, training): nl.batch_norm(*args, training=training, axis=LAYOUTS[name][1],
                                                momentum=0.9)
                for name, args in inputs.items() for training in (True, False)}

    return inputs, run(inputs)


def check_training(layout, inputs, y, new):
    x, state, scale, bias = inputs
    y_ref, mean, var, _ = np_batch_norm(x, LAYOUTS[layout][1], scale, bias)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, 0.9 * np.asarray(state.mean, np.float64) + 0.1 * mean,
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new.var, 0.9 * np.asarray(state.var, np.float64) + 0.1 * var,
                               atol=1e-5, rtol=1e-5)
    assert int(new.count) == int(state.count) + 1
    chex.assert_trees_all_equal_dtypes(new, state)
    chex.assert_trees_all_equal_shapes(new, state)


def check_eval(layout, inputs, y, new):
    x, state, scale, bias = inputs
    broadcast = _layout(layout)[3]
    mean, var = (np.asarray(s, np.float64).reshape(broadcast) for s in (state.mean, state.var))
    y_ref = (x - mean) / np.sqrt(var + EPS) * scale.reshape(broadcast) + bias.reshape(broadcast)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_equal(new, state)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_training_matches_numpy(layout, layout_results):
    inputs, results = layout_results
    check_training(layout, inputs[layout], *results[layout, True])


@pytest.mark.parametrize('layout', LAYOUTS)
def test_eval_uses_state_and_leaves_it_unchanged(layout, layout_results):
    inputs, results = layout_results
    check_eval(layout, inputs[layout], *results[layout, False])


@pytest.mark.parametrize('layout', ['NCHW', 'tuple_axes'])
def test_matches_flax_linen(layout):
    shape, axis, _, _ = _layout(layout)
    rng = np.random.default_rng(2)
    batches = [(rng.normal(size=shape) * 2 - 1).astype(np.float32) for _ in range(3)]
    module = fnn.BatchNorm(axis=axis, momentum=0.9, epsilon=EPS, use_fast_variance=False)
    variables = jax.eval_shape(functools.partial(module.init, use_running_average=False),
                               jax.random.key(0), batches[0])
    features = variables['params']['scale'].shape
    assert features == _layout(layout)[2]
    params = {'scale': jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32),
              'bias': jnp.asarray(rng.normal(size=features), jnp.float32)}
    # Flax initializes mean 0 and var 1, as init_batch_norm does.
    stats = {'mean': jnp.zeros(features), 'var': jnp.ones(features)}

    @functools.partial(jax.jit, static_argnames='training')
    def both(x, state, stats, training):
        y_flax, updates = module.apply({'params': params, 'batch_stats': stats}, x,
                                       use_running_average=not training, mutable=['batch_stats'])
        y, state = nl.batch_norm(x, state, params['scale'], params['bias'], training=training,
                                 axis=axis, momentum=0.9)
        return y, state, y_flax, updates['batch_stats']

    state = nl.init_batch_norm(features)
    for x in batches:
        y, state, y_flax, stats = both(x, state, stats, training=True)
        np.testing.assert_allclose(y, y_flax, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state.mean, stats['mean'], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(state.var, stats['var'], atol=1e-6, rtol=1e-5)
    assert int(state.count) == len(batches)

    y, _, y_flax, _ = both(batches[0] + 0.5, state, stats, training=False)
    np.testing.assert_allclose(y, y_flax, atol=2e-5, rtol=1e-5)


def test_momentum_none_is_the_average_of_batch_moments():
    rng = np.random.default_rng(3)
    # Unequal batch sizes: the average of batch means differs from the pooled mean.
    batches = [(rng.normal(size=(n, 5)) * (i + 1) + 3 * i).astype(np.float32)
               for i, n in enumerate([16, 9, 16, 9])]
    state = nl.init_batch_norm(5)
    means, variances = [], []
    for x in batches:
        _, state = batch_norm_jit(x, state, training=True, momentum=None)
        _, mean, var, _ = np_batch_norm(x, -1)
        means.append(mean)
        variances.append(var)
    np.testing.assert_allclose(state.mean, np.mean(means, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var, np.mean(variances, axis=0), rtol=1e-5, atol=1e-5)
    assert int(state.count) == len(batches)


def test_momentum_none_averages_each_feature_over_the_batches_it_saw():
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(16, 5)) + 2 * i).astype(np.float32) for i in range(3)]
    no_feature_0 = np.ones((16, 5), bool)
    no_feature_0[:, 0] = False
    state = nl.init_batch_norm(5, per_feature_count=True)
    for i, x in enumerate(batches):
        _, state = batch_norm_jit(x, state, training=True, momentum=None,
                                  mask=no_feature_0 if i == 1 else np.ones((16, 5), bool))
    expected = np.mean([x.astype(np.float64).mean(axis=0) for x in batches], axis=0)
    expected[0] = np.mean([batches[0][:, 0].mean(), batches[2][:, 0].mean()])
    np.testing.assert_allclose(state.mean, expected, rtol=1e-5)
    assert state.count.tolist() == [2, 3, 3, 3, 3]


@pytest.mark.parametrize('momentum, zero_debias', [(None, False), (0.9, True), (0.999, True)])
@pytest.mark.parametrize('offset, std', [(1e6, 1.0), (0.0, 1e-4), (1e6, 1e-3), (0.0, 1e-3)])
def test_first_update_is_the_batch_exactly(momentum, zero_debias, offset, std):
    # A weight of 1 must give the batch's statistics bit for bit: at offset 1e6 the
    # prior's 0 must not round the mean, and a variance of 1e-8 must keep its digits.
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(64, 3)) * std + offset).astype(np.float32)
    _, state = batch_norm_jit(x, nl.init_batch_norm(3), training=True, momentum=momentum,
                              zero_debias=zero_debias)
    _, mean, var, _ = np_batch_norm(x, -1)
    np.testing.assert_allclose(state.mean, mean, rtol=2e-7, atol=1e-5 * std)
    np.testing.assert_allclose(state.var, var, rtol=1e-3)
    # The second batch of momentum=None averages the two exactly, small variances included.
    if momentum is None:
        x2 = (rng.normal(size=(64, 3)) * std + offset).astype(np.float32)
        _, state = batch_norm_jit(x2, state, training=True, momentum=None)
        _, mean2, var2, _ = np_batch_norm(x2, -1)
        np.testing.assert_allclose(state.var, (var + var2) / 2, rtol=1e-3)


def test_update_count_saturates_instead_of_wrapping():
    limit = np.iinfo(np.int32).max
    for count in (np.int32(limit), np.full((2,), limit, np.int32)):
        state = nl.BatchNormState(jnp.zeros(2), jnp.ones(2), jnp.asarray(count))
        x = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
        _, new = batch_norm_jit(x, state, training=True, momentum=None)
        assert (np.asarray(new.count) == limit).all()
        # Weight 1 / (count + 1): the running mean barely moves, and stays finite.
        np.testing.assert_allclose(new.mean, [0.0, 0.0], atol=1e-8)


def test_masked_count_does_not_wrap_past_int32():
    # 2**31 + 2**20 valid entries per feature, as a global sharded batch can hold: the
    # count reduction batch_norm's masked moments use, on a mask broadcast inside jit
    # (XLA fuses the broadcast, so nothing of that size is materialized). An int32 sum
    # gives -2146435072 here.
    from normlib import _moments
    shape = (2**16, 2**15 + 2**4, 1)
    count = jax.jit(lambda t: _moments._count(jnp.broadcast_to(t, shape), (0, 1)))(True)
    assert count.dtype == jnp.float32
    assert float(count.reshape(())) == pytest.approx(2**31 + 2**20, rel=1e-6)


@pytest.mark.parametrize('momentum, zero_debias', [(None, False), (0.9, True), (0.9, False)])
def test_complex_running_variance_stays_real(momentum, zero_debias):
    rng = np.random.default_rng(8)
    state = nl.init_batch_norm(3, dtype=jnp.complex64)
    for _ in range(2):  # the second call checks the state the first one returned
        x = (rng.normal(size=(16, 3)) + 1j * rng.normal(size=(16, 3))).astype(np.complex64)
        _, state = batch_norm_jit(x, state, training=True, momentum=momentum,
                                  zero_debias=zero_debias)
    assert state.var.dtype == jnp.float32 and state.mean.dtype == jnp.complex64


@pytest.mark.parametrize('layout', ['NC', 'NCHW'])
def test_unbiased_running_var_matches_torch(layout, torch):
    shape, axis, features, _ = _layout(layout)
    rng = np.random.default_rng(5)
    module = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        features[0], eps=EPS, momentum=0.1).double().train()
    state = nl.init_batch_norm(features)
    for i in range(3):
        x = (rng.normal(size=shape) * (i + 1) + i).astype(np.float32)
        with torch.no_grad():
            y_torch = module(torch.from_numpy(x.astype(np.float64))).numpy()
        y, state = batch_norm_jit(x, state, training=True, axis=axis, momentum=0.9,
                                  unbiased_running_var=True)
        np.testing.assert_allclose(y, y_torch, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state.mean, module.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, module.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state.count) == int(module.num_batches_tracked)


def test_no_gradient_flows_from_running_statistics():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    state = random_state(rng, 5)
    w = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)

    def losses(x):
        y, new = nl.batch_norm(x, state, training=True, momentum=0.5)
        return jnp.sum(w * y), jnp.sum(new.mean ** 2 + 3.0 * new.var)

    @jax.jit
    def grads(x):
        return (jax.grad(lambda x: losses(x)[1])(x), jax.grad(lambda x: sum(losses(x)))(x),
                jax.grad(lambda x: losses(x)[0])(x), losses(x)[1], losses(2 * x + 1)[1])

    state_only, total, y_only, stats_loss, other_stats_loss = grads(x)
    np.testing.assert_array_equal(state_only, np.zeros_like(x))
    np.testing.assert_allclose(total, y_only, atol=1e-6)
    # The loss on the state does depend on x, so a leak would show above.
    assert float(stats_loss) != float(other_stats_loss)


@pytest.mark.parametrize('dtype, tol', [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_low_precision_input(dtype, tol):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(16, 5)) * 4 + 50, dtype)
    scale, bias = (jnp.asarray(v, dtype) for v in random_affine(rng, 5))
    state = random_state(rng, 5)
    state = state._replace(mean=state.mean + 50, var=state.var * 16)

    (y, new), (y_eval, same) = jax.jit(lambda *a: tuple(
        nl.batch_norm(*a, training=t, momentum=0.0) for t in (True, False)))(x, state, scale, bias)

    assert y.dtype == dtype and y_eval.dtype == dtype
    chex.assert_trees_all_equal_dtypes(new, state)
    assert new.mean.dtype == jnp.float32
    chex.assert_trees_all_equal(same, state)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    s64, b64 = (np.asarray(v.astype(jnp.float32), np.float64) for v in (scale, bias))
    y_ref, mean, var, _ = np_batch_norm(x64, -1, s64, b64)
    # float32 statistics of the exact low-precision values: far tighter than the dtype's eps.
    np.testing.assert_allclose(new.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y_ref, atol=tol, rtol=tol)
    m, v = np.asarray(state.mean, np.float64), np.asarray(state.var, np.float64)
    y_ref = (x64 - m) / np.sqrt(v + EPS) * s64 + b64
    np.testing.assert_allclose(np.asarray(y_eval.astype(jnp.float32)), y_ref, atol=tol, rtol=tol)


def offset_data(ratio, shape=(256, 4), seed=9):
    """float32 features whose |mean| / std is ``ratio``, with mixed signs and spreads."""
    rng = np.random.default_rng(seed)
    std = np.array([1.0, 0.3, 7.0, 2.5])
    sign = np.array([1, -1, 1, -1])
    return (sign * ratio * std + std * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize('ratio, tol', [(1e4, 1e-3), (1e6, 1e-2)])
def test_offset_data_matches_float64_reference(ratio, tol):
    x = offset_data(ratio)
    y, state = batch_norm_jit(x, nl.init_batch_norm(4), training=True, momentum=0.0,
                              epsilon=1e-12)
    y64 = np.asarray(y, np.float64)
    y_ref, mean, var, _ = np_batch_norm(x, -1, epsilon=1e-12)
    assert np.max(np.abs(y64.std(axis=0) - 1)) < tol
    assert np.max(np.abs(y64.mean(axis=0))) < tol
    assert np.max(np.abs(y64 - y_ref)) < tol
    # What float32 can deliver (measured: under 1e-6 at both ratios); catches a mean rounded
    # to float32 before it is subtracted, which is still within the loose bound at 1e4.
    assert np.max(np.abs(y64 - y_ref)) < 1e-5
    np.testing.assert_allclose(state.var, var, rtol=tol)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-7)


def test_flax_fast_variance_fails_on_offset_data():
    """Contrast: the data above is hostile enough to break E[x^2] - E[x]^2."""
    x = offset_data(1e4)
    module = fnn.BatchNorm(use_running_average=False, epsilon=1e-12)  # use_fast_variance=True
    variables = {'params': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
                 'batch_stats': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}
    y, _ = jax.jit(functools.partial(module.apply, mutable=['batch_stats']))(variables, x)
    assert np.max(np.abs(np.asarray(y, np.float64).std(axis=0) - 1)) > 0.5


MASK_SHAPES = [(16, 5), (16, 1), (1, 5)]


def _mask_inputs(mask_shape):
    rng = np.random.default_rng(10)
    x = (rng.normal(size=(16, 5)) * 2 + 1).astype(np.float32)
    mask = rng.uniform(size=mask_shape) < 0.6
    mask[:2] = True
    if mask_shape == (1, 5):
        mask = np.array([[True, False, True, True, False]])  # unseen features keep their state
    return (x, random_state(rng, 5), *random_affine(rng, 5)), mask


@pytest.fixture(scope='module')
def mask_results():
    inputs = [_mask_inputs(shape) for shape in MASK_SHAPES]

    @jax.jit
    def run(inputs):
        return [nl.batch_norm(*args, training=True, momentum=0.8, unbiased_running_var=True,
                              mask=mask) for args, mask in inputs]

    return dict(zip(MASK_SHAPES, zip(inputs, run(inputs))))


def check_mask(args, mask, y, new):
    x, state, scale, bias = args
    seen = np.broadcast_to(mask, x.shape).any(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        y_ref, mean, var, n = np_batch_norm(x, -1, scale, bias, mask=mask)
        mean = np.where(seen, 0.8 * np.asarray(state.mean) + 0.2 * mean, state.mean)
        var = np.where(seen, 0.8 * np.asarray(state.var) + 0.2 * var * n / (n - 1), state.var)
    np.testing.assert_allclose(np.asarray(y)[:, seen], y_ref[:, seen], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.var)[~seen], np.asarray(state.var)[~seen])
    assert int(new.count) == int(state.count) + 1


@pytest.mark.parametrize('mask_shape', MASK_SHAPES)
def test_mask_matches_numpy_on_valid_entries(mask_shape, mask_results):
    (args, mask), (y, new) = mask_results[mask_shape]
    check_mask(args, mask, y, new)


def test_without_jit():
    """Training with and without a mask, and eval, run eagerly (one shape: shared op caches)."""
    args, mask = _mask_inputs((16, 5))
    y, new = nl.batch_norm(*args, training=True, momentum=0.8, unbiased_running_var=True, mask=mask)
    check_mask(args, mask, y, new)
    all_valid = np.ones((16, 5), bool)
    y, new = nl.batch_norm(*args, training=True, momentum=0.8, unbiased_running_var=True)
    check_mask(args, all_valid, y, new)
    x, state, scale, bias = args
    y, new = nl.batch_norm(x, state, scale, bias, training=False)
    y_ref = (x - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var, np.float64) + EPS)
    np.testing.assert_allclose(y, y_ref * scale + bias, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_equal(new, state)


def test_mask_nhwc_padding_examples():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
    mask = np.array([True, False, True, False]).reshape(4, 1, 1, 1)
    y, new = batch_norm_jit(x, nl.init_batch_norm(5), training=True, momentum=0.0, mask=mask)
    y_ref, *_ = np_batch_norm(x, -1, mask=mask)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    _, mean_valid, var_valid, _ = np_batch_norm(x[mask.ravel()], -1)
    np.testing.assert_allclose(new.mean, mean_valid, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var_valid, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('momentum', [0.9, None])
def test_all_false_mask_leaves_state_unchanged(momentum):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    scale, bias = random_affine(rng, 5)
    state = random_state(rng, 5)

    def loss(x, scale, bias):
        y, new = nl.batch_norm(x, state, scale, bias, training=True, momentum=momentum,
                               mask=np.zeros((16, 5), bool))
        return jnp.sum(jnp.sin(y)), (y, new)

    grads, (y, new) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)
    np.testing.assert_array_equal(new.count, state.count)
    for leaf in (y, *grads):
        assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize('padding', [np.nan, -1e9])
def test_masked_entries_do_not_affect_valid_outputs(padding):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    mask = np.ones((16, 5), bool)
    mask[:3] = False  # left padding: the first rows are invalid
    padded = np.where(mask, x, padding).astype(np.float32)
    y_ref, mean, var, _ = np_batch_norm(x, -1, mask=mask)
    y, new = batch_norm_jit(padded, nl.init_batch_norm(5), training=True, momentum=0.0, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[3:], y_ref[3:], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('padding', [np.nan, np.inf])
def test_masked_nan_padding_leaves_gradients_finite(padding):
    rng = np.random.default_rng(20)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    mask = np.ones((16, 5), bool)
    mask[:3] = False
    w = rng.normal(size=(16, 5)).astype(np.float32)

    def loss(x):
        y, _ = nl.batch_norm(x, nl.init_batch_norm(5), training=True, mask=mask)
        return jnp.sum(jnp.where(mask, w * y, 0.0))

    grad = jax.jit(jax.grad(loss))
    expected = grad(np.where(mask, x, 0).astype(np.float32))
    got = grad(np.where(mask, x, padding).astype(np.float32))
    np.testing.assert_allclose(np.asarray(got)[3:], np.asarray(expected)[3:], rtol=1e-5, atol=1e-6)


def test_degenerate_batches_give_bias_and_finite_gradients():
    """One element per feature, constant features and huge constants: y = bias, finite grads."""
    rng = np.random.default_rng(14)
    inputs = {
        'one_element': rng.normal(size=(1, 3)),
        'one_element_nhwc': rng.normal(size=(1, 1, 1, 3)),
        'constant': np.broadcast_to(rng.normal(size=3), (6, 3)),
        'huge_constant': np.broadcast_to(np.array([1e18, -3e18, 7e17]), (6, 3)),
    }
    inputs = {k: (x.astype(np.float32), rng.normal(size=x.shape).astype(np.float32))
              for k, x in inputs.items()}
    scale = jnp.asarray([0.5, 2.0, -1.0])
    bias = jnp.asarray([0.1, -0.2, 0.3])

    def loss(x, scale, bias, w):
        y, new = nl.batch_norm(x, nl.init_batch_norm(3), scale, bias, training=True)
        return jnp.sum(w * y), (y, new)

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    results = jax.jit(lambda inputs: {k: grad(x, scale, bias, w) for k, (x, w) in inputs.items()})(
        inputs)
    for case, (grads, (y, new)) in results.items():
        x, w = inputs[case]
        np.testing.assert_allclose(y, np.broadcast_to(bias, x.shape), atol=1e-6, err_msg=case)
        for leaf in jax.tree.leaves((grads, new)):
            assert np.all(np.isfinite(leaf)), case
        np.testing.assert_allclose(grads[2], np.sum(w.reshape(-1, 3), axis=0), rtol=1e-5,
                                   err_msg=case)


def test_huge_values_normalize():
    rng = np.random.default_rng(15)
    x = (1e18 * (1 + 0.5 * rng.normal(size=(16, 5)))).astype(np.float32)
    y, new = batch_norm_jit(x, nl.init_batch_norm(5), training=True, momentum=0.0,
                            mask=np.ones(x.shape, bool))  # shares a compilation
    y_ref, _, var, _ = np_batch_norm(x, -1)
    np.testing.assert_allclose(y, y_ref, atol=1e-4)
    np.testing.assert_allclose(new.var, var, rtol=1e-4)


def test_huge_spread_over_many_elements_stays_finite():
    rng = np.random.default_rng(16)
    x = (1e18 * rng.normal(size=(512, 2))).astype(np.float32)
    y, new = batch_norm_jit(x, nl.init_batch_norm(2), training=True, momentum=0.0)
    assert np.all(np.isfinite(new.var))
    y_ref, *_ = np_batch_norm(x, -1)
    np.testing.assert_allclose(y, y_ref, atol=1e-3)


# Second-order derivatives (training, mask, eval) are checked in forward and
# reverse mode in test_moments.py::test_forward_and_reverse_mode_to_second_order.


def jnp_reference_bn(x, scale, bias):
    """Plain jnp batch norm over axis 0, differentiated by JAX itself."""
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias


def test_composes_with_grad_vmap_and_checkpoint():
    """Hessian-vector products (grad of grad) under vmap and remat, against plain jnp autodiff."""
    rng = np.random.default_rng(18)
    with jax.enable_x64(True):
        x, w, v = rng.normal(size=(3, 2, 5, 3))
        scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
        state = nl.init_batch_norm(3, jnp.float64)

        def derivatives(normalize):
            def loss(x, w):
                return jnp.sum(jnp.tanh(w * normalize(x)))

            def hvp(x, w, v):
                return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x, w), v))(x)

            def both(x, w, v):
                return jax.vmap(hvp)(x, w, v), jax.vmap(jax.grad(jax.checkpoint(loss)))(x, w)

            return jax.jit(both)(x, w, v)

        got = derivatives(lambda x: nl.batch_norm(x, state, scale, bias, training=True)[0])
        expected = derivatives(lambda x: jnp_reference_bn(x, scale, bias))
        assert np.max(np.abs(expected[0])) > 1e-2
        chex.assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-9)


def test_vmap_over_models_matches_a_loop():
    rng = np.random.default_rng(19)
    xs = rng.normal(size=(3, 16, 5)).astype(np.float32)
    states = jax.tree.map(lambda *s: jnp.stack(s), *[random_state(rng, 5) for _ in range(3)])
    new = jax.jit(jax.vmap(functools.partial(nl.batch_norm, training=True, momentum=0.5)))(
        xs, states)[1]
    for i in range(3):
        _, mean, var, _ = np_batch_norm(xs[i], -1)
        np.testing.assert_allclose(new.mean[i], 0.5 * np.asarray(states.mean[i]) + 0.5 * mean,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.var[i], 0.5 * np.asarray(states.var[i]) + 0.5 * var,
                                   rtol=1e-5)
    np.testing.assert_array_equal(new.count, np.asarray(states.count) + 1)


@pytest.mark.parametrize('momentum', [0.99, 0.9, 0.999])
def test_running_update_weighs_with_one_minus_momentum_rounded_once(momentum):
    # (1 - momentum) rounded once from the exact decimal: 1 - float32(0.99)
    # carries float32(0.99)'s error, 1e-6 relative in every running mean.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)) + 3.0, jnp.float32)
    _, state = nl.batch_norm(x, nl.init_batch_norm(4), training=True,
                                  momentum=momentum)
    mean64 = np.asarray(x, np.float64).mean(0)
    expected = (1 - momentum) * mean64
    np.testing.assert_allclose(np.asarray(state.mean, np.float64), expected, rtol=4e-7)
