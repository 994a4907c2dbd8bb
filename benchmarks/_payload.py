"""What one synchronized normalizer sends across devices.

    python -m benchmarks._payload N [--normlib-only]

Run in a process of its own with ``N`` simulated CPU devices (it sets
``XLA_FLAGS`` before JAX starts), it builds every synced normalizer in every
mapping, forward and forward-and-backward, and prints JSON: for each, the
number of cross-device collectives and the bytes each device contributes to
them, read from the program JAX emits:

- ``pmap``, ``shard_map`` (1-D and 2-D meshes): the collectives of the lowered
  StableHLO (lowering only: nothing runs, so 1024 devices cost seconds);
- ``vmap``: vmap turns a collective into a reduction over the mapped axis,
  so its message is read from the per-member program, traced with the axis
  bound (``jax.make_jaxpr(..., axis_env=...)``): the operands of each
  named-axis reduction;
- ``sharded jit`` (no ``axis_name``): the collectives XLA's partitioner
  inserts, from the compiled program.
"""

from __future__ import annotations

import json
import os
import re
import sys

FEATURES = 256  # statistics per call: channels, or rows for layer/RMS norm
LOCAL = 8  # examples (or feature columns) per device
BYTES = {'f32': 4, 'f64': 8, 'bf16': 2, 'f16': 2, 'i32': 4, 'i64': 8, 'i1': 1, 'i8': 1,
         'ui32': 4, 'complex<f32>': 8, 's32': 4, 'pred': 1, 'u32': 4, 'c64': 8}
_STABLEHLO = re.compile(
    r'"stablehlo\.(all_reduce|all_gather|reduce_scatter|collective_permute|all_to_all)"'
    r'.*?\}?\)? : \(([^()]*)\) ->', re.S)
_HLO = re.compile(r'= (\(?[^=]*?\)?) (all-reduce|all-gather|reduce-scatter|collective-permute|'
                  r'all-to-all)(?:-start)?\(')


def _tensor_bytes(types: str) -> int:
    total = 0
    for shape in re.findall(r'tensor<([^>]*)>', types):
        *dims, dtype = shape.split('x') if 'x' in shape else [shape]
        total += BYTES[dtype] * int(__import__('math').prod(int(d) for d in dims))
    return total


def _matching(text: str, start: int, open_: str = '{', close: str = '}') -> int:
    """The index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {open_: 1, close: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError('unbalanced brackets')


def stablehlo_collectives(text: str) -> tuple[int, int]:
    """(number, bytes of operands) of the collectives in StableHLO text that
    run on data in range: of the branches of a ``stablehlo.case`` (a
    ``lax.cond``: the scaled pass for out-of-range statistics) only the one
    that sends least counts."""
    case = text.find('"stablehlo.case"')
    if case < 0:
        found = _STABLEHLO.findall(text)
        return len(found), sum(_tensor_bytes(types) for _, types in found)
    start = text.index('({', case) + 1
    branches, i = [], start
    while text[i] == '{':
        end = _matching(text, i)
        branches.append(stablehlo_collectives(text[i:end]))
        i = end
        while text[i] in ', \n':
            i += 1
    n, size = stablehlo_collectives(text[:case] + text[i:])
    least = min(branches, key=lambda b: b[1])
    return n + least[0], size + least[1]


def hlo_collectives(text: str) -> tuple[int, int]:
    """(number, bytes of results) of the collectives in compiled HLO text that
    run on data in range: of a ``conditional``'s branch computations only the
    one that sends least counts."""
    computations = {}
    for block in re.split(r'\n(?=\S)', text):
        head = re.match(r'(?:ENTRY )?%?([\w.\-]+)', block)
        if head:
            computations[head.group(1)] = block

    def own(block):
        count = size = 0
        for shapes, _ in _HLO.findall(block):
            count += 1
            for dtype, dims in re.findall(r'([a-z]+\d*)\[([\d,]*)\]', shapes):
                size += BYTES[dtype] * int(__import__('math').prod(
                    int(d) for d in dims.split(',') if d))
        return count, size

    skipped = set()
    extra = [0, 0]
    for branches in re.findall(r'branch_computations=\{([^}]*)\}', text):
        names = [b.strip().lstrip('%') for b in branches.split(',')]
        costs = [own(computations.get(b, '')) for b in names]
        least = min(costs, key=lambda c: c[1])
        extra[0] += least[0]
        extra[1] += least[1]
        skipped.update(names)
    count, size = extra
    for name, block in computations.items():
        if name not in skipped:
            c, b = own(block)
            count, size = count + c, size + b
    return count, size


def jaxpr_collectives(jaxpr) -> tuple[int, int]:
    """(number, bytes of operands) of the named-axis reductions in a jaxpr,
    sub-jaxprs included; of a ``cond``'s branches only the one that sends
    least (data in range take it)."""
    import jax.extend
    count = size = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('psum', 'pmax', 'pmin', 'psum_invariant', 'all_gather',
                                  'all_to_all', 'ppermute', 'reduce_scatter'):
            count += 1
            size += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
        subs = [jaxpr_collectives(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == 'cond' and subs:
            subs = [min(subs, key=lambda c: c[1])]
        for c, s in subs:
            count, size = count + c, size + s
    return count, size


def _normalizers(names, groups=None, anchors=True):
    """``{name: f(x) -> (y, state)}``: per-shard programs; ``state`` is what the
    call returns besides ``y`` (new running statistics), or None."""
    import jax.numpy as jnp
    from flax import linen

    import normlib

    state = normlib.init_batch_norm(FEATURES)
    ones, zeros = jnp.ones(FEATURES), jnp.zeros(FEATURES)
    kw = dict(training=True, axis_name=names)
    group_kw = {} if groups is None else dict(axis_index_groups=groups)

    def flax_bn(fast):
        module = linen.BatchNorm(use_running_average=False, axis_name=names[0] if len(names) == 1
                                 else names, use_fast_variance=fast,
                                 axis_index_groups=groups)
        variables = module.init(__import__('jax').random.key(0), jnp.ones((LOCAL, FEATURES)))
        return lambda x: module.apply(variables, x, mutable=['batch_stats'])

    cases = {
        'batch_norm': lambda x: normlib.batch_norm(x, state, ones, zeros, **kw, **group_kw),
        'batch_norm masked': lambda x: normlib.batch_norm(
            x, state, ones, zeros, mask=x > -1, **kw, **group_kw),
    }
    if groups is None:
        cases.update({
            'ghost batch norm': lambda x: normlib.batch_norm(
                x, state, ones, zeros, virtual_batch_size=LOCAL // 2, **kw),
            'batch_renorm': lambda x: normlib.batch_renorm(x, state, ones, zeros, r_max=3.0,
                                                           d_max=5.0, **kw),
            'l1_batch_norm': lambda x: normlib.l1_batch_norm(x, state, ones, zeros, **kw),
            'lp_batch_norm p=3': lambda x: normlib.lp_batch_norm(x, state, ones, zeros, p=3.0,
                                                                 **kw),
            'lp_batch_norm p=inf': lambda x: normlib.lp_batch_norm(
                x, state, ones, zeros, p=float('inf'), **kw),
        })
    if anchors:
        cases.update({
            'flax.linen BatchNorm (default)': flax_bn(True),
            'flax.linen BatchNorm (two-pass)': flax_bn(False),
        })
    if groups is None:  # features sharded: x is (FEATURES rows, LOCAL columns) per shard
        cases.update({
            'layer_norm (sharded features)': lambda x: (
                normlib.layer_norm(x.T, axis_name=names).T, None),
            'rms_norm (sharded features)': lambda x: (
                normlib.rms_norm(x.T, axis_name=names).T, None),
        })
    return cases


def _programs(fn):
    """The forward ``x -> (y, state)`` and forward-and-backward ``(x, dy) -> (dx, state)``."""
    import jax

    def both(x, dy):
        _, vjp, state = jax.vjp(fn, x, has_aux=True)
        return vjp(dy)[0], state
    return fn, both


def measure(devices: int, anchors: bool = True) -> dict:
    """Collectives of every case in every mapping at ``devices`` shards
    (without Flax's BatchNorm unless ``anchors``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    out = {}
    local = jax.ShapeDtypeStruct((LOCAL, FEATURES), jnp.float32)

    def record(mapping, name, fwd, both):
        out.setdefault(mapping, {})[name] = {'forward': fwd, 'forward+backward': both}

    def trace_all(mapping, names, lower, groups=None):
        for name, fn in _normalizers(names, groups, anchors).items():
            fwd, both = _programs(fn)
            try:
                record(mapping, name, lower(fwd, 1), lower(both, 2))
            except Exception as error:  # e.g. a derivative JAX does not define
                try:
                    record(mapping, name, lower(fwd, 1), f'{type(error).__name__}')
                except Exception as error2:
                    record(mapping, name, f'{type(error2).__name__}', None)

    # pmap: one device per shard.
    def pmap_lower(f, arity, groups=None):
        spec = jax.ShapeDtypeStruct((devices,) + local.shape, local.dtype)
        return stablehlo_collectives(jax.pmap(f, axis_name='i').lower(*[spec] * arity).as_text())
    trace_all('pmap', ('i',), pmap_lower)
    group_size = 8
    groups = [list(range(g, devices, devices // group_size)) for g in range(devices // group_size)]
    trace_all('pmap, groups of 8', ('i',), pmap_lower, groups)

    def shard_map_lower(mesh, names, grouped=False):
        def lower(f, arity):
            spec = P(names)
            shape = (devices * LOCAL, FEATURES)
            arg = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
            body = f
            if grouped:  # statistics differ between groups: one row per shard
                def body(*args):
                    y, state = f(*args)
                    return y, jax.tree.map(lambda v: v[None], state)
            g = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * arity,
                                      out_specs=(spec, spec if grouped else P())))
            return stablehlo_collectives(g.lower(*[arg] * arity).as_text())
        return lower
    mesh1 = jax.make_mesh((devices,), ('i',))
    trace_all('shard_map 1-D', ('i',), shard_map_lower(mesh1, ('i',)))
    mesh2 = jax.make_mesh((devices // 4, 4), ('data', 'model'))
    trace_all('shard_map 2-D', ('data', 'model'), shard_map_lower(mesh2, ('data', 'model')))
    trace_all('shard_map 1-D, groups of 8', ('i',),
              shard_map_lower(mesh1, ('i',), grouped=True), groups)

    def vmap_lower(f, arity, groups=None):
        jaxpr = jax.make_jaxpr(f, axis_env=[('i', devices)])(*[jnp.zeros(local.shape)] * arity)
        return jaxpr_collectives(jaxpr.jaxpr)
    trace_all('vmap', ('i',), vmap_lower)

    # Sharded jit: no axis_name, the batch sharded over an Explicit mesh.
    import normlib
    state = normlib.init_batch_norm(FEATURES)
    sharded = jax.ShapeDtypeStruct((devices * LOCAL, FEATURES), jnp.float32,
                                   sharding=NamedSharding(mesh1, P('i')))
    from normlib import _precise as precise

    jit_cases = {
        'batch_norm': lambda x: normlib.batch_norm(x, state, training=True),
        'precise statistics (one batch)': lambda x: (precise.feature_moments(x, -1, None), None),
    }
    for name, fn in jit_cases.items():
        fwd, both = _programs(fn)
        with jax.set_mesh(mesh1):
            fwd_text = jax.jit(fwd).lower(sharded).compile().as_text()
            both_text = (jax.jit(both).lower(sharded, sharded).compile().as_text()
                         if name == 'batch_norm' else None)
        record('sharded jit (Explicit mesh)', name, hlo_collectives(fwd_text),
               None if both_text is None else hlo_collectives(both_text))
    return out


def main(argv) -> int:
    devices, anchors = int(argv[0]), '--normlib-only' not in argv
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={devices}')
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax
    assert len(jax.devices()) == devices, jax.devices()
    print(json.dumps({'devices': devices, 'features': FEATURES,
                      'cases': measure(devices, anchors)}))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
