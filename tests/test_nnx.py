"""normlib.nnx against flax.nnx (use_fast_variance=False) and flax.linen as oracles."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from _reference import assert_close, random_input
from normlib import nnx as nx

MODULES = ('BatchNorm', 'LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm')
ADDITIONS = {'BatchNorm': ['memory_efficient', 'unbiased_running_var'],
             'LayerNorm': ['scale_offset', 'memory_efficient'],
             'RMSNorm': ['scale_offset', 'memory_efficient']}


def _perturb(module, seed=1):
    """Moves every variable of ``module`` away from its initial value (NumPy,
    variances kept positive); returns the new state."""
    state = nnx.state(module)
    rng = np.random.default_rng(seed)

    def move(path, v):
        v = np.asarray(v)
        noise = rng.normal(size=v.shape)
        moved = v * np.exp(0.3 * noise) if path[-1].key == 'var' else v + 0.3 * noise
        return moved.astype(v.dtype)

    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(move, nnx.to_pure_dict(state)))
    return state


@pytest.mark.parametrize('name', MODULES)
def test_constructor_and_call_are_flax(name):
    def parameters(function, drop=()):
        return [(p.name, p.kind, None if callable(p.default) else p.default)
                for p in inspect.signature(function).parameters.values() if p.name not in drop]

    flax_init = parameters(getattr(nnx, name).__init__, drop=('use_fast_variance',))
    ours = parameters(getattr(nx, name).__init__)
    # Flax's parameters in Flax's order; normlib's additions are keyword-only.
    added = ADDITIONS.get(name, [])
    assert sorted(p[0] for p in ours if p[0] not in [q[0] for q in flax_init]) == sorted(added)
    assert [p for p in ours if p[0] not in added] == flax_init
    assert all(p[1] is inspect.Parameter.KEYWORD_ONLY for p in ours if p[0] in added)
    assert (parameters(getattr(nx, name).__call__) == parameters(getattr(nnx, name).__call__))


CASES = [
    ('BatchNorm', {}, {}),
    ('BatchNorm', {'use_running_average': True, 'use_bias': False}, {}),
    ('BatchNorm', {'momentum': 0.9, 'epsilon': 1e-3},
     {'mask': np.arange(4)[:, None, None, None] < 3}),
    ('LayerNorm', {}, {'mask': np.arange(6) < 4}),
    ('LayerNorm', {'reduction_axes': (1, 2, 3), 'feature_axes': -1}, {}),
    ('RMSNorm', {}, {}),
    ('GroupNorm', {'num_groups': 3}, {}),
    ('InstanceNorm', {'use_scale': False}, {}),
]


def _pair(name, fields):
    return (getattr(nnx, name)(6, use_fast_variance=False, rngs=nnx.Rngs(0), **fields),
            getattr(nx, name)(6, rngs=nnx.Rngs(0), **fields))


@pytest.mark.parametrize('name,fields,call', CASES)
def test_flax_state_gives_flax_two_pass_results(name, fields, call):
    flax_module, ours = _pair(name, fields)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(flax_module)))
    for kind in (nnx.Param, nnx.BatchStat):
        paths = [{p for p, _ in nnx.to_flat_state(nnx.state(m, kind))} for m in (ours, flax_module)]
        assert paths[0] == paths[1]
    state = _perturb(flax_module)
    nnx.update(flax_module, state)
    nnx.update(ours, state)

    @nnx.jit
    def run(ours, flax_module, x):
        return ours(x, **call), flax_module(x, **call)

    y, expected = run(ours, flax_module, random_input())
    assert_close(y, expected)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(ours)),
                                nnx.to_pure_dict(nnx.state(flax_module)), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('dtype,param_dtype,x_dtype', [
    (None, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
    (None, jnp.bfloat16, jnp.bfloat16),
])
@pytest.mark.parametrize('name', MODULES)
def test_dtypes_follow_flax(name, dtype, param_dtype, x_dtype):
    fields = {'dtype': dtype, 'param_dtype': param_dtype}
    if name == 'GroupNorm':
        fields['num_groups'] = 2
    modules = _pair(name, fields)
    states = [nnx.to_pure_dict(nnx.state(m)) for m in modules]
    chex.assert_trees_all_equal_shapes_and_dtypes(*states)

    def output(module):
        graphdef, state = nnx.split(module)
        return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                              random_input(dtype=x_dtype))

    assert output(modules[0]).dtype == output(modules[1]).dtype


def test_running_statistics_are_float32_batch_stats():
    bn = nx.BatchNorm(3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bn.mean.dtype == bn.var.dtype == jnp.float32 and bn.scale.dtype == jnp.bfloat16
    assert isinstance(bn.mean, nnx.BatchStat) and isinstance(bn.scale, nnx.Param)
    y = nnx.jit(lambda m, x: m(x))(bn, random_input((8, 3), dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bn.mean.dtype == jnp.float32


class _Block(nnx.Module):
    def __init__(self, rngs, **kwargs):
        self.bn = nx.BatchNorm(3, rngs=rngs, **kwargs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.bn(x)


def test_train_eval_view_and_call_argument():
    block = _Block(nnx.Rngs(0))
    assert block.bn.use_running_average is False
    block.eval()
    assert block.bn.use_running_average is True and block.dropout.deterministic
    block.train()
    assert block.bn.use_running_average is False
    view = nnx.view(block, use_running_average=True)
    assert view.bn.use_running_average is True and block.bn.use_running_average is False

    @nnx.jit
    def step(model, x):
        return model(x)

    x = random_input((8, 3))
    step(view, x)
    chex.assert_trees_all_equal(block.bn.mean[...], np.zeros(3, np.float32))
    step(block, x)
    assert np.all(np.asarray(block.bn.mean[...]) != 0)
    with pytest.raises(ValueError, match='use_running_average'):
        jax.eval_shape(lambda x: nx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x), x)


def test_split_merge_round_trip_and_cumulative_count():
    block = _Block(nnx.Rngs(0), momentum=None)
    assert block.bn.count[...].dtype == jnp.int32
    assert not hasattr(nx.BatchNorm(3, rngs=nnx.Rngs(0)), 'count')
    graphdef, state = nnx.split(block)

    @jax.jit
    def step(state, x):
        model = nnx.merge(graphdef, state)
        model(x)
        return nnx.state(model)

    batches = [random_input((8, 3), offset=i, seed=i) for i in range(3)]
    for b in batches:
        state = step(state, b)
    block = nnx.merge(graphdef, state)
    assert block.bn.count[...].tolist() == [3, 3, 3]
    np.testing.assert_allclose(block.bn.mean[...], np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(block.bn.var[...], np.mean([b.var(0) for b in batches], 0),
                               rtol=1e-5)


def test_float_mask_works():
    """flax.nnx.LayerNorm raises on a float mask; Linen and normlib treat it as ``!= 0``."""
    x = random_input()
    mask = (np.arange(6) < 4).astype(np.float32)
    ours = nx.LayerNorm(6, rngs=nnx.Rngs(0))
    oracle = linen.LayerNorm(use_fast_variance=False)
    y, expected = jax.jit(lambda x: (ours(x, mask=mask), oracle.apply(
        {'params': {'scale': jnp.ones(6), 'bias': jnp.zeros(6)}}, x, mask=mask)))(x)
    assert_close(y, expected)


def test_group_norm_with_extra_leading_axes_matches_linen():
    """flax.nnx.GroupNorm repeats the group statistics along axis 1, which is
    wrong whenever reduction_axes leaves more than one leading axis."""
    x = random_input((2, 3, 4, 6))
    ours = nx.GroupNorm(6, num_groups=3, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
    oracle = linen.GroupNorm(num_groups=3, reduction_axes=(2, 3), use_fast_variance=False)
    params = {'params': {'scale': jnp.ones(6), 'bias': jnp.zeros(6)}}
    y, expected = jax.jit(lambda x: (ours(x), oracle.apply(params, x)))(x)
    assert_close(y, expected)


def test_group_norm_validates_groups():
    with pytest.raises(ValueError, match='exactly one'):
        nx.GroupNorm(6, num_groups=2, group_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='num_groups'):
        nx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))


def test_vmap_over_training_batch_norm_with_axis_name():
    """The statistics cover the whole vmapped batch and the running averages
    stay unbatched, call after call (flax #4760)."""
    x = random_input((4, 8, 3))
    ours = nx.BatchNorm(3, axis_name='batch', rngs=nnx.Rngs(0))
    whole = nx.BatchNorm(3, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(ours, whole, x):
        mapped = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='batch')
        return mapped(ours, x), whole(x.reshape(32, 3))

    for _ in range(2):
        y, expected = step(ours, whole, x)
        assert_close(y.reshape(32, 3), expected)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(ours)),
                                nnx.to_pure_dict(nnx.state(whole)), rtol=1e-6)


def test_vmap_over_an_ensemble_of_batch_norms():
    """Vmapped state: every member keeps its own statistics."""
    @nnx.vmap(in_axes=0)
    def make(key):
        return nx.BatchNorm(3, rngs=nnx.Rngs(key))

    ensemble = make(jax.random.split(jax.random.key(0), 2))
    x = random_input((2, 8, 3))
    nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(0, 0)))(ensemble, x)
    for i in range(2):
        np.testing.assert_allclose(ensemble.mean[...][i], 0.01 * x[i].mean(0), rtol=1e-5)
