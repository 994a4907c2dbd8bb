"""Moments and normalization: the only place where statistics are computed.

Every normalizer in normlib (batch, layer, RMS, group, instance) goes through
:func:`standardize`, which

1. computes per-shard moments around a shift, in two passes with a third
   only when the shift lies far from the mean (stable for any offset,
   masked entries left out),
2. merges the shards' ``(count, mean, var)`` across named axes with a single
   collective and Chan et al.'s pairwise formula, so the result equals the
   moments of the concatenated valid elements,
3. normalizes, with a custom VJP that saves only ``x``, the float32 mean (as
   ``shift + delta``) and the inverse standard deviation, and syncs its two
   reductions in a single collective.

Normalization is memory-bound, so the code is shaped by what XLA fuses: each
reduction over leading axes is its own pass over ``x``, while reductions over
trailing axes can share one sweep with the elementwise work around them.
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
        axis_sizes: the sizes of the ``axis_name`` axes; :func:`standardize`
          fills them in (inside a custom VJP under ``vmap``-in-``pmap`` they
          cannot be looked up).
    """
    axes: tuple[int, ...]
    epsilon: float
    center: bool = True
    axis_name: tuple[Any, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    axis_sizes: tuple[int, ...] | None = None


def compute_dtype(dtype) -> jnp.dtype:
    """float32, or the input's dtype if it is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _sum(x, axes):
    return jnp.sum(x, axis=axes, keepdims=True)


def _trailing(axes, ndim):
    """Whether ``axes`` are the last ones, so each reduced slice is contiguous."""
    return tuple(axes) == tuple(range(ndim - len(axes), ndim))


def _fresh(values, tag):
    """``values`` (a tuple), hidden from XLA:CPU's common-subexpression elimination.

    XLA:CPU writes to memory an elementwise result that a reduction shares
    with another consumer, and runs each reduction as its own pass. Giving
    each pass its own copy of its operands lets it recompute the elementwise
    part in registers instead. XLA merges identical barriers, so each tag
    rotates the operands differently. GPUs fuse sibling reductions and their
    consumers themselves, which the copies would prevent: there (judged by
    the default backend) the values pass unchanged.
    """
    if jax.default_backend() != 'cpu':
        return values
    k = tag % len(values)
    rotated = jax.lax.optimization_barrier(values[k:] + values[:k])
    return rotated[len(values) - k:] + rotated[:len(values) - k]


# Re-center when the shift lies more than sqrt(_FAR) standard deviations from
# the mean: below that, mean(d**2) - mean(d)**2 loses at most log10(_FAR)
# digits to cancellation.
_FAR = 1e2


def _shifted_moments(x, axes, mask, center, sweep=False):
    """``(count, shift, delta, var)`` of one shard, kept dims; mean = shift + delta.

    Both moments are taken around a shift, the first valid element along
    ``axes`` (else 0): ``delta = mean(x - shift)`` and
    ``var = mean((x - shift)**2) - delta**2``. Keeping the mean split as
    ``shift + delta`` keeps ``x - mean`` exact in float32 for any offset.

    Re-centering repeats this around ``shift + delta``, where
    ``x - shift`` is exact for data near the mean and ``delta`` is tiny.
    With ``sweep`` (XLA fuses every pass over a row into one sweep, so
    passes are free) it is always done. Otherwise each reduction costs a
    pass over ``x``; the two sums are independent, so XLA:CPU runs them
    concurrently, and re-centering (two more passes) runs only when the
    shift lies far from the mean (an outlier, a masked first element),
    where the subtraction would cancel digits.

    Without ``center``, shift and delta are 0 and ``var = mean(x**2)``.
    """
    dtype = compute_dtype(x.dtype)

    def read(*small, tag=0):  # x in the compute dtype and small operands, private to one pass
        x_, *small = (x, *small) if sweep else _fresh((x, *small), tag)
        return (x_.astype(dtype), *small)

    if mask is None:
        count = jnp.full((1,) * x.ndim, np.prod([x.shape[a] for a in axes]), dtype)
    else:
        count = _sum(mask, axes).astype(dtype)
    safe = jnp.maximum(count, 1)
    # Squares are divided by the count before summing, so a sum of n
    # squares near the float32 limit cannot overflow a representable mean.
    share = 1 / safe
    keep = (lambda v: v) if mask is None else (lambda v: jnp.where(mask, v, 0))
    if not center:
        xs, = read()
        var = _sum(keep(xs * xs) * share, axes)
        return count, jnp.zeros_like(var), jnp.zeros_like(var), var
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    shift = x[first].astype(dtype)
    shift = jax.lax.stop_gradient(shift if mask is None else jnp.where(mask[first], shift, 0))
    xs, pass_shift = read(shift)
    delta = _sum(keep(xs - pass_shift), axes) / safe

    def recenter(shift, delta, var=None):
        shift = shift + delta
        d = keep(x.astype(dtype) - shift)
        delta = _sum(d, axes) / safe
        return shift, delta, jnp.maximum(_sum(d * d * share, axes) - jnp.square(delta), 0)

    def passes(shift, delta):
        xs, pass_shift = read(shift, tag=1)
        var = _sum(keep(jnp.square(xs - pass_shift)) * share, axes) - jnp.square(delta)
        far = jnp.any(jnp.square(delta) > _FAR * var)
        return jax.lax.cond(far, recenter, lambda *s: s, shift, delta, jnp.maximum(var, 0))

    if sweep:
        shift, delta, var = recenter(shift, delta)
    else:
        # A GPU fuses re-centering's two sums into one pass, and its
        # conditionals would wait for the device: there, always re-center.
        shift, delta, var = jax.lax.platform_dependent(shift, delta, cpu=passes,
                                                       default=recenter)
    if mask is not None:
        shift, delta = (jnp.where(count > 0, s, 0) for s in (shift, delta))
    return count, shift, delta, var


def _gather(stats, axis_name, groups, sizes=None):
    """The ``stats`` of every shard in this shard's group, stacked, in one psum.

    Each shard writes its stats into its own slot of a zero buffer and the
    buffers are summed. Unlike ``all_gather``, this works for any mix of
    pmap, vmap and shard_map axes, and its result is known to be replicated,
    so shard_map accepts the new running statistics as replicated outputs.
    Groups are taken from the full buffer afterwards, since vmap and
    shard_map collectives take no ``axis_index_groups``.
    """
    if sizes is None:
        sizes = tuple(jax.lax.axis_size(name) for name in axis_name)
    index, size = 0, 1
    for name, n in zip(axis_name, sizes):  # row-major; a tuple's axis_index
        index, size = index * n + jax.lax.axis_index(name), size * n  # fails in vmap-in-pmap
    slots = jnp.zeros((size,) + stats.shape, stats.dtype).at[index].set(stats)
    parts = jax.lax.psum(slots, axis_name)
    if groups is None:
        return parts
    members = np.zeros((size, len(groups[0])), np.int32)
    for group in groups:
        members[list(group)] = group
    return parts[jnp.asarray(members)[index]]


def group_sum(value, axis_name, groups, sizes=None):
    """``psum`` of ``value`` within this shard's group."""
    if groups is None:
        return jax.lax.psum(value, axis_name)
    return jnp.sum(_gather(value, axis_name, groups, sizes), axis=0)


def combine(counts, shifts, deltas, variances):
    """Chan et al.'s merge of shifted moments stacked along axis 0.

    Each part ``i`` holds ``counts[i]`` entries with mean
    ``shifts[i] + deltas[i]`` and biased variance ``variances[i]``; returns
    ``(total, shift, delta, var)`` of their union. Every part's mean is taken
    relative to the shift of the part with the most valid entries, so the
    differences stay exact for offset data.
    """
    total = jnp.sum(counts, axis=0)
    weights = counts / jnp.maximum(total, 1)
    shift = jnp.take_along_axis(shifts, jnp.argmax(counts, axis=0)[None], axis=0)[0]
    offsets = (shifts - shift) + deltas
    delta = jnp.sum(weights * offsets, axis=0)
    var = jnp.sum(weights * (variances + jnp.square(offsets - delta)), axis=0)
    return total, shift, delta, var


def _merge(count, shift, delta, var, axis_name, groups, sizes=None):
    """Shifted moments merged across ``axis_name`` (see :func:`combine`)."""
    count = jnp.broadcast_to(count, var.shape)
    parts = _gather(jnp.stack([count, shift, delta, var]), axis_name, groups, sizes)
    return combine(parts[:, 0], parts[:, 1], parts[:, 2], parts[:, 3])


def _shifted(x, axes, mask, center, axis_name, groups, sizes=None, sweep=False):
    """Shifted moments over ``axes`` and ``axis_name``."""
    count, shift, delta, var = _shifted_moments(x, axes, mask, center, sweep)
    if axis_name is not None:
        count, shift, delta, var = _merge(count, shift, delta, var, axis_name, groups, sizes)
    return count, shift, delta, var


def moments(x, axes, *, mask=None, center=True, axis_name=None,
            axis_index_groups=None):
    """``(count, mean, var)`` over ``axes`` and ``axis_name``, kept dims."""
    count, shift, delta, var = _shifted(x, axes, mask, center, axis_name, axis_index_groups)
    return count, shift + delta, var


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


def _standard(x, shift, delta, inv, center):
    """``(x - mean) * inv`` with the mean split as ``shift + delta``."""
    return ((x - shift) - delta) * inv if center else x * inv


def _forward(spec, x, scale, bias, mask, sweep=False):
    xf = x.astype(compute_dtype(x.dtype))
    count, shift, delta, var = _shifted(x, spec.axes, mask, spec.center, spec.axis_name,
                                        spec.axis_index_groups, spec.axis_sizes, sweep)
    inv = jax.lax.rsqrt(var + spec.epsilon)
    y = _affine(_standard(xf, shift, delta, inv, spec.center), scale, bias).astype(x.dtype)
    return (y, count, shift + delta, var), (x, scale, bias, mask, count, shift, delta, inv)


def standardize(spec, x, scale, bias, mask):
    """Normalizes ``x`` with its own moments; returns ``(y, count, mean, var)``.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with the biased
    variance over ``spec.axes`` (and ``spec.axis_name``), entries where
    ``mask`` is False left out of the moments. ``scale``/``bias`` (or None)
    broadcast against ``x``. The returned moments are float32 (kept dims) and
    carry no gradient: callers wrap them in ``stop_gradient``.
    """
    if spec.axis_name is not None and spec.axis_sizes is None:
        spec = spec._replace(axis_sizes=tuple(jax.lax.axis_size(n) for n in spec.axis_name))
    return _standardize(spec, x, scale, bias, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _standardize(spec, x, scale, bias, mask):
    # Undifferentiated, with trailing axes, the moments can be computed in the
    # same sweep as y; for the backward pass they must be saved, so the
    # forward rule takes them in separate passes.
    return _forward(spec, x, scale, bias, mask, sweep=_trailing(spec.axes, x.ndim))[0]


def _broadcast_axes(shape, full):
    """The axes along which an array of ``shape`` is broadcast to ``full``."""
    return tuple(i for i, (a, b) in enumerate(zip(full, shape)) if b == 1 and a != 1)


def _reduce_to(value, shape):
    """Sums ``value`` down to the broadcast ``shape``."""
    return jnp.sum(value, axis=_broadcast_axes(shape, value.shape), keepdims=True).reshape(shape)


def _backward(spec, residuals, cotangents):
    x, scale, bias, mask, count, shift, delta, inv = residuals
    dtype = compute_dtype(x.dtype)
    reduced = {a for a in spec.axes if x.shape[a] != 1}

    def read(tag):  # (xhat, g, dy) computed privately for one pass (see _fresh)
        x_, dy, *small = _fresh((x, cotangents[0], shift, delta, inv), tag)
        dy = dy.astype(dtype)
        xhat = _standard(x_.astype(dtype), *small, spec.center)
        if mask is not None:  # masked padding may hold NaN or inf; with no
            xhat = jnp.where(mask | (dy != 0), xhat, 0)  # cotangent it adds nothing
        return xhat, dy if scale is None else dy * scale, dy

    def constant(p):  # along the reduced axes
        return p is None or (p.ndim == x.ndim and reduced <= set(_broadcast_axes(p.shape, x.shape)))

    # dx = inv * (g - mask * (sum(g) + xhat * sum(g * xhat)) / count) with
    # g = dy * scale: every output (masked too) depends on the moments, which
    # depend on the valid entries only.
    sum_dy = None
    if constant(scale):
        # sum(g * xhat) = scale * sum(dy * xhat): the two sums double as the
        # parameters' gradients (batch norm), so each costs one pass.
        xhat, _, dy = read(0)
        sum_dyx = _sum(dy * xhat, spec.axes)
        if spec.center or constant(bias) and bias is not None:
            sum_dy = _sum(read(1)[2], spec.axes)
        factor = 1 if scale is None else scale
        sums = [factor * sum_dyx] + ([factor * sum_dy] if spec.center else [])
        dscale = None if scale is None else _reduce_to(sum_dyx, scale.shape)
    else:
        xhat, g, _ = read(0)
        sums = [_sum(g * xhat, spec.axes)] + ([_sum(read(1)[1], spec.axes)] if spec.center else [])
        xhat, _, dy = read(2)
        dscale = _reduce_to(dy * xhat, scale.shape)
    if bias is None:
        dbias = None
    else:
        dbias = _reduce_to(sum_dy if sum_dy is not None and constant(bias) else read(3)[2],
                           bias.shape)
    sums = jnp.stack(sums)
    if spec.axis_name is not None:  # both sums of every shard in one collective
        sums = group_sum(sums, spec.axis_name, spec.axis_index_groups, spec.axis_sizes)
    safe = jnp.maximum(count, 1)
    xhat, g, _ = read(4)
    correction = xhat * (sums[0] / safe)
    if spec.center:
        correction = correction + sums[1] / safe
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = (inv * (g - correction)).astype(x.dtype)
    dscale, dbias = (None if d is None else d.astype(p.dtype)
                     for d, p in ((dscale, scale), (dbias, bias)))
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


_standardize.defvjp(_forward, _backward)


def mean_absolute_deviation(x, axes, mean, *, mask=None, count, axis_name=None,
                            axis_index_groups=None):
    """``mean(|x - mean|)`` over ``axes`` and ``axis_name`` (valid entries), kept dims.

    ``mean`` and ``count`` are the merged ones from :func:`moments`, so the
    deviations of every shard are taken from the same global mean.
    """
    deviation = jnp.abs(x - mean)
    if mask is not None:
        deviation = jnp.where(mask, deviation, 0)
    total = _sum(deviation, axes)
    if axis_name is not None:
        total = group_sum(total, axis_name, axis_index_groups)
    return total / jnp.maximum(count, 1)
