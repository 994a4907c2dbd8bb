"""Training with optax, checkpoints and weight_decay_mask, in Linen and NNX."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, serialization

from normlib import linen as nl
from normlib import nnx as nx
from normlib._weight_decay import weight_decay_mask

STEPS = 8


def _data(n=32, seed=0):
    """Small images whose class is which half is brighter; NumPy-made."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    images[:, :3] += np.where(labels == 1, 1.0, -1.0)[:, None, None, None]
    return images, labels.astype(np.int32)


class CNN(nn.Module):
    """Conv, BatchNorm, pooling, LayerNorm, Dense: the norm layers are fields
    so the same model runs with Flax's modules or normlib's."""
    batch_norm: type = nl.BatchNorm
    layer_norm: type = nl.LayerNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(self.batch_norm(use_running_average=not train)(x))
        x = self.layer_norm()(x.mean((1, 2)))
        return nn.Dense(2)(x)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_linen(model, variables, tx, images, labels):
    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                          train=True, mutable=['batch_stats'])
            return _loss(logits, labels), updates['batch_stats']

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    losses = []
    for _ in range(STEPS):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    return {'params': params, 'batch_stats': batch_stats}, losses


@pytest.fixture(scope='module')
def linen_trained():
    """normlib's CNN trained for a few steps: ``(model, variables, losses)``."""
    images, labels = _data()
    model = CNN()
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    tx = optax.adamw(0.05, weight_decay=1e-2, mask=weight_decay_mask(variables['params']))
    trained, losses = _train_linen(model, variables, tx, images, labels)
    return model, trained, losses


def test_linen_cnn_trains(linen_trained):
    _, trained, losses = linen_trained
    assert losses[-1] < 0.7 * losses[0], losses
    stats = trained['batch_stats']['BatchNorm_0']
    assert not np.allclose(stats['mean'], 0) and not np.allclose(stats['var'], 1)


def test_checkpoints_move_between_flax_and_normlib(linen_trained):
    """The same model on Flax's modules reads the checkpoint unchanged and
    predicts as normlib's does (Flax with two-pass statistics)."""
    model, trained, _ = linen_trained
    images, _ = _data()
    flax_model = CNN(functools.partial(nn.BatchNorm, use_fast_variance=False),
                     functools.partial(nn.LayerNorm, use_fast_variance=False))
    template = jax.eval_shape(functools.partial(flax_model.init, train=False),
                              jax.random.key(0), images)
    restored = serialization.from_bytes(template, serialization.to_bytes(trained))
    chex.assert_trees_all_equal(restored, trained)
    predict = jax.jit(lambda m, v: m.apply(v, images, train=False), static_argnums=0)
    np.testing.assert_allclose(predict(flax_model, restored), predict(model, trained),
                               rtol=2e-5, atol=2e-5)


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nx.BatchNorm(4, rngs=rngs)
        self.ln = nx.LayerNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.out(self.ln(x.mean((1, 2))))


def test_nnx_cnn_trains():
    images, labels = _data()
    model = NNXCNN(nnx.Rngs(0))
    tx = optax.adamw(0.05, weight_decay=1e-2, mask=weight_decay_mask(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(images), labels))(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not np.allclose(model.bn.mean[...], 0) and not np.allclose(model.bn.var[...], 1)
    model.eval()
    frozen = nnx.clone(nnx.state(model, nnx.BatchStat))
    nnx.jit(lambda m: m(images))(model)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                                nnx.to_pure_dict(frozen))


@pytest.fixture(scope='module')
def linen_variables(linen_trained):
    """Trained variables of every kind, with a momentum=None layer's count."""
    x, _ = _data(8)
    bn = nl.BatchNorm(use_running_average=False, momentum=None)
    counted = jax.jit(lambda x: bn.apply(bn.init(jax.random.key(0), x), x,
                                         mutable=['batch_stats'])[1])(x.reshape(8, -1))
    assert counted['batch_stats']['count'].tolist() == [1] * x.reshape(8, -1).shape[1]
    return {'cnn': linen_trained[1], 'counted': counted}


def test_linen_msgpack_round_trip_is_bit_exact(linen_variables):
    variables = linen_variables
    template = jax.tree.map(np.zeros_like, variables)
    restored = serialization.from_bytes(template, serialization.to_bytes(variables))
    chex.assert_trees_all_equal(restored, variables, strict=True)


def test_linen_orbax_round_trip_is_bit_exact(linen_variables, tmp_path):
    ocp = pytest.importorskip('orbax.checkpoint')
    variables = linen_variables
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / 'ckpt', variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / 'ckpt', jax.tree.map(np.zeros_like, variables))
    chex.assert_trees_all_equal(restored, variables)
    assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, variables)


def test_nnx_msgpack_round_trip_is_bit_exact():
    images, labels = _data(8)
    model = NNXCNN(nnx.Rngs(0))
    nnx.jit(lambda m: m(images))(model)
    state = nnx.to_pure_dict(nnx.state(model))
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, state))

    fresh = NNXCNN(nnx.Rngs(1))
    fresh_state = nnx.state(fresh)
    nnx.replace_by_pure_dict(fresh_state, serialization.msgpack_restore(blob))
    nnx.update(fresh, fresh_state)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(fresh)), state)


def _decayed(tx, params):
    """What ``tx`` does to ``params`` given zero gradients."""
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return updates


def test_weight_decay_mask_linen_names():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3)(x)
            x = nl.BatchNorm(use_running_average=True)(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nl.RMSNorm()(nn.LayerNorm(name='ln_f')(x))
            return nn.GroupNorm(num_groups=1)(x[:, None])

    params = jax.eval_shape(Model().init, jax.random.key(0), np.ones((2, 3), np.float32))
    params = jax.tree.map(lambda s: np.full(s.shape, 2.0, s.dtype), params['params'])
    mask = weight_decay_mask(params, norm_names=['ln_f'])
    assert mask['Dense_0'] == {'kernel': True, 'bias': True}
    for norm in ('BatchNorm_0', 'BatchNorm_1', 'ln_f', 'RMSNorm_0', 'GroupNorm_0'):
        assert not any(jax.tree.leaves(mask[norm])), norm
    assert weight_decay_mask(params)['ln_f'] == {'scale': True, 'bias': True}

    updates = _decayed(optax.add_decayed_weights(0.5, mask=mask), params)
    np.testing.assert_array_equal(updates['Dense_0']['kernel'], 1.0)
    np.testing.assert_array_equal(updates['BatchNorm_1']['scale'], 0.0)


def test_weight_decay_mask_nnx_types():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.ours = nx.GroupNorm(3, num_groups=1, rngs=rngs)
            self.theirs = nnx.LayerNorm(3, rngs=rngs)
            self.blocks = nnx.List([nx.RMSNorm(3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs)])

    model = Model(nnx.Rngs(0))
    mask = nnx.to_pure_dict(weight_decay_mask(model))
    assert mask['linear'] == {'kernel': True, 'bias': True}
    assert not any(jax.tree.leaves([mask['ours'], mask['theirs'], mask['blocks']]))

    before = nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(
        model, optax.adamw(0.1, weight_decay=0.5, mask=weight_decay_mask(model)), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    chex.assert_trees_all_equal(after['theirs'], before['theirs'])
    chex.assert_trees_all_equal(after['blocks'], before['blocks'])
    np.testing.assert_allclose(after['linear']['kernel'], before['linear']['kernel'] * 0.95,
                               rtol=1e-6)
