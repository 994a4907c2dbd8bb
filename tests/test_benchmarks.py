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
