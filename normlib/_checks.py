"""Argument checks shared by every public function.

Each check runs while tracing (shapes, dtypes and static arguments are known
then), so a bad call fails inside ``jax.jit`` too. Messages name the argument,
what it got, and what it expects.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def floating(name: str, x: Any, *, complex_ok: bool = False) -> jax.Array:
    """Returns ``x`` as an array, raising TypeError unless it is floating point.

    With ``complex_ok``, complex input is accepted too. Narrow floats
    (float16, bfloat16, float8) are accepted; normlib computes in float32.
    """
    if not hasattr(x, 'dtype'):
        x = jnp.asarray(x)
    if complex_ok and jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        kind = ('real or complex floating-point' if complex_ok else 'real floating-point')
        raise TypeError(
                f'{name} must have a {kind} dtype, got {x.dtype}; cast it'
                ' first, e.g. x.astype(jnp.float32).')
    return jnp.asarray(x)


def param(name: str, value: Any) -> jax.Array:
    """A scale or bias: floating point (or complex); float8 is widened to float32.

    float8 has no implicit promotion with float32 in JAX, so a float8
    parameter is cast to float32 (exactly) before it meets the statistics.
    """
    value = floating(name, value, complex_ok=True)
    if jnp.issubdtype(value.dtype, jnp.floating) and jnp.finfo(value.dtype).bits < 16:
        value = value.astype(jnp.float32)
    return value


def integer(name: str, value: Any, what: str = 'an int') -> int:
    """A static Python (or NumPy) integer; bools and floats are rejected."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f'{name} must be {what}, got {value!r}.')
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f'{name} must be {what}, got {value!r}.') from None


def axes(name: str, axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Normalizes an axis or axes to sorted non-negative ints, checking range."""
    items = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    out = []
    for a in items:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                    f'{name} must be an int or a tuple of ints, got {axis!r}.') from None
        if not -ndim <= a < ndim:
            raise ValueError(
                    f'{name}={axis!r} is out of range for an input with {ndim}'
                    f' dimension(s); expected values in [{-ndim}, {ndim - 1}].')
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f'{name}={axis!r} repeats an axis.')
    return tuple(sorted(out))


def positive(name: str, value: Any) -> float:
    """A static number > 0 (epsilon, p)."""
    number = static_number(name, value)
    if not number > 0:
        raise ValueError(f'{name} must be > 0, got {value!r}.')
    return number


def epsilon(value: Any, dtype: Any = None) -> float:
    """A static epsilon that XLA keeps: at least the smallest normal number of
    the compute ``dtype`` (float32 unless wider), which XLA would flush to 0
    (then a constant input gives 0 / 0)."""
    number = positive('epsilon', value)
    dtype = jnp.dtype(jnp.float32) if dtype is None else jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        dtype = jnp.dtype(jnp.float32)
    tiny = float(jnp.finfo(dtype).tiny)
    if number < tiny:
        raise ValueError(f'epsilon must be at least {tiny:g}, the smallest normal {dtype.name}'
                         f' (the dtype the statistics are computed in): XLA flushes smaller'
                         f' values to 0; got {value!r}.')
    return number


def static_number(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
                f'{name} must be a static Python number, got a traced value; pass it'
                ' as a constant (or mark it static in jax.jit).')
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f'{name} must be a number, got {value!r}.') from None


def finite(name: str, value: Any) -> float:
    """A static finite number (scale_offset)."""
    number = static_number(name, value)
    if not math.isfinite(number):
        raise ValueError(f'{name} must be finite, got {value!r}.')
    return number


def boolean(name: str, value: Any) -> bool:
    """A Python bool (a flag that changes the program, so never traced)."""
    if not isinstance(value, bool):
        raise TypeError(f'{name} must be a Python bool, got {value!r}.')
    return value


def momentum(value: Any) -> float | None:
    if value is None:
        return None
    number = static_number('momentum', value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(
                f'momentum must be in [0, 1] (or None for a cumulative average), got'
                f' {value!r}.')
    return number


def shape(name: str, x: Any, expected: tuple[int, ...], what: str) -> None:
    got = tuple(np.shape(x))
    if got != tuple(expected):
        raise ValueError(
                f'{name} has shape {got}, but {what} have shape {tuple(expected)}.')


def mask(value: Any, x_shape: tuple[int, ...]) -> jax.Array:
    """A mask broadcast to ``x_shape`` as bool (nonzero entries are kept)."""
    value = jnp.asarray(value)
    try:
        broadcast = jnp.broadcast_shapes(value.shape, x_shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(x_shape):
        raise ValueError(
                f'mask has shape {value.shape}, which does not broadcast to the input'
                f' shape {tuple(x_shape)}.')
    if value.dtype != jnp.bool_:
        value = value != 0
    return jnp.broadcast_to(value, x_shape)


def axis_name(name: Any, groups: Any
              ) -> tuple[tuple[str, ...] | None, tuple[tuple[int, ...], ...] | None]:
    """Checks that the named axes are bound here and that groups are even."""
    if name is None:
        if groups is not None:
            raise ValueError('axis_index_groups needs an axis_name.')
        return None, None
    names = tuple(name) if isinstance(name, (tuple, list)) else (name,)
    for n in names:
        try:
            jax.lax.axis_size(n)
        except NameError:
            raise ValueError(
                    f'axis_name={name!r}: the axis {n!r} is not bound here. Call this'
                    ' function inside jax.pmap, jax.vmap or jax.shard_map with that'
                    ' axis name (jit over sharded arrays needs no axis_name).') from None
    if groups is None:
        return names, None
    groups = tuple(tuple(operator.index(i) for i in g) for g in groups)
    if len(names) != 1:
        raise ValueError('axis_index_groups needs a single axis_name.')
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
                f'axis_index_groups must be non-empty groups of equal size, got sizes'
                f' {[len(g) for g in groups]}.')
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(jax.lax.axis_size(names[0]))):
        raise ValueError(
                f'axis_index_groups must cover each index of axis {names[0]!r} once,'
                f' got {groups}.')
    return names, groups


def features_of(x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x_shape[a] for a in feature_axes)


def size(shape_: tuple[int, ...]) -> int:
    return math.prod(shape_)
