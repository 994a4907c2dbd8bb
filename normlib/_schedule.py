"""Backend scheduling: the one place where code is shaped for a backend.

XLA:CPU runs each reduction as its own pass over memory, and an elementwise
result that feeds two passes (or a pass and the output) is written to memory
and read back instead of being recomputed in registers. Giving each pass its
own copy of its operands, behind an optimization barrier, keeps the
elementwise work inside each pass. GPUs fuse sibling reductions and their
consumers themselves, which such copies would prevent: there the operands
pass through unchanged. The barrier changes no value, so every backend
computes the same numbers.
"""

from __future__ import annotations

import jax


def private(values, tag: int):
    """``values`` (a pytree) as a copy private to one pass, on CPU; unchanged elsewhere.

    ``tag`` (>= 1) tells the copies of one computation apart. XLA drops a
    barrier's unused operands and then merges barriers with the same
    operands, so copy ``tag`` goes through ``tag`` nested barriers: each
    level's operands are the previous level's results, which no other copy
    shares.
    """
    if jax.default_backend() != 'cpu':
        return values
    for _ in range(tag):
        values = jax.lax.optimization_barrier(values)
    return values
