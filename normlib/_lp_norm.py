"""Lp normalization of vectors."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from normlib import _checks, _moments


def lp_normalize(x: jax.Array, p: float = 2.0, *, axis: int | Sequence[int] = -1,
                 epsilon: float = 1e-12) -> jax.Array:
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
      epsilon: the smallest divisor; at least the smallest normal number of
        the dtype the norm is computed in (``1.2e-38`` for float32), below
        which XLA flushes it to 0.
    """
    x = _checks.floating('x', x)
    axes = _checks.axes('axis', axis, x.ndim)
    p = _checks.positive('p', p)
    epsilon = _checks.epsilon(epsilon, x.dtype)  # x = 0 divides by epsilon
    xf = x.astype(_moments.compute_dtype(x.dtype))
    y, *_ = _normalize(p, axes, epsilon, xf)
    return y.astype(x.dtype)


def l2_normalize(x: jax.Array, *, axis: int | Sequence[int] = -1,
                 epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 2.0, axis=axis, epsilon=epsilon)


def l1_normalize(x: jax.Array, *, axis: int | Sequence[int] = -1,
                 epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_1, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 1.0, axis=axis, epsilon=epsilon)


_RANGE = 2.0 ** 100  # sums of powers inside [1 / _RANGE, _RANGE] are safe


def _total(xf, p, axes):
    """``sum |x|**p`` over ``axes`` (``max |x|`` for ``p = inf``), kept dims.

    Never differentiated (:func:`_normalize` has its own rule)."""
    magnitude = jnp.abs(xf)
    if math.isinf(p):
        return jnp.max(magnitude, axis=axes, keepdims=True, initial=0)
    if p == 1:
        return jnp.sum(magnitude, axis=axes, keepdims=True)
    if p == 2:
        return jnp.sum(xf * xf, axis=axes, keepdims=True)
    return jnp.sum(magnitude ** p, axis=axes, keepdims=True)


def _root(total, p):
    """``total**(1/p)``."""
    if math.isinf(p) or p == 1:
        return total
    return jnp.sqrt(total) if p == 2 else total ** (1 / p)


def _out_of_range(total, p, epsilon):
    """Vectors the plain formula may get wrong: a power sum (or largest entry) that
    overflowed or is huge, or a small one while ``epsilon`` is below where
    underflowed powers could matter (``epsilon < _RANGE**(-1/p)``)."""
    # The norm is checked too: for p < 1 it is a large power of the sum.
    norm = _root(total, p)
    risky = ~(total <= _RANGE) | ~(norm <= _RANGE)  # also inf and NaN
    if not math.isinf(p) and epsilon < _RANGE ** (-1 / p):
        risky = risky | (total < 1 / _RANGE)
    if epsilon < 1 / _RANGE:
        risky = risky | (norm < 1 / _RANGE)
    return risky


def _plain(p, axes, epsilon, xf, total):
    """:func:`_normalize`'s outputs from the unscaled power sum (``s = 1``)."""
    return _outputs(xf, _root(total, p), epsilon, 1)


def _scaled(p, axes, epsilon, xf, total):
    """:func:`_normalize`'s outputs with each vector taken at a power-of-two scale ``s``.

    ``s = 2**-k`` where ``max|x| = f 2**k`` (``f`` in [0.5, 1); ``k``
    clipped to the dtype's normal exponents), so ``zs = x s`` is exact and
    its largest magnitude is near 1: ``y = zs / max(||zs||_p, epsilon s)``.
    For ``p`` other than 1, 2 and inf the norm is taken relative to ``m =
    max|zs|``, whose power is 1, so no ``p`` overflows or underflows.
    ``total`` (the unscaled power sum) is not used.
    """
    del total
    largest = jnp.max(jnp.abs(xf), axis=axes, keepdims=True, initial=0)
    info = jnp.finfo(xf.dtype)
    _, exponent = jnp.frexp(largest)
    exponent = jnp.clip(exponent, info.minexp + 1, info.maxexp - 2)
    s = jnp.ldexp(jnp.ones_like(largest), -exponent)
    zs = xf * s
    if math.isinf(p) or p in (1, 2):
        norm = _root(_total(zs, p, axes), p)
    else:
        m = jnp.where(largest > 0, largest * s, 1)
        norm = m * _root(_total(zs / m, p, axes), p)
    return _outputs(zs, norm, epsilon * s, s)


def _outputs(z, norm, floor, s):
    """``(y, inv, r, weight)`` from ``z = x s``, ``||z||_p`` and ``floor = epsilon s``."""
    bound = jnp.maximum(norm, floor)
    positive = norm > 0
    r = jnp.where(positive, bound / jnp.where(positive, norm, 1), 0)
    weight = jnp.where(norm > floor, 1.0, jnp.where(norm == floor, 0.5, 0.0)).astype(z.dtype)
    return z / bound, s / bound, r, weight


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _normalize(p, axes, epsilon, xf):
    """``(y, inv, r, weight)``: ``y = x / max(||x||_p, epsilon)`` and, per
    vector, ``inv = 1 / max(||x||_p, epsilon)``, ``r = max(||x||_p,
    epsilon) / ||x||_p`` (0 where ``x = 0``; ``x / ||x||_p = y r``) and
    ``weight = d max(||x||_p, epsilon) / d ||x||_p`` as ``jnp.maximum``'s
    (1 above, 1/2 at a tie, 0 below).

    Vectors whose powers leave float32's comfortable range are rare: only
    then does the call take :func:`_scaled`, which gives the same ``y`` (bit
    for bit for p = 1, 2 and inf) wherever :func:`_plain` is right, and
    right values where it is not. Ordinary data pay one comparison per
    vector. The branch is never differentiated (differentiating through
    ``lax.cond`` doubled the backward pass's cost): the rule below takes the
    derivative from these outputs, with the norm's derivative ``v =
    sign(u) |u|**(p-1)``, ``u = y r``, bounded, so no power of ``x`` is formed
    (the chain rule through ``x / ||x||`` would form ``x / ||x||**2``, which
    overflows for norms below about 1e-19).
    """
    total = _total(xf, p, axes)
    risky = jnp.any(_out_of_range(total, p, epsilon))
    return jax.lax.cond(risky, functools.partial(_scaled, p, axes, epsilon),
                        functools.partial(_plain, p, axes, epsilon), xf, total)


@_normalize.defjvp
def _normalize_jvp(p, axes, epsilon, primals, tangents):
    (xf,), (dx,) = primals, tangents
    y, inv, r, weight = _normalize(p, axes, epsilon, xf)  # this rule again at higher orders
    if math.isinf(p):  # the largest entries, ties sharing
        magnitude = jnp.abs(xf)
        largest = (magnitude == jnp.max(magnitude, axis=axes, keepdims=True, initial=0)) & (r > 0)
        v = jnp.where(largest, jnp.sign(xf), 0) / jnp.maximum(
            jnp.sum(largest, axis=axes, keepdims=True), 1)
    elif p == 1:
        v = jnp.sign(xf)
    elif p == 2:
        v = y * r
    else:
        u = y * r
        nonzero = u != 0
        v = jnp.where(nonzero, jnp.sign(u) * jnp.where(nonzero, jnp.abs(u), 1) ** (p - 1), 0)
    dn = inv * jnp.sum(v * dx, axis=axes, keepdims=True)  # d||x|| / max(||x||, epsilon)
    # y = x inv, so dy = dx inv + x dinv with dinv = -inv weight dn; inv's own
    # tangent (needed only at higher orders) may overflow where dy does not.
    dy = dx * inv - y * (weight * dn)
    return (y, inv, r, weight), (dy, -inv * (weight * dn), (weight - r) * r * dn,
                                 jnp.zeros_like(weight))
