"""layer_norm, rms_norm, group_norm and instance_norm against float64 NumPy, flax and torch."""

import functools

import chex
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normlib as nl
from _reference import np_standardize


def _axes(axis, ndim):
    axis = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axis))


def np_layer_norm(x, axis, scale=None, bias=None, *, epsilon=1e-6, center=True, mask=None):
    axes = _axes(axis, np.ndim(x))
    y = np_standardize(x, axes, epsilon=epsilon, center=center, mask=mask)
    broadcast = tuple(d if i in axes else 1 for i, d in enumerate(np.shape(x)))
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(broadcast)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(broadcast)
    return y


def np_group_norm(x, num_groups, scale=None, bias=None, *, epsilon=1e-5):
    """Channels-last group norm written out with an explicit group axis."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    grouped = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    y = np_standardize(grouped, axes, epsilon=epsilon).reshape(x.shape)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def to_torch(x):
    """Channels-last float32 NumPy -> channels-first float64 torch."""
    import torch
    x = np.moveaxis(np.asarray(x, np.float64), -1, 1)
    return torch.from_numpy(np.ascontiguousarray(x))


def from_torch(t):
    return np.moveaxis(t.numpy(), 1, -1)


LAYER_CASES = {
    'last': ((4, 6), -1),
    'last_two': ((2, 3, 5), (1, 2)),
    'middle': ((3, 4, 5), 1),
    'first_and_last': ((3, 2, 4), (0, -1)),
}


def _layer_inputs(case, seed=0):
    shape, axis = LAYER_CASES[case]
    rng = np.random.default_rng(seed)
    features = tuple(shape[a] for a in _axes(axis, len(shape)))
    x = (rng.normal(size=shape) * 3 - 2).astype(np.float32)
    return (x, rng.uniform(0.5, 1.5, features).astype(np.float32),
            rng.normal(size=features).astype(np.float32))


def _layer_outputs(case, x, scale, bias):
    axis = LAYER_CASES[case][1]
    return (nl.layer_norm(x, scale, bias, axis=axis), nl.layer_norm(x, axis=axis, epsilon=0.5),
            nl.rms_norm(x, scale, axis=axis), nl.rms_norm(x, axis=axis, epsilon=0.5))


def check_layer_outputs(case, x, scale, bias, outputs):
    axis = LAYER_CASES[case][1]
    expected = (np_layer_norm(x, axis, scale, bias), np_layer_norm(x, axis, epsilon=0.5),
                np_layer_norm(x, axis, scale, center=False),
                np_layer_norm(x, axis, center=False, epsilon=0.5))
    for name, y, y_ref in zip(['layer', 'layer eps', 'rms', 'rms eps'], outputs, expected):
        assert y.dtype == jnp.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.fixture(scope='module')
def layer_results():
    """Every case under one jax.jit (one compilation)."""
    inputs = {case: _layer_inputs(case) for case in LAYER_CASES}
    run = jax.jit(lambda inputs: {case: _layer_outputs(case, *args)
                                  for case, args in inputs.items()})
    return inputs, run(inputs)


@pytest.mark.parametrize('case', LAYER_CASES)
def test_layer_and_rms_norm_match_numpy(case, layer_results):
    inputs, results = layer_results
    check_layer_outputs(case, *inputs[case], results[case])


def test_without_jit():
    """Layer, RMS (masked) and group norm eagerly, on one shape (shared op caches)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 3, 4)) * 3 - 2).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    mask = rng.uniform(size=(2, 3, 1)) < 0.6
    mask[:, 0] = True
    np.testing.assert_allclose(nl.layer_norm(x, scale, bias), np_layer_norm(x, -1, scale, bias),
                               atol=2e-5, rtol=1e-5)
    plane = scale[:3, None] * np.ones((3, 4))
    np.testing.assert_allclose(nl.rms_norm(x, plane, axis=(1, 2), mask=mask),
                               np_layer_norm(x, (1, 2), plane, center=False, mask=mask),
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(nl.group_norm(x, scale, bias, num_groups=2),
                               np_group_norm(x, 2, scale, bias), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('case', ['last_two', 'first_and_last'])
def test_layer_and_rms_norm_match_flax_linen(case):
    shape, axis = LAYER_CASES[case]
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 5, jnp.float32)
    modules = [fnn.LayerNorm(epsilon=1e-6, reduction_axes=axis, feature_axes=axis,
                             use_fast_variance=False),
               fnn.RMSNorm(epsilon=1e-6, reduction_axes=axis, feature_axes=axis)]
    params = [jax.eval_shape(m.init, jax.random.key(0), x)['params'] for m in modules]
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    @jax.jit
    def run(x, params):
        ln, rms = params
        return ((modules[0].apply({'params': ln}, x), modules[1].apply({'params': rms}, x)),
                (nl.layer_norm(x, ln['scale'], ln['bias'], axis=axis),
                 nl.rms_norm(x, rms['scale'], axis=axis)))

    expected, got = run(x, params)
    chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=1e-5)


def masked_layer_and_rms(x, scale, mask, axis=-1):
    return (nl.layer_norm(x, scale, mask=mask, axis=axis),
            nl.rms_norm(x, scale, mask=mask, axis=axis))


masked_layer_and_rms_jit = jax.jit(masked_layer_and_rms, static_argnames='axis')


def test_mask_matches_numpy_on_valid_entries():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3, 7, 4)) * 2 + 1).astype(np.float32)
    mask = rng.uniform(size=(3, 7, 1)) < 0.6
    mask[:, 0] = True
    scale = rng.uniform(0.5, 1.5, (7, 4)).astype(np.float32)
    layer, rms = masked_layer_and_rms_jit(x, scale, mask, axis=(1, 2))
    np.testing.assert_allclose(layer, np_layer_norm(x, (1, 2), scale, mask=mask),
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(rms, np_layer_norm(x, (1, 2), scale, center=False, mask=mask),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('padding', [np.nan, 1e9])
def test_masked_entries_do_not_affect_valid_outputs(padding):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    mask = np.ones((3, 6), bool)
    mask[:, :2] = False  # left padding
    padded = np.where(mask, x, padding).astype(np.float32)
    layer, rms = masked_layer_and_rms_jit(padded, np.ones(6, np.float32), mask)
    np.testing.assert_allclose(np.asarray(layer)[mask], np_layer_norm(x, -1, mask=mask)[mask],
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rms)[mask],
                               np_layer_norm(x, -1, center=False, mask=mask)[mask],
                               atol=2e-5, rtol=1e-5)


def test_all_masked_row_is_finite_with_finite_gradients():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    mask = np.array([[True] * 5, [False] * 5])
    scale = jnp.full((5,), 1.5)

    def loss(x, scale):
        y = masked_layer_and_rms(x, scale, mask)
        return sum(jnp.sum(jnp.sin(v)) for v in y), y

    (gx, gs), (layer, rms) = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(x, scale)
    for leaf in (gx, gs, layer, rms):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_allclose(layer[0], np_layer_norm(x[:1], -1, scale)[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(rms[0], np_layer_norm(x[:1], -1, scale, center=False)[0],
                               atol=2e-5, rtol=1e-5)


GROUP_CASES = [((2, 4, 4, 6), 1), ((2, 4, 4, 6), 3), ((2, 4, 4, 6), 6), ((3, 8), 4),
               ((2, 2, 3, 2, 4), 2)]
INSTANCE_SHAPES = [(2, 3, 3, 4), (2, 5, 3)]


def random_affine_channels(rng, channels):
    return (rng.uniform(0.5, 1.5, channels).astype(np.float32),
            rng.normal(size=channels).astype(np.float32))


@pytest.fixture(scope='module')
def group_results():
    """Every group and instance norm case under one jax.jit (one compilation)."""
    rng = np.random.default_rng(6)

    def inputs(shape):
        return ((rng.normal(size=shape) * 2 + 3).astype(np.float32),
                *random_affine_channels(rng, shape[-1]))

    groups = [inputs(shape) for shape, _ in GROUP_CASES]
    instances = [inputs(shape) for shape in INSTANCE_SHAPES]

    @jax.jit
    def run(groups, instances):
        # epsilon=1e-5: torch's default, which the torch oracle uses.
        return ([nl.group_norm(*args, num_groups=g, epsilon=1e-5)
                 for args, (_, g) in zip(groups, GROUP_CASES)],
                [nl.instance_norm(*args, epsilon=1e-5) for args in instances])

    got_groups, got_instances = run(groups, instances)
    return list(zip(groups, got_groups)), list(zip(instances, got_instances))


def _torch(array):
    import torch
    return torch.from_numpy(np.asarray(array, np.float64))


@pytest.mark.parametrize('index', range(len(GROUP_CASES)),
                         ids=[f'{s}-g{g}' for s, g in GROUP_CASES])
def test_group_norm_matches_numpy_and_torch(index, group_results, torch):
    (x, scale, bias), y = group_results[0][index]
    groups = GROUP_CASES[index][1]
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np_group_norm(x, groups, scale, bias), atol=2e-5, rtol=1e-5)
    expected = torch.nn.functional.group_norm(to_torch(x), groups, _torch(scale), _torch(bias),
                                              eps=1e-5)
    np.testing.assert_allclose(y, from_torch(expected), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('index', range(len(INSTANCE_SHAPES)),
                         ids=[str(s) for s in INSTANCE_SHAPES])
def test_instance_norm_matches_numpy_and_torch(index, group_results, torch):
    (x, scale, bias), y = group_results[1][index]
    spatial = tuple(range(1, x.ndim - 1))
    np.testing.assert_allclose(y, np_standardize(x, spatial, epsilon=1e-5) * scale + bias,
                               atol=2e-5, rtol=1e-5)
    expected = torch.nn.functional.instance_norm(to_torch(x), weight=_torch(scale),
                                                 bias=_torch(bias), eps=1e-5)
    np.testing.assert_allclose(y, from_torch(expected), atol=2e-5, rtol=1e-5)


# Second-order derivatives of masked layer and RMS norm and of group norm are
# checked in forward and reverse mode in test_moments.py.


@pytest.mark.parametrize('dtype, tol', [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_low_precision_input(dtype, tol):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)) * 4 + 30, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    s64 = np.asarray(scale.astype(jnp.float32), np.float64)
    expected = {
        'layer_norm': np_layer_norm(x64, -1, s64),
        'rms_norm': np_layer_norm(x64, -1, s64, center=False),
        'group_norm': np_group_norm(x64, 2, s64),
        'instance_norm': np_standardize(x64, (1,), epsilon=1e-5) * s64,
    }
    calls = {'layer_norm': nl.layer_norm, 'rms_norm': nl.rms_norm,
             'group_norm': functools.partial(nl.group_norm, num_groups=2),
             'instance_norm': nl.instance_norm}
    if dtype == jnp.float16:  # one path suffices: the dtype policy is shared
        calls = {'layer_norm': nl.layer_norm}
    got = jax.jit(lambda x, scale: {k: f(x, scale) for k, f in calls.items()})(x, scale)
    for name, y in got.items():
        assert y.dtype == dtype and y.shape == x.shape, name
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected[name], atol=tol,
                                   rtol=tol, err_msg=name)


@jax.jit
def _offset_normalizers(x):
    return (nl.layer_norm(x, epsilon=1e-12),
            nl.group_norm(x[..., None], num_groups=1, epsilon=1e-12))


@pytest.mark.parametrize('ratio, tol', [(1e4, 1e-3), (1e6, 1e-2)])
def test_offset_data_matches_float64_reference(ratio, tol):
    rng = np.random.default_rng(12)
    std = np.array([[1.0], [0.3], [7.0], [2.5]])
    sign = np.array([[1], [-1], [1], [-1]])
    x = (sign * ratio * std + std * rng.normal(size=(4, 256))).astype(np.float32)
    y, gn = (np.asarray(v, np.float64) for v in _offset_normalizers(x))
    assert np.max(np.abs(y.std(axis=-1) - 1)) < tol
    assert np.max(np.abs(y - np_layer_norm(x, -1, epsilon=1e-12))) < min(tol, 1e-5)
    assert np.max(np.abs(gn[..., 0] - np_layer_norm(x, -1, epsilon=1e-12))) < min(tol, 1e-5)


def _degenerate(kind, base):
    """Inputs whose normalized groups hold one element, or one repeated value."""
    n, c = base.shape
    return {
        'layer_norm_single': base[:, :1],
        'layer_norm_constant': np.repeat(base[:, :1], c, axis=1),
        'group_norm_constant': np.broadcast_to(np.repeat(base[:, None, None, ::2], 2, axis=-1),
                                               (n, 2, 3, c)),
        'instance_norm_single': base[:, None, :],
    }[kind]


DEGENERATE_CALLS = {
    'layer_norm_single': nl.layer_norm,
    'layer_norm_constant': nl.layer_norm,
    'group_norm_constant': functools.partial(nl.group_norm, num_groups=2),
    'instance_norm_single': nl.instance_norm,
}


@pytest.fixture(scope='module')
def degenerate_results():
    """y and gradients for every degenerate input, under one jax.jit."""
    rng = np.random.default_rng(13)
    base = rng.normal(size=(2, 4))
    inputs = {}
    for kind in DEGENERATE_CALLS:
        # Examples are normalized independently: both magnitudes go in one batch.
        x = np.concatenate([_degenerate(kind, m * base) for m in (1.0, 1e18)]).astype(np.float32)
        c = x.shape[-1]
        inputs[kind] = (x, rng.uniform(0.5, 1.5, c).astype(np.float32),
                        rng.normal(size=c).astype(np.float32),
                        rng.normal(size=x.shape).astype(np.float32))

    def grads(kind, x, scale, bias, w):
        def loss(x, scale, bias):
            y = DEGENERATE_CALLS[kind](x, scale, bias)
            return jnp.sum(w * y), y
        return jax.grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)

    run = jax.jit(lambda inputs: {kind: grads(kind, *args) for kind, args in inputs.items()})
    return inputs, run(inputs)


@pytest.mark.parametrize('kind', DEGENERATE_CALLS)
def test_single_element_and_constant_give_bias_and_finite_gradients(kind, degenerate_results):
    """Also for values near 1e18 (the second half of the batch)."""
    inputs, results = degenerate_results
    x, _, bias, w = inputs[kind]
    grads, y = results[kind]
    np.testing.assert_allclose(y, np.broadcast_to(bias, x.shape), atol=1e-6)
    for leaf in grads:
        assert np.all(np.isfinite(leaf))
    np.testing.assert_allclose(grads[2], np.sum(np.reshape(w, (-1, x.shape[-1])), axis=0),
                               rtol=1e-5)


def test_rms_norm_of_zero_is_zero_with_finite_gradients():
    x = jnp.zeros((2, 4))
    y, grads = jax.jit(lambda x: (nl.rms_norm(x),
                                  jax.grad(lambda x: jnp.sum(jnp.cos(nl.rms_norm(x) + 1.0)))(x)))(x)
    np.testing.assert_array_equal(y, np.zeros((2, 4)))
    assert np.all(np.isfinite(grads))


def jnp_reference_ln(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias


def test_composes_with_grad_vmap_and_checkpoint():
    """Second-order grads, vmap and remat against plain jnp autodiff."""
    rng = np.random.default_rng(14)
    with jax.enable_x64(True):
        x, w, v = rng.normal(size=(3, 2, 3, 5))
        scale, bias = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)

        def hvps(normalize):
            def loss(x):
                return jnp.sum(jnp.tanh(w[0] * normalize(x)))

            def hvp(x, v):
                return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)

            return (jax.jit(jax.vmap(hvp))(x, v),
                    jax.jit(jax.vmap(jax.grad(jax.checkpoint(loss))))(x))

        got = hvps(lambda x: nl.layer_norm(x, scale, bias))
        expected = hvps(lambda x: jnp_reference_ln(x, scale, bias))
        assert np.max(np.abs(expected[0])) > 1e-2
        chex.assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-9)


def test_epsilon_defaults_are_those_of_flax_modules_of_the_same_name():
    # The documented rule: a model keeps its numbers when its import changes.
    import inspect

    import flax.linen as fnn
    pairs = [(nl.batch_norm, fnn.BatchNorm), (nl.layer_norm, fnn.LayerNorm),
             (nl.rms_norm, fnn.RMSNorm), (nl.group_norm, fnn.GroupNorm),
             (nl.instance_norm, fnn.InstanceNorm)]
    for fn, module in pairs:
        ours = inspect.signature(fn).parameters['epsilon'].default
        theirs = inspect.signature(module).parameters['epsilon'].default
        assert ours == theirs, (fn.__name__, ours, theirs)
