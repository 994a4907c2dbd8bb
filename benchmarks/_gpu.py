"""The GPU run: every case timed on the device and read as bandwidth against its peak.

A GPU call of a normalization kernel lasts tens of microseconds, about what
the host needs to dispatch it and far less than a synchronization, so
timing single calls measures the host. Here each timed program runs the
case ``repeats`` times in one ``lax.fori_loop`` (one dispatch, one wait),
with each iteration's outputs fed to the next one's inputs so that nothing
is loop-invariant; a sample is the program's time over ``repeats``, and
``repeats`` makes a sample last about ``TARGET_S``. The copy of a 256 MiB
array is timed the same way and checked against the device's peak.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import random
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _cases, _hlo

LIBRARIES = ('normlib', 'flax', 'flax two-pass', 'jax', 'torch')
SMOKE_LIBRARIES = ('normlib', 'flax')  # flax two-pass takes the same path as flax
TARGET_S = 0.025  # length of one sample on a GPU
COPY_MIB = 256
# Peak memory bandwidth (TB/s) by device name (``device.device_kind``), from
# the vendors' data sheets; the first pattern that the lower-cased name
# contains wins, so the more specific names come first.
PEAKS = (
    ('gh200 144', 4.9, 'GH200 144 GB HBM3e'), ('gh200', 4.0, 'GH200 96 GB HBM3'),
    ('h200', 4.8, 'H200'), ('h100 pcie', 2.0, 'H100 PCIe'), ('h100 nvl', 3.9, 'H100 NVL'),
    ('h100', 3.35, 'H100 SXM'), ('h800 pcie', 2.0, 'H800 PCIe'), ('h800', 3.35, 'H800 SXM'),
    ('b200', 8.0, 'B200'), ('a100 80gb pcie', 1.935, 'A100 80GB PCIe'),
    ('a100-pcie-80gb', 1.935, 'A100 80GB PCIe'), ('a100-sxm4-80gb', 2.039, 'A100 80GB SXM'),
    ('a100 80gb', 2.039, 'A100 80GB'), ('a100', 1.555, 'A100 40GB'),
    ('l40s', 0.864, 'L40S'), ('l40', 0.864, 'L40'), ('l4', 0.3, 'L4'),
    ('a10g', 0.6, 'A10G'), ('a10', 0.6, 'A10'), ('v100', 0.9, 'V100'), ('t4', 0.32, 'T4'),
    ('rtx 4090', 1.008, 'RTX 4090'),
)


def peak(device_kind: str) -> tuple[float | None, str | None]:
    """``(TB/s, the table's name)`` of the device, or ``(None, None)`` if unknown."""
    name = device_kind.lower()
    for pattern, tbs, label in PEAKS:
        if pattern in name:
            return tbs, label
    return None, None


def tbs(nbytes: float, seconds: float) -> float:
    """Terabytes per second (1e12 bytes) of ``nbytes`` moved in ``seconds``."""
    return nbytes / seconds / 1e12


def large_cases(smoke: bool = False) -> list[_cases.Case]:
    """Arrays of 128 MiB and more (float32), those of the targets; with
    ``smoke``, two tiny ones that stand for them."""
    if smoke:
        return [_cases.Case('layer_norm', (64, 32)), _cases.Case('rms_norm', (64, 32), 'bfloat16')]
    large = []
    for op in ('layer_norm', 'rms_norm'):
        for shape in ((8192, 4096), (32768, 4096)):
            for dtype in ('float32', 'bfloat16'):
                large += [_cases.Case(op, shape, dtype, 'fwd'), _cases.Case(op, shape, dtype)]
    for dtype in ('float32', 'bfloat16'):
        large += [_cases.Case('batch_norm', (256, 56, 56, 128), dtype, 'fwd'),
                  _cases.Case('batch_norm', (256, 56, 56, 128), dtype)]
    return large


def cases(smoke: bool = False) -> list[_cases.Case]:
    """The large arrays first, then every case of the CPU run (with ``smoke``,
    one forward and one batch norm, to run each code path in seconds)."""
    large = large_cases(smoke)
    rest = ([_cases.Case('layer_norm', (64, 32), mode='fwd'),
             _cases.Case('batch_norm', (4, 6, 6, 8))] if smoke else _cases.cases())
    return large + [c for c in rest if c not in large]


def repeats(moved_bytes: int, bandwidth: float, target_s: float, cap: int) -> int:
    """Iterations for a sample of about ``target_s`` (at least, if ``bandwidth`` is the peak)."""
    return max(1, min(cap, math.ceil(target_s * bandwidth / moved_bytes)))


def copy_runners(mib: int, n: int) -> tuple[dict[str, tuple[Callable, int]], str]:
    """Three timings of a jitted ``x + 1`` of ``mib`` MiB, and the loop's compiled HLO.

    'device loop': ``n`` copies in one ``fori_loop``; 'queued': ``n`` calls
    back to back, waiting for the last; 'single': one call and its wait
    (what the recorded GPU run measured).
    """
    x = jnp.asarray(np.arange(mib * 2 ** 18, dtype=np.float32) % 1000)
    one = jnp.asarray(1, x.dtype)
    plus_one = jax.jit(lambda a: a + one).lower(x).compile()
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, a: a + one, a)).lower(x).compile()

    def queued():
        for _ in range(n - 1):
            plus_one(x)
        return plus_one(x)
    return ({'device loop': (lambda: loop(x), n), 'queued': (queued, n),
             'single': (lambda: plus_one(x), 1)}, loop.as_text())


def sample(run: Callable, n: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return (time.perf_counter() - start) / n


def run(smoke: bool, max_rounds: int, budget_s: float, device_kind: str,
        save: Callable[[dict], None], log=print) -> dict:
    """Time every case of ``cases(smoke)`` on the default device within ``budget_s``.

    Building (compiling) stops at 55% of the budget, the cases left being
    listed as skipped; rounds (every runner once, in random order) stop at
    ``max_rounds`` or when the next one would end past the budget.
    ``save(results)`` is called after each round, so that a run cut short
    keeps what it measured.
    """
    start = time.perf_counter()
    peak_tbs, peak_name = peak(device_kind)
    gpu = jax.default_backend() == 'gpu'
    bandwidth = (peak_tbs or 1.0) * 1e12 if gpu else 2e10
    target_s, cap = (TARGET_S, 20000) if not smoke else (0.002, 16)
    results = {'gpu_run': True, 'peak_tbs': peak_tbs, 'peak_name': peak_name,
               'budget_s': budget_s, 'target_sample_s': target_s, 'rounds': 0, 'skipped': []}

    mib = 1 if smoke else COPY_MIB
    copy_bytes = 2 * mib * 2 ** 20
    n_copy = repeats(copy_bytes, bandwidth, target_s, cap)
    copies, copy_hlo = copy_runners(mib, n_copy)
    body = _hlo.loop_body_traffic(copy_hlo)
    array = mib * 2 ** 20
    results['copy'] = {'mib': mib, 'repeats': n_copy,
                       'body_read': sum(t['read'] for t in body) / array,
                       'body_written': sum(t['written'] for t in body) / array}

    # Cases build in threads: XLA compiles with the interpreter lock released.
    large, built_at = large_cases(smoke), {}

    def build(case):
        if time.perf_counter() - start > 0.55 * budget_s:
            return None
        n = repeats(case.floor_arrays * case.nbytes, bandwidth, target_s, cap)
        built = _cases.loop_runners(case, n, SMOKE_LIBRARIES if smoke else LIBRARIES, target_s)
        built_at[case.name] = time.perf_counter() - start
        return built

    entries, runners = [], {}  # runners: (case index, library) -> (run, calls)
    workers = min(8, os.cpu_count() or 1) if gpu else 1  # a CPU compiles on its own cores
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for case, future in [(c, pool.submit(build, c)) for c in cases(smoke)]:
            done = future.result()
            if done is None:
                results['skipped'].append(case.name)
                continue
            built, errors = done
            entries.append({'name': case.name, 'op': case.op, 'shape': list(case.shape),
                            'dtype': case.dtype, 'mode': case.mode, 'nbytes': case.nbytes,
                            'floor_arrays': case.floor_arrays, 'large': case in large,
                            'repeats': {lib: k for lib, (_, k) in built.items()}, 'times': {},
                            'errors': errors})
            for lib, runner in built.items():
                runners[len(entries) - 1, lib] = runner
            log(f'built {case.name}: {", ".join(built)} ({built_at[case.name]:.0f} s)')
    results['cases'] = entries
    if results['skipped']:
        log(f'out of time for building: skipped {len(results["skipped"])} cases')

    timed = {('copy', k): v for k, v in copies.items()} | runners
    for r, n in timed.values():  # warm up: first runs allocate and load kernels
        jax.block_until_ready(r())
    samples = {key: [] for key in timed}
    order, rng, round_s = list(timed), random.Random(0), 0.0
    while results['rounds'] < max_rounds:
        elapsed = time.perf_counter() - start
        if results['rounds'] and elapsed + round_s > budget_s:
            log(f'time budget used: stopping after {results["rounds"]} rounds')
            break
        t0 = time.perf_counter()
        rng.shuffle(order)
        for key in order:
            samples[key].append(sample(*timed[key]))
        round_s = time.perf_counter() - t0
        results['rounds'] += 1
        medians = {key: statistics.median(s) for key, s in samples.items()}
        seconds = {k: medians['copy', k] for k in copies}
        results['copy'].update(seconds=seconds,
                               tbs={k: tbs(copy_bytes, t) for k, t in seconds.items()})
        for (i, lib), t in medians.items():
            if i != 'copy':
                entries[i]['times'][lib] = t
        results['elapsed_s'] = time.perf_counter() - start
        save(results)
        log(f'round {results["rounds"]}: {round_s:.1f} s, copy'
            f' {results["copy"]["tbs"]["device loop"]:.2f} TB/s (device loop)')
    return results
