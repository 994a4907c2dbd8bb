"""Data-parallel training of a small CNN with batch norm on 8 devices.

Each device holds 1/8 of every batch; ``normlib.batch_norm(...,
axis_name='batch')`` merges the devices' statistics with one collective, so the
model trains exactly as it would on the global batch on one device. The script
trains with ``jax.shard_map`` (and ``jax.pmap``, for code that still uses it),
then checks that

* every device holds bit-identical running statistics, and
* every step matches a single-device step on the same global batch: each step
  starts from the single-device run's train state, so the comparison sees what
  the sharded statistics change in one step, not rounding carried through
  training. The end-of-training difference is printed too.

The activation is GELU, not ReLU: ReLU's derivative jumps at 0, so an entry a
few ulps from 0 may fall on either side under another split of the sums, and
one such entry moves a step's gradients by far more than rounding. With ReLU,
one of the 19.7 million entries this run feeds it (at -6.5e-7 on one device,
+1.2e-6 on eight) moved one step's gradients by 8.4e-4, and one ulp in the
initial parameters moved the parameters after 200 steps by ~1e-2; with GELU
that ulp moves them by 7e-7.

On a CPU it simulates 8 devices (``--xla_force_host_platform_device_count``).

    python examples/data_parallel.py             # both mappings
    python examples/data_parallel.py --mode pmap --steps 300
"""

import argparse
import os
import sys

if 'jax' not in sys.modules:  # must be set before JAX starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_force_host_platform_device_count=8').strip()

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import normlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402

DEVICES = 8
WIDTHS = (16, 32)


def init(key):
    """He-initialized conv kernels (HWIO), a dense head, and a BN state per conv."""
    params, states, fan_in = {}, {}, 1
    for i, width in enumerate(WIDTHS):
        key, sub = jax.random.split(key)
        params[f'conv{i}'] = (jax.random.normal(sub, (3, 3, fan_in, width))
                              * np.sqrt(2 / (9 * fan_in)))
        params[f'bn{i}'] = {'scale': jnp.ones(width), 'bias': jnp.zeros(width)}
        states[f'bn{i}'] = normlib.init_batch_norm(width)
        fan_in = width
    key, sub = jax.random.split(key)
    params['head'] = {'w': jax.random.normal(sub, (fan_in, 10)) / np.sqrt(fan_in),
                      'b': jnp.zeros(10)}
    return params, states


def apply(params, states, images, *, training, axis_name=None):
    """Logits and new BN states for NHWC ``images``."""
    h, new_states = images, {}
    for i in range(len(WIDTHS)):
        h = jax.lax.conv_general_dilated(h, params[f'conv{i}'], (1 + i, 1 + i), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        bn = params[f'bn{i}']
        h, new_states[f'bn{i}'] = normlib.batch_norm(
            h, states[f'bn{i}'], bn['scale'], bn['bias'], training=training, momentum=0.9,
            axis_name=axis_name)
        h = jax.nn.gelu(h)
    h = h.mean(axis=(1, 2))
    return h @ params['head']['w'] + params['head']['b'], new_states


def train_step(params, states, opt_state, images, labels, *, optimizer, global_batch,
               axis_name=None, sum_grads=False):
    """One SGD step on the mean loss over the global batch.

    Inside shard_map the gradients of replicated parameters arrive already
    summed over devices; pmap needs ``sum_grads`` (an explicit psum).
    """
    def loss(params):
        logits, new_states = apply(params, states, images, training=True, axis_name=axis_name)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce) / global_batch, new_states

    grads, new_states = jax.grad(loss, has_aux=True)(params)
    if sum_grads:
        grads = jax.lax.psum(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_states, opt_state


def make_step(mode, optimizer, global_batch):
    """The jitted step for ``mode`` and a function placing the train state for it."""
    step = functools.partial(train_step, optimizer=optimizer, global_batch=global_batch)
    if mode == 'single':
        return jax.jit(step), lambda tree: tree
    if mode == 'shard_map':
        mesh = jax.make_mesh((DEVICES,), ('batch',), axis_types=(AxisType.Auto,))
        sharded = jax.jit(jax.shard_map(functools.partial(step, axis_name='batch'), mesh=mesh,
                                        in_specs=(P(), P(), P(), P('batch'), P('batch')),
                                        out_specs=(P(), P(), P())))
        data, replicated = NamedSharding(mesh, P('batch')), NamedSharding(mesh, P())
        return (lambda p, s, o, x, y: sharded(p, s, o, jax.device_put(x, data),
                                              jax.device_put(y, data)),
                lambda tree: jax.device_put(tree, replicated))
    if mode == 'pmap':
        mapped = jax.pmap(functools.partial(step, axis_name='batch', sum_grads=True),
                          axis_name='batch')

        def split(a):
            return a.reshape((DEVICES, -1) + a.shape[1:])

        # One copy of the train state per device, kept there between steps.
        copy = jax.pmap(lambda tree, _: tree, in_axes=(None, 0))
        return (lambda p, s, o, x, y: mapped(p, s, o, split(x), split(y)),
                lambda tree: copy(tree, np.zeros(DEVICES)))
    raise ValueError(f'unknown mode {mode!r}')


def batches(data, steps, batch, seed):
    """The seeded run's ``steps`` global batches of NHWC images and labels."""
    images = data.x_train.reshape((-1,) + data.image_shape + (1,))
    order = np.random.default_rng(seed).permutation(np.arange(steps * batch) % len(images))
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        yield images[idx], data.y_train[idx]


def train(mode, data, steps, batch, lr, seed, record=False):
    """The ``mode`` run's final ``(params, states)``; with ``record``, also the
    train state ``(params, states, opt_state)`` before each step and after the last."""
    params, states = init(jax.random.key(seed))
    optimizer = optax.sgd(lr, momentum=0.9)
    step, place = make_step(mode, optimizer, batch)
    train_state = place((params, states, optimizer.init(params)))
    trajectory = [train_state]
    for x, y in tqdm(batches(data, steps, batch, seed), total=steps, desc=mode, leave=False):
        train_state = step(*train_state, x, y)
        # One step in flight at a time: XLA:CPU's virtual devices can
        # deadlock in a collective when many queued steps share its threads.
        jax.block_until_ready(train_state)
        if record:
            trajectory.append(train_state)
    params, states, _ = train_state
    return ((params, states), trajectory) if record else (params, states)


@jax.jit
def largest_difference(got, want):
    """Largest ``|got - want|`` over the leaves; ``got``'s leaves may carry a
    leading device axis, each device's copy is compared."""
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a - b)) for a, b in
                                          zip(jax.tree.leaves(got), jax.tree.leaves(want))])


def step_difference(mode, data, trajectory, batch, lr, seed):
    """Largest difference between a ``mode`` step and a single-device step, both
    taken from the single-device run's train state, over that run's steps."""
    optimizer = optax.sgd(lr, momentum=0.9)
    step, place = make_step(mode, optimizer, batch)
    steps, worst = len(trajectory) - 1, 0.0
    for i, (x, y) in enumerate(tqdm(batches(data, steps, batch, seed), total=steps,
                                    desc=f'{mode} (per step)', leave=False)):
        got = step(*place(trajectory[i]), x, y)
        jax.block_until_ready(got)  # one step in flight, as in train()
        worst = max(worst, float(largest_difference(got, trajectory[i + 1])))
    return worst


def per_device_agreement(states):
    """Largest difference between devices' copies of the running statistics."""
    return max(float(jnp.max(jnp.abs(leaf - leaf[0]))) for leaf in jax.tree.leaves(states))


def accuracy(params, states, data):
    images = data.x_test.reshape((-1,) + data.image_shape + (1,))
    logits, _ = apply(params, states, images, training=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == data.y_test))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mode', choices=['shard_map', 'pmap', 'both'], default='both',
                        help='how the batch is split over the devices (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=200,
                        help='training steps (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=64, help='global batch, split over 8 devices')
    parser.add_argument('--lr', type=float, default=0.05,
                        help='SGD learning rate (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and data (default: %(default)s)')
    parser.add_argument('--smoke', action='store_true', help='a few steps, for tests')
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 3
    if len(jax.devices()) < DEVICES:
        parser.error(f'needs {DEVICES} devices, found {len(jax.devices())}')
    data = _data.load_digits()
    print('compiling, then training single-device and data-parallel (progress bars follow)...',
          flush=True)

    reference, trajectory = train('single', data, args.steps, args.batch, args.lr, args.seed,
                                  record=True)
    results = {'single': accuracy(*reference, data)}
    modes = ['shard_map', 'pmap'] if args.mode == 'both' else [args.mode]
    worst = 0.0
    for mode in modes:
        step_diff = step_difference(mode, data, trajectory, args.batch, args.lr, args.seed)
        worst = max(worst, step_diff)
        print(f'{mode}: largest one-step difference from the single-device run over '
              f'{args.steps} steps: {step_diff:.2e}')
        params, states = train(mode, data, args.steps, args.batch, args.lr, args.seed)
        if mode == 'pmap':
            spread = per_device_agreement(states)
            print(f'pmap: largest difference between devices\' running statistics: {spread:g}')
            if spread != 0:
                raise SystemExit('running statistics differ across devices')
            params, states = jax.tree.map(lambda a: a[0], (params, states))
        diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves((params, states)), jax.tree.leaves(reference)))
        results[mode] = accuracy(params, states, data)
        print(f'{mode}: largest difference from the single-device run after {args.steps} steps: '
              f'{diff:.2e} (rounding, amplified by training)')
    print('\nheld-out accuracy (evaluation mode, running statistics)')
    for mode, acc in results.items():
        print(f'  {mode:<10} {acc:.4f}')
    if worst > 1e-5:
        raise SystemExit(f'a data-parallel step differs from the single-device step: {worst:.2e}')
    return results


if __name__ == '__main__':
    main()
