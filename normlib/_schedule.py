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

import enum

import jax
import jax.numpy as jnp


class Pass(enum.IntEnum):
    """The passes over ``x`` that take a private copy of their operands."""
    DELTA = 1  # the sum of x - anchor
    VARIANCE = 2  # the sum of |x - anchor|**2
    OUTPUT = 3  # y
    TANGENT_SUMS = 4  # the sums of the tangent (and, transposed, the cotangent)
    TANGENT = 5  # dy
    TANGENT_SCALE = 6  # the x_hat * dscale term of dy (transposed: the sum for dscale)
    ANCHOR = 7  # the mean deviation from a row's first entry


def private(values, tag: Pass):
    """``values`` (a pytree) as a copy private to one pass, on CPU; unchanged elsewhere.

    ``tag`` tells the copies of one computation apart. XLA drops a
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


def kept(value):
    """``value``, on CPU divided by an elementwise 1; unchanged elsewhere.

    XLA:CPU fuses a cheap elementwise producer into each of its consumers,
    duplicating it, and drops optimization barriers before fusion: the
    reverse pass of ``memory_efficient`` would compute ``y`` again from
    ``x`` inside its own kernels and keep ``x`` alive instead of ``y``. A
    division is an expensive operation, which XLA does not duplicate, so
    consumers read ``value`` itself. Dividing by exactly 1 changes no value
    (NaN, infinities and signed zeros included). The 1 is ``1 + 0 * c`` for
    the 0/1 array ``c = isnan(value)``: finite, so exactly 1, not a constant
    XLA can fold, and no broadcast, whose division XLA would turn into a
    product with the reciprocal.
    """
    if jax.default_backend() != 'cpu':
        return value
    real = jnp.real(value).dtype
    one = 1 + 0 * jnp.isnan(value).astype(real)
    return value / one
