"""Batch normalization with explicit running statistics."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normlib import _checks, _moments

# A mapped axis name (pmap, vmap, shard_map), or a tuple of them.
AxisName = Hashable | tuple[Hashable, ...]
# An axis of x, or several.
Axes = int | Sequence[int]
# axis_index_groups: the shard indices of each group.
Groups = Sequence[Sequence[int]]


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer, a pytree of three arrays
    (see :func:`init_batch_norm`); the fields are documented below."""
    mean: jax.Array
    var: jax.Array
    count: jax.Array


BatchNormState.mean.__doc__ = ('The running mean: float32 or wider (complex for complex input),'
                               ' of the feature shape.')
BatchNormState.var.__doc__ = ('The running variance, biased unless ``unbiased_running_var``:'
                              ' real float32 or wider, of the feature shape.')
BatchNormState.count.__doc__ = ('int32: the number of statistic updates so far, a scalar or one'
                                ' per feature (``init_batch_norm(per_feature_count=True)``).')

# Exported programs (jax.export) that take or return a state serialize.
jax.export.register_namedtuple_serialization(BatchNormState,
                                             serialized_name='normlib.BatchNormState')


def init_batch_norm(num_features: int | tuple[int, ...],
                    dtype: Any = jnp.float32, *,
                    per_feature_count: bool = False) -> BatchNormState:
    """A fresh :class:`BatchNormState`: mean 0, var 1, count 0.

    Args:
      num_features: the feature shape (an int for a single feature axis).
      dtype: dtype of ``mean`` and ``var``: float32 or wider, or complex64 or
        wider for complex input (then ``mean`` is complex and ``var`` has the
        matching real dtype).
      per_feature_count: count each feature's updates apart (``count`` of the
        feature shape), so that with ``momentum=None`` or ``zero_debias`` a
        feature that a mask empties in some batches is averaged over the
        batches it saw; otherwise ``count`` is one int32 scalar.

    Example:
        >>> import normlib
        >>> state = normlib.init_batch_norm(3)
        >>> state.mean.tolist(), state.var.tolist(), int(state.count)
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
        >>> normlib.init_batch_norm((2, 3)).mean.shape
        (2, 3)
    """
    shape = (num_features,) if not isinstance(num_features, (tuple, list)) else tuple(num_features)
    shape = tuple(_checks.integer('num_features', d, 'an int or a tuple of ints') for d in shape)
    if any(d < 1 for d in shape):
        raise ValueError(f'num_features must be positive, got {num_features!r}.')
    _state_dtype('dtype', dtype, complex_ok=True)
    var_dtype = jnp.finfo(dtype).dtype
    if not isinstance(per_feature_count, bool):
        raise TypeError(f'per_feature_count must be a bool, got {per_feature_count!r}.')
    return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, var_dtype),
                          jnp.zeros(shape if per_feature_count else (), jnp.int32))


def _state_dtype(name, dtype, *, complex_ok):
    """Raises TypeError unless ``dtype`` suits running statistics."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f'{name} must be a dtype, got {dtype!r}.') from None
    if complex_ok and jnp.issubdtype(dtype, jnp.complexfloating):
        return
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        kind = 'float32 or wider (or complex64 or wider)' if complex_ok else 'float32 or wider'
        raise TypeError(f'{name} must be {kind}, got {dtype}; build the state with'
                        ' init_batch_norm.')


def _check_state(state, features, x_dtype=None):
    """Checks the types, dtypes and shapes of a state for ``features``.

    With ``x_dtype`` complex, the running mean must be complex too.
    """
    if not all(hasattr(state, f) for f in BatchNormState._fields):
        raise TypeError('state must be a BatchNormState (see init_batch_norm), got'
                        f' {type(state).__name__}.')
    for field in BatchNormState._fields:
        value = getattr(state, field)
        if not (hasattr(value, 'dtype') and hasattr(value, 'shape')):
            raise TypeError(f'state.{field} must be an array, got {type(value).__name__}; build'
                            ' the state with init_batch_norm.')
    _state_dtype('state.mean', state.mean.dtype, complex_ok=True)
    _state_dtype('state.var', state.var.dtype, complex_ok=False)
    if not jnp.issubdtype(state.count.dtype, jnp.integer):
        raise TypeError(f'state.count must be an integer array (int32), got {state.count.dtype};'
                        ' build the state with init_batch_norm.')
    if x_dtype is not None and jnp.issubdtype(x_dtype, jnp.complexfloating) and not (
            jnp.issubdtype(state.mean.dtype, jnp.complexfloating)):
        raise TypeError(f'x is {jnp.dtype(x_dtype)} but state.mean is {state.mean.dtype}: complex'
                        ' input needs a complex running mean, e.g.'
                        ' init_batch_norm(num_features, dtype=jnp.complex64).')
    _checks.shape('state.mean', state.mean, features, 'the features (x.shape at axis)')
    _checks.shape('state.var', state.var, features, 'the features (x.shape at axis)')
    if state.count.shape != tuple(features):
        _checks.shape('state.count', state.count, (), 'counts (or the features, one count each)')


def _params(name, value, features, broadcast):
    if value is None:
        return None
    value = _checks.param(name, value)
    _checks.shape(name, value, features, 'the features (x.shape at axis)')
    return value.reshape(broadcast)


def _update(state: BatchNormState, batch: _moments.Moments, *, momentum: float | None,
            unbiased: bool, zero_debias: bool) -> BatchNormState:
    """Folds one batch's moments (feature shape) into the running state.

    Each statistic becomes ``(1 - w) * old + w * new``, with both weights
    computed apart so that ``w = 1`` (the first batch of ``momentum=None``
    or ``zero_debias``) gives the batch's statistic bit for bit, at any
    offset, and a small variance keeps its digits (``old + (new - old) * w``
    would round it at the precision of ``old``). A per-feature ``count``
    counts each feature's own updates; a scalar one the calls that saw any
    feature. Counts stop at int32's largest value instead of wrapping (the
    weight ``1 / (count + 1)`` of a later batch is below float32's
    resolution long before). No gradient reaches the running statistics.
    """
    state, batch = jax.lax.stop_gradient((state, batch))
    count = batch.count
    seen = count > 0
    var = batch.var
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    real = jnp.finfo(state.var.dtype).dtype
    own = state.count.shape != ()
    steps = state.count.astype(real)
    if own:
        steps = steps.reshape(count.shape)
    if momentum is None or (zero_debias and momentum == 1.0):
        # The exact average of all batches (the limit of the debiased weight
        # below as momentum -> 1).
        kept, taken = steps / (steps + 1), 1 / (steps + 1)
    elif zero_debias:
        # The EMA started at zero, divided by 1 - momentum**t: the new
        # batch weighs (1 - m) / (1 - m**(t + 1)), 1 at the start, and the
        # old value m (1 - m**t) / (1 - m**(t + 1)), 0 at the start.
        m = jnp.asarray(momentum, real)
        power = m ** steps
        norm = 1 - power * m
        kept, taken = m * (1 - power) / norm, (1 - m) / norm
    else:
        # 1 - momentum in Python's double, rounded once: 1 - float32(0.99) would
        # carry float32(0.99)'s rounding error (1e-6 relative) into every update.
        kept, taken = momentum, 1.0 - momentum

    kept, taken = (jnp.asarray(w, real) for w in (kept, taken))

    def ema(old, new):
        new = new.astype(old.dtype)
        average = old * kept.astype(old.dtype) + new * taken.astype(old.dtype)
        return jnp.where(seen, average, _moments.laid_out_as(old, new))

    limit = jnp.iinfo(state.count.dtype).max
    grows = (seen if own else jnp.any(seen)).astype(state.count.dtype)
    grows = jnp.where(state.count.reshape(grows.shape) < limit, grows, 0)
    new_count = (state.count.reshape(grows.shape) + grows).reshape(state.count.shape)
    return BatchNormState(ema(state.mean, batch.mean), ema(state.var, var), new_count)


class _Call(NamedTuple):
    """A checked batch-norm call: everything shaped to broadcast against ``x``.

    A chunked call (ghost batch norm) has ``x`` reshaped to ``(chunks, size,
    ...)`` and keeps axis 0 besides the features: each chunk has moments of
    its own.
    """
    x: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    kept: tuple[int, ...]  # the axes the moments keep (features; and chunks)
    reduced: tuple[int, ...]  # every other axis
    features: tuple[int, ...]  # the state's shape
    epsilon: float
    momentum: float | None
    sync: _moments.Sync | None
    fallback: tuple[jax.Array, jax.Array]  # the running (mean, var), no gradient


def _check_call(x, state, *, scale, bias, training, axis, momentum, epsilon, axis_name,
                axis_index_groups, mask, complex_ok) -> _Call:
    x = _checks.floating('x', x, complex_ok=complex_ok)
    kept = _checks.axes('axis', axis, x.ndim)
    features = _checks.features_of(x.shape, kept)
    broadcast = tuple(d if i in kept else 1 for i, d in enumerate(x.shape))
    _check_state(state, features, x.dtype)
    if not isinstance(training, bool):
        raise TypeError(f'training must be a Python bool, got {training!r}.')
    # axis_name matters only for batch statistics: evaluation runs anywhere,
    # e.g. eagerly or under plain jit after training under pmap or shard_map.
    sync = (_moments.Sync.of(*_checks.axis_name(axis_name, axis_index_groups)) if training
            else None)
    fallback = tuple(jax.lax.stop_gradient(s).reshape(broadcast) for s in (state.mean, state.var))
    return _Call(
        x, _params('scale', scale, features, broadcast), _params('bias', bias, features, broadcast),
        None if mask is None else _checks.mask(mask, x.shape), kept,
        tuple(i for i in range(x.ndim) if i not in kept), features,
        _checks.epsilon(epsilon, x.dtype), _checks.momentum(momentum), sync, fallback)


def _evaluate(call):
    return _moments.normalize(call.x, *call.fallback, call.scale, call.bias, epsilon=call.epsilon)


def _run(statistic, x, state, scale, bias, *, training, virtual_batch_size,
         unbiased_running_var, zero_debias, **options):
    """The one path of every batch-norm variant: checks, then evaluation or training.

    ``statistic(call)`` is the variant: it normalizes ``call.x`` and returns
    ``(y, moments)``, the moments kept-dims over ``call.reduced`` with
    ``var`` the square of its spread (the standard deviation, an Lp spread).
    With ``virtual_batch_size`` it sees each chunk of that many examples as
    a batch of its own. ``options`` go to :func:`_check_call`. Returns ``y``
    and the new state.
    """
    call = _check_call(x, state, scale=scale, bias=bias, training=training, **options)
    if not training:
        return _evaluate(call), state
    unbiased = unbiased_running_var
    if virtual_batch_size is None:
        y, m = statistic(call)
        batch = _features(call, m)
    else:
        chunked = _chunked(call, virtual_batch_size)
        y, m = statistic(chunked)
        y = y.reshape(call.x.shape)
        batch = _chunk_average(_features(chunked, m), call.sync, unbiased)
        unbiased = False  # taken per chunk
    return y, _update(state, batch, momentum=call.momentum, unbiased=unbiased,
                      zero_debias=zero_debias)


def _features(call: _Call, m: _moments.Moments) -> _moments.Moments:
    """Kept-dims moments laid out as the state (after a leading axis of chunks
    for a chunked call), without gradient."""
    return jax.lax.stop_gradient(_moments.by_kept_axes(m, call.x.shape, call.kept))


def _chunked(call: _Call, size) -> _Call:
    """``call`` with its ``n`` examples along axis 0 cut into ``n / size``
    chunks, each with moments of its own (on its own device)."""
    n = call.x.shape[0]
    size = _checks.integer('virtual_batch_size', size, 'a positive int dividing the batch axis')
    if size < 1 or n % size:
        raise ValueError(
            f'virtual_batch_size={size!r} must be a positive int dividing the batch axis (axis 0,'
            f' size {n}).')
    if 0 in call.kept:
        raise ValueError('virtual_batch_size needs axis 0 (the batch axis) to be reduced, but'
                         f' axis={call.kept} keeps it.')
    chunked = lambda a: None if a is None else a.reshape((n // size, size) + a.shape[1:])
    lift = lambda a: None if a is None else a[None]
    kept = (0,) + tuple(i + 1 for i in call.kept)
    return call._replace(
        x=chunked(call.x), scale=lift(call.scale), bias=lift(call.bias), mask=chunked(call.mask),
        kept=kept, reduced=tuple(i for i in range(call.x.ndim + 1) if i not in kept), sync=None,
        fallback=tuple(lift(v) for v in call.fallback))


def _chunk_average(chunks: _moments.Moments, sync, unbiased) -> _moments.Moments:
    """The average of the chunks' means and variances (a leading axis of
    chunks, over all shards of ``sync``), chunks without valid entries left
    out; ``count`` is the number of chunks averaged. ``unbiased`` applies
    ``n / (n - 1)`` to each chunk's variance."""
    count, mean, var = chunks.count, chunks.mean, chunks.var
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    # In mean's dtype, so a complex mean stacks with the real count and variance.
    used = _moments.like((count > 0).astype(count.dtype), mean)
    totals = jnp.stack([jnp.sum(used * _moments.like(m, mean), axis=0) for m in (used, mean, var)])
    totals = _moments.group_sum(totals, sync)
    chunks = jnp.maximum(totals[0].real, 1)
    mean = totals[1] / _moments.like(chunks, mean)
    return _moments.Moments(totals[0].real, mean, jnp.zeros_like(mean), totals[2].real / chunks)


def _standard_deviation(call: _Call, *, from_output=False):
    """Batch norm's statistic: the standard deviation (a custom derivative
    rule with a one-round backward pass across devices; with
    ``from_output``, one that keeps ``y`` instead of ``x``)."""
    return _moments.standardize(call.x, call.scale, call.bias, axes=call.reduced,
                                epsilon=call.epsilon, mask=call.mask, sync=call.sync,
                                fallback=call.fallback, from_output=from_output)


def batch_norm(x: jax.Array, state: BatchNormState, scale: jax.Array | None = None,
               bias: jax.Array | None = None, *, training: bool, axis: Axes = -1,
               momentum: float | None = 0.99, epsilon: float = 1e-5,
               axis_name: AxisName | None = None, axis_index_groups: Groups | None = None,
               mask: jax.Array | None = None, unbiased_running_var: bool = False,
               virtual_batch_size: int | None = None, zero_debias: bool = False,
               memory_efficient: bool = False) -> tuple[jax.Array, BatchNormState]:
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
    entry (all masked, or a batch of 0) are normalized with the running
    statistics and keep them bit-for-bit; an empty batch returns an empty
    ``y`` and the state unchanged. (A scalar ``count`` counts the calls, so
    with ``momentum=None`` a feature masked out of a whole batch is later
    averaged as if it had seen that batch; a state of
    ``init_batch_norm(n, per_feature_count=True)`` counts each feature's own
    batches.) In evaluation mode, ``y`` uses the
    running statistics, the state is returned unchanged and ``axis_name`` is
    not used (evaluation runs outside the mapped context too).

    Complex ``x`` is centered by its complex mean and scaled by the real
    variance ``mean(|x - mean|**2)``; its state needs a complex running mean
    (``init_batch_norm(n, dtype=jnp.complex64)``). float8 ``x`` computes in
    float32.

    Moments are float32 (or wider) for any input dtype, stable for data whose
    mean is far larger than its spread, right up to float32's largest
    values (moments that would overflow are taken again at a power-of-two
    scale, on those calls only; across devices one ``pmax`` more), and
    exact across devices: with
    ``axis_name`` the shards' moments are merged with Chan et al.'s formula,
    so uneven or empty shards give the moments of the concatenated valid
    data. The forward pass sends two ``psum``\ s whose size does not depend
    on the number of devices: the count-weighted means (``features``
    floats, plus the counts with a ``mask``), which give every shard the
    same shift near the global mean; then each shard's weighted offset from
    that shift and second moment (``2 * features``), which merge without
    cancellation at any offset. The backward pass sends one (its two
    tangent sums, ``2 * features``); ghost batch norm sends one forward
    round only, for the running statistics. With ``axis_index_groups``,
    ``pmap``'s grouped collectives keep the same size; ``vmap`` and
    ``shard_map`` collectives take no groups, so there each message holds
    one slot per group (it grows with the number of groups, not with the
    devices in a group). No gradient reaches the running statistics.

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
      axis_index_groups: device groups normalized separately (sizes as
        above).
      mask: boolean, broadcastable to ``x``; False entries are left out of the
        moments (their outputs are still normalized).
      unbiased_running_var: keep the running variance unbiased.
      virtual_batch_size: ghost batch norm (Hoffer et al., 2017; Keras's
        ``virtual_batch_size``): each chunk of this many examples along axis 0
        is normalized with its own moments, on its own device; the running
        statistics take the average of the chunks' moments (over all devices
        of ``axis_name``).
      zero_debias: treat the running statistics as a zero-initialized
        exponential moving average divided by ``1 - momentum**count`` (Adam's
        bias correction): the first batch replaces the mean-0/var-1 prior
        instead of being averaged with it. At ``momentum=1`` this is its
        limit, the average of all batches (as ``momentum=None``).
      memory_efficient: in training mode, the reverse pass recovers
        ``x_hat = (y - bias) / scale`` from the output instead of from
        ``x``, so a training step keeps ``y`` (which the next layer usually
        keeps anyway) and per-feature vectors, not ``x`` (Apex's option of
        the same name). Gradients equal the default's to rounding of ``y``
        (``x``'s dtype). Needs every ``scale`` entry nonzero: where one is
        0, ``x_hat`` is lost and the gradients are NaN. Forward values,
        forward mode and ``axis_name`` are unchanged; evaluation mode is
        plain autodiff either way.

    Returns:
      ``(y, new_state)``; ``y`` has ``x``'s dtype and shape.

    References:
      Ioffe & Szegedy, `Batch Normalization: Accelerating Deep Network
      Training by Reducing Internal Covariate Shift
      <https://arxiv.org/abs/1502.03167>`_, 2015.
      Hoffer, Hubara & Soudry, `Train longer, generalize better
      <https://arxiv.org/abs/1705.08741>`_, 2017.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3 + 5
        >>> state = normlib.init_batch_norm(4)
        >>> y, state = normlib.batch_norm(x, state, training=True, momentum=0.9)
        >>> print((jnp.round(y.mean(0), 4) + 0).tolist(), jnp.round(y.std(0), 3).tolist())
        [0.0, 0.0, 0.0, 0.0] [1.0, 1.0, 1.0, 1.0]
        >>> print(int(state.count), bool(jnp.allclose(state.mean, 0.1 * x.mean(0))))
        1 True

        Evaluation uses the running statistics and returns the state unchanged:

        >>> y_eval, same = normlib.batch_norm(x, state, training=False)
        >>> same is state
        True

        A mask leaves padding out of the statistics (here the last 8 rows):

        >>> mask = (jnp.arange(32) < 24)[:, None]
        >>> y, _ = normlib.batch_norm(x, state, training=True, mask=mask)
        >>> print((jnp.round(y[:24].mean(0), 4) + 0).tolist())
        [0.0, 0.0, 0.0, 0.0]

        With ``axis_name``, the statistics span every shard of a mapped axis; the
        result equals the single-device one on the whole batch:

        >>> shards = x.reshape(4, 8, 4)
        >>> y_sharded, s = jax.vmap(
        ...     lambda v: normlib.batch_norm(v, state, training=True, axis_name='batch'),
        ...     axis_name='batch', out_axes=(0, None))(shards)
        >>> y_single, s1 = normlib.batch_norm(x, state, training=True)
        >>> bool(jnp.allclose(y_sharded.reshape(32, 4), y_single, atol=1e-6))
        True
    """
    statistic = functools.partial(
        _standard_deviation, from_output=_checks.boolean('memory_efficient', memory_efficient))
    return _run(statistic, x, state, scale, bias, training=training, axis=axis,
                momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=mask, complex_ok=True,
                unbiased_running_var=unbiased_running_var,
                virtual_batch_size=virtual_batch_size, zero_debias=zero_debias)


def batch_renorm(x: jax.Array, state: BatchNormState, scale: jax.Array | None = None,
                 bias: jax.Array | None = None, *, r_max: float | jax.Array,
                 d_max: float | jax.Array, training: bool, axis: Axes = -1,
                 momentum: float | None = 0.99, epsilon: float = 1e-5,
                 axis_name: AxisName | None = None, axis_index_groups: Groups | None = None,
                 mask: jax.Array | None = None, unbiased_running_var: bool = False,
                 virtual_batch_size: int | None = None,
                 zero_debias: bool = False) -> tuple[jax.Array, BatchNormState]:
    r"""Batch renormalization (Ioffe, 2017).

    In training mode, with batch moments :math:`\mu_B, \sigma_B^2` as in
    :func:`batch_norm` and :math:`\sigma = \sqrt{var + \epsilon}`,
    :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` from the running state:

    .. math::
      r = \mathrm{sg}\big(\mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max})\big),\quad
      d = \mathrm{sg}\big(\mathrm{clip}((\mu_B - mean) / \sigma, -d_{max}, d_{max})\big)

    .. math::
      y = \Big(\frac{x - \mu_B}{\sigma_B} \, r + d\Big) \cdot scale + bias

    where sg stops the gradient. ``r_max = 1, d_max = 0`` is batch norm. The
    running statistics are updated as in :func:`batch_norm` (an average of
    the variance, where the paper averages the standard deviation).
    Evaluation mode is batch norm's. ``r_max`` and ``d_max`` may be traced
    scalars, to follow a schedule such as :func:`renorm_schedule`.

    Every option of :func:`batch_norm` works the same way: masks, empty
    features (``r = 1``, ``d = 0``: normalized with the running statistics),
    ``axis_name`` and ``axis_index_groups`` (batch norm's collectives: the
    correction needs only the merged moments and the replicated state),
    ``unbiased_running_var``, ``zero_debias``, and ``virtual_batch_size``
    (each chunk renormalized with its own moments against the running
    statistics).

    Args:
      r_max: the largest ratio of the batch to the running standard
        deviation, >= 1.
      d_max: the largest shift of the batch from the running mean, in running
        standard deviations, >= 0.
      Others: as in :func:`batch_norm`.

    Returns:
      ``(y, new_state)``; ``y`` has ``x``'s dtype and shape.

    References:
      Ioffe, `Batch Renormalization: Towards Reducing Minibatch Dependence in
      Batch-Normalized Models <https://arxiv.org/abs/1702.03275>`_, 2017.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (16, 3))
        >>> state = normlib.init_batch_norm(3)
        >>> r_max, d_max = normlib.renorm_schedule(10_000)
        >>> y, state = normlib.batch_renorm(x, state, training=True, r_max=r_max, d_max=d_max)
        >>> y.shape, int(state.count)
        ((16, 3), 1)
    """
    for name, value, low in (('r_max', r_max, 1.0), ('d_max', d_max, 0.0)):
        if not isinstance(value, jax.core.Tracer) and not float(value) >= low:
            raise ValueError(f'{name} must be >= {low:g}, got {value!r}.')
    renormalized = functools.partial(_renormalized, r_max=r_max, d_max=d_max)
    return _run(renormalized, x, state, scale, bias, training=training, axis=axis,
                momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=mask, complex_ok=False,
                unbiased_running_var=unbiased_running_var,
                virtual_batch_size=virtual_batch_size, zero_debias=zero_debias)


def _renormalized(call: _Call, *, r_max, d_max):
    """Batch renorm's statistic: the standard deviation, with the clipped
    correction ``(r, d)`` towards the running statistics."""
    xhat, m = _moments.standardize(call.x, axes=call.reduced, epsilon=call.epsilon,
                                   mask=call.mask, sync=call.sync, fallback=call.fallback)
    running_mean, running_var = call.fallback
    sigma = jnp.sqrt(running_var + call.epsilon)
    seen = m.count > 0  # features with no valid entry: normalized with the state, r = 1, d = 0
    r = jnp.where(seen, jnp.clip(jnp.sqrt(m.var + call.epsilon) / sigma, 1.0 / r_max, r_max), 1)
    d = jnp.where(seen, jnp.clip((m.mean - running_mean) / sigma, -d_max, d_max), 0)
    r, d = jax.lax.stop_gradient((r, d))
    y = _padded_affine(call, lambda xhat: xhat.astype(r.dtype) * r + d, xhat)
    return y.astype(call.x.dtype), m


def _padded_affine(call: _Call, standard, v):
    """``standard(v) * scale + bias`` (elementwise), with no gradient from masked non-finite ``v``.

    Masked padding may hold NaN or inf. Its outputs are what they are, but
    with a zero cotangent there, ``0 * NaN`` must not reach the gradients of
    ``scale``, the statistics and ``x``: the differentiated branch sees
    :func:`~normlib._moments.finite_padding` in its place.
    """
    affine = lambda v: _moments.affine(standard(v), call.scale, call.bias)
    if call.mask is None:
        return affine(v)
    safe = _moments.finite_padding(v, call.mask)
    return jnp.where(call.mask | jnp.isfinite(v), affine(safe), jax.lax.stop_gradient(affine(v)))


def lp_batch_norm(x: jax.Array, state: BatchNormState, scale: jax.Array | None = None,
                  bias: jax.Array | None = None, *, p: float, training: bool, axis: Axes = -1,
                  momentum: float | None = 0.99, epsilon: float = 1e-5,
                  axis_name: AxisName | None = None, axis_index_groups: Groups | None = None,
                  mask: jax.Array | None = None, unbiased_running_var: bool = False,
                  virtual_batch_size: int | None = None,
                  zero_debias: bool = False) -> tuple[jax.Array, BatchNormState]:
    r"""Lp batch normalization (Santurkar, Tsipras, Ilyas & Madry, 2018, Section 3.3).

    Batch norm with the standard deviation replaced by the Lp spread of the
    centered activations:

    .. math::
      s_B = \Big(\frac{1}{n}\sum |x - \mu_B|^p\Big)^{1/p}\ (p = \infty:
      \max |x - \mu_B|), \qquad
      y = \frac{x - \mu_B}{\sqrt{s_B^2 + \epsilon}} \cdot scale + bias

    ``p = 2`` is :func:`batch_norm`. Everything else is batch norm's: the
    running ``var`` tracks :math:`s_B^2` (times ``n / (n - 1)`` if
    ``unbiased_running_var``), so evaluation mode is batch norm's; masks,
    empty features and ``axis_name`` work the same (three forward
    collectives, each of at most ``2 * features`` floats: batch norm's two
    for the moments, then one for the deviations, which are taken from the
    exact global mean and so need it first; two backward; at ``p = inf``
    the derivative adds one for the number of entries that attain the
    largest deviation, which share its gradient; for ``p > 8`` one more
    forward, for the largest deviation). :math:`\mu_B` is exact at any
    offset (:func:`batch_norm`'s moments) and :math:`s_B` is computed in
    units of the standard deviation (for ``p > 8``, of the largest
    deviation), so large ``p`` neither overflows nor underflows. An empty
    batch returns an empty ``y`` and the state unchanged, as in
    :func:`batch_norm`. Gradients, in forward and reverse mode, flow
    through :math:`\mu_B` and :math:`s_B` (at ``p = inf`` through the
    largest deviation). ``virtual_batch_size`` normalizes each chunk by its
    own spread, as in :func:`batch_norm`.

    Args:
      p: the exponent, > 0, or ``float('inf')``.
      Others: as in :func:`batch_norm`.

    Returns:
      ``(y, new_state)``; ``y`` has ``x``'s dtype and shape.

    References:
      Santurkar, Tsipras, Ilyas & Madry, `How Does Batch Normalization Help
      Optimization? <https://arxiv.org/abs/1805.11604>`_, NeurIPS 2018.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (64, 3)) + 10
        >>> state = normlib.init_batch_norm(3)
        >>> y_inf, _ = normlib.lp_batch_norm(x, state, p=float('inf'), training=True)
        >>> print(jnp.round(jnp.abs(y_inf).max(0), 3).tolist())  # the largest deviation maps to 1
        [1.0, 1.0, 1.0]
        >>> y2, _ = normlib.lp_batch_norm(x, state, p=2, training=True)
        >>> bool(jnp.allclose(y2, normlib.batch_norm(x, state, training=True)[0], atol=1e-5))
        True
    """
    spread = functools.partial(_lp_spread, p=_checks.positive('p', p), factor=1.0)
    return _run(spread, x, state, scale, bias, training=training, axis=axis, momentum=momentum,
                epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
                mask=mask, complex_ok=False, unbiased_running_var=unbiased_running_var,
                virtual_batch_size=virtual_batch_size, zero_debias=zero_debias)


def l1_batch_norm(x: jax.Array, state: BatchNormState, scale: jax.Array | None = None,
                  bias: jax.Array | None = None, *, training: bool, axis: Axes = -1,
                  momentum: float | None = 0.99, epsilon: float = 1e-5,
                  axis_name: AxisName | None = None, axis_index_groups: Groups | None = None,
                  mask: jax.Array | None = None, unbiased_running_var: bool = False,
                  virtual_batch_size: int | None = None,
                  zero_debias: bool = False) -> tuple[jax.Array, BatchNormState]:
    r"""L1 batch normalization (Hoffer, Banner, Golan & Soudry, 2018).

    Batch norm with the standard deviation replaced by the scaled mean
    absolute deviation, which for Gaussian data estimates the same quantity
    and needs no squares (cheaper and steadier in low precision):

    .. math::
      s_B = \sqrt{\pi / 2}\ \frac{1}{n}\sum |x - \mu_B|, \qquad
      y = \frac{x - \mu_B}{\sqrt{s_B^2 + \epsilon}} \cdot scale + bias

    This is :func:`lp_batch_norm` at ``p = 1`` with its spread multiplied
    by :math:`\sqrt{\pi / 2}` (the ratio of the standard deviation to the
    mean absolute deviation of a Gaussian). Everything else is
    :func:`batch_norm`'s: the running ``var`` tracks :math:`s_B^2` (times
    ``n / (n - 1)`` if ``unbiased_running_var``), so evaluation mode is
    batch norm's; masks and ``axis_name`` work the same (three forward
    collectives, as in :func:`lp_batch_norm`), and so do
    ``virtual_batch_size``, ``unbiased_running_var`` and ``zero_debias``.
    Gradients flow through :math:`\mu_B` and :math:`s_B`.

    Args:
      As in :func:`batch_norm`.

    Returns:
      ``(y, new_state)``; ``y`` has ``x``'s dtype and shape.

    References:
      Hoffer, Banner, Golan & Soudry, `Norm matters: efficient and accurate
      normalization schemes in deep networks <https://arxiv.org/abs/1803.01814>`_, 2018.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> x = jax.random.normal(jax.random.key(0), (4096, 2)) * 2
        >>> state = normlib.init_batch_norm(2)
        >>> y, state = normlib.l1_batch_norm(x, state, training=True, momentum=0)
        >>> print(jnp.round(jnp.sqrt(state.var), 1).tolist())  # about the std for Gaussian data
        [2.0, 2.0]
    """
    # The ratio of the standard deviation to the mean absolute deviation of a Gaussian.
    spread = functools.partial(_lp_spread, p=1.0, factor=math.sqrt(math.pi / 2))
    return _run(spread, x, state, scale, bias, training=training, axis=axis,
                momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=mask, complex_ok=False,
                unbiased_running_var=unbiased_running_var, zero_debias=zero_debias,
                virtual_batch_size=virtual_batch_size)


def _lp_spread(call: _Call, *, p, factor):
    """Lp batch norm's statistic: ``factor`` times the Lp spread (plain autodiff)."""
    xf = call.x.astype(_moments.compute_dtype(call.x.dtype))
    # Masked padding (even NaN or inf) must reach neither the moments nor their gradients.
    valid = _moments.finite_padding(xf, call.mask)
    m = _moments.moments(valid, call.reduced, mask=call.mask, sync=call.sync)
    spread = factor * _moments.lp_deviation(valid, call.reduced, m, p, mask=call.mask,
                                            sync=call.sync)
    m = m._replace(var=jnp.square(spread))
    seen = m.count > 0  # features with no valid entry: normalized with the state
    running_mean, running_var = call.fallback
    used = _moments.Moments(m.count, jnp.where(seen, m.shift, running_mean),
                            jnp.where(seen, m.delta, 0), jnp.where(seen, m.var, running_var))
    standard = lambda v: _moments.standardize_with(v, used, epsilon=call.epsilon)
    return _padded_affine(call, standard, xf).astype(call.x.dtype), m


def renorm_schedule(step: int | jax.Array, *, warmup: int = 5000, r_max: float = 3.0,
                    d_max: float = 5.0, r_steps: int = 40000,
                    d_steps: int = 25000) -> tuple[jax.Array, jax.Array]:
    """Ioffe (2017)'s ``(r_max, d_max)`` at ``step``: plain batch norm for
    ``warmup`` steps, then linear ramps reaching ``r_max`` at step ``r_steps``
    and ``d_max`` at step ``d_steps``. ``step`` may be traced.

    Example:
        >>> import normlib
        >>> [round(float(v), 2) for v in normlib.renorm_schedule(0)]
        [1.0, 0.0]
        >>> [round(float(v), 2) for v in normlib.renorm_schedule(40_000)]
        [3.0, 5.0]
    """
    def ramp(end, final, start_value):
        t = jnp.clip((jnp.asarray(step, jnp.float32) - warmup) / max(end - warmup, 1), 0.0, 1.0)
        return start_value + t * (final - start_value)
    return ramp(r_steps, r_max, 1.0), ramp(d_steps, d_max, 0.0)


def fold_batch_norm(kernel: jax.Array, bias: jax.Array | None, state: BatchNormState,
                    scale: jax.Array | None = None, bn_bias: jax.Array | None = None, *,
                    epsilon: float) -> tuple[jax.Array, jax.Array]:
    r"""Folds an evaluation-mode batch norm into the preceding Dense or Conv.

    For a layer ``h = x @ kernel + bias`` (features last; any conv kernel
    whose last axis is the output features) followed by
    ``batch_norm(h, state, scale, bn_bias, training=False)``, returns
    ``(kernel', bias')`` with

    .. math::
      f = scale / \sqrt{var + \epsilon},\quad kernel' = kernel \cdot f,\quad
      bias' = (bias - mean) \cdot f + bn\_bias

    so that the layer alone computes the same output, to float32 rounding.
    ``bias`` (the layer's) and ``scale``/``bn_bias`` may be None. Outputs have
    ``kernel``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp, normlib
        >>> kernel = jax.random.normal(jax.random.key(0), (5, 3))
        >>> state = normlib.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 1.0, 0.25]),
        ...                                jnp.array(10))
        >>> k, b = normlib.fold_batch_norm(kernel, None, state, epsilon=1e-5)
        >>> x = jax.random.normal(jax.random.key(1), (7, 5))
        >>> y, _ = normlib.batch_norm(x @ kernel, state, training=False, epsilon=1e-5)
        >>> bool(jnp.allclose(x @ k + b, y, atol=1e-5))
        True
    """
    kernel = _checks.floating('kernel', kernel)
    features = kernel.shape[-1:]
    _check_state(state, features)
    epsilon = _checks.epsilon(epsilon, kernel.dtype)
    dtype = _moments.compute_dtype(kernel.dtype)
    factor = jax.lax.rsqrt(state.var.astype(dtype) + epsilon)
    if scale is not None:
        factor = factor * _params('scale', scale, features, features)
    offset = -state.mean.astype(dtype)
    if bias is not None:
        offset = offset + _params('bias', bias, features, features)
    offset = offset * factor
    if bn_bias is not None:
        offset = offset + _params('bn_bias', bn_bias, features, features)
    return (kernel.astype(dtype) * factor).astype(kernel.dtype), offset.astype(kernel.dtype)
