"""``python -m benchmarks.bound [--smoke] [--rounds N] [--out DIR]``: how close
any JAX program can come to the speed targets on this backend.

Every fwd+bwd case of ``python -m benchmarks`` (Lp normalization aside) is
timed interleaved in one process with normlib, flax.linen, PyTorch and three
reference programs, which compute no exact statistics:

- **outputs only**: ``y = x * a + b`` and ``dx = dy * c + x * d`` with
  per-feature ``a, b, c, d``: the arrays every normalizer must read and
  write (read ``x``, write ``y``; read ``x`` and ``dy``, write ``dx``), and
  no statistics at all. No normalizer in JAX can take less time.
- **one sum**: the sum of ``x`` over the reduced axes: one read of ``x``,
  the cheapest pass a statistic can take.
- **fewest passes**: the textbook one-pass normalizer (``E[x**2] - E[x]**2``,
  unstable at offsets) with a hand-written backward, each sum its own
  kernel as XLA:CPU compiles them: batch norm 4 sums (``x``, ``x**2``;
  ``dy``, ``dy * x``), layer norm 6 (the same per row, and ``dscale``,
  ``dbias`` over rows), RMS norm 3.

Outputs only is a floor: any normalizer does at least that work, so a
target below ``outputs only / anchor`` is out of reach of every JAX
program. The **pass estimate** is ``outputs only + k * one sum``, with
``k`` those fewest sums: what a normalizer costs on a backend that runs
each sum as its own pass, if each sum costs what a lone sum does and
everything else is free. It is an estimate, not a floor (a sum that runs
right after another kernel may find ``x`` in cache and take less): a
target below it needs sums faster than a lone one. Writes ``bound.json``
and ``bound.md`` to ``--out`` (default: this folder).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from benchmarks import _cases, _section, _timing

EPSILON = _cases.EPSILON
# The sums the fewest-passes program takes (one kernel each on XLA:CPU).
FEWEST_SUMS = {'batch_norm': 4, 'layer_norm': 6, 'rms_norm': 3}
# Issue 22's targets: normlib's fwd+bwd time over each anchor's.
TARGETS = {('batch_norm', 'flax'): 0.8, ('layer_norm', 'flax'): 0.9, ('rms_norm', 'flax'): 0.9,
           ('layer_norm', 'torch'): 1.3}
BF16_BATCH_NORM_VS_TORCH = 1.0


def _reduced(x, op):
    return tuple(range(x.ndim - 1)) if op == 'batch_norm' else (x.ndim - 1,)


def fewest_passes(op: str):
    """``f(x, scale, bias)``: the one-pass normalizer ``op`` (bias ignored for
    RMS norm) with a hand-written backward of the fewest sums."""
    @jax.custom_vjp
    def f(x, scale, bias):
        return forward(x, scale, bias)[0]

    def forward(x, scale, bias):
        axes = _reduced(x, op)
        n = np.prod([x.shape[a] for a in axes])
        xf = x.astype(jnp.float32)
        square = jnp.sum(xf * xf, axes, keepdims=True) / n
        mean = (jnp.sum(xf, axes, keepdims=True) / n if op != 'rms_norm'
                else jnp.zeros_like(square))  # x - 0 is folded away
        inv = jax.lax.rsqrt(square - mean * mean + EPSILON)
        y = (xf - mean) * inv * scale + (0 if op == 'rms_norm' else bias)
        return y.astype(x.dtype), (x, mean, inv, scale)

    def backward(residuals, g):
        x, mean, inv, scale = residuals
        axes = _reduced(x, op)
        n = np.prod([x.shape[a] for a in axes])
        xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
        if op == 'batch_norm':  # scale is constant over the reduced axes
            s1 = jnp.sum(gf, axes, keepdims=True)
            s2 = jnp.sum(gf * xf, axes, keepdims=True)
            dscale = (s2 - mean * s1) * inv  # sum(g * x_hat)
            c = scale * inv
            d = -c * inv * dscale / n
            dx = gf * c + xf * d + (-c * s1 / n - d * mean)
            return dx.astype(x.dtype), dscale.reshape(scale.shape), s1.reshape(scale.shape)
        gs = gf * scale
        s2 = jnp.sum(gs * xf, axes, keepdims=True)
        xhat = (xf - mean) * inv
        if op == 'layer_norm':
            s1 = jnp.sum(gs, axes, keepdims=True)
            dx = (gs - s1 / n - xhat * ((s2 - mean * s1) * inv / n)) * inv
            return (dx.astype(x.dtype), jnp.sum(gf * xhat, 0).reshape(scale.shape),
                    jnp.sum(gf, 0).reshape(scale.shape))
        dx = (gs - xhat * (s2 * inv / n)) * inv
        return dx.astype(x.dtype), jnp.sum(gf * xhat, 0).reshape(scale.shape), None

    f.defvjp(forward, backward)
    return f


def outputs_only(x, scale, bias):
    """``y = x * scale + bias``, its "backward" ``dx = dy * scale + x * scale``."""
    @jax.custom_vjp
    def f(x, scale, bias):
        return (x.astype(jnp.float32) * scale + bias).astype(x.dtype)

    def forward(x, scale, bias):
        return f(x, scale, bias), (x, scale)

    def backward(residuals, g):
        x, scale = residuals
        dx = g.astype(jnp.float32) * scale + x.astype(jnp.float32) * scale
        return dx.astype(x.dtype), scale, scale
    f.defvjp(forward, backward)
    return f(x, scale, bias)


def _runners(case: _cases.Case) -> dict:
    x_np, dy_np = _cases.data(case)
    dtype = jnp.dtype(case.dtype)
    x, dy = jnp.asarray(x_np, dtype), jnp.asarray(dy_np, dtype)
    features = case.shape[-1]
    params = (jnp.ones(features), jnp.zeros(features))

    def step(fn):
        def f(params, x, dy):
            y, vjp = jax.vjp(lambda p, x: fn(x, *p), params, x)
            return y, vjp(dy)
        compiled = jax.jit(f).lower(params, x, dy).compile()
        return lambda: compiled(params, x, dy)

    axes = _reduced(x, case.op)
    one_sum = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32), axes)).lower(x).compile()
    out, _, _ = _cases.runners(case, ('normlib', 'flax', 'torch'))
    out['outputs only'] = step(outputs_only)
    out['fewest passes'] = step(fewest_passes(case.op))
    out['one sum'] = lambda: one_sum(x)
    return out


def cases(smoke: bool) -> list[_cases.Case]:
    return [c for c in _cases.cases(smoke) if c.mode == 'fwd+bwd' and c.op in FEWEST_SUMS]


def run(smoke: bool, rounds: int) -> dict:
    rows = []
    for case in tqdm.tqdm(cases(smoke), desc='bound', file=sys.stdout):
        times = _timing.interleaved(_runners(case), rounds)
        estimate = times['outputs only'] + FEWEST_SUMS[case.op] * times['one sum']
        rows.append({'case': case.name, 'op': case.op, 'dtype': case.dtype, 'times_s': times,
                     'pass_estimate_s': estimate})
    return {'rounds': rounds, 'smoke': smoke, 'cases': rows}


def targets(row: dict) -> list[tuple[str, float]]:
    """The targets of this case: ``(anchor, normlib's time over the anchor's)``."""
    out = [(lib, t) for (op, lib), t in TARGETS.items() if op == row['op']]
    if row['op'] == 'batch_norm' and row['dtype'] == 'bfloat16':
        out.append(('torch', BF16_BATCH_NORM_VS_TORCH))
    return out


def verdict(floor: float, estimate: float, target: float) -> str:
    """Where a target stands against the floor and the estimate (ratios to its anchor)."""
    if floor > target:
        return 'below the floor'
    return 'below the estimate' if estimate > target else 'within the estimate'


def markdown(r: dict) -> str:
    lines = ['# How close any program comes on this backend\n',
             f'`python -m benchmarks.bound`: medians of {r["rounds"]} interleaved rounds in'
             ' one process. Floor: outputs only (no statistics). Pass estimate: outputs only'
             ' + k x one sum, k the fewest sums'
             f' ({", ".join(f"{op} {k}" for op, k in FEWEST_SUMS.items())}); not a floor,'
             ' as a sum after another kernel may find x in cache.'
             + (' Smoke run: tiny inputs, not measurements.' if r['smoke'] else '') + '\n',
             '| case | normlib | flax | torch | outputs only | one sum | fewest passes'
             ' | pass estimate | target | floor / anchor | estimate / anchor'
             ' | normlib / anchor |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for row in r['cases']:
        t = {k: 1e3 * v for k, v in row['times_s'].items()}
        estimate = 1e3 * row['pass_estimate_s']
        for anchor, target in targets(row):
            if anchor not in t:
                continue
            floor, est = t['outputs only'] / t[anchor], estimate / t[anchor]
            lines.append(
                f'| {row["case"]} | {t["normlib"]:.1f} | {t.get("flax", float("nan")):.1f}'
                f' | {t.get("torch", float("nan")):.1f} | {t["outputs only"]:.1f}'
                f' | {t["one sum"]:.2f} | {t["fewest passes"]:.1f} | {estimate:.1f}'
                f' | <= {target} x {anchor} | {floor:.2f} | {est:.2f}'
                f' ({verdict(floor, est, target)}) | {t["normlib"] / t[anchor]:.2f} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    _section.main('bound', run, markdown, argv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
