"""One process of the multi-process test.

    python _distributed_worker.py PORT RANK PROCESSES OUT

Each of ``PROCESSES`` processes holds its share of a global batch on its 2
CPU devices; batch statistics are synced over all devices with gloo, and one
SGD step is taken.
The test compares what each process saved with a single-process run of
:func:`train_step` on the whole batch.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import normlib

LOCAL_DEVICES = 2


def global_problem():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 4, 4, 3)) * 2 + 300).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    return x, np.ones(3, np.float32), np.zeros(3, np.float32), w


def train_step(x, scale, bias, w, axis_name, lr=0.1):
    """One SGD step on sum(w * batch_norm(x)); returns (state, scale, bias)."""
    def loss(params, x, w):
        y, state = normlib.batch_norm(x, normlib.init_batch_norm(3), *params, training=True,
                                      axis_name=axis_name)
        return jnp.sum(w * y), state

    # Inside shard_map the cotangent of a replicated parameter is already
    # summed over the shards (JAX's transpose of the implicit broadcast).
    grads, state = jax.grad(loss, has_aux=True)((scale, bias), x, w)
    return state, scale - lr * grads[0], bias - lr * grads[1]


def main(port, rank, processes, out):
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=processes, process_id=rank,
                               initialization_timeout=60)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((processes * LOCAL_DEVICES,), ('batch',))  # Explicit axes
    x, scale, bias, w = global_problem()
    share = len(x) // processes
    local = slice(rank * share, (rank + 1) * share)
    sharding = NamedSharding(mesh, P('batch'))
    xg, wg = (jax.make_array_from_process_local_data(sharding, a[local]) for a in (x, w))
    step = jax.jit(jax.shard_map(functools.partial(train_step, axis_name='batch'), mesh=mesh,
                                 in_specs=(P('batch'), P(), P(), P('batch')),
                                 out_specs=(P(), P(), P())))
    state, new_scale, new_bias = step(xg, scale, bias, wg)
    np.savez(f'{out}/rank{rank}.npz', mean=np.asarray(state.mean), var=np.asarray(state.var),
             scale=np.asarray(new_scale), bias=np.asarray(new_bias))
    jax.distributed.shutdown()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
