"""fold_batch_norms of normlib.nnx, normlib.keras and normlib.equinox: the folded
model against the unfolded one in evaluation mode.

Each case also checks a control, the model with its BatchNorms removed but the
weights not folded, which must differ: the running statistics and affine
parameters are far from the identity, so a fold that did nothing would fail.
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import normlib.nnx as nx  # noqa: E402

TOL = 1e-5  # max |folded - unfolded| / max |unfolded|, float32


def relative_difference(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def check(name, folded, unfolded, control):
    """``folded`` matches ``unfolded`` to TOL; ``control`` (no fold) does not."""
    measured = relative_difference(folded, unfolded)
    print(f'\nfold max relative difference [{name}]: {measured:.2e}')
    assert measured < TOL, (name, measured)
    assert relative_difference(control, unfolded) > 0.05, name


def statistics(rng, n):
    """Non-trivial running (mean, var) and affine (scale, bias) of n features."""
    return (rng.normal(0, 2, n), np.exp(rng.normal(0, 1, n)), rng.normal(1, 0.5, n),
            rng.normal(0, 1, n))


# ---------------------------------------------------------------- NNX

def _set_nnx(norm, rng):
    mean, var, scale, bias = statistics(rng, norm.mean.shape[0])
    norm.mean[...], norm.var[...] = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
    if norm.scale is not None:
        norm.scale[...] = jnp.asarray(scale, jnp.float32)
    if norm.bias is not None:
        norm.bias[...] = jnp.asarray(bias, jnp.float32)


def _without_norms(model):
    """The control: a Sequential's BatchNorms dropped, nothing folded."""
    model = nnx.clone(model)
    model.layers = nnx.List([layer for layer in model.layers
                             if not isinstance(layer, (nx.BatchNorm, nnx.BatchNorm))])
    return model


@pytest.mark.parametrize('case', ['linear', 'conv'])
def test_nnx_sequential_folds_and_leaves_the_input_model_unchanged(case):
    rngs, rng = nnx.Rngs(0), np.random.default_rng(1)
    if case == 'linear':
        model = nnx.Sequential(nnx.Linear(6, 5, use_bias=False, rngs=rngs),
                               nx.BatchNorm(5, rngs=rngs), nnx.relu,
                               nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
        x = rng.normal(size=(16, 6)).astype(np.float32)
    else:
        model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs),
                               nnx.BatchNorm(4, rngs=rngs), nnx.relu,
                               nnx.Conv(4, 5, (3, 3), rngs=rngs),
                               nx.BatchNorm(5, momentum=None, rngs=rngs))
        x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    for i in (1, 4):
        _set_nnx(model.layers[i], rng)
    model.layers[3].bias[...] = jnp.asarray(rng.normal(size=model.layers[3].bias.shape),
                                            jnp.float32)
    model.eval()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    unfolded = model(x)

    folded = nx.fold_batch_norms(model)

    check(f'nnx {case}', folded(x), unfolded, _without_norms(model)(x))
    assert not any(isinstance(node, (nx.BatchNorm, nnx.BatchNorm))
                   for _, node in nnx.iter_graph(folded))
    assert folded.layers[0].use_bias and folded.layers[0].bias is not None
    # The input model is untouched: same modules, same values.
    assert model.layers[0].bias is None and not model.layers[0].use_bias
    assert isinstance(model.layers[1], (nx.BatchNorm, nnx.BatchNorm))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, after, before)


class _Block(nnx.Module):
    def __init__(self, rngs, axis=-1):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nx.BatchNorm(4, axis=axis, rngs=rngs)
        self.head = nnx.Sequential(nnx.Linear(4, 2, rngs=rngs), nnx.BatchNorm(2, rngs=rngs))

    def __call__(self, x):
        return self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_nnx_pairs_fold_a_custom_module_and_its_sequential():
    rng = np.random.default_rng(2)
    model = _Block(nnx.Rngs(0))
    _set_nnx(model.bn, rng)
    _set_nnx(model.head.layers[1], rng)
    model.eval()
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)

    folded = nx.fold_batch_norms(model, {'conv': 'bn'})

    control = nnx.clone(model)
    control.bn = nx._FoldedBatchNorm()
    control.head = _without_norms(control.head)
    check('nnx pairs (custom module)', folded(x), model(x), control(x))
    assert isinstance(folded.bn, nx._FoldedBatchNorm)
    assert isinstance(folded.head.layers[1], nx._FoldedBatchNorm)


def test_nnx_skips_a_batch_norm_after_an_activation_or_first_with_a_warning():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nx.BatchNorm(6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs), nnx.relu,
                           nx.BatchNorm(5, rngs=rngs))
    _set_nnx(model.layers[3], np.random.default_rng(3))
    model.eval()
    x = np.random.default_rng(4).normal(size=(4, 6)).astype(np.float32)
    with pytest.warns(UserWarning) as record:
        folded = nx.fold_batch_norms(model)
    messages = sorted(str(w.message) for w in record if w.category is UserWarning)
    assert len(messages) == 2, messages
    assert "'layers/0' is not folded: it is the first entry of an nnx.Sequential" in messages[0]
    assert ("'layers/3' is not folded: it follows the function relu, not an nnx.Linear or"
            " nnx.Conv") in messages[1]
    np.testing.assert_array_equal(folded(x), model(x))
    with pytest.warns(UserWarning, match="'bn' is not folded: it is neither in an"):
        nx.fold_batch_norms(_Block(rngs))  # outside a Sequential, not in pairs


def test_nnx_explicit_pairs_that_do_not_fold_raise():
    model = _Block(nnx.Rngs(0), axis=1)
    with pytest.raises(ValueError, match=r"pairs\['conv'\] = 'bn'.*axis=1: only a BatchNorm"):
        nx.fold_batch_norms(model, {'conv': 'bn'})
    with pytest.raises(ValueError, match=r"pairs\['bn'\] = 'conv'.*Conv is not a BatchNorm"):
        nx.fold_batch_norms(model, {'bn': 'conv'})
    with pytest.raises(ValueError, match=r"follows a BatchNorm, not an nnx.Linear"):
        nx.fold_batch_norms(model, {'bn': 'head/layers/1'})


# ---------------------------------------------------------------- Keras

@pytest.fixture(scope='module')
def keras():
    keras = pytest.importorskip('keras', reason='keras (an optional extra) is not installed')
    if keras.backend.backend() != 'jax':
        pytest.skip('normlib.keras needs KERAS_BACKEND=jax')
    return keras


def _set_keras(model, rng):
    for layer in model.layers:
        if 'BatchNormalization' in type(layer).__name__:
            mean, var, scale, bias = statistics(rng, layer.moving_mean.shape[0])
            layer.set_weights([w.astype(np.float32) for w in (scale, bias, mean, var)])
        elif getattr(layer, 'use_bias', False):
            layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))


def _keras_control(keras, model, folded):
    """``folded``'s graph with ``model``'s weights, not folded (zero where it had no bias)."""
    control = keras.models.clone_model(folded)
    for layer in control.layers:
        if hasattr(layer, 'kernel'):
            original = model.get_layer(layer.name)
            layer.kernel.assign(original.kernel)
            layer.bias.assign(original.bias if original.use_bias else np.zeros(layer.bias.shape))
    return control


def _norm_names(model):
    return [layer.name for layer in model.layers if 'BatchNormalization' in type(layer).__name__]


@pytest.mark.parametrize('case', ['dense (Sequential)', 'conv (functional)'])
def test_keras_folds_and_leaves_the_input_model_unchanged(keras, case):
    import normlib.keras as nk
    keras.utils.set_random_seed(0)
    layers = keras.layers
    rng = np.random.default_rng(5)
    if case.startswith('dense'):
        model = keras.Sequential([keras.Input((6,)), layers.Dense(5, use_bias=False),
                                  nk.BatchNormalization(), layers.ReLU(), layers.Dense(4),
                                  layers.BatchNormalization()])
        x = rng.normal(size=(16, 6)).astype(np.float32)
    else:
        inputs = keras.Input((8, 8, 3))
        h = layers.Conv2D(4, 3, use_bias=False)(inputs)
        h = layers.ReLU()(layers.BatchNormalization()(h))
        h = nk.BatchNormalization()(layers.Conv2D(5, 3, padding='same')(h))
        h = layers.Conv1D(3, 2)(layers.Reshape((36, 5))(h))
        h = layers.BatchNormalization(epsilon=0.1)(h)
        model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(h)))
        x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    _set_keras(model, rng)
    before, names = [w.copy() for w in model.get_weights()], _norm_names(model)
    unfolded = model(x, training=False)

    folded = nk.fold_batch_norms(model)

    check(f'keras {case}', folded(x), unfolded, _keras_control(keras, model, folded)(x))
    assert type(folded) is type(model) and _norm_names(folded) == []
    assert len(folded.layers) == len(model.layers) - len(names)
    assert all(getattr(layer, 'use_bias', True) for layer in folded.layers)
    first = next(layer for layer in model.layers if hasattr(layer, 'kernel'))
    assert _norm_names(model) == names and not first.use_bias
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_keras_skips_batch_norms_not_right_after_a_dense_or_conv_with_a_warning(keras):
    import normlib.keras as nk
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((6,))
    a = layers.Activation('relu')(layers.Dense(6, name='d0')(inputs))
    a = layers.BatchNormalization(name='after_activation')(a)
    b = layers.BatchNormalization(name='after_relu_dense')(
        layers.Dense(6, activation='relu', name='d1')(a))
    shared = layers.Dense(6, name='d2')(b)
    c = layers.Add()([nk.BatchNormalization(name='branching')(shared), shared])
    model = keras.Model(inputs, c)
    _set_keras(model, np.random.default_rng(6))
    x = np.random.default_rng(7).normal(size=(4, 6)).astype(np.float32)
    with pytest.warns(UserWarning) as record:
        folded = nk.fold_batch_norms(model)
    messages = sorted(str(w.message) for w in record if w.category is UserWarning)
    assert len(messages) == 3, messages
    assert "'after_activation' is not folded: its input comes from a Activation" in messages[0]
    assert "'after_relu_dense' is not folded: 'd1' applies activation='relu'" in messages[1]
    assert "'branching' is not folded: the output of 'd2' also goes elsewhere" in messages[2]
    assert _norm_names(folded) == _norm_names(model)
    np.testing.assert_allclose(folded(x), model(x, training=False), rtol=1e-6, atol=1e-6)
    seq = keras.Sequential([keras.Input((6,)), layers.BatchNormalization(name='first')])
    with pytest.warns(UserWarning, match="'first' is not folded: it is the first layer"):
        nk.fold_batch_norms(seq)


# ---------------------------------------------------------------- Equinox

@pytest.fixture(scope='module')
def eqx():
    return pytest.importorskip('equinox', reason='equinox (an optional extra) is not installed')


def _equinox_model(eqx, case):
    import normlib.equinox as neqx
    keys = jax.random.split(jax.random.key(0), 4)
    relu = eqx.nn.Lambda(jax.nn.relu)
    if case == 'linear':
        layers = [eqx.nn.Linear(6, 5, use_bias=False, key=keys[0]),
                  eqx.nn.BatchNorm(5, 'batch', mode='batch'), relu,
                  eqx.nn.Linear(5, 4, key=keys[1]), neqx.BatchNorm(4, 'batch')]
    else:
        inner = eqx.nn.Sequential([eqx.nn.Conv2d(3, 4, 3, use_bias=False, key=keys[0]),
                                   neqx.BatchNorm(4, 'batch')])
        layers = [inner, relu, eqx.nn.Conv2d(4, 5, 3, padding=1, key=keys[1]),
                  eqx.nn.BatchNorm(5, 'batch', mode='ema')]
    return eqx.nn.make_with_state(eqx.nn.Sequential)(layers)


def _set_equinox(eqx, model, state, rng):
    """Non-trivial statistics and affine parameters for each BatchNorm of ``model``."""
    is_norm = lambda v: hasattr(v, 'batch_state_index')  # noqa: E731

    def move(norm):
        nonlocal state
        if not is_norm(norm):
            return norm
        mean, var, scale, bias = (jnp.asarray(v, jnp.float32)
                                  for v in statistics(rng, norm.input_size))
        ema = getattr(norm, 'mode', 'batch') == 'ema'
        state = state.set(norm.ema_state_index if ema else norm.batch_state_index, (mean, var))
        if not ema:  # Equinox's 'batch' mode divides by 1 - 0.99**3 when it normalizes
            state = state.set(norm.batch_counter, state.get(norm.batch_counter) + 3)
        return eqx.tree_at(lambda m: (m.weight, m.bias), norm, (scale, bias))

    model = jax.tree.map(move, model, is_leaf=is_norm)
    return model, state


def _run(model, state, x):
    return jax.vmap(model, axis_name='batch', in_axes=(0, None), out_axes=(0, None))(x, state)[0]


@pytest.mark.parametrize('case', ['linear', 'conv'])
def test_equinox_folds_and_leaves_the_input_model_unchanged(eqx, case):
    import normlib.equinox as neqx
    rng = np.random.default_rng(8)
    model, state = _equinox_model(eqx, case)
    model, state = _set_equinox(eqx, model, state, rng)
    layers = model.layers if case == 'linear' else model.layers[2:]
    model = eqx.tree_at(lambda m: m.layers[-2 if case == 'linear' else 2].bias, model,
                        jnp.asarray(rng.normal(size=layers[-2].bias.shape), jnp.float32))
    model = eqx.nn.inference_mode(model)
    x = rng.normal(size=(4, 6) if case == 'linear' else (2, 3, 8, 8)).astype(np.float32)
    before = [np.asarray(v) for v in jax.tree.leaves((model, state))]
    unfolded = _run(model, state, x)

    folded, folded_state = neqx.fold_batch_norms(model, state)

    is_norm = lambda v: isinstance(v, (neqx.BatchNorm, eqx.nn.BatchNorm))  # noqa: E731
    control = jax.tree.map(lambda v: eqx.nn.Identity() if is_norm(v) else v, model,
                           is_leaf=is_norm)
    check(f'equinox {case}', _run(folded, folded_state, x), unfolded, _run(control, state, x))
    assert not any(is_norm(v) for v in jax.tree.leaves(folded, is_leaf=is_norm))
    first = folded.layers[0] if case == 'linear' else folded.layers[0].layers[0]
    assert first.use_bias and first.bias.shape == ((5,) if case == 'linear' else (4, 1, 1))
    assert jax.tree.leaves(folded_state) == []  # no BatchNorm left, no state
    original = model.layers[0] if case == 'linear' else model.layers[0].layers[0]
    assert original.bias is None and not original.use_bias
    for v, b in zip(jax.tree.leaves((model, state)), before, strict=True):
        np.testing.assert_array_equal(v, b)


def test_equinox_skips_batch_norms_not_right_after_a_linear_or_conv_with_a_warning(eqx):
    import normlib.equinox as neqx
    keys = jax.random.split(jax.random.key(0), 2)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        neqx.BatchNorm(6, 'batch'), eqx.nn.Linear(6, 5, key=keys[0]),
        eqx.nn.Lambda(jax.nn.relu), neqx.BatchNorm(5, 'batch'),
        eqx.nn.Linear(5, 4, key=keys[1]), neqx.BatchNorm(4, 'batch')])
    model, state = _set_equinox(eqx, model, state, np.random.default_rng(9))
    model = eqx.nn.inference_mode(model)
    x = np.random.default_rng(10).normal(size=(4, 6)).astype(np.float32)
    with pytest.warns(UserWarning) as record:
        folded, folded_state = neqx.fold_batch_norms(model, state)
    messages = sorted(str(w.message) for w in record if w.category is UserWarning)
    assert len(messages) == 2, messages
    assert "model.layers[0] is not folded: it is the first entry of an eqx.nn.Sequential" \
        in messages[0]
    assert ("model.layers[3] is not folded: it follows a Lambda, not an eqx.nn.Linear or"
            " eqx.nn.Conv") in messages[1]
    assert isinstance(folded.layers[5], eqx.nn.Identity)
    assert len(jax.tree.leaves(folded_state)) == 2 * 3  # (mean, var) and count of the two kept
    np.testing.assert_allclose(_run(folded, folded_state, x), _run(model, state, x),
                               rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match=r"model\['norm'\] is not folded: it is not an entry of"):
        neqx.fold_batch_norms({'norm': model.layers[0]}, state)
