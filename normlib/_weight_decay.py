"""Which parameters weight decay should leave alone: normalization scales and biases."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any

import jax

_NORM_TYPES = ('BatchNorm', 'LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm')
# Linen names unnamed submodules ``<ClassName>_<index>``.
_LINEN_NAME = re.compile(rf'(?:{"|".join(_NORM_TYPES)})(?:_\d+)?')
_AFFINE = ('scale', 'bias')


def _key(entry) -> Any:
    for field in ('key', 'name', 'idx'):
        if hasattr(entry, field):
            return getattr(entry, field)
    return entry


def _mask(tree, is_norm_module, is_centred):
    def decays(path, _):
        keys = tuple(_key(e) for e in path)
        if not (keys and keys[-1] in _AFFINE and is_norm_module(keys[:-1])):
            return True
        return keys[-1] == 'scale' and is_centred(keys[:-1])
    return jax.tree_util.tree_map_with_path(decays, tree)


def _nnx_norm_types(nnx):
    from normlib import nnx as normlib_nnx
    return tuple(getattr(m, t) for m in (nnx, normlib_nnx) for t in _NORM_TYPES)


def weight_decay_mask(params: Any, *, norm_names: Iterable[str] = (),
                      centred: bool | Iterable[str] = ()) -> Any:
    """A pytree of bools for optax's ``mask=``: False on normalization scales
    and biases, True on every other parameter, and True on zero-centred
    scales.

    Decaying a normalization layer's ``scale`` pulls it towards 0 and its
    ``bias`` towards 0 for no regularizing benefit, so the usual practice is
    to exempt them, e.g. ``optax.adamw(1e-3, mask=weight_decay_mask(params))``
    or ``optax.add_decayed_weights(1e-4, mask=...)``.

    Normalization layers are recognized

    * in a Flax Linen parameter dict (or whole variables dict), by their
      automatic names ``BatchNorm_0``, ``LayerNorm_1``, ``RMSNorm_0``,
      ``GroupNorm_0``, ``InstanceNorm_0`` (normlib's modules and Flax's alike);
    * in a Flax NNX module, by type: normlib's and ``flax.nnx``'s
      ``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
      ``InstanceNorm``. The mask has the structure of
      ``nnx.state(module, nnx.Param)``, which ``nnx.Optimizer(module, tx,
      wrt=nnx.Param)`` optimizes. (An ``nnx.State`` alone does not say which
      module types it came from: pass the module, or
      ``nnx.merge(graphdef, state)``.)
    * in either, by the module names in ``norm_names`` (for layers given
      explicit names, e.g. ``nn.LayerNorm(name='ln_f')``).

    A zero-centred scale (a layer with ``scale_offset``, Gemma's ``1 +
    scale``) is decayed: decay pulls it toward 0, the layer toward the
    identity, which is why the form exists. NNX modules say so themselves
    (their ``scale_offset``); a Linen parameter dict does not carry it, so
    name those layers in ``centred`` (or pass ``centred=True`` for every
    normalization layer).

    Args:
      params: a Linen parameter (or variables) pytree, or an ``nnx.Module``.
      norm_names: further module names to treat as normalization layers.
      centred: names of normalization layers whose scale is zero-centred
        (decayed), or True for all of them; NNX modules with a nonzero
        ``scale_offset`` count without being named.

    Returns:
      Booleans with the structure of ``params`` (Linen) or of
      ``nnx.state(params, nnx.Param)`` (NNX).

    Example:
        >>> import jax, jax.numpy as jnp, optax, normlib
        >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)},
        ...           'BatchNorm_0': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)}}
        >>> normlib.weight_decay_mask(params)
        {'BatchNorm_0': {'bias': False, 'scale': False}, 'Dense_0': {'bias': True, 'kernel': True}}
        >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=normlib.weight_decay_mask(params))
    """
    norm_names = frozenset(norm_names)
    every = centred is True
    named = frozenset(() if isinstance(centred, bool) else centred)
    by_name = lambda path: every or bool(path) and path[-1] in named
    nnx = sys.modules.get('flax.nnx')
    if nnx is not None and isinstance(params, nnx.Module):
        types = _nnx_norm_types(nnx)
        modules = dict(nnx.iter_modules(params))
        by_type = {path for path, module in modules.items() if isinstance(module, types)}
        offset = {path for path, module in modules.items()
                  if getattr(module, 'scale_offset', 0.0)}
        return _mask(nnx.as_pure(nnx.state(params, nnx.Param)),
                     lambda path: path in by_type or (path and path[-1] in norm_names),
                     lambda path: path in offset or by_name(path))
    return _mask(params, lambda path: bool(path) and (
        path[-1] in norm_names or (isinstance(path[-1], str) and _LINEN_NAME.fullmatch(path[-1]))),
        by_name)
