"""Batch renorm, ghost batch norm, zero-debiased averages, BN folding, PyTorch interop."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import normlib
from normlib import torch_interop

EPS = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


def _state(c, seed=1):
    rng = _rng(seed)
    return normlib.BatchNormState(jnp.asarray(rng.standard_normal(c), jnp.float32),
                                  jnp.asarray(rng.random(c) + 0.5, jnp.float32),
                                  jnp.array(7, jnp.int32))


# ---------------------------------------------------------------- batch renorm

def _renorm_reference(x, state, scale, bias, r_max, d_max):
    x = x.astype(np.float64)
    mu, var = x.mean(0), x.var(0)
    sigma_b, sigma = np.sqrt(var + EPS), np.sqrt(np.asarray(state.var, np.float64) + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu - np.asarray(state.mean, np.float64)) / sigma, -d_max, d_max)
    return ((x - mu) / sigma_b * r + d) * scale + bias


@pytest.mark.parametrize('r_max,d_max', [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_batch_renorm_matches_the_paper(r_max, d_max):
    rng = _rng()
    x = (rng.standard_normal((32, 4)) * 3 + 2).astype(np.float32)
    scale, bias = rng.random(4).astype(np.float32) + 0.5, rng.standard_normal(4).astype(np.float32)
    state = _state(4)
    y, new = jax.jit(lambda x, r, d: normlib.batch_renorm(
        x, state, scale, bias, training=True, r_max=r, d_max=d, momentum=0.9))(x, r_max, d_max)
    np.testing.assert_allclose(y, _renorm_reference(x, state, scale, bias, r_max, d_max),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.9 * state.mean + 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    assert int(new.count) == 8


def test_batch_renorm_with_no_slack_is_batch_norm_including_gradients():
    rng = _rng(2)
    x = jnp.asarray(rng.standard_normal((16, 3)) + 5, jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    state = _state(3)

    def loss_bn(x, s):
        return jnp.sum(w * normlib.batch_norm(x, state, s, training=True)[0])

    def loss_rn(x, s):
        return jnp.sum(w * normlib.batch_renorm(x, state, s, training=True, r_max=1.0,
                                                d_max=0.0)[0])

    bn, rn = jax.jit(lambda x, s: (jax.grad(loss_bn, (0, 1))(x, s),
                                   jax.grad(loss_rn, (0, 1))(x, s)))(x, jnp.ones(3))
    for a, b in zip(bn, rn):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_renorm_gradient_treats_r_and_d_as_constants():
    rng = _rng(3)
    x = jnp.asarray(rng.standard_normal((16, 3)) * 4 + 1, jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    state = _state(3)

    def by_hand(x):  # the paper's formula in plain jnp, r and d stopped
        mu, var = x.mean(0), x.var(0)
        sigma = jnp.sqrt(state.var + EPS)
        r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var + EPS) / sigma, 1 / 2.0, 2.0))
        d = jax.lax.stop_gradient(jnp.clip((mu - state.mean) / sigma, -0.5, 0.5))
        return jnp.sum(w * ((x - mu) / jnp.sqrt(var + EPS) * r + d))

    got, expected = jax.jit(lambda x: (
        jax.grad(lambda x: jnp.sum(w * normlib.batch_renorm(x, state, training=True, r_max=2.0,
                                                            d_max=0.5)[0]))(x),
        jax.grad(by_hand)(x)))(x)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)


def test_batch_renorm_rejects_bad_limits_and_evaluates_like_batch_norm():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match='r_max'):
        normlib.batch_renorm(x, _state(3), training=True, r_max=0.5, d_max=0.0)
    with pytest.raises(ValueError, match='d_max'):
        normlib.batch_renorm(x, _state(3), training=True, r_max=1.0, d_max=-1.0)
    x = jnp.asarray(_rng().standard_normal((5, 3)), jnp.float32)
    a, _ = normlib.batch_renorm(x, _state(3), training=False, r_max=3.0, d_max=5.0)
    b, _ = normlib.batch_norm(x, _state(3), training=False)
    np.testing.assert_array_equal(a, b)


def test_renorm_schedule():
    r, d = normlib.renorm_schedule(0)
    assert (float(r), float(d)) == (1.0, 0.0)
    r, d = normlib.renorm_schedule(5000 + 17500)
    np.testing.assert_allclose([float(r), float(d)], [2.0, 4.375], rtol=1e-6)
    r, d = jax.jit(normlib.renorm_schedule)(jnp.asarray(10 ** 6))
    assert (float(r), float(d)) == (3.0, 5.0)


# ------------------------------------------------------------------ ghost norm

def test_ghost_batch_norm_equals_per_chunk_batch_norm():
    rng = _rng(4)
    x = (rng.standard_normal((12, 3, 2, 4)) * 2 + 7).astype(np.float32)
    scale, bias = rng.random(4).astype(np.float32) + 0.5, rng.standard_normal(4).astype(np.float32)
    state = normlib.init_batch_norm(4)
    y, new = jax.jit(lambda x: normlib.batch_norm(x, state, scale, bias, training=True,
                                                  virtual_batch_size=4, momentum=0.5))(x)
    means, variances = [], []
    per_chunk = jax.jit(lambda part: normlib.batch_norm(part, state, scale, bias, training=True))
    for chunk in range(3):
        part = x[chunk * 4:(chunk + 1) * 4]
        y_ref, _ = per_chunk(part)
        np.testing.assert_allclose(y[chunk * 4:(chunk + 1) * 4], y_ref, rtol=1e-5, atol=1e-5)
        p64 = part.astype(np.float64).reshape(-1, 4)
        means.append(p64.mean(0))
        variances.append(p64.var(0))
    np.testing.assert_allclose(new.mean, 0.5 * np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(new.var, 0.5 + 0.5 * np.mean(variances, 0), rtol=1e-5)


def test_ghost_batch_norm_across_devices_averages_every_chunk():
    rng = _rng(5)
    x = (rng.standard_normal((8, 4, 3)) + 2).astype(np.float32)  # 8 devices x 4 examples
    _, new = jax.pmap(lambda x: normlib.batch_norm(
        x, normlib.init_batch_norm(3), training=True, momentum=0.0, virtual_batch_size=2,
        axis_name='i'), axis_name='i')(x)
    chunks = x.reshape(16, 2, 3).astype(np.float64)
    np.testing.assert_allclose(new.mean[5], chunks.mean(1).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var[0], chunks.var(1).mean(0), rtol=1e-5)


def test_ghost_batch_norm_bad_sizes():
    x = jnp.ones((6, 3))
    with pytest.raises(ValueError, match='virtual_batch_size=4'):
        normlib.batch_norm(x, normlib.init_batch_norm(3), training=True, virtual_batch_size=4)
    with pytest.raises(ValueError, match='virtual_batch_size'):
        normlib.batch_norm(x, normlib.init_batch_norm(6), training=True, axis=0,
                           virtual_batch_size=3)


# ---------------------------------------------------------- zero-debiased EMA

def test_zero_debiased_running_average():
    rng = _rng(6)
    m, state = 0.9, normlib.init_batch_norm(3)
    ema_mean, ema_var = np.zeros(3), np.zeros(3)
    step = jax.jit(lambda x, state: normlib.batch_norm(x, state, training=True, momentum=m,
                                                       zero_debias=True)[1])
    for t in range(1, 5):
        x = (rng.standard_normal((16, 3)) * t + 10).astype(np.float32)
        state = step(x, state)
        ema_mean = m * ema_mean + (1 - m) * x.astype(np.float64).mean(0)
        ema_var = m * ema_var + (1 - m) * x.astype(np.float64).var(0)
        np.testing.assert_allclose(state.mean, ema_mean / (1 - m ** t), rtol=1e-5)
        np.testing.assert_allclose(state.var, ema_var / (1 - m ** t), rtol=1e-5)


# -------------------------------------------------------------------- folding

def test_fold_into_dense_and_conv():
    rng = _rng(7)
    state = _state(5)
    scale = rng.random(5).astype(np.float32) + 0.5
    bn_bias = rng.standard_normal(5).astype(np.float32)
    kernel, bias = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(5).astype(
        np.float32)
    h = rng.standard_normal((10, 7)).astype(np.float32)
    k2, b2 = normlib.fold_batch_norm(kernel, bias, state, scale, bn_bias, epsilon=1e-3)
    x64 = h.astype(np.float64) @ kernel + bias
    expected = ((x64 - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var, np.float64) + 1e-3)
                * scale + bn_bias)
    np.testing.assert_allclose(h @ np.asarray(k2) + np.asarray(b2), expected, rtol=1e-5, atol=1e-5)

    conv_kernel = rng.standard_normal((3, 3, 2, 5)).astype(np.float32)
    images = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)

    def conv(k):
        return jax.lax.conv_general_dilated(images, k, (1, 1), 'SAME',
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    ref, _ = normlib.batch_norm(conv(conv_kernel), state, scale, bn_bias, training=False,
                                epsilon=1e-3)
    k3, b3 = normlib.fold_batch_norm(conv_kernel, None, state, scale, bn_bias, epsilon=1e-3)
    np.testing.assert_allclose(conv(k3) + b3, ref, rtol=1e-4, atol=1e-5)


def test_fold_checks_shapes():
    with pytest.raises(ValueError, match='scale'):
        normlib.fold_batch_norm(jnp.ones((3, 4)), None, normlib.init_batch_norm(4), jnp.ones(3),
                                epsilon=1e-5)
    with pytest.raises(ValueError, match='state.mean'):
        normlib.fold_batch_norm(jnp.ones((3, 4)), None, normlib.init_batch_norm(3), epsilon=1e-5)


# ------------------------------------------------------------ PyTorch interop

def test_torch_batch_norm_round_trip_and_outputs(torch):
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    state, scale, bias = torch_interop.from_torch(layer.state_dict())
    momentum = torch_interop.momentum_from_torch(layer.momentum)
    for _ in range(3):  # train both side by side
        batch = torch.randn(8, 5, 4, 4) * 2 + 3
        layer.train()
        layer(batch)
        _, state = normlib.batch_norm(jnp.asarray(batch.numpy()), state, scale, bias,
                                      training=True, axis=1, momentum=momentum,
                                      unbiased_running_var=True)
    np.testing.assert_allclose(state.mean, layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, layer.running_var.numpy(), rtol=1e-5)
    assert int(state.count) == int(layer.num_batches_tracked)

    layer.eval()
    x = torch.randn(4, 5, 3, 3) * 2 + 3
    y, _ = normlib.batch_norm(jnp.asarray(x.numpy()), state, scale, bias, training=False, axis=1)
    np.testing.assert_allclose(y, layer(x).detach().numpy(), rtol=1e-5, atol=1e-5)

    # torch -> normlib -> torch is bit-for-bit.
    back = torch.nn.BatchNorm2d(5)
    round_trip = torch_interop.to_torch(*torch_interop.from_torch(layer.state_dict()))
    back.load_state_dict({k: torch.from_numpy(v) for k, v in round_trip.items()})
    for key, value in layer.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_from_torch_with_prefix_and_missing_keys():
    sd = {'bn.running_mean': np.zeros(2), 'bn.running_var': np.ones(2)}
    state, scale, bias = torch_interop.from_torch(sd, prefix='bn.')
    assert scale is None and bias is None and int(state.count) == 0
    with pytest.raises(ValueError, match='running_mean'):
        torch_interop.from_torch(sd)


# ----------------------------------------------------------- L1 batch norm

def test_l1_batch_norm_matches_the_formula_on_offset_data():
    rng = _rng(8)
    x = (rng.standard_normal((64, 2, 3)) * 2 + 1e4).astype(np.float32)
    mask = rng.random((64, 1, 1)) > 0.3
    scale, bias = rng.random(3).astype(np.float32) + 0.5, rng.standard_normal(3).astype(np.float32)
    y, state = jax.jit(lambda x: normlib.l1_batch_norm(
        x, normlib.init_batch_norm(3), scale, bias, training=True, momentum=0.0, mask=mask))(x)
    valid = x[np.broadcast_to(mask, x.shape)].reshape(-1, 3).astype(np.float64)
    mu = valid.mean(0)
    s = np.sqrt(np.pi / 2) * np.abs(valid - mu).mean(0)
    expected = (x.astype(np.float64) - mu) / np.sqrt(s ** 2 + EPS) * scale + bias
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=2e-3)  # x itself is rounded at 1e4
    np.testing.assert_allclose(state.mean, mu, rtol=1e-6)
    np.testing.assert_allclose(state.var, s ** 2, rtol=1e-3)
    y_eval, _ = normlib.l1_batch_norm(x, state, scale, bias, training=False)
    b_eval, _ = normlib.batch_norm(x, state, scale, bias, training=False)
    np.testing.assert_array_equal(y_eval, b_eval)


def test_l1_batch_norm_gradients_and_devices():
    rng = _rng(9)
    x = (rng.standard_normal((8, 6, 3)) + 3).astype(np.float32)
    w = rng.standard_normal((8, 6, 3)).astype(np.float32)

    def single(x):
        return jnp.sum(w.reshape(-1, 3) * normlib.l1_batch_norm(
            x.reshape(-1, 3), normlib.init_batch_norm(3), training=True)[0])

    def mapped(x):
        return jnp.sum(w * jax.pmap(lambda x: normlib.l1_batch_norm(
            x, normlib.init_batch_norm(3), training=True, axis_name='i')[0], axis_name='i')(x))

    np.testing.assert_allclose(jax.grad(mapped)(x), jax.jit(jax.grad(single))(x), rtol=1e-4,
                               atol=1e-5)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x[:2], jnp.float64)
        jax.test_util.check_grads(
            jax.jit(lambda x: jnp.sum(jnp.sin(normlib.l1_batch_norm(
                x, normlib.init_batch_norm(3, jnp.float64), training=True)[0]))),
            (x64,), order=2, modes=['rev'])


def test_fold_a_whole_linen_model():
    from flax import linen as nn

    from normlib import linen as norm

    class Net(nn.Module):
        fold: bool = False

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (3, 3), use_bias=self.fold, name='conv')(x)
            if not self.fold:
                x = norm.BatchNorm(use_running_average=True, name='bn')(x)
            x = nn.relu(x).mean((1, 2))
            x = nn.Dense(4, name='dense')(x)
            if not self.fold:
                x = norm.BatchNorm(use_running_average=True, name='bn2')(x)
            return x

    rng = _rng(10)
    x = jnp.asarray(rng.standard_normal((3, 5, 5, 2)), jnp.float32)
    variables = Net().init(jax.random.key(0), x)
    # Non-trivial statistics and affine parameters.
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.random(v.shape), v.dtype), variables)
    folded = norm.fold_batch_norms(variables, {'conv': 'bn', 'dense': 'bn2'})
    assert set(folded['params']) == {'conv', 'dense'} and folded['batch_stats'] == {}
    np.testing.assert_allclose(Net(fold=True).apply(folded, x), Net().apply(variables, x),
                               rtol=1e-5, atol=1e-5)
