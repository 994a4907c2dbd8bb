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


def floating(name: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising TypeError unless it is floating point."""
    if not hasattr(x, 'dtype'):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
                f'{name} must have a floating-point dtype, got {x.dtype}; cast it'
                ' first, e.g. x.astype(jnp.float32).')
    return jnp.asarray(x)


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


def static_number(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
                f'{name} must be a static Python number, got a traced value; pass it'
                ' as a constant (or mark it static in jax.jit).')
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f'{name} must be a number, got {value!r}.') from None


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


def axis_name(name: Any, groups: Any) -> tuple[tuple[str, ...] | None,
                                                                                                tuple[tuple[int, ...], ...] | None]:
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
