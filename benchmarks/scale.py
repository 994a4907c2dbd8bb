"""Cross-device batch norm at scale: ``python -m benchmarks.scale [--smoke] [--out DIR]``.

1. What one synced batch norm sends, read from the lowered programs at 8,
   64, 256 and 1024 simulated CPU devices (:mod:`benchmarks._payload`, one
   process per device count), beside flax.linen's BatchNorm and, by formula,
   PyTorch's SyncBatchNorm and normlib 0.2's gather.
2. The time of a synced training step on 8 simulated devices: normlib
   against flax.linen's BatchNorm with ``axis_name`` (default and two-pass),
   interleaved in one process.

Writes ``scale.json`` and ``scale.png`` to ``--out`` (default: this
package's folder; ``--smoke``: ``out/benchmarks-smoke``); ``python -m
benchmarks`` puts them into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
DEVICES = (8, 64, 256, 1024)
STEP_DEVICES = 8
FLOAT = 4


def _child_env(devices=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    if devices:
        env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = os.pathsep.join([str(HERE.parent), env.get('PYTHONPATH', '')])
    return env


def payloads(devices=DEVICES) -> list[dict]:
    """:mod:`benchmarks._payload` at each device count, in parallel processes."""
    procs = [subprocess.Popen([sys.executable, '-m', 'benchmarks._payload', str(n)],
                              cwd=HERE.parent, env=_child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in devices]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(err[-3000:])
        runs.append(json.loads(out))
    return runs


def formulas(devices: int, features: int) -> dict:
    """Bytes each device puts into the forward collectives, by formula."""
    return {
        # SyncBatchNorm all-gathers every device's (mean, invstd, count).
        'torch SyncBatchNorm (all-gather)': devices * (2 * features + 1) * FLOAT,
        # normlib 0.2: one psum of a (devices, 4, features) buffer.
        'normlib 0.2 (gather)': devices * 4 * features * FLOAT,
    }


def step_times(rounds: int, shape: tuple[int, ...]) -> dict:
    """Median ms of a synced training step (forward, backward) per BatchNorm,
    on ``STEP_DEVICES`` simulated devices; run in this process's child."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import normlib.linen
    from benchmarks import _timing

    mesh = jax.make_mesh((STEP_DEVICES,), ('batch',))
    features = shape[-1]
    rng = np.random.default_rng(0)
    global_shape = (shape[0] * STEP_DEVICES,) + shape[1:]
    x = (rng.standard_normal(global_shape) * 2 + 3).astype(np.float32)
    w = rng.standard_normal(global_shape).astype(np.float32)
    # Each library synced over the devices, and each device on its own (no
    # axis_name): the difference is what synchronizing costs.
    modules = {}
    for synced, suffix in ((True, ''), (False, ', per device')):
        axis_name = 'batch' if synced else None
        modules.update({
            'normlib' + suffix: normlib.linen.BatchNorm(use_running_average=False,
                                                        axis_name=axis_name),
            'flax' + suffix: linen.BatchNorm(use_running_average=False, axis_name=axis_name),
            'flax two-pass' + suffix: linen.BatchNorm(use_running_average=False,
                                                      axis_name=axis_name,
                                                      use_fast_variance=False),
        })
    sharding = NamedSharding(mesh, P('batch'))
    xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)
    runners, results = {}, {}
    for name, module in modules.items():
        variables = module.init(jax.random.key(0), x[:2])
        synced = module.axis_name is not None

        def step(params, stats, x, w, module=module):
            def loss(params):
                y, new = module.apply({'params': params, 'batch_stats': stats}, x,
                                      mutable=['batch_stats'])
                return jnp.sum(w * y), new['batch_stats']
            grads, new_stats = jax.grad(loss, has_aux=True)(params)
            if not synced:  # statistics differ between devices: one row each
                new_stats = jax.tree.map(lambda v: v[None], new_stats)
            return jax.lax.psum(grads, 'batch'), new_stats

        mapped = jax.jit(jax.shard_map(step, mesh=mesh,
                                       in_specs=(P(), P(), P('batch'), P('batch')),
                                       out_specs=(P(), P() if synced else P('batch'))))
        params, stats = variables['params'], variables['batch_stats']
        runners[name] = functools.partial(mapped, params, stats, xs, ws)
        results[name] = jax.tree.map(np.asarray, runners[name]())
    times = _timing.interleaved(runners, rounds)
    # The steps agree (Flax's default variance is exact enough on this data).
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(results['normlib']), jax.tree.leaves(results['flax two-pass'])))
    return {'devices': STEP_DEVICES, 'shape_per_device': list(shape), 'rounds': rounds,
            'ms': {k: v * 1e3 for k, v in times.items()}, 'gap_vs_flax_two_pass': gap,
            'features': features}


def chart(scale: dict, path: str) -> None:
    """Forward bytes per device per batch-norm call against the device count."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    devices = [r['devices'] for r in scale['payload']]
    features = scale['payload'][0]['features']
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {
        'normlib (exact)': [r['cases']['shard_map 1-D']['batch_norm']['forward'][1]
                            for r in scale['payload']],
        'normlib masked (exact)': [r['cases']['shard_map 1-D']['batch_norm masked']['forward'][1]
                                   for r in scale['payload']],
        'flax.linen BatchNorm (inexact with unequal counts)': [
            r['cases']['shard_map 1-D']['flax.linen BatchNorm (default)']['forward'][1]
            for r in scale['payload']],
    }
    for name in formulas(8, features):
        lines[name + ', formula'] = [formulas(n, features)[name] for n in devices]
    styles = ['-o', '-s', '--^', ':x', ':d']
    for (name, values), style in zip(lines.items(), styles):
        ax.plot(devices, [v / 1024 for v in values], style, label=name)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(devices, [str(d) for d in devices])
    ax.set_xlabel('devices')
    ax.set_ylabel('KiB sent per device, one forward call')
    smoke = 'SMOKE RUN (not measurements): ' if scale.get('smoke') else ''
    ax.set_title(f'{smoke}Synced batch norm over {features} channels, forward')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(smoke: bool, rounds: int) -> dict:
    from tqdm import tqdm
    steps = tqdm(total=2, desc='scale benchmark', unit='part', file=sys.stdout)
    payload = payloads((8, 64) if smoke else DEVICES)
    steps.update()
    shape = (8, 4, 4, 32) if smoke else (32, 14, 14, 64)
    child = subprocess.run(
        [sys.executable, '-c', 'import json, sys; from benchmarks import scale;'
         f' print(json.dumps(scale.step_times({rounds}, {shape!r})))'],
        cwd=HERE.parent, env=_child_env(STEP_DEVICES), capture_output=True, text=True,
        timeout=1800)
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    steps.update()
    steps.close()
    return {'smoke': smoke, 'payload': payload, 'step': json.loads(child.stdout.splitlines()[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.scale',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true',
                        help='8 and 64 devices, a small step, two rounds: seconds')
    parser.add_argument('--out', type=pathlib.Path, default=None,
                        help="folder for scale.json and scale.png (default: this package's"
                             ' folder; with --smoke, out/benchmarks-smoke)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds')
    args = parser.parse_args(argv)
    out = args.out or (pathlib.Path('out/benchmarks-smoke') if args.smoke else HERE)
    out.mkdir(parents=True, exist_ok=True)
    scale = run(args.smoke, args.rounds or (2 if args.smoke else 21))
    (out / 'scale.json').write_text(json.dumps(scale, indent=1))
    chart(scale, str(out / 'scale.png'))
    ms = scale['step']['ms']
    print('step (ms): ' + ', '.join(f'{k} {v:.2f}' for k, v in ms.items()))
    print(f'normlib / flax: {ms["normlib"] / ms["flax"]:.2f}x,'
          f' normlib / flax two-pass: {ms["normlib"] / ms["flax two-pass"]:.2f}x')
    print(f'wrote {out / "scale.json"} and {out / "scale.png"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
