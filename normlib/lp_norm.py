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
    is the one the unscaled formula gives wherever that is right. ``y`` is
    ``x`` times the reciprocal of the divisor, within an ulp of the quotient.

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
    epsilon = _checks.positive('epsilon', epsilon)
    xf = x.astype(_moments.compute_dtype(x.dtype))
    tiny = float(jnp.finfo(xf.dtype).tiny)
    if epsilon < tiny:  # XLA flushes it to 0: x = 0 would give 0 / 0
        raise ValueError(f'epsilon must be at least {tiny:g}, the smallest normal '
                         f'{xf.dtype.name} (the dtype the norm is computed in), got {epsilon!r}.')
    return _apply(xf, *_factors(p, axes, epsilon, xf)).astype(x.dtype)


def l2_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 2.0, axis=axis, epsilon=epsilon)


def l1_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_1, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 1.0, axis=axis, epsilon=epsilon)


_RANGE = 2.0 ** 100  # sums of powers inside [1 / _RANGE, _RANGE] are safe


def _total(xf, p, axes):
    """``sum |x|**p`` over ``axes`` (``max |x|`` for ``p = inf``), kept dims.

    Never differentiated (:func:`_normalize` has its own rule)."""
    magnitude = jnp.abs(xf)
    if math.isinf(p):
        return jnp.max(magnitude, axis=axes, keepdims=True)
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
    risky = ~(total <= _RANGE)  # also inf and NaN
    if not math.isinf(p) and epsilon < _RANGE ** (-1 / p):
        risky = risky | (total < 1 / _RANGE)
    return risky


def _plain(p, axes, epsilon, xf, total):
    """:func:`_factors` from the unscaled power sum (``s = 1``)."""
    return _outputs(_root(total, p), epsilon, jnp.ones_like(total))


def _scaled(p, axes, epsilon, xf, total):
    """:func:`_factors` with each vector taken at a power-of-two scale ``s``.

    ``s = 2**-k`` where ``max|x| = f 2**k`` (``f`` in [0.5, 1); ``k``
    clipped to the dtype's normal exponents), so ``x s`` is exact and its
    largest magnitude is near 1. For ``p`` other than 1, 2 and inf the norm
    is taken relative to ``m = max|x s|``, whose power is 1, so no ``p``
    overflows or underflows. ``total`` (the unscaled power sum) is not used.
    """
    del total
    largest = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
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
    return _outputs(norm, epsilon * s, s)


def _outputs(norm, floor, s):
    """``(s, inv, norm, weight)`` from ``norm = ||x s||_p`` and ``floor = epsilon s``.

    ``inv`` is finite: the divisor is at least ``epsilon`` (a normal number)
    for ``x = 0``, and near 1 or above wherever ``s < 1``.
    """
    weight = jnp.where(norm > floor, 1.0, jnp.where(norm == floor, 0.5, 0.0)).astype(norm.dtype)
    return s, 1 / jnp.maximum(norm, floor), norm, weight


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _factors(p, axes, epsilon, xf):
    """Per vector ``(s, inv, norm, weight)`` with ``y = x s inv = x / max(||x||_p, epsilon)``.

    ``s`` is a power of two (1 unless the vector is out of range), ``norm =
    ||x s||_p``, ``inv = 1 / max(norm, epsilon s)`` and ``weight = d
    max(||x||_p, epsilon) / d ||x||_p`` as ``jnp.maximum``'s (1 above, 1/2
    at a tie, 0 below).

    Vectors whose powers leave float32's comfortable range are rare: only
    then does the call take :func:`_scaled`, which gives the same ``y`` (bit
    for bit for p = 1, 2 and inf) wherever :func:`_plain` is right, and
    right values where it is not. Ordinary data pay one comparison per
    vector. Only per-vector values leave the branch, and it is never
    differentiated: the rule below gives the derivative of the norm,
    ``v = sign(u) |u|**(p-1)`` with ``u = x s / norm``, bounded, so no
    power of ``x`` is formed (the chain rule through ``x / ||x||`` would
    form ``x / ||x||**2``, which overflows for norms below about 1e-19).
    """
    total = _total(xf, p, axes)
    risky = jnp.any(_out_of_range(total, p, epsilon))
    return jax.lax.cond(risky, functools.partial(_scaled, p, axes, epsilon),
                        functools.partial(_plain, p, axes, epsilon), xf, total)


@_factors.defjvp
def _factors_jvp(p, axes, epsilon, primals, tangents):
    (xf,), (dx,) = primals, tangents
    s, inv, norm, weight = _factors(p, axes, epsilon, xf)  # this rule again at higher orders
    positive = norm > 0
    if math.isinf(p):  # the largest entries, ties sharing
        magnitude = jnp.abs(xf)
        largest = (magnitude == jnp.max(magnitude, axis=axes, keepdims=True)) & positive
        v = jnp.where(largest, jnp.sign(xf), 0) / jnp.maximum(
            jnp.sum(largest, axis=axes, keepdims=True), 1)
    elif p == 1:
        v = jnp.sign(xf)
    else:
        u = xf * s / jnp.where(positive, norm, 1)  # |u| <= 1
        nonzero = u != 0
        v = u if p == 2 else jnp.where(
            nonzero, jnp.sign(u) * jnp.where(nonzero, jnp.abs(u), 1) ** (p - 1), 0)
    dnorm = s * jnp.sum(v * dx, axis=axes, keepdims=True)  # d||x s||
    zero = jnp.zeros_like(weight)
    return (s, inv, norm, weight), (zero, -inv * (weight * (inv * dnorm)), dnorm, zero)


@jax.custom_jvp
def _apply(xf, s, inv, norm, weight):
    """``y = x s inv`` from :func:`_factors`.

    Its rule takes the norm's tangent, not ``inv``'s: ``dy = (dx s - y
    weight dnorm) inv``, whose terms stay in range where ``inv``'s own
    derivative, ``-inv**2 weight dnorm``, would overflow (norms below about
    1e-19).
    """
    del norm, weight
    return xf * s * inv


@_apply.defjvp
def _apply_jvp(primals, tangents):
    xf, s, inv, norm, weight = primals
    dx, _, _, dnorm, _ = tangents
    y = _apply(*primals)
    return y, (dx * s - y * (weight * dnorm)) * inv
