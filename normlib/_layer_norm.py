"""Per-example normalizers: layer, RMS, group and instance norm."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from normlib import _checks, _moments
from normlib._batch_norm import AxisName


def _params(name, value, x_shape, axes):
    """``value`` laid out to broadcast against ``x``.

    It has the shape of ``x`` at ``axes``, or ``x.ndim`` dimensions that
    broadcast to ``x`` (e.g. Flax's LayerNorm parameters on feature axes
    that are not normalized).
    """
    if value is None:
        return None
    value = _checks.param(name, value)
    expected = _checks.features_of(x_shape, axes)
    if value.shape != expected and value.ndim == len(x_shape) and len(axes) != len(x_shape):
        try:
            broadcast = jnp.broadcast_shapes(value.shape, x_shape)
        except ValueError:
            broadcast = None
        if broadcast != tuple(x_shape):
            raise ValueError(f'{name} has shape {value.shape}, which does not broadcast to x'
                             f' of shape {tuple(x_shape)}.')
        return value
    _checks.shape(name, value, expected, f'the normalized axes {axes} of x')
    return value.reshape(tuple(d if i in axes else 1 for i, d in enumerate(x_shape)))


def _offset(scale, scale_offset, dtype):
    """``scale_offset + scale`` in the compute dtype of ``x`` (float32 or
    wider) whatever ``scale``'s dtype, so a bfloat16 ``scale`` near 0 keeps
    its precision; ``scale`` unchanged when the offset is 0."""
    offset = _checks.finite('scale_offset', scale_offset)
    if offset == 0:
        return scale
    if scale is None:
        raise ValueError(f'scale_offset={scale_offset!r} needs a scale: the layer multiplies'
                         ' by scale_offset + scale.')
    wide = jnp.promote_types(_moments.compute_dtype(dtype), scale.dtype)
    return scale.astype(wide) + jnp.asarray(offset, wide)


def _standardize(x, scale, bias, *, axes, epsilon, center, mask, axis_name, axis_index_groups,
                 scale_offset=0.0, memory_efficient=False):
    epsilon = _checks.epsilon(epsilon, x.dtype)
    if mask is not None:
        mask = _checks.mask(mask, x.shape)
    sync = _moments.Sync.of(*_checks.axis_name(axis_name, axis_index_groups))
    return _moments.standardize(
        x, _offset(scale, scale_offset, x.dtype), bias, axes=axes, epsilon=epsilon,
        center=center, mask=mask, sync=sync,
        from_output=_checks.boolean('memory_efficient', memory_efficient))[0]


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               axis: int | Sequence[int] = -1, epsilon: float = 1e-6,
               mask: jax.Array | None = None, axis_name: AxisName | None = None,
               axis_index_groups: Sequence[Sequence[int]] | None = None,
               scale_offset: float = 0.0, memory_efficient: bool = False) -> jax.Array:
    r"""Layer normalization (Ba, Kiros & Hinton, 2016).

    .. math::
      y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot (scale\_offset + scale) + bias

    with the mean and biased variance taken over ``axis`` for each position of
    the other axes, counting only entries where ``mask`` is True. Moments are
    float32 (or wider) and stable for large offsets; ``y`` has ``x``'s dtype.
    A row with no valid entry (all masked) gives ``y = bias`` (``x_hat = 0``)
    and zero gradient with respect to ``x``. Complex ``x`` is centered by its
    complex mean and scaled by the real variance ``mean(|x - mean|**2)``.

    Args:
      x: floating-point input.
      scale: optional multiplier with the shape of ``x`` at ``axis`` (or
        ``x.ndim`` dimensions broadcastable to ``x``).
      bias: optional offset, shaped like ``scale``.
      axis: the normalized (reduced) axis or axes.
      epsilon: added to the variance inside the square root; > 0.
      mask: boolean, broadcastable to ``x``; False entries are left out of the
        moments.
      axis_name: mapped axis name(s) over which the normalized axes are
        sharded (tensor parallelism); the moments cover the full vector.
        Forward, two collectives of fixed size (:func:`batch_norm`'s, with
        one row's moments per feature); backward, one.
      axis_index_groups: device groups for ``axis_name``, as in
        :func:`batch_norm`.
      scale_offset: a number added to ``scale`` (0 by default).
        ``scale_offset=1.0`` is the zero-centred scale of Gemma: the layer
        multiplies by ``1 + scale`` and ``scale`` starts at 0, so weight
        decay pulls it toward the identity. The sum is taken in float32 (or
        ``x``'s wider dtype) whatever ``scale``'s dtype, so a bfloat16
        ``scale`` near 0 is not rounded to bfloat16's spacing near 1.
        Needs a ``scale``.
      memory_efficient: the reverse pass recovers
        ``x_hat = (y - bias) / (scale_offset + scale)`` from the output
        instead of from ``x``, so a training step keeps ``y`` (which the
        next layer usually keeps anyway) and per-row vectors, not ``x``
        (Apex's option of the same name). Gradients equal the default's to
        rounding of ``y`` (``x``'s dtype). Needs every entry of the
        effective scale nonzero: where one is 0, ``x_hat`` is lost and the
        gradients are NaN. Forward values and forward mode are unchanged.

    Returns:
      ``y``, with ``x``'s dtype and shape.

    References:
      Ba, Kiros & Hinton, `Layer Normalization
      <https://arxiv.org/abs/1607.06450>`_, 2016.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (2, 8)) * 4 + 1e6
        >>> y = normlib.layer_norm(x, jnp.ones(8), jnp.zeros(8))
        >>> print((jnp.round(y.mean(-1), 4) + 0).tolist(), jnp.round(y.std(-1), 3).tolist())
        [0.0, 0.0] [1.0, 1.0]

        A mask leaves padding out of each row's statistics:

        >>> mask = jnp.arange(8) < 5
        >>> y = normlib.layer_norm(x, mask=mask)
        >>> print((jnp.round(y[:, :5].mean(-1), 4) + 0).tolist())
        [0.0, 0.0]
    """
    x = _checks.floating('x', x, complex_ok=True)
    axes = _checks.axes('axis', axis, x.ndim)
    return _standardize(x, _params('scale', scale, x.shape, axes),
                        _params('bias', bias, x.shape, axes), axes=axes, epsilon=epsilon,
                        center=True, mask=mask, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, scale_offset=scale_offset,
                        memory_efficient=memory_efficient)


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, axis: int | Sequence[int] = -1,
             epsilon: float = 1e-6, mask: jax.Array | None = None,
             axis_name: AxisName | None = None,
             axis_index_groups: Sequence[Sequence[int]] | None = None,
             scale_offset: float = 0.0, memory_efficient: bool = False) -> jax.Array:
    r"""Root-mean-square normalization (Zhang & Sennrich, 2019).

    .. math::
      y = \frac{x}{\sqrt{\frac{1}{n}\sum x^2 + \epsilon}} \cdot (scale\_offset + scale)

    with the mean square over ``axis`` (valid entries of ``mask`` only), in
    float32 or wider; ``y`` has ``x``'s dtype. Arguments as in
    :func:`layer_norm`; with ``axis_name`` the mean squares need one
    forward collective (the count-weighted mean square) and one backward.
    ``scale_offset=1.0`` is Gemma's ``x * rsqrt(mean(x**2) + eps) * (1 +
    scale)`` with ``1 + scale`` in float32; ``memory_efficient`` recovers
    ``x / rms`` from ``y`` in the reverse pass (see :func:`layer_norm`).

    References:
      Zhang & Sennrich, `Root Mean Square Layer Normalization
      <https://arxiv.org/abs/1910.07467>`_, 2019.

    Example:
        >>> import jax.numpy as jnp, normlib
        >>> y = normlib.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=1e-12)
        >>> [round(v, 4) for v in y[0].tolist()]  # the rms of [3, 4] is sqrt(12.5)
        [0.8485, 1.1314]
    """
    x = _checks.floating('x', x, complex_ok=True)
    axes = _checks.axes('axis', axis, x.ndim)
    return _standardize(x, _params('scale', scale, x.shape, axes), None, axes=axes,
                        epsilon=epsilon, center=False, mask=mask, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, scale_offset=scale_offset,
                        memory_efficient=memory_efficient)


def group_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               num_groups: int, axis: int | Sequence[int] | None = None, epsilon: float = 1e-6,
               mask: jax.Array | None = None, axis_name: AxisName | None = None,
               axis_index_groups: Sequence[Sequence[int]] | None = None) -> jax.Array:
    r"""Group normalization (Wu & He, 2018), channels-last.

    ``x`` has shape ``(N, ..., C)``; the ``C`` channels are split into
    ``num_groups`` contiguous groups and each example's group is normalized
    with its mean and biased variance over ``axis`` (default: every axis
    but the batch axis 0 and the channels) and the group's channels:

    .. math::
      y = \frac{x - \mu_{n,g}}{\sqrt{\sigma_{n,g}^2 + \epsilon}} \cdot scale_c + bias_c

    ``scale``/``bias`` have shape ``(C,)``. ``num_groups=1`` is layer norm
    over all non-batch axes; ``num_groups=C`` is instance norm.

    Args:
      x: floating-point input of shape ``(N, ..., C)``.
      scale: optional multiplier of shape ``(C,)``.
      bias: optional offset of shape ``(C,)``.
      num_groups: the number of groups, dividing ``C``.
      axis: the axes reduced with each group's channels; None (the default)
        is every axis but the batch axis 0 and the channels.
      epsilon: added to the variance inside the square root; > 0. The
        default, 1e-6, is Flax's ``GroupNorm``'s (every function takes the
        default of Flax's module of the same name).
      mask, axis_name, axis_index_groups: as in :func:`layer_norm`.

    Returns:
      ``y``, with ``x``'s dtype and shape.

    References:
      Wu & He, `Group Normalization <https://arxiv.org/abs/1803.08494>`_, 2018.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))  # (N, H, W, C)
        >>> y = normlib.group_norm(x, jnp.ones(8), jnp.zeros(8), num_groups=4)
        >>> groups = y.reshape(2, 25, 4, 2)
        >>> print((jnp.round(groups.mean((1, 3)), 4) + 0).tolist()[0])
        [0.0, 0.0, 0.0, 0.0]
    """
    x = _checks.floating('x', x, complex_ok=True)
    if x.ndim < 2:
        raise ValueError(f'x must have shape (N, ..., C) for group_norm, got {x.shape}.')
    channels, last = x.shape[-1], x.ndim - 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f'num_groups must be an int, got {num_groups!r}.')
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f'num_groups={num_groups} must be >= 1 and divide the {channels}'
                         ' channels.')
    axes = tuple(range(1, last)) if axis is None else _checks.axes('axis', axis, x.ndim)
    if last in axes:
        raise ValueError(f'axis={axis!r} must not include the channel axis (the last): the'
                         ' channels are reduced within each group.')
    grouped = x.shape[:-1] + (num_groups, channels // num_groups)
    regroup = lambda v: None if v is None else v.reshape(v.shape[:-1] + grouped[-2:])
    affine = [regroup(_params(n, v, x.shape, (last,)))
              for n, v in (('scale', scale), ('bias', bias))]
    if mask is not None:
        mask = _checks.mask(mask, x.shape).reshape(grouped)
    y = _standardize(x.reshape(grouped), *affine, axes=axes + (last + 1,), epsilon=epsilon,
                     center=True, mask=mask, axis_name=axis_name,
                     axis_index_groups=axis_index_groups)
    return y.reshape(x.shape)


def instance_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None,
                  *, axis: int | Sequence[int] = -1, epsilon: float = 1e-6,
                  mask: jax.Array | None = None, axis_name: AxisName | None = None,
                  axis_index_groups: Sequence[Sequence[int]] | None = None) -> jax.Array:
    r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016).

    ``x`` has a batch axis 0 and channel axis or axes ``axis`` (default the
    last); each example's channel is normalized with its mean and biased
    variance over every other (spatial) axis:

    .. math::
      y = \frac{x - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}} \cdot scale_c + bias_c

    ``scale``/``bias`` have the shape of ``x`` at ``axis``. With no axis left
    to reduce (an ``(N, C)`` input, or ``axis`` covering every non-batch
    axis) each entry is its own mean and ``y = bias``, as in Flax.

    Args:
      x: floating-point input with a batch axis 0.
      scale, bias: optional multiplier and offset of the shape of ``x`` at ``axis``.
      axis: the channel axis or axes, kept (not 0).
      epsilon, mask, axis_name, axis_index_groups: as in :func:`group_norm`
        (the default epsilon, 1e-6, is Flax's ``InstanceNorm``'s too).

    Returns:
      ``y``, with ``x``'s dtype and shape.

    References:
      Ulyanov, Vedaldi & Lempitsky, `Instance Normalization: The Missing
      Ingredient for Fast Stylization <https://arxiv.org/abs/1607.08022>`_, 2016.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3)) + 5  # (N, H, W, C)
        >>> y = normlib.instance_norm(x)
        >>> print((jnp.round(y.mean((1, 2)), 4) + 0).tolist())
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    x = _checks.floating('x', x, complex_ok=True)
    channel = _checks.axes('axis', axis, x.ndim)
    if 0 in channel:
        raise ValueError(f'axis={axis!r} must not include the batch axis 0.')
    reduced = tuple(i for i in range(1, x.ndim) if i not in channel)
    return _standardize(x, _params('scale', scale, x.shape, channel),
                        _params('bias', bias, x.shape, channel), axes=reduced, epsilon=epsilon,
                        center=True, mask=mask, axis_name=axis_name,
                        axis_index_groups=axis_index_groups)
