"""Lp normalization of vectors."""

from __future__ import annotations

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
    ``x = 0`` the output is 0 and the gradient finite.

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
    magnitude = jnp.abs(xf)
    if math.isinf(p):
        norm = jnp.max(magnitude, axis=axes, keepdims=True)
    elif p == 1:
        norm = jnp.sum(magnitude, axis=axes, keepdims=True)
    elif p == 2:  # x * x has a finite gradient at 0: only the root needs guarding
        total = jnp.sum(xf * xf, axis=axes, keepdims=True)
        positive = total > 0
        norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1)), 0)
    else:
        # Both wheres keep the gradient finite where x or the norm is 0.
        nonzero = magnitude > 0
        powered = jnp.where(nonzero, jnp.where(nonzero, magnitude, 1) ** p, 0)
        total = jnp.sum(powered, axis=axes, keepdims=True)
        positive = total > 0
        norm = jnp.where(positive, jnp.where(positive, total, 1) ** (1 / p), 0)
    return (xf / jnp.maximum(norm, epsilon)).astype(x.dtype)


def l2_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 2.0, axis=axis, epsilon=epsilon)


def l1_normalize(x, *, axis=-1, epsilon: float = 1e-12) -> jax.Array:
    """``x / max(||x||_1, epsilon)`` along ``axis``; see :func:`lp_normalize`."""
    return lp_normalize(x, 1.0, axis=axis, epsilon=epsilon)
