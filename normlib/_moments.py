"""Moments and normalization: the only place where statistics are computed.

Every normalizer in normlib (batch, layer, RMS, group, instance) goes through
:func:`standardize`, which

1. computes per-shard moments with a shifted two-pass algorithm (stable for
      any offset, masked entries left out),
2. merges the shards' ``(count, mean, var)`` across named axes with a single
      collective and Chan et al.'s pairwise formula, so the result equals the
      moments of the concatenated valid elements,
3. normalizes, with a custom VJP that saves only ``x``, the float32 mean and
      the inverse standard deviation, and syncs its two reductions in a single
      collective.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Spec(NamedTuple):
    """Static description of one standardization.

    Attributes:
        axes: reduced axes of ``x``.
        epsilon: added to the variance inside the square root.
        center: subtract the mean (False gives RMS normalization).
        axis_name: named mapped axes to reduce over as well, or None.
        axis_index_groups: device groups for ``axis_name``, or None.
    """
    axes: tuple[int, ...]
    epsilon: float
    center: bool = True
    axis_name: tuple[Any, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


def compute_dtype(dtype) -> jnp.dtype:
    """float32, or the input's dtype if it is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _sum(x, axes):
    return jnp.sum(x, axis=axes, keepdims=True)


def local_moments(x, axes, mask, center=True):
    """Count, mean and biased variance of one shard, kept dims.

    The mean is taken around a shift (the first element along ``axes``) so
    that large offsets do not swamp the float32 sum; the variance pass uses
    the corrected two-pass formula ``mean(e**2) - mean(e)**2`` with
    ``e = x - mean``, whose correction term removes what error the mean
    still has. Without ``center`` the mean is 0 and ``var`` is ``mean(x**2)``.
    """
    if mask is None:
        count = jnp.full((1,) * x.ndim, np.prod([x.shape[a] for a in axes]),
                                          x.dtype)
    else:
        count = _sum(mask, axes).astype(x.dtype)
    safe = jnp.maximum(count, 1)
    keep = (lambda v: v) if mask is None else (lambda v: jnp.where(mask, v, 0))
    if not center:
        var = _sum(keep(x * x), axes) / safe
        return count, jnp.zeros_like(var), var
    shift = jax.lax.stop_gradient(
            x[tuple(slice(0, 1) if i in axes else slice(None)
                            for i in range(x.ndim))])
    mean = shift + _sum(keep(x - shift), axes) / safe
    e = keep(x - mean)
    var = _sum(e * e, axes) / safe - jnp.square(_sum(e, axes) / safe)
    var = jnp.maximum(var, 0)
    if mask is not None:
        mean = jnp.where(count > 0, mean, 0)
    return count, mean, var


def _gather(stats, axis_name, groups):
    """Every shard's ``stats`` stacked along a new leading axis, in one psum.

    Each shard writes its stats into its own slot of a zero buffer and the
    buffers are summed. Unlike ``all_gather``, this works for any mix of
    pmap, vmap and shard_map axes, and its result is known to be replicated,
    so shard_map accepts the new running statistics as replicated outputs.
    """
    index = jax.lax.axis_index(axis_name)
    size = jax.lax.axis_size(axis_name)
    if groups is not None:
        position = np.zeros(size, np.int32)
        for group in groups:
            position[list(group)] = np.arange(len(group))
        index, size = jnp.asarray(position)[index], len(groups[0])
    slots = jnp.zeros((size,) + stats.shape, stats.dtype).at[index].set(stats)
    return jax.lax.psum(slots, axis_name, axis_index_groups=groups)


def merge_moments(count, mean, var, axis_name, groups=None):
    """Moments of the union of all shards along ``axis_name``.

    Chan, Golub & LeVeque (1979): with weights ``w_i = n_i / N``,
    ``mean = sum_i w_i mean_i`` and
    ``var = sum_i w_i (var_i + (mean_i - mean)**2)``. Means are taken relative
    to the first shard's so the differences stay exact for offset data.
    """
    count = jnp.broadcast_to(count, mean.shape)
    parts = _gather(jnp.stack([count, mean, var]), axis_name, groups)
    counts, means, variances = parts[:, 0], parts[:, 1], parts[:, 2]
    total = jnp.sum(counts, axis=0)
    weights = counts / jnp.maximum(total, 1)
    offsets = means - means[:1]
    delta = jnp.sum(weights * offsets, axis=0)
    merged_var = jnp.sum(
            weights * (variances + jnp.square(offsets - delta)), axis=0)
    return total, means[0] + delta, merged_var


def moments(x, axes, *, mask=None, center=True, axis_name=None,
                        axis_index_groups=None):
    """``(count, mean, var)`` over ``axes`` and ``axis_name``, kept dims."""
    count, mean, var = local_moments(x, axes, mask, center)
    if axis_name is not None:
        count, mean, var = merge_moments(count, mean, var, axis_name,
                                                                          axis_index_groups)
    return count, mean, var


def _affine(xhat, scale, bias):
    if scale is not None:
        xhat = xhat * scale
    if bias is not None:
        xhat = xhat + bias
    return xhat


def normalize(x, mean, var, scale=None, bias=None, *, epsilon):
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in ``x``'s dtype."""
    dtype = compute_dtype(x.dtype)
    xhat = (x.astype(dtype) - mean) * jax.lax.rsqrt(var + epsilon)
    return _affine(xhat, scale, bias).astype(x.dtype)


def _forward(spec, x, scale, bias, mask):
    xf = x.astype(compute_dtype(x.dtype))
    count, mean, var = moments(
            xf, spec.axes, mask=mask, center=spec.center, axis_name=spec.axis_name,
            axis_index_groups=spec.axis_index_groups)
    inv = jax.lax.rsqrt(var + spec.epsilon)
    y = _affine((xf - mean) * inv, scale, bias).astype(x.dtype)
    return (y, count, mean, var), (x, scale, bias, mask, count, mean, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def standardize(spec, x, scale, bias, mask):
    """Normalizes ``x`` with its own moments; returns ``(y, count, mean, var)``.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with the biased
    variance over ``spec.axes`` (and ``spec.axis_name``), entries where
    ``mask`` is False left out of the moments. ``scale``/``bias`` (or None)
    broadcast against ``x``. The returned moments are float32 (kept dims) and
    carry no gradient: callers wrap them in ``stop_gradient``.
    """
    return _forward(spec, x, scale, bias, mask)[0]


def _reduce_to(value, shape):
    """Sums ``value`` down to the broadcast ``shape``."""
    axes = tuple(i for i, (a, b) in enumerate(zip(value.shape, shape))
                              if b == 1 and a != 1)
    return jnp.sum(value, axis=axes, keepdims=True).reshape(shape)


def _backward(spec, residuals, cotangents):
    x, scale, bias, mask, count, mean, inv = residuals
    dtype = compute_dtype(x.dtype)
    dy = cotangents[0].astype(dtype)
    xhat = (x.astype(dtype) - mean) * inv
    dscale = None if scale is None else _reduce_to(dy * xhat, scale.shape).astype(scale.dtype)
    dbias = None if bias is None else _reduce_to(dy, bias.shape).astype(bias.dtype)
    g = dy if scale is None else dy * scale
    # dx = inv * (g - mask * (sum(g) + xhat * sum(g * xhat)) / count): every
    # output (masked too) depends on the moments, which depend on the valid
    # entries only. Both sums of every shard go in one collective.
    sums = [_sum(g * xhat, spec.axes)]
    if spec.center:
        sums.append(_sum(g, spec.axes))
    sums = jnp.stack(sums)
    if spec.axis_name is not None:
        sums = jax.lax.psum(sums, spec.axis_name,
                                                axis_index_groups=spec.axis_index_groups)
    sums = sums / jnp.maximum(count, 1)
    correction = xhat * sums[0]
    if spec.center:
        correction = correction + sums[1]
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = (inv * (g - correction)).astype(x.dtype)
    return dx, *_replicated_like((dscale, dbias), (scale, bias)), None


def _varying(x):
    """The shard_map axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, 'manual_axis_type', None)
    return set(manual.varying) if manual is not None else set(getattr(aval, 'vma', ()))


def _replicated_like(cotangents, primals):
    """Sums cotangents over the shard_map axes their primals are replicated on.

    A replicated scale used by every shard gets the sum of the shards'
    cotangents (what JAX's own transpose of the implicit broadcast does);
    outside shard_map there is nothing to sum.
    """
    axes = set()
    for ct, primal in zip(cotangents, primals):
        if ct is not None:
            axes |= _varying(ct) - _varying(primal)
    if not axes:
        return cotangents
    return jax.lax.psum(cotangents, tuple(sorted(axes)))


standardize.defvjp(_forward, _backward)
