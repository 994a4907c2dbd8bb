"""Flax NNX modules that drop in for ``flax.nnx``'s normalization layers.

Each module has Flax's constructor, call signature and state (``scale`` and
``bias`` as ``nnx.Param``; ``mean`` and ``var`` as float32 ``nnx.BatchStat``),
so a model moves over by changing its import and its state loads unchanged.
The modules only hold variables and call normlib's functions: the
statistics are always float32 (or wider) and at least as accurate as
Flax's ``use_fast_variance=False`` path (more accurate on offset data). ``.train()``/``.eval()``, ``nnx.view``,
``nnx.jit``, ``nnx.vmap`` and ``nnx.split``/``nnx.merge`` work as with Flax's.

Not copied from Flax: ``use_fast_variance`` (normlib is always stable);
rounding the running statistics to ``dtype`` before normalizing (they stay
float32); and two bugs of ``flax.nnx`` 0.12: a float ``mask`` raising, and
``GroupNorm`` with non-default ``reduction_axes`` repeating the group
statistics along the wrong axis.

A training ``BatchNorm`` under ``nnx.vmap`` (flax #4760): pass the model to
the vmapped function with ``in_axes=None`` and give the module and
``nnx.vmap`` the same ``axis_name``; the statistics then cover the whole
vmapped batch and the running averages stay unbatched, call after call. With
vmapped state (an ensemble) each member keeps its own statistics. Without an
``axis_name``, shared running averages cannot take per-slice updates, and
``nnx.vmap(model)`` (the module as the function) cannot update its state at
all; both fail in ``nnx.vmap`` itself, as with Flax's modules.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Axes, Dtype, Initializer

from normlib import _checks
from normlib import _moments
from normlib._batch_norm import BatchNormState, batch_norm
from normlib._layer_norm import group_norm, instance_norm, layer_norm, rms_norm
from normlib.linen import _given, _group_count, _lay_out

_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_NO_METADATA = MappingProxyType({})


def _param(use, init, rngs, num_features, param_dtype, metadata):
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), (num_features,), param_dtype), **metadata)


def _value(variable):
    return None if variable is None else variable[...]


def _features(param, shape, field):
    """``param`` (``(num_features,)``) reshaped to the input's feature ``shape``."""
    if param is None:
        return None
    if param.size != _checks.size(shape):
        raise ValueError(
            f'num_features={param.size} does not match the input, whose {field}'
            f' have shape {tuple(shape)}.')
    return param.reshape(shape)


class BatchNorm(nnx.Module):
    """Batch normalization layer; computes :func:`normlib.batch_norm`.

    Flax compatibility: the constructor, ``__call__(x, use_running_average,
    *, mask)`` and state are ``flax.nnx.BatchNorm``'s. The call argument
    ``use_running_average`` takes precedence over the attribute, which
    ``.train()``, ``.eval()`` and ``nnx.view(..., use_running_average=...)``
    set. ``promote_dtype`` receives ``(x, mean, var, scale, bias)`` as in
    Flax; the running statistics used are the float32 ones.

    normlib additions: ``momentum=None`` keeps the exact average of all
    batches so far, counting each feature's updates in an extra int32
    ``nnx.BatchStat`` ``count`` (one per feature, so a feature a mask empties
    in some batches averages the batches it saw) that exists only then; ``unbiased_running_var=True`` keeps
    PyTorch's unbiased running variance. Features whose entries are all
    masked keep their running statistics.

    Args:
      num_features: the number of features (the size of ``x`` at ``axis``).
      use_running_average: normalize with the running statistics (evaluation)
        instead of the batch's (training).
      axis: the feature axis or axes; every other axis is reduced.
      momentum: decay of the running averages, or None for the exact average.
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and state).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      axis_name: mapped axis name(s) to take the statistics over as well.
      axis_index_groups: device groups normalized separately.
      promote_dtype: casts ``(x, mean, var, scale, bias)`` to a common dtype.
      rngs: random keys for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``\\ s.
      unbiased_running_var: store ``var * n / (n - 1)`` in the running variance.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import normlib.nnx
        >>> layer = normlib.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (16, 3)) + 2
        >>> y = layer(x, use_running_average=False)  # updates layer.mean and layer.var
        >>> bool(jnp.allclose(layer.mean[...], 0.1 * x.mean(0)))
        True
        >>> y_eval = layer(x, use_running_average=True)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
        scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
        unbiased_running_var: bool = False,
    ):
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((num_features,), jnp.int32))
        self.scale = _param(use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                'BatchNorm needs use_running_average: pass it to the constructor or'
                ' the call, or set it with .train() / .eval() or nnx.view(model,'
                ' use_running_average=...).')
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)),
            dtype=self.dtype)
        features = _checks.features_of(x.shape, _checks.axes('axis', self.axis, x.ndim))
        count = (_features(self.count[...], features, 'features') if self.momentum is None
                 else jnp.zeros((), jnp.int32))
        mean = self.mean[...]
        if jnp.iscomplexobj(x) and not jnp.iscomplexobj(mean):  # as Flax: the mean turns complex
            mean = mean.astype(_moments.compute_dtype(x.dtype))
        state = BatchNormState(
            _features(mean, features, 'features'),
            _features(self.var[...], features, 'features'), count)
        y, state = batch_norm(
            x, state, _features(scale, features, 'features'),
            _features(bias, features, 'features'), training=not use_running_average,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask,
            unbiased_running_var=self.unbiased_running_var)
        if not use_running_average:
            if state.mean.dtype == self.mean[...].dtype:
                self.mean[...] = state.mean.reshape(self.mean.shape)
            else:  # item assignment would cast the complex mean to float32
                self.mean.set_value(state.mean.reshape(self.mean.shape))
            self.var[...] = state.var.reshape(self.var.shape)
            if self.momentum is None:
                self.count[...] = state.count.reshape(self.count.shape)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: normalize with the running statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class _PerExample(nnx.Module):
    """Holds the ``scale``/``bias`` parameters and the options shared by the
    per-example layers."""

    def __init__(self, num_features, *, epsilon, dtype, param_dtype, use_bias, use_scale,
                 bias_init, scale_init, axis_name, axis_index_groups, promote_dtype, rngs,
                 bias_metadata, scale_metadata):
        self.scale = _param(use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, num_features, param_dtype, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.promote_dtype = promote_dtype

    def _promoted(self, x):
        """``(x, scale, bias)`` cast by ``promote_dtype`` as Flax does."""
        return self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)

    def _collectives(self):
        return _given(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


class LayerNorm(_PerExample):
    """Layer normalization layer; computes :func:`normlib.layer_norm`.

    Flax compatibility: the constructor, ``__call__(x, *, mask)`` and state
    are ``flax.nnx.LayerNorm``'s; a float ``mask`` works (nonzero entries are
    kept), where Flax's raises. ``feature_axes`` may
    also name axes that are not normalized, as in Flax.

    Args:
      num_features: the size of ``scale`` and ``bias`` (of ``x`` at
        ``feature_axes``).
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes ``scale`` and ``bias`` span.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
      promote_dtype: casts ``(x, scale, bias)`` to a common dtype.
      rngs: random keys for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``\\ s.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
        scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs, bias_metadata=bias_metadata,
            scale_metadata=scale_metadata)
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x, *, mask=None):
        x, scale, bias = self._promoted(x)
        reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        shape = _checks.features_of(x.shape, features)
        scale, bias = (_lay_out(_features(p, shape, 'feature_axes'), x.shape, features, reduced,
                                'feature_axes') for p in (scale, bias))
        return layer_norm(x, scale, bias, axis=reduced, epsilon=self.epsilon, mask=mask,
                                  **self._collectives())


class RMSNorm(nnx.Module):
    """Root-mean-square normalization layer; computes :func:`normlib.rms_norm`.

    Flax compatibility: the constructor, ``__call__(x, *, mask)`` and state
    are ``flax.nnx.RMSNorm``'s; ``feature_axes`` may
    also name axes that are not normalized, as in Flax.

    Args:
      num_features: the size of ``scale`` (of ``x`` at ``feature_axes``).
      epsilon: added to the mean square inside the square root.
      dtype: the output dtype (default: promoted from the input and scale).
      param_dtype: dtype of ``scale``.
      use_scale: learn ``scale``.
      scale_init: its initializer.
      reduction_axes: the axes the mean square is taken over.
      feature_axes: the axes ``scale`` spans.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
      promote_dtype: casts ``(x, scale)`` to a common dtype.
      rngs: random keys for the initializer.
      scale_metadata: metadata of the ``nnx.Param``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
    ):
        self.scale = _param(use_scale, scale_init, rngs, num_features, param_dtype, scale_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.promote_dtype = promote_dtype

    def __call__(self, x, mask=None):
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        scale = _lay_out(_features(scale, _checks.features_of(x.shape, features), 'feature_axes'),
                         x.shape, features, reduced, 'feature_axes')
        return rms_norm(x, scale, axis=reduced, epsilon=self.epsilon, mask=mask,
                                **_given(axis_name=self.axis_name,
                                         axis_index_groups=self.axis_index_groups))


class GroupNorm(_PerExample):
    """Group normalization layer; computes :func:`normlib.group_norm`.

    Flax compatibility: the constructor (``num_groups=32``, ``epsilon=1e-6``),
    ``__call__(x, *, mask)`` and state are ``flax.nnx.GroupNorm``'s. Give
    exactly one of ``num_groups`` and ``group_size``. Channels are the last
    axis. Unlike Flax's, non-default ``reduction_axes`` (inputs with extra
    leading axes) give each group its own statistics.

    Args:
      num_features: the number of channels.
      num_groups: the number of channel groups.
      group_size: the number of channels per group.
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      reduction_axes: the axes the statistics are taken over, ending with the
        channel axis (default: every axis but the first).
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
      promote_dtype: casts ``(x, scale, bias)`` to a common dtype.
      rngs: random keys for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``\\ s.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes | None = None,
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
        scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
    ):
        num_groups = _group_count(num_groups, group_size, num_features)
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(
                f'num_groups={num_groups} must be >= 1 and divide num_features={num_features}.')
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs, bias_metadata=bias_metadata,
            scale_metadata=scale_metadata)
        self.num_groups = num_groups
        self.group_size = num_features // num_groups
        self.reduction_axes = reduction_axes

    def __call__(self, x, *, mask=None):
        x, scale, bias = self._promoted(x)
        spatial = None
        if self.reduction_axes is not None:
            reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
            if reduced[-1] != x.ndim - 1:
                raise ValueError(
                    f'reduction_axes={self.reduction_axes!r} must include the last'
                    ' (channel) axis.')
            if reduced[:-1] != tuple(range(1, x.ndim - 1)):
                spatial = reduced[:-1]
        return group_norm(
            x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon,
            **_given(axis=spatial, mask=mask), **self._collectives())


class InstanceNorm(_PerExample):
    """Instance normalization layer; computes :func:`normlib.instance_norm`.

    Flax compatibility: the constructor (``epsilon=1e-6``), ``__call__(x, *,
    mask)`` and state are ``flax.nnx.InstanceNorm``'s. The first axis is the
    batch axis; every axis but it and ``feature_axes`` is reduced.

    Args:
      num_features: the size of ``scale`` and ``bias`` (of ``x`` at
        ``feature_axes``).
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      feature_axes: the channel axis or axes, kept.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
      promote_dtype: casts ``(x, scale, bias)`` to a common dtype.
      rngs: random keys for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``\\ s.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        feature_axes: Axes = -1,
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        promote_dtype: tp.Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
        scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs, bias_metadata=bias_metadata,
            scale_metadata=scale_metadata)
        self.feature_axes = feature_axes

    def __call__(self, x, *, mask=None):
        x, scale, bias = self._promoted(x)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        if 0 in features:
            raise ValueError(
                f'feature_axes={self.feature_axes!r} must not include axis 0. The'
                ' channel axes cannot include the leading dimension as this is assumed to be the'
                ' batch axis.')
        shape = _checks.features_of(x.shape, features)
        channels_last = features == (x.ndim - 1,)
        return instance_norm(
            x, _features(scale, shape, 'feature_axes'), _features(bias, shape, 'feature_axes'),
            epsilon=self.epsilon,
            **_given(axis=None if channels_last else features, mask=mask),
            **self._collectives())


__all__ = ['BatchNorm', 'GroupNorm', 'InstanceNorm', 'LayerNorm', 'RMSNorm']
