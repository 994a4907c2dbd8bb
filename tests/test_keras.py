"""normlib.keras against keras.layers (oracle) and float64 NumPy written here."""

import numpy as np
import pytest

keras = pytest.importorskip('keras', reason='keras (an optional extra) is not installed')
if keras.backend.backend() != 'jax':
    pytest.skip('normlib.keras needs KERAS_BACKEND=jax', allow_module_level=True)
import jax  # noqa: E402

import normlib.keras as nk  # noqa: E402

RNG = np.random.default_rng(31)
PAIRS = [
    (keras.layers.BatchNormalization, nk.BatchNormalization, {}),
    (keras.layers.LayerNormalization, nk.LayerNormalization, {}),
    (keras.layers.GroupNormalization, nk.GroupNormalization, {'groups': 2}),
    (keras.layers.UnitNormalization, nk.UnitNormalization, {}),
    (keras.layers.RMSNormalization, nk.RMSNormalization, {}),
]


def model_with(layer_cls, kwargs, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 4))
    h = keras.layers.Dense(4)(inputs)
    h = layer_cls(**kwargs)(h)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


@pytest.mark.parametrize('theirs, ours, kwargs', PAIRS, ids=lambda v: getattr(v, '__name__', ''))
def test_same_weights_and_outputs_as_keras(theirs, ours, kwargs, tmp_path):
    reference, model = model_with(theirs, kwargs), model_with(ours, kwargs)
    assert [w.path.split('/')[-1] for w in reference.weights] == \
        [w.path.split('/')[-1] for w in model.weights]
    # Existing Keras weights load unchanged (perturbed, so gamma/beta/moving stats matter).
    reference.set_weights([w + RNG.normal(0, 0.1, w.shape).astype(w.dtype) + (w == 1) * 0.5
                           for w in reference.get_weights()])
    reference.save_weights(tmp_path / 'keras.weights.h5')
    model.load_weights(tmp_path / 'keras.weights.h5')
    x = RNG.normal(0, 1, (8, 6, 4)).astype('float32')
    np.testing.assert_allclose(model(x, training=False), reference(x, training=False),
                               atol=2e-5)
    np.testing.assert_allclose(model(x, training=True), reference(x, training=True), atol=2e-5)
    for a, b in zip(model.weights, reference.weights, strict=True):  # moving statistics too
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize('theirs, ours, kwargs', PAIRS, ids=lambda v: getattr(v, '__name__', ''))
def test_config_and_keras_file_round_trip(theirs, ours, kwargs, tmp_path):
    layer = ours(**kwargs, name='norm')
    config = layer.get_config()
    additions = {'BatchNormalization': {'synchronized': False},
                 'LayerNormalization': {'scale_offset': 0.0, 'memory_efficient': False},
                 'RMSNormalization': {'scale_offset': 0.0, 'memory_efficient': False}}
    assert config == {**theirs(**kwargs, name='norm').get_config(),
                      **additions.get(theirs.__name__, {})}
    assert type(ours.from_config(config)) is ours
    model = model_with(ours, kwargs)
    x = RNG.normal(0, 1, (8, 6, 4)).astype('float32')
    model(x, training=True)
    model.save(tmp_path / 'model.keras')
    loaded = keras.saving.load_model(tmp_path / 'model.keras')
    assert any(type(layer) is ours for layer in loaded.layers)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)


def test_batch_norm_exact_at_large_offsets_where_keras_is_not():
    x = RNG.normal(1e6, 1, (64, 5)).astype('float32')
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    ours = np.asarray(nk.BatchNormalization()(x, training=True))
    theirs = np.asarray(keras.layers.BatchNormalization()(x, training=True))
    assert np.abs(ours - expected).max() < 1e-5
    assert np.abs(theirs - expected).max() > 1e-2


def test_frozen_batch_norm_runs_in_inference_mode_like_keras():
    for cls in (keras.layers.BatchNormalization, nk.BatchNormalization):
        layer = cls(trainable=False)
        x = RNG.normal(3, 2, (16, 4)).astype('float32')
        y = layer(x, training=True)
        np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
        np.testing.assert_array_equal(layer.moving_mean.numpy(), 0)


def test_mask_leaves_padding_out_of_the_statistics():
    x = RNG.normal(2, 3, (4, 10, 3)).astype('float32')
    mask = RNG.random((4, 10)) < 0.6
    x[~mask] = np.nan  # padding may hold anything
    layer = nk.BatchNormalization(momentum=0.0)
    y = np.asarray(layer(x, training=True, mask=mask))
    valid = x[mask].astype(np.float64)
    np.testing.assert_allclose(y[mask], (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-3),
                               atol=2e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), valid.var(0), rtol=1e-5)


def test_fit_trains_and_synchronized_data_parallel_equals_one_device():
    x = RNG.normal(0, 1, (64, 6, 4)).astype('float32')
    labels = RNG.integers(0, 3, 64)
    model = model_with(nk.BatchNormalization, {'synchronized': True})
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(x, labels, batch_size=32, epochs=5, verbose=0).history['loss']
    assert losses[-1] < losses[0]
    before = [w.numpy() for w in model.weights]
    single = np.asarray(model(x, training=True))
    devices = jax.devices()
    assert len(devices) == 8
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    try:
        sharded_model = model_with(nk.BatchNormalization, {'synchronized': True})
        sharded_model.set_weights(before)
        x_sharded = keras.distribution.distribute_tensor(x, distribution.get_data_layout(x.shape))
        assert len(x_sharded.sharding.device_set) == 8  # each device holds 8 examples
        out = sharded_model(x_sharded, training=True)
        assert len(out.sharding.device_set) == 8
        sharded = np.asarray(out)
        # fit runs data-parallel too
        sharded_model.compile(optimizer=keras.optimizers.SGD(0.0),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        sharded_model.fit(x, labels, batch_size=64, epochs=1, verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    np.testing.assert_allclose(sharded, single, atol=2e-5)
    # One more training step on the same batch (learning rate 0) moved the
    # statistics by the same rule on both.
    model(x, training=True)
    for a, b in zip(sharded_model.weights, model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)


def test_unsupported_arguments_are_clear():
    with pytest.raises(ValueError, match='renorm=True'):
        nk.BatchNormalization(renorm=True)
    with pytest.raises(ValueError, match='rms_scaling=True'):
        nk.LayerNormalization(rms_scaling=True)


def test_layers_under_strict_promotion():
    x = np.random.default_rng(32).standard_normal((4, 8, 6)).astype('float32') + 3
    with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
        for layer in (nk.BatchNormalization(), nk.LayerNormalization(),
                      nk.GroupNormalization(groups=2)):
            layer(x, training=True)
            layer(x, training=False)


POLICIES = ['float32', 'bfloat16', 'float16', 'mixed_bfloat16', 'mixed_float16']
# Results rounded from float32 to a narrow dtype may differ by one of its ulps:
# ATOL is one ulp at 4 to 8 (the outputs here stay below 8), RTOL two ulps relative.
ATOL = {'float32': 2e-5, 'float16': 2 ** -8, 'bfloat16': 2 ** -5}
RTOL = {'float32': 2e-5, 'float16': 2 ** -9, 'bfloat16': 2 ** -6}


def batch_norm_reference(x, mean, var):
    return (x - mean) / np.sqrt(var + 1e-3)


def as_float64(a):
    return np.asarray(a).astype(np.float64)


@pytest.mark.parametrize('policy', POLICIES)
def test_batch_norm_under_dtype_policies_like_keras(policy):
    rng = np.random.default_rng(33)
    x = rng.normal(3, 2, (8, 6, 4)).astype('float32')  # as above: float32 compiles once
    ours = nk.BatchNormalization(dtype=policy, name='bn')
    theirs = keras.layers.BatchNormalization(dtype=policy, name='bn')
    atol = ATOL[theirs.compute_dtype]
    # Keras casts the input to the compute dtype before the layer sees it.
    x64 = as_float64(keras.ops.cast(x, theirs.compute_dtype))
    mean, var = x64.mean((0, 1)), x64.var((0, 1))
    moving_mean, moving_var = 0.01 * mean, 0.99 + 0.01 * var
    for training, expected in ((True, batch_norm_reference(x64, mean, var)),
                               (False, batch_norm_reference(x64, moving_mean, moving_var))):
        y, y_keras = ours(x, training=training), theirs(x, training=training)
        assert y.dtype == y_keras.dtype == theirs.compute_dtype, (training, y.dtype)
        np.testing.assert_allclose(as_float64(y), as_float64(y_keras), atol=atol, err_msg=training)
        np.testing.assert_allclose(as_float64(y), expected, atol=atol, err_msg=training)
    assert [(w.path, w.dtype) for w in ours.weights] == \
        [(w.path, w.dtype) for w in theirs.weights]
    assert ours.moving_mean.dtype == theirs.variable_dtype
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(as_float64(a.numpy()), as_float64(b.numpy()),
                                   rtol=RTOL[theirs.variable_dtype], err_msg=a.path)
    for variable, expected in ((ours.moving_mean, moving_mean), (ours.moving_variance, moving_var)):
        np.testing.assert_allclose(as_float64(variable.numpy()), expected,
                                   rtol=RTOL[theirs.variable_dtype], err_msg=variable.path)


@pytest.mark.parametrize('policy', POLICIES)
def test_layer_norm_under_dtype_policies_like_keras(policy):
    x = np.random.default_rng(34).normal(3, 2, (8, 6, 4)).astype('float32')
    ours = nk.LayerNormalization(dtype=policy, name='ln')
    theirs = keras.layers.LayerNormalization(dtype=policy, name='ln')
    y, y_keras = ours(x), theirs(x)
    assert y.dtype == y_keras.dtype == theirs.compute_dtype
    assert [(w.path, w.dtype) for w in ours.weights] == \
        [(w.path, w.dtype) for w in theirs.weights]
    x64 = as_float64(keras.ops.cast(x, theirs.compute_dtype))
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-3)
    atol = ATOL[theirs.compute_dtype]
    np.testing.assert_allclose(as_float64(y), as_float64(y_keras), atol=atol)
    np.testing.assert_allclose(as_float64(y), expected, atol=atol)


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'])
@pytest.mark.parametrize('theirs, ours, kwargs', PAIRS, ids=lambda v: getattr(v, '__name__', ''))
def test_integer_inputs_are_computed_in_float32(theirs, ours, kwargs, policy):
    x = np.random.default_rng(35).integers(-20, 20, (8, 6, 4)).astype('int32')
    layer, reference = ours(dtype=policy, **kwargs), theirs(dtype=policy, **kwargs)
    y = layer(x, training=True)
    # Keras's BatchNormalization computes integers in float32. Its Layer, Group and
    # RMSNormalization truncate the float32 result to the input's integer dtype (RMS
    # also returns that dtype) and its UnitNormalization raises, so they are compared
    # on the float32 input.
    expected = reference(x if theirs is keras.layers.BatchNormalization else x.astype('float32'),
                         training=True)
    assert y.dtype == expected.dtype == layer.compute_dtype
    np.testing.assert_allclose(as_float64(y), as_float64(expected),
                               atol=ATOL[layer.compute_dtype])
    if theirs is keras.layers.BatchNormalization:
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(as_float64(y),
                                   batch_norm_reference(x64, x64.mean((0, 1)), x64.var((0, 1))),
                                   atol=ATOL[layer.compute_dtype])


def test_fully_masked_batch_keeps_the_moving_statistics_where_keras_moves_them():
    x = np.random.default_rng(36).normal(3, 2, (4, 10, 3)).astype('float32')
    mask = np.zeros((4, 10), bool)
    init = {'momentum': 0.0, 'moving_mean_initializer': 'ones',
            'moving_variance_initializer': keras.initializers.Constant(2.0)}
    layer, reference = nk.BatchNormalization(**init), keras.layers.BatchNormalization(**init)
    y = layer(x, training=True, mask=mask)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 1)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), 2)
    np.testing.assert_allclose(y, (x - 1) / np.sqrt(2 + 1e-3), rtol=1e-5)  # normalized with them
    reference(x, training=True, mask=mask)  # Keras takes the batch moments to be 0
    np.testing.assert_array_equal(reference.moving_mean.numpy(), 0)
    np.testing.assert_array_equal(reference.moving_variance.numpy(), 0)
