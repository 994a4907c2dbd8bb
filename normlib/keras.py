"""Keras 3 layers (JAX backend) that drop in for ``keras.layers``' normalization layers.

``BatchNormalization``, ``LayerNormalization``, ``GroupNormalization``,
``UnitNormalization`` and ``RMSNormalization`` are Keras's own layers with
their ``call`` computed by normlib's functions: the same arguments and
defaults (``momentum=0.99``, ``epsilon=1e-3``, initializers, regularizers,
constraints), the same weights in the same order (``gamma``, ``beta``,
``moving_mean``, ``moving_variance``), ``get_config``/``from_config``,
saving to ``model.keras`` files, ``training=`` and ``trainable=False`` (a frozen
``BatchNormalization`` runs in inference mode, as Keras's). Every Keras dtype
policy (``'float32'``, ``'bfloat16'``, ``'float16'``, ``'mixed_bfloat16'``,
``'mixed_float16'``) gives the variable and output dtypes of Keras's layer;
the statistics are computed in float32 (or wider) whatever the policy, and
integer or boolean inputs are cast to float32, as Keras's
``BatchNormalization`` casts them. A model moves over by changing its
import, and existing weights load unchanged.

What normlib adds:

* statistics exact wherever the data sit (at ``|mean|/std = 1e6`` Keras's
  own batch norm is off by about 0.2, normlib's by under 1e-6);
* ``BatchNormalization(synchronized=True)`` works on JAX (Keras raises):
  under a data-parallel ``keras.distribution`` the layer sees the global
  batch as one sharded array and its statistics cover every device, with
  either value of ``synchronized``;
* a ``mask`` with padding entries (NaN or inf included) never reaches the
  statistics or the gradients.

Not supported: ``BatchNormalization(renorm=True)`` (use
:func:`normlib.batch_renorm`) and the deprecated
``LayerNormalization(rms_scaling=True)`` (use ``RMSNormalization``).

Keras is an optional extra (``pip install "normlib[keras]"``) and needs
``KERAS_BACKEND=jax``; ``import normlib`` does not load it. Layers are
registered for serialization as ``normlib>BatchNormalization`` etc.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras

from normlib import _moments
from normlib._batch_norm import BatchNormState, batch_norm, fold_batch_norm
from normlib._layer_norm import group_norm, layer_norm, rms_norm
from normlib._lp_norm import l2_normalize

if keras.backend.backend() != 'jax':
    raise ImportError(
        f'normlib.keras needs Keras\'s JAX backend, but Keras runs on'
        f' {keras.backend.backend()!r}: set the environment variable KERAS_BACKEND=jax before'
        ' importing keras.')

_register = keras.saving.register_keras_serializable(package='normlib')


def _value(variable: keras.Variable | None) -> jax.Array | None:
    return None if variable is None else jnp.asarray(variable.value)


def _axes(axis: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)


def _floating(inputs: Any) -> jax.Array:
    # Keras computes integer and boolean inputs in result_type(dtype, 'float32'),
    # which is float32; normlib's functions take floating inputs only.
    x = jnp.asarray(inputs)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def _statistic(variable: keras.Variable) -> jax.Array:
    # normlib's state is float32 or wider; a 'bfloat16' or 'float16' policy
    # stores Keras's moving statistics in that dtype.
    value = jnp.asarray(variable.value)
    return value.astype(_moments.compute_dtype(value.dtype))


@_register
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by :func:`normlib.batch_norm`.

    Training (``training=True`` on a trainable layer) normalizes with the
    batch's moments (biased variance) and updates
    ``moving = momentum * moving + (1 - momentum) * batch``; otherwise the
    moving statistics are used: ``y = (x - mean) / sqrt(var + epsilon) *
    gamma + beta``, in float32 for narrower inputs (integers are cast to
    float32), returned in the layer's compute dtype. ``mask`` has one
    dimension less than the input (Keras's convention); False entries are
    left out of the moments. A feature with no valid entry (an all-False
    mask) is normalized with the moving statistics and leaves them unchanged;
    Keras's takes its batch moments to be 0 and moves them toward 0.

    The variables have the dtype policy's variable dtype, as Keras's: under
    ``'mixed_bfloat16'`` or ``'mixed_float16'`` the moving statistics are
    float32; under ``'bfloat16'`` or ``'float16'`` they are stored in that
    dtype, so each update is rounded to it (as Keras's are), and they are
    widened to float32 for the computation.

    Example:
        >>> import os; os.environ.setdefault('KERAS_BACKEND', 'jax')
        'jax'
        >>> import numpy as np, normlib.keras
        >>> layer = normlib.keras.BatchNormalization()
        >>> x = np.random.default_rng(0).normal(1e6, 1, (64, 3)).astype('float32')
        >>> y = layer(x, training=True)
        >>> [w.name for w in layer.weights]
        ['gamma', 'beta', 'moving_mean', 'moving_variance']
        >>> bool(np.allclose(np.asarray(y).std(0), 1, atol=1e-3))
        True
    """

    def __init__(self, *args: Any, synchronized: bool = False, **kwargs: Any) -> None:
        if kwargs.get('renorm', False):
            raise ValueError('normlib.keras.BatchNormalization does not implement renorm=True;'
                             ' use normlib.batch_renorm.')
        super().__init__(*args, synchronized=False, **kwargs)
        # On JAX the layer sees the global batch of a keras.distribution run,
        # so its statistics are synchronized with either value.
        self.synchronized = bool(synchronized)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                'The mask provided should be one dimension less than the inputs. Received:'
                f' mask.shape={mask.shape}, inputs.shape={inputs.shape}')
        train = bool(training) and self.trainable
        state = BatchNormState(_statistic(self.moving_mean), _statistic(self.moving_variance),
                               jnp.zeros((), jnp.int32))
        y, new = batch_norm(
            _floating(inputs), state, _value(self.gamma) if self.scale else None,
            _value(self.beta) if self.center else None, training=train, axis=self.axis,
            momentum=self.momentum, epsilon=self.epsilon,
            mask=None if mask is None else jnp.asarray(mask)[..., None])
        if train:
            self.moving_mean.assign(new.mean.astype(self.moving_mean.dtype))
            self.moving_variance.assign(new.var.astype(self.moving_variance.dtype))
        return keras.ops.cast(y, self.compute_dtype)


class _Options:
    """normlib's two options of a layer or RMS norm layer, kept in its config.

    ``scale_offset``: the layer multiplies by ``scale_offset + scale`` (in
    float32); ``1.0`` is Gemma's zero-centred scale, and a nonzero offset
    starts the scale at zeros. ``memory_efficient``: the reverse pass keeps
    the output instead of the input (see :func:`normlib.layer_norm`).
    """

    def _take_options(self, kwargs: dict) -> dict:
        self.scale_offset = float(kwargs.pop('scale_offset', 0.0))
        self.memory_efficient = bool(kwargs.pop('memory_efficient', False))
        return kwargs

    def _options(self) -> dict:
        return {'scale_offset': self.scale_offset, 'memory_efficient': self.memory_efficient}

    def get_config(self) -> dict:
        return {**super().get_config(), **self._options()}


@_register
class LayerNormalization(_Options, keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` computed by :func:`normlib.layer_norm`.

    ``y = (x - mean) / sqrt(var + epsilon) * (scale_offset + gamma) + beta``
    with the moments over ``axis`` (Keras's normalized axes), float32
    statistics (integer inputs are cast to float32), returned in the layer's
    compute dtype. ``scale_offset`` (default 0; ``1.0`` is Gemma's
    zero-centred scale, with ``gamma`` starting at zeros) and
    ``memory_efficient`` are normlib's keyword arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get('rms_scaling', False):
            raise ValueError('rms_scaling=True is deprecated in Keras and not implemented here;'
                             ' use normlib.keras.RMSNormalization.')
        kwargs = self._take_options(kwargs)
        if self.scale_offset:
            kwargs.setdefault('gamma_initializer', 'zeros')
        super().__init__(*args, **kwargs)

    def call(self, inputs: Any) -> Any:
        y = layer_norm(_floating(inputs), _value(self.gamma), _value(self.beta),
                       axis=_axes(self.axis), epsilon=self.epsilon, **self._options())
        return keras.ops.cast(y, self.compute_dtype)


@_register
class GroupNormalization(keras.layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` computed by :func:`normlib.group_norm`.

    Each example's ``groups`` contiguous channel groups (channels on
    ``axis``; ``groups=-1`` for one channel per group) are normalized over
    the group's channels and every other non-batch axis.
    """

    def call(self, inputs: Any) -> Any:
        x = jnp.moveaxis(_floating(inputs), self.axis, -1)  # group_norm is channels-last
        channels = x.shape[-1]
        groups = channels if self.groups == -1 else self.groups
        y = group_norm(x, _value(self.gamma) if self.scale else None,
                       _value(self.beta) if self.center else None, num_groups=groups,
                       epsilon=self.epsilon)
        return keras.ops.cast(jnp.moveaxis(y, -1, self.axis), self.compute_dtype)


@_register
class UnitNormalization(keras.layers.UnitNormalization):
    """``keras.layers.UnitNormalization``: ``x / max(||x||_2, 1e-12)`` over ``axis``,
    computed by :func:`normlib.l2_normalize` (right for inputs whose squares overflow)."""

    def call(self, inputs: Any) -> Any:
        y = l2_normalize(_floating(inputs), axis=_axes(self.axis), epsilon=1e-12)
        return keras.ops.cast(y, self.compute_dtype)


if hasattr(keras.layers, 'RMSNormalization'):

    @_register
    class RMSNormalization(_Options, keras.layers.RMSNormalization):
        """``keras.layers.RMSNormalization`` computed by :func:`normlib.rms_norm`:
        ``y = x / sqrt(mean(x**2) + epsilon) * (scale_offset + scale)`` over
        ``axis``; ``scale_offset`` and ``memory_efficient`` as in
        :class:`LayerNormalization` (with an offset, ``scale`` starts at zeros)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **self._take_options(kwargs))

        def build(self, input_shape: Any) -> None:
            super().build(input_shape)
            if self.scale_offset:
                self.scale.assign(keras.ops.zeros(self.scale.shape, self.scale.dtype))

        def call(self, x: Any) -> Any:
            y = rms_norm(_floating(x), _value(self.scale), axis=_axes(self.axis),
                         epsilon=self.epsilon, **self._options())
            return keras.ops.cast(y, self.compute_dtype)


# Batch-norm folding (a deployment transform of whole models).

_FOLD_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _unfoldable(layer: Any, norm: keras.layers.BatchNormalization) -> str | None:
    """Why ``norm`` cannot fold into ``layer``, whose output is its input (None when it can)."""
    if not isinstance(layer, _FOLD_LAYERS):
        return (f'its input comes from a {type(layer).__name__}, not from a Dense or'
                ' Conv1D/2D/3D')
    if layer.activation is not keras.activations.linear:
        return (f'{layer.name!r} applies activation='
                f'{keras.activations.serialize(layer.activation)!r} before it')
    if getattr(layer, 'data_format', 'channels_last') != 'channels_last':
        return f'{layer.name!r} is channels_first'
    if getattr(layer, 'lora_enabled', False) or getattr(layer, 'quantization_mode', None):
        return f'{layer.name!r} has LoRA or quantized weights'
    ndim = norm.input_spec.ndim if norm.input_spec is not None else None
    if not (norm.axis == -1 or (ndim is not None and norm.axis == ndim - 1)):
        return (f'its axis={norm.axis}: only a BatchNormalization over the last axis (the'
                " layer's output features) folds")
    return None


def _sequential_pairs(model: keras.Sequential) -> tuple[dict[int, Any], dict[int, str]]:
    """``{id(layer): norm}`` of the folding pairs, and why each other norm is not folded."""
    pairs, reasons = {}, {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            reason = ('it is the first layer' if i == 0
                      else _unfoldable(model.layers[i - 1], layer))
            if reason is None:
                pairs[id(model.layers[i - 1])] = layer
            else:
                reasons[id(layer)] = reason
    return pairs, reasons


def _functional_pairs(model: keras.Model) -> tuple[dict[int, Any], dict[int, str]]:
    """As :func:`_sequential_pairs`, from the functional model's graph of calls."""
    # Keras has no public view of a functional model's calls: _nodes_by_depth is
    # the graph clone_model walks.
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth
             if node.operation is not None and not node.is_input]
    calls, consumers = {}, {id(x): 1 for x in model.outputs}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for x in node.input_tensors:
            consumers[id(x)] = consumers.get(id(x), 0) + 1
    pairs, reasons = {}, {}
    for node in nodes:
        norm = node.operation
        if not isinstance(norm, keras.layers.BatchNormalization):
            continue
        (x, *others) = node.input_tensors
        layer = x._keras_history.operation
        reason = _unfoldable(layer, norm)
        if reason is None and (calls[id(norm)] > 1 or calls[id(layer)] > 1 or others):
            reason = f'it or {layer.name!r} is called more than once in the model'
        if reason is None and consumers[id(x)] > 1:
            reason = f'the output of {layer.name!r} also goes elsewhere'
        if reason is None:
            pairs[id(layer)] = norm
        else:
            reasons[id(norm)] = reason
    return pairs, reasons


def _folded_weights(layer: Any, norm: keras.layers.BatchNormalization) -> tuple[Any, Any]:
    state = BatchNormState(_statistic(norm.moving_mean), _statistic(norm.moving_variance),
                           jnp.zeros((), jnp.int32))
    return fold_batch_norm(
        _value(layer.kernel), _value(layer.bias) if layer.use_bias else None, state,
        _value(norm.gamma) if norm.scale else None, _value(norm.beta) if norm.center else None,
        epsilon=norm.epsilon)


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """Folds inference-mode BatchNormalizations into the Dense or Conv layers before them.

    Recognized, among the layers of ``model`` (a ``keras.Sequential`` or a
    functional ``keras.Model``): a ``BatchNormalization`` (Keras's or
    :class:`normlib.keras.BatchNormalization`) over the last axis whose input
    is the output of a ``Dense`` or ``Conv1D``/``Conv2D``/``Conv3D``
    (``channels_last``, no activation, no LoRA or quantization), that output
    going to nothing else (in a Sequential: the layer just before it), each
    of the two called once in the model. The returned model has the same
    graph without those BatchNormalizations; each such layer has
    ``use_bias=True`` and weights from :func:`normlib.fold_batch_norm`
    (``kernel * f``, ``(bias - moving_mean) * f + beta`` with ``f = gamma /
    sqrt(moving_variance + epsilon)``), every other layer is a copy with
    the same weights, so the model computes what ``model`` computes in
    inference mode (``training=False``), to float32 rounding. Nested models
    are copied as they are (fold them with their own call).

    A BatchNormalization that is not folded (after an Activation layer or a
    layer with an activation, after a layer whose output also goes
    elsewhere, first in a Sequential, over another axis) is kept, with a
    warning naming it and the reason.

    Args:
      model: a built Sequential or functional Keras model; it is not modified.

    Returns:
      A new, uncompiled model of the same kind, with new layers and weights.

    Raises:
      TypeError: ``model`` is a subclassed model (it has no graph to rebuild).
      ValueError: ``model`` is not built.

    Example:
        >>> import os; os.environ.setdefault('KERAS_BACKEND', 'jax')
        'jax'
        >>> import keras, numpy as np, normlib.keras
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                           normlib.keras.BatchNormalization(), keras.layers.ReLU()])
        >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype('float32')
        >>> _ = model(x, training=True)  # a training step moves the moving statistics
        >>> folded = normlib.keras.fold_batch_norms(model)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['Dense', 'ReLU']
        >>> bool(np.allclose(folded(x), model(x, training=False), atol=1e-5))
        True
    """
    if not model.built:
        raise ValueError(f'fold_batch_norms needs a built model; {model.name!r} is not built'
                         ' (give it a keras.Input or call it on data first).')
    sequential = isinstance(model, keras.Sequential)
    if not sequential and not hasattr(model, '_nodes_by_depth'):
        raise TypeError(f'fold_batch_norms takes a Sequential or functional model; {model.name!r}'
                        f' is a subclassed {type(model).__name__}, which has no graph to rebuild.')
    pairs, reasons = (_sequential_pairs if sequential else _functional_pairs)(model)
    folded_norms = {id(norm) for norm in pairs.values()}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in folded_norms:
            reason = reasons.get(id(layer), 'it is not called in the model')
            warnings.warn(f'fold_batch_norms: the BatchNormalization {layer.name!r} is not'
                          f' folded: {reason}.', stacklevel=2)
    copies = []

    def clone(layer: Any) -> Any:
        if id(layer) in folded_norms:
            return layer  # never called: see call()
        config = layer.get_config()
        if id(layer) in pairs:
            config['use_bias'] = True
        copy = layer.__class__.from_config(config)
        if isinstance(layer, keras.layers.Layer):  # not a bare keras.ops operation
            copies.append((layer, copy))
        return copy

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        return args[0] if id(layer) in folded_norms else layer(*args, **kwargs)

    if sequential:
        (x,) = model.inputs
        new = keras.Sequential([keras.Input(batch_shape=x.shape, dtype=x.dtype)]
                               + [clone(layer) for layer in model.layers
                                  if id(layer) not in folded_norms], name=model.name)
    else:
        new = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer, copy in copies:
        if id(layer) in pairs:
            kernel, bias = _folded_weights(layer, pairs[id(layer)])
            copy.kernel.assign(kernel)
            copy.bias.assign(bias)
        else:
            copy.set_weights(layer.get_weights())
    return new
