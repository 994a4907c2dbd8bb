"""Normalization in recurrent nets: the LN-LSTM and the recurrent-BN LSTM.

Compares, at small scale, two ways of normalizing an LSTM:

- J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", 2016
  (arXiv:1607.06450), eqs. 20-22: the input-to-hidden and hidden-to-hidden
  gate pre-activations are normalized apart with `normlib.layer_norm`, each
  with its own gain (init 1) and bias, and so is the cell before its tanh:
  ``h_t = sigmoid(o) * tanh(LN(c_t))``.
- T. Cooijmans, N. Ballas, C. Laurent, C. Gulcehre and A. Courville,
  "Recurrent Batch Normalization", ICLR 2017 (arXiv:1603.09025): the same
  three places use `normlib.batch_norm`, with statistics kept separately for
  each time step (one `normlib.BatchNormState` per step, stacked along time)
  and the gains and biases shared across time; gains start at 0.1 as the
  paper recommends, and the two gate normalizations have no bias of their own
  (the LSTM's bias b is the shift). Evaluation uses each step's running
  statistics, with momentum `--bn-momentum` (default 0.9, PyTorch's default;
  normlib's 0.99 averages over about 100 steps, which lags a net that trains
  in a few hundred). As a diagnostic the BN net is also scored with the
  held-out set's own per-step batch statistics (`accuracy_batch_stats`).

An LSTM reads scikit-learn's 8x8 digits row by row (8 steps of 8 pixels;
`--sequence pixels` reads them pixel by pixel, 64 steps of 1, and
`--permute` shuffles the pixel order with one fixed permutation, as in the
permuted MNIST of Cooijmans et al.) and classifies from its last hidden state. The three
nets (`none`, a plain LSTM; `layer_norm`; `batch_norm`) start from the same
weights, see the same mini-batches and are trained with Adam. Every
`--eval-every` steps they are scored on the held-out examples in evaluation
mode.

    python examples/ln_rnn.py                         # rows of the digits
    python examples/ln_rnn.py --sequence pixels       # 64 steps, about 2 minutes
    python examples/ln_rnn.py --sequence pixels --permute

Writes `ln_rnn.png` (training loss and held-out accuracy against steps) and
`metrics.json` to `--out` and prints a summary table.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import _data
import normlib

KINDS = ('none', 'layer_norm', 'batch_norm')
BATCH_SIZE = 64
DEFAULT_HIDDEN = 128
DEFAULT_LR = 1e-3
# Cooijmans et al., section 4: gains of 0.1 keep the tanh and sigmoid units
# out of saturation at the start and the gradient flowing through time.
BN_GAIN_INIT = 0.1
# PyTorch's default (its momentum=0.1): running statistics averaged over about
# 10 steps. normlib's default 0.99 (about 100 steps) lags a net that trains in
# a few hundred steps; `--bn-momentum 0.99` shows by how much.
DEFAULT_BN_MOMENTUM = 0.9
LN_EPSILON = 1e-5
PERMUTATION_SEED = 1234  # one fixed pixel order for --permute, whatever --seed


def sequences(x, image_shape, mode, permute):
    """Images (n, h*w) -> sequences (n, steps, inputs): rows or pixels."""
    if permute:
        x = x[:, np.random.default_rng(PERMUTATION_SEED).permutation(x.shape[1])]
    height, width = image_shape
    if mode == 'rows':
        return x.reshape(len(x), height, width)
    return x.reshape(len(x), height * width, 1)


def init_params(key, num_inputs, hidden, num_classes, kind):
    """The same W_x, W_h and readout for every kind, for a given key.

    Gates are ordered (input, forget, output, candidate); W_h is orthogonal,
    W_x and the readout are N(0, 1/fan_in), and the forget gate's bias starts
    at 1 (in every net, so that they differ only in their normalization).
    """
    k_x, k_h, k_out = jax.random.split(key, 3)
    gates = 4 * hidden
    w_x = jax.random.normal(k_x, (num_inputs, gates)) / np.sqrt(num_inputs)
    w_h = jnp.concatenate([jax.nn.initializers.orthogonal()(k, (hidden, hidden))
                           for k in jax.random.split(k_h, 4)], axis=1)
    b = jnp.zeros(gates).at[hidden:2 * hidden].set(1.0)
    params = {'w_x': w_x, 'w_h': w_h,
              'w_out': jax.random.normal(k_out, (hidden, num_classes)) / np.sqrt(hidden),
              'b_out': jnp.zeros(num_classes)}
    if kind == 'none':
        params['b'] = b
    elif kind == 'layer_norm':
        # The bias of the input term's LN carries the LSTM's bias b.
        params.update(ln_x_scale=jnp.ones(gates), ln_x_bias=b,
                      ln_h_scale=jnp.ones(gates), ln_h_bias=jnp.zeros(gates),
                      ln_c_scale=jnp.ones(hidden), ln_c_bias=jnp.zeros(hidden))
    elif kind == 'batch_norm':
        params.update(b=b, bn_x_scale=jnp.full(gates, BN_GAIN_INIT),
                      bn_h_scale=jnp.full(gates, BN_GAIN_INIT),
                      bn_c_scale=jnp.full(hidden, BN_GAIN_INIT), bn_c_bias=jnp.zeros(hidden))
    else:
        raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')
    return params


def init_bn_states(kind, num_steps, hidden):
    """Per-time-step running statistics, stacked along a leading time axis.

    Three normalizations per step: W_x x_t and W_h h_{t-1} (4 * hidden
    features each) and c_t (hidden). Empty for the other kinds.
    """
    if kind != 'batch_norm':
        return ()

    def stacked(n):
        return jax.tree.map(lambda *s: jnp.stack(s),
                            *[normlib.init_batch_norm(n) for _ in range(num_steps)])

    return {'x': stacked(4 * hidden), 'h': stacked(4 * hidden), 'c': stacked(hidden)}


def _lstm_update(gates, c):
    i, f, o, g = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o)


def ln_lstm_step(params, x_t, h, c):
    """One step of the LN-LSTM (Ba et al., eqs. 20-22): returns (h_t, c_t)."""
    gates = (normlib.layer_norm(x_t @ params['w_x'], params['ln_x_scale'], params['ln_x_bias'],
                                epsilon=LN_EPSILON)
             + normlib.layer_norm(h @ params['w_h'], params['ln_h_scale'], params['ln_h_bias'],
                                  epsilon=LN_EPSILON))
    c, o = _lstm_update(gates, c)
    h = o * jnp.tanh(normlib.layer_norm(c, params['ln_c_scale'], params['ln_c_bias'],
                                        epsilon=LN_EPSILON))
    return h, c


def lstm_step(kind, params, x_t, h, c, states_t, *, training, momentum=DEFAULT_BN_MOMENTUM):
    """One step of any of the three LSTMs: returns (h_t, c_t, new states_t)."""
    if kind == 'none':
        c, o = _lstm_update(x_t @ params['w_x'] + h @ params['w_h'] + params['b'], c)
        return o * jnp.tanh(c), c, states_t
    if kind == 'layer_norm':
        return (*ln_lstm_step(params, x_t, h, c), states_t)

    def bn(z, name, bias=None):
        return normlib.batch_norm(z, states_t[name], params[f'bn_{name}_scale'], bias,
                                  training=training, momentum=momentum)

    # Cooijmans et al., eqs. 6-8: the gate terms are normalized without a
    # shift of their own, the LSTM's bias b follows.
    zx, sx = bn(x_t @ params['w_x'], 'x')
    zh, sh = bn(h @ params['w_h'], 'h')
    c, o = _lstm_update(zx + zh + params['b'], c)
    zc, sc = bn(c, 'c', params['bn_c_bias'])
    return o * jnp.tanh(zc), c, {'x': sx, 'h': sh, 'c': sc}


def forward(kind, params, bn_states, x, *, training, momentum=DEFAULT_BN_MOMENTUM):
    """Runs the LSTM over x (batch, steps, inputs) with `jax.lax.scan`.

    Returns the logits from the last hidden state and the new per-step BN
    states (the scan carries (h, c) and takes each step's states as xs).
    """
    batch = x.shape[0]
    hidden = params['w_h'].shape[0]
    zeros = jnp.zeros((batch, hidden), x.dtype)

    def step(carry, inputs):
        h, c = carry
        x_t, states_t = inputs
        h, c, states_t = lstm_step(kind, params, x_t, h, c, states_t, training=training,
                                   momentum=momentum)
        return (h, c), states_t

    (h, _), new_states = jax.lax.scan(step, (zeros, zeros),
                                      (jnp.swapaxes(x, 0, 1), bn_states))
    return h @ params['w_out'] + params['b_out'], new_states


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def train(kind, data, *, hidden, lr, steps, eval_every, seed, bn_momentum=DEFAULT_BN_MOMENTUM,
          progress=True, desc=''):
    """Trains one net; returns its curves and final held-out accuracy.

    For a given seed every kind starts from the same W_x, W_h and readout and
    sees the same mini-batches. `data` holds sequences (n, steps, inputs).
    """
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data[:4])
    num_classes = int(data.y_train.max()) + 1
    params = init_params(jax.random.key(seed), x_train.shape[2], hidden, num_classes, kind)
    bn_states = init_bn_states(kind, x_train.shape[1], hidden)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    schedule = _data.batches(seed, len(x_train), steps, BATCH_SIZE)

    def loss_fn(params, bn_states, x, y):
        logits, bn_states = forward(kind, params, bn_states, x, training=True,
                                    momentum=bn_momentum)
        return cross_entropy(logits, y), bn_states

    @jax.jit
    def train_chunk(params, opt_state, bn_states, indices):
        def step(carry, idx):
            params, opt_state, bn_states = carry
            (loss, bn_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, bn_states, x_train[idx], y_train[idx])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, bn_states), loss

        carry, losses = jax.lax.scan(step, (params, opt_state, bn_states), indices)
        return (*carry, losses.mean())

    @jax.jit
    def evaluate(params, bn_states):
        logits, _ = forward(kind, params, bn_states, x_test, training=False)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
        # A diagnostic for the BN net: the same examples normalized with their
        # own per-step batch statistics (training mode, new state discarded).
        logits_batch, _ = forward(kind, params, bn_states, x_test, training=True)
        return (accuracy, cross_entropy(logits, y_test),
                jnp.mean(jnp.argmax(logits_batch, -1) == y_test))

    history = {'step': [], 'accuracy': [], 'test_loss': [], 'train_loss_step': [],
               'train_loss': []}
    if kind == 'batch_norm':
        history['accuracy_batch_stats'] = []

    def record(step):
        accuracy, test_loss, accuracy_batch = evaluate(params, bn_states)
        history['step'].append(step)
        history['accuracy'].append(float(accuracy))
        history['test_loss'].append(float(test_loss))
        if kind == 'batch_norm':
            history['accuracy_batch_stats'].append(float(accuracy_batch))

    record(0)
    with tqdm(total=steps, desc=desc or kind, unit='step', disable=not progress,
              leave=False) as bar:
        for start in range(0, steps, eval_every):
            chunk = schedule[start:start + eval_every]
            params, opt_state, bn_states, loss = train_chunk(params, opt_state, bn_states, chunk)
            # The mean training loss (training mode) over the chunk just run.
            history['train_loss_step'].append(start + len(chunk))
            history['train_loss'].append(float(loss))
            record(start + len(chunk))
            bar.update(len(chunk))
            bar.set_postfix(loss=f'{float(loss):.3f}', acc=f"{history['accuracy'][-1]:.3f}")
    return {'test_accuracy': history['accuracy'][-1], **history}


def steps_to(result, target):
    """The first evaluation step whose held-out accuracy reaches `target`."""
    return next((s for s, a in zip(result['step'], result['accuracy']) if a >= target), None)


COLORS = {'none': 'tab:gray', 'layer_norm': 'tab:orange', 'batch_norm': 'tab:blue'}
LABELS = {'none': 'LSTM', 'layer_norm': 'LN-LSTM (Ba et al.)',
          'batch_norm': 'BN-LSTM, per-step statistics (Cooijmans et al.)'}


def plot(results, path, title):
    """(a) training loss and (b) held-out accuracy against steps."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        axes[0].plot(r['train_loss_step'], r['train_loss'], color=COLORS[name],
                     label=LABELS[name])
        axes[1].plot(r['step'], r['accuracy'], color=COLORS[name], label=LABELS[name])
    bn = results.get('batch_norm')
    if bn is not None:
        axes[1].plot(bn['step'], bn['accuracy_batch_stats'], ':', color=COLORS['batch_norm'],
                     label='BN-LSTM with the held-out batch statistics (diagnostic)')
    axes[0].set(title='(a) training loss (mean over each interval)', ylabel='cross-entropy',
                yscale='log')
    axes[1].set(title='(b) held-out accuracy (evaluation mode)', ylabel='accuracy',
                ylim=(0, 1))
    for ax in axes:
        ax.set_xlabel('training step')
        ax.grid(alpha=0.3, which='both')
    axes[0].legend(loc='upper right', fontsize=8)
    # Zoom on the second half of training, where the curves end a percent or
    # two apart.
    steps = np.asarray(next(iter(results.values()))['step'])
    late = steps >= steps[-1] / 2
    if late.sum() >= 2:
        tail = np.concatenate([np.asarray(r['accuracy'])[late] for r in results.values()])
        inset = axes[1].inset_axes([0.4, 0.37, 0.57, 0.38])
        for name, r in results.items():
            inset.plot(steps[late], np.asarray(r['accuracy'])[late], color=COLORS[name])
        inset.set_ylim(max(0.0, tail.min() - 0.01), min(1.0, tail.max() + 0.005))
        inset.set_title('second half, zoomed', fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
        axes[1].indicate_inset_zoom(inset, edgecolor='0.5')
    axes[1].legend(loc='lower right', fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(results, num_rows=6):
    """A text table of training loss and held-out accuracy at a few steps."""
    steps = results['none']['train_loss_step']
    rows = sorted(set(np.linspace(0, len(steps) - 1, num_rows).round().astype(int)))
    header = f"{'step':>6}" + ''.join(f'  {name + " loss":>15}  {"acc":>6}' for name in results)
    lines = [header]
    for i in rows:
        line = f'{steps[i]:>6}'
        for r in results.values():
            line += f"  {r['train_loss'][i]:>15.4f}  {r['accuracy'][i + 1]:>6.3f}"
        lines.append(line)
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _data.add_args(parser)
    parser.add_argument('--sequence', choices=('rows', 'pixels'), default='rows',
                        help='rows: one image row per step (default); pixels: one pixel per '
                             'step (harder, and as many times slower as an image row is long)')
    parser.add_argument('--permute', action='store_true',
                        help='shuffle the pixel order with one fixed permutation first')
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and batch order (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=1000,
                        help='Adam steps per net (default: %(default)s)')
    parser.add_argument('--hidden', type=int, default=DEFAULT_HIDDEN,
                        help='LSTM hidden units (default: %(default)s)')
    parser.add_argument('--lr', type=float, default=DEFAULT_LR,
                        help='Adam learning rate (default: %(default)s)')
    parser.add_argument('--bn-momentum', type=float, default=DEFAULT_BN_MOMENTUM,
                        help='momentum of the BN net\'s running statistics (default: %(default)s)')
    parser.add_argument('--eval-every', type=int, default=20,
                        help='steps between held-out evaluations (default: %(default)s)')
    parser.add_argument('--out', type=Path, default=Path('out/ln_rnn'),
                        help='folder for ln_rnn.png and metrics.json (default: %(default)s)')
    parser.add_argument('--smoke', action='store_true',
                        help='a few steps only, to check that everything runs')
    args = parser.parse_args(argv)
    _data.check_args(parser, args)
    if args.smoke:
        args.steps, args.eval_every = 20, 10
    if args.steps < 1 or args.eval_every < 1 or args.hidden < 1:
        parser.error('--steps, --eval-every and --hidden must be positive')
    return args


def main(argv=None):
    args = parse_args(argv)
    images = _data.load(args.data, args.data_dir)
    data = images._replace(
        x_train=sequences(images.x_train, images.image_shape, args.sequence, args.permute),
        x_test=sequences(images.x_test, images.image_shape, args.sequence, args.permute))
    num_steps, num_inputs = data.x_train.shape[1:]
    print(f'compiling, then training {len(KINDS)} LSTMs (progress bars follow)...', flush=True)
    start = time.perf_counter()
    results = {}
    for i, kind in enumerate(KINDS):
        results[kind] = train(kind, data, hidden=args.hidden, lr=args.lr, steps=args.steps,
                              eval_every=args.eval_every, seed=args.seed,
                              bn_momentum=args.bn_momentum, desc=f'{kind} ({i + 1}/{len(KINDS)})')
    wall_time = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    order = 'permuted ' if args.permute else ''
    title = (f'{data.name}, {order}{args.sequence} ({num_steps} steps of {num_inputs}): '
             f'LSTM-{args.hidden}, Adam lr={args.lr:g}, batch {BATCH_SIZE}, seed {args.seed}')
    plot(results, args.out / 'ln_rnn.png', title)
    config = {'data': data.name, 'sequence': args.sequence, 'permute': args.permute,
              'time_steps': int(num_steps), 'inputs_per_step': int(num_inputs),
              'hidden': args.hidden, 'steps': args.steps, 'lr': args.lr, 'optimizer': 'adam',
              'batch_size': BATCH_SIZE, 'eval_every': args.eval_every, 'seed': args.seed,
              'bn_gain_init': BN_GAIN_INIT, 'bn_momentum': args.bn_momentum,
              'num_train': len(data.x_train), 'num_test': len(data.x_test)}
    metrics = {'config': config, **results, 'wall_time_s': wall_time}
    (args.out / 'metrics.json').write_text(json.dumps(metrics, indent=1))

    print(title)
    print(summary(results))
    print('final held-out accuracy: ' + ', '.join(
        f"{kind} {r['test_accuracy']:.4f}" for kind, r in results.items())
        + f' ({len(data.x_test)} examples)')
    print('steps to 90% held-out accuracy: ' + ', '.join(
        f'{kind} {steps_to(r, 0.9) or "never"}' for kind, r in results.items()))
    print(f'training took {wall_time:.1f} s; wrote {args.out / "ln_rnn.png"} and '
          f'{args.out / "metrics.json"}')
    return metrics


if __name__ == '__main__':
    main()
