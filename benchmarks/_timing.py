"""Interleaved timing: every runner once per round, in a fresh random order."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                min_sample_s: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each runner, measured in interleaved rounds.

    Each round calls every runner in a new random order, so slow drifts in
    machine load reach all runners alike. A runner faster than
    ``min_sample_s`` is called several times per sample, waiting only for
    the last result (on an asynchronous device the calls then queue up, as
    in a training loop, instead of each paying the dispatch latency).
    Runners return their result unfinished; PyTorch runners finish in place.
    """
    order = list(runners)
    for name in order:
        for _ in range(warmup):
            jax.block_until_ready(runners[name]())
    repeat = {}
    for name in order:
        start = time.perf_counter()
        jax.block_until_ready(runners[name]())
        single = time.perf_counter() - start
        repeat[name] = max(1, int(min_sample_s / max(single, 1e-9)))
    samples = {name: [] for name in order}
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            run, n = runners[name], repeat[name]
            start = time.perf_counter()
            for _ in range(n - 1):
                run()
            jax.block_until_ready(run())
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}
