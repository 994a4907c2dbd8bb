"""Flax Linen modules that drop in for ``flax.linen``'s normalization layers.

Each module has Flax's fields, defaults, call signature and variables
(``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``,
same names, shapes and dtypes), so a model moves over by changing its import
and an existing checkpoint loads unchanged. The modules only create variables
and call normlib's functions, so the statistics are always float32 (or
wider) and at least as accurate as Flax's ``use_fast_variance=False`` path:
equal to float32 rounding on ordinary data, more accurate on offset data.

Fields are given by keyword, as NNX's arguments are (GroupNorm's
``num_groups`` and ``group_size`` may also come first by position).

Not copied from Flax: ``use_fast_variance`` (normlib is always stable) and
``force_float32_reductions`` (statistics are always float32 or wider).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes
from flax.typing import Axes, Dtype

from normlib import _flax, _moments
from normlib._batch_norm import BatchNormState, fold_batch_norm
from normlib._lp_norm import lp_normalize


def _promote(x: jax.Array, params: tuple[jax.Array | None, ...],
             dtype: Dtype | None) -> tuple[jax.Array, Dtype]:
    """``x`` in the dtype normlib should see, and the dtype Flax returns.

    Flax's output dtype is ``dtype`` or else the promotion of the input and
    the parameters (bfloat16 inputs with float32 parameters give float32).
    Widening ``x`` first is exact; narrowing happens only on the output.
    """
    x = jnp.asarray(x)
    out = dtypes.canonicalize_dtype(x, *params, dtype=dtype)
    return x.astype(jnp.promote_types(x.dtype, out)), out


def _affine(module: nn.Module, shape: tuple[int, ...]) -> tuple[jax.Array | None, ...]:
    """The ``scale`` and ``bias`` parameters (or None) of ``module``."""
    scale = (module.param('scale', _flax.scale_initializer(module), shape, module.param_dtype)
             if module.use_scale else None)
    bias = (module.param('bias', module.bias_init, shape, module.param_dtype)
            if module.use_bias else None)
    return scale, bias


@_flax.document('Attributes')
class BatchNorm(nn.Module, _flax.BatchNormOptions, kw_only=True):
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
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        features = self._param_shape(x)
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
        y, state = self._normalize(
            x, state, scale, bias, training=not use_running_average, mask=mask,
            unbiased_running_var=self.unbiased_running_var, synced=not initializing)
        if not use_running_average and not initializing:
            mean.value, var.value = state.mean, state.var
            if count is not None:
                count.value = state.count
        return y.astype(out_dtype)


class _PerExample(nn.Module):
    """A per-example layer: Flax's ``scale`` and ``bias`` and normlib's function."""

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x = jnp.asarray(x)
        scale, bias = _affine(self, self._param_shape(x))
        x, out_dtype = _promote(x, (scale, bias), self.dtype)
        return self._normalize(x, scale, bias, mask).astype(out_dtype)


@_flax.document('Attributes')
class LayerNorm(_PerExample, _flax.LayerNormOptions, kw_only=True):
    """Layer normalization layer; computes :func:`normlib.layer_norm`.

    Flax compatibility: fields, defaults, ``__call__(x, *, mask)`` and the
    ``scale``/``bias`` parameters (shaped by ``feature_axes``) are
    ``flax.linen.LayerNorm``'s. ``feature_axes`` may
    also name axes that are not normalized, as in Flax.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import normlib.linen as nn
        >>> x = jax.random.normal(jax.random.key(0), (2, 4)) + 1e6
        >>> variables = nn.LayerNorm().init(jax.random.key(1), x)
        >>> y = nn.LayerNorm().apply(variables, x)
        >>> print(jnp.round(y.std(-1), 3).tolist())
        [1.0, 1.0]
    """


@_flax.document('Attributes')
class RMSNorm(nn.Module, _flax.RMSNormOptions, kw_only=True):
    """Root-mean-square normalization layer; computes :func:`normlib.rms_norm`.

    Flax compatibility: fields, defaults, ``__call__(x, *, mask)`` and the
    ``scale`` parameter are ``flax.linen.RMSNorm``'s; ``feature_axes`` must be
    among ``reduction_axes``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x = jnp.asarray(x)
        scale = (self.param('scale', _flax.scale_initializer(self), self._param_shape(x),
                            self.param_dtype) if self.use_scale else None)
        x, out_dtype = _promote(x, (scale,), self.dtype)
        return self._normalize(x, scale, mask).astype(out_dtype)


@_flax.document('Attributes')
class GroupNorm(_PerExample, _flax.GroupNormOptions, kw_only=True):
    """Group normalization layer; computes :func:`normlib.group_norm`.

    Flax compatibility: fields, defaults (``num_groups=32``, ``epsilon=1e-6``),
    ``__call__(x, *, mask)`` and the ``scale``/``bias`` parameters of shape
    ``(C,)`` are ``flax.linen.GroupNorm``'s. Give exactly one of
    ``num_groups`` and ``group_size`` (``num_groups=None`` to use
    ``group_size``). Channels are the last axis.
    """


@_flax.document('Attributes')
class InstanceNorm(_PerExample, _flax.InstanceNormOptions, kw_only=True):
    """Instance normalization layer; computes :func:`normlib.instance_norm`.

    Flax compatibility: fields, defaults (``epsilon=1e-6``), ``__call__(x, *,
    mask)`` and the ``scale``/``bias`` parameters (shaped by
    ``feature_axes``) are ``flax.linen.InstanceNorm``'s. The first axis is the
    batch axis; every axis but it and ``feature_axes`` is reduced.
    """


class _UnitNormalize(nn.Module):
    """Scales vectors to unit Lp norm, for the subclass's ``p``.

    Attributes:
      axis: the axis or axes the norm is taken over.
      epsilon: the smallest divisor.
    """
    axis: Axes = -1
    epsilon: float = 1e-12

    def __call__(self, x: jax.Array) -> jax.Array:
        return lp_normalize(x, self._p, axis=self.axis, epsilon=self.epsilon)


@_flax.document('Attributes')
class L2Normalize(_UnitNormalize):
    """Scales vectors to unit L2 norm; computes :func:`normlib.l2_normalize`.

    A normlib addition (Flax has no such module); it has no variables.
    """
    _p = 2.0


@_flax.document('Attributes')
class L1Normalize(_UnitNormalize):
    """Scales vectors to unit L1 norm; computes :func:`normlib.l1_normalize`.

    A normlib addition (Flax has no such module); it has no variables.
    """
    _p = 1.0


def fold_batch_norms(variables: Mapping[str, Any], pairs: Mapping[Any, Any], *,
                     epsilon: float = 1e-5) -> dict[str, Any]:
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

    Returns:
      The model's variables without the BatchNorms' and with the folded layers'.
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
                                       norm.get('scale'), norm.get('bias'), epsilon=epsilon)
        params = drop(put(params, layer, {**dense, 'kernel': kernel, 'bias': bias}), bn)
        stats = drop(stats, bn)
    return {**variables, 'params': params, 'batch_stats': stats}


__all__ = ['BatchNorm', 'GroupNorm', 'InstanceNorm', 'L1Normalize', 'L2Normalize',
           'LayerNorm', 'RMSNorm', 'fold_batch_norms']
