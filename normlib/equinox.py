"""Equinox modules that drop in for ``equinox.nn``'s normalization layers.

``BatchNorm``, ``LayerNorm``, ``GroupNorm`` and ``RMSNorm`` take
``eqx.nn``'s constructor arguments and ``__call__`` signatures, use
``eqx.nn.State`` as ``eqx.nn.BatchNorm`` does, and call normlib's functions:
they hold no statistics code of their own. A model moves over by changing
its import, e.g. ``eqx.nn.make_with_state(normlib.equinox.BatchNorm)(64,
'batch')``, and runs per example under ``jax.vmap(..., axis_name='batch')``.

What differs from ``eqx.nn.BatchNorm`` (and why):

* Training normalizes with the batch's statistics, as ``eqx.nn.BatchNorm``'s
  ``mode='batch'`` does; ``mode`` defaults to ``'batch'`` (Equinox's
  default, ``'legacy'``, means ``'ema'`` with a warning; ``'ema'``
  normalizes training batches with the running averages instead, which
  normlib does not implement: ``mode='ema'`` raises).
* The running statistics are the zero-debiased exponential moving average
  (normlib's ``zero_debias=True``): the first batch replaces the
  mean-0/var-1 prior. ``eqx.nn.BatchNorm``'s ``'batch'`` mode divides an
  average that started at var 1 by ``1 - momentum**t``, which inflates the
  running variance (5.5x after 20 steps at ``momentum=0.99`` on unit data).
* The running statistics are float32 or wider whatever ``dtype`` is:
  ``dtype=jnp.bfloat16`` (or float16) gives parameters of that dtype, as
  ``eqx.nn.BatchNorm``'s, and float32 statistics, where Equinox keeps them
  in bfloat16. Outputs have the input's dtype (Equinox's is the input's
  promoted with the parameters').
* The state has ``eqx.nn.BatchNorm``'s layout for ``mode='batch'``
  (``batch_state_index`` holds ``(mean, var)``, ``batch_counter`` the
  number of updates; the ``ema_*`` indices are None), but
  ``batch_state_index`` holds the statistics themselves, used as they are
  for inference, not Equinox's averages that await division by
  ``1 - momentum**counter``.
* ``momentum=None`` keeps the exact average of all batches; ``mask=``
  leaves padding out of the statistics; statistics are exact at any offset
  and across devices (``axis_name`` may name ``pmap``/``shard_map`` axes too).

Equinox is an optional extra (``pip install "normlib[equinox]"``);
``import normlib`` does not load it.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from normlib import _moments
from normlib._batch_norm import BatchNormState, batch_norm, fold_batch_norm, init_batch_norm
from normlib._layer_norm import group_norm, layer_norm, rms_norm


def _float_dtype(dtype: Any) -> jnp.dtype:
    """``dtype``, or Equinox's default: float64 under ``jax_enable_x64``, else float32."""
    return jnp.result_type(float) if dtype is None else jnp.dtype(dtype)


def _affine(shape: tuple[int, ...], use_weight: bool, use_bias: bool,
            dtype: Any) -> tuple[jax.Array | None, jax.Array | None]:
    """The initial ``weight`` (ones) and ``bias`` (zeros) of ``shape``, or None."""
    dtype = _float_dtype(dtype)
    return (jnp.ones(shape, dtype) if use_weight else None,
            jnp.zeros(shape, dtype) if use_bias else None)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization; computes :func:`normlib.batch_norm` per example.

    ``x`` has shape ``(input_size, dim_1, ..., dim_N)`` (one example, channels
    first) and the module runs under ``jax.vmap(..., axis_name=axis_name)``
    over the batch; the statistics cover every mapped example (and any
    ``pmap``/``shard_map`` axes also named).

    Args:
      input_size: the number of channels.
      axis_name: the vmapped batch axis name (or a sequence of names).
      eps: added to the variance inside the square root.
      channelwise_affine: learn a per-channel ``weight`` and ``bias``.
      momentum: running-average decay in [0, 1], or None for the exact
        average of all batches.
      inference: normalize with the running statistics (can be overridden
        per call, or with ``eqx.nn.inference_mode``).
      dtype: dtype of ``weight``/``bias`` (float32, or float64 under
        ``jax_enable_x64``, by default); the running statistics have this
        dtype or float32, whichever is wider.
      mode: ``'batch'`` (the only mode; see the module docstring).

    Attributes:
      batch_state_index: the ``eqx.nn.StateIndex`` of the running
        ``(mean, var)``, each of shape ``(input_size,)``; ``state_index`` is
        another name for it (older Equinox's, before ``mode``).
      batch_counter: the ``eqx.nn.StateIndex`` of the int32 number of
        training updates so far.
      ema_first_time_index, ema_state_index: None, as in
        ``eqx.nn.BatchNorm(mode='batch')``.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import normlib.equinox
        >>> bn, state = eqx.nn.make_with_state(normlib.equinox.BatchNorm)(3, 'batch')
        >>> x = jax.random.normal(jax.random.key(0), (16, 3, 5)) * 2 + 7  # (batch, C, L)
        >>> y, state = jax.vmap(bn, axis_name='batch', in_axes=(0, None),
        ...                     out_axes=(0, None))(x, state)
        >>> print((jnp.round(y.mean((0, 2)), 4) + 0).tolist())
        [0.0, 0.0, 0.0]
        >>> mean, var = state.get(bn.batch_state_index)
        >>> bool(jnp.allclose(var, x.var((0, 2)), rtol=1e-5))  # the first batch, debiased
        True
    """
    weight: Any
    bias: Any
    ema_first_time_index: None
    ema_state_index: None
    batch_counter: eqx.nn.StateIndex
    batch_state_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: str = eqx.field(static=True)

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable],
                 eps: float = 1e-5, channelwise_affine: bool = True,
                 momentum: float | None = 0.99, inference: bool = False, dtype: Any = None,
                 mode: str = 'batch') -> None:
        if mode != 'batch':
            raise ValueError(
                f"mode={mode!r}: normlib.equinox.BatchNorm normalizes training batches with"
                " their own statistics (eqx.nn.BatchNorm's mode='batch'); 'ema' is not"
                ' implemented.')
        self.weight, self.bias = _affine((input_size,), channelwise_affine, channelwise_affine,
                                         dtype)
        # Statistics in float32 or wider: half-precision running averages lose
        # every batch's contribution below their resolution.
        stats = init_batch_norm(input_size, _moments.compute_dtype(_float_dtype(dtype)))
        self.ema_first_time_index = self.ema_state_index = None
        self.batch_counter = eqx.nn.StateIndex(stats.count)
        self.batch_state_index = eqx.nn.StateIndex((stats.mean, stats.var))
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode

    @property
    def state_index(self) -> eqx.nn.StateIndex:
        """``batch_state_index`` by older Equinox's name (before ``mode``)."""
        return self.batch_state_index

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None,
                 mask: jax.Array | None = None) -> tuple[jax.Array, eqx.nn.State]:
        """Returns ``(y, state)``; ``y`` has ``x``'s shape.

        Args:
          x: one example, ``(input_size, dim_1, ..., dim_N)``.
          state: the ``eqx.nn.State`` holding the running statistics.
          key: ignored (Equinox's API).
          inference: overrides ``self.inference`` when given.
          mask: optional boolean broadcastable to ``x``; False entries are
            left out of the statistics.
        """
        del key
        inference = self.inference if inference is None else inference
        stats = BatchNormState(*state.get(self.batch_state_index), state.get(self.batch_counter))
        y, new = batch_norm(x, stats, self.weight, self.bias, training=not inference, axis=0,
                            momentum=self.momentum, epsilon=self.eps,
                            axis_name=None if inference else self.axis_name, mask=mask,
                            zero_debias=self.momentum is not None)
        if not inference:
            state = state.set(self.batch_state_index, (new.mean, new.var))
            state = state.set(self.batch_counter, new.count)
        return y, state


class _Elementwise(eqx.Module):
    """Normalization over every axis of one example ``x`` of shape ``shape``, with a
    ``weight`` and ``bias`` of that shape too (``eqx.nn.LayerNorm``'s and ``RMSNorm``'s
    arguments)."""
    weight: Any
    bias: Any
    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    memory_efficient: bool = eqx.field(static=True)

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True,
                 use_bias: bool = True, dtype: Any = None, *, scale_offset: float = 0.0,
                 memory_efficient: bool = False) -> None:
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.use_weight, self.use_bias = use_weight, use_bias
        self.weight, self.bias = _affine(self.shape, use_weight, use_bias, dtype)
        self.scale_offset, self.memory_efficient = float(scale_offset), bool(memory_efficient)
        if self.scale_offset and self.weight is not None:  # zero-centred: starts at 0
            self.weight = jnp.zeros_like(self.weight)

    def _options(self) -> dict:
        return {'scale_offset': self.scale_offset, 'memory_efficient': self.memory_efficient}

    def __call__(self, x: jax.Array, state: eqx.nn.State | None = None, *, key: Any = None,
                 mask: jax.Array | None = None) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        """``y`` (or ``(y, state)`` when a state is passed, unchanged)."""
        del key
        if x.shape != self.shape:
            raise ValueError(
                f'{type(self).__name__}(shape)(x) needs x.shape == shape, got'
                f' shape={self.shape} and x.shape={x.shape}; map it over a batch with jax.vmap.')
        y = self._normalize(x, tuple(range(x.ndim)), mask)
        return y if state is None else (y, state)


class LayerNorm(_Elementwise):
    """Layer normalization over every axis of ``x``; computes :func:`normlib.layer_norm`.

    ``eqx.nn.LayerNorm``'s arguments: ``x`` has shape ``shape`` (one
    example), ``weight`` and ``bias`` have that shape too. normlib's
    keyword arguments: ``scale_offset`` (the layer multiplies by
    ``scale_offset + weight``, in float32; ``1.0`` is Gemma's zero-centred
    scale, and ``weight`` then starts at zeros) and ``memory_efficient``
    (see :func:`normlib.layer_norm`).

    Example:
        >>> import jax, jax.numpy as jnp, normlib.equinox
        >>> ln = normlib.equinox.LayerNorm(4)
        >>> y = ln(jnp.array([1.0, 2.0, 3.0, 4.0]) + 1e6)
        >>> [round(v, 3) for v in y.tolist()]
        [-1.342, -0.447, 0.447, 1.342]
    """

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True,
                 use_bias: bool = True, dtype: Any = None, *,
                 elementwise_affine: bool | None = None, scale_offset: float = 0.0,
                 memory_efficient: bool = False) -> None:
        if elementwise_affine is not None:
            use_weight = use_bias = elementwise_affine
        super().__init__(shape, eps, use_weight, use_bias, dtype, scale_offset=scale_offset,
                         memory_efficient=memory_efficient)

    def _normalize(self, x: jax.Array, axes: tuple[int, ...],
                   mask: jax.Array | None) -> jax.Array:
        return layer_norm(x, self.weight, self.bias, axis=axes, epsilon=self.eps, mask=mask,
                          **self._options())


class RMSNorm(_Elementwise):
    """RMS normalization over every axis of ``x``; computes :func:`normlib.rms_norm`.

    ``eqx.nn.RMSNorm``'s arguments: ``y = x / sqrt(mean(x**2) + eps) * weight
    + bias``, the optional ``bias`` added after normlib's RMS norm;
    ``scale_offset`` and ``memory_efficient`` as in :class:`LayerNorm`
    (``memory_efficient`` needs ``use_bias=False``, as the bias is added
    outside the normalization).
    """

    def _normalize(self, x: jax.Array, axes: tuple[int, ...],
                   mask: jax.Array | None) -> jax.Array:
        if self.bias is None:
            return rms_norm(x, self.weight, axis=axes, epsilon=self.eps, mask=mask,
                            **self._options())
        if self.memory_efficient:
            raise ValueError('RMSNorm(memory_efficient=True) needs use_bias=False: the bias is'
                             ' added after the normalization, whose output is what it keeps.')
        # rms_norm takes no bias: add it in the compute dtype, so that y is
        # rounded to x's dtype once (rounding before the sum loses the
        # digits that cancel).
        wide = _moments.compute_dtype(x.dtype)
        y = rms_norm(x.astype(wide), self.weight, axis=axes, epsilon=self.eps, mask=mask,
                     scale_offset=self.scale_offset)
        return (y + self.bias.astype(wide)).astype(x.dtype)


class GroupNorm(eqx.Module):
    """Group normalization of one channels-first example; computes :func:`normlib.group_norm`.

    ``eqx.nn.GroupNorm``'s arguments: ``x`` has shape ``(channels, ...)``;
    its channels are split into ``groups`` contiguous groups, each
    normalized over its channels and every other axis.
    """
    weight: Any
    bias: Any
    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)

    def __init__(self, groups: int, channels: int | None = None, eps: float = 1e-5,
                 channelwise_affine: bool = True, dtype: Any = None) -> None:
        if channels is not None and channels % groups:
            raise ValueError(f'groups={groups} must divide channels={channels}.')
        if channels is None and channelwise_affine:
            raise ValueError('GroupNorm needs channels when channelwise_affine=True.')
        self.groups, self.channels, self.eps = groups, channels, eps
        self.channelwise_affine = channelwise_affine
        self.weight, self.bias = _affine((channels,), channelwise_affine, channelwise_affine,
                                         dtype)

    def __call__(self, x: jax.Array, state: eqx.nn.State | None = None, *,
                 key: Any = None) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        """``y`` (or ``(y, state)`` when a state is passed, unchanged)."""
        del key
        # normlib's group_norm takes (N, ..., C): add a batch axis, channels last.
        channels_last = jnp.moveaxis(x, 0, -1)[None]
        y = group_norm(channels_last, self.weight, self.bias, num_groups=self.groups,
                       epsilon=self.eps)
        y = jnp.moveaxis(y[0], -1, 0)
        return y if state is None else (y, state)


# Batch-norm folding (a deployment transform of whole models).

_FOLD_NORMS = (BatchNorm, eqx.nn.BatchNorm)
_PyTreeT = TypeVar('_PyTreeT')


def _running_statistics(norm: BatchNorm | eqx.nn.BatchNorm,
                        state: eqx.nn.State) -> BatchNormState:
    """The statistics ``norm`` normalizes with in inference mode."""
    if isinstance(norm, eqx.nn.BatchNorm) and norm.mode == 'ema':
        mean, var = state.get(norm.ema_state_index)
    else:
        mean, var = state.get(norm.batch_state_index)
        if isinstance(norm, eqx.nn.BatchNorm):  # Equinox's 'batch' mode debiases when used
            counter = state.get(norm.batch_counter)
            debias = jnp.where(counter == 0, 1, 1 - norm.momentum ** counter)
            mean, var = mean / debias, var / debias
    return BatchNormState(mean, var, jnp.zeros((), jnp.int32))


def _unfoldable(layer: Any, norm: BatchNorm | eqx.nn.BatchNorm) -> str | None:
    """Why ``norm`` cannot fold into ``layer`` (None when it can)."""
    if not isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv)):
        return (f'it follows a {type(layer).__name__}, not an eqx.nn.Linear or eqx.nn.Conv (only'
                ' a BatchNorm right after one of them folds)')
    if isinstance(layer, eqx.nn.Linear) and layer.out_features == 'scalar':
        return "it follows an eqx.nn.Linear with out_features='scalar'"
    if layer.weight.shape[0] != norm.input_size:
        return (f'its input_size={norm.input_size} does not match the {layer.weight.shape[0]}'
                f' output features of the {type(layer).__name__}')
    return None


def _fold_into(layer: eqx.nn.Linear | eqx.nn.Conv, norm: BatchNorm | eqx.nn.BatchNorm,
               state: eqx.nn.State) -> eqx.nn.Linear | eqx.nn.Conv:
    # Equinox puts the output features first (weight (out, in, *kernel), bias
    # (out, 1, ..., 1)); fold_batch_norm takes them last.
    out = layer.weight.shape[0]
    bias = None if layer.bias is None else layer.bias.reshape(out)
    affine = norm.channelwise_affine
    kernel, bias = fold_batch_norm(
        jnp.moveaxis(layer.weight, 0, -1), bias, _running_statistics(norm, state),
        norm.weight if affine else None, norm.bias if affine else None, epsilon=norm.eps)
    bias_shape = (out,) + (1,) * (layer.weight.ndim - 2 if isinstance(layer, eqx.nn.Conv) else 0)
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer,
                        (jnp.moveaxis(kernel, -1, 0), bias.reshape(bias_shape)),
                        is_leaf=lambda v: v is None)
    if not layer.use_bias:  # a static field, which tree_at cannot set; layer is a new copy
        object.__setattr__(layer, 'use_bias', True)
    return layer


def _fold_sequentials(tree: _PyTreeT, prefix: tuple[Any, ...], state: eqx.nn.State,
                      reasons: dict[str, str]) -> _PyTreeT:
    """``tree`` with the pairs of each ``eqx.nn.Sequential`` in it folded, inner ones first."""
    def fold(path: tuple[Any, ...], node: Any) -> Any:
        if not isinstance(node, eqx.nn.Sequential):
            return node
        path = prefix + path + (jax.tree_util.GetAttrKey('layers'),)
        entries = [_fold_sequentials(entry, path + (jax.tree_util.SequenceKey(i),), state,
                                     reasons) for i, entry in enumerate(node.layers)]
        folded = list(entries)
        for i, entry in enumerate(entries):
            if not isinstance(entry, _FOLD_NORMS):
                continue
            reason = ('it is the first entry of an eqx.nn.Sequential' if i == 0
                      else _unfoldable(entries[i - 1], entry))
            if reason is None:
                folded[i - 1], folded[i] = _fold_into(entries[i - 1], entry, state), \
                    eqx.nn.Identity()
            else:
                reasons[jax.tree_util.keystr(path + (jax.tree_util.SequenceKey(i),))] = reason
        return eqx.tree_at(lambda s: s.layers, node, tuple(folded))

    return jax.tree_util.tree_map_with_path(
        fold, tree, is_leaf=lambda v: isinstance(v, eqx.nn.Sequential))


def fold_batch_norms(model: _PyTreeT,
                     state: eqx.nn.State) -> tuple[_PyTreeT, eqx.nn.State]:
    """Folds inference-mode BatchNorms into the Linear or Conv layers before them.

    Recognized: in every ``eqx.nn.Sequential`` of ``model`` (nested ones
    included), an ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (``Conv1d``/``2d``/
    ``3d``; not ``ConvTranspose``) immediately followed by a BatchNorm
    (:class:`normlib.equinox.BatchNorm` or ``eqx.nn.BatchNorm``, either
    ``mode``). The layer gets ``weight`` and ``bias`` from
    :func:`normlib.fold_batch_norm` (``weight * f`` along the output
    channels, ``(bias - mean) * f + bn_bias`` with ``f = weight_bn / sqrt(var
    + eps)``; a layer without a bias gets one and ``use_bias=True``) and the
    BatchNorm becomes ``eqx.nn.Identity()``, so the model computes what it
    computed with the BatchNorm in inference mode, to float32 rounding. The
    statistics are those inference uses: normlib's running ``(mean, var)``,
    ``eqx.nn.BatchNorm``'s ``ema`` averages or its debiased ``batch`` ones.

    A BatchNorm that is not folded (first in a Sequential, after anything but
    a Linear or Conv, or outside a Sequential) is left as it is, with a
    warning naming its path and the reason.

    Args:
      model: any pytree of Equinox modules; it is not modified.
      state: the ``eqx.nn.State`` holding the model's running statistics.

    Returns:
      ``(folded model, its state)``: the state without the folded BatchNorms'
      entries (``state.substate`` of the folded model).

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import normlib.equinox
        >>> model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        ...     eqx.nn.Linear(4, 3, key=jax.random.key(0)),
        ...     normlib.equinox.BatchNorm(3, 'batch'), eqx.nn.Lambda(jax.nn.relu)])
        >>> run = jax.vmap(model, axis_name='batch', in_axes=(0, None), out_axes=(0, None))
        >>> x = jax.random.normal(jax.random.key(1), (8, 4))
        >>> _, state = run(x, state)  # a training step moves the running statistics
        >>> model = eqx.nn.inference_mode(model)
        >>> folded, folded_state = normlib.equinox.fold_batch_norms(model, state)
        >>> folded.layers[1]
        Identity()
        >>> bool(jnp.allclose(jax.vmap(folded)(x), run(x, state)[0], atol=1e-5))
        True
    """
    reasons: dict[str, str] = {}
    folded = _fold_sequentials(model, (), state, reasons)
    leaves = jax.tree_util.tree_leaves_with_path(
        folded, is_leaf=lambda v: isinstance(v, _FOLD_NORMS))
    for path, leaf in leaves:
        if isinstance(leaf, _FOLD_NORMS):
            where = jax.tree_util.keystr(path)
            reason = reasons.get(where, 'it is not an entry of an eqx.nn.Sequential')
            warnings.warn(f'fold_batch_norms: the BatchNorm at model{where} is not folded:'
                          f' {reason}.', stacklevel=2)
    return folded, state.substate(folded)
