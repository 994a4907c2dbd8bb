"""Lp normalization of vectors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from normlib import _checks
from normlib import _moments


def lp_normalize(x, p: float = 2.0, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    r"""Divides ``x`` by its Lp norm along ``axis``, floored at ``epsilon``.

    .. math::
      y = \frac{x}{\max(\lVert x \rVert_p, \epsilon)}, \qquad
      \lVert x \rVert_p = \Big(\sum |x|^p\Big)^{1/p}

    as ``torch.nn.functional.normalize``. ``p=inf`` uses ``max |x|``. The
    norm is computed in float32 (or wider); ``y`` has ``x``'s dtype. At
    ``x = 0`` the output is 0 and the gradient finite. Where a vector's
    powers would overflow or underflow (``|x|`` above about ``2**(100/p)``,
    or small ones with a tiny ``epsilon`` or a large ``p``), every vector
    is taken at a power-of-two scale near ``1 / max|x|`` first, so results
    are right across float32's range; the scaling is exact, so the result
    is the one the unscaled formula gives wherever that is right.

    Args:
      x: floating-point input.
      p: the norm's exponent, > 0 (``float('inf')`` allowed).
      axis: the axis or axes the norm is taken over.
      epsilon: the smallest divisor; > 0.
    """
    x = _checks.floating('x', x)
    axes = _checks.axes('axis', axis, x.ndim)
    p = _checks.positive('p', p)
    epsilon = _checks.positive('epsilon', epsilon)
    xf = x.astype(_moments.compute_dtype(x.dtype))
    # The plain path's norm takes its derivative from _norm_of's rule, so no
    # derivative of an overflowed power is ever formed.
    total = jax.lax.stop_gradient(_total(xf, p, axes))
    # Vectors whose powers leave float32's comfortable range are rare: the
    # whole call then takes the scaled path, which gives the same y (bit for
    # bit for p = 1, 2 and inf) wherever the plain one is right. Ordinary
    # data pay one comparison per vector.
    risky = jnp.any(_out_of_range(total, p, epsilon))
    y = jax.lax.cond(risky, lambda xf, total: _scaled(xf, p, axes, epsilon),
                     lambda xf, total: _plain(p, axes, epsilon, xf, total), xf, total)
    return y.astype(x.dtype)


def l2_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 2.0, axis=axis, epsilon=epsilon)


def l1_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_1, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 1.0, axis=axis, epsilon=epsilon)


_RANGE = 2.0 ** 100  # sums of powers inside [1 / _RANGE, _RANGE] are safe


def _total(xf, p, axes):
    """``sum |x|**p`` over ``axes`` (``max |x|`` for ``p = inf``), kept dims, unscaled."""
    magnitude = jnp.abs(xf)
    if math.isinf(p):
        return jnp.max(magnitude, axis=axes, keepdims=True)
    if p == 1:  # the where makes the derivative of |x| at 0 be 0, as sign(0)
        return jnp.sum(jnp.where(xf != 0, magnitude, 0), axis=axes, keepdims=True)
    if p == 2:  # x * x has a finite gradient at 0: only the root needs guarding
        return jnp.sum(xf * xf, axis=axes, keepdims=True)
    # Both wheres keep the gradient finite where x is 0.
    nonzero = magnitude > 0
    return jnp.sum(jnp.where(nonzero, jnp.where(nonzero, magnitude, 1) ** p, 0), axis=axes,
                   keepdims=True)


def _root(total, p):
    """``total**(1/p)`` with a finite gradient at 0."""
    if math.isinf(p) or p == 1:
        return total
    positive = total > 0
    safe = jnp.where(positive, total, 1)
    return jnp.where(positive, jnp.sqrt(safe) if p == 2 else safe ** (1 / p), 0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _norm_of(p, axes, xf, total):
    """``||x||_p`` from its power sum ``total`` (:func:`_total`, no gradient of its own).

    Its derivative, ``v = sign(x) |x / ||x|| |**(p-1)`` (``x / ||x||`` for
    ``p = 2``; ``sign(x)`` for ``p = 1``; the largest entries, ties sharing,
    for ``p = inf``), is bounded: no power of ``x`` is formed.
    """
    return _root(total, p)


@_norm_of.defjvp
def _norm_of_jvp(p, axes, primals, tangents):
    xf, total = primals
    dx, _ = tangents
    norm = _norm_of(p, axes, xf, total)  # through this rule again at higher orders
    positive = norm > 0
    u = xf / jnp.where(positive, norm, 1)  # |u| <= 1 where the norm is right
    if math.isinf(p):
        largest = (jnp.abs(xf) == norm) & positive
        v = jnp.where(largest, jnp.sign(xf), 0) / jnp.maximum(
            jnp.sum(largest, axis=axes, keepdims=True), 1)
    elif p == 1:
        v = jnp.sign(xf)
    elif p == 2:
        v = u
    else:
        nonzero = u != 0
        v = jnp.where(nonzero, jnp.sign(u) * jnp.where(nonzero, jnp.abs(u), 1) ** (p - 1), 0)
    return norm, jnp.sum(jnp.where(positive, v, 0) * dx, axis=axes, keepdims=True)


def _out_of_range(total, p, epsilon):
    """Vectors the plain formula may get wrong: a power sum (or largest entry) that
    overflowed or is huge, or a small one while ``epsilon`` is below where
    underflowed powers could matter (``epsilon < _RANGE**(-1/p)``)."""
    risky = ~(total <= _RANGE)  # also inf and NaN
    if not math.isinf(p) and epsilon < _RANGE ** (-1 / p):
        risky = risky | (total < 1 / _RANGE)
    return risky


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _plain(p, axes, epsilon, xf, total):
    """``x / max(||x||_p, epsilon)`` with the norm from its power sum ``total``.

    The derivative is taken as ``dy = (dx - y d max(||x||, epsilon)) / max(||x||,
    epsilon)``, whose terms stay in range: the chain rule through the division
    would form ``x / ||x||**2``, which overflows for norms below about 1e-19.
    """
    return xf / jnp.maximum(_root(total, p), epsilon)


@_plain.defjvp
def _plain_jvp(p, axes, epsilon, primals, tangents):
    xf, total = primals
    dx, _ = tangents
    y = _plain(p, axes, epsilon, xf, total)
    norm, dnorm = jax.jvp(lambda v: _norm_of(p, axes, v, total), (xf,), (dx,))
    # d max(norm, epsilon) / d norm as jnp.maximum's: 1 above, 1/2 at a tie, 0 below.
    weight = jnp.where(norm > epsilon, 1.0, jnp.where(norm == epsilon, 0.5, 0.0))
    return y, (dx - y * (weight * dnorm)) / jnp.maximum(norm, epsilon)


def _scaled(xf, p, axes, epsilon):
    """``x / max(||x||_p, epsilon)`` with each vector taken at a power-of-two scale.

    With ``s = 2**-k`` (``max|x| = f 2**k``, ``f`` in [0.5, 1); ``k``
    clipped to float32's normal exponents) and ``zs = x * s``:
    ``y = zs / max(||zs||_p, epsilon * s)``, the same for any ``s > 0``, so
    ``s`` carries no gradient. For ``p`` other than 1, 2 and inf the norm
    is taken relative to ``m = max|zs|``, whose power is 1, so no ``p``
    overflows or underflows.
    """
    largest = jax.lax.stop_gradient(jnp.max(jnp.abs(xf), axis=axes, keepdims=True))
    info = jnp.finfo(xf.dtype)
    _, exponent = jnp.frexp(largest)
    exponent = jnp.clip(exponent, info.minexp + 1, info.maxexp - 2)
    s = jax.lax.stop_gradient(jnp.ldexp(jnp.ones_like(largest), -exponent))
    zs = xf * s
    if math.isinf(p) or p in (1, 2):
        norm = _root(_total(zs, p, axes), p)
    else:
        m = jnp.where(largest > 0, largest * s, 1)
        norm = m * _root(_total(zs / m, p, axes), p)
    floor = jnp.maximum(norm, epsilon * s)
    positive = floor > 0
    return jnp.where(positive, zs / jnp.where(positive, floor, 1), 0)
