"""What a compiled program moves: the fusions of XLA's optimized HLO and their bytes."""

from __future__ import annotations

import math
import re

_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
             'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_ARRAY = re.compile(r'\b(' + '|'.join(_ITEMSIZE) + r')\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$')
# Instructions that move no data of their own.
_FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'conditional',
         'while', 'call', 'opt-barrier', 'after-all'}


def _bytes(shapes: str) -> int:
    return sum(_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(',') if d)
               for t, dims in _ARRAY.findall(shapes))


def _computation(hlo_text: str, name: str | None) -> str:
    """The text of the computation ``name``, or of the entry computation."""
    if name is None:
        start = hlo_text.index('\nENTRY')
    else:
        start = re.search(rf'\n%?{re.escape(name)} \(', hlo_text).start()
    end = hlo_text.find('\n}', start + 1)
    return hlo_text[start:] if end < 0 else hlo_text[start:end]


def entry_traffic(hlo_text: str, computation: str | None = None) -> list[dict]:
    """Bytes read and written by each instruction of the entry computation
    (or of the computation named ``computation``).

    Reads count each operand once, whole (a slice or a gather reads only what it writes).
    Branches of conditionals are not counted: they run only when taken.
    """
    shapes, out = {}, []
    for line in _computation(hlo_text, computation).splitlines()[1:]:
        match = _INSTRUCTION.match(line.strip())
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        shapes[name] = shape
        if opcode in _FREE:
            continue
        operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
        written = _bytes(shape)
        # A slice or a gather reads what it writes (and its indices), not its whole operand.
        picks = 'slice' in name or 'gather' in name or opcode == 'gather'
        read = written if picks else sum(_bytes(shapes.get(o, '')) for o in operands)
        kind = re.search(r'"kind":"(\w+)"', rest) or re.search(r'kind=(\w+)', rest)
        out.append({'name': name, 'opcode': opcode, 'kind': kind.group(1) if kind else opcode,
                    'read': read, 'written': written})
    return out


def profile(hlo_text: str, array_bytes: int) -> dict:
    """Passes over the array: kernels that touch at least half an array's bytes.

    Returns the number of such kernels, how many are reductions, and the
    bytes all kernels read and write in units of one array.
    """
    traffic = entry_traffic(hlo_text)
    heavy = [t for t in traffic if t['read'] + t['written'] >= array_bytes / 2]
    reductions = [t for t in heavy if t['written'] < array_bytes / 2]
    return {
        'kernels': len(heavy),
        'reductions': len(reductions),
        'read': sum(t['read'] for t in traffic) / array_bytes,
        'written': sum(t['written'] for t in traffic) / array_bytes,
    }


def _first_while_body(hlo_text: str, computation: str | None, depth: int = 0) -> str | None:
    """The body of the first while loop in ``computation`` or in the computations
    it calls (XLA:CPU may wrap a loop in a ``call``)."""
    text = _computation(hlo_text, computation)
    body = re.search(r'while\(.*?body=%?([\w.\-]+)', text)
    if body is not None:
        return body.group(1)
    if depth < 4:
        for callee in re.findall(r'call\(.*?to_apply=%?([\w.\-]+)', text):
            found = _first_while_body(hlo_text, callee, depth + 1)
            if found is not None:
                return found
    return None


def loop_body_traffic(hlo_text: str) -> list[dict]:
    """``entry_traffic`` of the body of the entry computation's first while loop
    (looked for in the entry and in the computations it calls)."""
    body = _first_while_body(hlo_text, None)
    if body is None:
        raise ValueError('the entry computation has no while loop')
    return entry_traffic(hlo_text, body)
