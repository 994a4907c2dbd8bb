"""examples/ln_rnn.py: the LSTM cells are right and the default run says what the README says."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
sys.path.insert(0, str(EXAMPLES))

import _data  # noqa: E402
import ln_rnn  # noqa: E402

KINDS = ('none', 'layer_norm', 'batch_norm')


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def layer_norm64(z, gain, bias, epsilon=ln_rnn.LN_EPSILON):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + epsilon) * gain + bias


def random_params(kind, hidden=5, inputs=3, seed=0):
    """Initial params with every gain and bias moved off its initial value."""
    params = ln_rnn.init_params(jax.random.key(seed), inputs, hidden, 10, kind)
    rng = np.random.default_rng(seed)
    for name in params:
        if 'scale' in name or 'bias' in name or name == 'b':
            params[name] = params[name] + jnp.asarray(
                rng.normal(0, 0.5, params[name].shape), jnp.float32)
    return params


def test_ln_lstm_step_matches_a_float64_formula():
    # Ba et al., eqs. 20-22: LN of W_x x and of W_h h apart, then the gates,
    # then h = sigmoid(o) * tanh(LN(c)).
    hidden, inputs, batch = 5, 3, 4
    params = random_params('layer_norm', hidden, inputs)
    rng = np.random.default_rng(1)
    x, h, c = (rng.normal(size=(batch, n)).astype(np.float32)
               for n in (inputs, hidden, hidden))
    h_new, c_new = ln_rnn.ln_lstm_step(params, x, h, c)

    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x, h, c = (a.astype(np.float64) for a in (x, h, c))
    gates = (layer_norm64(x @ p['w_x'], p['ln_x_scale'], p['ln_x_bias'])
             + layer_norm64(h @ p['w_h'], p['ln_h_scale'], p['ln_h_bias']))
    i, f, o, g = (gates[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c_expected = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_expected = sigmoid(o) * np.tanh(layer_norm64(c_expected, p['ln_c_scale'],
                                                   p['ln_c_bias']))
    np.testing.assert_allclose(c_new, c_expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_new, h_expected, rtol=1e-5, atol=1e-6)
    # The same step through the generic cell used by the scan.
    h_scan, c_scan, _ = ln_rnn.lstm_step('layer_norm', params, x.astype(np.float32),
                                         h.astype(np.float32), c.astype(np.float32), (),
                                         training=True)
    np.testing.assert_array_equal(h_scan, h_new)
    np.testing.assert_array_equal(c_scan, c_new)


def test_bn_lstm_keeps_statistics_per_time_step():
    # Cooijmans et al.: each step normalizes with its own batch statistics in
    # training (and updates its own running statistics); gains start at 0.1.
    hidden, inputs, batch, steps, momentum = 4, 3, 16, 5, 0.9
    params = ln_rnn.init_params(jax.random.key(0), inputs, hidden, 10, 'batch_norm')
    assert np.all(np.asarray(params['bn_x_scale']) == ln_rnn.BN_GAIN_INIT)
    states = ln_rnn.init_bn_states('batch_norm', steps, hidden)
    assert states['x'].mean.shape == (steps, 4 * hidden)
    assert states['c'].var.shape == (steps, hidden)
    # Inputs whose scale grows along time, so that each step's moments differ.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(batch, steps, inputs)) * (1 + np.arange(steps))[:, None]
         ).astype(np.float32)
    logits, new = ln_rnn.forward('batch_norm', params, states, jnp.asarray(x), training=True,
                                 momentum=momentum)
    assert logits.shape == (batch, 10)
    np.testing.assert_array_equal(new['x'].count, np.ones(steps))
    # Running mean of W_x x_t at step t: (1 - momentum) * batch mean, per step.
    zx = np.einsum('bti,ig->tbg', x.astype(np.float64), np.asarray(params['w_x'], np.float64))
    np.testing.assert_allclose(new['x'].mean, (1 - momentum) * zx.mean(1), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(new['x'].var, momentum + (1 - momentum) * zx.var(1), rtol=1e-4)
    # h_0 = 0: the first step's W_h h term has zero variance.
    np.testing.assert_allclose(new['h'].var[0], momentum, rtol=1e-6)
    assert np.all(np.asarray(new['h'].var[1]) != momentum)
    # Evaluation mode reads the running statistics and changes nothing.
    logits_eval, same = ln_rnn.forward('batch_norm', params, new, jnp.asarray(x), training=False)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(logits_eval, logits)


def test_plain_lstm_step_matches_a_float64_formula():
    hidden, inputs = 5, 3
    params = random_params('none', hidden, inputs)
    rng = np.random.default_rng(2)
    x, h, c = (rng.normal(size=(2, n)).astype(np.float32) for n in (inputs, hidden, hidden))
    h_new, c_new, _ = ln_rnn.lstm_step('none', params, x, h, c, (), training=True)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    gates = x.astype(np.float64) @ p['w_x'] + h.astype(np.float64) @ p['w_h'] + p['b']
    i, f, o, g = (gates[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c_expected = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    np.testing.assert_allclose(c_new, c_expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_new, sigmoid(o) * np.tanh(c_expected), rtol=1e-5, atol=1e-6)


def test_sequences():
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    rows = ln_rnn.sequences(x, (8, 8), 'rows', permute=False)
    np.testing.assert_array_equal(rows[1, 2], x[1, 16:24])
    pixels = ln_rnn.sequences(x, (8, 8), 'pixels', permute=False)
    assert pixels.shape == (2, 64, 1) and pixels[0, 9, 0] == 9
    permuted = ln_rnn.sequences(x, (8, 8), 'pixels', permute=True)
    np.testing.assert_array_equal(np.sort(permuted[0, :, 0]), x[0])
    assert not np.array_equal(permuted[0, :, 0], x[0])
    np.testing.assert_array_equal(permuted, ln_rnn.sequences(x, (8, 8), 'pixels', permute=True))


def loss_at(result, step):
    return result['train_loss'][result['train_loss_step'].index(step)]


@pytest.mark.long
def test_ln_rnn_default_run(tmp_path):
    """The default settings, as users run them, and the README's numbers."""
    metrics = ln_rnn.main(['--out', str(tmp_path)])
    png = tmp_path / 'ln_rnn.png'
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved['config']['steps'] == 1000 and saved['config']['hidden'] == 128
    for name in KINDS:
        r = saved[name]
        assert r == json.loads(json.dumps(metrics[name]))
        assert r['step'] == list(range(0, 1001, 20))
        assert r['train_loss_step'] == list(range(20, 1001, 20))
        assert len(r['accuracy']) == len(r['step']) and len(r['train_loss']) == 50
        assert np.isfinite(r['test_accuracy']) and r['test_accuracy'] == r['accuracy'][-1]
        loss = np.asarray(r['train_loss'])
        assert np.all(np.isfinite(loss))
        # Decreasing on the whole: each fifth of training below the one before.
        fifths = loss.reshape(5, 10).mean(1)
        assert np.all(np.diff(fifths) < 0), (name, fifths)
        assert loss[-1] < 0.01 * loss[0], name
        # README: every net ends far above chance (10%).
        assert r['test_accuracy'] > 0.95, name
    none, ln, bn = (metrics[k] for k in KINDS)
    # README: the LN-LSTM's training loss falls fastest (0.047 at step 200,
    # against 0.18 plain and 0.40 BN): 2x below the others' at step 100, 4x
    # to 11x from step 200 to the end. It reaches 90% held-out accuracy first
    # (step 80, against 120 and 140).
    assert loss_at(ln, 100) < 0.6 * min(loss_at(none, 100), loss_at(bn, 100))
    for step in range(200, 1001, 20):
        assert loss_at(ln, step) < 0.3 * min(loss_at(none, step), loss_at(bn, step)), step
    assert ln_rnn.steps_to(ln, 0.9) < min(ln_rnn.steps_to(none, 0.9), ln_rnn.steps_to(bn, 0.9))
    # README: the BN-LSTM (gains 0.1) starts slowest in training loss.
    assert loss_at(bn, 100) > 2 * loss_at(none, 100)
    # README: no generalization gain from LN at this scale; the three end
    # within 2 points of each other (98.0%, 97.0% and 98.75% on this seed).
    accuracies = [r['test_accuracy'] for r in (none, ln, bn)]
    assert max(accuracies) - min(accuracies) < 0.025
    np.testing.assert_allclose(accuracies, [0.98, 0.97, 0.9875], atol=0.0076)
    # README: evaluating with the per-step running statistics matches
    # normalizing the held-out set with its own statistics at the end.
    assert abs(bn['test_accuracy'] - bn['accuracy_batch_stats'][-1]) < 0.01


def test_ln_rnn_training_is_deterministic():
    # Same seed, same curves and running statistics: the default-run test
    # relies on it.
    images = _data.load_digits()
    data = images._replace(x_train=ln_rnn.sequences(images.x_train, (8, 8), 'rows', False),
                           x_test=ln_rnn.sequences(images.x_test, (8, 8), 'rows', False))

    def run(seed):
        return ln_rnn.train('batch_norm', data, hidden=16, lr=1e-3, steps=20, eval_every=10,
                            seed=seed, progress=False)

    first, again = run(0), run(0)
    assert first == again and first['step'] == [0, 10, 20]
