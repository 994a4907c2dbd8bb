"""Bad input: a TypeError or ValueError naming the argument and what it got, also under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normlib as nl

X = np.ones((8, 4), np.float32)
IMAGES = np.ones((2, 3, 3, 8), np.float32)
STATE = nl.init_batch_norm(4)


def _bn(state=STATE, scale=None, bias=None, training=True, **kwargs):
    return lambda x: nl.batch_norm(x, state, scale, bias, training=training, **kwargs)


# (id, function of x, x, exception, regex naming the argument and the offending value)
CASES = [
    ('bn_int_x', _bn(), X.astype(np.int32), TypeError, r'x must .*floating.*int32'),
    ('bn_bool_x', _bn(), X > 0, TypeError, r'x must .*floating.*bool'),
    ('ln_int_x', nl.layer_norm, X.astype(np.int32), TypeError, r'x must .*floating.*int32'),
    ('rms_bool_x', nl.rms_norm, X > 0, TypeError, r'x must .*floating.*bool'),
    ('gn_int_x', lambda x: nl.group_norm(x, num_groups=2), IMAGES.astype(np.int8), TypeError,
     r'x must .*floating.*int8'),
    ('in_int_x', nl.instance_norm, IMAGES.astype(np.int32), TypeError, r'x must .*floating.*int32'),
    ('lp_int_x', nl.lp_normalize, X.astype(np.int32), TypeError, r'x must .*floating.*int32'),

    ('bn_axis_range', _bn(axis=2, state=nl.init_batch_norm(8)), X, ValueError, r'axis=2 .*range'),
    ('bn_axis_repeated', _bn(axis=(1, -1)), X, ValueError, r'axis=\(1, -1\) repeats'),
    ('ln_axis_range', lambda x: nl.layer_norm(x, axis=-3), X, ValueError, r'axis=-3 .*range'),
    ('ln_axis_repeated', lambda x: nl.layer_norm(x, axis=(0, 0)), X, ValueError,
     r'axis=\(0, 0\) repeats'),
    ('rms_axis_range', lambda x: nl.rms_norm(x, axis=5), X, ValueError, r'axis=5 .*range'),
    ('lp_axis_range', lambda x: nl.lp_normalize(x, axis=2), X, ValueError, r'axis=2 .*range'),
    ('lp_axis_repeated', lambda x: nl.lp_normalize(x, axis=(1, 1)), X, ValueError,
     r'axis=\(1, 1\) repeats'),

    ('bn_state_mean', _bn(state=nl.init_batch_norm(3)), X, ValueError,
     r'state\.mean has shape \(3,\).*\(4,\)'),
    ('bn_state_var', _bn(state=STATE._replace(var=jnp.ones(5))), X, ValueError,
     r'state\.var has shape \(5,\).*\(4,\)'),
    ('bn_state_nchw', _bn(axis=1), IMAGES, ValueError, r'state\.mean has shape \(4,\).*\(3,\)'),
    ('bn_state_type', _bn(state=(jnp.zeros(4), jnp.ones(4))), X, TypeError, r'state must be'),
    ('bn_scale', _bn(scale=jnp.ones(3)), X, ValueError, r'scale has shape \(3,\).*\(4,\)'),
    ('bn_bias', _bn(bias=jnp.ones((4, 1))), X, ValueError, r'bias has shape \(4, 1\).*\(4,\)'),
    ('ln_scale', lambda x: nl.layer_norm(x, jnp.ones(8)), X, ValueError,
     r'scale has shape \(8,\).*\(4,\)'),
    ('ln_bias', lambda x: nl.layer_norm(x, None, jnp.ones(4), axis=(0, 1)), X, ValueError,
     r'bias has shape \(4,\).*\(8, 4\)'),
    ('rms_scale', lambda x: nl.rms_norm(x, jnp.ones(5)), X, ValueError, r'scale has shape \(5,\)'),
    ('gn_scale', lambda x: nl.group_norm(x, jnp.ones(3), num_groups=2), IMAGES, ValueError,
     r'scale has shape \(3,\).*\(8,\)'),
    ('in_bias', lambda x: nl.instance_norm(x, None, jnp.ones(4)), IMAGES, ValueError,
     r'bias has shape \(4,\).*\(8,\)'),

    ('bn_eps_zero', _bn(epsilon=0.0), X, ValueError, r'epsilon must be > 0, got 0'),
    ('bn_eps_negative', _bn(epsilon=-1e-5, training=False), X, ValueError, r'epsilon .*-1e-05'),
    ('ln_eps', lambda x: nl.layer_norm(x, epsilon=0), X, ValueError, r'epsilon .*got 0'),
    ('rms_eps', lambda x: nl.rms_norm(x, epsilon=-1.0), X, ValueError, r'epsilon .*-1\.0'),
    ('gn_eps', lambda x: nl.group_norm(x, num_groups=2, epsilon=0.0), IMAGES, ValueError,
     r'epsilon .*got 0'),
    ('in_eps', lambda x: nl.instance_norm(x, epsilon=-2.0), IMAGES, ValueError, r'epsilon .*-2'),
    ('lp_eps', lambda x: nl.lp_normalize(x, epsilon=0.0), X, ValueError, r'epsilon .*got 0'),

    ('momentum_negative', _bn(momentum=-0.1), X, ValueError, r'momentum .*\[0, 1\].*-0\.1'),
    ('momentum_above_one', _bn(momentum=1.5), X, ValueError, r'momentum .*\[0, 1\].*1\.5'),

    ('bn_mask', _bn(mask=np.ones(3, bool)), X, ValueError, r'mask has shape \(3,\).*\(8, 4\)'),
    ('bn_mask_rank', _bn(mask=np.ones((2, 8, 4), bool)), X, ValueError,
     r'mask has shape \(2, 8, 4\)'),
    ('ln_mask', lambda x: nl.layer_norm(x, mask=np.ones((8, 2), bool)), X, ValueError,
     r'mask has shape \(8, 2\).*\(8, 4\)'),
    ('rms_mask', lambda x: nl.rms_norm(x, mask=np.ones((4, 8), bool)), X, ValueError,
     r'mask has shape \(4, 8\)'),

    ('groups_zero', lambda x: nl.group_norm(x, num_groups=0), IMAGES, ValueError, r'num_groups=0'),
    ('groups_negative', lambda x: nl.group_norm(x, num_groups=-2), IMAGES, ValueError,
     r'num_groups=-2'),
    ('groups_not_dividing', lambda x: nl.group_norm(x, num_groups=3), IMAGES, ValueError,
     r'num_groups=3 .*divide.*8'),

    ('p_zero', lambda x: nl.lp_normalize(x, 0.0), X, ValueError, r'p must be > 0, got 0'),
    ('p_negative', lambda x: nl.lp_normalize(x, -2), X, ValueError, r'p must be > 0, got -2'),
]


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
@pytest.mark.parametrize('function, x, error, match', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_named(function, x, error, match, jit):
    call = jax.jit(function) if jit else function
    with pytest.raises(error, match=match):
        call(x)


def test_checks_run_while_tracing():
    """Under jit the error comes from tracing: nothing is compiled or run."""
    traced = []

    def function(x):
        traced.append(x)
        return nl.layer_norm(x, epsilon=0.0)

    lowered = jax.jit(function)
    with pytest.raises(ValueError, match='epsilon'):
        lowered.trace(X)
    assert len(traced) == 1 and isinstance(traced[0], jax.core.Tracer)


def test_good_input_passes_the_same_checks():
    """The bad cases above differ from working calls only in the named argument."""
    y, state = jax.eval_shape(lambda x: nl.batch_norm(
        x, STATE, jnp.ones(4), jnp.zeros(4), training=True, momentum=0.0,
        mask=np.ones((8, 1), bool)), X)
    assert y.shape == X.shape and state.mean.shape == (4,)
    assert jax.eval_shape(lambda x: nl.group_norm(x, jnp.ones(8), num_groups=4),
                          IMAGES).shape == IMAGES.shape
    assert jax.eval_shape(lambda x: nl.lp_normalize(x, 0.5, axis=(0, 1)), X).shape == X.shape
