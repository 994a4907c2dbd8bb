"""Does each library's batch norm still normalize float32 data far from zero?"""

from __future__ import annotations

import numpy as np

from benchmarks import _cases

RATIOS = (1e2, 1e4, 1e6)


def offset_data(ratio: float, shape=(4096, 8), seed: int = 0) -> np.ndarray:
    """float32 data with ``|mean| / std = ratio`` (std 1)."""
    rng = np.random.default_rng(seed)
    return (ratio + rng.standard_normal(shape)).astype(np.float32)


def std_error(library: str, ratio: float, shape=(4096, 8)) -> float:
    """max over features of ``|std(y) - std(x) / sqrt(var(x) + eps)|`` in float64."""
    x = offset_data(ratio, shape)
    case = _cases.Case('batch_norm', shape, mode='fwd')
    if library == 'torch':
        import torch
        layer = torch.nn.BatchNorm1d(shape[-1], eps=_cases.EPSILON).train()
        with torch.no_grad():
            y = layer(torch.from_numpy(x)).numpy()
    else:
        import jax.numpy as jnp
        builder = {'normlib': lambda: _cases._normlib(case, shape[-1]),
                   'flax': lambda: _cases._flax(case, shape[-1], two_pass=False),
                   'flax two-pass': lambda: _cases._flax(case, shape[-1], two_pass=True),
                   'haiku': lambda: _cases._haiku(case, shape[-1]),
                   'equinox': lambda: _cases._equinox(case, shape[-1])}[library]
        apply, params, state = builder()
        y = np.asarray(apply(params, state, jnp.asarray(x))[0])
    x64 = x.astype(np.float64)
    expected = x64.std(axis=0) / np.sqrt(x64.var(axis=0) + _cases.EPSILON)
    err = np.abs(y.astype(np.float64).std(axis=0) - expected)
    return float(np.max(np.where(np.isfinite(err), err, np.inf)))


def table(libraries) -> dict[str, dict[str, float]]:
    """``{library: {ratio (as text): error}}``."""
    return {lib: {f'{r:g}': std_error(lib, r) for r in RATIOS}
            for lib in libraries if lib in ('normlib', 'flax', 'flax two-pass', 'haiku',
                                            'equinox', 'torch') and _cases.available(lib)}
