"""The command line of a benchmark that writes one section of RESULTS.md."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable


def main(name: str, run: Callable[[bool, int], dict], markdown: Callable[[dict], str],
         argv=None) -> dict:
    """``python -m benchmarks.<name> [--smoke] [--rounds N] [--out DIR]``.

    Runs ``run(smoke, rounds)`` (2 rounds with ``--smoke``, else 15), writes
    its results to ``<name>.json`` and ``markdown(results)`` to ``<name>.md``
    in ``--out`` (default: the benchmarks folder, or ``out/benchmarks-smoke``
    with ``--smoke``, so a smoke run never overwrites recorded results),
    prints the markdown and returns the results.
    """
    parser = argparse.ArgumentParser(prog=f'python -m benchmarks.{name}')
    parser.add_argument('--smoke', action='store_true', help='tiny inputs, two rounds')
    parser.add_argument('--rounds', type=int, default=None)
    parser.add_argument('--out', type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or (pathlib.Path('out/benchmarks-smoke') if args.smoke
                       else pathlib.Path(__file__).parent)
    out.mkdir(parents=True, exist_ok=True)
    results = run(args.smoke, args.rounds or (2 if args.smoke else 15))
    (out / f'{name}.json').write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out / f'{name}.md').write_text(text)
    print(text)
    return results
