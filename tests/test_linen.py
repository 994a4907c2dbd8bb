"""normlib.linen against flax.linen (use_fast_variance=False) as the oracle."""

import dataclasses
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from _reference import assert_close, random_input
from normlib import linen as nl

MODULES = ('BatchNorm', 'LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm')
NOT_COPIED = ('use_fast_variance', 'force_float32_reductions')
ADDITIONS = {'BatchNorm': ['memory_efficient', 'unbiased_running_var'],
             'LayerNorm': ['scale_offset', 'memory_efficient'],
             'RMSNorm': ['scale_offset', 'memory_efficient']}


def _perturb(variables, seed=1):
    """Moves every variable away from its initial value, keeping variances positive."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = []
    for (path, v), k in zip(flat, keys):
        noise = jax.random.normal(k, v.shape, jnp.float32)
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            out.append((v * jnp.exp(0.3 * noise)).astype(v.dtype))
        else:
            out.append((v + 0.3 * noise).astype(v.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _fields(cls):
    return [(f.name, f.default) for f in dataclasses.fields(cls)
            if f.name not in ('parent', 'name')]


@pytest.mark.parametrize('name', MODULES)
def test_fields_are_flax_fields_in_flax_order(name):
    flax_fields = [f for f in _fields(getattr(nn, name)) if f[0] not in NOT_COPIED]
    ours = _fields(getattr(nl, name))
    assert [f[0] for f in ours] == [f[0] for f in flax_fields] + ADDITIONS.get(name, [])
    assert ours[:len(flax_fields)] == flax_fields
    flax_call = inspect.signature(getattr(nn, name).__call__).parameters
    assert list(inspect.signature(getattr(nl, name).__call__).parameters) == list(flax_call)


# (module, fields, call kwargs); BatchNorm cases run in training and evaluation.
CASES = [
    ('BatchNorm', {}, {}),
    ('BatchNorm', {'axis': (1, -1), 'momentum': 0.9, 'use_scale': False, 'epsilon': 1e-3},
     {'mask': np.arange(4)[:, None, None, None] < 3}),
    ('LayerNorm', {}, {'mask': np.arange(6) < 4}),
    ('LayerNorm', {'reduction_axes': (1, 2, 3), 'feature_axes': -1}, {}),
    ('LayerNorm', {'reduction_axes': (-2, -1), 'feature_axes': (-2, -1), 'use_bias': False}, {}),
    ('RMSNorm', {}, {}),
    ('RMSNorm', {'reduction_axes': (2, 3), 'feature_axes': 3}, {}),
    ('GroupNorm', {'num_groups': 3}, {}),
    ('GroupNorm', {'num_groups': None, 'group_size': 1, 'epsilon': 1e-3}, {}),
    ('InstanceNorm', {'use_scale': False}, {}),
]


def _modules(name, fields):
    return getattr(nn, name)(use_fast_variance=False, **fields), getattr(nl, name)(**fields)


def _init_call(name, call):
    return dict(call, use_running_average=False) if name == 'BatchNorm' else call


def _shapes(module, *args, **kwargs):
    """Traces ``module.init`` (errors included) without compiling it."""
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)


def _outputs(name, fields, call, x):
    """Flax's variables, perturbed, applied by Flax's module and by normlib's:
    ``(ours, flax)``, each ``{use_running_average: (y, batch_stats)}`` for
    BatchNorm and ``y`` otherwise. One compiled program per case."""
    flax_module, ours = _modules(name, fields)

    @jax.jit
    def run(x):
        variables = _perturb(flax_module.init(jax.random.key(0), x, **_init_call(name, call)))
        if name != 'BatchNorm':
            return ours.apply(variables, x, **call), flax_module.apply(variables, x, **call)
        return tuple({r: m.apply(variables, x, r, mutable=['batch_stats'], **call)
                      for r in (False, True)} for m in (ours, flax_module))

    return run(x)


@pytest.mark.parametrize('name,fields,call', CASES)
def test_flax_checkpoint_gives_flax_two_pass_results(name, fields, call):
    x = random_input()
    flax_module, ours = _modules(name, fields)
    chex.assert_trees_all_equal_shapes_and_dtypes(_shapes(ours, x, **_init_call(name, call)),
                                                  _shapes(flax_module, x, **_init_call(name, call)))
    got, expected = _outputs(name, fields, call, x)
    if name == 'BatchNorm':
        for running in (False, True):
            assert_close(got[running][0], expected[running][0])
            chex.assert_trees_all_close(got[running][1], expected[running][1],
                                        rtol=2e-5, atol=2e-6)
    else:
        assert_close(got, expected)


def test_params_have_flax_shapes_when_features_span_several_axes():
    shapes = _shapes(nl.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=(1, 3)), random_input())
    assert shapes['params']['scale'].shape == (3, 6)


def test_running_statistics_not_updated_during_init():
    module = nl.BatchNorm(use_running_average=False, axis_name='batch')
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x))(random_input())
    chex.assert_trees_all_equal(variables['batch_stats'],
                                {'mean': np.zeros(6, np.float32), 'var': np.ones(6, np.float32)})


def test_use_running_average_merges_field_and_call_argument():
    x = random_input()
    variables = _shapes(nl.BatchNorm(), x, use_running_average=True)
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), variables)
    for module, call in [(nl.BatchNorm(), {}),
                         (nl.BatchNorm(use_running_average=True), {'use_running_average': True})]:
        with pytest.raises(ValueError, match='use_running_average'):
            jax.eval_shape(lambda v, x: module.apply(v, x, **call), variables, x)

    @jax.jit
    def both(v, x):
        field = nl.BatchNorm(use_running_average=False).apply(v, x, mutable=['batch_stats'])
        argument = nl.BatchNorm().apply(v, x, False, mutable=['batch_stats'])
        return field, argument

    chex.assert_trees_all_equal(*both(variables, x))


def test_training_needs_mutable_batch_stats():
    x = random_input()
    variables = _shapes(nl.BatchNorm(), x, use_running_average=False)
    with pytest.raises(Exception, match='batch_stats'):
        jax.eval_shape(lambda v, x: nl.BatchNorm().apply(v, x, use_running_average=False),
                       variables, x)


DTYPES = [  # (dtype, param_dtype, input dtype)
    (None, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
    (None, jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.bfloat16, jnp.float32),
]


@pytest.mark.parametrize('dtype,param_dtype,x_dtype', DTYPES)
@pytest.mark.parametrize('name', MODULES)
def test_dtypes_follow_flax(name, dtype, param_dtype, x_dtype):
    x = random_input(dtype=x_dtype)
    fields = {'dtype': dtype, 'param_dtype': param_dtype}
    if name == 'GroupNorm':
        fields['num_groups'] = 2
    flax_module, ours = _modules(name, fields)
    variables = _shapes(flax_module, x, **_init_call(name, {}))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        _shapes(ours, x, **_init_call(name, {})), variables)
    call = {'use_running_average': False, 'mutable': ['batch_stats']} if name == 'BatchNorm' else {}
    out = [jax.eval_shape(lambda v, x: m.apply(v, x, **call), variables, x)
           for m in (ours, flax_module)]
    chex.assert_trees_all_equal_shapes_and_dtypes(*out)


def test_bfloat16_values_follow_flax():
    x = random_input(dtype=jnp.bfloat16)
    got, expected = _outputs('BatchNorm', {'dtype': jnp.bfloat16}, {}, x)
    assert got[False][0].dtype == jnp.bfloat16
    assert_close(got[False][0], expected[False][0], tol=2e-2)
    chex.assert_trees_all_close(got[False][1], expected[False][1], rtol=1e-5, atol=1e-6)


def test_batch_norm_is_stable_on_offset_data():
    x = (np.random.default_rng(0).normal(size=(64, 3)) + 1e4).astype(np.float32)
    module = nl.BatchNorm(use_running_average=False)
    variables = {'params': {'scale': np.ones(3, np.float32), 'bias': np.zeros(3, np.float32)},
                 'batch_stats': {'mean': np.zeros(3, np.float32), 'var': np.ones(3, np.float32)}}
    y, stats = jax.jit(lambda v, x: module.apply(v, x, mutable=['batch_stats']))(variables, x)
    x64 = np.asarray(x, np.float64)
    reference = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(y, reference, atol=2e-3)
    np.testing.assert_allclose(stats['batch_stats']['var'], 0.99 + 0.01 * x64.var(0), rtol=1e-5)


def _train(module, batches):
    """Runs ``module`` in training over ``batches``; returns the final batch_stats."""
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x))(batches[0])
    step = jax.jit(lambda v, x: module.apply(v, x, mutable=['batch_stats'])[1])
    for b in batches:
        variables = {**variables, **step(variables, b)}
    return variables['batch_stats']


def test_cumulative_average_stores_a_count_and_averages_exactly():
    batches = [random_input((8, 3), offset=i, seed=i) for i in range(3)]
    stats = _train(nl.BatchNorm(use_running_average=False, momentum=None), batches)
    assert stats['count'].dtype == jnp.int32 and stats['count'].tolist() == [3, 3, 3]
    np.testing.assert_allclose(stats['mean'], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(stats['var'], np.mean([b.var(0) for b in batches], 0), rtol=1e-5)
    assert set(_shapes(nl.BatchNorm(), batches[0], use_running_average=False)['batch_stats']) == {
        'mean', 'var'}


def test_cumulative_average_counts_each_feature_over_the_batches_it_saw():
    batches = [random_input((8, 3), offset=2 * i, seed=i) for i in range(3)]
    module = nl.BatchNorm(use_running_average=False, momentum=None)
    variables = module.init(jax.random.key(0), batches[0])
    no_feature_1 = np.ones((8, 3), bool)
    no_feature_1[:, 1] = False
    step = jax.jit(lambda v, x, m: module.apply(v, x, mask=m, mutable=['batch_stats'])[1])
    for i, b in enumerate(batches):
        variables = {**variables, **step(variables, b, no_feature_1 if i == 0 else
                                         np.ones((8, 3), bool))}
    stats = variables['batch_stats']
    assert stats['count'].tolist() == [3, 2, 3]
    expected = np.mean([b.astype(np.float64).mean(0) for b in batches], 0)
    expected[1] = np.mean([b[:, 1].astype(np.float64).mean() for b in batches[1:]])
    np.testing.assert_allclose(stats['mean'], expected, rtol=1e-5)


def test_unbiased_running_var():
    x = random_input((5, 2))
    stats = _train(nl.BatchNorm(use_running_average=False, momentum=0.0,
                                unbiased_running_var=True), [x])
    np.testing.assert_allclose(stats['var'], x.var(0, ddof=1), rtol=1e-5)


def test_batch_norm_axis_name_covers_the_mapped_batch():
    x = random_input((4, 6, 5))
    flax_module, ours = _modules('BatchNorm', {})
    ours = nl.BatchNorm(axis_name='batch')

    @jax.jit
    def run(x):
        variables = _perturb(flax_module.init(jax.random.key(0), x[0], False))
        mapped = jax.vmap(lambda s: ours.apply(variables, s, False, mutable=['batch_stats']),
                          out_axes=(0, None), axis_name='batch')(x)
        whole = flax_module.apply(variables, x.reshape(24, 5), False, mutable=['batch_stats'])
        return mapped, whole

    (y, stats), (expected, expected_stats) = run(x)
    assert_close(y.reshape(24, 5), expected)
    chex.assert_trees_all_close(stats, expected_stats, rtol=2e-5, atol=2e-6)


def test_lp_normalize_modules():
    x = random_input((3, 4))
    assert _shapes(nl.L2Normalize(), x) == {}
    l2, l1 = jax.jit(lambda x: (nl.L2Normalize().apply({}, x),
                                nl.L1Normalize(axis=0).apply({}, x)))(x)
    x = x.astype(np.float64)
    np.testing.assert_allclose(l2, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(l1, x / np.abs(x).sum(0, keepdims=True), rtol=1e-6)


def test_group_norm_validates_group_fields():
    with pytest.raises(ValueError, match='exactly one'):
        _shapes(nl.GroupNorm(num_groups=2, group_size=3), random_input())
    with pytest.raises(ValueError, match='num_groups'):
        _shapes(nl.GroupNorm(num_groups=4), random_input())


@pytest.mark.parametrize('name,fields,call', [
    ('GroupNorm', {'num_groups': 3, 'reduction_axes': (2, 3)}, {}),
    ('GroupNorm', {'num_groups': 3}, {'mask': np.broadcast_to(np.arange(5)[:, None] < 3, (5, 6))}),
    ('InstanceNorm', {'feature_axes': 1}, {}),
    ('InstanceNorm', {}, {'mask': np.arange(5)[:, None] < 3}),
])
def test_non_default_group_and_instance_options(name, fields, call):
    got, expected = _outputs(name, fields, call, random_input())
    assert_close(got, expected)


@pytest.mark.parametrize('name', ['LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm'])
def test_axis_index_groups_match_flax(name):
    fields = {'num_groups': 2} if name == 'GroupNorm' else {}
    x = random_input((4, 2, 3, 6))
    groups = {'axis_name': 'i', 'axis_index_groups': [[0, 1], [2, 3]]}
    flax_module, ours = _modules(name, dict(fields, **groups))

    @jax.jit
    def run(x):
        variables = _perturb(getattr(nn, name)(**fields).init(jax.random.key(0), x[0]))
        # Flax's collectives take groups only under pmap; normlib's under vmap too.
        ours_vmapped = jax.vmap(lambda s: ours.apply(variables, s), axis_name='i')(x)
        return ours_vmapped, jax.pmap(lambda s: flax_module.apply(variables, s), axis_name='i')(x)

    assert_close(*run(x))
