"""Precise batch-norm statistics for Flax models (Linen and NNX).

:func:`precise_linen` and :func:`precise_nnx` run a model over many batches,
record the inputs of every BatchNorm (normlib's and Flax's), and replace its
running statistics with their exact moments, merged batch by batch as in
:func:`normlib.precise_batch_stats`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax import traverse_util
from flax.core import frozen_dict

from normlib import linen as normlib_linen
from normlib import nnx as normlib_nnx
from normlib import precise

_LINEN_BATCH_NORMS = (normlib_linen.BatchNorm, nn.BatchNorm)
_NNX_BATCH_NORMS = (normlib_nnx.BatchNorm, nnx.BatchNorm)
_COLLECTION = 'precise_batch_stats'


def _check_training(module, name, args, kwargs):
    """Raises unless the BatchNorm call ``(x, *args, **kwargs)`` uses batch statistics."""
    flag = args[0] if args else kwargs.get('use_running_average')
    if flag is None:
        flag = module.use_running_average
    if flag:
        raise ValueError(
            f'{name} normalizes with its running averages, but precise statistics need the'
            ' model in training mode: pass its training flag (e.g. train=True), or'
            ' use_running_average=False.')


def precise_linen(model: nn.Module, variables, batches: Iterable[Any], *,
                  method: Callable[..., Any] | str | None = None,
                  progress: bool | None = None, **apply_kwargs):
    """Recomputes every BatchNorm's statistics of a Linen model exactly.

    Runs ``model.apply(variables, batch, method=method, **apply_kwargs)`` on
    each batch and replaces ``batch_stats/.../mean`` and ``var`` of every
    :class:`normlib.linen.BatchNorm` and ``flax.linen.BatchNorm`` called with
    the exact moments of that layer's inputs over all batches (see
    :func:`precise_batch_stats`); ``count``, where the layer keeps one
    (``momentum=None``), becomes the number of batches. The variance is
    biased unless the layer has ``unbiased_running_var``. Layers never
    called, and features without a valid entry, keep their statistics.

    The model runs in training mode, as for PyTorch's
    ``torch.optim.swa_utils.update_bn`` and Wu & Johnson's PreciseBN:
    ``apply_kwargs`` must make every BatchNorm use batch statistics (e.g.
    ``train=True``), so each layer's inputs are those it sees in training,
    after the earlier layers normalized with the batch's own moments (a
    ValueError says which layer is in evaluation mode otherwise). The
    per-batch work runs under ``jax.jit`` and ``variables`` is not modified.
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
        if context.method_name == '__call__' and isinstance(module, _LINEN_BATCH_NORMS):
            path = module.scope.path
            x, rest = (args[0], args[1:]) if args else (kwargs['x'], ())
            _check_training(module, f"The BatchNorm at '{'/'.join(path)}'", rest, kwargs)
            module.sow(_COLLECTION, 'moments', precise.feature_moments(x, module.axis,
                                                                kwargs.get('mask')))
            unbiased[path] = getattr(module, 'unbiased_running_var', False)
        return next_fun(*args, **kwargs)

    def batch_moments(batch, variables):
        with nn.intercept_methods(record):
            _, state = model.apply(variables, batch, method=method,
                                   mutable=['batch_stats', _COLLECTION], **apply_kwargs)
        sown = traverse_util.flatten_dict(frozen_dict.unfreeze(state.get(_COLLECTION, {})))
        return {path[:-1]: precise.stacked(rows) for path, rows in sown.items()}

    totals = precise.merge_batches(jax.jit(batch_moments), batches, progress, variables)
    stats = traverse_util.flatten_dict(frozen_dict.unfreeze(variables['batch_stats']))
    for path, total in totals.items():
        stats[path + ('mean',)], stats[path + ('var',)] = precise.finish(
            total, stats[path + ('mean',)], stats[path + ('var',)], unbiased[path])
        if path + ('count',) in stats:
            stats[path + ('count',)] = total.batches.astype(stats[path + ('count',)].dtype)
    return frozen_dict.copy(variables, {'batch_stats': traverse_util.unflatten_dict(stats)})


class _Sown(nnx.Intermediate):
    """BatchNorm input moments recorded by :func:`precise_nnx`."""


@functools.cache
def _recording(cls):
    """A subclass of the BatchNorm ``cls`` that sows its input's moments."""

    class Recording(cls):
        def __call__(self, x, *args, mask=None, **kwargs):
            _check_training(self, f'A {cls.__name__} called with use_running_average=True',
                            args, kwargs)
            self.sow(_Sown, 'moments', precise.feature_moments(x, self.axis, mask))
            return super().__call__(x, *args, mask=mask, **kwargs)

    Recording.__name__ = Recording.__qualname__ = f'Recording{cls.__name__}'
    return Recording


def _batch_norms(model):
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
    layer keeps one (``momentum=None``), becomes the number of batches. The
    variance is biased unless the layer has ``unbiased_running_var``. Layers
    never called, and features without a valid entry, keep their statistics.

    The model runs in training mode on a view (``nnx.view`` with
    ``use_running_average=False`` and ``deterministic=False``, what
    ``.train()`` sets), as for PyTorch's ``torch.optim.swa_utils.update_bn``
    and Wu & Johnson's PreciseBN: each layer's inputs are those it sees in
    training, after the earlier layers normalized with the batch's own
    moments. The model's own modes are left as they were, and its other
    ``nnx.BatchStat`` variables are restored; random streams (dropout)
    advance. The per-batch work runs under ``nnx.jit``.

    Args:
      model: the NNX module, updated in place.
      batches: an iterable of batches (read once).
      call: runs the model on one batch, e.g.
        ``lambda model, batch: model(batch['image'])``.
      progress: show a tqdm bar: True always, False never, None on a
        terminal when ``batches`` has no ``len`` or at least 100 batches.

    References:
      Wu & Johnson, `Rethinking "Batch" in BatchNorm
      <https://arxiv.org/abs/2105.07576>`_, 2021.
      Izmailov et al., `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018.

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
    # NNX has no method interceptors; the view's BatchNorms are copies of the
    # model's, so only they become recording ones.
    for layer in _batch_norms(view).values():
        layer.__class__ = _recording(type(layer))

    @nnx.jit
    def batch_moments(batch, view):
        _, sown = nnx.capture(call, _Sown)(view, batch)
        return {'/'.join(map(str, path[:-1])): precise.stacked(rows.get_value())
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
            layer.count[...] = totals[key].batches.astype(layer.count.dtype)
