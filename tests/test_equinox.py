"""normlib.equinox against equinox.nn (oracle) and float64 NumPy written here."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip('equinox', reason='equinox (an optional extra) is not installed')
import normlib.equinox as neqx  # noqa: E402

RNG = np.random.default_rng(21)


def run_bn(model, state, x, **kwargs):
    return jax.vmap(lambda v, s: model(v, s, **kwargs), axis_name='batch', in_axes=(0, None),
                    out_axes=(0, None))(x, state)


def eqx_bn(size, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return eqx.nn.make_with_state(eqx.nn.BatchNorm)(size, 'batch', mode='batch', **kwargs)


def test_batch_norm_training_outputs_equal_equinox_and_the_variance_is_not_inflated():
    ours, our_state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'batch')
    theirs, their_state = eqx_bn(3)
    batch_vars, batch_means = [], []
    for step in range(20):
        x = jnp.asarray(RNG.standard_normal((32, 3, 6)), jnp.float32)
        y, our_state = run_bn(ours, our_state, x)
        y_eqx, their_state = run_bn(theirs, their_state, x)
        np.testing.assert_allclose(y, y_eqx, atol=2e-5)
        x64 = np.asarray(x, np.float64)
        batch_means.append(x64.mean((0, 2)))
        batch_vars.append(x64.var((0, 2)))
    # Reference: the zero-debiased EMA, sum_t m**(T-1-t) (1 - m) v_t / (1 - m**T).
    m, steps = 0.99, len(batch_vars)
    weights = np.array([m ** (steps - 1 - t) * (1 - m) for t in range(steps)]) / (1 - m ** steps)
    mean, var, count = our_state.get(ours.state_index)
    assert int(count) == steps
    np.testing.assert_allclose(var, weights @ np.array(batch_vars), rtol=1e-5)
    np.testing.assert_allclose(mean, weights @ np.array(batch_means), atol=1e-6)
    # Equinox's debiased average started at var 1: its variance is inflated.
    hidden_mean, hidden_var = their_state.get(theirs.batch_state_index)
    their_var = np.asarray(hidden_var) / (1 - m ** steps)
    ratio = their_var / (weights @ np.array(batch_vars))
    assert ratio.min() > 4, ratio  # about 5.5x on unit data after 20 steps
    x = jnp.asarray(RNG.standard_normal((32, 3, 6)), jnp.float32)
    ours_eval, _ = run_bn(eqx.nn.inference_mode(ours), our_state, x)
    expected = (np.asarray(x, np.float64) - np.asarray(mean)[:, None]) / np.sqrt(
        np.asarray(var)[:, None] + 1e-5)
    np.testing.assert_allclose(ours_eval, expected, atol=2e-5)


def test_batch_norm_is_exact_at_large_offsets_where_equinox_is_not():
    ours, our_state = eqx.nn.make_with_state(neqx.BatchNorm)(2, 'batch')
    theirs, their_state = eqx_bn(2)
    x = jnp.asarray(RNG.standard_normal((64, 2, 4)) + 1e6, jnp.float32)
    x64 = np.asarray(x, np.float64)
    expected = (x64 - x64.mean((0, 2), keepdims=True)) / np.sqrt(
        x64.var((0, 2), keepdims=True) + 1e-5)
    y, _ = run_bn(ours, our_state, x)
    y_eqx, _ = run_bn(theirs, their_state, x)
    assert np.abs(np.asarray(y) - expected).max() < 2e-5
    assert np.abs(np.asarray(y_eqx) - expected).max() > 1e-2


def test_batch_norm_mask_momentum_none_and_nested_axes():
    bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(3, ('dev', 'batch'), momentum=None)
    x = jnp.asarray(RNG.standard_normal((4, 8, 3, 5)) * 2 + 3, jnp.float32)
    mask = jnp.asarray(RNG.random((4, 8, 3, 5)) < 0.7)
    nested = jax.vmap(jax.vmap(lambda v, m, s: bn(v, s, mask=m), axis_name='batch',
                               in_axes=(0, 0, None), out_axes=(0, None)),
                      axis_name='dev', in_axes=(0, 0, None), out_axes=(0, None))
    y, new = nested(x, mask, state)
    x64, w = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    n = w.sum((0, 1, 3))
    mean = (w * x64).sum((0, 1, 3)) / n
    var = (w * (x64 - mean[:, None]) ** 2).sum((0, 1, 3)) / n
    np.testing.assert_allclose(y, (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), atol=2e-5)
    got_mean, got_var, count = new.get(bn.state_index)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(got_var, var, rtol=1e-5)
    assert int(count) == 1


def test_batch_norm_gradients_and_jit():
    bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'batch')
    x = jnp.asarray(RNG.standard_normal((8, 3, 4)), jnp.float32)

    @eqx.filter_jit
    def loss(model, x, state):
        y, state = run_bn(model, state, x)
        return jnp.sum(jnp.tanh(y) * jnp.arange(3.0)[:, None]), state

    grads, _ = eqx.filter_grad(loss, has_aux=True)(bn, x, state)
    assert grads.weight.shape == (3,) and np.isfinite(grads.weight).all()
    assert np.abs(np.asarray(grads.bias)).sum() > 0


def test_batch_norm_rejects_ema_mode():
    with pytest.raises(ValueError, match="mode='ema'.*not implemented"):
        neqx.BatchNorm(3, 'batch', mode='ema')


@pytest.mark.parametrize('offset', [0.0, 1e6])
def test_layer_rms_and_group_norm_match_equinox_and_float64(offset):
    x = jnp.asarray(RNG.standard_normal((6, 4, 5)) + offset, jnp.float32)
    x64 = np.asarray(x, np.float64)
    ln, ln_eqx = neqx.LayerNorm((4, 5)), eqx.nn.LayerNorm((4, 5))
    expected = (x64 - x64.mean((1, 2), keepdims=True)) / np.sqrt(
        x64.var((1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(jax.vmap(ln)(x), expected, atol=2e-5)
    rms, rms_eqx = neqx.RMSNorm((4, 5)), eqx.nn.RMSNorm((4, 5))
    np.testing.assert_allclose(
        jax.vmap(rms)(x), x64 / np.sqrt((x64 ** 2).mean((1, 2), keepdims=True) + 1e-5), rtol=2e-6)
    gn, gn_eqx = neqx.GroupNorm(2, 4), eqx.nn.GroupNorm(2, 4)
    grouped = x64.reshape(6, 2, 2, 5)
    expected_gn = ((grouped - grouped.mean((2, 3), keepdims=True)) / np.sqrt(
        grouped.var((2, 3), keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(jax.vmap(gn)(x), expected_gn, atol=2e-5)
    if offset == 0:  # Equinox agrees on ordinary data
        for ours, theirs in ((ln, ln_eqx), (rms, rms_eqx), (gn, gn_eqx)):
            np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), atol=2e-5)
    state = eqx.nn.State(ln)
    y, same = ln(x[0], state)
    assert same is state


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r'LayerNorm\(shape\)\(x\) needs x.shape == shape'):
        neqx.LayerNorm(4)(jnp.ones((2, 4)))


def test_modules_under_strict_promotion():
    x = jnp.asarray(np.random.default_rng(33).standard_normal((8, 6)) + 3, jnp.float32)
    with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
        bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(6, axis_name='i')
        # Promotion is checked while tracing: nothing needs to run.
        jax.eval_shape(jax.vmap(bn, axis_name='i', in_axes=(0, None), out_axes=(0, None)),
                       x, state)
        jax.eval_shape(jax.vmap(lambda v: bn(v, state, inference=True), axis_name='i'), x)
        for module in (neqx.LayerNorm(6), neqx.RMSNorm(6), neqx.GroupNorm(2, 6)):
            jax.eval_shape(jax.vmap(module), x)
