"""Flax NNX modules that drop in for ``flax.nnx``'s normalization layers.

Each module has Flax's constructor, call signature and state (``scale`` and
``bias`` as ``nnx.Param``; ``mean`` and ``var`` as float32 ``nnx.BatchStat``),
so a model moves over by changing its import and its state loads unchanged.
The modules only hold variables and call normlib's functions: the
statistics are always float32 (or wider) and at least as accurate as
Flax's ``use_fast_variance=False`` path (more accurate on offset data).
``.train()``/``.eval()``, ``nnx.view``, ``nnx.jit``, ``nnx.vmap`` and
``nnx.split``/``nnx.merge`` work as with Flax's.

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

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Initializer

from normlib import _checks, _flax, _moments
from normlib._batch_norm import BatchNormState, fold_batch_norm

_NO_METADATA = MappingProxyType({})
# The layers' arguments are keyword-only (but those of _Layer and _flax._Groups);
# equality stays NNX's (by identity).
_dataclass = nnx.dataclass(kw_only=True, eq=False)


def _param(use: bool, init: Initializer, rngs: nnx.Rngs, num_features: int,
           param_dtype: Any, metadata: Mapping[str, Any]) -> Any:
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), (num_features,), param_dtype), **metadata)


def _value(variable: nnx.Variable | None) -> jax.Array | None:
    return None if variable is None else variable[...]


def _features(param: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """``param`` (``(num_features,)``) reshaped to the input's feature ``shape``."""
    if param is None:
        return None
    if param.size != _checks.size(shape):
        raise ValueError(
            f'num_features={param.size} does not match the input, whose features'
            f' have shape {tuple(shape)}.')
    return param.reshape(shape)


@nnx.dataclass(eq=False)
class _Layer(nnx.Module):
    """The last base of the layers, so its field comes first: Flax's first argument."""
    num_features: int


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class _Params:
    """Flax NNX's arguments after the options, and the ``nnx.Param``\\ s they make.

    Attributes:
      promote_dtype: casts ``(x, scale, bias)`` to a common dtype.
      rngs: random keys for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``\\ s.
    """
    promote_dtype: Callable[..., Any] = dtypes.promote_dtype
    rngs: dataclasses.InitVar[nnx.Rngs]
    bias_metadata: dataclasses.InitVar[Mapping[str, Any]] = _NO_METADATA
    scale_metadata: dataclasses.InitVar[Mapping[str, Any]] = _NO_METADATA

    def __post_init__(self, rngs: nnx.Rngs, bias_metadata: Mapping[str, Any],
                      scale_metadata: Mapping[str, Any]) -> None:
        self.scale = _param(self.use_scale, _flax.scale_initializer(self), rngs,
                            self.num_features,
                            self.param_dtype, scale_metadata)
        self.bias = _param(self.use_bias, self.bias_init, rngs, self.num_features,
                           self.param_dtype, bias_metadata)


@_flax.document('Args')
@_dataclass
class BatchNorm(_Params, _flax.BatchNormOptions, _Layer):
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
    in some batches averages the batches it saw) that exists only then;
    ``unbiased_running_var=True`` keeps PyTorch's unbiased running variance.
    Features whose entries are all masked keep their running statistics.

    Args:
      num_features: the number of features (the size of ``x`` at ``axis``).
      dtype: the output dtype (default: promoted from the input and state).
      promote_dtype: casts ``(x, mean, var, scale, bias)`` to a common dtype.
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
    use_running_average: bool | None = False
    unbiased_running_var: bool = False

    def __post_init__(self, rngs: nnx.Rngs, bias_metadata: Mapping[str, Any],
                      scale_metadata: Mapping[str, Any]) -> None:
        self.mean = nnx.BatchStat(jnp.zeros((self.num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((self.num_features,), jnp.float32))
        if self.momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((self.num_features,), jnp.int32))
        super().__post_init__(rngs, bias_metadata, scale_metadata)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
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
        features = self._param_shape(x)
        count = (_features(self.count[...], features) if self.momentum is None
                 else jnp.zeros((), jnp.int32))
        mean = self.mean[...]
        if jnp.iscomplexobj(x) and not jnp.iscomplexobj(mean):  # as Flax: the mean turns complex
            mean = mean.astype(_moments.compute_dtype(x.dtype))
        state = BatchNormState(_features(mean, features), _features(self.var[...], features),
                               count)
        y, state = self._normalize(
            x, state, _features(scale, features), _features(bias, features),
            training=not use_running_average, mask=mask,
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

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: normalize with the running statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class _PerExample(_Params):
    """A per-example layer: Flax's ``scale`` and ``bias`` and normlib's function.

    Attributes:
      num_features: the size of ``scale`` and ``bias`` (of ``x`` at
        ``feature_axes``).
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        shape = self._param_shape(x)
        return self._normalize(x, _features(scale, shape), _features(bias, shape), mask)


@_flax.document('Args')
@_dataclass
class LayerNorm(_PerExample, _flax.LayerNormOptions, _Layer):
    """Layer normalization layer; computes :func:`normlib.layer_norm`.

    Flax compatibility: the constructor, ``__call__(x, *, mask)`` and state
    are ``flax.nnx.LayerNorm``'s; a float ``mask`` works (nonzero entries are
    kept), where Flax's raises. ``feature_axes`` may
    also name axes that are not normalized, as in Flax.
    """


@_flax.document('Args')
@_dataclass
class RMSNorm(_flax.RMSNormOptions, _Layer):
    """Root-mean-square normalization layer; computes :func:`normlib.rms_norm`.

    Flax compatibility: the constructor, ``__call__(x, *, mask)`` and state
    are ``flax.nnx.RMSNorm``'s; ``feature_axes`` may
    also name axes that are not normalized, as in Flax.

    Args:
      num_features: the size of ``scale`` (of ``x`` at ``feature_axes``).
      promote_dtype: casts ``(x, scale)`` to a common dtype.
      rngs: random keys for the initializer.
      scale_metadata: metadata of the ``nnx.Param``.
    """
    promote_dtype: Callable[..., Any] = dtypes.promote_dtype
    rngs: dataclasses.InitVar[nnx.Rngs]
    scale_metadata: dataclasses.InitVar[Mapping[str, Any]] = _NO_METADATA

    def __post_init__(self, rngs: nnx.Rngs, scale_metadata: Mapping[str, Any]) -> None:
        self.scale = _param(self.use_scale, _flax.scale_initializer(self), rngs,
                            self.num_features,
                            self.param_dtype, scale_metadata)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return self._normalize(x, _features(scale, self._param_shape(x)), mask)


@_flax.document('Args')
@_dataclass
class GroupNorm(_PerExample, _flax.GroupNormOptions, _Layer):
    """Group normalization layer; computes :func:`normlib.group_norm`.

    Flax compatibility: the constructor (``num_groups=32``, ``epsilon=1e-6``),
    ``__call__(x, *, mask)`` and state are ``flax.nnx.GroupNorm``'s. Give
    exactly one of ``num_groups`` and ``group_size``; the layer then holds
    both. Channels are the last axis. Unlike Flax's, non-default
    ``reduction_axes`` (inputs with extra leading axes) give each group its
    own statistics.

    Args:
      num_features: the number of channels.
    """

    def __post_init__(self, rngs: nnx.Rngs, bias_metadata: Mapping[str, Any],
                      scale_metadata: Mapping[str, Any]) -> None:
        num_groups = _flax.GroupNormOptions._group_count(self, self.num_features)
        if num_groups < 1 or self.num_features % num_groups:
            raise ValueError(f'num_groups={num_groups} must be >= 1 and divide'
                             f' num_features={self.num_features}.')
        self.num_groups, self.group_size = num_groups, self.num_features // num_groups
        super().__post_init__(rngs, bias_metadata, scale_metadata)

    def _group_count(self, channels: int) -> int:
        return self.num_groups  # resolved when the layer was made


@_flax.document('Args')
@_dataclass
class InstanceNorm(_PerExample, _flax.InstanceNormOptions, _Layer):
    """Instance normalization layer; computes :func:`normlib.instance_norm`.

    Flax compatibility: the constructor (``epsilon=1e-6``), ``__call__(x, *,
    mask)`` and state are ``flax.nnx.InstanceNorm``'s. The first axis is the
    batch axis; every axis but it and ``feature_axes`` is reduced.
    """


# Batch-norm folding (a deployment transform of whole models).

_FOLD_LAYERS = (nnx.Linear, nnx.Conv)
_FOLD_NORMS = (BatchNorm, nnx.BatchNorm)
_ModelT = TypeVar('_ModelT', bound=nnx.Module)


class _FoldedBatchNorm(nnx.Module):
    """Where a BatchNorm was folded into the layer before it: returns its input."""

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def _path(path: str | Sequence[Any]) -> tuple[Any, ...]:
    return tuple(path.split('/')) if isinstance(path, str) else tuple(path)


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, (nnx.List, list, tuple)):
        return node[int(key)]
    if isinstance(node, Mapping):
        return node[key]
    return getattr(node, str(key))


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, (nnx.List, list)):
        node[int(key)] = value
    elif isinstance(node, Mapping):
        node[key] = value
    else:
        setattr(node, str(key), value)


def _unfoldable(layer: Any, norm: Any) -> str | None:
    """Why ``norm`` cannot fold into ``layer`` (None when it can)."""
    if not isinstance(layer, _FOLD_LAYERS):
        what = (f'a {type(layer).__name__}' if isinstance(layer, nnx.Module)
                else f'the function {getattr(layer, "__name__", type(layer).__name__)}')
        return (f'it follows {what}, not an nnx.Linear or nnx.Conv (only a BatchNorm right'
                ' after one of them folds)')
    if norm.axis not in (-1, (-1,), [-1]):
        return (f'its axis={norm.axis!r}: only a BatchNorm over the last axis (axis=-1, the'
                " layer's output features) folds")
    if norm.mean.shape != layer.kernel.shape[-1:]:
        return (f'its {norm.mean.shape[0]} features do not match the'
                f' {layer.kernel.shape[-1]} output features of the {type(layer).__name__}')
    return None


def _fold_into(layer: nnx.Linear | nnx.Conv, norm: BatchNorm | nnx.BatchNorm) -> None:
    count = getattr(norm, 'count', None)
    state = BatchNormState(norm.mean[...], norm.var[...],
                           jnp.zeros((), jnp.int32) if count is None else count[...])
    kernel, bias = fold_batch_norm(
        layer.kernel[...], _value(layer.bias), state, _value(norm.scale), _value(norm.bias),
        epsilon=norm.epsilon)
    layer.kernel[...] = kernel
    if layer.bias is None:
        layer.bias = nnx.Param(bias)
        layer.use_bias = True
    else:
        layer.bias[...] = bias


def fold_batch_norms(model: _ModelT,
                     pairs: Mapping[str | Sequence[Any], str | Sequence[Any]] | None = None,
                     ) -> _ModelT:
    """Folds evaluation-mode BatchNorms into the Linear or Conv layers before them.

    NNX models have no graph, so two patterns are recognized:

    * in every ``nnx.Sequential`` of the model (nested ones included), an
      entry that is an ``nnx.Linear`` or ``nnx.Conv`` immediately followed
      by a BatchNorm (:class:`normlib.nnx.BatchNorm` or ``flax.nnx.BatchNorm``);
    * ``pairs``, for other modules: ``{layer path: BatchNorm path}``, paths as
      tuples of attribute names and list indices or ``'/'``-joined strings
      (``{'conv': 'bn'}``, ``{('blocks', 0, 'dense'): 'blocks/0/norm'}``),
      the layer's output going only to that BatchNorm.

    Each folded layer gets ``kernel`` and ``bias`` from
    :func:`normlib.fold_batch_norm` (``kernel * f``, ``(bias - mean) * f +
    bn_bias`` with ``f = scale / sqrt(var + epsilon)``; a layer without a bias
    gets one and ``use_bias=True``), and the BatchNorm is replaced by a module
    that returns its input, so the model computes what it computed with the
    BatchNorm in evaluation mode (``use_running_average=True``), to float32
    rounding, and every other module keeps its path. The BatchNorm must
    normalize the last axis (``axis=-1``), the layer's output features.

    A BatchNorm of the model that is not folded (in a Sequential after
    anything but a Linear or Conv, or first; outside a Sequential and not in
    ``pairs``; over another axis) is left as it is, with a warning naming
    its path and the reason.

    Args:
      model: any NNX module; it is not modified.
      pairs: layer path -> BatchNorm path, for layers outside a Sequential.

    Returns:
      A folded copy of ``model`` (``nnx.clone``), sharing no state with it.

    Raises:
      ValueError: a pair of ``pairs`` that does not fold (the path is not a
        Linear or Conv and a BatchNorm, or the axis or features differ).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import normlib.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
        ...                        normlib.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.relu)
        >>> x = jax.random.normal(jax.random.key(0), (8, 4))
        >>> _ = model(x)  # a training step moves the running statistics
        >>> model.eval()
        >>> folded = normlib.nnx.fold_batch_norms(model)
        >>> type(folded.layers[1]).__name__
        '_FoldedBatchNorm'
        >>> bool(jnp.allclose(folded(x), model(x), atol=1e-5))
        True
    """
    model = nnx.clone(model)
    reasons: dict[tuple[Any, ...], str] = {}
    for layer_path, norm_path in (pairs or {}).items():
        layer_path, norm_path = _path(layer_path), _path(norm_path)
        layer, norm = model, model
        for key in layer_path:
            layer = _child(layer, key)
        for key in norm_path[:-1]:
            norm = _child(norm, key)
        parent, norm = norm, _child(norm, norm_path[-1])
        where = f'pairs[{"/".join(map(str, layer_path))!r}] = {"/".join(map(str, norm_path))!r}'
        if not isinstance(norm, _FOLD_NORMS):
            raise ValueError(f'{where}: {type(norm).__name__} is not a BatchNorm'
                             ' (normlib.nnx.BatchNorm or flax.nnx.BatchNorm).')
        reason = _unfoldable(layer, norm)
        if reason is not None:
            raise ValueError(f'{where}: the BatchNorm does not fold: {reason}.')
        _fold_into(layer, norm)
        _set_child(parent, norm_path[-1], _FoldedBatchNorm())
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Sequential):
            continue
        entries = list(node.layers)
        for i, entry in enumerate(entries):
            if not isinstance(entry, _FOLD_NORMS):
                continue
            reason = ('it is the first entry of an nnx.Sequential' if i == 0
                      else _unfoldable(entries[i - 1], entry))
            if reason is None:
                _fold_into(entries[i - 1], entry)
                node.layers[i] = _FoldedBatchNorm()
            else:
                reasons[(*path, 'layers', i)] = reason
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _FOLD_NORMS):
            reason = reasons.get(tuple(path), 'it is neither in an nnx.Sequential nor in pairs')
            warnings.warn(f'fold_batch_norms: the BatchNorm at {"/".join(map(str, path))!r}'
                          f' is not folded: {reason}.', stacklevel=2)
    return model


__all__ = ['BatchNorm', 'GroupNorm', 'InstanceNorm', 'LayerNorm', 'RMSNorm', 'fold_batch_norms']
