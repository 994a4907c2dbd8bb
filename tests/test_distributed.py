"""Cross-device batch statistics equal those of the global batch, in every mapping.

Runs on the 8 virtual CPU devices set up in conftest.py. References are
single-device normlib on the concatenated batch (the promise) and float64
NumPy (so the single-device path is not its own judge).
"""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import normlib
from _reference import flax_two_pass_moments

N, C = 64, 6
OFFSET = 500.0  # |mean| / std


def _data(seed=0, n=N, c=C):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) + OFFSET).astype(np.float32)
    w = rng.standard_normal((n, c)).astype(np.float32)
    scale = (rng.random(c) + 0.5).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    return x, w, scale, bias


def _mesh(shape, names, kind=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def _bn(x, scale, bias, axis_name):
    return normlib.batch_norm(x, normlib.init_batch_norm(C), scale, bias, training=True,
                              momentum=0.9, axis_name=axis_name)


# Each mode maps the global (N, C) batch over devices and returns the global y
# and one device's new state; gradients are taken outside, of the global loss.
def _pmap(x, scale, bias):
    y, s = jax.pmap(functools.partial(_bn, axis_name='i'), axis_name='i',
                    in_axes=(0, None, None))(x.reshape(8, -1, C), scale, bias)
    return y.reshape(N, C), jax.tree.map(lambda a: a[0], s)


def _shard_map_1d(x, scale, bias):
    f = jax.shard_map(functools.partial(_bn, axis_name='d'), mesh=_mesh((8,), ('d',)),
                      in_specs=(P('d'), P(), P()), out_specs=(P('d'), P()))
    return f(x, scale, bias)


def _shard_map_2d_data(x, scale, bias):
    # Batch sharded over 'data', replicated over 'model'.
    f = jax.shard_map(functools.partial(_bn, axis_name='data'),
                      mesh=_mesh((4, 2), ('data', 'model')),
                      in_specs=(P('data'), P(), P()), out_specs=(P('data'), P()))
    return f(x, scale, bias)


def _shard_map_2d_tuple(x, scale, bias):
    # Batch sharded over both axes; statistics over both.
    f = jax.shard_map(functools.partial(_bn, axis_name=('data', 'model')),
                      mesh=_mesh((4, 2), ('data', 'model')),
                      in_specs=(P(('data', 'model')), P(), P()),
                      out_specs=(P(('data', 'model')), P()))
    return f(x, scale, bias)


def _vmap(x, scale, bias):
    # Per-example code: each call sees one (C,) example.
    y, s = jax.vmap(functools.partial(_bn, axis_name='b'), axis_name='b',
                    in_axes=(0, None, None))(x, scale, bias)
    return y, jax.tree.map(lambda a: a[0], s)


def _vmap_in_pmap(x, scale, bias):
    inner = jax.vmap(functools.partial(_bn, axis_name=('i', 'b')), axis_name='b',
                     in_axes=(0, None, None))
    y, s = jax.pmap(inner, axis_name='i', in_axes=(0, None, None))(x.reshape(8, -1, C), scale, bias)
    return y.reshape(N, C), jax.tree.map(lambda a: a[0, 0], s)


def _sharded_jit(x, scale, bias):
    # No axis_name: the compiler inserts the collectives.
    x = jax.lax.with_sharding_constraint(x, NamedSharding(_mesh((8,), ('d',)), P('d')))
    return _bn(x, scale, bias, None)


MODES = {
    'pmap': _pmap,
    'shard_map_1d': _shard_map_1d,
    'shard_map_2d_data': _shard_map_2d_data,
    'shard_map_2d_tuple': _shard_map_2d_tuple,
    'vmap': _vmap,
    'vmap_in_pmap': _vmap_in_pmap,
    'sharded_jit': _sharded_jit,
}


def _loss_and_state(mode, w):
    def loss(x, scale, bias):
        y, state = mode(x, scale, bias)
        return jnp.sum(w * y), (y, state)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected)) + 1e-30
    np.testing.assert_array_less(np.max(np.abs(actual - expected)) / scale, rtol)


@pytest.fixture(scope='module')
def reference():
    x, w, scale, bias = _data()
    grads, (y, state) = _loss_and_state(lambda *a: _bn(*a, None), w)(x, scale, bias)
    return (x, w, scale, bias), grads, y, state


@pytest.mark.parametrize('mode', sorted(MODES))
def test_mode_equals_single_device_on_global_batch(mode, reference):
    (x, w, scale, bias), grads_ref, y_ref, state_ref = reference
    grads, (y, state) = _loss_and_state(MODES[mode], w)(x, scale, bias)
    _close(y, y_ref, 2e-5)
    for a, b in zip(state, state_ref):
        _close(a, b, 2e-5)
    for a, b in zip(grads, grads_ref):
        _close(a, b, 2e-4)


def test_single_device_reference_matches_float64_numpy(reference):
    (x, w, scale, bias), grads, y, state = reference
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    xhat = (x64 - mean) / np.sqrt(var + 1e-5)
    _close(y, xhat * scale + bias, 2e-5)
    _close(state.mean, 0.1 * mean, 1e-6)
    _close(state.var, 0.9 + 0.1 * var, 1e-6)
    # d/dx of sum(w * y) for batch norm, written out.
    g = w * scale
    dx = (g - g.mean(0) - xhat * (g * xhat).mean(0)) / np.sqrt(var + 1e-5)
    _close(grads[0], dx, 2e-4)
    _close(grads[1], (w * xhat).sum(0), 2e-4)


def test_uneven_and_empty_shards_give_statistics_of_valid_elements():
    x, _, _, _ = _data(1)
    counts = np.array([8, 0, 3, 8, 1, 8, 5, 2])  # valid examples per device
    mask = (np.arange(8)[None, :] < counts[:, None])[..., None]
    y, state = jax.pmap(
        lambda x, m: normlib.batch_norm(x, normlib.init_batch_norm(C), training=True, momentum=0.0,
                                        mask=m, axis_name='i', unbiased_running_var=True),
        axis_name='i')(x.reshape(8, 8, C), mask)
    valid = x.reshape(8, 8, C)[mask[..., 0]].astype(np.float64)
    _close(state.mean[3], valid.mean(0), 1e-6)
    _close(state.var[3], valid.var(0, ddof=1), 2e-5)
    yv = np.asarray(y)[mask[..., 0]]
    _close(yv, (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5), 2e-5)
    # Every device holds bit-identical running statistics.
    for leaf in state:
        assert (np.asarray(leaf) == np.asarray(leaf)[0]).all()


def test_all_devices_empty_leaves_state_unchanged():
    x, _, _, _ = _data(2)
    state0 = normlib.BatchNormState(jnp.full(C, 3.0), jnp.full(C, 2.0), jnp.array(5, jnp.int32))
    y, state = jax.pmap(
        lambda x: normlib.batch_norm(x, state0, training=True, mask=jnp.zeros(x.shape, bool),
                                     axis_name='i'), axis_name='i')(x.reshape(8, 8, C))
    assert np.isfinite(np.asarray(y)).all()
    for new, old in zip(state, state0):
        assert (np.asarray(new) == np.asarray(old)).all()


def test_axis_index_groups_normalize_within_each_group():
    x, _, _, _ = _data(3)
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    y, state = jax.pmap(
        lambda x: normlib.batch_norm(x, normlib.init_batch_norm(C), training=True, momentum=0.0,
                                     axis_name='i', axis_index_groups=groups),
        axis_name='i')(x.reshape(8, 8, C))
    for group in groups:
        members = x.reshape(8, 8, C)[group].reshape(-1, C).astype(np.float64)
        _close(state.mean[group[0]], members.mean(0), 1e-6)
        _close(state.var[group[-1]], members.var(0), 2e-5)
        expected = (members - members.mean(0)) / np.sqrt(members.var(0) + 1e-5)
        _close(np.asarray(y)[group].reshape(-1, C), expected, 2e-5)


def _collectives(compiled_text):
    """Collectives a call on data in range runs: of a conditional's branches
    (the scaled pass for statistics that would overflow) only the one that
    sends least."""
    from benchmarks._payload import hlo_collectives
    return hlo_collectives(compiled_text)[0]


@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
def test_two_collectives_forward_and_one_backward(mapping):
    # Forward: the shared shift, then the sums around it; backward: the two
    # tangent sums.
    x, w, scale, bias = _data()
    bn = functools.partial(_bn, axis_name='i')

    def forward(x, scale, bias):
        return bn(x, scale, bias)

    def forward_backward(x, scale, bias, ct):
        (y, _), vjp = jax.vjp(lambda x: bn(x, scale, bias), x)
        return vjp((ct, jax.tree.map(jnp.zeros_like, normlib.init_batch_norm(C))))[0]

    if mapping == 'pmap':
        fwd = jax.pmap(forward, axis_name='i', in_axes=(0, None, None))
        both = jax.pmap(forward_backward, axis_name='i', in_axes=(0, None, None, 0))
    else:
        mesh = _mesh((8,), ('i',))
        fwd = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P('i'), P(), P()),
                                    out_specs=(P('i'), P())))
        both = jax.jit(jax.shard_map(forward_backward, mesh=mesh,
                                     in_specs=(P('i'), P(), P(), P('i')), out_specs=P('i')))
    xs = x.reshape(8, -1, C) if mapping == 'pmap' else x
    ws = w.reshape(8, -1, C) if mapping == 'pmap' else w
    assert _collectives(fwd.lower(xs, scale, bias).compile().as_text()) == 2
    assert _collectives(both.lower(xs, scale, bias, ws).compile().as_text()) == 3


def test_layer_and_rms_norm_over_sharded_features():
    # Tensor parallelism: features split over 'model', examples over 'data'.
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 16)) * 3 + 50).astype(np.float32)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    scale = (rng.random(16) + 0.5).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    mesh = _mesh((4, 2), ('data', 'model'))

    def sharded(fn):
        return jax.shard_map(fn, mesh=mesh, in_specs=(P('data', 'model'), P('model'), P('model')),
                             out_specs=P('data', 'model'))

    cases = {
        'layer_norm': lambda x, s, b, **kw: normlib.layer_norm(x, s, b, **kw),
        'rms_norm': lambda x, s, b, **kw: normlib.rms_norm(x, s, **kw) + b,
    }
    for name, fn in cases.items():
        def loss(x, s, b, fn=fn, axis_name=None):
            if axis_name is None:
                y = fn(x, s, b)
            else:
                y = sharded(functools.partial(fn, axis_name='model'))(x, s, b)
            return jnp.sum(w * y), y

        grads, y = jax.jit(jax.grad(functools.partial(loss, axis_name='model'), (0, 1, 2),
                                    has_aux=True))(x, scale, bias)
        grads_ref, y_ref = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(x, scale, bias)
        _close(y, y_ref, 2e-5)
        for a, b in zip(grads, grads_ref):
            _close(a, b, 2e-4)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
    layer_norm = jax.jit(sharded(lambda x, s, b: normlib.layer_norm(x, s, b, axis_name='model')))
    _close(layer_norm(x, scale, bias), expected * scale + bias, 2e-5)


def test_unbound_axis_name_is_a_clear_error():
    x = jnp.ones((4, C))
    with pytest.raises(ValueError, match="axis_name='batch'.*not bound"):
        normlib.batch_norm(x, normlib.init_batch_norm(C), training=True, axis_name='batch')
    with pytest.raises(ValueError, match='not bound'):
        jax.jit(lambda x: normlib.layer_norm(x, axis_name='model'))(x)


def test_unequal_axis_index_groups_are_rejected():
    x = jnp.ones((8, 4, C))
    with pytest.raises(ValueError, match='axis_index_groups.*equal size'):
        jax.pmap(lambda x: normlib.batch_norm(x, normlib.init_batch_norm(C), training=True,
                                              axis_name='i',
                                              axis_index_groups=[[0, 1, 2], [3, 4, 5, 6, 7]]),
                 axis_name='i')(x)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('processes', [2, 4])
def test_processes_match_one(tmp_path, processes):
    worker = pathlib.Path(__file__).with_name('_distributed_worker.py')
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env['PYTHONPATH'] = os.pathsep.join([str(worker.parents[1]), env.get('PYTHONPATH', '')])
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(rank), str(processes),
                               str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(processes)]
    try:
        outputs = [p.communicate(timeout=200)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f'the {processes}-process run did not finish within 200 s')
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    sys.path.insert(0, str(worker.parent))
    try:
        import _distributed_worker as spec
    finally:
        sys.path.pop(0)
    x, scale, bias, w = spec.global_problem()
    state, new_scale, new_bias = jax.jit(functools.partial(spec.train_step, axis_name=None))(
        x, scale, bias, w)
    for rank in range(processes):
        got = np.load(tmp_path / f'rank{rank}.npz')
        _close(got['mean'], state.mean, 2e-5)
        _close(got['var'], state.var, 2e-5)
        _close(got['scale'], new_scale, 2e-5)
        _close(got['bias'], new_bias, 2e-5)
    # Single-process statistics themselves against float64 NumPy.
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    _close(state.mean, 0.01 * x64.mean(0), 1e-5)


@pytest.mark.long
def test_data_parallel_example_passes_its_check_at_default_settings():
    # The default run (200 steps, shard_map and pmap), not only --smoke: every
    # step is compared with a single-device step from the same train state, so
    # states reached only late in training are checked too. The difference after
    # 200 free-running steps is not checked: it is rounding carried through
    # training, whose size XLA's reduction order decides. (The example uses GELU:
    # with ReLU, one input at the kink took a different side on 8 devices and
    # moved one step by 8.4e-4.)
    example = pathlib.Path(__file__).resolve().parents[1] / 'examples' / 'data_parallel.py'
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    result = subprocess.run([sys.executable, str(example)], env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "devices' running statistics: 0\n" in result.stdout
    diffs = [float(line.rsplit(' ', 1)[1]) for line in result.stdout.splitlines()
             if 'largest one-step difference from the single-device run over 200 steps' in line]
    assert len(diffs) == 2 and max(diffs) < 1e-5, result.stdout


@pytest.mark.parametrize('mode', sorted(MODES))
def test_forward_mode_equals_single_device(mode, reference):
    (x, w, scale, bias), *_ = reference
    rng = np.random.default_rng(9)
    tangents = (w, rng.standard_normal(C).astype(np.float32),
                rng.standard_normal(C).astype(np.float32))

    def jvp(f):
        return jax.jit(lambda p, t: jax.jvp(lambda *a: f(*a)[0], p, t))((x, scale, bias), tangents)

    y, dy = jvp(MODES[mode])
    y_ref, dy_ref = jvp(lambda *a: _bn(*a, None))
    _close(y, y_ref, 2e-5)
    _close(dy, dy_ref, 2e-4)


SHARDS = {'shard_map': 4, 'pmap': 4, 'sharded_jit': 4, 'vmap': 64, 'pmap_of_vmap': 64}


@functools.lru_cache(maxsize=None)
def _sharded_moments(mapping, features):
    """``f(x, mask) -> state``: batch_norm's moments of the global batch, taken
    over ``SHARDS[mapping]`` shards. Built (and compiled) once per mapping,
    then called on every case."""
    devices = jax.devices()[:4]

    def bn(x, mask, axis_name):
        return normlib.batch_norm(x, normlib.init_batch_norm(features), training=True,
                                  momentum=0.0, mask=mask, axis_name=axis_name)[1]

    def split(a, *lead):
        return a.reshape(lead + (-1,) + a.shape[1:])

    if mapping == 'vmap':  # 64 shards in one program
        mapped = jax.jit(jax.vmap(functools.partial(bn, axis_name='s'), axis_name='s'))
        return lambda x, mask: jax.tree.map(lambda a: a[0], mapped(split(x, 64), split(mask, 64)))
    if mapping == 'pmap_of_vmap':  # 8 devices of 8 shards each: 64, across devices
        inner = jax.vmap(functools.partial(bn, axis_name=('i', 's')), axis_name='s')
        mapped = jax.pmap(inner, axis_name='i')
        return lambda x, mask: jax.tree.map(lambda a: a[0, 0],
                                            mapped(split(x, 8, 8), split(mask, 8, 8)))
    if mapping == 'pmap':
        mapped = jax.pmap(functools.partial(bn, axis_name='i'), axis_name='i', devices=devices)
        return lambda x, mask: jax.tree.map(lambda a: a[0], mapped(split(x, 4), split(mask, 4)))
    mesh = jax.make_mesh((4,), ('d',), axis_types=(AxisType.Auto,), devices=devices)
    if mapping == 'shard_map':
        return jax.jit(jax.shard_map(functools.partial(bn, axis_name='d'), mesh=mesh,
                                     in_specs=(P('d'), P('d')), out_specs=P()))
    sharded = NamedSharding(mesh, P('d'))
    compiled = jax.jit(functools.partial(bn, axis_name=None))
    return lambda x, mask: compiled(jax.device_put(x, sharded), jax.device_put(mask, sharded))


def _layouts(rng, z, shards):
    """The same values laid out over the shards as a sampler would (iid) and
    adversarially: sorted batches (each shard a slice of the range) and each
    shard's data offset by its own amount."""
    yield 'iid', z
    yield 'sorted', np.sort(z, axis=0)
    offsets = np.repeat(rng.standard_normal(shards) * 30, len(z) // shards)[:, None]
    yield 'shard offsets', z + offsets


@pytest.mark.parametrize('mapping', sorted(SHARDS))
def test_sharded_moments_as_exact_as_two_pass(mapping):
    shards = SHARDS[mapping]
    run = _sharded_moments(mapping, 8)
    rng = np.random.default_rng(10)
    per_shard = 256 // shards
    # Uneven padding, empty shards among them: valid examples per shard.
    counts = rng.integers(0, per_shard + 1, shards)
    counts[:3] = per_shard, 0, per_shard // 4 + 1
    uneven = (np.arange(per_shard)[None] < counts[:, None]).reshape(-1, 1)
    report = []
    for masked in (False, True):
        for offset in (0.0, 1.0, 1e2, 1e4, 1e6):
            for first in (0.0, 3.0, 10.1, 30.0):
                z = rng.standard_normal((256, 8))
                z[0] = first * np.where(rng.random(8) < 0.5, -1, 1)
                for layout, values in _layouts(rng, z, shards):
                    x = (values + offset).astype(np.float32)
                    mask = uneven if masked else np.ones((256, 1), bool)
                    state = run(x, np.broadcast_to(mask, x.shape))
                    mean, var = (np.asarray(v, np.float64) for v in (state.mean, state.var))
                    valid = x[mask[:, 0]].astype(np.float64)
                    ref_mean, ref_var = valid.mean(0), valid.var(0)
                    flax_mean, flax_var = flax_two_pass_moments(x[mask[:, 0]], (0,))
                    spread = np.maximum(np.abs(ref_mean), np.sqrt(ref_var))
                    for what, ours, flax in (
                            ('mean', np.abs(mean - ref_mean) / spread,
                             np.abs(flax_mean - ref_mean) / spread),
                            ('var', np.abs(var - ref_var) / ref_var,
                             np.abs(flax_var - ref_var) / ref_var)):
                        if ours.max() > max(1e-6, 2 * flax.max()):
                            report.append(f'{layout} masked={masked} offset {offset:g} first'
                                          f' {first}: {what} {ours.max():.2e} (flax two-pass'
                                          f' {flax.max():.2e})')
    assert not report, '\n'.join(report)


@pytest.mark.parametrize('mapping', ['pmap_of_vmap', 'shard_map'])
def test_all_shards_empty_gives_count_zero_and_keeps_the_state(mapping):
    run = _sharded_moments(mapping, 8)
    x = np.random.default_rng(13).standard_normal((256, 8)).astype(np.float32) + 1e6
    state = run(x, np.zeros(x.shape, bool))
    assert int(state.count) == 0
    np.testing.assert_array_equal(state.mean, 0.0)
    np.testing.assert_array_equal(state.var, 1.0)

MESHES = {  # (mesh, x's layout); jax.make_mesh's default axis types are Explicit
    'explicit_1d': lambda: (jax.make_mesh((8,), ('data',)), P('data')),
    'explicit_2d': lambda: (jax.make_mesh((4, 2), ('data', 'model')), P(('data', 'model'))),
    'explicit_2d_features_sharded': lambda: (jax.make_mesh((4, 2), ('data', 'model')),
                                             P('data', 'model')),
    'auto_2d': lambda: (_mesh((4, 2), ('data', 'model')), P(('data', 'model'))),
}  # Auto 1-D: MODES['sharded_jit']


@functools.lru_cache(maxsize=None)
def _calls():
    """``{name: f(x, mask, scale, bias) -> outputs}``: every batch-norm call a
    data-parallel model makes, with no axis_name."""
    state = normlib.init_batch_norm(C)
    kw = dict(training=True, momentum=0.9)

    def grad(x, mask, scale, bias):
        def loss(x, s, b):
            return jnp.sum(jnp.sin(normlib.batch_norm(x, state, s, b, **kw)[0]))
        return jax.grad(loss, (0, 1, 2))(x, scale, bias)

    return {
        'batch_norm': lambda x, m, s, b: normlib.batch_norm(x, state, s, b, **kw),
        'masked': lambda x, m, s, b: normlib.batch_norm(x, state, s, b, mask=m, **kw),
        'lp': lambda x, m, s, b: normlib.lp_batch_norm(x, state, s, b, p=3.0, mask=m, **kw),
        'l1': lambda x, m, s, b: normlib.l1_batch_norm(x, state, s, b, **kw),
        'renorm': lambda x, m, s, b: normlib.batch_renorm(x, state, s, b, r_max=1.5, d_max=0.5,
                                                          **kw),
        'grad': grad,
    }


@functools.lru_cache(maxsize=None)
def _one_device(name):
    """The call compiled once for one device, shared by every layout."""
    return jax.jit(_calls()[name])


@pytest.mark.parametrize('mesh_kind', sorted(MESHES))
def test_sharded_jit_on_explicit_and_auto_meshes_equals_one_device(mesh_kind):
    x, _, scale, bias = _data(11)
    mask = np.random.default_rng(12).random((N, 1)) < 0.6
    mesh, batch = MESHES[mesh_kind]()
    calls = _calls()
    full = mesh_kind in ('explicit_1d', 'explicit_2d_features_sharded')
    if not full:  # the core calls; every call on one 1-D and one 2-D layout
        calls = {name: calls[name] for name in ('batch_norm', 'masked', 'grad')}
    expected = {name: _one_device(name)(x, mask, scale, bias) for name in calls}
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, batch))
        ms = jax.device_put(mask, NamedSharding(mesh, P(batch[0])))
        for name, f in calls.items():
            got = jax.jit(f)(xs, ms, scale, bias)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected[name])):
                _close(a, b, 2e-5)
        if not full:
            return
        # Precise statistics and NNX's BatchNorm, as a model would call them there.
        second = jax.device_put(x[:16] * 2, NamedSharding(mesh, batch))
        precise = normlib.precise_batch_stats(lambda v: v, [xs, second], progress=False)
        from flax import nnx

        from normlib import nnx as normlib_nnx
        layer = normlib_nnx.BatchNorm(C, use_running_average=False, momentum=0.9,
                                      rngs=nnx.Rngs(0))
        y_nnx = nnx.jit(lambda m, v: m(v))(layer, xs)
        nnx_mean = layer.mean.get_value()
    whole = np.concatenate([x, x[:16] * 2]).astype(np.float64)
    _close(precise.mean, whole.mean(0), 1e-6)
    _close(precise.var, whole.var(0), 2e-5)
    y_plain, state_plain = normlib.batch_norm(x, normlib.init_batch_norm(C), training=True,
                                              momentum=0.9)  # NNX's scale 1 and bias 0
    _close(y_nnx, y_plain, 2e-5)
    _close(nnx_mean, state_plain.mean, 2e-6)


# Collectives per call: (forward, backward) counts at most, the backward
# counted as what differentiating adds. The Lp variants' spread is about the
# global mean, so it takes a third forward round (and its derivative a second
# backward one); at p = inf the derivative also counts the entries that
# attain the largest deviation. Ghost batch norm's chunks are per device, and
# only their running statistics are averaged, in one round.
ROUNDS = {'batch_norm': (2, 1), 'batch_norm masked': (2, 1), 'batch_renorm': (2, 1),
          'ghost batch norm': (1, 0), 'l1_batch_norm': (3, 2), 'lp_batch_norm p=3': (3, 2),
          'lp_batch_norm p=inf': (3, 3), 'layer_norm (sharded features)': (2, 1),
          'rms_norm (sharded features)': (1, 1)}


@pytest.mark.long
def test_bytes_sent_do_not_grow_with_the_device_count():
    # Read from the lowered programs at 8 and 1024 simulated devices (python -m
    # benchmarks.scale records 8, 64, 256 and 1024, with Flax's BatchNorm).
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env['PYTHONPATH'] = os.pathsep.join([str(root), env.get('PYTHONPATH', '')])
    counts = (8, 1024)
    procs = [subprocess.Popen([sys.executable, '-m', 'benchmarks._payload', str(n),
                               '--normlib-only'], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in counts]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        runs.append(json.loads(out))
    features = runs[0]['features']
    bound = 5 * features * 4 + 64  # float32 statistics and a few scalars
    for mapping, cases in runs[0]['cases'].items():
        if mapping.startswith('sharded jit'):
            continue
        for name, first in cases.items():
            if name.startswith('flax') or isinstance(first['forward'], str):
                continue
            for run in runs[1:]:
                other = run['cases'][mapping][name]
                if 'groups' in mapping and not mapping.startswith('pmap'):
                    # One slot per group of 8: proportional to the groups, not their size.
                    groups = run['devices'] // 8
                    assert other['forward'][1] == groups * first['forward'][1], (mapping, name)
                else:
                    assert other == first, (mapping, name, run['devices'])
            (fwd_n, fwd_bytes), both = first['forward'], first['forward+backward']
            assert fwd_bytes <= bound, (mapping, name, fwd_bytes)
            rounds = ROUNDS[name]
            assert fwd_n <= rounds[0], (mapping, name, fwd_n)
            if both is not None and rounds[1] is not None:
                assert both[1] - fwd_bytes <= bound, (mapping, name, both)
                assert both[0] - fwd_n <= rounds[1], (mapping, name, both)
