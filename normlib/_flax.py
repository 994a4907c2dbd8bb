"""What normlib's Flax Linen and NNX modules share: Flax's options and their meaning.

Flax gives each normalization layer the same options in Linen (fields) and
NNX (keyword arguments): the same names, defaults and meaning. The option
classes below declare them once, as keyword-only dataclasses that
:mod:`normlib.linen` and :mod:`normlib.nnx` inherit, and turn them into a call
of normlib's public function: field checks, axes, parameter layout. The
adapters add only their variables and their dtype handling. No Flax module is
imported here, so ``normlib.nnx`` does not load ``normlib.linen``.

A dataclass takes its bases' fields in reverse order (the last base's
first), which keeps Flax's order: ``BatchNormOptions(_Affine,
_RunningAverages)`` starts with ``use_running_average``, ``axis`` and
``momentum``. Each option is documented once, in the docstring of the class
that declares it; :func:`document` gathers the entries into the public
classes' docstrings.
"""

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normlib import _checks
from normlib._batch_norm import BatchNormState, batch_norm
from normlib._layer_norm import group_norm, instance_norm, layer_norm, rms_norm

# Equality and repr stay the adapters' (Linen compares fields, NNX modules are
# compared by identity). The annotations are objects (no `from __future__ import
# annotations`): the adapters' constructors show them where these names are not defined.
_options = dataclasses.dataclass(kw_only=True, eq=False, repr=False)


def _shape_at(x: jax.Array, name: str, axes: Axes) -> tuple[int, ...]:
    """The shape of ``x`` at ``axes``, the value of the field ``name``."""
    return _checks.features_of(x.shape, _checks.axes(name, axes, x.ndim))


def _lay_out(param: jax.Array | None, x_shape: Sequence[int], param_axes: Sequence[int],
             target_axes: Sequence[int]) -> jax.Array | None:
    """A parameter spanning ``param_axes`` of ``x``, laid out with the shape of ``x``
    at ``target_axes`` (what normlib's per-example functions take)."""
    if param is None:
        return None
    if not set(param_axes) <= set(target_axes):
        # Parameters on axes that are not normalized (Flax allows them):
        # x.ndim dimensions that broadcast against x.
        return param.reshape(tuple(d if a in param_axes else 1 for a, d in enumerate(x_shape)))
    shape = tuple(x_shape[a] if a in param_axes else 1 for a in target_axes)
    return jnp.broadcast_to(param.reshape(shape), tuple(x_shape[a] for a in target_axes))


@_options
class _Affine:
    """The options of a layer with a learned ``scale`` and ``bias``.

    Attributes:
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
    """
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones


@_options
class _RunningAverages:
    """The options Flax's BatchNorm starts with.

    Attributes:
      use_running_average: normalize with the running statistics (evaluation)
        instead of the batch's (training).
      axis: the feature axis or axes; every other axis is reduced.
      momentum: decay of the running averages, or None for the exact average.
    """
    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99


@_options
class BatchNormOptions(_Affine, _RunningAverages):
    """Flax's BatchNorm options, for :func:`normlib.batch_norm`.

    Attributes:
      axis_name: mapped axis name(s) to take the statistics over as well.
      axis_index_groups: device groups normalized separately.
      memory_efficient: in training, the reverse pass recovers ``x_hat``
        from the output and keeps it instead of ``x`` (a normlib addition;
        see :func:`normlib.batch_norm`).
    """
    epsilon: float = 1e-5
    axis_name: Any = None
    axis_index_groups: Any = None
    memory_efficient: bool = False

    def _param_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape of the parameters and running statistics: ``x``'s at ``axis``."""
        return _shape_at(x, 'axis', self.axis)

    def _normalize(self, x: jax.Array, state: BatchNormState, scale: jax.Array | None,
                   bias: jax.Array | None, *, training: bool, mask: jax.Array | None,
                   unbiased_running_var: bool, synced: bool = True,
                   ) -> tuple[jax.Array, BatchNormState]:
        """:func:`normlib.batch_norm` with these options (across ``axis_name`` if
        ``synced``)."""
        return batch_norm(
            x, state, scale, bias, training=training, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=self.axis_name if synced else None,
            axis_index_groups=self.axis_index_groups if synced else None, mask=mask,
            unbiased_running_var=unbiased_running_var, memory_efficient=self.memory_efficient)


class _OnFeatureAxes:
    """Options whose parameters span ``feature_axes``."""

    def _param_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape of the parameters: ``x``'s at ``feature_axes``."""
        return _shape_at(x, 'feature_axes', self.feature_axes)


def scale_initializer(options: Any) -> Initializer:
    """``options.scale_init``, or zeros for a zero-centred scale
    (``scale_offset`` set and ``scale_init`` left at its default, ones)."""
    if getattr(options, 'scale_offset', 0.0) and options.scale_init is jax.nn.initializers.ones:
        return jax.nn.initializers.zeros
    return options.scale_init


def _layer_layout(options: 'LayerNormOptions | RMSNormOptions', x: jax.Array,
                  *params: jax.Array | None) -> tuple[tuple[int, ...], list[jax.Array | None]]:
    """``reduction_axes`` and the parameters (on ``feature_axes``) laid out for them."""
    reduced = _checks.axes('reduction_axes', options.reduction_axes, x.ndim)
    features = _checks.axes('feature_axes', options.feature_axes, x.ndim)
    return reduced, [_lay_out(p, x.shape, features, reduced) for p in params]


@_options
class LayerNormOptions(_Affine, _OnFeatureAxes):
    """Flax's LayerNorm options, for :func:`normlib.layer_norm`.

    Attributes:
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes ``scale`` and ``bias`` span.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
    """
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    scale_offset: float = 0.0
    memory_efficient: bool = False

    def _normalize(self, x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                   mask: jax.Array | None) -> jax.Array:
        reduced, (scale, bias) = _layer_layout(self, x, scale, bias)
        return layer_norm(x, scale, bias, axis=reduced, epsilon=self.epsilon, mask=mask,
                          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                          scale_offset=self.scale_offset, memory_efficient=self.memory_efficient)


@_options
class RMSNormOptions(_OnFeatureAxes):
    """Flax's RMSNorm options, for :func:`normlib.rms_norm`.

    Attributes:
      epsilon: added to the mean square inside the square root.
      dtype: the output dtype (default: promoted from the input and scale).
      param_dtype: dtype of ``scale``.
      use_scale: learn ``scale``.
      scale_init: its initializer.
      reduction_axes: the axes the mean square is taken over.
      feature_axes: the axes ``scale`` spans.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
      scale_offset: the layer multiplies by ``scale_offset + scale`` (in
        float32); ``1.0`` is Gemma's zero-centred scale. With a nonzero
        offset the default ``scale_init`` is zeros (a normlib addition).
      memory_efficient: the reverse pass recovers ``x / rms`` from the
        output and keeps it instead of ``x`` (a normlib addition; see
        :func:`normlib.rms_norm`).
    """
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    scale_offset: float = 0.0
    memory_efficient: bool = False

    def _normalize(self, x: jax.Array, scale: jax.Array | None,
                   mask: jax.Array | None) -> jax.Array:
        reduced, (scale,) = _layer_layout(self, x, scale)
        return rms_norm(x, scale, axis=reduced, epsilon=self.epsilon, mask=mask,
                        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                        scale_offset=self.scale_offset, memory_efficient=self.memory_efficient)


@_options
class _Groups:
    """Flax's two ways of giving GroupNorm's groups, the first of its options.

    Attributes:
      num_groups: the number of channel groups.
      group_size: the number of channels per group.
    """
    num_groups: int | None = dataclasses.field(default=32, kw_only=False)
    group_size: int | None = dataclasses.field(default=None, kw_only=False)

    def _group_count(self, channels: int) -> int:
        """The number of groups of ``channels``; exactly one of ``num_groups`` and
        ``group_size`` is set."""
        num_groups, group_size = self.num_groups, self.group_size
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                'GroupNorm needs exactly one of num_groups and group_size; to give'
                f' group_size, pass num_groups=None (got num_groups={num_groups!r},'
                f' group_size={group_size!r}).')
        if group_size is None:
            return num_groups
        if group_size < 1 or channels % group_size:
            raise ValueError(f'group_size={group_size} must divide the {channels} channels.')
        return channels // group_size


@_options
class GroupNormOptions(_Affine, _Groups):
    """Flax's GroupNorm options, for :func:`normlib.group_norm` (channels last).

    Attributes:
      reduction_axes: the axes the statistics are taken over, ending with the
        channel axis (default: every axis but the first).
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
    """
    reduction_axes: Axes | None = None
    axis_name: Any = None
    axis_index_groups: Any = None

    def _param_shape(self, x: jax.Array) -> tuple[int, ...]:
        """The shape of the parameters: ``(C,)``, one per channel."""
        return x.shape[-1:]

    def _normalize(self, x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                   mask: jax.Array | None) -> jax.Array:
        spatial = None  # group_norm's default: every axis but the first and the channels
        if self.reduction_axes is not None:
            reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
            if reduced[-1] != x.ndim - 1:
                raise ValueError(
                    f'reduction_axes={self.reduction_axes!r} must include the last'
                    ' (channel) axis.')
            spatial = reduced[:-1]
        return group_norm(
            x, scale, bias, num_groups=self._group_count(x.shape[-1]), axis=spatial,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups)


@_options
class InstanceNormOptions(_Affine, _OnFeatureAxes):
    """Flax's InstanceNorm options, for :func:`normlib.instance_norm`.

    Attributes:
      feature_axes: the channel axis or axes, kept.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
    """
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    def _normalize(self, x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                   mask: jax.Array | None) -> jax.Array:
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        if 0 in features:
            raise ValueError(
                f'feature_axes={self.feature_axes!r} must not include axis 0. The'
                ' channel axes cannot include the leading dimension as this is assumed to be the'
                ' batch axis.')
        return instance_norm(x, scale, bias, axis=features, epsilon=self.epsilon, mask=mask,
                             axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


_SECTIONS = ('Attributes:', 'Args:')
_AFTER = ('Example:', 'Examples:', 'References:')  # sections that follow the arguments


def _section(lines: Sequence[str]) -> tuple[int, int] | None:
    """Where the Attributes or Args section of the docstring ``lines`` starts and ends."""
    for start, line in enumerate(lines):
        if line in _SECTIONS:
            end = start + 1
            while end < len(lines) and lines[end].startswith('  '):
                end += 1
            return start, end
    return None


def _entries(doc: str) -> list[tuple[tuple[str, ...], str]]:
    """The entries of the Attributes or Args section of ``doc``: ``(names, text)``."""
    lines = inspect.cleandoc(doc).splitlines()
    start, end = _section(lines) or (0, 0)
    entries = []
    for line in lines[start + 1:end]:
        if line.startswith('   '):  # the entry goes on
            names, text = entries[-1]
            entries[-1] = names, f'{text}\n{line}'
        else:
            entries.append((tuple(line.split(':', 1)[0].strip().split(', ')), line))
    return entries


def document(section: str) -> Callable[[type], type]:
    """A class decorator that completes the class's docstring with ``section``.

    The section lists every constructor argument in order, each with the entry
    of the normlib class that documents it: the class itself, or the closest
    base (an option class here, or one of the adapter's).

    Args:
      section: ``'Attributes'`` (Linen's fields) or ``'Args'`` (NNX's arguments).

    Returns:
      The decorator.
    """
    def decorate(cls: type) -> type:
        documented = {}
        for base in reversed(cls.__mro__):
            if base.__module__.startswith('normlib') and base.__dict__.get('__doc__'):
                for names, text in _entries(base.__doc__):
                    documented.update(dict.fromkeys(names, text))
        listed = []
        for name in inspect.signature(cls.__init__).parameters:
            if name in documented and documented[name] not in listed:
                listed.append(documented[name])
        lines = inspect.cleandoc(cls.__doc__).splitlines()
        found = _section(lines)
        after = [i for i, line in enumerate(lines) if line in _AFTER]
        if found:
            lines[slice(*found)] = [f'{section}:', *listed]
        elif after:
            lines[after[0]:after[0]] = [f'{section}:', *listed, '']
        else:
            lines += ['', f'{section}:', *listed]
        cls.__doc__ = '\n'.join(lines)
        return cls
    return decorate
