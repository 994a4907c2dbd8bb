"""A small ResNet in Flax Linen with normlib's BatchNorm, checkpointed.

The network is a scaled-down residual network (K. He, X. Zhang, S. Ren and
J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016) with batch
normalization after every convolution (S. Ioffe and C. Szegedy, "Batch
Normalization", ICML 2015, arXiv:1502.03167). `normlib.linen.BatchNorm` has
`flax.linen.BatchNorm`'s fields, call signature and variables, so the model
is written exactly as a Flax one; only the import differs.

It shows the usual Flax training loop: the running statistics live in the
`batch_stats` collection and come back from `apply(..., mutable=['batch_stats'])`
in a jitted optax step. After training, the parameters, statistics and
optimizer state are saved with `flax.serialization` (msgpack) to
`--out/checkpoint.msgpack`, restored into a freshly initialized model, and
the restored model's held-out accuracy (running statistics) is checked to
equal the accuracy before saving.

    python examples/flax_resnet.py                     # scikit-learn digits
    python examples/flax_resnet.py --data mnist --data-dir DIR
"""

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

import _data
from normlib.linen import BatchNorm  # instead of flax.linen.BatchNorm


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, plus a (projected) shortcut."""
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train):
        def norm(**kw):
            return BatchNorm(use_running_average=not train, momentum=0.9, **kw)

        def conv(k, s):
            return nn.Conv(self.features, (k, k), (s, s), use_bias=False)

        y = nn.relu(norm()(conv(3, self.strides)(x)))
        # Each residual branch starts as the identity (zero-initialized scale).
        y = norm(scale_init=nn.initializers.zeros)(conv(3, 1)(y))
        if x.shape != y.shape:
            x = norm()(conv(1, self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A 3x3 stem, one residual block per stage of `widths`, global pooling."""
    num_classes: int
    widths: tuple = (16, 32)

    @nn.compact
    def __call__(self, x, train):
        # Halve MNIST-sized images at once; keep the 8x8 digits whole.
        stem_strides = 2 if x.shape[1] > 16 else 1
        x = nn.Conv(self.widths[0], (3, 3), stem_strides, use_bias=False)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, width in enumerate(self.widths):
            x = ResidualBlock(width, strides=1 if i == 0 else 2)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def create(model, optimizer, image_shape, seed):
    """A fresh training state: params, batch_stats, optimizer state."""
    # The 'rbg' generator compiles about 3x faster on CPU than the default
    # threefry; the key is only used for the initial weights.
    key = jax.random.key(seed, impl='rbg')
    init = jax.jit(model.init, static_argnames='train')
    variables = init(key, jnp.zeros((1, *image_shape, 1)), train=False)
    return {'params': variables['params'],
            'batch_stats': variables['batch_stats'],
            'opt_state': optimizer.init(variables['params'])}


def make_train_step(model, optimizer):
    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {'params': params, 'batch_stats': state['batch_stats']}, x,
                train=True, mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates['batch_stats']

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state['params'])
        updates, opt_state = optimizer.update(grads, state['opt_state'],
                                              state['params'])
        params = optax.apply_updates(state['params'], updates)
        return {'params': params, 'batch_stats': batch_stats,
                'opt_state': opt_state}, loss

    return train_step


def make_accuracy(model):
    @jax.jit
    def accuracy(state, x, y):
        logits = model.apply(
            {'params': state['params'], 'batch_stats': state['batch_stats']}, x,
            train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return accuracy


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _data.add_args(parser)
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and batch order (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=300,
                        help='training steps (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=64,
                        help='examples per step (default: %(default)s)')
    parser.add_argument('--lr', type=float, default=0.1,
                        help='SGD-with-momentum learning rate (default: %(default)s)')
    parser.add_argument('--eval-every', type=int, default=50,
                        help='steps between held-out evaluations (default: %(default)s)')
    parser.add_argument('--out', type=Path, default=Path('out/flax_resnet'),
                        help='folder for metrics.json and the checkpoint (default: %(default)s)')
    parser.add_argument('--smoke', action='store_true',
                        help='a few steps only, to check that everything runs')
    args = parser.parse_args(argv)
    _data.check_args(parser, args)
    if args.smoke:
        args.steps, args.eval_every = 10, 5
    if min(args.steps, args.eval_every, args.batch_size) < 1:
        parser.error('--steps, --eval-every and --batch-size must be positive')
    return args


def main(argv=None):
    args = parse_args(argv)
    data = _data.load(args.data, args.data_dir)
    print('compiling, then training (a progress bar follows)...', flush=True)

    def images(x):
        return jnp.asarray(x.reshape(len(x), *data.image_shape, 1))

    x_train, y_train = images(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = images(data.x_test), jnp.asarray(data.y_test)

    model = ResNet(num_classes=int(data.y_train.max()) + 1)
    optimizer = optax.sgd(optax.cosine_decay_schedule(args.lr, args.steps),
                          momentum=0.9)
    state = create(model, optimizer, data.image_shape, args.seed)
    train_step, accuracy = make_train_step(model, optimizer), make_accuracy(model)
    schedule = _data.batches(args.seed, len(x_train), args.steps, args.batch_size)

    start = time.perf_counter()
    history = {'step': [], 'accuracy': [], 'train_loss': []}
    with tqdm(total=args.steps, desc='resnet', unit='step', leave=False) as bar:
        for step, idx in enumerate(schedule, start=1):
            state, loss = train_step(state, x_train[idx], y_train[idx])
            bar.update()
            if step % args.eval_every == 0 or step == args.steps:
                history['step'].append(step)
                history['accuracy'].append(float(accuracy(state, x_test, y_test)))
                history['train_loss'].append(float(loss))
                bar.set_postfix(acc=f"{history['accuracy'][-1]:.3f}")
    wall_time = time.perf_counter() - start
    test_accuracy = history['accuracy'][-1]

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / 'checkpoint.msgpack'
    checkpoint.write_bytes(serialization.to_bytes(state))
    # Restore into a fresh model of the same structure (different init).
    template = create(model, optimizer, data.image_shape, args.seed + 1)
    restored = serialization.from_bytes(template, checkpoint.read_bytes())
    restored_accuracy = float(accuracy(restored, x_test, y_test))
    same = jax.tree.all(jax.tree.map(np.array_equal, state, restored))
    if not same or restored_accuracy != test_accuracy:
        raise RuntimeError(
            f'checkpoint round trip changed the model: held-out accuracy '
            f'{test_accuracy} before saving, {restored_accuracy} after restoring')

    num_params = sum(p.size for p in jax.tree.leaves(state['params']))
    metrics = {
        'config': {'data': data.name, 'steps': args.steps, 'lr': args.lr,
                   'batch_size': args.batch_size, 'seed': args.seed,
                   'num_params': num_params, 'num_train': len(data.x_train),
                   'num_test': len(data.x_test)},
        'test_accuracy': test_accuracy,
        'restored_test_accuracy': restored_accuracy,
        **history,
        'wall_time_s': wall_time,
    }
    (args.out / 'metrics.json').write_text(json.dumps(metrics, indent=1))

    print(f'{data.name}: ResNet {model.widths} with normlib.linen.BatchNorm, '
          f'{num_params} parameters, SGD+momentum lr={args.lr:g}')
    print(f"{'step':>6}  {'held-out acc':>12}  {'train loss':>10}")
    for step, acc, loss in zip(history['step'], history['accuracy'],
                               history['train_loss']):
        print(f'{step:>6}  {acc:>12.4f}  {loss:>10.4f}')
    print(f'held-out accuracy {test_accuracy:.4f}; after restoring '
          f'{checkpoint} ({checkpoint.stat().st_size} bytes): '
          f'{restored_accuracy:.4f}; training took {wall_time:.1f} s')
    return metrics


if __name__ == '__main__':
    main()
