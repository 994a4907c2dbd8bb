"""Zero-centred scales (``scale_offset``) and the output-keeping backward pass
(``memory_efficient``), against float64 NumPy and a Gemma-style reference."""

import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import normlib
import normlib.linen as nl
import normlib.nnx

os.environ.setdefault('KERAS_BACKEND', 'jax')


def np_rms(x, scale, offset, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (offset + np.float64(scale))


def np_layer(x, scale, bias, offset, eps):
    x = np.asarray(x, np.float64)
    d = x - x.mean(-1, keepdims=True)
    return d / np.sqrt(np.mean(d * d, -1, keepdims=True) + eps) * (offset + scale) + bias


def gemma_rms_norm(x, scale, eps=1e-6):
    """Gemma's RMSNorm as its JAX code writes it: float32, ``1 + scale``."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed = x * jax.lax.rsqrt(var + eps)
    return normed * (1 + scale)


def data(shape=(16, 64), offset=0.0, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 2 + offset


def test_rms_norm_offset_matches_float64_and_gemma():
    x = data()
    scale = jax.random.normal(jax.random.key(1), (64,)) * 0.1
    y = normlib.rms_norm(x, scale, scale_offset=1.0)
    np.testing.assert_allclose(y, np_rms(x, scale, 1.0, 1e-6), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(y, gemma_rms_norm(x, scale), rtol=2e-6, atol=2e-6)
    # Without the offset it is a different layer: the test can tell them apart.
    assert float(jnp.max(jnp.abs(normlib.rms_norm(x, scale) - y))) > 0.5


def test_layer_norm_offset_matches_float64():
    x = data(offset=100.0)
    scale = jax.random.normal(jax.random.key(1), (64,)) * 0.1
    bias = jax.random.normal(jax.random.key(2), (64,))
    y = normlib.layer_norm(x, scale, bias, scale_offset=1.0)
    np.testing.assert_allclose(y, np_layer(x, scale, bias, 1.0, 1e-6), rtol=1e-5, atol=1e-5)
    y2 = normlib.layer_norm(x, scale, bias, scale_offset=-0.5)
    np.testing.assert_allclose(y2, np_layer(x, scale, bias, -0.5, 1e-6), rtol=1e-5, atol=1e-5)


def test_bfloat16_scale_offset_in_float32():
    """``1 + scale`` rounded to bfloat16 loses a small scale (spacing 2**-7 near 1)."""
    x = data()
    scale = (jax.random.normal(jax.random.key(1), (64,)) * 1e-3).astype(jnp.bfloat16)
    expected = np_rms(x, np.asarray(scale, np.float64), 1.0, 1e-6)
    y = normlib.rms_norm(x, scale, scale_offset=1.0)
    rounded = normlib.rms_norm(x, (1 + scale).astype(jnp.bfloat16))  # a bf16 port of Gemma
    err = float(np.max(np.abs(np.asarray(y, np.float64) - expected)))
    err_rounded = float(np.max(np.abs(np.asarray(rounded, np.float64) - expected)))
    assert err < 1e-5, err
    assert err_rounded > 1e-3, err_rounded


def test_offset_gradient_is_the_scales():
    x = data()
    scale = jax.random.normal(jax.random.key(1), (64,)) * 0.1
    g = jax.grad(lambda s: jnp.sum(jnp.sin(normlib.rms_norm(x, s, scale_offset=1.0))))(scale)
    g_ref = jax.grad(lambda s: jnp.sum(jnp.sin(normlib.rms_norm(x, 1.0 + s))))(scale)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bad, error', [(float('nan'), ValueError), ('one', TypeError)])
def test_bad_offset(bad, error):
    with pytest.raises(error, match='scale_offset'):
        normlib.rms_norm(data(), jnp.zeros(64), scale_offset=bad)


def test_offset_needs_a_scale():
    with pytest.raises(ValueError, match='needs a scale'):
        normlib.layer_norm(data(), scale_offset=1.0)


def test_traced_offset_is_refused():
    with pytest.raises(TypeError, match='scale_offset must be a static'):
        jax.jit(lambda o: normlib.rms_norm(data(), jnp.zeros(64), scale_offset=o))(1.0)


def test_modules_start_zero_centred_and_match_the_function():
    x = data()
    linen = nl.RMSNorm(scale_offset=1.0)
    v = linen.init(jax.random.key(0), x)
    assert float(jnp.max(jnp.abs(v['params']['scale']))) == 0.0
    np.testing.assert_array_equal(linen.apply(v, x), normlib.rms_norm(x))
    v = {'params': {'scale': jnp.full(64, 0.5)}}
    np.testing.assert_allclose(linen.apply(v, x), normlib.rms_norm(x, jnp.full(64, 1.5)),
                               rtol=1e-6)
    layer = normlib.nnx.LayerNorm(64, scale_offset=1.0, rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(layer.scale[...]))) == 0.0
    np.testing.assert_array_equal(layer(x), normlib.layer_norm(x))
    # An explicit initializer is kept.
    ones = nl.LayerNorm(scale_offset=1.0, scale_init=jax.nn.initializers.constant(2.0))
    assert float(ones.init(jax.random.key(0), x)['params']['scale'][0]) == 2.0


def test_equinox_and_keras_offset():
    eqx_mod = pytest.importorskip('normlib.equinox')
    x = data()
    e = eqx_mod.LayerNorm(64, scale_offset=1.0)
    assert float(jnp.max(jnp.abs(e.weight))) == 0.0
    np.testing.assert_allclose(jax.vmap(e)(x), normlib.layer_norm(x, epsilon=1e-5), atol=1e-6)
    keras_mod = pytest.importorskip('normlib.keras')
    k = keras_mod.RMSNormalization(scale_offset=1.0)
    y = k(np.asarray(x))
    assert float(np.max(np.abs(k.scale.numpy()))) == 0.0
    np.testing.assert_allclose(np.asarray(y), normlib.rms_norm(x), atol=1e-6)
    k2 = keras_mod.LayerNormalization.from_config(
        keras_mod.LayerNormalization(scale_offset=1.0, memory_efficient=True).get_config())
    assert (k2.scale_offset, k2.memory_efficient) == (1.0, True)


# memory_efficient: the reverse pass keeps y, not x.

def _layer(x, s, b, me):
    return normlib.layer_norm(x, s, b, memory_efficient=me)


def _rms(x, s, b, me):
    return normlib.rms_norm(x, s, memory_efficient=me, scale_offset=1.0) + b


def _batch(x, s, b, me):
    return normlib.batch_norm(x, normlib.init_batch_norm(x.shape[-1]), s, b, training=True,
                              memory_efficient=me)[0]


NORMS = {'layer_norm': _layer, 'rms_norm': _rms, 'batch_norm': _batch}


def _args(offset=3.0):
    x = data((64, 32), offset=offset)
    scale = jax.random.uniform(jax.random.key(1), (32,), minval=0.5, maxval=2.0)
    bias = jnp.arange(32.0) / 10
    return x, scale, bias


@pytest.mark.parametrize('name', sorted(NORMS))
def test_memory_efficient_gradients_equal_the_default(name):
    f = NORMS[name]
    x, scale, bias = _args()
    loss = lambda me: jax.jit(jax.grad(
        lambda *a: jnp.sum(jnp.sin(f(*a, me)) * jnp.arange(32.0)), argnums=(0, 1, 2)))
    for g0, g1 in zip(loss(False)(x, scale, bias), loss(True)(x, scale, bias)):
        np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g0))))
    # Forward mode is unchanged.
    dx = jax.random.normal(jax.random.key(3), x.shape)
    t0 = jax.jvp(lambda v: f(v, scale, bias, False), (x,), (dx,))[1]
    t1 = jax.jvp(lambda v: f(v, scale, bias, True), (x,), (dx,))[1]
    np.testing.assert_allclose(t1, t0, rtol=1e-4, atol=1e-5)


def _saved(f, *args):
    """The lines ``print_saved_residuals`` prints for ``f`` at ``args``."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_saved_residuals(f, *args)
    return buffer.getvalue().splitlines()


@pytest.mark.parametrize('name', sorted(NORMS))
def test_memory_efficient_keeps_y_not_x(name):
    f = NORMS[name]
    x, scale, bias = _args()
    # sin's own residual is cos(y): the norm's own choice is whether x is kept.
    default = _saved(lambda x: jnp.sum(jnp.sin(f(x, scale, bias, False))), x)
    efficient = _saved(lambda x: jnp.sum(jnp.sin(f(x, scale, bias, True))), x)
    assert any('from the argument x' in line for line in default), default
    assert not any('from the argument x' in line for line in efficient), efficient
    full = [line for line in efficient if line.startswith('f32[64,32]')]
    assert len(full) == 2, efficient  # y and cos(y)


def _chain_step_temporaries(name, me, rows=256, width=128, layers=4):
    """``temp_size_in_bytes`` of a jitted gradient step of ``layers`` residual
    blocks ``x + tanh(norm(x) @ w)``: each block's matmul keeps the norm's
    output, so the option lets the step drop one array per block (RMS norm
    without a bias added outside it, whose sum the matmul would keep)."""
    f = NORMS[name] if name != 'rms_norm' else (
        lambda x, s, b, me: normlib.rms_norm(x, s, memory_efficient=me))
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    x = jax.random.normal(keys[-1], (rows, width))
    params = [(jax.random.uniform(keys[3 * i], (width,), minval=0.5, maxval=2.0),
               0.1 * jax.random.normal(keys[3 * i + 1], (width,)),
               jax.random.normal(keys[3 * i + 2], (width, width)) / np.sqrt(width))
              for i in range(layers)]

    def loss(params, x):
        for s, b, w in params:
            x = x + jnp.tanh(f(x, s, b, me) @ w)
        return jnp.mean(jnp.square(x - 1.0))
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, x.nbytes


@pytest.mark.parametrize('name', sorted(NORMS))
def test_memory_efficient_step_holds_fewer_temporaries(name):
    """The compiled step's temporaries drop by at least one array for every
    block but the first (whose x is the step's input); on XLA:CPU they did not
    until the output was kept from being recomputed inside the reverse pass."""
    default, array = _chain_step_temporaries(name, False)
    efficient, _ = _chain_step_temporaries(name, True)
    assert efficient <= default - 1.5 * array, (default, efficient, array)


def test_memory_efficient_under_axis_name():
    x, scale, bias = _args()
    shards = x.reshape(4, 16, 32)
    state = normlib.init_batch_norm(32)

    def loss(x, me):
        def one(v):
            return normlib.batch_norm(v, state, scale, bias, training=True, axis_name='b',
                                      memory_efficient=me)[0]
        return jnp.sum(jnp.sin(jax.vmap(one, axis_name='b')(x)))
    g0 = jax.grad(loss)(shards, False)
    g1 = jax.grad(loss)(shards, True)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g0))))
    single = jax.grad(lambda v: jnp.sum(jnp.sin(_batch(v, scale, bias, True))))(x)
    np.testing.assert_allclose(g1.reshape(64, 32), single, rtol=1e-4, atol=1e-5)


def test_memory_efficient_zero_scale_gives_nan_gradients():
    x, scale, bias = _args()
    scale = scale.at[3].set(0.0)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(_layer(v, scale, bias, True))))(x)
    assert bool(jnp.all(jnp.isnan(g)))  # x_hat is lost in that feature: never silently wrong
    g_default = jax.grad(lambda v: jnp.sum(jnp.sin(_layer(v, scale, bias, False))))(x)
    assert bool(jnp.all(jnp.isfinite(g_default)))


def test_memory_efficient_must_be_a_bool():
    with pytest.raises(TypeError, match='memory_efficient'):
        normlib.layer_norm(data(), memory_efficient='yes')


def test_modules_pass_memory_efficient():
    x, scale, bias = _args()
    bn = nl.BatchNorm(use_running_average=False, memory_efficient=True)
    v = bn.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = bn.apply({**v, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y))
    lines = _saved(lambda x: loss(v['params'], x), x)
    assert not any('from the argument x' in line for line in lines), lines
    ln = nl.LayerNorm(memory_efficient=True)
    w = ln.init(jax.random.key(0), x)
    lines = _saved(lambda x: jnp.sum(jnp.sin(ln.apply(w, x))), x)
    assert not any('from the argument x' in line for line in lines), lines


def test_weight_decay_mask_decays_zero_centred_scales():
    params = {'Dense_0': {'kernel': jnp.ones((2, 3))},
              'RMSNorm_0': {'scale': jnp.zeros(3)},
              'LayerNorm_0': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)}}
    assert normlib.weight_decay_mask(params)['RMSNorm_0']['scale'] is False
    mask = normlib.weight_decay_mask(params, centred=['RMSNorm_0'])
    assert mask['RMSNorm_0']['scale'] is True and mask['LayerNorm_0']['scale'] is False
    every = normlib.weight_decay_mask(params, centred=True)
    assert every['LayerNorm_0'] == {'scale': True, 'bias': False}

    class Block(nnx.Module):
        def __init__(self):
            self.gemma = normlib.nnx.RMSNorm(3, scale_offset=1.0, rngs=nnx.Rngs(0))
            self.plain = normlib.nnx.LayerNorm(3, rngs=nnx.Rngs(0))
            self.dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    mask = normlib.weight_decay_mask(Block())
    assert mask['gemma']['scale'] is True
    assert mask['plain']['scale'] is False and mask['plain']['bias'] is False
    assert mask['dense']['kernel'] is True


def test_torch_rms_norm_round_trip_with_offset():
    torch = pytest.importorskip('torch')
    from normlib import torch_interop
    layer = torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, 8))
    scale, bias = torch_interop.layer_norm_from_torch(layer.state_dict(), scale_offset=1.0)
    assert bias is None
    np.testing.assert_allclose(scale, np.linspace(-0.5, 0.5, 8), atol=1e-7)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(normlib.rms_norm(jnp.asarray(x), scale, scale_offset=1.0),
                               layer(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    back = torch_interop.layer_norm_to_torch(scale, None, 'norm.', scale_offset=1.0)
    np.testing.assert_array_equal(back['norm.weight'], layer.weight.detach().numpy())


def test_memory_benchmark_smoke(tmp_path):
    from benchmarks import memory_efficient
    assert memory_efficient.main(['--smoke', '--out', str(tmp_path)]) == 0
    import json
    result = json.loads((tmp_path / 'memory_efficient.json').read_text())
    assert result['max_grad_difference_relative'] < 1e-4
    saved = result['saved_full_arrays']
    assert any('argument x' in line for line in saved['False'])
    assert not any('argument x' in line for line in saved['True'])
