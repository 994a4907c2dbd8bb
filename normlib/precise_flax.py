"""Precise batch-norm statistics for Flax models (Linen and NNX).

:func:`precise_linen` and :func:`precise_nnx` run a model over many batches,
record the inputs of every BatchNorm (normlib's and Flax's), and replace its
running statistics with their exact moments, merged batch by batch as in
:func:`normlib.precise_batch_stats`.

Each call's moments are recorded where the layer keeps its running
statistics (in ``batch_stats`` for Linen, as an ``nnx.BatchStat`` for NNX)
and shaped as they are, so lifted transforms (``nn.scan``, ``nn.vmap``,
``nnx.scan``, ``nnx.vmap``) stack them along the same axes: every layer of a
scanned stack and every member of an ensemble gets the moments of its own
inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util
from flax.core import frozen_dict

from normlib import _precise as precise
from normlib import linen as normlib_linen
from normlib import nnx as normlib_nnx
from normlib._moments import Moments

_LINEN_BATCH_NORMS = (normlib_linen.BatchNorm, nn.BatchNorm)
_NNX_BATCH_NORMS = (normlib_nnx.BatchNorm, nnx.BatchNorm)
_RECORD = 'precise_moments'  # the Linen variable, in batch_stats, of the recorded calls


def _call_moments(x: jax.Array, axis: int | tuple[int, ...],
                  mask: jax.Array | None) -> Moments:
    """One call's moments, shaped as the layer's running statistics."""
    return jax.tree.map(lambda m: m[0], precise.feature_moments(x, axis, mask))


def _calls(rows: Sequence[Moments]) -> Moments:
    """A layer's recorded calls, one row each."""
    return precise.stacked([jax.tree.map(lambda m: m[None], row) for row in rows])


def _count(total: precise.Total, count: jax.Array) -> jax.Array:
    """The new ``count`` (one per feature, as the running statistics): the
    number of batches with a valid entry where the feature had one, else the
    old count."""
    seen = total.moments.count.reshape(count.shape) > 0
    return jnp.where(seen, total.batches, count).astype(count.dtype)


def _check_training(path: str, updated: bool) -> None:
    """Raises unless the BatchNorm at ``path`` updated its running statistics,
    which it does when it normalizes with the batch's."""
    if not updated:
        raise ValueError(
            f"The BatchNorm at '{path}' normalized with its running averages, but precise"
            ' statistics need the model in training mode: pass its training flag (e.g.'
            ' train=True), or use_running_average=False.')


def precise_linen(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any], *,
                  method: Callable[..., Any] | str | None = None,
                  progress: bool | None = None, **apply_kwargs: Any) -> Mapping[str, Any]:
    """Recomputes every BatchNorm's statistics of a Linen model exactly.

    Runs ``model.apply(variables, batch, method=method, **apply_kwargs)`` on
    each batch and replaces ``batch_stats/.../mean`` and ``var`` of every
    :class:`normlib.linen.BatchNorm` and ``flax.linen.BatchNorm`` called with
    the exact moments of that layer's inputs over all batches (see
    :func:`precise_batch_stats`); ``count``, where the layer keeps one
    (``momentum=None``), becomes the number of batches with a valid entry,
    at every feature that had one. The variance is biased unless the layer
    has ``unbiased_running_var``. Layers never called, and features without
    a valid entry, keep their statistics.

    BatchNorms inside lifted transforms, e.g. ``nn.scan`` over layers or
    ``nn.vmap`` ensembles with ``batch_stats`` in ``variable_axes``, have
    stacked statistics; each stacked layer or member gets the moments of its
    own inputs, written at its index (its ``count`` too). The moments are
    recorded in ``batch_stats``, so the transforms must map that collection
    (as training with batch statistics needs anyway).

    The model runs in training mode, as for PyTorch's
    ``torch.optim.swa_utils.update_bn`` and Wu & Johnson's PreciseBN:
    ``apply_kwargs`` must make every BatchNorm use batch statistics (e.g.
    ``train=True``), so each layer's inputs are those it sees in training,
    after the earlier layers normalized with the batch's own moments. A
    layer that normalizes with its running averages leaves them unchanged,
    and a ValueError names it. The per-batch work runs under ``jax.jit`` and
    ``variables`` is not modified.
    BatchNorms with an ``axis_name`` need it bound, so only models without
    one (or ``method``\\ s that bind it) work here.

    Args:
      model: the Linen module.
      variables: its variables, with ``batch_stats``.
      batches: an iterable of batches, each passed to ``model.apply`` as its
        one positional input (read once).
      method: as in ``model.apply``; a function ``(module, batch)`` can
        unpack a batch, e.g. ``lambda m, b: m(b['image'], train=True)``.
      progress: show a tqdm bar: True always, False never, None on a
        terminal when ``batches`` has no ``len`` or at least 100 batches.
      **apply_kwargs: more keyword arguments of ``model.apply``: the
        model's own (``train=True``) or ``rngs`` (e.g. for dropout).

    Returns:
      ``variables`` with the new ``batch_stats``.

    References:
      Wu & Johnson, `Rethinking "Batch" in BatchNorm
      <https://arxiv.org/abs/2105.07576>`_, 2021.
      Izmailov et al., `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import normlib, normlib.linen as nn
        >>> model = nn.BatchNorm(use_running_average=False)
        >>> batches = [jax.random.normal(jax.random.key(i), (8, 2)) + 3 for i in range(5)]
        >>> variables = model.init(jax.random.key(0), batches[0])
        >>> new = normlib.precise_linen(model, variables, batches, progress=False)
        >>> bool(jnp.allclose(new['batch_stats']['mean'], jnp.concatenate(batches).mean(0)))
        True
    """
    unbiased = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != '__call__' or not isinstance(module, _LINEN_BATCH_NORMS):
            return next_fun(*args, **kwargs)
        before = module.get_variable('batch_stats', 'mean')
        y = next_fun(*args, **kwargs)
        path = module.scope.path
        _check_training('/'.join(path), module.get_variable('batch_stats', 'mean') is not before)
        x = args[0] if args else kwargs['x']
        module.sow('batch_stats', _RECORD, _call_moments(x, module.axis, kwargs.get('mask')))
        unbiased[path] = getattr(module, 'unbiased_running_var', False)
        return y

    def batch_moments(batch, variables):
        with nn.intercept_methods(record):
            _, state = model.apply(variables, batch, method=method, mutable='batch_stats',
                                   **apply_kwargs)
        stats = traverse_util.flatten_dict(frozen_dict.unfreeze(state.get('batch_stats', {})))
        return {path[:-1]: _calls(rows) for path, rows in stats.items() if path[-1] == _RECORD}

    totals = precise.merge_batches(jax.jit(batch_moments), batches, progress, variables)
    stats = traverse_util.flatten_dict(frozen_dict.unfreeze(variables['batch_stats']))
    for path, total in totals.items():
        stats[path + ('mean',)], stats[path + ('var',)] = precise.finish(
            total, stats[path + ('mean',)], stats[path + ('var',)], unbiased[path])
        if path + ('count',) in stats:
            stats[path + ('count',)] = _count(total, stats[path + ('count',)])
    return frozen_dict.copy(variables, {'batch_stats': traverse_util.unflatten_dict(stats)})


class _Sown(nnx.BatchStat):
    """BatchNorm input moments recorded by :func:`precise_nnx`: a BatchStat, so
    that transforms map them as they map the layer's running statistics."""


class _Recording(nnx.Module):
    """Calls a BatchNorm and sows its input's moments."""

    def __init__(self, layer: nnx.Module, path: str) -> None:
        self.layer = layer
        self.path = path

    def __call__(self, x: jax.Array, *args: Any, mask: jax.Array | None = None,
                 **kwargs: Any) -> jax.Array:
        before = self.layer.mean.get_value()
        y = self.layer(x, *args, mask=mask, **kwargs)
        _check_training(self.path, self.layer.mean.get_value() is not before)
        self.sow(_Sown, 'moments', _call_moments(x, self.layer.axis, mask))
        return y


def _recording(path: Sequence[Any], node: Any) -> Any:
    """``node``, behind a :class:`_Recording` if it is a BatchNorm."""
    return (_Recording(node, '/'.join(map(str, path)))
            if isinstance(node, _NNX_BATCH_NORMS) else node)


def _batch_norms(model: nnx.Module) -> dict[str, nnx.Module]:
    return {'/'.join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, _NNX_BATCH_NORMS)}


def precise_nnx(model: nnx.Module, batches: Iterable[Any], *,
                call: Callable[[nnx.Module, Any], Any] | None = None,
                progress: bool | None = None) -> None:
    """Recomputes every BatchNorm's statistics of an NNX model exactly, in place.

    Calls ``call(model, batch)`` (default ``model(batch)``) on each batch and
    sets ``mean`` and ``var`` of every :class:`normlib.nnx.BatchNorm` and
    ``flax.nnx.BatchNorm`` called to the exact moments of that layer's inputs
    over all batches (see :func:`precise_batch_stats`); ``count``, where the
    layer keeps one (``momentum=None``), becomes the number of batches with
    a valid entry, at every feature that had one. The variance is biased
    unless the layer has ``unbiased_running_var``. Layers never called, and
    features without a valid entry, keep their statistics.

    BatchNorms with stacked statistics, e.g. created with ``nnx.vmap`` and
    called in ``nnx.scan`` over layers or ``nnx.vmap`` over ensemble
    members, get the moments of each layer's or member's own inputs, written
    at its index (its ``count`` too). The moments are recorded as an
    ``nnx.BatchStat``, so the transforms must map BatchStats (as training
    with batch statistics needs anyway).

    The model runs in training mode on a view (``nnx.view`` with
    ``use_running_average=False`` and ``deterministic=False``, what
    ``.train()`` sets), as for PyTorch's ``torch.optim.swa_utils.update_bn``
    and Wu & Johnson's PreciseBN: each layer's inputs are those it sees in
    training, after the earlier layers normalized with the batch's own
    moments; a layer called with ``use_running_average=True`` leaves its
    running averages unchanged, and a ValueError names it. The view's
    BatchNorms are called through recording modules in a copy of it, so the
    model's modules, modes and classes are left as they were; its other
    ``nnx.BatchStat`` variables are restored, and random streams (dropout)
    advance. The per-batch work runs under ``nnx.jit``.

    Args:
      model: the NNX module, updated in place.
      batches: an iterable of batches (read once).
      call: runs the model on one batch, e.g.
        ``lambda model, batch: model(batch['image'])``.
      progress: show a tqdm bar: True always, False never, None on a
        terminal when ``batches`` has no ``len`` or at least 100 batches.

    References:
      Those of :func:`precise_linen`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import normlib, normlib.nnx
        >>> model = normlib.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
        >>> batches = [jax.random.normal(jax.random.key(i), (8, 2)) + 3 for i in range(5)]
        >>> normlib.precise_nnx(model, batches, progress=False)
        >>> bool(jnp.allclose(model.mean[...], jnp.concatenate(batches).mean(0)))
        True
    """
    call = (lambda model, batch: model(batch)) if call is None else call
    view = nnx.view(model, use_running_average=False, deterministic=False,
                    raise_if_not_found=False)
    # NNX has no method interceptors: a copy of the view, sharing its
    # Variables, calls every BatchNorm through a recording module instead.
    view = nnx.recursive_map(_recording, view)

    @nnx.jit
    def batch_moments(batch, view):
        _, sown = nnx.capture(call, _Sown)(view, batch)
        return {'/'.join(map(str, path[:-1])): _calls(rows.get_value())
                for path, rows in nnx.to_flat_state(sown)}

    # A snapshot: nnx.state shares the model's Variables.
    saved = jax.tree.map(lambda v: v, nnx.state(model, nnx.BatchStat))
    try:
        totals = precise.merge_batches(batch_moments, batches, progress, view)
    finally:
        nnx.update(model, saved)
    for key, layer in _batch_norms(model).items():
        if key not in totals:
            continue
        layer.mean[...], layer.var[...] = precise.finish(
            totals[key], layer.mean[...], layer.var[...],
            getattr(layer, 'unbiased_running_var', False))
        if hasattr(layer, 'count'):
            layer.count[...] = _count(totals[key], layer.count[...])
