"""``python -m benchmarks.memory_efficient [--smoke] [--out DIR]``: what
``memory_efficient=True`` saves in a training step.

A pre-LN transformer (Linen: LayerNorm, causal self-attention, LayerNorm,
GELU MLP, residuals; a few layers) is trained for one jitted step with
``normlib.linen.LayerNorm(memory_efficient=False)`` and ``True``. Reported:
``compiled.memory_analysis().temp_size_in_bytes`` of each step, their
ratio, the step times (interleaved in one process, medians), the largest
gradient difference relative to the largest gradient, and the full-size
arrays ``jax.ad_checkpoint.print_saved_residuals`` lists for one layer
norm followed by a Dense layer. Writes ``memory_efficient.json`` and
``memory_efficient.md`` to ``--out`` (default: this folder).
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

import normlib.linen as nl
from benchmarks import _section, _timing


class Block(nn.Module):
    heads: int
    memory_efficient: bool

    @nn.compact
    def __call__(self, x):
        norm = lambda: nl.LayerNorm(memory_efficient=self.memory_efficient)
        h = norm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.SelfAttention(num_heads=self.heads, deterministic=True)(h, mask=mask)
        h = norm()(x)
        h = nn.Dense(4 * x.shape[-1])(h)
        return x + nn.Dense(x.shape[-1])(nn.gelu(h))


class Transformer(nn.Module):
    layers: int
    heads: int
    memory_efficient: bool

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = Block(self.heads, self.memory_efficient)(x)
        return nl.LayerNorm(memory_efficient=self.memory_efficient)(x)


def _step(model):
    def loss(params, x):
        return jnp.mean(jnp.square(model.apply(params, x) - 1.0))
    return jax.jit(jax.grad(loss))


def _saved_full_arrays(memory_efficient, shape):
    """The ``print_saved_residuals`` lines of full-size arrays for LayerNorm -> Dense."""
    norm, dense = nl.LayerNorm(memory_efficient=memory_efficient), nn.Dense(shape[-1])
    x = jax.random.normal(jax.random.key(0), shape)
    pn, pd = norm.init(jax.random.key(1), x), dense.init(jax.random.key(2), x)
    f = lambda x: jnp.sum(dense.apply(pd, norm.apply(pn, x)))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_saved_residuals(f, x)
    full = 'f32[' + ','.join(map(str, shape)) + ']'
    root = str(pathlib.Path(__file__).resolve().parents[1]) + '/'
    return [line.replace(root, '') for line in buffer.getvalue().splitlines()
            if line.startswith(full)]


def run(smoke: bool, rounds: int) -> dict:
    batch, seq, width, layers, heads = (2, 16, 32, 2, 2) if smoke else (16, 128, 256, 4, 4)
    x = jax.random.normal(jax.random.key(0), (batch, seq, width))
    params = Transformer(layers, heads, False).init(jax.random.key(1), x)
    # Scales and biases away from 1 and 0, where recovering x_hat would be exact.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 * jax.random.normal(jax.random.key(len(str(path))), v.shape)
        if 'LayerNorm' in str(path) else v, params)
    steps, temps, grads = {}, {}, {}
    for flag in (False, True):
        name = f'memory_efficient={flag}'
        step = _step(Transformer(layers, heads, flag))
        compiled = step.lower(params, x).compile()
        temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        grads[name] = step(params, x)
        steps[name] = lambda step=step: jax.block_until_ready(step(params, x))
    times = _timing.interleaved(steps, rounds)
    g0, g1 = (jax.tree.leaves(grads[f'memory_efficient={f}']) for f in (False, True))
    largest = max(float(jnp.max(jnp.abs(a))) for a in g0)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g0, g1))
    return {'shape': [batch, seq, width], 'layers': layers, 'heads': heads, 'rounds': rounds,
            'temp_bytes': temps, 'times_s': times,
            'temp_ratio': temps['memory_efficient=True'] / temps['memory_efficient=False'],
            'time_ratio': times['memory_efficient=True'] / times['memory_efficient=False'],
            'max_grad_difference_relative': diff / largest,
            'saved_full_arrays': {str(f): _saved_full_arrays(f, (batch * seq, width))
                                  for f in (False, True)}}


def markdown(r: dict) -> str:
    b, s, w = r['shape']
    lines = ['# memory_efficient=True in a training step\n',
             f'Pre-LN transformer, {r["layers"]} layers, {r["heads"]} heads, input'
             f' {b}x{s}x{w} float32, one jitted gradient step; times are medians of'
             f' {r["rounds"]} interleaved rounds in one process.\n',
             '| | temp bytes | step time (ms) |', '|---|---|---|']
    for name, temp in r['temp_bytes'].items():
        lines.append(f'| {name} | {temp:,} | {1e3 * r["times_s"][name]:.2f} |')
    lines += ['', f'Temporaries ratio (True/False): {r["temp_ratio"]:.3f}; time ratio:'
              f' {r["time_ratio"]:.3f}; largest gradient difference / largest gradient:'
              f' {r["max_grad_difference_relative"]:.2e}.', '',
              'Full-size arrays kept for the backward pass of LayerNorm -> Dense'
              ' (`print_saved_residuals`):', '']
    for flag, saved in r['saved_full_arrays'].items():
        lines.append(f'- memory_efficient={flag}:')
        lines += [f'  - `{line}`' for line in saved]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    results = _section.main('memory_efficient', run, markdown, argv)
    np.testing.assert_array_less(results['max_grad_difference_relative'], 1e-4)
    return 0


if __name__ == '__main__':
    sys.exit(main())
