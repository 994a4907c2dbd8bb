"""Per-example normalizers: layer, RMS, group and instance norm."""

from __future__ import annotations

import jax

from normlib import _checks
from normlib import _moments


def _params(name, value, x, axes):
    """Checks ``value`` has the shape of ``x`` at ``axes``; reshapes to broadcast."""
    if value is None:
        return None
    value = _checks.floating(name, value)
    _checks.shape(name, value, _checks.features_of(x.shape, axes), f'the normalized axes {axes} of x')
    return value.reshape(tuple(d if i in axes else 1 for i, d in enumerate(x.shape)))


def _standardize(x, scale, bias, *, axes, epsilon, center, mask=None, axis_name=None):
    epsilon = _checks.positive('epsilon', epsilon)
    if mask is not None:
        mask = _checks.mask(mask, x.shape)
    names, _ = _checks.axis_name(axis_name, None)
    spec = _moments.Spec(axes, epsilon, center, names)
    return _moments.standardize(spec, x, scale, bias, mask)[0]


def layer_norm(x, scale=None, bias=None, *, axis=-1, epsilon: float = 1e-6, mask=None,
               axis_name=None) -> jax.Array:
    r"""Layer normalization (Ba, Kiros & Hinton, 2016).

    .. math::
      y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot scale + bias

    with the mean and biased variance taken over ``axis`` for each position of
    the other axes, counting only entries where ``mask`` is True. Moments are
    float32 (or wider) and stable for large offsets; ``y`` has ``x``'s dtype.

    Args:
      x: floating-point input.
      scale: optional multiplier with the shape of ``x`` at ``axis``.
      bias: optional offset with the shape of ``x`` at ``axis``.
      axis: the normalized (reduced) axis or axes.
      epsilon: added to the variance inside the square root; > 0.
      mask: boolean, broadcastable to ``x``; False entries are left out of the
        moments.
      axis_name: mapped axis name(s) over which the normalized axes are
        sharded (tensor parallelism); the moments cover the full vector.

    References:
      Ba, Kiros & Hinton, `Layer Normalization
      <https://arxiv.org/abs/1607.06450>`_, 2016.
    """
    x = _checks.floating('x', x)
    axes = _checks.axes('axis', axis, x.ndim)
    return _standardize(x, _params('scale', scale, x, axes), _params('bias', bias, x, axes),
                        axes=axes, epsilon=epsilon, center=True, mask=mask, axis_name=axis_name)


def rms_norm(x, scale=None, *, axis=-1, epsilon: float = 1e-6, mask=None,
             axis_name=None) -> jax.Array:
    r"""Root-mean-square normalization (Zhang & Sennrich, 2019).

    .. math::
      y = \frac{x}{\sqrt{\frac{1}{n}\sum x^2 + \epsilon}} \cdot scale

    with the mean square over ``axis`` (valid entries of ``mask`` only), in
    float32 or wider; ``y`` has ``x``'s dtype. Arguments as in
    :func:`layer_norm`.

    References:
      Zhang & Sennrich, `Root Mean Square Layer Normalization
      <https://arxiv.org/abs/1910.07467>`_, 2019.
    """
    x = _checks.floating('x', x)
    axes = _checks.axes('axis', axis, x.ndim)
    return _standardize(x, _params('scale', scale, x, axes), None,
                        axes=axes, epsilon=epsilon, center=False, mask=mask, axis_name=axis_name)


def group_norm(x, scale=None, bias=None, *, num_groups: int, epsilon: float = 1e-5) -> jax.Array:
    r"""Group normalization (Wu & He, 2018), channels-last.

    ``x`` has shape ``(N, ..., C)``; the ``C`` channels are split into
    ``num_groups`` contiguous groups and each example's group is normalized
    with its mean and biased variance over the spatial axes and the group's
    channels:

    .. math::
      y = \frac{x - \mu_{n,g}}{\sqrt{\sigma_{n,g}^2 + \epsilon}} \cdot scale_c + bias_c

    ``scale``/``bias`` have shape ``(C,)``. ``num_groups=1`` is layer norm
    over all non-batch axes; ``num_groups=C`` is instance norm.

    References:
      Wu & He, `Group Normalization <https://arxiv.org/abs/1803.08494>`_, 2018.
    """
    x = _checks.floating('x', x)
    if x.ndim < 2:
        raise ValueError(f'x must have shape (N, ..., C) for group_norm, got {x.shape}.')
    channels = x.shape[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f'num_groups must be an int, got {num_groups!r}.')
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f'num_groups={num_groups} must be >= 1 and divide the {channels} channels.')
    grouped = x.reshape(x.shape[:-1] + (num_groups, channels // num_groups))
    last = (x.ndim - 1, x.ndim)
    affine = [_params(n, v, x, (x.ndim - 1,)) for n, v in (('scale', scale), ('bias', bias))]
    affine = [None if v is None else v.reshape(v.shape[:-1] + grouped.shape[-2:]) for v in affine]
    y = _standardize(grouped, *affine, axes=tuple(range(1, x.ndim - 1)) + (last[1],),
                     epsilon=epsilon, center=True)
    return y.reshape(x.shape)


def instance_norm(x, scale=None, bias=None, *, epsilon: float = 1e-5) -> jax.Array:
    r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016), channels-last.

    ``x`` has shape ``(N, spatial..., C)``; each example's channel is
    normalized with its mean and biased variance over the spatial axes:

    .. math::
      y = \frac{x - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}} \cdot scale_c + bias_c

    References:
      Ulyanov, Vedaldi & Lempitsky, `Instance Normalization: The Missing
      Ingredient for Fast Stylization <https://arxiv.org/abs/1607.08022>`_, 2016.
    """
    x = _checks.floating('x', x)
    if x.ndim < 3:
        raise ValueError(
            f'x must have shape (N, spatial..., C) with at least one spatial axis for'
            f' instance_norm, got {x.shape}.')
    channel = (x.ndim - 1,)
    return _standardize(x, _params('scale', scale, x, channel), _params('bias', bias, x, channel),
                        axes=tuple(range(1, x.ndim - 1)), epsilon=epsilon, center=True)
