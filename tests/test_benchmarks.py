"""The benchmark harness runs end to end in smoke mode (no timing assertions)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_smoke_run_writes_results(tmp_path):
    env = {**os.environ,
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    env['XLA_FLAGS'] = ''  # one CPU device, as a user runs it
    run = subprocess.run([sys.executable, '-m', 'benchmarks', '--smoke', '--out', str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    ops = {(c['op'], c['mode'], c['dtype']) for c in results['cases']}
    assert ('batch_norm', 'fwd+bwd', 'float32') in ops
    assert ('layer_norm', 'fwd+bwd', 'float32') in ops
    for case in results['cases']:
        assert case['times']['normlib'] > 0 and min(case['copy'].values()) > 0
    assert set(results['memory']['temp']) == {'normlib', 'flax', 'flax two-pass'}
    assert results['stability']['normlib']
    report = (tmp_path / 'RESULTS.md').read_text()
    for heading in ('## Targets', '## Timings (ms)', '## Profile', '## Training-step memory',
                    '## Stability', '## GPU'):
        assert heading in report
    assert 'Smoke run' in report and 'not measurements' in report
    assert 'within one read of floor?' in report
    assert (tmp_path / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_smoke_run_leaves_the_recorded_results_alone(tmp_path):
    from benchmarks import __main__ as cli
    recorded = {p: p.read_bytes() for p in (ROOT / 'benchmarks').glob('results.*')}
    report = ROOT / 'benchmarks' / 'RESULTS.md'
    recorded[report] = report.read_bytes()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:  # only the report of a recorded run: the default folder is what is checked
        cli.main(['--smoke', '--report', str(ROOT / 'benchmarks' / 'results.json')])
    finally:
        os.chdir(old)
    assert (tmp_path / 'out' / 'benchmarks-smoke' / 'RESULTS.md').exists()
    for path, content in recorded.items():
        assert path.read_bytes() == content, path


def test_report_takes_the_memory_efficient_section():
    from benchmarks import _report
    results = json.loads((ROOT / 'benchmarks' / 'results.json').read_text())
    section = (ROOT / 'benchmarks' / 'memory_efficient.md').read_text()
    report = _report.markdown(results, memory_efficient=section)
    assert '\n## memory_efficient=True in a training step' in report
    assert 'temp bytes' in report and 'temp bytes' not in _report.markdown(results)


def _fake_gpu_run(device, copy_tbs, normlib_s, flax_s):
    """A GPU run's results with one large layer_norm fwd+bwd case (8192x4096 float32)."""
    from benchmarks import _gpu
    peak, name = _gpu.peak(device)
    case = {'name': 'layer_norm fwd+bwd 8192x4096 float32', 'op': 'layer_norm',
            'shape': [8192, 4096], 'dtype': 'float32', 'mode': 'fwd+bwd',
            'nbytes': 8192 * 4096 * 4, 'floor_arrays': 5, 'large': True,
            'repeats': {'normlib': 100, 'flax': 100},
            'times': {'normlib': normlib_s, 'flax': flax_s}, 'errors': {}}
    return {'gpu_run': True, 'date': '2026-01-01 00:00', 'smoke': False,
            'machine': {'device': device, 'backend': 'gpu'}, 'versions': {'jax': '0'},
            'peak_tbs': peak, 'peak_name': name, 'budget_s': 270, 'rounds': 5,
            'copy': {'mib': 256, 'repeats': 100, 'body_read': 1.0, 'body_written': 1.0,
                     'tbs': {'device loop': copy_tbs}},
            'cases': [case], 'skipped': []}


@pytest.mark.parametrize('device, peak', [
    ('NVIDIA H100 80GB HBM3', 3.35), ('NVIDIA H100 PCIe', 2.0), ('NVIDIA H100 NVL', 3.9),
    ('NVIDIA H200', 4.8), ('NVIDIA GH200 480GB', 4.0), ('NVIDIA A100-SXM4-40GB', 1.555),
    ('NVIDIA A100-SXM4-80GB', 2.039), ('NVIDIA L4', 0.3), ('NVIDIA L40S', 0.864),
    ('Tesla T4', 0.32), ('cpu', None), ('TFRT_CPU_0', None)])
def test_peak_bandwidth_by_device_name(device, peak):
    from benchmarks import _gpu
    assert _gpu.peak(device)[0] == peak


def test_gpu_bandwidth_arithmetic():
    from benchmarks import _report
    # 5 arrays of 128 MiB in 0.25 ms: 2.684 TB/s, 80.1% of an H100 SXM's 3.35 TB/s.
    results = _fake_gpu_run('NVIDIA H100 80GB HBM3', 3.0, 0.25e-3, 0.3e-3)
    (row,) = _report.gpu_rows(results)
    assert row['libs']['normlib']['tbs'] == pytest.approx(2.68435456)
    assert row['libs']['normlib']['of_peak'] == pytest.approx(2.68435456 / 3.35)
    assert row['libs']['flax']['tbs'] == pytest.approx(2.68435456 / 1.2)
    assert row['vs_flax'] == pytest.approx(0.25 / 0.3)
    verdicts = [verdict for *_, verdict in _report.gpu_targets(results)]
    assert verdicts == ['met', 'met']
    assert _report.copy_check(results) == (pytest.approx(3.0 / 3.35), None)
    report = _report.gpu_markdown(results)
    assert '| layer_norm fwd+bwd 8192x4096 float32 (large) | 0.25 | 2.68 | 80% | 2.24 | 67% |' \
           ' 0.83x |' in report
    assert 'peak memory bandwidth 3.35 TB/s (H100 SXM' in report
    assert 'not measuring the hardware' not in report
    # Slower than Flax and under 80% of the peak; a copy at a quarter of the peak.
    slow = _fake_gpu_run('NVIDIA H100 80GB HBM3', 0.785, 0.4e-3, 0.3e-3)
    assert [verdict for *_, verdict in _report.gpu_targets(slow)] == ['missed', 'missed by 33%']
    fraction, warning = _report.copy_check(slow)
    assert fraction == pytest.approx(0.785 / 3.35)
    assert warning.startswith('**') and 'the harness is not measuring the hardware' in warning
    assert warning in _report.gpu_markdown(slow)
    # An unknown device: no peak, shown as '-'.
    unknown = _fake_gpu_run('Some Accelerator', 3.0, 0.25e-3, 0.3e-3)
    (row,) = _report.gpu_rows(unknown)
    assert row['libs']['normlib']['of_peak'] is None
    assert '| 0.25 | 2.68 | - | 2.24 | - | 0.83x |' in _report.gpu_markdown(unknown)
    assert [verdict for *_, verdict in _report.gpu_targets(unknown)] == ['n/a', 'met']


def test_profile_floor_of_reads():
    from benchmarks import _report
    assert _report.floor_reads({'mode': 'fwd+bwd'}) == 3
    assert _report.floor_reads({'mode': 'fwd'}) == 1
    assert _report.within_one_read({'read': 4.0}, 3)
    assert not _report.within_one_read({'read': 4.2}, 3)


_WRAPPED_LOOP = """
%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %add_fusion = f32[1024]{0} fusion(%x), kind=kLoop, calls=%fused
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %add_fusion)
}

%loop_computation (t0: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %t0 = (s32[], f32[1024]{0}) parameter(0)
  ROOT %while.0 = (s32[], f32[1024]{0}) while(%t0), condition=%cond, body=%body
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %c = s32[] constant(0)
  %tuple = (s32[], f32[1024]{0}) tuple(%c, %a)
  %call = (s32[], f32[1024]{0}) call(%tuple), to_apply=%loop_computation
  ROOT %r = f32[1024]{0} get-tuple-element(%call), index=1
}
"""


def test_loop_body_found_inside_a_call():
    """Newer XLA:CPU wraps a while loop in a ``call``: the copy check finds its
    body there and counts the body's one read and one write of the array."""
    from benchmarks import _hlo
    body = _hlo.loop_body_traffic(_WRAPPED_LOOP)
    assert sum(t['read'] for t in body) == 4096
    assert sum(t['written'] for t in body) == 4096
    with pytest.raises(ValueError, match='no while loop'):
        _hlo.loop_body_traffic(_WRAPPED_LOOP.replace('while(', 'tuple('))


def test_loop_runner_repeats_the_case():
    """The device loop feeds each output to the next call: two forward calls of
    layer_norm in the loop are layer_norm applied twice."""
    import jax
    import numpy as np

    import normlib
    from benchmarks import _cases
    case = _cases.Case('layer_norm', (8, 16), mode='fwd')
    (run, calls), = _cases.loop_runners(case, 2, ('normlib',))[0].values()
    x, _ = _cases.device_data(case)
    y, _ = run()
    twice = normlib.layer_norm(normlib.layer_norm(x, epsilon=1e-5), epsilon=1e-5)
    assert calls == 2
    np.testing.assert_allclose(np.asarray(jax.block_until_ready(y)), twice, atol=1e-5)


def test_gpu_script_is_executable_bash():
    script = ROOT / 'benchmarks' / 'gpu.sh'
    assert script.exists() and os.access(script, os.X_OK)
    check = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert '--gpu-run' in script.read_text()


@pytest.mark.long
def test_gpu_smoke_run_writes_the_bandwidth_table(tmp_path):
    env = {**os.environ,
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    env['XLA_FLAGS'] = ''
    run = subprocess.run([sys.executable, '-m', 'benchmarks', '--gpu-run', '--smoke', '--out',
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['gpu_run'] and results['smoke'] and results['rounds'] == 2
    assert results['peak_tbs'] is None  # the CPU has no entry in the table
    copy = results['copy']
    assert set(copy['tbs']) == {'device loop', 'queued', 'single'}
    assert copy['body_read'] >= 0.99 and copy['body_written'] >= 0.99  # not a no-op
    modes = {(c['op'], c['mode']) for c in results['cases']}
    assert {('layer_norm', 'fwd'), ('layer_norm', 'fwd+bwd'), ('rms_norm', 'fwd+bwd'),
            ('batch_norm', 'fwd+bwd')} <= modes
    for case in results['cases']:
        assert case['times']['normlib'] > 0 and case['times']['flax'] > 0
    report = (tmp_path / 'RESULTS.md').read_text()
    for text in ('Smoke run', 'normlib TB/s', 'normlib % of peak', 'flax TB/s',
                 'normlib / flax time', 'Copy (a jitted', 'peak memory bandwidth unknown',
                 '| target |'):
        assert text in report, text
    assert 'bandwidth / peak' in run.stdout
    from benchmarks import __main__ as cli  # its report again, from the JSON alone
    (tmp_path / 'RESULTS.md').unlink()
    assert cli.main(['--report', str(tmp_path / 'results.json'), '--out', str(tmp_path)]) == 0
    assert (tmp_path / 'RESULTS.md').read_text() == report


def test_compare_reads_each_run_as_its_own_ratios():
    from benchmarks import compare

    def run(normlib, flax, torch):
        return {'cases': [{'name': 'layer_norm fwd+bwd 8x8 float32',
                           'times': {'normlib': normlib, 'flax': flax, 'torch': torch}}]}
    before = [run(2.0, 2.0, 1.0), run(4.0, 5.0, 2.0), run(3.0, 3.0, 1.0)]
    after = [run(1.0, 2.0, 1.0), run(3.0, 5.0, 2.0), run(1.5, 3.0, 1.0)]
    row = compare.table(before, after)[2]
    assert row == ('| layer_norm fwd+bwd 8x8 float32 | 0.50 (0.50-0.60) | 1.00 (0.80-1.00) |'
                   ' 1.50 (1.00-1.50) | 2.00 (2.00-3.00) | 0.50 (0.50-0.75) |')


@pytest.mark.parametrize('op', ['batch_norm', 'layer_norm', 'rms_norm'])
def test_fewest_passes_program_has_the_textbook_gradients(op):
    """The bound's reference program is the normalizer it stands for: its
    hand-written backward equals autodiff of the plain formula."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bound
    rng = np.random.default_rng(0)
    shape = (6, 3, 3, 4) if op == 'batch_norm' else (12, 8)
    x, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    params = (jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32),
              jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32))
    axes = tuple(range(x.ndim - 1)) if op == 'batch_norm' else (x.ndim - 1,)

    def plain(x, scale, bias):
        mean = jnp.mean(x, axes, keepdims=True) if op != 'rms_norm' else 0.0
        var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
        y = (x - mean) / jnp.sqrt(var + bound.EPSILON) * scale
        return y if op == 'rms_norm' else y + bias

    got_y, got_vjp = jax.vjp(bound.fewest_passes(op), x, *params)
    want_y, want_vjp = jax.vjp(plain, x, *params)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_vjp(dy), want_vjp(dy)):
        if got is not None:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bound_smoke_run_writes_its_table(tmp_path):
    from benchmarks import _cases, bound
    assert bound.main(['--smoke', '--out', str(tmp_path)]) == 0
    results = json.loads((tmp_path / 'bound.json').read_text())
    assert {row['op'] for row in results['cases']} == {'batch_norm', 'layer_norm', 'rms_norm'}
    for row in results['cases']:
        t = row['times_s']
        assert row['pass_estimate_s'] == pytest.approx(
            t['outputs only'] + bound.FEWEST_SUMS[row['op']] * t['one sum'])
    table = (tmp_path / 'bound.md').read_text()
    assert '| pass estimate |' in table and 'Smoke run' in table
    assert bound.verdict(0.9, 1.0, 0.8) == 'below the floor'
    assert bound.verdict(0.5, 1.0, 0.8) == 'below the estimate'
    assert bound.verdict(0.5, 0.7, 0.8) == 'within the estimate'
    assert 'x flax' in table
    assert ('x torch' in table) == _cases.available('torch')


def test_report_takes_the_bound_section():
    from benchmarks import _report
    results = json.loads((ROOT / 'benchmarks' / 'results.json').read_text())
    report = _report.markdown(results, reach='# How close any program comes on this backend\n')
    assert '\n## How close any program comes on this backend' in report
