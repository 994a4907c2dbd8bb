"""Batch normalization with explicit running statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normlib import _checks
from normlib import _moments


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer.

    Attributes:
      mean: running mean, float32, the feature shape.
      var: running (biased, unless ``unbiased_running_var``) variance.
      count: int32 scalar, the number of statistic updates so far.
    """
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_batch_norm(num_features: int | tuple[int, ...],
                    dtype: Any = jnp.float32) -> BatchNormState:
    """A fresh :class:`BatchNormState`: mean 0, var 1, count 0.

    Args:
      num_features: the feature shape (an int for a single feature axis).
      dtype: dtype of ``mean`` and ``var``; float32 or wider.
    """
    shape = (num_features,) if not isinstance(num_features, (tuple, list)) else tuple(num_features)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TypeError(f'num_features must be an int or a tuple of ints, got {num_features!r}.') from None
    if any(d < 1 for d in shape):
        raise ValueError(f'num_features must be positive, got {num_features!r}.')
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        raise TypeError(f'dtype must be float32 or wider, got {jnp.dtype(dtype)}.')
    return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32))


def _check_state(state, features):
    if not all(hasattr(state, f) for f in BatchNormState._fields):
        raise TypeError(f'state must be a BatchNormState (see init_batch_norm), got {type(state).__name__}.')
    _checks.shape('state.mean', state.mean, features, 'the features (x.shape at axis)')
    _checks.shape('state.var', state.var, features, 'the features (x.shape at axis)')
    _checks.shape('state.count', state.count, (), 'counts')


def _params(name, value, features, broadcast):
    if value is None:
        return None
    value = _checks.floating(name, value)
    _checks.shape(name, value, features, 'the features (x.shape at axis)')
    return value.reshape(broadcast)


def _update(state, count, mean, var, momentum, unbiased):
    """Folds one batch's moments (feature shape) into the running state."""
    seen = count > 0
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)

    def ema(old, new):
        new = new.astype(old.dtype)
        if momentum is None:
            new = old + (new - old) / (state.count.astype(old.dtype) + 1)
        else:
            new = momentum * old + (1.0 - momentum) * new
        return jnp.where(seen, new, old)

    new_count = state.count + jnp.any(seen).astype(state.count.dtype)
    return BatchNormState(ema(state.mean, mean), ema(state.var, var), new_count)


def batch_norm(x, state: BatchNormState, scale=None, bias=None, *, training: bool,
               axis=-1, momentum: float | None = 0.99, epsilon: float = 1e-5,
               axis_name=None, axis_index_groups=None, mask=None,
               unbiased_running_var: bool = False):
    r"""Batch normalization (Ioffe & Szegedy, 2015) with explicit state.

    In training mode, with the moments taken over every axis of ``x`` except
    ``axis`` (and over ``axis_name``), counting only entries where ``mask``
    is True:

    .. math::
      y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \cdot scale + bias,
      \qquad \sigma_B^2 = \frac{1}{n} \sum (x - \mu_B)^2 \text{ (biased)}

    and the running statistics become
    ``mean <- momentum * mean + (1 - momentum) * mu_B`` (Flax/Keras
    convention; ``momentum=None`` gives the exact average over all batches,
    ``mean + (mu_B - mean) / (count + 1)``), likewise for ``var`` with
    ``sigma_B^2``, or ``sigma_B^2 * n / (n - 1)`` if ``unbiased_running_var``
    (PyTorch's convention). ``count`` grows by one. Features with no valid
    entry keep their running statistics bit-for-bit. In evaluation mode, ``y``
    uses the running statistics and the state is returned unchanged.

    Moments are float32 (or wider) for any input dtype, stable for data whose
    mean is far larger than its spread, and exact across devices: with
    ``axis_name`` every shard's ``(count, mean, var)`` is merged with one
    collective (Chan et al.), so uneven or empty shards give the moments of
    the concatenated valid data. No gradient reaches the running statistics.

    Args:
      x: floating-point input.
      state: the running statistics, a :class:`BatchNormState`.
      scale: optional multiplier of the feature shape (``x.shape`` at ``axis``).
      bias: optional offset of the feature shape.
      training: True to normalize with this batch's moments and update the
        state; False to normalize with the state.
      axis: the feature axis or axes, kept; every other axis is reduced.
      momentum: running-average decay in [0, 1], or None.
      epsilon: added to the variance inside the square root; > 0.
      axis_name: a mapped axis name, or a tuple of them, to reduce over too
        (``pmap``, ``vmap``, ``shard_map``).
      axis_index_groups: ``pmap`` device groups normalized separately.
      mask: boolean, broadcastable to ``x``; False entries are left out of the
        moments (their outputs are still normalized).
      unbiased_running_var: keep the running variance unbiased.

    Returns:
      ``(y, new_state)``; ``y`` has ``x``'s dtype and shape.

    References:
      Ioffe & Szegedy, `Batch Normalization: Accelerating Deep Network
      Training by Reducing Internal Covariate Shift
      <https://arxiv.org/abs/1502.03167>`_, 2015.
    """
    x = _checks.floating('x', x)
    feature_axes = _checks.axes('axis', axis, x.ndim)
    features = _checks.features_of(x.shape, feature_axes)
    broadcast = tuple(d if i in feature_axes else 1 for i, d in enumerate(x.shape))
    _check_state(state, features)
    scale = _params('scale', scale, features, broadcast)
    bias = _params('bias', bias, features, broadcast)
    epsilon = _checks.positive('epsilon', epsilon)
    momentum = _checks.momentum(momentum)
    if not isinstance(training, bool):
        raise TypeError(f'training must be a Python bool, got {training!r}.')
    if mask is not None:
        mask = _checks.mask(mask, x.shape)
    names, groups = _checks.axis_name(axis_name, axis_index_groups)

    if not training:
        mean, var = (jax.lax.stop_gradient(s).reshape(broadcast) for s in (state.mean, state.var))
        return _moments.normalize(x, mean, var, scale, bias, epsilon=epsilon), state

    reduced = tuple(i for i in range(x.ndim) if i not in feature_axes)
    spec = _moments.Spec(reduced, epsilon, True, names, groups)
    y, count, mean, var = _moments.standardize(spec, x, scale, bias, mask)
    count, mean, var = (jnp.broadcast_to(jax.lax.stop_gradient(s), broadcast).reshape(features)
                        for s in (count, mean, var))
    return y, _update(jax.lax.stop_gradient(state), count, mean, var, momentum, unbiased_running_var)
