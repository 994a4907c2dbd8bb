"""normlib.equinox against equinox.nn (oracle) and float64 NumPy written here."""

import dataclasses
import io
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


run_bn_jit = eqx.filter_jit(run_bn)  # one compilation per model, shape and mode


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
        y, our_state = run_bn_jit(ours, our_state, x)
        y_eqx, their_state = run_bn_jit(theirs, their_state, x)
        np.testing.assert_allclose(y, y_eqx, atol=2e-5)
        x64 = np.asarray(x, np.float64)
        batch_means.append(x64.mean((0, 2)))
        batch_vars.append(x64.var((0, 2)))
    # Reference: the zero-debiased EMA, sum_t m**(T-1-t) (1 - m) v_t / (1 - m**T).
    m, steps = 0.99, len(batch_vars)
    weights = np.array([m ** (steps - 1 - t) * (1 - m) for t in range(steps)]) / (1 - m ** steps)
    mean, var = our_state.get(ours.batch_state_index)
    assert int(our_state.get(ours.batch_counter)) == steps
    np.testing.assert_allclose(var, weights @ np.array(batch_vars), rtol=1e-5)
    np.testing.assert_allclose(mean, weights @ np.array(batch_means), atol=1e-6)
    # Equinox's debiased average started at var 1: its variance is inflated.
    hidden_mean, hidden_var = their_state.get(theirs.batch_state_index)
    their_var = np.asarray(hidden_var) / (1 - m ** steps)
    ratio = their_var / (weights @ np.array(batch_vars))
    assert ratio.min() > 4, ratio  # about 5.5x on unit data after 20 steps
    x = jnp.asarray(RNG.standard_normal((32, 3, 6)), jnp.float32)
    ours_eval, _ = run_bn_jit(eqx.nn.inference_mode(ours), our_state, x)
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
    y, _ = run_bn_jit(ours, our_state, x)
    y_eqx, _ = run_bn_jit(theirs, their_state, x)
    assert np.abs(np.asarray(y) - expected).max() < 2e-5
    assert np.abs(np.asarray(y_eqx) - expected).max() > 1e-2


def test_batch_norm_mask_momentum_none_and_nested_axes():
    bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(3, ('dev', 'batch'), momentum=None)
    x = jnp.asarray(RNG.standard_normal((4, 8, 3, 5)) * 2 + 3, jnp.float32)
    mask = jnp.asarray(RNG.random((4, 8, 3, 5)) < 0.7)
    nested = jax.vmap(jax.vmap(lambda v, m, s: bn(v, s, mask=m), axis_name='batch',
                               in_axes=(0, 0, None), out_axes=(0, None)),
                      axis_name='dev', in_axes=(0, 0, None), out_axes=(0, None))
    y, new = jax.jit(nested)(x, mask, state)
    x64, w = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    n = w.sum((0, 1, 3))
    mean = (w * x64).sum((0, 1, 3)) / n
    var = (w * (x64 - mean[:, None]) ** 2).sum((0, 1, 3)) / n
    np.testing.assert_allclose(y, (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), atol=2e-5)
    got_mean, got_var = new.get(bn.batch_state_index)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(got_var, var, rtol=1e-5)
    assert int(new.get(bn.batch_counter)) == 1


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


def assert_rounded_once(y, expected, dtype, what=''):
    """``y`` has ``dtype`` and is float64 ``expected`` rounded once to it (half an ulp)."""
    assert y.dtype == dtype, what
    expected = np.asarray(expected, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - jnp.finfo(dtype).nmant)
    error = np.abs(np.asarray(y, np.float64) - expected)
    assert (error <= 0.5 * ulp + 1e-5 * np.abs(expected) + 1e-6).all(), (what, (error / ulp).max())


def output_dtype(model, state, x, **kwargs):
    return jax.eval_shape(lambda v: run_bn(model, state, v, **kwargs), x)[0].dtype


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_batch_norm_half_precision_dtype_side_by_side_with_equinox(dtype):
    ours, our_state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'batch', dtype=dtype)
    theirs, their_state = eqx_bn(3, dtype=dtype)
    for name in ('weight', 'bias'):  # parameters in the requested dtype, as Equinox's
        assert getattr(ours, name).dtype == getattr(theirs, name).dtype == dtype
    # Running statistics: float32 here, where Equinox keeps them in dtype.
    for got, their in zip(our_state.get(ours.batch_state_index),
                          their_state.get(theirs.batch_state_index)):
        assert (got.shape, got.dtype, their.dtype) == (their.shape, jnp.float32, dtype)
    assert our_state.get(ours.batch_counter).dtype == their_state.get(theirs.batch_counter).dtype
    x = jnp.asarray(RNG.standard_normal((16, 3, 4)) * 3 + 5, dtype)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean((0, 2)), x64.var((0, 2))
    assert output_dtype(theirs, their_state, x) == dtype
    y, our_state = run_bn_jit(ours, our_state, x)
    assert_rounded_once(y, (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), dtype)
    got_mean, got_var = our_state.get(ours.batch_state_index)
    assert got_mean.dtype == got_var.dtype == jnp.float32
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_var, var, rtol=1e-5)
    assert int(our_state.get(ours.batch_counter)) == 1
    x = jnp.asarray(RNG.standard_normal((8, 3, 4)) * 3 + 5, dtype)
    assert output_dtype(theirs, their_state, x, inference=True) == dtype
    y, _ = run_bn_jit(ours, our_state, x, inference=True)
    expected = (np.asarray(x, np.float64) - np.asarray(got_mean, np.float64)[:, None]) / np.sqrt(
        np.asarray(got_var, np.float64)[:, None] + 1e-5)
    assert_rounded_once(y, expected, dtype)
    # Float32 parameters and a half-precision input: the output keeps the
    # input's dtype, where Equinox's is promoted to float32.
    ours, our_state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'batch')
    theirs, their_state = eqx_bn(3)
    assert output_dtype(ours, our_state, x) == dtype
    assert output_dtype(theirs, their_state, x) == jnp.float32


def test_batch_norm_has_equinox_attributes_and_runs_code_written_for_equinox():
    ours, theirs = neqx.BatchNorm(3, 'batch', momentum=0.9), eqx_bn(3, momentum=0.9)[0]
    for field in dataclasses.fields(eqx.nn.BatchNorm):
        got, their = getattr(ours, field.name), getattr(theirs, field.name)
        if isinstance(their, eqx.nn.StateIndex):
            assert isinstance(got, eqx.nn.StateIndex), field.name
        elif isinstance(their, jax.Array):
            np.testing.assert_array_equal(got, their, err_msg=field.name)
        else:  # the ema_* indices are None, as with Equinox's mode='batch'
            assert got == their, field.name

    @eqx.filter_jit
    def load_evaluate_and_train(make, mean, var, x):
        """Written against eqx.nn.BatchNorm: loads statistics, evaluates, trains a step."""
        bn, state = eqx.nn.make_with_state(make)(3, 'batch', mode='batch')
        assert bn.ema_state_index is None and bn.ema_first_time_index is None
        hidden_mean, hidden_var = state.get(bn.batch_state_index)
        counter = state.get(bn.batch_counter)
        state = state.set(bn.batch_state_index, (mean.astype(hidden_mean.dtype),
                                                 var.astype(hidden_var.dtype)))
        y, state = run_bn(bn, state, x, inference=True)
        _, state = run_bn(bn, state, x)
        return y, counter, state.get(bn.batch_counter), state.get(bn.batch_state_index)

    mean, var = RNG.standard_normal(3), RNG.random(3) + 0.5
    x = jnp.asarray(RNG.standard_normal((8, 3, 4)) + 1, jnp.float32)
    expected = (np.asarray(x, np.float64) - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
    for make in (neqx.BatchNorm, eqx.nn.BatchNorm):
        y, before, after, stats = load_evaluate_and_train(make, jnp.asarray(mean, jnp.float32),
                                                          jnp.asarray(var, jnp.float32), x)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6, err_msg=str(make))
        assert (int(before), int(after)) == (0, 1)
        assert [(v.shape, v.dtype) for v in stats] == [((3,), jnp.float32)] * 2
    # Older Equinox's name (before mode=) for the running statistics.
    bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'batch')
    assert bn.state_index is bn.batch_state_index
    np.testing.assert_array_equal(state.get(bn.state_index)[1], np.ones(3))
    # An Equinox checkpoint (mode='batch') has the same leaves: it loads as it is.
    theirs, their_state = eqx_bn(3)
    their_state = their_state.set(theirs.batch_counter, jnp.array(3))
    their_state = their_state.set(theirs.batch_state_index, (jnp.asarray(mean, jnp.float32),
                                                             jnp.asarray(var, jnp.float32)))
    checkpoint = io.BytesIO()
    eqx.tree_serialise_leaves(checkpoint, (theirs, their_state))
    checkpoint.seek(0)
    bn, state = eqx.tree_deserialise_leaves(checkpoint, (bn, state))
    assert int(state.get(bn.batch_counter)) == 3
    np.testing.assert_allclose(state.get(bn.batch_state_index), (mean, var), rtol=1e-7)


@pytest.mark.parametrize('offset', [0.0, 1e6])
def test_layer_rms_and_group_norm_match_equinox_and_float64(offset):
    x = jnp.asarray(RNG.standard_normal((6, 4, 5)) + offset, jnp.float32)
    x64 = np.asarray(x, np.float64)
    ln, ln_eqx = neqx.LayerNorm((4, 5)), eqx.nn.LayerNorm((4, 5))
    rms, rms_eqx = neqx.RMSNorm((4, 5)), eqx.nn.RMSNorm((4, 5))
    gn, gn_eqx = neqx.GroupNorm(2, 4), eqx.nn.GroupNorm(2, 4)
    modules = {'ln': (ln, ln_eqx), 'rms': (rms, rms_eqx), 'gn': (gn, gn_eqx)}
    y = eqx.filter_jit(lambda modules, x: jax.tree.map(
        lambda m: jax.vmap(m)(x), modules, is_leaf=lambda m: isinstance(m, eqx.Module)))(
            modules, x)
    expected = (x64 - x64.mean((1, 2), keepdims=True)) / np.sqrt(
        x64.var((1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y['ln'][0], expected, atol=2e-5)
    np.testing.assert_allclose(
        y['rms'][0], x64 / np.sqrt((x64 ** 2).mean((1, 2), keepdims=True) + 1e-5), rtol=2e-6)
    grouped = x64.reshape(6, 2, 2, 5)
    expected_gn = ((grouped - grouped.mean((2, 3), keepdims=True)) / np.sqrt(
        grouped.var((2, 3), keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y['gn'][0], expected_gn, atol=2e-5)
    if offset == 0:  # Equinox agrees on ordinary data
        for ours, theirs in y.values():
            np.testing.assert_allclose(ours, theirs, atol=2e-5)
    state = eqx.nn.State(ln)
    y, same = ln(x[0], state)
    assert same is state


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_layer_rms_and_group_norm_half_precision_dtype_side_by_side_with_equinox(dtype):
    x = jnp.asarray(RNG.standard_normal((4, 6, 5)) * 3 + 5, dtype)
    x64 = np.asarray(x, np.float64)
    w, b = (np.asarray(jnp.asarray(RNG.standard_normal((6, 5)), dtype), np.float64)
            for _ in range(2))
    standard = (x64 - x64.mean((1, 2), keepdims=True)) / np.sqrt(
        x64.var((1, 2), keepdims=True) + 1e-5)
    rms = x64 / np.sqrt((x64 ** 2).mean((1, 2), keepdims=True) + 1e-5)
    grouped = x64.reshape(4, 2, 15)
    grouped = ((grouped - grouped.mean(2, keepdims=True)) / np.sqrt(
        grouped.var(2, keepdims=True) + 1e-5)).reshape(x.shape)
    cases = ((neqx.LayerNorm, eqx.nn.LayerNorm, ((6, 5),), w, b, standard * w + b),
             (neqx.RMSNorm, eqx.nn.RMSNorm, ((6, 5),), w, b, rms * w + b),
             (neqx.GroupNorm, eqx.nn.GroupNorm, (2, 6), w[:, :1], b[:, :1],
              grouped * w[:, :1] + b[:, :1]))
    for ours_type, their_type, args, weight, bias, expected in cases:
        ours, theirs = ours_type(*args, dtype=dtype), their_type(*args, dtype=dtype)
        assert ours.weight.dtype == theirs.weight.dtype == ours.bias.dtype == dtype
        weight, bias = (jnp.asarray(v.reshape(ours.weight.shape), dtype) for v in (weight, bias))
        ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (weight, bias))
        theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (weight, bias))
        assert jax.eval_shape(jax.vmap(theirs), x).dtype == dtype
        assert_rounded_once(jax.jit(jax.vmap(ours))(x), expected, dtype, ours_type)
        # Float32 parameters: still the input's dtype, as Equinox's.
        ours, theirs = ours_type(*args), their_type(*args)
        assert jax.eval_shape(jax.vmap(ours), x).dtype == dtype
        assert jax.eval_shape(jax.vmap(theirs), x).dtype == dtype


def test_default_dtype_follows_jax_enable_x64_as_equinox():
    with jax.enable_x64(True):
        for ours, theirs in ((neqx.LayerNorm(3), eqx.nn.LayerNorm(3)),
                             (neqx.RMSNorm(3), eqx.nn.RMSNorm(3)),
                             (neqx.GroupNorm(1, 3), eqx.nn.GroupNorm(1, 3)),
                             (neqx.BatchNorm(3, 'i'), eqx_bn(3)[0])):
            assert ours.weight.dtype == theirs.weight.dtype == jnp.float64, type(ours)
        bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(3, 'i')
        assert [v.dtype for v in state.get(bn.batch_state_index)] == [jnp.float64] * 2


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r'LayerNorm\(shape\)\(x\) needs x.shape == shape'):
        neqx.LayerNorm(4)(jnp.ones((2, 4)))


@pytest.mark.parametrize('dtype, param_dtype', [
    (jnp.float32, None), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, None),
    (jnp.bfloat16, jnp.bfloat16), (jnp.complex64, jnp.complex64)])
def test_modules_under_strict_promotion(dtype, param_dtype):
    rng = np.random.default_rng(33)
    x = rng.standard_normal((8, 6)) + 3
    if dtype == jnp.complex64:
        x = x + 1j * rng.standard_normal((8, 6))
    x = jnp.asarray(x, dtype)
    with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
        bn, state = eqx.nn.make_with_state(neqx.BatchNorm)(6, axis_name='i', dtype=param_dtype)
        # Promotion is checked while tracing: nothing needs to run.
        y, _ = jax.eval_shape(jax.vmap(bn, axis_name='i', in_axes=(0, None),
                                       out_axes=(0, None)), x, state)
        assert y.dtype == dtype
        jax.eval_shape(jax.vmap(lambda v: bn(v, state, inference=True), axis_name='i'), x)
        for module in (neqx.LayerNorm(6, dtype=param_dtype), neqx.RMSNorm(6, dtype=param_dtype),
                       neqx.GroupNorm(2, 6, dtype=param_dtype)):
            assert jax.eval_shape(jax.vmap(module), x).dtype == dtype
