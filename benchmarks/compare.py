"""``python -m benchmarks.compare --before DIR... --after DIR... [--out FILE]``:
a before/after table from several full runs (each DIR holds the
``results.json`` of one ``python -m benchmarks --out DIR``).

Timings of one program move by 10-20% between runs on a shared machine, so
each run is read as ratios measured inside it (normlib over flax.linen's
default, normlib over PyTorch), and a table cell is the median of those
ratios over the runs with their range (min-max). The last column is the
median, over pairs of runs made one after the other, of normlib's time
after over its time before; run the two versions alternately (before 1,
after 1, before 2, ...) so that a pair shares the machine's state.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys


def load(folders) -> list[dict]:
    return [json.loads((pathlib.Path(f) / 'results.json').read_text()) for f in folders]


def _ratios(runs: list[dict], name: str, anchor: str) -> list[float]:
    out = []
    for run in runs:
        for case in run['cases']:
            times = case['times']
            if case['name'] == name and anchor in times and 'normlib' in times:
                out.append(times['normlib'] / times[anchor])
    return out


def _cell(ratios: list[float]) -> str:
    if not ratios:
        return '-'
    if len(ratios) == 1:
        return f'{ratios[0]:.2f}'
    return f'{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})'


def _normlib_time(run: dict, name: str) -> float | None:
    for case in run['cases']:
        if case['name'] == name:
            return case['times'].get('normlib')
    return None


def table(before: list[dict], after: list[dict]) -> list[str]:
    """Markdown rows: every case of the first 'after' run."""
    lines = ['| case | after / flax | before / flax | after / torch | before / torch |'
             ' after / before |', '|---|---|---|---|---|---|']
    for case in after[0]['cases']:
        name = case['name']
        pairs = [(_normlib_time(a, name), _normlib_time(b, name)) for a, b in zip(after, before)]
        paired = [a / b for a, b in pairs if a and b]
        cells = [_cell(_ratios(after, name, 'flax')), _cell(_ratios(before, name, 'flax')),
                 _cell(_ratios(after, name, 'torch')), _cell(_ratios(before, name, 'torch')),
                 _cell(paired)]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.compare')
    parser.add_argument('--before', nargs='+', required=True)
    parser.add_argument('--after', nargs='+', required=True)
    parser.add_argument('--out', type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    text = '\n'.join(table(load(args.before), load(args.after))) + '\n'
    if args.out:
        args.out.write_text(text)
    print(text, end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
