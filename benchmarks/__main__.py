"""``python -m benchmarks [--smoke] [--out DIR] [--rounds N] [--gpu JSON] [--report JSON]``.

Times every case, then writes ``results.json``, ``RESULTS.md`` and
``results.png`` to ``--out`` (default: this package's folder; for
``--smoke``, ``out/benchmarks-smoke``, so that a smoke run never overwrites
the recorded results). ``--gpu``
adds the GPU section from a ``results.json`` written by a run on a GPU;
``--report`` rewrites the report of an earlier run without timing anything.
The report takes ``memory_efficient.md`` and ``bound.md`` from ``--out``
when they are there (``python -m benchmarks.memory_efficient`` and
``python -m benchmarks.bound`` write them).

``python -m benchmarks --gpu-run [--smoke] [--out DIR] [--rounds N] [--budget S]``
is the run for a GPU (``bash benchmarks/gpu.sh`` installs and starts it):
every case above plus large arrays, each timed on the device (``repeats``
calls in one ``lax.fori_loop``, see ``benchmarks/_gpu.py``), reported as
bandwidth (the must-move bytes over the time) against the device's peak
and against flax.linen, with a 256 MiB copy as a check that the harness
measures the memory. Rounds stop at ``--rounds`` (default 15) or when the
next one would end past ``--budget`` seconds (default 270); results are
saved after every round. It writes ``results.json`` and ``RESULTS.md`` to
``--out`` (default ``out/gpu``, or ``out/gpu-smoke``). With ``--smoke`` it
runs tiny cases on any backend (the CPU too) in seconds. Pass its
``results.json`` to ``--gpu`` for the CPU report's GPU section, or to
``--report`` to rewrite its own report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
from importlib import metadata

import jax
import tqdm

from benchmarks import _cases, _gpu, _hlo, _memory, _report, _stability, _timing

NOTES = pathlib.Path(__file__).with_name('NOTES.md')
GPU_RESULTS = pathlib.Path(__file__).with_name('gpu_results.json')
SMOKE_LIBRARIES = ('normlib', 'flax', 'flax two-pass', 'torch', 'jax')


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    except (ValueError, OSError, AttributeError):
        memory = float('nan')
    device = jax.devices()[0]
    return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gib': memory,
            'platform': f'{platform.system()} {platform.release()}',
            'device': getattr(device, 'device_kind', str(device)), 'backend': jax.default_backend(),
            # glibc's malloc settings: by default a freed buffer of tens of MiB
            # goes back to the system, and the next call's output is fresh
            # pages the kernel zeroes on first touch (see NOTES.md).
            'malloc': os.environ.get('GLIBC_TUNABLES', 'default')}


def _versions() -> dict:
    out = {'python': platform.python_version()}
    for name in ('jax', 'jaxlib', 'flax', 'dm-haiku', 'equinox', 'torch', 'numpy', 'normlib'):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


def _bandwidth(mib: int, rounds: int, min_sample_s: float) -> dict:
    """GB/s (read + written) of a jitted ``x + 1`` and of ``numpy.copyto``."""
    case = _cases.Case('copy', (mib * 2 ** 18,), mode='fwd')
    times = _timing.interleaved(_cases.copy_runners(case), rounds, min_sample_s=min_sample_s)
    return {'mib': mib, 'gbs': {k: 2 * case.nbytes / t / 1e9 for k, t in times.items()}}


def run(smoke: bool, rounds: int, min_sample_s: float) -> dict:
    results = {'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), 'smoke': smoke,
               'machine': _machine(), 'versions': _versions(), 'rounds': rounds,
               'load': [_load()]}
    results['bandwidth'] = _bandwidth(1 if smoke else 256, rounds, min_sample_s)
    results['cases'] = []
    for i, case in enumerate(tqdm.tqdm(_cases.cases(smoke), desc='cases', file=sys.stdout)):
        # A smoke run builds Haiku and Equinox (slow to compile) in one case only.
        libraries = _cases.LIBRARIES if not smoke or i == 1 else SMOKE_LIBRARIES
        runners, hlo, errors = _cases.runners(case, libraries)
        copies = _cases.copy_runners(case)
        times = _timing.interleaved({**runners, **copies}, rounds, min_sample_s=min_sample_s)
        entry = {'name': case.name, 'op': case.op, 'shape': list(case.shape),
                 'dtype': case.dtype, 'mode': case.mode, 'nbytes': case.nbytes,
                 'floor_arrays': case.floor_arrays,
                 'times': {k: times[k] for k in runners}, 'copy': {k: times[k] for k in copies},
                 'errors': errors}
        if case.mode == 'fwd+bwd':
            entry['profile'] = {lib: _hlo.profile(text, case.nbytes) for lib, text in hlo.items()
                                if lib in ('normlib', 'flax', 'flax two-pass')}
        results['cases'].append(entry)
    batch, width, depth = (64, 32, 2) if smoke else (2048, 1024, 8)
    temps, steps = _memory.measure(batch, width, depth)
    step_times = _timing.interleaved(steps, rounds, min_sample_s=min_sample_s)
    results['memory'] = {'batch': batch, 'width': width, 'depth': depth, 'temp': temps,
                         'times': step_times}
    results['stability'] = _stability.table(SMOKE_LIBRARIES if smoke else _cases.LIBRARIES)
    results['load'].append(_load())
    return results


def _header(smoke: bool, rounds: int) -> dict:
    return {'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), 'smoke': smoke,
            'machine': _machine(), 'versions': _versions(), 'rounds': rounds}


def gpu_run(out: pathlib.Path, smoke: bool, rounds: int, budget_s: float) -> dict:
    """``_gpu.run``, saving ``results.json`` and ``RESULTS.md`` after each round."""
    header = _header(smoke, rounds)
    print(f'device: {header["machine"]["device"]} ({header["machine"]["backend"]});'
          f' peak {_gpu.peak(header["machine"]["device"])[0] or "unknown"} TB/s;'
          f' budget {budget_s:g} s, at most {rounds} rounds', flush=True)

    def save(results):
        results = {**header, **results, 'max_rounds': rounds}
        (out / 'results.json').write_text(json.dumps(results, indent=1))
        (out / 'RESULTS.md').write_text(_report.gpu_markdown(results))
        return results

    results = _gpu.run(smoke, rounds, budget_s, header['machine']['device'], save,
                       log=lambda line: print(line, flush=True))
    return save(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true', help='tiny inputs, two rounds: seconds')
    parser.add_argument('--out', type=pathlib.Path, default=None,
                        help='folder for results.json, RESULTS.md and results.png (default:'
                             ' this package\'s folder, which holds the recorded results; with'
                             ' --smoke, out/benchmarks-smoke)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds per case')
    parser.add_argument('--gpu', type=pathlib.Path, default=GPU_RESULTS,
                        help='results.json of a GPU run, for the GPU section'
                             ' (default: the recorded one, if any)')
    parser.add_argument('--report', type=pathlib.Path, default=None,
                        help='results.json of an earlier run: only write its report')
    parser.add_argument('--gpu-run', action='store_true',
                        help='the GPU run: device-side timing, bandwidth against the peak')
    parser.add_argument('--budget', type=float, default=270.0,
                        help='--gpu-run: seconds for building and timing (default 270)')
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run never overwrites the recorded results
        args.out = (pathlib.Path('out/gpu-smoke' if args.smoke else 'out/gpu') if args.gpu_run
                    else pathlib.Path('out/benchmarks-smoke') if args.smoke
                    else pathlib.Path(__file__).parent)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpu_run:
        results = gpu_run(args.out, args.smoke, args.rounds or (2 if args.smoke else 15),
                          args.budget)
        return _print_gpu(results, args.out)
    if args.report:
        results = json.loads(args.report.read_text())
        if results.get('gpu_run'):
            (args.out / 'RESULTS.md').write_text(_report.gpu_markdown(results))
            return _print_gpu(results, args.out)
    else:
        rounds = args.rounds or (2 if args.smoke else 21)
        gpu_device = jax.default_backend() != 'cpu'
        results = run(args.smoke, rounds, min_sample_s=0.02 if gpu_device else 0.0)
    (args.out / 'results.json').write_text(json.dumps(results, indent=1))
    gpu = json.loads(args.gpu.read_text()) if args.gpu and args.gpu.exists() else None
    notes = NOTES.read_text() if NOTES.exists() and not results['smoke'] else ''
    scale_json = args.out / 'scale.json'  # from python -m benchmarks.scale
    scale = json.loads(scale_json.read_text()) if scale_json.exists() else None
    efficient_md = args.out / 'memory_efficient.md'  # from python -m benchmarks.memory_efficient
    efficient = efficient_md.read_text() if efficient_md.exists() else ''
    bound_md = args.out / 'bound.md'  # from python -m benchmarks.bound
    reach = bound_md.read_text() if bound_md.exists() else ''
    (args.out / 'RESULTS.md').write_text(
        _report.markdown(results, gpu, notes, scale, efficient, reach))
    _report.chart(results, str(args.out / 'results.png'))
    for name, value, bound, met in _report.targets(results):
        shown = '-' if value is None else f'{value:.3g}'
        verdict = 'met' if met else 'MISSED' if met is False else ''
        print(f'{name}: {shown} (<= {bound:g}) {verdict}')
    print(f'wrote {args.out / "RESULTS.md"} and {args.out / "results.png"}')
    return 0


def _print_gpu(results: dict, out: pathlib.Path) -> int:
    print('\n'.join(_report.gpu_summary(results)))
    print(f'wrote {out / "results.json"} and {out / "RESULTS.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
