"""RESULTS.md and results.png from a run's results (a JSON-able dict)."""

from __future__ import annotations

ANCHORS = ('flax', 'flax two-pass', 'haiku', 'equinox', 'torch', 'jax')
MIB = 2 ** 20


def floor_seconds(case: dict) -> float:
    """Time to move the case's must-move bytes at the copy bandwidth of its rounds.

    A copy reads and writes one array, so moving ``k`` arrays takes
    ``k / 2`` copies; the faster copy of the round sets the bandwidth.
    """
    return case['floor_arrays'] / 2 * min(case['copy'].values())


def _ms(seconds: float) -> str:
    return f'{seconds * 1e3:.3g}' if seconds < 0.1 else f'{seconds * 1e3:.0f}'


def _find(results, op, mode, shape, dtype='float32'):
    for case in results['cases']:
        if (case['op'], case['mode'], tuple(case['shape']),
                case['dtype']) == (op, mode, shape, dtype):
            return case
    return None


def targets(results: dict) -> list[tuple[str, float | None, float, bool | None]]:
    """``(target, measured, bound, met)`` for each target of the issue."""
    rows = []

    def ratio(case, anchor):
        if case is None or anchor not in case['times'] or 'normlib' not in case['times']:
            return None
        return case['times']['normlib'] / case['times'][anchor]

    for case in results['cases']:  # forward and backward against the anchors
        if case['mode'] != 'fwd+bwd':
            continue
        if case['op'] == 'batch_norm':
            rows.append((f'{case["name"]} vs flax.linen default', ratio(case, 'flax'), 0.8))
            if case['dtype'] == 'bfloat16':
                rows.append((f'{case["name"]} vs torch', ratio(case, 'torch'), 1.0))
        elif case['op'] in ('layer_norm', 'rms_norm'):
            rows.append((f'{case["name"]} vs flax.linen', ratio(case, 'flax'), 0.9))
            if case['op'] == 'layer_norm':
                rows.append((f'{case["name"]} vs torch', ratio(case, 'torch'), 1.3))
    for case in results['cases']:
        if 'normlib' in case['times'] and case['mode'] == 'fwd+bwd':
            rows.append((f'{case["name"]}: normlib vs bandwidth floor',
                         case['times']['normlib'] / floor_seconds(case), 1.5))
    memory = results.get('memory')
    if memory:
        rows.append(('training-step temporaries vs flax.linen',
                     memory['temp']['normlib'] / memory['temp']['flax'], 0.7))
    stability = results.get('stability', {}).get('normlib')
    if stability:
        worst = max(stability, key=float)
        rows.append((f'offset data (mean/std = {float(worst):g}): max error of std(y)',
                     stability[worst], 1e-2))
    return [(name, value, bound, None if value is None else value <= bound)
            for name, value, bound in rows]


def _timing_table(results: dict) -> list[str]:
    libraries = [lib for lib in ANCHORS if any(lib in c['times'] for c in results['cases'])]
    head = (['case', 'floor', 'normlib (x floor)']
            + [f'{lib} (normlib / {lib})' for lib in libraries])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for case in results['cases']:
        times, floor = case['times'], floor_seconds(case)
        nl = times.get('normlib')
        cells = [case['name'], _ms(floor),
                 f'{_ms(nl)} ({nl / floor:.2f}x)' if nl else '-']
        for lib in libraries:
            t = times.get(lib)
            cells.append('-' if t is None else f'{_ms(t)} ({nl / t:.2f}x)' if nl else _ms(t))
        lines.append('| ' + ' | '.join(cells) + ' |')
    failed = [f'{case["name"]}: {lib} failed ({err})' for case in results['cases']
              for lib, err in case.get('errors', {}).items()]
    if failed:
        lines += [''] + [f'- {line}' for line in failed]
    return lines


def floor_reads(case: dict) -> int:
    """Arrays a case must read: x (forward); x, then x and dy (forward and backward)."""
    return case.get('floor_reads', 1 if case['mode'] == 'fwd' else 3)


def within_one_read(profile: dict, floor: int) -> bool:
    """At most one array read beyond the floor (per-feature vectors aside)."""
    return profile['read'] <= floor + 1.05


WHY_NOT_THE_FLOOR = (
    '**Why no normalizer is within one read of the floor on XLA:CPU.** The floor'
    ' assumes that the statistics and the output of a pass share one read of x, and'
    ' that sibling sums (sum(d) and sum(d**2); sum(dy) and sum(dy * x_hat)) share one'
    ' read. XLA:CPU runs each reduction as its own YNNPACK kernel, which reads its'
    ' operands once, and fuses no reduction with another or with an elementwise'
    ' output. The ways to compute two sums in one read were measured and are slower'
    ' (2 cores, 8192x1024 and 128x28x28x64 float32): a variadic `lax.reduce` reads x'
    ' once but takes 10.2 ms against 8.3 ms for two row-sum kernels and 27 ms against'
    ' 6.0 ms for two column-sum kernels; a sum over a stacked or concatenated operand'
    ' writes the operand out (29-48 ms). With one reduction per kernel, the bound of'
    ' the algorithms is: batch norm 8 reads (forward: sum(d), sum(d**2), y; backward:'
    ' sum(dy), sum(dy * x_hat), dx, reading dy and x), which normlib meets; layer norm'
    ' 12 (forward also reads x for the anchor, the mean deviation from a row\'s first'
    ' entry, which keeps the moments exact when that entry is far from the mean;'
    ' backward sums over rows for dx and over columns for dscale and dbias), which'
    ' normlib meets; RMS norm reads 6. Dropping the delta pass of layer norm (taking'
    ' the anchor as the mean) would make the mean as accurate as a float32 two-pass'
    ' only, off by up to half an ulp of the mean: 0.03 standard deviations at'
    ' |mean|/std = 1e6, where normlib is exact to 1e-7 today.')


def _profile_table(results: dict) -> list[str]:
    lines = ['| case | library | kernels over the array | of which reductions |'
             ' arrays read | floor read | within one read of floor? | arrays written |',
             '|---|---|---|---|---|---|---|---|']
    for case in results['cases']:
        floor = floor_reads(case)
        for lib, p in case.get('profile', {}).items():
            within = 'yes' if within_one_read(p, floor) else f'no (+{p["read"] - floor:.1f})'
            lines.append(f'| {case["name"]} | {lib} | {p["kernels"]} | {p["reductions"]} |'
                         f' {p["read"]:.1f} | {floor} | {within} | {p["written"]:.1f} |')
    return lines


def _pct(fraction: float | None) -> str:
    return '-' if fraction is None else f'{fraction:.0%}'


def gpu_rows(results: dict) -> list[dict]:
    """Per case of a GPU run: time, TB/s and fraction of peak of each library,
    and normlib's time over flax.linen's. Bandwidth is the must-move bytes
    (``floor_arrays`` arrays of x's size) over the time."""
    peak = results.get('peak_tbs')
    rows = []
    for case in results['cases']:
        moved = case['floor_arrays'] * case['nbytes']
        row = {'name': case['name'], 'op': case['op'], 'mode': case['mode'],
               'large': case.get('large', False), 'libs': {}}
        for lib, t in case['times'].items():
            rate = moved / t / 1e12
            row['libs'][lib] = {'seconds': t, 'tbs': rate,
                                'of_peak': None if not peak else rate / peak}
        times = case['times']
        row['vs_flax'] = (times['normlib'] / times['flax']
                          if 'normlib' in times and 'flax' in times else None)
        rows.append(row)
    return rows


def copy_check(results: dict) -> tuple[float | None, str | None]:
    """The copy's fraction of the peak (device loop), and a warning in bold if
    the harness does not measure the hardware (below half the peak, above it,
    or a loop body that does not read and write the array)."""
    copy, peak = results['copy'], results.get('peak_tbs')
    rate = copy.get('tbs', {}).get('device loop')
    fraction = None if rate is None or not peak else rate / peak
    if copy.get('body_read', 1) < 0.99 or copy.get('body_written', 1) < 0.99:
        return fraction, ('**The copy loop does not read and write its array: the harness is'
                          ' not measuring the hardware.**')
    if fraction is not None and fraction < 0.5:
        return fraction, (f'**The copy reads {fraction:.0%} of the peak, below 50%: the harness'
                          ' is not measuring the hardware.**')
    if fraction is not None and fraction > 1.1:
        return fraction, (f'**The copy reads {fraction:.0%} of the peak, above it: the harness'
                          ' is not measuring the hardware (or the peak is wrong).**')
    return fraction, None


def gpu_targets(results: dict) -> list[tuple[str, str, str, str]]:
    """``(target, measured, bound, verdict)``: layer and RMS norm fwd+bwd on
    the large arrays at 80% of the peak or more, and no slower than Flax."""
    out = []
    for row in gpu_rows(results):
        if not (row['large'] and row['mode'] == 'fwd+bwd'
                and row['op'] in ('layer_norm', 'rms_norm')):
            continue
        nl = row['libs'].get('normlib')
        fraction = nl and nl['of_peak']
        out.append((f'{row["name"]}: normlib bandwidth / peak', _pct(fraction), '>= 80%',
                    'n/a' if fraction is None else 'met' if fraction >= 0.8 else 'missed'))
        ratio = row['vs_flax']
        out.append((f'{row["name"]}: normlib / flax.linen time',
                    '-' if ratio is None else f'{ratio:.2f}', '<= 1', 'n/a' if ratio is None
                    else 'met' if ratio <= 1 else f'missed by {ratio - 1:.0%}'))
    return out


def _gpu_run_section(gpu: dict) -> list[str]:
    """The report of a ``--gpu-run``: copy check, targets and the bandwidth table."""
    m, v = gpu['machine'], gpu['versions']
    peak = gpu.get('peak_tbs')
    copy = gpu['copy']
    fraction, warning = copy_check(gpu)
    peak_text = (f'peak memory bandwidth {peak:g} TB/s ({gpu.get("peak_name")}, data sheet)'
                 if peak else 'peak memory bandwidth unknown for this device name (shown as -)')
    out = [f'Device: {m["device"]} ({m["backend"]}); {peak_text}. jax {v.get("jax")},'
           f' flax {v.get("flax")}, torch {v.get("torch", "-")}; {gpu["date"]};'
           f' median of {gpu["rounds"]} interleaved rounds (of at most'
           f' {gpu.get("max_rounds", gpu["rounds"])}, in a budget of {gpu["budget_s"]:g} s;'
           f' {gpu.get("elapsed_s", 0):.0f} s used).', '',
           'Timing: each sample is one program that runs the case `repeats` times in a'
           ' `lax.fori_loop` (each iteration takes the previous output as its input: y for'
           ' the forward, dx for forward and backward, so nothing is loop-invariant), timed'
           ' as one call and divided by `repeats`, chosen so that a sample lasts about'
           f' {gpu.get("target_sample_s", 0.025) * 1e3:g} ms at the peak: device time, not'
           ' the dispatch or the wait. PyTorch (with CUDA only) queues `repeats` eager calls'
           ' and synchronizes once. Bandwidth: the must-move bytes over the time, in TB/s'
           ' (1e12 bytes/s); must-move is the floor of the CPU tables: forward reads x and'
           ' writes y (2 arrays of x\'s size), forward and backward also reads x and dy and'
           ' writes dx (5 arrays); statistics passes and parameters are extra. Arrays under'
           ' the L2 cache size (50 MB on an H100, 60 MB on an H200) can beat the peak:'
           ' iterations reuse the cache.', '']
    rates = copy.get('tbs', {})
    shown = ', '.join(f'{k} {r:.2f} TB/s ({_pct(None if not peak else r / peak)} of peak)'
                      for k, r in rates.items())
    out += [f'Copy (a jitted `x + 1` of {copy["mib"]} MiB float32, bytes read + written;'
            f' the loop body reads {copy.get("body_read", 0):.1f} and writes'
            f' {copy.get("body_written", 0):.1f} arrays): {shown or "not timed"}.'
            ' "device loop" is the method of the table; "queued": calls back to back, one'
            ' wait; "single": one call and its wait, as the earlier GPU section measured.', '']
    out += [warning or ('Check: the peak of this device is unknown, so the copy cannot be'
                        ' checked against it.' if fraction is None else
                        f'Check: the copy reaches {fraction:.0%} of the peak (at least 50%'
                        ' expected): the harness measures the memory.'), '']
    if gpu.get('smoke'):
        out = ['**Smoke run: tiny inputs, not measurements.**', ''] + out
    targets = gpu_targets(gpu)
    if targets:
        out += ['| target | measured | bound | |', '|---|---|---|---|']
        out += [f'| {name} | {value} | {bound} | {verdict} |'
                for name, value, bound, verdict in targets]
        out += ['']
    libs = [lib for lib in ('flax two-pass', 'jax', 'torch')
            if any(lib in c['times'] for c in gpu['cases'])]
    head = (['case', 'normlib ms', 'normlib TB/s', 'normlib % of peak', 'flax TB/s',
             'flax % of peak', 'normlib / flax time'] + [f'{lib} TB/s' for lib in libs])
    out += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in gpu_rows(gpu):
        nl, fx = row['libs'].get('normlib'), row['libs'].get('flax')
        cells = [row['name'] + (' (large)' if row['large'] else ''),
                 _ms(nl['seconds']) if nl else '-', f'{nl["tbs"]:.3g}' if nl else '-',
                 _pct(nl and nl['of_peak']), f'{fx["tbs"]:.3g}' if fx else '-',
                 _pct(fx and fx['of_peak']),
                 '-' if row['vs_flax'] is None else f'{row["vs_flax"]:.2f}x']
        cells += [f'{row["libs"][lib]["tbs"]:.3g}' if lib in row['libs'] else '-'
                  for lib in libs]
        out.append('| ' + ' | '.join(cells) + ' |')
    failed = [f'{c["name"]}: {lib} failed ({err})' for c in gpu['cases']
              for lib, err in c.get('errors', {}).items()]
    if gpu.get('skipped'):
        failed.append('not built (out of time): ' + ', '.join(gpu['skipped']))
    if failed:
        out += [''] + [f'- {line}' for line in failed]
    return out


def gpu_summary(results: dict) -> list[str]:
    """What a GPU run prints at its end: the copy check and the targets."""
    copy, peak = results['copy'], results.get('peak_tbs')
    fraction, warning = copy_check(results)
    rate = copy.get('tbs', {}).get('device loop')
    lines = [f'device {results["machine"]["device"]}: peak {peak or "-"} TB/s;'
             f' {results["rounds"]} rounds; copy {"-" if rate is None else f"{rate:.2f}"}'
             f' TB/s ({_pct(fraction)} of peak)']
    if warning:
        lines.append(warning)
    for row in gpu_rows(results):
        nl = row['libs'].get('normlib')
        rate = '-' if not nl else f'{nl["tbs"]:.3f}'
        ratio = '-' if row['vs_flax'] is None else f'{row["vs_flax"]:.2f}'
        lines.append(f'{row["name"]}: normlib {rate} TB/s ({_pct(nl and nl["of_peak"])} of'
                     f' peak), normlib/flax {ratio}')
    lines += [f'{name}: {value} ({bound}) {verdict}'
              for name, value, bound, verdict in gpu_targets(results)]
    return lines


def gpu_markdown(results: dict) -> str:
    """RESULTS.md of a ``--gpu-run``."""
    return '\n'.join(['# normlib on a GPU', ''] + _gpu_run_section(results) + [''])


def _gpu_section(gpu: dict | None) -> list[str]:
    if not gpu:
        return ['No GPU run is recorded with this run.']
    if gpu.get('gpu_run'):
        return _gpu_run_section(gpu)
    big = ', '.join(f'{k} {v:.0f} GB/s' for k, v in gpu['bandwidth']['gbs'].items())
    lines = [f'Device: {gpu["machine"]["device"]}; jax {gpu["versions"].get("jax")},'
             f' flax {gpu["versions"].get("flax")}; {gpu["date"]}. Same harness'
             f' (`python -m benchmarks`), median of {gpu["rounds"]} interleaved rounds, each'
             ' sample a queue of calls lasting at least 20 ms (Haiku is not installed there;'
             ' PyTorch is timed on CPUs only). Effective bandwidth: the must-move bytes (see'
             ' the floor above) over the time. Copy: a jitted `x + 1` of the case\'s array;'
             f' of a {gpu["bandwidth"]["mib"]} MiB array: {big}, timed one call and its wait'
             ' at a time: that measures the dispatch and the synchronization, not the memory'
             ' (`bash benchmarks/gpu.sh` times on the device). These arrays (12 to 51 MB)'
             ' are near the 50 MB L2 cache and their kernels last tens of microseconds, so'
             ' launch latency and cache reuse between the forward and backward kernels'
             ' matter: a case can beat its own copy. This run timed normlib as it was on'
             f' {gpu["date"][:10]}; later changes to the statistics core have not been timed'
             ' on a GPU.', '',
             '| case | copy GB/s | normlib GB/s | flax GB/s | flax two-pass GB/s |'
             ' normlib / flax time |', '|---|---|---|---|---|---|']

    def rate(case, lib):
        t = case['times'].get(lib)
        return '-' if t is None else f'{case["floor_arrays"] * case["nbytes"] / t / 1e9:.0f}'

    for case in gpu['cases']:
        copy = 2 * case['nbytes'] / min(case['copy'].values()) / 1e9
        times = case['times']
        ratio = (f'{times["normlib"] / times["flax"]:.2f}x'
                 if 'flax' in times and 'normlib' in times else '-')
        lines.append(f'| {case["name"]} | {copy:.0f} | {rate(case, "normlib")} |'
                     f' {rate(case, "flax")} | {rate(case, "flax two-pass")} | {ratio} |')
    return lines


def _scale_section(scale: dict | None) -> list[str]:
    """Bytes per synced call against the device count, and the synced step."""
    if not scale:
        return ['No scale run recorded: `python -m benchmarks.scale`.']
    from benchmarks.scale import formulas
    runs = scale['payload']
    devices = [r['devices'] for r in runs]
    features = runs[0]['features']
    out = []
    if scale.get('smoke'):
        out += ['**Smoke run: these numbers are not measurements.**', '']
    out += [f'Bytes each device puts into the collectives of one call over {features}'
            ' float32 channels (or rows, for layer and RMS norm over sharded features),'
            ' read from the lowered programs at each simulated device count'
            ' (`python -m benchmarks.scale`); in brackets, the number of collectives.'
            ' torch SyncBatchNorm and normlib 0.2 are by formula (forward).', '']
    head = '| mapping | normlib / anchor | pass | ' + ' | '.join(f'{d} devices' for d in devices)
    out += [head + ' |', '|---|---|---|' + '---|' * len(devices)]

    def cell(entry, pass_):
        value = entry[pass_]
        if value is None or isinstance(value, str):
            return value or '-'
        if pass_ == 'forward+backward':
            forward = entry['forward']
            return f'{value[1] - forward[1]:,} [{value[0] - forward[0]}]'
        return f'{value[1]:,} [{value[0]}]'

    for mapping in runs[0]['cases']:
        for name in runs[0]['cases'][mapping]:
            for pass_, label in (('forward', 'forward'), ('forward+backward', 'backward')):
                cells = [cell(r['cases'][mapping][name], pass_) for r in runs]
                out.append(f'| {mapping} | {name} | {label} | ' + ' | '.join(cells) + ' |')
    for name in formulas(8, features):
        out.append(f'| (formula) | {name} | forward | '
                   + ' | '.join(f'{formulas(d, features)[name]:,}' for d in devices) + ' |')
    step = scale['step']
    ms = step['ms']
    out += ['', f'A synced training step (forward and backward of one BatchNorm on'
            f' {"x".join(map(str, step["shape_per_device"]))} per device, gradients psum-ed) on'
            f' {step["devices"]} simulated CPU devices under `shard_map`, median of'
            f' {step["rounds"]} interleaved rounds in one process; "per device": the same step'
            ' with no `axis_name` (each device its own statistics), so the difference is what'
            ' synchronizing costs.', '',
            '| BatchNorm | synced (ms) | per device (ms) | synced vs flax |', '|---|---|---|---|']
    for lib in ('normlib', 'flax', 'flax two-pass'):
        out.append(f'| {lib} | {ms[lib]:.2f} | {ms[lib + ", per device"]:.2f} |'
                   f' {ms[lib] / ms["flax"]:.2f}x |')
    out += ['', '![Bytes per device per synced call](scale.png)']
    return out


def markdown(results: dict, gpu: dict | None = None, notes: str = '',
             scale: dict | None = None, memory_efficient: str = '', reach: str = '') -> str:
    m, v = results['machine'], results['versions']
    out = ['# normlib benchmarks', '']
    if results.get('smoke'):
        out += ['**Smoke run: tiny inputs and two rounds, to check that every path runs.'
                ' These numbers are not measurements.**', '']
    out += [
           f'Run {results["date"]} on {m["cpu"]} ({m["cores"]} cores, {m["memory_gib"]:.0f} GiB),'
           f' {m["platform"]}; malloc {m.get("malloc", "default")};'
           f' load average {results["load"][0]:.2f} at the start,'
           f' {results["load"][1]:.2f} at the end.',
           'Versions: ' + ', '.join(f'{k} {val}' for k, val in v.items()) + '.',
           f'Each case: median of {results["rounds"]} interleaved rounds (every library once per'
           ' round, in random order), in one process.'
           ' Reproduce with `pip install -e ".[bench]" && python -m benchmarks`.', '',
           f'Copy bandwidth (bytes read + written, {results["bandwidth"]["mib"]} MiB float32):'
           + ', '.join(f' {k} {val:.1f} GB/s' for k, val in results['bandwidth']['gbs'].items())
           + '.', '']
    out += ['## Targets', '', '| target | measured | bound | |', '|---|---|---|---|']
    for name, value, bound, met in targets(results):
        shown = '-' if value is None else f'{value:.3g}' if value < 0.01 else f'{value:.2f}'
        verdict = 'n/a' if met is None else 'met' if met else f'missed by {value / bound - 1:.0%}'
        out.append(f'| {name} | {shown} | <= {bound:g} | {verdict} |')
    if notes:
        out += ['', notes.strip()]
    out += ['', '## Timings (ms)', '',
            'Floor: the bytes every implementation must move (forward: read x, write y;'
            ' forward and backward: also read x and dy, write dx) at the copy bandwidth'
            ' measured interleaved with that case (the faster of a jitted `x + 1` and'
            ' `numpy.copyto`). In parentheses: normlib\'s time over the floor, and'
            ' normlib\'s time over each anchor\'s (below 1: normlib is faster). flax is'
            ' `flax.linen` with its default fast variance; equinox gets channels-first'
            ' examples (its layout); torch is CPU PyTorch with channels-last activations;'
            ' jax is the plain `x / max(norm(x), eps)`.', '']
    out += _timing_table(results)
    out += ['', '## Profile: what the compiled programs move', '',
            'From XLA\'s optimized HLO of each fwd+bwd case: kernels (fusions and other'
            ' instructions) that read or write at least half an array, how many of them'
            ' are reductions, and the bytes all kernels read and write, in arrays of the'
            ' input\'s size. The floor is 3 arrays read (x, then x and dy) and 2 written (y, dx);'
            ' "within one read of floor?": at most one array read beyond it.', '']
    out += _profile_table(results)
    out += ['', WHY_NOT_THE_FLOOR]
    if reach:  # bound.md, its title one level down
        out += ['', '#' + reach.strip()]
    memory = results.get('memory')
    if memory:
        out += ['', '## Training-step memory', '',
                f'A jitted SGD step (forward, backward, update; parameters donated) of'
                f' {memory["depth"]} x (Dense {memory["width"]} without bias, BatchNorm, ReLU)'
                f' on a batch of {memory["batch"]}, flax.linen modules; normlib\'s layer is'
                ' `normlib.linen.BatchNorm`. Temporaries: `compiled.memory_analysis()'
                '.temp_size_in_bytes`. Step time: median of interleaved rounds.', '',
                '| BatchNorm | temporaries (MiB) | vs flax | step (ms) | vs flax |',
                '|---|---|---|---|---|']
        for norm, temp in memory['temp'].items():
            t = memory['times'][norm]
            out.append(f'| {norm} | {temp / MIB:.1f} | {temp / memory["temp"]["flax"]:.2f}x |'
                       f' {_ms(t)} | {t / memory["times"]["flax"]:.2f}x |')
    if memory_efficient:  # memory_efficient.md, its title one level down
        out += ['', '#' + memory_efficient.strip()]
    stability = results.get('stability')
    if stability:
        ratios = sorted({r for errors in stability.values() for r in errors}, key=float)
        out += ['', '## Stability', '',
                'Batch norm (training mode) of float32 data with std 1 and mean |mean|/std;'
                ' each cell is max over features of |std(y) - std(x)/sqrt(var(x) + eps)|.', '',
                '| library | ' + ' | '.join(f'{float(r):g}' for r in ratios) + ' |',
                '|---|' + '---|' * len(ratios)]
        for lib, errors in stability.items():
            out.append(f'| {lib} | ' + ' | '.join(f'{errors[r]:.2g}' for r in ratios) + ' |')
    out += ['', '## At scale: what a synced call sends', ''] + _scale_section(scale)
    out += ['', '## GPU', ''] + _gpu_section(gpu)
    out += ['', '![normlib vs the anchors, time over the bandwidth floor](results.png)', '']
    return '\n'.join(out)


def chart(results: dict, path: str) -> None:
    """Time over the bandwidth floor, per case and library (log scale)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    libraries = ['normlib'] + [lib for lib in ANCHORS
                               if any(lib in c['times'] for c in results['cases'])]
    cases = results['cases']
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) * (1 + len(libraries) / 6) + 1.5))
    height = 0.8 / len(libraries)
    colors = plt.get_cmap('tab10')
    for j, lib in enumerate(libraries):
        ys, xs = [], []
        for i, case in enumerate(cases):
            if lib in case['times']:
                ys.append(i + (j - (len(libraries) - 1) / 2) * height)
                xs.append(case['times'][lib] / floor_seconds(case))
        ax.barh(ys, xs, height=height, label=lib, color=colors(j),
                edgecolor='black' if lib == 'normlib' else None)
    ax.axvline(1, color='black', linewidth=1)
    ax.axvline(1.5, color='grey', linewidth=1, linestyle='--')
    ax.set_xscale('log')
    ax.set_yticks(range(len(cases)), [c['name'] for c in cases], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('time / bandwidth floor (1 = moving only the must-move bytes at copy speed;'
                  ' dashed: 1.5)')
    smoke = 'SMOKE RUN (not measurements): ' if results.get('smoke') else ''
    ax.set_title(f'{smoke}normlib benchmarks, {results["machine"]["cpu"]}, {results["date"]}')
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
