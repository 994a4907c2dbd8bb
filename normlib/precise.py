"""Precise batch-norm statistics: exact population moments over many batches.

The running averages of batch norm are an exponential moving average of
batch moments taken while the weights changed, so they lag the final
weights, and they are wrong outright after the weights are averaged (SWA,
an EMA of the weights). Precise statistics replace them with the exact mean
and variance of the layer's inputs over a set of batches, with the weights
fixed: every batch's ``(count, mean, var)`` is merged with Chan et al.'s
formula (:func:`normlib._moments.combine`), so the result is the moments of
all the batches' valid entries together, whatever the batch sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax import traverse_util
from flax.core import frozen_dict

from normlib import _checks
from normlib import _moments
from normlib import linen as normlib_linen
from normlib import nnx as normlib_nnx
from normlib.batch_norm import BatchNormState

_LINEN_BATCH_NORMS = (normlib_linen.BatchNorm, nn.BatchNorm)
_NNX_BATCH_NORMS = (normlib_nnx.BatchNorm, nnx.BatchNorm)
_COLLECTION = 'precise_batch_stats'
_MANY = 100  # the number of batches from which progress=None shows a bar


class _Calls(NamedTuple):
    """One batch's moments at one layer, one row per call, feature shape.

    The mean is kept split as ``shift + delta`` (see ``_moments.combine``):
    rounding ``shift + delta`` of offset data would cost the merged variance
    about ``|mean| * eps / std`` of its relative precision.
    """
    count: jax.Array
    shift: jax.Array
    delta: jax.Array
    var: jax.Array


class _Total(NamedTuple):
    """The shifted moments of every batch so far."""
    count: jax.Array
    shift: jax.Array
    delta: jax.Array
    var: jax.Array
    batches: jax.Array  # int32: the batches with at least one valid entry


def _feature_moments(x, axis, mask) -> _Calls:
    """One row of float32 moments over every axis of ``x`` but ``axis``."""
    x = _checks.floating('x', x)
    x = x.astype(_moments.compute_dtype(x.dtype))
    kept = _checks.axes('axis', axis, x.ndim)
    reduced = tuple(i for i in range(x.ndim) if i not in kept)
    mask = None if mask is None else _checks.mask(mask, x.shape)
    moments = _moments._shifted_moments(x, reduced, mask, center=True)
    kept_dims = tuple(d if i in kept else 1 for i, d in enumerate(x.shape))
    features = _checks.features_of(x.shape, kept)
    return _Calls(*(jnp.broadcast_to(m, kept_dims).reshape((1,) + features) for m in moments))


def _stacked(rows) -> _Calls:
    return _Calls(*(jnp.concatenate(column) for column in zip(*rows)))


def _empty(calls: _Calls) -> _Total:
    zeros = jnp.zeros(calls.var.shape[1:], calls.var.dtype)
    return _Total(zeros, zeros, zeros, zeros, jnp.zeros((), jnp.int32))


@jax.jit
def _add(totals, calls):
    """Each total with its layer's calls merged in."""
    def add(total, new):
        parts = (jnp.concatenate([old[None], rows]) for old, rows in zip(total[:4], new))
        seen = jnp.any(new.count > 0).astype(jnp.int32)
        return _Total(*_moments.combine(*parts), total.batches + seen)

    return {key: add(totals[key], calls[key]) for key in calls}


def _progress(batches, progress):
    """``batches``, behind a tqdm bar when ``progress`` asks for one."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f'progress must be None, True or False, got {progress!r}.')
    if progress is False:
        return batches
    try:
        total = len(batches)
    except TypeError:
        total = None
    if progress is None and total is not None and total < _MANY:
        return batches
    try:
        from tqdm import tqdm
    except ImportError:
        if progress:
            raise ImportError('progress=True needs tqdm: pip install tqdm.') from None
        return batches
    # disable=None: no bar unless on a terminal.
    return tqdm(batches, total=total, desc='precise batch stats', unit='batch', leave=False,
                disable=None if progress is None else False)


def _merge_batches(batch_moments, batches, progress, *args) -> dict[Any, _Total]:
    """Every layer's moments over all batches; ``batch_moments(batch, *args)``
    (jitted) gives one batch's, as ``{layer: _Calls}``."""
    totals, seen = {}, 0
    for seen, batch in enumerate(_progress(batches, progress), 1):
        calls = batch_moments(batch, *args)
        for key, rows in calls.items():
            if key not in totals:
                totals[key] = _empty(rows)
        totals.update(_add({key: totals[key] for key in calls}, calls))
    if not seen:
        raise ValueError('batches is empty: there are no statistics to compute.')
    if not totals:
        raise ValueError(f'No BatchNorm was called in {seen} batch(es).')
    return totals


@functools.partial(jax.jit, static_argnums=3)
def _finish(total: _Total, mean, var, unbiased):
    """The new ``(mean, var)``, shaped as the old ones; features without a
    valid entry keep the old values."""
    count, new_var = total.count.reshape(var.shape), total.var.reshape(var.shape)
    new_mean = (total.shift + total.delta).reshape(mean.shape)
    if unbiased:
        new_var = new_var * count / jnp.maximum(count - 1, 1)
    seen = count > 0
    return (jnp.where(seen, new_mean, mean).astype(mean.dtype),
            jnp.where(seen, new_var, var).astype(var.dtype))


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


def precise_batch_stats(fn: Callable[[Any], Any], batches: Iterable[Any], *, axis=-1,
                        mask_fn: Callable[[Any], Any] | None = None, unbiased: bool = False,
                        progress: bool | None = None):
    r"""The exact moments of ``fn``'s output over all batches, as batch-norm state.

    For each batch, ``fn(batch)`` gives a batch norm's input (an array, or a
    pytree of them for several layers); with :math:`n_b` valid entries per
    feature in batch :math:`b`, :math:`N = \sum_b n_b` and every axis but
    ``axis`` reduced,

    .. math::
      \mu = \frac{1}{N} \sum_b \sum_{i \in b} x_i, \qquad
      \sigma^2 = \frac{1}{N} \sum_b \sum_{i \in b} (x_i - \mu)^2

    (times :math:`N / (N - 1)` if ``unbiased``): the moments of the
    concatenated valid entries, not an average of batch moments. They are
    computed batch by batch in float32 with the stable shifted two-pass
    moments of :func:`normlib.batch_norm` and merged with Chan et al.'s
    formula, so they are exact up to rounding for any batch sizes and
    offsets. ``fn`` and ``mask_fn`` are traced with ``jax.jit``.

    Args:
      fn: maps a batch to the activations whose moments are wanted.
      batches: an iterable of batches (read once).
      axis: the feature axis or axes of every activation, kept.
      mask_fn: maps a batch to a boolean mask broadcastable to the
        activations, or a pytree of masks with ``fn``'s output structure (or
        a prefix of it); False entries are left out.
      unbiased: store PyTorch's unbiased variance (``unbiased_running_var``).
      progress: show a tqdm bar: True always, False never, None on a
        terminal when ``batches`` has no ``len`` or at least 100 batches.

    Returns:
      A :class:`~normlib.BatchNormState` (float32 ``mean`` and ``var`` of the
      feature shape; ``count`` the number of batches with a valid entry) for
      an array output, or a pytree of them with ``fn``'s output structure.
      Features without any valid entry get :func:`~normlib.init_batch_norm`'s
      mean 0 and variance 1.

    References:
      Wu & Johnson, `Rethinking "Batch" in BatchNorm
      <https://arxiv.org/abs/2105.07576>`_, 2021.
      Chan, Golub & LeVeque, `Updating formulae and a pairwise algorithm for
      computing sample variances
      <http://i.stanford.edu/pub/cstr/reports/cs/tr/79/773/CS-TR-79-773.pdf>`_,
      1979.
    """
    structure = []

    def batch_moments(batch):
        activations = fn(batch)
        leaves, treedef = jax.tree.flatten(activations)
        structure[:] = [treedef]
        masks = ([None] * len(leaves) if mask_fn is None else
                 jax.tree.leaves(jax.tree.broadcast(mask_fn(batch), activations)))
        return {i: _feature_moments(x, axis, m) for i, (x, m) in enumerate(zip(leaves, masks))}

    totals = _merge_batches(jax.jit(batch_moments), batches, progress)
    states = []
    for i in range(len(totals)):
        features = totals[i].var.shape
        mean, var = _finish(totals[i], jnp.zeros(features), jnp.ones(features), unbiased)
        states.append(BatchNormState(mean, var, totals[i].batches))
    return jax.tree.unflatten(structure[0], states)


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
    """
    unbiased = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and isinstance(module, _LINEN_BATCH_NORMS):
            path = module.scope.path
            x, rest = (args[0], args[1:]) if args else (kwargs['x'], ())
            _check_training(module, f"The BatchNorm at '{'/'.join(path)}'", rest, kwargs)
            module.sow(_COLLECTION, 'moments', _feature_moments(x, module.axis,
                                                                kwargs.get('mask')))
            unbiased[path] = getattr(module, 'unbiased_running_var', False)
        return next_fun(*args, **kwargs)

    def batch_moments(batch, variables):
        with nn.intercept_methods(record):
            _, state = model.apply(variables, batch, method=method,
                                   mutable=['batch_stats', _COLLECTION], **apply_kwargs)
        sown = traverse_util.flatten_dict(frozen_dict.unfreeze(state.get(_COLLECTION, {})))
        return {path[:-1]: _stacked(rows) for path, rows in sown.items()}

    totals = _merge_batches(jax.jit(batch_moments), batches, progress, variables)
    stats = traverse_util.flatten_dict(frozen_dict.unfreeze(variables['batch_stats']))
    for path, total in totals.items():
        stats[path + ('mean',)], stats[path + ('var',)] = _finish(
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
            self.sow(_Sown, 'moments', _feature_moments(x, self.axis, mask))
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
        return {'/'.join(map(str, path[:-1])): _stacked(rows.get_value())
                for path, rows in nnx.to_flat_state(sown)}

    # A snapshot: nnx.state shares the model's Variables.
    saved = jax.tree.map(lambda v: v, nnx.state(model, nnx.BatchStat))
    try:
        totals = _merge_batches(batch_moments, batches, progress, view)
    finally:
        nnx.update(model, saved)
    for key, layer in _batch_norms(model).items():
        if key not in totals:
            continue
        layer.mean[...], layer.var[...] = _finish(
            totals[key], layer.mean[...], layer.var[...],
            getattr(layer, 'unbiased_running_var', False))
        if hasattr(layer, 'count'):
            layer.count[...] = totals[key].batches.astype(layer.count.dtype)
