"""The statistics core: exactness wherever the data sit, merging, scheduling, autodiff."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import normlib
from _reference import flax_two_pass_moments, np_moments
from normlib import _moments, _schedule

OFFSETS = (0.0, 1.0, 1e2, 1e4, 1e6)
FIRST = (0.0, 3.0, 6.0, 9.9, 10.1, 30.0)  # where the first element sits, in std


# Each case: the layout the statistics are taken in, the reduced axes there,
# and the public call (which receives x in that layout).
def _grouped(x):
    return x.reshape(x.shape[:3] + (-1,))


CASES = {
    'batch_norm NC': ((512, 8), (0,), lambda x, mask: normlib.batch_norm(
        x, normlib.init_batch_norm(8), training=True, mask=mask)),
    'batch_norm NHWC': ((8, 8, 8, 8), (0, 1, 2), lambda x, mask: normlib.batch_norm(
        x, normlib.init_batch_norm(8), training=True, mask=mask)),
    'layer_norm': ((8, 512), (1,), lambda x, mask: normlib.layer_norm(x, mask=mask)),
    'rms_norm': ((8, 512), (1,), lambda x, mask: normlib.rms_norm(x, mask=mask)),
    'group_norm': ((2, 8, 8, 4, 4), (1, 2, 4), lambda x, mask: normlib.group_norm(
        _grouped(x), num_groups=4, mask=None if mask is None else _grouped(mask))),
    'instance_norm': ((4, 16, 16, 4), (1, 2), lambda x, mask: normlib.instance_norm(
        x, mask=mask)),
}


@functools.lru_cache(maxsize=None)
def _spied(case):
    """``f(x, mask)``: the public call of ``case``, compiled once, returning the
    moments it normalized with."""
    call = CASES[case][2]

    def run(x, mask):
        seen = []
        original = _moments.standardize

        def recording(*args, **kwargs):
            y, m = original(*args, **kwargs)
            seen.append(m)
            return y, m

        _moments.standardize = recording
        try:
            call(x, mask)
        finally:
            _moments.standardize = original
        m, = seen
        return m.shift, m.delta, m.var

    return jax.jit(run)


def _spy(case, x, mask):
    """The moments ``case``'s public call normalized with (float64, in x's layout)."""
    shift, delta, var = _spied(case)(x, mask)
    mean = np.asarray(shift, np.float64) + np.asarray(delta, np.float64)
    return mean.reshape(-1), np.asarray(var, np.float64).reshape(-1)


def _data(shape, axes, offset, first, rng, masked):
    z = rng.standard_normal(shape)
    corner = tuple(0 if i in axes else slice(None) for i in range(len(shape)))
    z[corner] = first * np.where(rng.random(z[corner].shape) < 0.5, -1, 1)
    x = (z + offset).astype(np.float32)
    if not masked:
        return x, None
    mask = rng.random(shape) < 0.75
    mask[corner] = rng.random(mask[corner].shape) < 0.5  # some anchors fall on padding
    return x, mask


def _expected_moments(x, axes, mask, center):
    """float64 moments of the stored values, and flax.linen two-pass's float32
    ones (RMS norm's are a plain mean square, for which the floor of 1e-6 alone
    is the bound)."""
    mean, var = np_moments(x, axes, mask, center=center)
    mean, var = np.broadcast_to(mean, var.shape).reshape(-1), var.reshape(-1)
    flax_mean, flax_var = flax_two_pass_moments(x, axes, mask) if center else (mean, var)
    return mean, var, flax_mean, flax_var


def _errors(mean, var, ref_mean, ref_var):
    """Relative errors: the mean's against the larger of |mean| and the spread."""
    scale = np.maximum(np.abs(ref_mean), np.sqrt(ref_var))
    return np.max(np.abs(mean - ref_mean) / scale), np.max(np.abs(var - ref_var) / ref_var)


@pytest.mark.parametrize('masked', [False, True], ids=['dense', 'masked'])
@pytest.mark.parametrize('case', list(CASES))
def test_moments_as_exact_as_two_pass_wherever_the_data_sit(case, masked):
    shape, axes, _ = CASES[case]
    center = case != 'rms_norm'
    rng = np.random.default_rng(len(case) + masked)
    report = []
    for offset in OFFSETS:
        for first in FIRST:
            x, mask = _data(shape, axes, offset, first, rng, masked)
            ref_mean, ref_var, flax_mean, flax_var = _expected_moments(x, axes, mask, center)
            mean, var = _spy(case, x, mask)
            ours = _errors(mean if center else 0, var, ref_mean, ref_var)
            flax = _errors(flax_mean, flax_var, ref_mean, ref_var)
            for what, o, f in zip(('mean', 'var'), ours, flax):
                if o > max(1e-6, 2 * f):
                    report.append(f'offset {offset:g}, first at {first} std: {what} error {o:.2e}'
                                  f' (flax two-pass {f:.2e})')
    assert not report, '\n'.join(report)


@pytest.mark.parametrize('ratio', [1e4, 1e6, 1e8])
def test_hostile_offsets_normalize_exactly(ratio):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 4)) + ratio).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    y, state = normlib.batch_norm(jnp.asarray(x), normlib.init_batch_norm(4), training=True,
                                  momentum=0.0)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.var), x64.var(0), rtol=1e-6)


def test_moments_change_continuously_as_the_first_element_moves():
    # The old core switched algorithm at 10 standard deviations; here every
    # position of the first element gives the same variance to a few ulps.
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4096, 4))
    variances = []
    moments = jax.jit(lambda x: _moments.moments(x, (0,)))
    for first in np.linspace(0, 30, 121):
        z = base.copy()
        z[0] = first
        x = (z + 3.0).astype(np.float32)
        m = moments(x)
        variances.append(np.asarray(m.var, np.float64)[0] / x.astype(np.float64).var(0) - 1)
    assert np.max(np.abs(variances)) < 4 * np.finfo(np.float32).eps


def _stacked(parts):
    return _moments.Moments(*(jnp.stack(f) for f in zip(*parts)))


@pytest.mark.parametrize('offset', [0.0, 1e6])
def test_merge_of_parts_is_the_moments_of_their_union(offset):
    rng = np.random.default_rng(2)
    sizes = (1, 0, 37, 300, 5)
    chunks = [(rng.standard_normal((n, 3)) * (i + 1) + offset + i).astype(np.float32)
              for i, n in enumerate(sizes)]
    parts = [_moments.moments(jnp.asarray(c) if len(c) else jnp.zeros((1, 3)), (0,),
                              mask=None if len(c) else jnp.zeros((1, 3), bool))
             for c in chunks]
    merged = _moments.merge(_stacked(parts))
    union = np.concatenate(chunks).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(merged.count)[0], len(union))
    mean = np.asarray(merged.shift, np.float64) + np.asarray(merged.delta, np.float64)
    assert np.all(np.abs(mean[0] - union.mean(0)) <= 1e-6 * union.std(0))
    np.testing.assert_allclose(np.asarray(merged.var)[0], union.var(0), rtol=2e-6)


def test_merge_is_associative_over_batches():
    # Precise statistics merge batches one at a time; the result does not
    # depend on how the batches are grouped.
    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.standard_normal((n, 2)) + 50, jnp.float32) for n in (7, 64, 3)]
    parts = [_moments.moments(b, (0,)) for b in batches]
    all_at_once = _moments.merge(_stacked(parts))
    left = _moments.merge(_stacked([_moments.merge(_stacked(parts[:2])), parts[2]]))
    for a, b in zip(all_at_once, left):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_every_schedule_gives_the_same_numbers(monkeypatch):
    # The CPU schedule (private copies behind optimization barriers) changes
    # which kernels XLA builds, never the arithmetic.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((32, 5, 5, 6)) * 3 + 100, jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
    mask = jnp.asarray(rng.random(x.shape[:1]) < 0.8)[:, None, None, None]

    def step(x, scale, bias):
        def f(x, scale, bias):
            y, state = normlib.batch_norm(x, normlib.init_batch_norm(6), scale, bias,
                                          training=True, mask=mask)
            return y, state
        (y, state), vjp = jax.vjp(f, x, scale, bias)
        return y, state, vjp((dy, jax.tree.map(jnp.zeros_like, state)))

    results = {}
    for name, private in (('cpu', _schedule.private), ('plain', lambda values, tag: values)):
        monkeypatch.setattr(_schedule, 'private', private)
        results[name] = jax.jit(step)(x, scale, bias)
    for a, b in zip(jax.tree.leaves(results['cpu']), jax.tree.leaves(results['plain'])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-7, atol=2e-7)


def _saved(f, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue().strip().splitlines()


def test_training_step_saves_only_x_and_per_feature_vectors():
    x = jnp.ones((16, 4, 4, 8))
    params = (jnp.ones(8), jnp.zeros(8))

    def loss(params, x):
        y, _ = normlib.batch_norm(x, normlib.init_batch_norm(8), *params, training=True)
        return jnp.sum(y * jnp.arange(8.0))  # linear in y: every saved array is normlib's

    saved = _saved(loss, params, x)
    full = [line for line in saved if line.startswith('f32[16,4,4,8]')]
    assert len(full) == 1 and 'from the argument x' in full[0], saved
    small = [line for line in saved if line not in full]
    assert small and all(line.split()[0] in ('f32[1,1,1,8]', 'f32[1,1,1,1,8]', 'f32[8]')
                         or line.split()[0].startswith('f32[1,1,1,1') for line in small), saved


def test_standardize_moments_have_their_derivatives():
    # d mean = mean(dx), d var = 2 mean((x - mean) dx): the moments standardize
    # returns are differentiable, in both modes and to second order.
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((6, 3)) + 2)
        mask = jnp.asarray(rng.random((6, 3)) < 0.7).at[0].set(True)

        def f(x):
            y, m = _moments.standardize(x, axes=(0,), epsilon=1e-3, mask=mask)
            return jnp.sum(y * jnp.arange(3)) + jnp.sum(m.mean ** 2) + jnp.sum(m.var ** 2)
        check_grads(jax.jit(f), (x,), order=2, modes=['fwd', 'rev'])


def _normalizers():
    """Every normalizer as ``f(x, scale, bias)`` on x of shape (6, 2, 4), float64."""
    rng = np.random.default_rng(6)
    state = normlib.BatchNormState(jnp.asarray(rng.normal(size=4)),
                                   jnp.asarray(rng.uniform(0.5, 2, 4)), jnp.zeros((), jnp.int32))
    mask = jnp.asarray(rng.random((6, 2, 4)) < 0.7).at[0].set(True)
    bn = functools.partial(normlib.batch_norm, state=state, epsilon=1e-3)
    return {
        'batch_norm train': lambda x, s, b: bn(x, scale=s, bias=b, training=True)[0],
        'batch_norm eval': lambda x, s, b: bn(x, scale=s, bias=b, training=False)[0],
        'batch_norm mask': lambda x, s, b: bn(x, scale=s, bias=b, training=True, mask=mask)[0],
        'batch_norm virtual_batch_size': lambda x, s, b: bn(
            x, scale=s, bias=b, training=True, virtual_batch_size=3)[0],
        # r and d carry no gradient by design (Ioffe, 2017): finite differences
        # agree only where they are clipped to 1 and 0.
        'batch_renorm': lambda x, s, b: normlib.batch_renorm(
            x, state, s, b, training=True, r_max=1.0, d_max=0.0, epsilon=1e-3)[0],
        'l1_batch_norm': lambda x, s, b: normlib.l1_batch_norm(
            x, state, s, b, training=True, mask=mask, epsilon=1e-3)[0],
        'layer_norm': lambda x, s, b: normlib.layer_norm(x, s, b, epsilon=1e-3, mask=mask),
        'rms_norm': lambda x, s, b: normlib.rms_norm(x, s, epsilon=1e-3, mask=mask) + b,
        # Both are layer norm's standardize over other axes: one check for the pair.
        'group_norm + instance_norm': lambda x, s, b: (
            normlib.group_norm(x, s, b, num_groups=2, epsilon=1e-3)
            + jnp.cos(normlib.instance_norm(x, s, b, epsilon=1e-3))),
    }  # lp_normalize: the same checks in test_lp_norm.py and test_lp_range.py


@functools.lru_cache(maxsize=None)
def _derivatives(name):
    """``name``'s normalizer ``f`` and ``d(x, scale, bias, t)``: its Jacobians,
    Hessians and products in every mode, each computation compiled once."""
    f = jax.jit(_normalizers()[name])  # compiled once per transformation, not op by op

    @jax.jit
    def d(x, scale, bias, t):
        def g(x):
            return f(x, scale, bias)

        def loss(x):
            return jnp.sum(jnp.sin(g(x)))

        _, linear = jax.linearize(g, x)
        return {'jacfwd': jax.jacfwd(g)(x), 'jacrev': jax.jacrev(g)(x), 'linearize': linear(t),
                'jvp': jax.jvp(g, (x,), (t,))[1], 'hessian': jax.hessian(loss)(x),
                'rev over rev': jax.jacrev(jax.grad(loss))(x),
                'forward over reverse': jax.jvp(jax.grad(loss), (x,), (t,))[1]}

    return f, d


@pytest.mark.parametrize('name', list(_normalizers()))
def test_forward_and_reverse_mode_to_second_order(name):
    f, derivatives = _derivatives(name)
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(6, 2, 4)) * 2 + 3)
        scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 4)), jnp.asarray(rng.normal(size=4))
        # Against float64 finite differences: jvp, vjp and both nested.
        check_grads(f, (x, scale, bias), order=2, modes=['fwd', 'rev'])
        t = rng.normal(size=x.shape)
        d = {k: np.asarray(v) for k, v in derivatives(x, scale, bias, t).items()}
    np.testing.assert_allclose(d['jacfwd'], d['jacrev'], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d['linearize'], d['jvp'], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d['hessian'], d['rev over rev'], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d['forward over reverse'], np.tensordot(d['hessian'], t, t.ndim),
                               rtol=1e-9, atol=1e-11)


def test_batch_renorm_forward_mode_agrees_with_reverse_mode():
    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        state = normlib.BatchNormState(jnp.asarray(rng.normal(size=4)),
                                       jnp.asarray(rng.uniform(0.5, 2, 4)),
                                       jnp.zeros((), jnp.int32))
        x = jnp.asarray(rng.normal(size=(6, 4)) * 2 + 3)

        def f(x):
            return normlib.batch_renorm(x, state, training=True, r_max=3.0, d_max=5.0)[0]
        forward, reverse = jax.jit(lambda x: (jax.jacfwd(f)(x), jax.jacrev(f)(x)))(x)
        np.testing.assert_allclose(forward, reverse, rtol=1e-9, atol=1e-12)


def test_batch_moments_exact_when_every_image_has_the_same_outlying_pixels():
    # Structured data: the first pixel row of every image sits 30 std out.
    # The dense anchor is a spread sample, so it does not sit on such a row.
    rng = np.random.default_rng(11)
    z = rng.standard_normal((64, 16, 16, 8))
    z[:, 0] += 30
    for offset in (0.0, 1e4):
        x = (z + offset).astype(np.float32)
        mean, var = _spy('batch_norm NHWC', x, None)
        ref_mean, ref_var, flax_mean, flax_var = _expected_moments(x, (0, 1, 2), None, True)
        ours, flax = _errors(mean, var, ref_mean, ref_var), _errors(flax_mean, flax_var,
                                                                    ref_mean, ref_var)
        assert ours[0] <= max(1e-6, 2 * flax[0]) and ours[1] <= max(1e-6, 2 * flax[1]), (ours, flax)
