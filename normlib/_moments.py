"""Moments and standardization: the only place where statistics are computed.

Every normalizer in normlib (batch, layer, RMS, group and instance norm, and
the batch-norm variants) goes through this module:

1. :func:`moments` takes the count, mean and biased variance of the valid
   entries with the corrected two-pass algorithm around an anchor near the
   mean, and merges the shards of named axes in two collectives whose size
   does not depend on the number of shards (:func:`_merge_shards`);
2. :func:`merge` combines parts with Chan et al.'s formula, so shards and
   batches over time (precise statistics) give the moments of their union;
3. :func:`standardize` normalizes with the moments. Its custom JVP is linear
   in the tangents, so JAX derives the reverse pass by transposition: forward
   and reverse mode, at any order, with a backward pass that saves ``x`` and
   per-feature vectors only and synchronizes devices once.

No branch depends on the data. What is shaped for a backend (each pass's
private copy of its operands on CPU) lives in :mod:`normlib._schedule` and
changes no number.

References:
  Chan, Golub & LeVeque, `Algorithms for computing the sample variance:
  analysis and recommendations <https://doi.org/10.1080/00031305.1983.10483115>`_,
  1983 (the corrected two-pass algorithm and the pairwise merge).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normlib import _schedule


class Moments(NamedTuple):
    """Count, mean and biased variance of the valid entries, per feature.

    All four fields have the same shape.

    The mean is kept as the sum ``shift + delta`` of a value near the data
    (``shift``) and a small correction (``delta``): for data whose mean is far
    larger than its spread, ``(x - shift) - delta`` is exact where
    ``x - (shift + delta)`` would round the mean first.

    Attributes:
      count: the number of valid entries (float32 or wider).
      shift: the anchor of the mean; constant (it carries no gradient).
      delta: the mean minus ``shift``.
      var: the biased variance, ``mean((x - mean)**2)``; for uncentered
        moments (RMS norm) the mean square, with ``shift = delta = 0``.
    """
    count: jax.Array
    shift: jax.Array
    delta: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.delta


def laid_out_as(value, reference):
    """``value`` (broadcasting against ``reference``) plus a zero of
    ``reference``'s layout: on a mesh with Explicit axes, ``jnp.where`` takes
    no mix of shardings, and replicated running statistics meet
    feature-sharded batch statistics. The value is unchanged (``-0.0``
    becomes ``0.0``)."""
    return value + like(jnp.zeros_like(reference), value)


def compute_dtype(dtype) -> jnp.dtype:
    """float32 (complex64 for complex input), or the input's dtype if wider.

    Narrow floats (float16, bfloat16, the float8 formats) compute in float32.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.promote_types(dtype, jnp.complex64)
    return dtype if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
    """The dtype of the statistics that are real (count, variance)."""
    return jnp.finfo(compute_dtype(dtype)).dtype


def _abs2(v):
    """``|v|**2``, real; ``v * v`` for real ``v``."""
    return jnp.square(v) if not jnp.iscomplexobj(v) else jnp.square(v.real) + jnp.square(v.imag)


def like(r, v):
    """The real ``r`` in ``v``'s dtype where ``v`` is complex (exact), so that
    their arithmetic also runs under ``jax.numpy_dtype_promotion('strict')``,
    which takes no mix of real and complex arrays; otherwise ``r`` unchanged."""
    if jnp.iscomplexobj(v) and not jnp.iscomplexobj(r):
        return jnp.asarray(r).astype(jnp.result_type(v))
    return r


def _real_product(a, b):
    """``Re(conj(a) * b)``; ``a * b`` for real input."""
    if not (jnp.iscomplexobj(a) or jnp.iscomplexobj(b)):
        return a * b
    a, b = jnp.asarray(a), jnp.asarray(b)
    return a.real * b.real + a.imag * b.imag


def _sum(x, axes):
    return jnp.sum(x, axis=axes, keepdims=True)


# The anchor of dense data is the mean of this many entries spread over the
# reduced axes: within a fraction of a standard deviation of the mean unless
# the data are laid out against the sample.
_SAMPLE = 256


def _anchor(xf, axes, mask, keep, count, own):
    """A float32 value next to the mean of the valid entries, kept dims.

    Dense data reduced over leading axes (batch statistics, where each
    feature's entries are spread over memory): the mean of up to ``_SAMPLE``
    entries at fixed positions spread over the reduced axes (all of them,
    for small inputs), which costs no pass over ``x``. Otherwise (masked
    data, rows of per-example statistics): the first valid entry (else 0)
    moved by the mean deviation from it, one pass, which XLA fuses with the
    others over a row, so the anchor is near the valid entries however few
    they are. ``own`` is the copy of ``xf`` that the pass reads (on CPU a
    private one, so that ``xf`` is not written to memory).
    """
    if any(xf.shape[a] == 0 for a in axes):  # nothing to anchor: any value will do
        return jnp.zeros(tuple(1 if i in axes else d for i, d in enumerate(xf.shape)), xf.dtype)
    if mask is None and axes and tuple(axes) == tuple(range(len(axes))):
        return _per_shard(_sample_mean, xf, axes)
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(xf.ndim))
    anchor = _pick(xf, first, axes)
    if mask is not None:
        anchor = jnp.where(_pick(mask, first, axes), anchor, 0)
    # A quotient, not a product: each pass that subtracts the anchor may
    # compute it again, and a product there can be contracted into a fused
    # multiply-add that rounds it differently; a quotient rounds the same way
    # everywhere, so every pass takes its sums around the same anchor.
    total = _sum(keep(own - anchor), axes)
    return anchor + total / like(jnp.maximum(count, 1), total)


def _sample_mean(xf, axes):
    """The mean of up to ``_SAMPLE`` entries at fixed positions spread over the
    leading ``axes`` (all of them, for small inputs), kept dims."""
    sizes = [xf.shape[a] for a in axes]
    if not all(isinstance(d, int) for d in sizes):
        return _symbolic_sample_mean(xf, axes)
    total = int(np.prod(sizes))
    m = min(total, _SAMPLE)
    # Evenly spread positions, each jittered within its stride so that a
    # sample does not line up with a period of the layout (image corners).
    flat = (np.arange(m) * total) // m + (np.arange(m) * 40503) % max(total // m, 1)
    positions = iter(np.unravel_index(flat, sizes))
    sample = xf[tuple(next(positions) if i in axes else slice(None) for i in range(xf.ndim))]
    # A quotient rounded once, as in _anchor: XLA turns a division by the
    # constant m into a product with 1/m, which each pass that recomputes the
    # anchor may contract into a fused multiply-add and round differently.
    total = jnp.sum(sample, axis=0)
    return exact_quotient(total, jnp.asarray(m, total.dtype)).reshape(
        (1,) * len(axes) + sample.shape[1:])


def _symbolic_sample_mean(xf, axes):
    """:func:`_sample_mean` for leading axes of symbolic size (``jax.export``
    with a symbolic batch): ``_SAMPLE`` evenly spread positions computed in
    the program, repeated where there are fewer entries (still a mean of
    data values)."""
    lead = len(axes)
    rows = xf.reshape((-1,) + xf.shape[lead:])
    total = jnp.asarray(rows.shape[0], jnp.int32)
    step = jnp.arange(_SAMPLE, dtype=jnp.int32)
    # (i * total) // _SAMPLE without an int32 product that could overflow.
    positions = step * (total // _SAMPLE) + (step * (total % _SAMPLE)) // _SAMPLE
    sample = rows[jnp.minimum(positions, jnp.maximum(total - 1, 0))]
    return jnp.mean(sample, axis=0).reshape((1,) * lead + rows.shape[1:])


def _explicit(v, axes):
    """``(mesh, spec, names)`` when ``v`` is laid out on a mesh with Explicit
    axes (``jax.make_mesh``'s default), ``names`` the mesh axes that shard the
    reduced ``axes``; else None. On such a mesh a pick along a sharded axis
    has no sharding JAX can infer."""
    sharding = jax.typeof(v).sharding
    if not getattr(sharding.mesh, 'explicit_axes', ()):
        return None
    spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
    return sharding.mesh, spec, _names([spec[a] for a in axes])


def _names(spec) -> tuple:
    """The mesh axis names in the entries of a PartitionSpec."""
    return tuple(n for entry in spec
                 for n in ((entry,) if isinstance(entry, str) else entry or ()))


def _per_shard(anchor, v, axes):
    """``anchor(v, axes)``; on an Explicit mesh that shards ``axes``, each
    shard's anchor of its own entries, averaged over the shards (equal
    shares): one collective of the kept shape, where picking entries across
    shards would send the whole sample."""
    explicit = _explicit(v, axes)
    if explicit is None or not explicit[2]:
        return anchor(v, axes)
    mesh, spec, names = explicit
    kept = jax.P(*[None if i in axes else s for i, s in enumerate(spec)])
    local = lambda v: jax.lax.pmean(anchor(v, axes), names)
    return jax.shard_map(local, mesh=mesh, in_specs=jax.P(*spec), out_specs=kept,
                         axis_names=set(_names(spec)))(v)


def _pick(v, index, axes):
    """``v[index]``, static slices along the reduced ``axes``.

    On a mesh with Explicit axes, where a slice of a sharded axis has no
    sharding JAX can infer, it runs with the mesh's axes Auto; its result is
    replicated along ``axes`` and sharded as ``v`` elsewhere.
    """
    explicit = _explicit(v, axes)
    if explicit is None:
        return v[index]
    kept = [None if i in axes else s for i, s in enumerate(explicit[1])]
    return jax.sharding.auto_axes(lambda v: v[index], out_sharding=jax.P(*kept))(v)


def exact_quotient(a, b):
    """``a / b`` rounded once. XLA rewrites a division by a broadcast value
    (a count shared by a row) as a product with its rounded reciprocal;
    ``b + 0 * a`` is no broadcast, and is batched as ``a`` under ``vmap``
    (a ``zeros_like(a)`` would not be); the barrier keeps XLA from seeing
    through it."""
    return a / jax.lax.optimization_barrier(like(b, a) + 0 * a)


def finite_padding(v, mask, fill=0):
    """``v`` with its masked non-finite entries replaced by ``fill``.

    Masked padding may hold NaN or inf. It adds nothing to a result, but
    with a zero cotangent there ``0 * NaN`` would still reach the gradients
    of everything it meets; with ``fill`` in its place it cannot. Valid
    entries, and finite padding, are unchanged.
    """
    if mask is None:
        return v
    return jnp.where(mask | jnp.isfinite(v), v, fill)


def _count(mask, axes, dtype=jnp.float32):
    """The number of True entries of ``mask`` over ``axes`` (kept dims), in
    ``dtype``: summed in int32 within each index of the first axis, then in
    ``dtype`` across it, so no sum wraps past int32's range (a global batch
    can hold more valid entries per feature)."""
    inner = tuple(axes[1:])
    partial = jnp.sum(mask, axis=inner, keepdims=True, dtype=jnp.int32) if inner else mask
    return jnp.sum(partial.astype(dtype), axis=tuple(axes[:1]), keepdims=True)


def _part_moments(x, axes, mask, center, scale=None, checked=False) -> Moments:
    """The :class:`Moments` of one part over ``axes`` (kept dims), of ``x * scale``.

    Centered, the corrected two-pass algorithm around an anchor, a float32
    value next to the mean (:func:`_anchor`): with ``d = x - anchor``,
    ``delta = mean(d)`` and ``var = mean(d**2) - delta**2``. ``d`` is exact
    for data near the mean at any offset, and ``delta`` is small against the
    spread, so nothing cancels: the moments are as accurate as the plain
    float32 two-pass ``mean(x)``, ``mean((x - mean(x))**2)`` wherever the
    data sit, and far more accurate at large offsets.

    Squares are divided by the count before they are summed, so that a sum
    of squares near the float32 limit cannot overflow a representable mean;
    ``checked`` divides the sum instead, one product per entry fewer: for
    the passes of :func:`_guarded_moments`, whose first pass is taken again
    at a power-of-two scale when a sum overflowed and whose scaled pass sums
    squares below ``2**(2 * _HEADROOM + 2)``. The two passes then round the
    same way, and give the same moments up to the scale's power of two.
    """
    dtype, real = compute_dtype(x.dtype), real_dtype(x.dtype)
    def widen(v, s):
        v = v.astype(dtype)
        return v if scale is None else v * like(s, v)
    xf = widen(x, scale)
    if mask is None:
        # math.prod keeps a symbolic size (jax.export) symbolic.
        count = jnp.full((1,) * x.ndim, math.prod(x.shape[a] for a in axes), real)
        keep = lambda v: v
    else:
        count = _count(mask, axes, real)
        keep = lambda v: jnp.where(mask, v, 0)
    share = 1 / jnp.maximum(count, 1)

    def mean_square(v):
        return _sum(keep(v), axes) * share if checked else _sum(keep(v * share), axes)
    if not center:
        var = mean_square(_abs2(xf))
        zero = jnp.zeros_like(var)
        return Moments(count + zero, zero, zero, var)
    own = widen(*_schedule.private((x, scale), _schedule.Pass.ANCHOR))
    anchor = jax.lax.stop_gradient(_anchor(xf, axes, mask, keep, count, own))
    # Each pass converts its own copy of x: a shared float32 copy would be
    # written to memory and read back.
    x1, anchor1, scale1 = _schedule.private((x, anchor, scale), _schedule.Pass.DELTA)
    # A quotient: a feature whose entries all equal v gets delta = v - anchor
    # exactly (n copies of a difference of nearby floats sum exactly), so it
    # normalizes to exactly 0; a product with the rounded 1 / n would not.
    delta = exact_quotient(_sum(keep(widen(x1, scale1) - anchor1), axes), jnp.maximum(count, 1))
    x2, anchor2, scale2 = _schedule.private((x, anchor, scale), _schedule.Pass.VARIANCE)
    var = mean_square(_abs2(widen(x2, scale2) - anchor2))
    var = jnp.maximum(var - _abs2(delta), 0)
    # count + 0 rather than a broadcast: it takes var's sharding on a mesh.
    return Moments(count + jnp.zeros_like(var), anchor, delta, var)


def merge(parts: Moments) -> Moments:
    r"""Chan et al.'s merge of moments stacked along axis 0.

    Part ``i`` holds ``count[i]`` entries with mean ``shift[i] + delta[i]``
    and biased variance ``var[i]``; the result is the moments of their union:

    .. math::
      n = \sum_i n_i,\quad \mu = \sum_i \frac{n_i}{n} \mu_i,\quad
      \sigma^2 = \sum_i \frac{n_i}{n} \big(\sigma_i^2 + (\mu_i - \mu)^2\big)

    with every part's mean taken relative to the shift of the part with the
    most entries, so the differences stay exact for offset data. Empty parts
    add nothing.
    """
    count = jnp.sum(parts.count, axis=0)
    weights = parts.count / jnp.maximum(count, 1)
    largest = jnp.argmax(parts.count, axis=0)[None]
    shift = jnp.take_along_axis(parts.shift, largest, axis=0)[0]
    offsets = (parts.shift - shift) + parts.delta
    delta = jnp.sum(weights * offsets, axis=0)
    var = jnp.sum(weights * (parts.var + _abs2(offsets - delta)), axis=0)
    return Moments(count, shift, delta, var)


class Sync(NamedTuple):
    """The named axes to reduce over too, with their sizes (static).

    Sizes are looked up once, outside any custom rule: under ``vmap`` inside
    ``pmap`` they cannot be looked up within one. ``slots``: groups always
    travel as one slot per group (:func:`_group_reduce`), never as JAX's
    grouped collective, whose support is found out only outside a
    ``lax.cond`` branch.
    """
    axis_name: tuple[Any, ...]
    groups: tuple[tuple[int, ...], ...] | None
    sizes: tuple[int, ...]
    slots: bool = False

    @classmethod
    def of(cls, axis_name, groups) -> Sync | None:
        if axis_name is None:
            return None
        return cls(tuple(axis_name), groups, tuple(jax.lax.axis_size(n) for n in axis_name))

    @property
    def shards(self) -> int:
        """The number of shards merged together: one group's."""
        return len(self.groups[0]) if self.groups is not None else math.prod(self.sizes)


def _shard_index(sync: Sync):
    index = 0
    for name, n in zip(sync.axis_name, sync.sizes):  # row-major; a tuple's axis_index
        index = index * n + jax.lax.axis_index(name)  # fails in vmap-in-pmap
    return index


def _group_reduce(value, sync: Sync | None, collective, empty):
    """``value`` reduced over the shards of this shard's group (itself without
    ``sync``), in one ``collective`` (``psum``, ``pmax``).

    With ``axis_index_groups``, JAX's grouped collective where the mapping
    takes groups (``pmap``). ``vmap`` and ``shard_map`` collectives take no
    groups: there each group's shards write into their group's slot of a
    buffer of one slot per group (``empty`` elsewhere), so the message grows
    with the number of groups but never with the shards in a group.
    """
    if sync is None:
        return value
    if sync.groups is None:
        return collective(value, sync.axis_name)
    if not sync.slots:
        try:
            return collective(value, sync.axis_name, axis_index_groups=sync.groups)
        except NotImplementedError:  # raised while tracing, before anything is emitted
            pass
    group_of = np.zeros(math.prod(sync.sizes), np.int32)
    for g, members in enumerate(sync.groups):
        group_of[list(members)] = g
    mine = jnp.asarray(group_of)[_shard_index(sync)]
    slots = jnp.full((len(sync.groups),) + value.shape, empty, value.dtype).at[mine].set(value)
    return collective(slots, sync.axis_name)[mine]


def group_sum(value, sync: Sync | None):
    """``value`` summed over the shards of this shard's group (itself without ``sync``)."""
    return _group_reduce(value, sync, jax.lax.psum, 0)


def group_max(value, sync: Sync | None):
    """``value``'s maximum over the shards of this shard's group."""
    return _group_reduce(value, sync, jax.lax.pmax, -jnp.inf)


def _sum_over_shards(fields, sync: Sync):
    """Each array of ``fields`` summed over the group, in one collective.

    The arrays travel as one flat real buffer (complex ones as their real
    and imaginary parts), so a round costs one collective of their total size.
    """
    parts = [p for f in fields for p in ((f.real, f.imag) if jnp.iscomplexobj(f) else (f,))]
    flat = group_sum(jnp.concatenate([p.reshape(-1) for p in parts]), sync)
    sums, start = [], 0
    for p in parts:
        sums.append(flat[start:start + p.size].reshape(p.shape))
        start += p.size
    sums = iter(sums)
    return [jax.lax.complex(next(sums), next(sums)) if jnp.iscomplexobj(f) else next(sums)
            for f in fields]


def _merge_shards(local: Moments, entries: int, masked: bool, center: bool,
                  sync: Sync) -> Moments:
    r"""The moments of all the shards of ``sync`` together, with a message of
    fixed size: Chan et al.'s merge around a shift every shard agrees on.

    Shard :math:`i` holds :math:`n_i` valid entries (of ``entries`` per
    shard) with mean :math:`\mu_i` (``shift_i + delta_i``) and variance
    :math:`\sigma_i^2`; :math:`n = \sum_i n_i`, :math:`w_i = n_i / n`.

    1. One ``psum`` of the counts and the count-weighted means gives the
       shift :math:`c = \sum_i w_i \mu_i`, the global mean up to rounding,
       bit-identical on every shard. Without a mask every shard holds
       ``entries`` (mapped shapes are equal), so counts are not sent.
    2. One ``psum`` of :math:`w_i o_i` and :math:`w_i (\sigma_i^2 + |o_i|^2)`
       with :math:`o_i = (shift_i - c) + delta_i`:

       .. math::
         \delta = \sum_i w_i o_i, \qquad
         \sigma^2 = \sum_i w_i \big(\sigma_i^2 + |o_i|^2\big) - |\delta|^2

    Around a shift within rounding of the mean, :math:`o_i` is of the order
    of the spread of the shards' means and :math:`\delta` is tiny, so
    nothing cancels: as exact as :func:`merge` of the gathered parts, for
    any offset, layout and count. Weights are taken before sums, so sums of
    large values do not overflow. Uncentered moments (RMS norm) need round 1
    only: the weighted mean of the mean squares.
    """
    total = entries * sync.shards  # the most valid entries there can be
    value = local.mean if center else local.var
    if masked:
        count, weighted = _sum_over_shards(
            [local.count, value * like(local.count / max(total, 1), value)], sync)
        # A quotient, as in _anchor: every pass computes the same shift.
        merged = weighted / like(jnp.maximum(count, 1) / max(total, 1), weighted)
        weights = local.count / jnp.maximum(count, 1)
    else:  # the same on every shard
        count = jnp.full(local.count.shape, total, local.count.dtype)
        merged, = _sum_over_shards([value / sync.shards], sync)
        weights = jnp.full(local.count.shape, 1 / sync.shards if total else 0,
                           local.count.dtype)
    if not center:
        zero = jnp.zeros_like(merged)
        return Moments(count, zero, zero, jnp.where(count > 0, merged, 0))
    shift = jax.lax.stop_gradient(merged)
    # An empty shard adds nothing; its offset is zeroed so 0 * inf cannot arise.
    offsets = jnp.where(local.count > 0, (local.shift - shift) + local.delta, 0)
    # The offsets are weighted by count / 2**k (exact), and their sum divided
    # by the total's share: when every shard has the same offset (a constant
    # feature) delta is that offset exactly, and the feature normalizes to 0.
    unit = 2.0 ** math.ceil(math.log2(max(total, 1)))
    offset_sum, second = _sum_over_shards([like(local.count / unit, offsets) * offsets,
                                           weights * (local.var + _abs2(offsets))], sync)
    delta = exact_quotient(offset_sum, jnp.maximum(count, 1) / unit)
    return Moments(count, shift, delta, jnp.maximum(second - _abs2(delta), 0))


def by_kept_axes(m: Moments, shape, kept) -> Moments:
    """Kept-dims moments of an array of ``shape`` laid out as the sizes of the
    ``kept`` axes (sorted; the feature shape): the one layout step of batch
    norm's running statistics, ghost chunks and precise statistics."""
    kept_dims = tuple(d if i in kept else 1 for i, d in enumerate(shape))
    return Moments(*(jnp.broadcast_to(v, kept_dims).reshape(tuple(shape[i] for i in kept))
                     for v in m))


def moments(x, axes, *, mask=None, center=True, sync: Sync | None = None,
            scale=None, checked=False) -> Moments:
    """The :class:`Moments` of ``x`` over ``axes`` (kept dims) and the ``sync`` axes.

    Entries where ``mask`` is False are left out. The shards of the ``sync``
    axes are merged by :func:`_merge_shards` (two collectives of fixed size,
    one for uncentered moments), so the result is the moments of the
    concatenated valid entries, in float32 or wider. With ``scale`` (kept
    dims, no ``sync``), the moments of ``x * scale``. ``checked``: see
    :func:`_part_moments`.
    """
    local = _part_moments(x, axes, mask, center, scale, checked)
    if sync is None:
        return local
    assert scale is None, 'scaled moments are per shard'
    entries = math.prod(x.shape[a] for a in axes)
    return _merge_shards(local, entries, mask is not None, center, sync)


def widened(param, dtype):
    """A scale or bias in the compute ``dtype`` where that loses nothing
    (a bfloat16 parameter of float32 statistics), the value implicit
    promotion would give, so the arithmetic also runs under
    ``jax.numpy_dtype_promotion('strict')``; otherwise (None, or a wider
    parameter) unchanged."""
    if param is None or param.dtype == dtype:
        return param
    complex_to_real = (jnp.issubdtype(param.dtype, jnp.complexfloating)
                       and not jnp.issubdtype(dtype, jnp.complexfloating))
    if complex_to_real or jnp.finfo(param.dtype).bits > jnp.finfo(dtype).bits:
        return param
    return param.astype(dtype)


def affine(y, scale, bias):
    """``y * scale + bias``, each optional, the parameters :func:`widened` to ``y``'s dtype."""
    if scale is not None:
        y = y * widened(scale, y.dtype)
    if bias is not None:
        y = y + widened(bias, y.dtype)
    return y


def normalize(x, mean, var, scale=None, bias=None, *, epsilon):
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in ``x``'s dtype."""
    dtype = compute_dtype(x.dtype)
    centered = x.astype(dtype) - mean
    y = centered * like(jax.lax.rsqrt(var + epsilon), centered)
    return affine(y, scale, bias).astype(x.dtype)


def standardize_with(x, m: Moments, *, epsilon):
    """``((x - shift) - delta) * rsqrt(var + epsilon)`` in the compute dtype.

    Normalizes with given moments, the mean kept as ``shift + delta`` so the
    difference is exact for offset data. Plain autodiff (no custom rule).
    """
    if not jnp.iscomplexobj(m.delta):  # under shard_map, one psum of both cotangents
        delta, var = _varying_like(jnp.stack([m.delta, m.var]), x)
        m = m._replace(delta=delta, var=var)
    return _standard(x, m, jax.lax.rsqrt(m.var + epsilon), None, True)


def _standard(x, m: Moments, inv, scale, center):
    """``(x * scale - mean) * inv`` in the compute dtype, the mean as ``shift + delta``
    (``inv`` None: not multiplied)."""
    x = x.astype(compute_dtype(x.dtype))
    if scale is not None:
        x = x * like(scale, x)
    c = (x - m.shift) - m.delta if center else x
    return c if inv is None else c * like(inv, c)


class _Spec(NamedTuple):
    axes: tuple[int, ...]
    epsilon: float
    center: bool
    sync: Sync | None
    from_output: bool = False  # the reverse pass recovers x_hat from y (memory_efficient)


def standardize(x, scale=None, bias=None, *, axes, epsilon, center=True, mask=None,
                sync: Sync | None = None, fallback=None, from_output=False):
    """Normalizes ``x`` with its own moments; returns ``(y, moments)``.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` in ``x``'s dtype,
    with the :class:`Moments` of :func:`moments` (kept dims, float32 or
    wider); without ``center``, ``y = x * rsqrt(mean(|x|**2) + epsilon) *
    scale + bias``. ``scale``/``bias`` (or None) broadcast against ``x``.

    A feature with no valid entry (all masked, or an empty batch) has no
    moments of its own: it is normalized with ``fallback``, a pair
    ``(mean, var)`` broadcasting against the moments (batch norm's running
    statistics), or without one to ``y = bias`` (``x_hat = 0``). Its
    returned moments stay count 0, mean 0, var 0.

    Outputs are differentiable in forward and reverse mode, the moments
    included (callers stop their gradients where the running statistics
    need it; ``fallback`` carries no gradient). With ``from_output`` the
    derivative rule recovers ``x_hat = (y - bias) / scale`` from the output
    instead of recomputing it from ``x``, so a reverse pass keeps ``y``
    (which its consumer usually keeps anyway) and not ``x``: a scale entry
    of 0 makes the derivatives NaN, as ``x_hat`` is then lost.
    """
    if fallback is not None:
        fallback = tuple(jax.lax.stop_gradient(v) for v in fallback)
    dtype = compute_dtype(x.dtype)
    return _standardize(_Spec(tuple(axes), float(epsilon), center, sync, bool(from_output)), x,
                        widened(scale, dtype), widened(bias, dtype), mask, fallback)


# Rows are scaled by a power of two so that their largest magnitude stays
# below 2**_HEADROOM: deviations are then below 2**(_HEADROOM + 1), and a sum
# of up to 2**31 of their squares below 2**127, so float32 data up to its
# largest value cannot overflow; ordinary data keep scale 1.
_HEADROOM = 47


def _largest_magnitude(x, axes, mask):
    """``max |x|`` over the valid entries of ``axes`` (0 for none), kept dims."""
    # In x's own dtype (abs and max are exact in any): a narrow input is read
    # as it is, not widened first.
    magnitude = jnp.abs(x)
    if mask is not None:
        magnitude = jnp.where(mask, magnitude, jnp.zeros((), magnitude.dtype))
    largest = jnp.max(magnitude, axis=axes, keepdims=True, initial=0)
    return jax.lax.stop_gradient(largest.astype(real_dtype(x.dtype)))


def _scale_below(largest, headroom=_HEADROOM):
    """``2**-k`` (k >= 0) that brings ``largest`` below ``2**headroom``: 1 for
    ordinary data.

    Scaling by a power of two is exact, so the result does not depend on
    where the data sit relative to the threshold (beyond entries below
    ``2**-126`` times the largest, which do not reach float32 sums anyway).
    """
    _, exponent = jnp.frexp(largest)
    return jnp.ldexp(jnp.ones_like(largest), jnp.minimum(0, headroom - exponent))


def _scaled_moments(x, axes, mask, center, sync):
    """``(moments of x * s, s)`` over ``axes`` and ``sync``, with ``s`` the
    power of two that brings the largest valid magnitude (over all shards)
    below ``2**_HEADROOM``: sums of squares cannot overflow for data up to
    float32's largest values. Across devices it costs one collective more
    than :func:`moments` (the largest magnitude)."""
    s = _scale_below(group_max(_largest_magnitude(x, axes, mask), sync))
    local = _part_moments(x, axes, mask, center, s, checked=True)
    if sync is None:
        return local, s
    entries = math.prod(x.shape[a] for a in axes)
    merged = _merge_shards(local, entries, mask is not None, center, sync)
    # Laid out (under shard_map, varying) as the moments, as the unscaled
    # branch's s = 1 is: lax.cond needs both branches' types equal.
    return merged, _varying_like(s, merged.var)


def _guarded_moments(x, axes, mask, center, sync):
    """``(moments of x * s, s)``: :func:`moments` at ``s = 1`` when they are in
    range, which is every call on data below about ``1e19``; otherwise
    (a square or an offset overflowed) :func:`_scaled_moments`.

    Both give the same moments to a few ulps wherever the first is in range
    (scaling by a power of two is exact), so the choice changes no result
    beyond rounding; ordinary data pay one check of per-feature values, and
    the scaled pass runs only when needed. The check is global (all
    features, and after the merge the same on every shard), so every shard
    takes the same branch.
    """
    plain = moments(x, axes, mask=mask, center=center, sync=sync, checked=True)
    checked = jax.lax.stop_gradient((plain.shift, plain.delta, plain.var))
    # Inside the branch, vmap's refusal of grouped collectives would surface
    # only after tracing, where it cannot be caught: groups travel as slots.
    branch_sync = None if sync is None else sync._replace(slots=True)
    try:
        return jax.lax.cond(_in_range(*checked), lambda p: (p, jnp.ones_like(p.var)),
                            lambda p: _scaled_moments(x, axes, mask, center, branch_sync), plain)
    except NameError:
        # A collective over a vmap axis inside a cond branch cannot be traced
        # in some nestings (vmap in pmap, differentiated outside): there the
        # scaled pass always runs, with the same moments to a few ulps.
        return _scaled_moments(x, axes, mask, center, sync)


@jax.custom_batching.custom_vmap
def _in_range(shift, delta, var):
    """Whether moments at scale 1 are all finite, offsets squared included.

    Under ``vmap`` one answer for the whole batch (any member out of range
    sends all to the scaled pass), so the ``lax.cond`` it drives stays a
    branch instead of becoming a select that computes both sides.
    """
    return (jnp.all(jnp.isfinite(shift)) & jnp.all(jnp.isfinite(_abs2(delta)))
            & jnp.all(jnp.isfinite(var)))


@_in_range.def_vmap
def _in_range_vmap(axis_size, in_batched, shift, delta, var):
    del axis_size, in_batched  # every entry counts, batched or not
    return _in_range(shift, delta, var), False


class _Statistics(NamedTuple):
    """A call's moments, and how ``x`` is normalized with them.

    ``x_hat = (x * s - used.mean) * inv``.

    Attributes:
      batch: the moments of ``x`` (what the caller gets back).
      used: the moments ``x`` is normalized with, of ``x * s``: the batch's,
        or ``fallback`` for features with no valid entry.
      inv: ``rsqrt(used.var + epsilon * s**2)``; 0 for a feature with no
        valid entry and no ``fallback``.
      s: a power of two per feature or row, 1 unless the moments at scale 1
        overflowed.
    """
    batch: Moments
    used: Moments
    inv: jax.Array
    s: jax.Array


def _statistics(spec, x, mask, fallback) -> _Statistics:
    """The :class:`_Statistics` of ``x`` over ``spec.axes`` and ``spec.sync``.

    One regime for every caller (batch, layer, RMS, group and instance
    norm, synced or not): :func:`_guarded_moments` computes the moments at
    scale 1, and again at a power of two ``s`` only when they are out of
    range, so ``x_hat`` is right even where ``x - mean`` or ``var`` exceed
    float32. Features with no valid entry are normalized with ``fallback``
    (at ``s = 1``), or without one with ``inv = 0``.
    """
    used, s = _guarded_moments(x, spec.axes, mask, spec.center, spec.sync)
    m = Moments(used.count, used.shift / like(s, used.shift), used.delta / like(s, used.delta),
                used.var / (s * s))
    empty = m.count == 0
    if fallback is not None:  # an empty feature has s = 1
        mean, var = (laid_out_as(v, used.var) for v in fallback)
        used = Moments(used.count, jnp.where(empty, mean, used.shift),
                       jnp.where(empty, 0, used.delta), jnp.where(empty, var, used.var))
    # epsilon * s**2 flushes to 0 for data near float32's largest values;
    # there a variance below the smallest normal float is that of a constant
    # feature (the entries are 2**36 apart at that scale), whose x_hat is 0.
    tiny = jnp.finfo(used.var.dtype).tiny
    inv = jax.lax.rsqrt(jnp.maximum(used.var + spec.epsilon * (s * s), tiny))
    return _Statistics(m, used, inv if fallback is not None else jnp.where(empty, 0, inv), s)


def _x_hat(spec, x, stats: _Statistics, step: _schedule.Pass):
    """``x_hat`` in the compute dtype, computed again in pass ``step``."""
    x, used, inv, s = _schedule.private((x, stats.used, stats.inv, stats.s), step)
    return _standard(x, used, inv, s, spec.center)


def _x_hat_factors(spec, source, stats: _Statistics, step: _schedule.Pass, *, scale, bias):
    """``(c, k)`` with ``x_hat = c * k`` and ``k`` per feature (kept dims), or
    None for 1: a sum of ``x_hat * v`` over the reduced axes is then
    ``k * sum(c * v)``, one product per entry fewer. ``c`` is ``x`` centered
    (``(x * s - shift) - delta``) or, with ``spec.from_output``, ``x_hat``
    recovered from ``y``."""
    if spec.from_output:
        return _recovered(spec, source, stats, step, scale=scale, bias=bias), None
    x, used, s = _schedule.private((source, stats.used, stats.s), step)
    return _standard(x, used, None, s, spec.center), stats.inv


def _recovered(spec, source, stats: _Statistics, step: _schedule.Pass, *, scale, bias):
    """``x_hat`` in the compute dtype, in pass ``step``: from ``x`` (``source``),
    or with ``spec.from_output`` from the output ``y = x_hat * scale + bias``
    (``source``) as ``(y - bias) * (1 / scale)``, NaN where ``scale`` is 0."""
    if not spec.from_output:
        return _x_hat(spec, source, stats, step)
    y, scale, bias = _schedule.private((source, scale, bias), step)
    xhat = y.astype(compute_dtype(y.dtype))
    if bias is not None:
        xhat = xhat - widened(bias, xhat.dtype)
    if scale is not None:
        xhat = xhat * (1 / widened(scale, xhat.dtype))
    return xhat


def _output(spec, x, scale, bias, stats: _Statistics):
    return affine(_x_hat(spec, x, stats, _schedule.Pass.OUTPUT), scale, bias).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _standardize(spec, x, scale, bias, mask, fallback):
    stats = _statistics(spec, x, mask, fallback)
    return _output(spec, x, scale, bias, stats), stats.batch


@_standardize.defjvp
def _standardize_jvp(spec, primals, tangents):
    x, scale, bias, mask, fallback = primals
    dx, dscale, dbias, _, _ = tangents
    stats = _statistics(spec, x, mask, fallback)
    y = _output(spec, x, scale, bias, stats)
    if spec.from_output:  # the reverse pass reads y, not a copy of its producer
        y = _schedule.kept(y)
    # Checkpointed, the tangent maps keep only their inputs (x and
    # per-feature vectors) for the reverse pass, which recomputes x_hat. The
    # collective stays outside: checkpoints lose vmap's named axes.
    # With spec.from_output they keep y instead of x, and recover x_hat from it.
    remat = lambda f: jax.checkpoint(functools.partial(f, spec), prevent_cse=False)
    source = y if spec.from_output else x
    sums = group_sum(remat(_tangent_sums)(source, stats, dx=dx, mask=mask, scale=scale,
                                          bias=bias), spec.sync)
    means = sums / like(jnp.maximum(stats.batch.count, 1), sums)[None]
    dy, dm = remat(_tangent)(source, stats, means, scale=scale, bias=bias, mask=mask, dx=dx,
                             dscale=dscale, dbias=dbias)
    return (y, stats.batch), (dy, dm)


def _varying_like(value, like):
    """``value``, cast to vary over the ``shard_map`` axes that ``like`` varies over.

    A replicated value that meets per-shard data is cast to per-shard where
    they meet, and the transpose of each cast is a ``psum``: cast once, on
    the whole stack of tangent means, the reverse pass sums them in one
    collective instead of one per use. Outside ``shard_map`` nothing varies
    this way and ``value`` is returned as it is.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(value), key=str))
    return jax.lax.pcast(value, missing, to='varying') if missing else value


def _varying_axes(v) -> frozenset:
    aval = jax.typeof(v)
    manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10; .vma before
    return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


def _tangent_sums(spec, x, stats: _Statistics, *, dx, mask, scale, bias):
    """This shard's ``[sum(Re(conj(x_hat) * dx)), sum(dx)]`` over the valid entries
    (``x`` is the output ``y`` with ``spec.from_output``: see :func:`_recovered`)."""
    dxf = dx.astype(compute_dtype(x.dtype))
    c, k = _x_hat_factors(spec, x, stats, _schedule.Pass.TANGENT_SUMS, scale=scale, bias=bias)
    if mask is not None:
        c, dxf = jnp.where(mask, c, 0), jnp.where(mask, dxf, 0)
    product = _sum(_real_product(c, dxf), spec.axes)
    sums = [like(product if k is None else k * product, dxf)]
    if spec.center:
        sums.append(_sum(dxf, spec.axes))
    return jnp.stack(sums)


def _dims_over(v, ndim, axes) -> tuple:
    """The sizes of ``v`` (broadcasting against an array of ``ndim`` dims) along ``axes``."""
    shape = (1,) * (ndim - jnp.ndim(v)) + tuple(jnp.shape(v))
    return tuple(shape[a] for a in axes)


def _tangent(spec, x, stats: _Statistics, means, *, scale, bias, mask, dx, dscale, dbias):
    r"""The tangents of ``(y, moments)``, linear in ``(dx, dscale, dbias)``.

    With ``x_hat = (x - mean) * inv``, ``inv = rsqrt(var + epsilon)`` (of
    ``stats``, at scale ``s``: see :func:`_statistics`) and ``means``
    the means of ``Re(conj(x_hat) * dx)`` and ``dx`` over the valid entries
    (and the ``sync`` axes):

    .. math::
      d\hat x = inv \, \big(dx - \overline{dx} - \hat x \,
      \overline{\mathrm{Re}(\hat x^* dx)}\big),
      \quad dy = scale \, d\hat x + \hat x \, dscale + dbias

    and, for the moments ``m`` of the batch, ``d mean = mean(dx)``,
    ``d var = 2 mean(Re(conj(x_hat) dx)) sqrt(var + epsilon)`` (0 for a
    feature with no valid entry). The per-feature factors multiply the means
    before they are broadcast, so the reverse pass reduces ``sum(g)`` and
    ``sum(g * x_hat)`` once each. With ``spec.from_output``, ``x`` is the
    output ``y`` and ``x_hat`` is recovered from it (:func:`_recovered`).
    """
    # Masked padding may hold NaN or inf: with no cotangent there, it must
    # not reach the sums of the reverse pass.
    c, k = _x_hat_factors(spec, x, stats, _schedule.Pass.TANGENT, scale=scale, bias=bias)
    c = finite_padding(c, mask)
    m = stats.batch
    local = _varying_like(means, x)  # what meets x: per shard, cast once
    dxf = dx.astype(compute_dtype(x.dtype))
    # Real factors meet complex data in the data's dtype (strict promotion).
    inv = like(stats.inv * stats.s, dxf)  # per unit of x
    k = None if k is None else like(k, dxf)
    correlation = like(local[0].real, dxf)  # the mean of Re(conj(x_hat) * dx)
    if scale is None or all(d == 1 for d in _dims_over(scale, x.ndim, spec.axes)):
        # scale is constant over the reduced axes (batch norm): it multiplies
        # the per-statistic factors, so dscale and the mean of x_hat * dx,
        # transposed, are one sum.
        factor = inv if scale is None else inv * scale
        slope = -factor * correlation if dscale is None else dscale - factor * correlation
        # x_hat = c * k: transposed, sum(g * x_hat) is k * sum(g * c).
        dy = factor * dxf + c * (slope if k is None else k * slope)
        if spec.center or dbias is not None:
            offset = 0 if dbias is None else dbias
            dy = dy + (offset - factor * local[1] if spec.center else offset)
    else:
        # scale varies over the reduced axes (layer norm): written so that,
        # transposed, no array of x's size feeds two sums (XLA:CPU would write
        # it to memory and read it back). The per-statistic factors multiply
        # before anything meets scale, so no outer product of inv and scale
        # is formed; terms are added with negated factors, not subtracted (a
        # negated cotangent would be shared); each term takes its own copy of
        # scale, and the dscale term its own x_hat.
        xhat = c if k is None else c * k

        def scaled(v, tag):
            return v * _schedule.private(scale, tag)
        dy = inv * scaled(dxf, _schedule.Pass.TANGENT)
        if spec.center:
            dy = dy + scaled(-(inv * local[1]), _schedule.Pass.TANGENT_SUMS)
        dy = dy + scaled(xhat, _schedule.Pass.TANGENT_SCALE) * -(inv * correlation)
        if dscale is not None:
            own = _recovered(spec, x, stats, _schedule.Pass.TANGENT_SCALE, scale=scale,
                             bias=bias)
            dy = dy + finite_padding(own, mask) * dscale
        if dbias is not None:
            dy = dy + dbias
    zero = jnp.zeros_like(m.count)
    dmean = means[1] if spec.center else jnp.zeros_like(m.delta)
    dm = Moments(zero, jnp.zeros_like(m.shift), dmean,
                 2 * means[0].real * jnp.sqrt(m.var + spec.epsilon))
    return dy.astype(x.dtype), dm


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _largest(magnitude, axes, sync: Sync):
    """The largest of ``magnitude`` over ``axes`` and the shards of ``sync``, kept dims.

    Its derivative is shared equally by the entries that attain it, on
    whichever shards they are, as ``jnp.max``'s is on one device (``pmax``
    has no derivative in JAX). Differentiated, it costs one more collective:
    the number of entries that attain it.
    """
    return group_max(jnp.max(magnitude, axis=axes, keepdims=True, initial=0), sync)


@_largest.defjvp
def _largest_jvp(axes, sync, primals, tangents):
    (magnitude,), (dmagnitude,) = primals, tangents
    top = _largest(magnitude, axes, sync)
    hit = magnitude == top
    ties = group_sum(_sum(hit.astype(top.dtype), axes), sync)
    return top, group_sum(_sum(jnp.where(hit, dmagnitude, 0), axes), sync) / ties


# Up to this p the Lp spread is taken in units of the standard deviation:
# ratios r = |d| / std have sum(r**2) = n, so sum(r**p) <= n**(p / 2) cannot
# overflow float32 for n below 2**31, and is at least n (the power mean
# inequality), so underflowed terms do not matter. Beyond it, in units of
# the largest deviation (one more pass, and across devices one more
# collective). The choice depends on p only, never on the data.
_STD_UNIT_MAX_P = 8.0


def lp_deviation(x, axes, m: Moments, p: float, *, mask=None, sync: Sync | None = None):
    r"""The Lp spread of ``x`` about its mean over ``axes`` and ``sync``, kept dims.

    .. math::
      s_p = \Big(\frac{1}{n} \sum |x - \mu|^p\Big)^{1/p}, \qquad
      s_\infty = \max |x - \mu|

    over the valid entries, with ``m`` the merged :class:`Moments` of
    :func:`moments` (so every shard deviates from the same global mean,
    ``x - shift - delta``, exact at any offset). For ``p > 1`` the
    deviations are measured in a unit ``u``, ``s_p = u * (mean |d / u|^p)^(1/p)``:
    the standard deviation up to ``p = 8`` (exact for ``p = 2``), the
    largest deviation above, so that no ``p`` overflows or underflows.
    ``s_p`` does not depend on the unit, so the unit carries no gradient.
    Masked entries (even NaN or inf) add nothing, gradient included. One
    collective (two for ``p > 8``).
    """
    x = finite_padding(x, mask, m.shift)
    magnitude = jnp.abs((x - m.shift) - m.delta)
    if mask is not None:
        magnitude = jnp.where(mask, magnitude, 0)
    if np.isinf(p):
        largest = jnp.max(magnitude, axis=axes, keepdims=True, initial=0)
        return largest if sync is None else _largest(magnitude, axes, sync)
    if p == 1:
        return group_sum(_sum(magnitude, axes), sync) / jnp.maximum(m.count, 1)
    if p <= _STD_UNIT_MAX_P:
        unit = jnp.sqrt(m.var)
    else:
        # No derivative: pmax has none, and the unit needs none.
        unit = group_max(jnp.max(jax.lax.stop_gradient(magnitude), axis=axes, keepdims=True,
                                 initial=0), sync)
    unit = jax.lax.stop_gradient(jnp.where(unit > 0, unit, 1))
    ratio = magnitude / unit
    if p == 2:
        powered = jnp.square(ratio)
    else:  # both wheres keep the gradient finite where a deviation is 0
        nonzero = ratio > 0
        powered = jnp.where(nonzero, jnp.where(nonzero, ratio, 1) ** p, 0)
    mean = group_sum(_sum(powered, axes), sync) / jnp.maximum(m.count, 1)
    positive = mean > 0
    return unit * jnp.where(positive, jnp.where(positive, mean, 1) ** (1 / p), 0)
