"""Batch norm smooths the loss landscape: Figure 4 of Santurkar et al. (2018).

Reproduces, at small scale, section 3 of S. Santurkar, D. Tsipras, A. Ilyas
and A. Madry, "How Does Batch Normalization Help Optimization?", NeurIPS
2018 (arXiv:1805.11604): along the gradient, the loss of a batch-normalized
network changes less, and its gradient changes less, than without
normalization; normalizing by an Lp spread instead of the standard
deviation (section 3.3) does the same.

Five ReLU MLPs (4 hidden layers of 128 units) start from the same weights
and see the same mini-batches, trained with plain SGD: `plain` (no
normalization), `bn` (`normlib.batch_norm`), and `l1`, `l2`, `linf`
(`normlib.lp_batch_norm` with p = 1, 2, inf, spread
``(mean |x - mean|^p)^(1/p)``; p = 2 is the standard deviation, so `l2`
is batch norm computed another way). Every `--measure-every` steps, at the
weights w and gradient g of the current mini-batch, each run moves along the
gradient by step sizes eta in `--etas` (multiples of the learning rate) and
measures, as the paper's Figure 4 does:

- loss variation: max - min over eta of the loss L(w - eta g);
- gradient predictiveness: the largest l2 change ||grad L(w - eta g) - g||
  (smaller is more predictive);
- effective beta-smoothness: the largest ||grad L(w - eta g) - g|| / ||eta g||.

Batch-normalized nets are measured in training mode on the same mini-batch.

    python examples/loss_landscape.py                 # scikit-learn digits
    python examples/loss_landscape.py --data mnist --data-dir DIR

Writes `loss_landscape.png` and `metrics.json` to `--out` and prints a table
of the medians over training and the final held-out accuracies.
"""

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import _data
import normlib

HIDDEN = (128, 128, 128, 128)
BATCH_SIZE = 64
DEFAULT_LR = 0.1
DEFAULT_ETAS = (0.5, 1.0, 2.0, 4.0, 8.0)
# name -> p of lp_batch_norm (None: batch_norm; absent: no normalization).
RUNS = {'plain': 'none', 'bn': 'bn', 'l1': 1.0, 'l2': 2.0, 'linf': math.inf}
MEASURES = ('loss_variation', 'gradient_predictiveness', 'beta_smoothness')


def init_params(key, num_inputs, num_classes, normalized):
    """He-normal init, the same weights for every run with a given key.

    Normalized nets drop the pre-activation bias (the normalization's
    shift replaces it) and get a scale and a bias per unit.
    """
    sizes = (num_inputs, *HIDDEN, num_classes)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = [{'w': jax.random.normal(k, (i, o)) * np.sqrt(2.0 / i), 'b': jnp.zeros(o)}
              for k, i, o in zip(keys, sizes[:-1], sizes[1:])]
    if normalized:
        layers[:-1] = [{'w': layer['w'], 'scale': jnp.ones(layer['w'].shape[1]),
                        'bias': jnp.zeros(layer['w'].shape[1])} for layer in layers[:-1]]
    return layers


def normalizer(kind):
    """``f(z, state, scale, bias, training) -> (z, state)`` for a run."""
    if kind == 'bn':
        return lambda z, s, a, b, training: normlib.batch_norm(z, s, a, b, training=training)
    return lambda z, s, a, b, training: normlib.lp_batch_norm(z, s, a, b, p=kind,
                                                              training=training)


def forward(kind, params, states, x, *, training):
    """Logits and the new normalization states."""
    new_states = []
    h = x
    for i, layer in enumerate(params[:-1]):
        z = h @ layer['w']
        if kind == 'none':
            z = z + layer['b']
        else:
            z, state = normalizer(kind)(z, states[i], layer['scale'], layer['bias'], training)
            new_states.append(state)
        h = jax.nn.relu(z)
    return h @ params[-1]['w'] + params[-1]['b'], tuple(new_states)


def loss_fn(kind, params, states, x, y):
    logits, states = forward(kind, params, states, x, training=True)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return loss, states


def _flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])


def landscape(kind, params, states, x, y, etas):
    """The three measures at ``params`` along the gradient of batch ``(x, y)``.

    Returns ``(loss, loss_min, loss_max, gradient_change_min,
    gradient_change_max, beta)``.
    """
    grad_fn = jax.value_and_grad(lambda p: loss_fn(kind, p, states, x, y)[0])
    loss, grads = grad_fn(params)
    g = _flat(grads)

    def moved(eta):
        loss_at, grads_at = grad_fn(jax.tree.map(lambda p, d: p - eta * d, params, grads))
        return loss_at, jnp.linalg.norm(_flat(grads_at) - g)

    losses, changes = jax.vmap(moved)(etas)
    beta = jnp.max(changes / (etas * jnp.linalg.norm(g)))
    return (loss, losses.min(), losses.max(), changes.min(), changes.max(), beta)


def run(kind, data, *, lr, steps, measure_every, etas, seed, progress=True, desc=''):
    """Trains one net; returns its landscape curves and held-out accuracy."""
    num_classes = int(data.y_train.max()) + 1
    params = init_params(jax.random.key(seed), data.x_train.shape[1], num_classes,
                         kind != 'none')
    states = () if kind == 'none' else tuple(normlib.init_batch_norm(n) for n in HIDDEN)
    schedule = _data.batches(seed, len(data.x_train), steps, BATCH_SIZE)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    etas = jnp.asarray(etas, jnp.float32) * lr

    @jax.jit
    def train_chunk(params, states, indices):
        def step(carry, idx):
            params, states = carry
            (loss, states), grads = jax.value_and_grad(
                lambda p: loss_fn(kind, p, states, x_train[idx], y_train[idx]),
                has_aux=True)(params)
            return (jax.tree.map(lambda p, g: p - lr * g, params, grads), states), loss
        (params, states), _ = jax.lax.scan(step, (params, states), indices)
        return params, states

    measure = jax.jit(lambda p, s, idx: landscape(kind, p, s, x_train[idx], y_train[idx], etas))

    @jax.jit
    def accuracy(params, states):
        logits, _ = forward(kind, params, states, jnp.asarray(data.x_test), training=False)
        return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data.y_test))

    curves = {k: [] for k in ('step', 'loss', 'loss_min', 'loss_max', 'gradient_change_min',
                              'gradient_change_max', 'beta_smoothness')}
    with tqdm(total=steps, desc=desc or kind, unit='step', disable=not progress,
              leave=False) as bar:
        for start in range(0, steps, measure_every):
            values = measure(params, states, schedule[start])
            for key, value in zip(list(curves)[1:], values):
                curves[key].append(float(value))
            curves['step'].append(start)
            chunk = schedule[start:start + measure_every]
            params, states = train_chunk(params, states, chunk)
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}")
    variation = np.subtract(curves['loss_max'], curves['loss_min'])
    curves['loss_variation'] = variation.tolist()
    summary = {
        'test_accuracy': float(accuracy(params, states)),
        'loss_variation': float(np.median(variation)),
        'gradient_predictiveness': float(np.median(curves['gradient_change_max'])),
        'beta_smoothness': float(np.median(curves['beta_smoothness'])),
    }
    return {**summary, 'curves': curves}


COLORS = {'plain': 'tab:gray', 'bn': 'tab:blue', 'l1': 'tab:orange', 'l2': 'tab:green',
          'linf': 'tab:red'}
LABELS = {'plain': 'no normalization', 'bn': 'batch norm', 'l1': 'L1 batch norm',
          'l2': 'L2 batch norm', 'linf': 'L-inf batch norm'}


def plot(results, path, title):
    """The paper's Figure 4: three panels over training, shaded ranges over eta."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, result in results.items():
        c = result['curves']
        color = COLORS[name]
        axes[0].fill_between(c['step'], c['loss_min'], c['loss_max'], color=color, alpha=0.3,
                             label=LABELS[name])
        axes[1].fill_between(c['step'], c['gradient_change_min'], c['gradient_change_max'],
                             color=color, alpha=0.3, label=LABELS[name])
        axes[2].plot(c['step'], c['beta_smoothness'], color=color, label=LABELS[name])
    axes[0].set(title='(a) loss landscape: loss along the gradient', ylabel='loss',
                yscale='log')
    axes[1].set(title='(b) gradient predictiveness', ylabel='l2 change of the gradient',
                yscale='log')
    axes[2].set(title='(c) effective beta-smoothness', ylabel='max gradient change / step',
                yscale='log')
    for ax in axes:
        ax.set_xlabel('training step')
        ax.grid(alpha=0.3, which='both')
    axes[0].legend(loc='upper right', fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results):
    lines = [f"{'run':>6}  {'accuracy':>8}  {'loss variation':>14}  "
             f"{'grad. change':>12}  {'beta':>8}"]
    for name, r in results.items():
        lines.append(f"{name:>6}  {r['test_accuracy']:>8.4f}  {r['loss_variation']:>14.4f}  "
                     f"{r['gradient_predictiveness']:>12.4f}  {r['beta_smoothness']:>8.3f}")
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _data.add_args(parser)
    parser.add_argument('--seed', type=int, default=0, help='initial weights and batch order')
    parser.add_argument('--steps', type=int, default=1000, help='SGD steps per run')
    parser.add_argument('--lr', type=float, default=DEFAULT_LR, help='SGD learning rate')
    parser.add_argument('--measure-every', type=int, default=20,
                        help='training steps between two landscape measurements')
    parser.add_argument('--etas', type=float, nargs='+', default=list(DEFAULT_ETAS),
                        help='step sizes along the gradient, in multiples of --lr')
    parser.add_argument('--out', type=Path, default=Path('out/loss_landscape'),
                        help='folder for loss_landscape.png and metrics.json')
    parser.add_argument('--smoke', action='store_true',
                        help='a few steps only, to check that everything runs')
    args = parser.parse_args(argv)
    _data.check_args(parser, args)
    if args.smoke:
        args.steps, args.measure_every = 20, 10
    if args.steps < 1 or args.measure_every < 1 or min(args.etas) <= 0:
        parser.error('--steps, --measure-every and --etas must be positive')
    return args


def main(argv=None):
    args = parse_args(argv)
    data = _data.load(args.data, args.data_dir)
    print('compiling, then training 5 nets (progress bars follow)...', flush=True)
    start = time.perf_counter()
    results = {}
    for i, (name, kind) in enumerate(RUNS.items()):
        results[name] = run(kind, data, lr=args.lr, steps=args.steps,
                            measure_every=args.measure_every, etas=args.etas, seed=args.seed,
                            desc=f'{name} ({i + 1}/{len(RUNS)})')
    wall_time = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f'{data.name}: 4x128 ReLU MLP, SGD lr={args.lr:g}, batch {BATCH_SIZE}, '
             f'seed {args.seed}; steps along the gradient of {args.etas} x lr')
    plot(results, args.out / 'loss_landscape.png', title)
    config = {'data': data.name, 'steps': args.steps, 'lr': args.lr,
              'measure_every': args.measure_every, 'etas': args.etas, 'seed': args.seed,
              'batch_size': BATCH_SIZE, 'hidden': list(HIDDEN)}
    metrics = {'config': config, **results, 'wall_time_s': wall_time}
    (args.out / 'metrics.json').write_text(json.dumps(metrics, indent=1))

    print(title)
    print('final held-out accuracy and medians over training of the three measures:')
    print(table(results))
    print(f'took {wall_time:.1f} s; wrote {args.out / "loss_landscape.png"} and '
          f'{args.out / "metrics.json"}')
    return metrics


if __name__ == '__main__':
    main()
