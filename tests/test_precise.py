"""Precise statistics against float64 NumPy over the concatenated batches."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from _reference import np_moments
from normlib import linen as nl
from normlib import nnx as nx
from normlib._precise import precise_batch_stats
from normlib.precise_flax import precise_linen, precise_nnx

OFFSET = 1e4  # |mean| / std is about 1e4: naive float32 moments lose everything.
STD = np.array([1.0, 0.5, 2.0])
EPSILON = 1e-5


def _batches(sizes, seed=0, shape=()):
    """Float32 batches ``(n, *shape, 3)`` with mean OFFSET (NumPy, no JAX compiles)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, *shape, 3)) * STD + OFFSET).astype(np.float32) for n in sizes]


def _moments(x, mask=None, ddof=0):
    """float64 mean and variance of the valid entries, per feature (last axis)."""
    mean, var = np_moments(x, tuple(range(np.ndim(x) - 1)), mask, ddof=ddof)
    return mean.reshape(-1), var.reshape(-1)


def _assert_moments(state, mean, var, tol=1e-5):
    np.testing.assert_allclose(state['mean'], mean, rtol=3e-7)
    np.testing.assert_allclose(state['var'], var, rtol=tol)


def _batch_averages(parts):
    """What averaging per-batch moments (an EMA's best case) would give."""
    return np.mean([_moments(p)[1] for p in parts], axis=0)


def test_function_with_mask_and_unequal_batches():
    xs = _batches((5, 12, 5), shape=(2,))
    rng = np.random.default_rng(1)
    keeps = [rng.random((len(x), 1, 3)) < 0.7 for x in xs]
    keeps[0][0] = False  # the first entries are masked: the shift starts far from the mean
    for keep in keeps:
        keep[..., 2] = False  # one feature never valid
    batches = [{'x': x, 'keep': keep} for x, keep in zip(xs, keeps)]

    # One mask for both outputs (a pytree prefix).
    stats = precise_batch_stats(lambda b: {'all': b['x'], 'first': b['x'][:, :1]}, batches,
                                mask_fn=lambda b: b['keep'], progress=False)

    x, keep = np.concatenate(xs), np.concatenate(keeps)
    for name, data in (('all', x), ('first', x[:, :1])):
        state = stats[name]
        mean, var = _moments(data[..., :2], keep[..., :2])
        _assert_moments({'mean': state.mean[:2], 'var': state.var[:2]}, mean, var)
        # A feature without valid entries gets the initial statistics.
        np.testing.assert_array_equal([state.mean[2], state.var[2]], [0.0, 1.0])
        assert state.mean.dtype == state.var.dtype == np.float32 and int(state.count) == 3


def test_function_unbiased_differs_from_averaged_batches():
    xs = _batches((3, 9))
    state = precise_batch_stats(lambda x: x, xs, unbiased=True, progress=False)
    mean, var = _moments(np.concatenate(xs), ddof=1)
    _assert_moments(state._asdict(), mean, var)
    # The data tell the exact answer apart from averaged batch moments.
    assert not np.allclose(_batch_averages(xs), var, rtol=1e-2)


def test_progress(capsys):
    xs = _batches([4] * 100, seed=2)
    mean, var = _moments(np.concatenate(xs))
    for progress, drawn in ((False, False), (True, True), (None, False)):  # None: not a tty
        state = precise_batch_stats(lambda x: x, iter(xs) if progress else xs,
                                    progress=progress)
        _assert_moments(state._asdict(), mean, var)
        assert ('precise batch stats' in capsys.readouterr().err) == drawn
    with pytest.raises(TypeError, match='progress'):
        precise_batch_stats(lambda x: x, xs, progress='yes')


def test_no_batches():
    with pytest.raises(ValueError, match='empty'):
        precise_batch_stats(lambda x: x, [], progress=False)


def _train_mode_hidden(x, bn, dense):
    """The first BatchNorm in training mode, then Dense and relu, in float64."""
    x = np.asarray(x, np.float64)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + EPSILON)
    h = (xhat * bn['scale'] + bn['bias']) @ np.asarray(dense['kernel'], np.float64)
    return np.maximum(h + dense['bias'], 0.0)


def _init(model, x):
    """Initial variables; one compile instead of one per eager op."""
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nl.BatchNorm(use_running_average=not train, momentum=None)(x)
        x = nn.relu(nn.Dense(4)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


def test_linen_mlp():
    xs = _batches((16, 16, 5), seed=3)
    model = LinenMLP()
    variables = _init(model, xs[0])
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32),
                          jax.device_get(variables['params']))
    variables = {**variables, 'params': params}

    new = precise_linen(model, variables, xs, train=True, progress=False)

    stats = new['batch_stats']
    mean, var = _moments(np.concatenate(xs))
    _assert_moments(stats['BatchNorm_0'], mean, var)
    np.testing.assert_array_equal(stats['BatchNorm_0']['count'], np.full(3, 3))  # per feature
    hidden = [_train_mode_hidden(x, params['BatchNorm_0'], params['Dense_0']) for x in xs]
    mean, var = _moments(np.concatenate(hidden))
    np.testing.assert_allclose(stats['BatchNorm_1']['mean'], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats['BatchNorm_1']['var'], var, rtol=1e-4)
    assert not np.allclose(_batch_averages(hidden), var, rtol=1e-2)
    # Only batch_stats change, and the input variables are left alone.
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, new['params'], params)
    assert float(variables['batch_stats']['BatchNorm_1']['mean'][0]) != float(mean[0])


def test_linen_masked_feature_keeps_its_count():
    xs = _batches((4, 6), seed=10)
    keep = np.array([True, True, False])  # the last feature is never valid
    model = nl.BatchNorm(use_running_average=False, momentum=None)
    variables = jax.jit(model.init)(jax.random.key(0), xs[0])

    new = precise_linen(model, variables, xs, method=lambda m, x: m(x, mask=keep),
                        progress=False)

    stats = new['batch_stats']
    mean, var = _moments(np.concatenate(xs)[:, :2])
    _assert_moments({'mean': stats['mean'][:2], 'var': stats['var'][:2]}, mean, var)
    np.testing.assert_array_equal([stats['mean'][2], stats['var'][2]], [0.0, 1.0])
    np.testing.assert_array_equal(stats['count'], [2, 2, 0])


def test_linen_needs_training_mode():
    x = _batches((4,))[0]
    model = LinenMLP()
    variables = _init(model, x)
    with pytest.raises(ValueError, match="'BatchNorm_0'.*training mode"):
        precise_linen(model, variables, [x], train=False, progress=False)


class Calls(nnx.Module):
    """Counts its calls in a BatchStat: state that precise_nnx must restore."""

    def __init__(self):
        self.calls = nnx.BatchStat(np.zeros((), np.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return x


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.bn1 = nx.BatchNorm(3, unbiased_running_var=True, rngs=rngs)
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, rngs=rngs)
        self.unused = nx.BatchNorm(4, rngs=rngs)
        self.calls = Calls()

    def __call__(self, x):
        return self.calls(self.bn2(nnx.relu(self.dense(self.bn1(x)))))


def test_nnx_mlp_in_place():
    xs = _batches((16, 16, 5), seed=5)
    model = NNXMLP(nnx.Rngs(0))
    rng = np.random.default_rng(6)
    for p in (model.bn1.scale, model.bn1.bias, model.dense.bias):
        p[...] = p[...] + 0.3 * rng.normal(size=p.shape).astype(np.float32)
    model.unused.mean[...] = np.full(4, 7.0, np.float32)
    model.eval()

    precise_nnx(model, ({'x': x} for x in xs), call=lambda m, b: m(b['x']), progress=False)

    mean, var = _moments(np.concatenate(xs), ddof=1)
    _assert_moments({'mean': model.bn1.mean[...], 'var': model.bn1.var[...]}, mean, var)
    bn = {'scale': model.bn1.scale[...], 'bias': model.bn1.bias[...]}
    dense = {'kernel': model.dense.kernel[...], 'bias': model.dense.bias[...]}
    hidden = [_train_mode_hidden(x, bn, dense) for x in xs]
    mean, var = _moments(np.concatenate(hidden))
    np.testing.assert_allclose(model.bn2.mean[...], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bn2.var[...], var, rtol=1e-4)
    assert not np.allclose(_batch_averages(hidden), var, rtol=1e-2)
    # Everything else is as it was: modes, classes, other state.
    np.testing.assert_array_equal(model.unused.mean[...], 7.0)
    np.testing.assert_array_equal(model.unused.var[...], 1.0)
    assert int(model.calls.calls[...]) == 0
    assert model.bn1.use_running_average and model.bn2.use_running_average
    assert type(model.bn1) is nx.BatchNorm and type(model.bn2) is nnx.BatchNorm


def test_nnx_needs_training_mode():
    model = nx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='training mode'):
        precise_nnx(model, _batches((4,)), call=lambda m, x: m(x, use_running_average=True),
                    progress=False)
    np.testing.assert_array_equal(model.mean[...], 0.0)


# Stacked layers (scan over layers) and ensembles (vmap): every layer or
# member has its own statistics, at its index of the stacked batch_stats.
STACK = 3  # layers or members
WIDTH = 4  # features


def _stack_batches():
    """Float32 batches ``(n, WIDTH)`` of unequal sizes."""
    rng = np.random.default_rng(7)
    return [(rng.normal(size=(n, WIDTH)) * [1.0, 0.5, 2.0, 1.5] + 0.5).astype(np.float32)
            for n in (6, 11, 3)]


def _block_inputs(x, p, chained):
    """Every block's BatchNorm input, in float64: each block is Dense, tanh and a
    BatchNorm in training mode; the blocks run in turn (``chained``, a scan
    over layers) or side by side on ``x`` (an ensemble)."""
    x, inputs = np.asarray(x, np.float64), []
    for i in range(STACK):
        h = np.tanh(x @ p['kernel'][i] + p['bias'][i])
        inputs.append(h)
        if chained:
            x = (h - h.mean(0)) / np.sqrt(h.var(0) + EPSILON) * p['scale'][i] + p['offset'][i]
    return inputs


def _assert_stacked(mean, var, xs, p, chained, ddof=0):
    p = {name: np.asarray(v, np.float64) for name, v in p.items()}
    per_batch = [_block_inputs(x, p, chained) for x in xs]
    for i in range(STACK):
        want_mean, want_var = _moments(np.concatenate([inputs[i] for inputs in per_batch]),
                                       ddof=ddof)
        np.testing.assert_allclose(mean[i], want_mean, rtol=1e-5, atol=1e-6, err_msg=f'{i}')
        np.testing.assert_allclose(var[i], want_var, rtol=1e-5, err_msg=f'{i}')


def _perturbed(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32),
                        jax.device_get(tree))


class LinenBlock(nn.Module):
    batch_norm: type
    train: bool

    @nn.compact
    def __call__(self, x, _):
        x = nn.tanh(nn.Dense(WIDTH)(x))
        kwargs = {'momentum': None} if self.batch_norm is nl.BatchNorm else {}
        return self.batch_norm(use_running_average=not self.train, **kwargs)(x), None


class LinenScan(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        blocks = nn.scan(LinenBlock, variable_axes={'params': 0, 'batch_stats': 0},
                         split_rngs={'params': True}, length=STACK)
        return blocks(nl.BatchNorm, train, name='blocks')(x, None)[0]


class LinenEnsemble(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        members = nn.vmap(LinenBlock, variable_axes={'params': 0, 'batch_stats': 0},
                          split_rngs={'params': True}, in_axes=(None, None), axis_size=STACK)
        return members(nn.BatchNorm, train, name='members')(x, None)[0]


@pytest.mark.parametrize('model, name', [(LinenScan(), 'blocks'),
                                         (LinenEnsemble(), 'members')], ids=['scan', 'vmap'])
def test_linen_stacked(model, name):
    xs = _stack_batches()
    variables = _init(model, xs[0])
    params = _perturbed(variables['params'], 8)
    variables = {**variables, 'params': params}

    new = precise_linen(model, variables, xs, train=True, progress=False)

    stats = new['batch_stats'][name]['BatchNorm_0']
    p = params[name]
    _assert_stacked(stats['mean'], stats['var'], xs,
                    {'kernel': p['Dense_0']['kernel'], 'bias': p['Dense_0']['bias'],
                     'scale': p['BatchNorm_0']['scale'], 'offset': p['BatchNorm_0']['bias']},
                    chained=name == 'blocks')
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), new, variables)
    if 'count' in stats:
        np.testing.assert_array_equal(stats['count'], 3)


class NNXBlock(nnx.Module):
    def __init__(self, batch_norm, rngs):
        self.dense = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        kwargs = ({'momentum': None, 'unbiased_running_var': True}
                  if batch_norm is nx.BatchNorm else {})
        self.bn = batch_norm(WIDTH, rngs=rngs, **kwargs)

    def __call__(self, x):
        return self.bn(nnx.tanh(self.dense(x)))


class NNXStack(nnx.Module):
    """Blocks created with nnx.vmap, run with nnx.scan (chained) or nnx.vmap."""

    def __init__(self, batch_norm, chained, rngs):
        @nnx.split_rngs(splits=STACK)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NNXBlock(batch_norm, rngs)

        self.blocks = create(rngs)
        self.chained = chained

    def __call__(self, x):
        if self.chained:
            return nnx.scan(lambda x, block: (block(x), None),
                            in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)[0]
        return nnx.vmap(lambda block, x: block(x), in_axes=(0, None))(self.blocks, x)


@pytest.mark.parametrize('batch_norm, chained', [(nx.BatchNorm, True),
                                                 (nnx.BatchNorm, False)], ids=['scan', 'vmap'])
def test_nnx_stacked(batch_norm, chained):
    xs = _stack_batches()
    model = NNXStack(batch_norm, chained, nnx.Rngs(0))
    nnx.update(model, _perturbed(nnx.state(model, nnx.Param), 9))
    model.eval()

    precise_nnx(model, xs, progress=False)

    block = model.blocks
    p = {'kernel': block.dense.kernel[...], 'bias': block.dense.bias[...],
         'scale': block.bn.scale[...], 'offset': block.bn.bias[...]}
    _assert_stacked(block.bn.mean[...], block.bn.var[...], xs, p, chained,
                    ddof=1 if batch_norm is nx.BatchNorm else 0)
    assert block.bn.use_running_average and type(block.bn) is batch_norm
    if batch_norm is nx.BatchNorm:
        np.testing.assert_array_equal(block.bn.count[...], np.full((STACK, WIDTH), 3))
