"""Batch normalization allows higher learning rates (Ioffe & Szegedy 2015).

A scaled-down version of the ImageNet finding in section 4.2 of S. Ioffe and
C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (arXiv:1502.03167): with batch
normalization the learning rate can be raised 5x and 30x (BN-x5, BN-x30) and
the network still trains, where without it training stalls or diverges.

The nets are those of `bn_mnist.py` (3 hidden layers of 100 sigmoid units,
with and without `normlib.batch_norm` before each sigmoid), trained with SGD at
x1, x5 and x30 a base learning rate (`bn_mnist.py`'s default). Writes
`lr_robustness.png` (held-out accuracy curves, one panel per rate) and
`metrics.json` to `--out` and prints a table.

    python examples/lr_robustness.py
    python examples/lr_robustness.py --data mnist --data-dir DIR
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import _data
import bn_mnist

MULTIPLIERS = (1, 5, 30)
TARGET_ACCURACY = 0.9


def steps_to(result, accuracy):
    """First evaluated step with held-out accuracy >= `accuracy`, or None."""
    for step, acc in zip(result['step'], result['accuracy']):
        if acc >= accuracy:
            return step
    return None


def plot(runs, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6),
                             sharey=True)
    for ax, (key, run) in zip(np.atleast_1d(axes), runs.items()):
        for name, color, label in (('plain', 'tab:gray', 'Without BN'),
                                   ('bn', 'tab:blue', 'With BN')):
            ax.plot(run[name]['step'], run[name]['accuracy'], color=color,
                    label=label)
        ax.set(title=f"{key}: lr={run['lr']:g}", xlabel='training step',
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('held-out accuracy')
    axes[0].legend(loc='lower right')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(runs):
    """Final accuracy, final training loss and steps to TARGET_ACCURACY."""
    def cells(result):
        reached = steps_to(result, TARGET_ACCURACY)
        return (f"{result['test_accuracy']:>6.3f} {result['train_loss'][-1]:>7.3f} "
                f"{reached if reached is not None else 'never':>7}")

    columns = f"{'acc':>6} {'loss':>7} {'to ' + str(TARGET_ACCURACY):>7}"
    lines = [f"{'':>4} {'':>7} | {'without BN':^22} | {'with BN':^22}",
             f"{'rate':>4} {'lr':>7} | {columns} | {columns}"]
    for key, run in runs.items():
        lines.append(f"{key:>4} {run['lr']:>7g} | {cells(run['plain'])} | "
                     f"{cells(run['bn'])}")
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _data.add_args(parser)
    parser.add_argument('--seed', type=int, default=0,
                        help='initial weights and batch order (default: %(default)s)')
    parser.add_argument('--base-lr', type=float, default=bn_mnist.DEFAULT_LR,
                        help='learning rate of the x1 runs (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=2000,
                        help='SGD steps per net (default: %(default)s)')
    parser.add_argument('--eval-every', type=int, default=50,
                        help='steps between held-out evaluations (default: %(default)s)')
    parser.add_argument('--out', type=Path, default=Path('out/lr_robustness'),
                        help='folder for lr_robustness.png and metrics.json (default: %(default)s)')
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
    print('compiling, then training 6 nets (progress bars follow)...', flush=True)
    start = time.perf_counter()
    runs = {}
    for multiplier in MULTIPLIERS:
        lr = args.base_lr * multiplier
        runs[f'x{multiplier}'] = {'lr': lr, **{
            name: bn_mnist.train(data, batch_norm=name == 'bn', lr=lr,
                                 steps=args.steps, eval_every=args.eval_every,
                                 seed=args.seed)
            for name in ('plain', 'bn')}}
    wall_time = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f'{data.name}: 3x100 sigmoid MLP, SGD, base lr {args.base_lr:g}, '
             f'seed {args.seed}')
    plot(runs, args.out / 'lr_robustness.png', title)
    config = {'data': data.name, 'steps': args.steps, 'base_lr': args.base_lr,
              'multipliers': list(MULTIPLIERS), 'eval_every': args.eval_every,
              'seed': args.seed, 'batch_size': bn_mnist.BATCH_SIZE}
    metrics = {'config': config, 'runs': runs, 'wall_time_s': wall_time}
    # json writes non-finite losses as NaN, which Python's json reads back.
    (args.out / 'metrics.json').write_text(json.dumps(metrics, indent=1))

    print(title)
    print(f'final held-out accuracy, final training loss, first step with '
          f'held-out accuracy >= {TARGET_ACCURACY}:')
    print(table(runs))
    print(f'training took {wall_time:.1f} s; wrote '
          f'{args.out / "lr_robustness.png"} and {args.out / "metrics.json"}')
    return metrics


if __name__ == '__main__':
    main()
