"""Flax Linen modules that drop in for ``flax.linen``'s normalization layers.

Each module has Flax's fields, defaults, call signature and variables
(``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``,
same names, shapes and dtypes), so a model moves over by changing its import
and an existing checkpoint loads unchanged. The modules only create variables
and call normlib's functions, so the statistics are always float32 (or
wider) and at least as accurate as Flax's ``use_fast_variance=False`` path:
equal to float32 rounding on ordinary data, more accurate on offset data.

Not copied from Flax: ``use_fast_variance`` (normlib is always stable) and
``force_float32_reductions`` (statistics are always float32 or wider).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from flax.typing import Axes, Dtype, Initializer

from normlib import _checks
from normlib import _moments
from normlib._batch_norm import BatchNormState, batch_norm, fold_batch_norm
from normlib._layer_norm import group_norm, instance_norm, layer_norm, rms_norm
from normlib._lp_norm import l1_normalize, l2_normalize

_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def _promote(x, params, dtype):
    """``x`` in the dtype normlib should see, and the dtype Flax returns.

    Flax's output dtype is ``dtype`` or else the promotion of the input and
    the parameters (bfloat16 inputs with float32 parameters give float32).
    Widening ``x`` first is exact; narrowing happens only on the output.
    """
    x = jnp.asarray(x)
    out = dtypes.canonicalize_dtype(x, *params, dtype=dtype)
    return x.astype(jnp.promote_types(x.dtype, out)), out


def _lay_out(param, x_shape, param_axes, target_axes, field):
    """Lays out a parameter spanning ``param_axes`` of ``x`` with the shape of
    ``x`` at ``target_axes`` (what normlib's per-example functions take)."""
    if param is None:
        return None
    if not set(param_axes) <= set(target_axes):
        # Parameters on axes that are not normalized (Flax allows them):
        # x.ndim dimensions that broadcast against x.
        return param.reshape(tuple(d if a in param_axes else 1 for a, d in enumerate(x_shape)))
    shape = tuple(x_shape[a] if a in param_axes else 1 for a in target_axes)
    return jnp.broadcast_to(param.reshape(shape), tuple(x_shape[a] for a in target_axes))


def _group_count(num_groups, group_size, channels):
    """Flax's ``num_groups``/``group_size`` pair resolved to a group count."""
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


def _given(**kwargs):
    """The keyword arguments that are set (not None)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _affine(module, shape):
    """The ``scale`` and ``bias`` parameters (or None) of ``module``."""
    scale = (module.param('scale', module.scale_init, shape, module.param_dtype)
             if module.use_scale else None)
    bias = (module.param('bias', module.bias_init, shape, module.param_dtype)
            if module.use_bias else None)
    return scale, bias


class BatchNorm(nn.Module):
    """Batch normalization layer; computes :func:`normlib.batch_norm`.

    Flax compatibility: fields, defaults, ``__call__(x, use_running_average,
    *, mask)`` and variables are ``flax.linen.BatchNorm``'s; ``use_running_average``
    is given either as a field or at call time (``nn.merge_param``). As in
    Flax, the running statistics are not updated during ``init`` and
    ``axis_name`` is ignored there; in training, ``batch_stats`` must be
    passed as ``mutable``.

    normlib additions: ``momentum=None`` keeps the exact average of all
    batches so far; it needs the number of updates, stored as an extra int32
    ``batch_stats/count`` of the feature shape (each feature's own updates,
    so a feature a mask empties in some batches averages the batches it
    saw) that exists only when ``momentum`` is None
    (Flax checkpoints, which have no ``count``, load into every other setting).
    ``unbiased_running_var=True`` keeps PyTorch's unbiased running variance.
    Features whose entries are all masked keep their running statistics.

    Attributes:
      use_running_average: normalize with the running statistics (evaluation)
        instead of the batch's (training).
      axis: the feature axis or axes; every other axis is reduced.
      momentum: decay of the running averages, or None for the exact average.
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      axis_name: mapped axis name(s) to take the statistics over as well.
      axis_index_groups: device groups normalized separately.
      unbiased_running_var: store ``var * n / (n - 1)`` in the running variance.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import normlib.linen as nn  # instead of flax.linen's BatchNorm
        >>> layer = nn.BatchNorm(use_running_average=False, momentum=0.9)
        >>> x = jax.random.normal(jax.random.key(0), (16, 3)) + 2
        >>> variables = layer.init(jax.random.key(1), x)
        >>> y, updates = layer.apply(variables, x, mutable=['batch_stats'])
        >>> bool(jnp.allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0)))
        True
        >>> sorted(variables['params']), sorted(variables['batch_stats'])
        (['bias', 'scale'], ['mean', 'var'])
    """
    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    axis_name: Any = None
    axis_index_groups: Any = None
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        features = _checks.features_of(x.shape, _checks.axes('axis', self.axis, x.ndim))
        # Complex input keeps a complex running mean (Flax's becomes complex
        # on the first update; here it is complex from the start).
        mean_dtype = _moments.compute_dtype(x.dtype) if jnp.iscomplexobj(x) else jnp.float32
        mean = self.variable('batch_stats', 'mean', jnp.zeros, features, mean_dtype)
        var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
        count = (self.variable('batch_stats', 'count', jnp.zeros, features, jnp.int32)
                 if self.momentum is None else None)
        scale, bias = _affine(self, features)
        x, out_dtype = _promote(x, (scale, bias), self.dtype)
        state = BatchNormState(
            mean.value.astype(jnp.promote_types(mean.value.dtype, mean_dtype)), var.value,
            jnp.zeros((), jnp.int32) if count is None else count.value)
        initializing = self.is_initializing()
        y, state = batch_norm(
            x, state, scale, bias, training=not use_running_average, axis=self.axis,
            momentum=self.momentum, epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask, unbiased_running_var=self.unbiased_running_var)
        if not use_running_average and not initializing:
            mean.value, var.value = state.mean, state.var
            if count is not None:
                count.value = state.count
        return y.astype(out_dtype)


class LayerNorm(nn.Module):
    """Layer normalization layer; computes :func:`normlib.layer_norm`.

    Flax compatibility: fields, defaults, ``__call__(x, *, mask)`` and the
    ``scale``/``bias`` parameters (shaped by ``feature_axes``) are
    ``flax.linen.LayerNorm``'s. ``feature_axes`` may
    also name axes that are not normalized, as in Flax.

    Attributes:
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes ``scale`` and ``bias`` span.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import normlib.linen as nn
        >>> x = jax.random.normal(jax.random.key(0), (2, 4)) + 1e6
        >>> variables = nn.LayerNorm().init(jax.random.key(1), x)
        >>> y = nn.LayerNorm().apply(variables, x)
        >>> print(jnp.round(y.std(-1), 3).tolist())
        [1.0, 1.0]
    """
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        scale, bias = _affine(self, _checks.features_of(x.shape, features))
        x, out_dtype = _promote(x, (scale, bias), self.dtype)
        scale, bias = (_lay_out(p, x.shape, features, reduced, 'feature_axes')
                       for p in (scale, bias))
        return layer_norm(
            x, scale, bias, axis=reduced, epsilon=self.epsilon, mask=mask,
            **_given(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups),
        ).astype(out_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square normalization layer; computes :func:`normlib.rms_norm`.

    Flax compatibility: fields, defaults, ``__call__(x, *, mask)`` and the
    ``scale`` parameter are ``flax.linen.RMSNorm``'s; ``feature_axes`` must be
    among ``reduction_axes``.

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
    """
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = _ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        scale = (self.param('scale', self.scale_init, _checks.features_of(x.shape, features),
                            self.param_dtype) if self.use_scale else None)
        x, out_dtype = _promote(x, (scale,), self.dtype)
        return rms_norm(
            x, _lay_out(scale, x.shape, features, reduced, 'feature_axes'), axis=reduced,
            epsilon=self.epsilon, mask=mask,
            **_given(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups),
        ).astype(out_dtype)


class GroupNorm(nn.Module):
    """Group normalization layer; computes :func:`normlib.group_norm`.

    Flax compatibility: fields, defaults (``num_groups=32``, ``epsilon=1e-6``),
    ``__call__(x, *, mask)`` and the ``scale``/``bias`` parameters of shape
    ``(C,)`` are ``flax.linen.GroupNorm``'s. Give exactly one of
    ``num_groups`` and ``group_size`` (``num_groups=None`` to use
    ``group_size``). Channels are the last axis.

    Attributes:
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
    """
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    reduction_axes: Axes | None = None
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        channels = x.shape[-1]
        num_groups = _group_count(self.num_groups, self.group_size, channels)
        spatial = None
        if self.reduction_axes is not None:
            reduced = _checks.axes('reduction_axes', self.reduction_axes, x.ndim)
            if reduced[-1] != x.ndim - 1:
                raise ValueError(
                    f'reduction_axes={self.reduction_axes!r} must include the last'
                    ' (channel) axis.')
            if reduced[:-1] != tuple(range(1, x.ndim - 1)):
                spatial = reduced[:-1]
        scale, bias = _affine(self, (channels,))
        x, out_dtype = _promote(x, (scale, bias), self.dtype)
        return group_norm(
            x, scale, bias, num_groups=num_groups, epsilon=self.epsilon,
            **_given(axis=spatial, mask=mask, axis_name=self.axis_name,
                     axis_index_groups=self.axis_index_groups),
        ).astype(out_dtype)


class InstanceNorm(nn.Module):
    """Instance normalization layer; computes :func:`normlib.instance_norm`.

    Flax compatibility: fields, defaults (``epsilon=1e-6``), ``__call__(x, *,
    mask)`` and the ``scale``/``bias`` parameters (shaped by
    ``feature_axes``) are ``flax.linen.InstanceNorm``'s. The first axis is the
    batch axis; every axis but it and ``feature_axes`` is reduced.

    Attributes:
      epsilon: added to the variance inside the square root.
      dtype: the output dtype (default: promoted from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      feature_axes: the channel axis or axes, kept.
      axis_name: mapped axis name(s) the normalized axes are sharded over.
      axis_index_groups: device groups normalized separately.
    """
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        features = _checks.axes('feature_axes', self.feature_axes, x.ndim)
        if 0 in features:
            raise ValueError(
                f'feature_axes={self.feature_axes!r} must not include axis 0. The'
                ' channel axes cannot include the leading dimension as this is assumed to be the'
                ' batch axis.')
        scale, bias = _affine(self, _checks.features_of(x.shape, features))
        x, out_dtype = _promote(x, (scale, bias), self.dtype)
        channels_last = features == (x.ndim - 1,)
        return instance_norm(
            x, scale, bias, epsilon=self.epsilon,
            **_given(axis=None if channels_last else features, mask=mask,
                     axis_name=self.axis_name, axis_index_groups=self.axis_index_groups),
        ).astype(out_dtype)


class L2Normalize(nn.Module):
    """Scales vectors to unit L2 norm; computes :func:`normlib.l2_normalize`.

    A normlib addition (Flax has no such module); it has no variables.

    Attributes:
      axis: the axis or axes the norm is taken over.
      epsilon: the smallest divisor.
    """
    axis: Axes = -1
    epsilon: float = 1e-12

    def __call__(self, x):
        return l2_normalize(x, axis=self.axis, epsilon=self.epsilon)


class L1Normalize(nn.Module):
    """Scales vectors to unit L1 norm; computes :func:`normlib.l1_normalize`.

    A normlib addition (Flax has no such module); it has no variables.

    Attributes:
      axis: the axis or axes the norm is taken over.
      epsilon: the smallest divisor.
    """
    axis: Axes = -1
    epsilon: float = 1e-12

    def __call__(self, x):
        return l1_normalize(x, axis=self.axis, epsilon=self.epsilon)


def fold_batch_norms(variables, pairs, *, epsilon: float = 1e-5):
    """Folds evaluation-mode BatchNorms into the Dense or Conv layers before them.

    For a model whose layer at path ``layer`` feeds a BatchNorm at path
    ``bn`` (``pairs = {layer: bn}``, paths as tuples of module names or
    ``'/'``-joined strings), returns variables for the same model with those
    BatchNorms removed and the layers given a bias (``use_bias=True``):
    ``kernel`` and ``bias`` are :func:`normlib.fold_batch_norm` of the layer's
    and the BatchNorm's variables, and the BatchNorms' ``params`` and
    ``batch_stats`` are dropped. The layers must put the features last.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of the model.
      pairs: layer path -> BatchNorm path.
      epsilon: the BatchNorms' epsilon (Flax's default is 1e-5).
    """
    def path(p):
        return tuple(p.split('/')) if isinstance(p, str) else tuple(p)

    def get(tree, p):
        for key in p:
            tree = tree[key]
        return tree

    def drop(tree, p):
        if len(p) == 1:
            return {k: v for k, v in tree.items() if k != p[0]}
        return {**tree, p[0]: drop(tree[p[0]], p[1:])}

    def put(tree, p, value):
        if not p:
            return value
        return {**tree, p[0]: put(tree.get(p[0], {}), p[1:], value)}

    params, stats = dict(variables['params']), dict(variables.get('batch_stats', {}))
    for layer, bn in pairs.items():
        layer, bn = path(layer), path(bn)
        dense, norm, running = get(params, layer), get(params, bn), get(stats, bn)
        state = BatchNormState(running['mean'], running['var'],
                                       running.get('count', jnp.zeros((), jnp.int32)))
        kernel, bias = fold_batch_norm(dense['kernel'], dense.get('bias'), state,
                                               norm.get('scale'), norm.get('bias'),
                                               epsilon=epsilon)
        params = drop(put(params, layer, {**dense, 'kernel': kernel, 'bias': bias}), bn)
        stats = drop(stats, bn)
    return {**variables, 'params': params, 'batch_stats': stats}


__all__ = ['BatchNorm', 'GroupNorm', 'InstanceNorm', 'L1Normalize', 'L2Normalize',
           'LayerNorm', 'RMSNorm', 'fold_batch_norms']
