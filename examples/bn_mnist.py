"""Batch normalization on a sigmoid MLP: Figure 1 of Ioffe & Szegedy (2015).

Reproduces section 4.1 of S. Ioffe and C. Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift",
ICML 2015 (arXiv:1502.03167): a network with 3 fully connected hidden layers
of 100 sigmoid units, trained with cross-entropy, mini-batches of 60 and plain
SGD from a Gaussian random init, once as is and once with
`normlib.batch_norm` before each sigmoid.

Every `--eval-every` steps both nets are scored on held-out examples in
evaluation mode (the BN net uses its running statistics), and the 15th, 50th
and 85th percentiles of the input to one sigmoid of the last hidden layer are
taken over the held-out examples. The figure mirrors the paper's Figure 1:
(a) held-out accuracy of both nets, (b) and (c) the percentile bands without
and with batch normalization.

    python examples/bn_mnist.py                       # scikit-learn digits
    python examples/bn_mnist.py --data mnist --data-dir DIR --steps 1500

Writes `bn_mnist.png` and `metrics.json` to `--out` and prints a summary.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import _data
import normlib

HIDDEN = (100, 100, 100)
BATCH_SIZE = 60
DEFAULT_LR = 0.5
PERCENTILES = (15, 50, 85)
# The last-hidden-layer sigmoid whose input distribution is tracked.
TRACKED_UNIT = 0


def init_params(key, num_inputs, num_classes, batch_norm):
    """Gaussian init, N(0, 1/fan_in), shared by both nets for a given key.

    With batch norm the pre-activation bias is left out: BN's shift replaces
    it (section 3.2 of the paper).
    """
    sizes = (num_inputs, *HIDDEN, num_classes)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:]):
        w = jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in)
        layers.append({'w': w, 'b': jnp.zeros(fan_out)})
    hidden, out = layers[:-1], layers[-1]
    if batch_norm:
        hidden = [{'w': layer['w'], 'scale': jnp.ones(layer['w'].shape[1]),
                   'bias': jnp.zeros(layer['w'].shape[1])} for layer in hidden]
    return {'hidden': hidden, 'out': out}


def init_bn_states(batch_norm):
    """Running statistics for each hidden layer; empty for the plain net."""
    return tuple(normlib.init_batch_norm(n) for n in HIDDEN) if batch_norm else ()


def forward(params, bn_states, x, *, training):
    """Returns logits, the last hidden layer's sigmoid inputs, new BN states."""
    new_states = []
    h = x
    for i, layer in enumerate(params['hidden']):
        z = h @ layer['w']
        if bn_states:
            z, state = normlib.batch_norm(z, bn_states[i], layer['scale'],
                                          layer['bias'], training=training)
            new_states.append(state)
        else:
            z = z + layer['b']
        h = jax.nn.sigmoid(z)
    logits = h @ params['out']['w'] + params['out']['b']
    return logits, z, tuple(new_states)


def loss_fn(params, bn_states, x, y):
    logits, _, bn_states = forward(params, bn_states, x, training=True)
    loss = -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), y[:, None], axis=1))
    return loss, bn_states


@jax.jit
def train_chunk(params, bn_states, lr, x_train, y_train, batch_indices):
    """Runs one SGD step per row of `batch_indices` (steps, batch)."""
    def step(carry, idx):
        params, bn_states = carry
        (loss, bn_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, bn_states, x_train[idx], y_train[idx])
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return (params, bn_states), loss

    (params, bn_states), losses = jax.lax.scan(
        step, (params, bn_states), batch_indices)
    return params, bn_states, losses.mean()


@jax.jit
def evaluate(params, bn_states, x, y):
    """Held-out accuracy and percentiles of the tracked sigmoid's input."""
    logits, z, _ = forward(params, bn_states, x, training=False)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return accuracy, jnp.percentile(z[:, TRACKED_UNIT], jnp.array(PERCENTILES))


def train(data, *, batch_norm, lr, steps, eval_every, seed, progress=True):
    """Trains one net; returns its curves and final held-out accuracy.

    For a given seed both nets start from the same weights and see the same
    mini-batches.
    """
    num_classes = int(data.y_train.max()) + 1
    params = init_params(jax.random.key(seed), data.x_train.shape[1],
                         num_classes, batch_norm)
    bn_states = init_bn_states(batch_norm)
    schedule = _data.batches(seed, len(data.x_train), steps, BATCH_SIZE)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    lr = jnp.float32(lr)

    history = {'step': [], 'accuracy': [], 'train_loss': [],
               'sigmoid_input_percentiles': []}

    def record(step, loss):
        accuracy, percentiles = evaluate(params, bn_states, x_test, y_test)
        history['step'].append(step)
        history['accuracy'].append(float(accuracy))
        history['train_loss'].append(loss)
        history['sigmoid_input_percentiles'].append(
            [float(p) for p in percentiles])

    record(0, None)
    name = 'bn' if batch_norm else 'plain'
    with tqdm(total=steps, desc=f'{name} lr={float(lr):g}', unit='step',
              disable=not progress, leave=False) as bar:
        for start in range(0, steps, eval_every):
            chunk = schedule[start:start + eval_every]
            params, bn_states, loss = train_chunk(
                params, bn_states, lr, x_train, y_train, chunk)
            record(start + len(chunk), float(loss))
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{history['accuracy'][-1]:.3f}")
    return {'test_accuracy': history['accuracy'][-1],
            'percentiles': list(PERCENTILES), **history}


def plot(results, path, title):
    """Figure 1 of the paper: accuracy curves and percentile bands."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {'plain': 'tab:gray', 'bn': 'tab:blue'}
    labels = {'plain': 'Without BN', 'bn': 'With BN'}
    ax = axes[0]
    for name in ('plain', 'bn'):
        ax.plot(results[name]['step'], results[name]['accuracy'],
                color=colors[name], label=labels[name])
    ax.set(xlabel='training step', ylabel='held-out accuracy',
           title='(a) held-out accuracy')
    ax.grid(alpha=0.3)
    # Zoom on the second half of training, where the curves end a few
    # percent apart: at full scale the final gap is a couple of pixels.
    steps = np.asarray(results['bn']['step'])
    late = steps >= steps[-1] / 2
    if late.sum() >= 2:
        tail = np.concatenate([np.asarray(results[n]['accuracy'])[late] for n in ('plain', 'bn')])
        low = max(0.0, tail.min() - 0.01)
        inset = ax.inset_axes([0.42, 0.12, 0.55, 0.45])
        for name in ('plain', 'bn'):
            inset.plot(steps[late], np.asarray(results[name]['accuracy'])[late],
                       color=colors[name], label=labels[name])
        inset.set_ylim(low, min(1.0, tail.max() + 0.005))
        inset.set_title('second half, zoomed', fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
        inset.legend(loc='lower right', fontsize=7)
        ax.indicate_inset_zoom(inset, edgecolor='0.5')
    else:
        ax.legend(loc='lower right')

    lo = min(min(p[0] for p in r['sigmoid_input_percentiles'])
             for r in results.values())
    hi = max(max(p[2] for p in r['sigmoid_input_percentiles'])
             for r in results.values())
    pad = 0.05 * (hi - lo)
    for ax, name, letter in ((axes[1], 'plain', 'b'), (axes[2], 'bn', 'c')):
        steps = results[name]['step']
        p15, p50, p85 = np.array(results[name]['sigmoid_input_percentiles']).T
        ax.fill_between(steps, p15, p85, color=colors[name], alpha=0.25)
        ax.plot(steps, p50, '-', color=colors[name], label='median (50th)')
        ax.plot(steps, p15, '--', color=colors[name], label='15th and 85th percentiles')
        ax.plot(steps, p85, '--', color=colors[name])
        ax.set(xlabel='training step', ylim=(lo - pad, hi + pad),
               ylabel='sigmoid input',
               title=f'({letter}) {labels[name]}: 15/50/85th percentiles')
        ax.legend(loc='upper right', fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(results, num_rows=6):
    """A text table of held-out accuracy at a few steps."""
    steps = results['plain']['step']
    rows = sorted(set(np.linspace(0, len(steps) - 1, num_rows).round().astype(int)))
    lines = [f"{'step':>7}  {'plain acc':>9}  {'bn acc':>7}  "
             f"{'plain p15/p50/p85':>20}  {'bn p15/p50/p85':>20}"]
    for i in rows:
        pct = {name: '/'.join(f'{p:+.2f}' for p in
                              results[name]['sigmoid_input_percentiles'][i])
               for name in ('plain', 'bn')}
        lines.append(
            f"{steps[i]:>7}  {results['plain']['accuracy'][i]:>9.4f}  "
            f"{results['bn']['accuracy'][i]:>7.4f}  "
            f"{pct['plain']:>20}  {pct['bn']:>20}")
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _data.add_args(parser)
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and batch order (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=3000,
                        help='SGD steps per net (default: %(default)s)')
    parser.add_argument('--lr', type=float, default=DEFAULT_LR,
                        help='SGD learning rate (default: %(default)s)')
    parser.add_argument('--eval-every', type=int, default=50,
                        help='steps between held-out evaluations (default: %(default)s)')
    parser.add_argument('--out', type=Path, default=Path('out/bn_mnist'),
                        help='folder for bn_mnist.png and metrics.json (default: %(default)s)')
    parser.add_argument('--smoke', action='store_true',
                        help='a few steps only, to check that everything runs')
    args = parser.parse_args(argv)
    _data.check_args(parser, args)
    if args.smoke:
        args.steps, args.eval_every = 20, 10
    if args.steps < 1 or args.eval_every < 1:
        parser.error('--steps and --eval-every must be positive')
    return args


def main(argv=None):
    args = parse_args(argv)
    data = _data.load(args.data, args.data_dir)
    print('compiling, then training 2 nets (progress bars follow)...', flush=True)
    start = time.perf_counter()
    results = {
        name: train(data, batch_norm=name == 'bn', lr=args.lr, steps=args.steps,
                    eval_every=args.eval_every, seed=args.seed)
        for name in ('plain', 'bn')}
    wall_time = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f'{data.name}: 3x100 sigmoid MLP, SGD lr={args.lr:g}, '
             f'batch {BATCH_SIZE}, seed {args.seed}')
    plot(results, args.out / 'bn_mnist.png', title)
    config = {'data': data.name, 'steps': args.steps, 'lr': args.lr,
              'batch_size': BATCH_SIZE, 'eval_every': args.eval_every,
              'seed': args.seed, 'hidden': list(HIDDEN),
              'tracked_unit': TRACKED_UNIT,
              'num_train': len(data.x_train), 'num_test': len(data.x_test)}
    metrics = {'config': config, **results, 'wall_time_s': wall_time}
    (args.out / 'metrics.json').write_text(json.dumps(metrics, indent=1))

    print(title)
    print(summary(results))
    print(f"final held-out accuracy: plain {results['plain']['test_accuracy']:.4f}"
          f", bn {results['bn']['test_accuracy']:.4f} "
          f"({len(data.x_test)} examples); training took {wall_time:.1f} s")
    print(f'wrote {args.out / "bn_mnist.png"} and {args.out / "metrics.json"}')
    return metrics


if __name__ == '__main__':
    main()
