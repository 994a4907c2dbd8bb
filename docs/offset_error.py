"""Draws docs/figures/offset_error.png: batch norm's output error against the input's offset.

    pip install -e ".[bench]" && python docs/offset_error.py

For each library, training-mode batch norm of float32 data (4096 x 8, std 1,
mean ``offset``), and the error of the benchmarks' stability table
(``benchmarks/_stability.py``): the largest, over features, of
``|std(y) - std(x) / sqrt(var(x) + eps)|`` against float64. Writes the
numbers to ``docs/figures/offset_error.json`` beside the plot.
"""

import json
import pathlib
import platform
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _cases, _stability  # noqa: E402

OFFSETS = tuple(float(f'{v:.0e}') for v in np.logspace(0, 7, 15))
LIBRARIES = {  # name in benchmarks/_stability.py: label
    'normlib': 'normlib',
    'flax': 'flax.linen (default: fast variance)',
    'flax two-pass': 'flax.linen (use_fast_variance=False)',
    'torch': 'torch.nn.BatchNorm1d',
}
FIGURES = ROOT / 'docs' / 'figures'


def measure():
    return {lib: [_stability.std_error(lib, offset) for offset in OFFSETS]
            for lib in LIBRARIES if _cases.available(lib)}


def plot(errors, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    floor = 1e-9  # an exact answer would sit at 0, off a log axis
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for (lib, values), marker in zip(errors.items(), 'osD^'):
        y = np.clip(np.nan_to_num(values, nan=np.inf, posinf=1e6), floor, 1e6)
        ax.loglog(OFFSETS, y, marker=marker, markersize=4, label=LIBRARIES[lib])
    ax.axhline(1.0, color='gray', lw=0.8, ls=':', label='error 1: output std off by 100%')
    ax.set_xlabel('offset |mean| / std of the input (float32, std 1)')
    ax.set_ylabel('max |std(y) - exact|')
    ax.set_ylim(floor / 2, 1e4)
    ax.set_title('Batch norm (training) on offset data: error of the output std', fontsize=10)
    ax.grid(True, which='major', lw=0.3)
    ax.legend(fontsize=8, loc='upper left')
    fig.tight_layout()
    fig.savefig(path)


def main():
    import jax
    errors = measure()
    FIGURES.mkdir(exist_ok=True)
    plot(errors, FIGURES / 'offset_error.png')
    versions = {'jax': jax.__version__, 'python': platform.python_version()}
    for lib in ('flax', 'torch'):
        if _cases.available(lib):
            versions[lib] = __import__(lib).__version__
    (FIGURES / 'offset_error.json').write_text(json.dumps(
        {'offsets': OFFSETS, 'errors': errors, 'versions': versions}, indent=1) + '\n')
    for lib, values in errors.items():
        print(f'{lib:14s}', ' '.join(f'{v:8.1e}' for v in values))


if __name__ == '__main__':
    main()
