"""Moving batch, layer and RMS norm layers between PyTorch and normlib.

PyTorch's ``BatchNorm{1,2,3}d`` keeps ``weight``, ``bias``, ``running_mean``,
``running_var`` (unbiased, ``n / (n - 1)``) and ``num_batches_tracked``, and
updates ``running = (1 - momentum) * running + momentum * batch`` with
``momentum=0.1`` the weight of the *new* batch. normlib's ``momentum`` is the
weight of the *old* value (Flax/Keras), so

* ``normlib momentum = 1 - torch momentum`` (0.9 for torch's default 0.1),
* ``momentum=None`` means the same in both (the cumulative average),
* ``unbiased_running_var=True`` keeps the running variance as torch does.

Evaluation mode uses the running statistics as stored in both libraries, so
a converted layer gives torch's evaluation outputs. Only NumPy is needed:
``to_torch`` returns NumPy arrays, ready for
``{k: torch.from_numpy(v) for k, v in ...}``.

Layer and RMS norm (``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``) keep
``weight`` (and ``bias``); a normlib layer with ``scale_offset`` multiplies by
``scale_offset + scale``, which :func:`layer_norm_from_torch` and
:func:`layer_norm_to_torch` translate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normlib import _checks
from normlib._batch_norm import BatchNormState


def momentum_from_torch(momentum: float | None) -> float | None:
    """normlib's momentum for a torch BatchNorm ``momentum`` (``1 - momentum``)."""
    return None if momentum is None else 1.0 - momentum


def _numpy(value) -> np.ndarray:
    # A copy: torch updates its buffers in place, and JAX may alias NumPy memory.
    if hasattr(value, 'detach'):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.array(value, copy=True)


def from_torch(state_dict: Mapping[str, Any], prefix: str = ''
               ) -> tuple[BatchNormState, jax.Array | None, jax.Array | None]:
    """``(state, scale, bias)`` from a torch BatchNorm ``state_dict``.

    Args:
      state_dict: a module's ``state_dict()`` (tensors or arrays); keys
        ``prefix + 'running_mean'`` etc. ``weight``/``bias`` may be absent
        (``affine=False``), giving None.
      prefix: the layer's key prefix in a model's state dict, e.g.
        ``'layer1.0.bn1.'``.

    Returns:
      A float32 :class:`BatchNormState` (``count`` from
      ``num_batches_tracked``, 0 if absent) and the scale and bias.

    Example:
        >>> import numpy as np, normlib
        >>> from normlib import torch_interop
        >>> torch_state = {'running_mean': np.array([1.0, 2.0]),
        ...                'running_var': np.array([4.0, 9.0]),
        ...                'num_batches_tracked': np.array(12), 'weight': np.ones(2),
        ...                'bias': np.zeros(2)}
        >>> state, scale, bias = torch_interop.from_torch(torch_state)
        >>> state.mean.tolist(), int(state.count), torch_interop.momentum_from_torch(0.1)
        ([1.0, 2.0], 12, 0.9)
        >>> sorted(torch_interop.to_torch(state, scale, bias, prefix='bn1.'))
        ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var', 'bn1.weight']
    """
    def get(name):
        key = prefix + name
        return None if key not in state_dict else _numpy(state_dict[key])

    mean, var = get('running_mean'), get('running_var')
    if mean is None or var is None:
        raise ValueError(
            f'state_dict has no {prefix}running_mean/{prefix}running_var; got keys'
            f' {sorted(state_dict)[:8]}...')
    count = get('num_batches_tracked')
    state = BatchNormState(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32),
                           jnp.asarray(0 if count is None else count, jnp.int32))
    scale, bias = (None if v is None else jnp.asarray(v, jnp.float32)
                   for v in (get('weight'), get('bias')))
    return state, scale, bias


def to_torch(state: BatchNormState, scale: jax.Array | None = None,
             bias: jax.Array | None = None, prefix: str = '') -> dict[str, np.ndarray]:
    """A torch BatchNorm ``state_dict`` (NumPy values) from normlib's state.

    The running variance is copied as is: keep it unbiased during training
    (``unbiased_running_var=True``) for torch's convention.
    """
    out = {'running_mean': np.array(state.mean, np.float32),
           'running_var': np.array(state.var, np.float32),
           'num_batches_tracked': np.array(state.count, np.int64)}
    if scale is not None:
        out['weight'] = np.array(scale, np.float32)
    if bias is not None:
        out['bias'] = np.array(bias, np.float32)
    return {prefix + k: v for k, v in out.items()}


def layer_norm_from_torch(state_dict: Mapping[str, Any], prefix: str = '', *,
                          scale_offset: float = 0.0
                          ) -> tuple[jax.Array | None, jax.Array | None]:
    """``(scale, bias)`` for :func:`normlib.layer_norm` or :func:`normlib.rms_norm`
    from a ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` ``state_dict``.

    torch multiplies by ``weight``; normlib by ``scale_offset + scale``, so
    ``scale = weight - scale_offset`` (float32): with ``scale_offset=1.0``
    (Gemma's zero-centred form) a torch ``weight`` of ones becomes a
    ``scale`` of zeros. Absent keys (``elementwise_affine=False``,
    ``bias=False``, or an RMSNorm's bias) give None.

    Args:
      state_dict: a module's ``state_dict()`` (tensors or arrays).
      prefix: the layer's key prefix in a model's state dict.
      scale_offset: the offset the normlib layer adds to ``scale``.

    Returns:
      ``(scale, bias)``, float32 or None.

    Example:
        >>> import numpy as np
        >>> from normlib import torch_interop
        >>> scale, bias = torch_interop.layer_norm_from_torch(
        ...     {'weight': np.array([1.0, 1.5])}, scale_offset=1.0)
        >>> scale.tolist(), bias
        ([0.0, 0.5], None)
    """
    offset = _checks.finite('scale_offset', scale_offset)
    weight, bias = (None if prefix + k not in state_dict else
                    jnp.asarray(_numpy(state_dict[prefix + k]), jnp.float32)
                    for k in ('weight', 'bias'))
    return (None if weight is None else weight - offset), bias


def layer_norm_to_torch(scale: jax.Array | None, bias: jax.Array | None = None,
                        prefix: str = '', *, scale_offset: float = 0.0
                        ) -> dict[str, np.ndarray]:
    """A torch ``LayerNorm``/``RMSNorm`` ``state_dict`` (NumPy float32) from
    normlib's ``scale`` and ``bias``: ``weight = scale_offset + scale``, the
    sum taken in float32 (the inverse of :func:`layer_norm_from_torch`)."""
    offset = _checks.finite('scale_offset', scale_offset)
    out = {}
    if scale is not None:
        out['weight'] = np.asarray(jnp.asarray(scale, jnp.float32) + offset, np.float32)
    if bias is not None:
        out['bias'] = np.array(bias, np.float32)
    return {prefix + k: v for k, v in out.items()}

