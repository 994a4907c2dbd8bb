"""Precise batch-norm statistics: exact population moments over many batches.

The running averages of batch norm are an exponential moving average of
batch moments taken while the weights changed, so they lag the final
weights, and they are wrong outright after the weights are averaged (SWA,
an EMA of the weights). Precise statistics replace them with the exact mean
and variance of the layer's inputs over a set of batches, with the weights
fixed: every batch's ``(count, mean, var)`` is merged with Chan et al.'s
formula (:func:`normlib._moments.merge`), so the result is the moments of
all the batches' valid entries together, whatever the batch sizes.

This module needs only JAX; the Flax helpers (:func:`precise_linen`,
:func:`precise_nnx`) live in :mod:`normlib.precise_flax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normlib import _checks, _moments
from normlib._batch_norm import BatchNormState

_MANY = 100  # the number of batches from which progress=None shows a bar


class Total(NamedTuple):
    """The moments of every batch so far at one layer (feature shape)."""
    moments: _moments.Moments
    batches: jax.Array  # int32: the batches with at least one valid entry


def feature_moments(x, axis, mask) -> _moments.Moments:
    """One call's float32 moments over every axis of ``x`` but ``axis``,
    with a leading axis of one row."""
    x = _checks.floating('x', x)
    kept = _checks.axes('axis', axis, x.ndim)
    reduced = tuple(i for i in range(x.ndim) if i not in kept)
    mask = None if mask is None else _checks.mask(mask, x.shape)
    moments = _moments.by_kept_axes(_moments.moments(x, reduced, mask=mask), x.shape, kept)
    return _moments.Moments(*(m[None] for m in moments))


def stacked(rows) -> _moments.Moments:
    """Several calls' moments, one row each."""
    return _moments.Moments(*(jnp.concatenate(column) for column in zip(*rows)))


def _empty(calls: _moments.Moments) -> Total:
    zeros = jnp.zeros_like(calls.var[0])  # laid out as the calls' rows, on a mesh too
    return Total(_moments.Moments(zeros, zeros, zeros, zeros), jnp.zeros((), jnp.int32))


@jax.jit
def _add(totals, calls):
    """Each total with its layer's calls merged in."""
    def add(total, new):
        parts = _moments.Moments(*(jnp.concatenate([old[None], rows])
                                   for old, rows in zip(total.moments, new)))
        seen = jnp.any(new.count > 0).astype(jnp.int32)
        return Total(_moments.merge(parts), total.batches + seen)

    return {key: add(totals[key], calls[key]) for key in calls}


def progress_bar(batches, progress):
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


def merge_batches(batch_moments, batches, progress, *args) -> dict[Any, Total]:
    """Every layer's moments over all batches; ``batch_moments(batch, *args)``
    (jitted) gives one batch's, as ``{layer: Moments with one row per call}``."""
    totals, seen = {}, 0
    for seen, batch in enumerate(progress_bar(batches, progress), 1):
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
def finish(total: Total, mean, var, unbiased):
    """The new ``(mean, var)``, shaped as the old ones; features without a
    valid entry keep the old values."""
    moments = total.moments
    count, new_var = moments.count.reshape(var.shape), moments.var.reshape(var.shape)
    new_mean = moments.mean.reshape(mean.shape)
    if unbiased:
        new_var = new_var * count / jnp.maximum(count - 1, 1)
    seen = count > 0
    return (jnp.where(seen, new_mean, _moments.laid_out_as(mean, new_mean)).astype(mean.dtype),
            jnp.where(seen, new_var, _moments.laid_out_as(var, new_var)).astype(var.dtype))


def precise_batch_stats(fn: Callable[[Any], Any], batches: Iterable[Any], *,
                        axis: int | Sequence[int] = -1,
                        mask_fn: Callable[[Any], Any] | None = None, unbiased: bool = False,
                        progress: bool | None = None) -> Any:
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
    computed batch by batch in float32 with the moments of
    :func:`normlib.batch_norm` and merged with Chan et al.'s formula, so
    they are exact up to rounding for any batch sizes and offsets. ``fn``
    and ``mask_fn`` are traced with ``jax.jit``.

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

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> sizes = (7, 50, 13)
        >>> batches = [jax.random.normal(jax.random.key(i), (n, 3)) + 100
        ...            for i, n in enumerate(sizes)]
        >>> state = normlib.precise_batch_stats(lambda b: b, batches, progress=False)
        >>> everything = jnp.concatenate(batches)
        >>> bool(jnp.allclose(state.mean, everything.mean(0), rtol=1e-6))
        True
        >>> bool(jnp.allclose(state.var, everything.var(0), rtol=1e-4))
        True
    """
    structure = []

    def batch_moments(batch):
        activations = fn(batch)
        leaves, treedef = jax.tree.flatten(activations)
        structure[:] = [treedef]
        masks = ([None] * len(leaves) if mask_fn is None else
                 jax.tree.leaves(jax.tree.broadcast(mask_fn(batch), activations)))
        return {i: feature_moments(x, axis, m) for i, (x, m) in enumerate(zip(leaves, masks))}

    totals = merge_batches(jax.jit(batch_moments), batches, progress)
    states = []
    for i in range(len(totals)):
        features = totals[i].moments.var.shape
        mean, var = finish(totals[i], jnp.zeros(features), jnp.ones(features), unbiased)
        states.append(BatchNormState(mean, var, totals[i].batches))
    return jax.tree.unflatten(structure[0], states)
