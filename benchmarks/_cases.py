"""The benchmark cases and, for each library, a runner that executes one case once.

A runner is a zero-argument callable that performs one call. JAX runners are
compiled before timing and return their (possibly unfinished) result for the
timer to wait on; PyTorch runners (CPU) finish in place and use channels-last
tensors for convolution activations.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import normlib

# The anchors normlib is compared with; 'jax' is the plain expression people
# write when a library has no such layer (Lp normalization).
LIBRARIES = ('normlib', 'flax', 'flax two-pass', 'haiku', 'equinox', 'torch', 'jax')
EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration.

    Attributes:
      op: 'batch_norm', 'layer_norm', 'rms_norm' or 'l2_normalize'.
      shape: the input's shape; features (or the normalized axis) last.
      dtype: 'float32' or 'bfloat16'.
      mode: 'fwd' (training-mode forward) or 'fwd+bwd' (forward and the
        gradients with respect to the input and the parameters).
    """
    op: str
    shape: tuple[int, ...]
    dtype: str = 'float32'
    mode: str = 'fwd+bwd'

    @property
    def name(self) -> str:
        dims = 'x'.join(map(str, self.shape))
        return f'{self.op} {self.mode} {dims} {self.dtype}'

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize

    @property
    def floor_arrays(self) -> int:
        """Arrays of ``x``'s size that any implementation must read or write.

        Forward: read x, write y. Forward and backward: that, then read x and
        dy and write dx. Statistics passes are extra.
        """
        return 2 if self.mode == 'fwd' else 5

    @property
    def floor_reads(self) -> int:
        """Of ``floor_arrays``, those read: x (forward); x, x and dy (both)."""
        return 1 if self.mode == 'fwd' else 3


def cases(smoke: bool = False) -> list[Case]:
    """Every case of the full run, or one tiny case per code path with ``smoke``."""
    if smoke:
        return [Case('batch_norm', (4, 6, 6, 8), mode='fwd'), Case('batch_norm', (4, 6, 6, 8)),
                Case('batch_norm', (32, 16), 'bfloat16'), Case('layer_norm', (64, 32)),
                Case('rms_norm', (64, 32)), Case('l2_normalize', (64, 32), mode='fwd'),
                Case('l2_normalize', (64, 32))]
    conv, conv_big, mlp = (128, 28, 28, 64), (64, 56, 56, 64), (4096, 1024)
    rows, wide = (8192, 1024), (2048, 4096)
    out = []
    for shape in (conv, conv_big, mlp):
        out += [Case('batch_norm', shape, mode='fwd'), Case('batch_norm', shape)]
    out.append(Case('batch_norm', conv, 'bfloat16'))
    for op in ('layer_norm', 'rms_norm'):
        out += [Case(op, rows), Case(op, wide), Case(op, rows, 'bfloat16')]
    out += [Case('l2_normalize', rows, mode='fwd'), Case('l2_normalize', rows)]
    return out


def data(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, dy)`` as float32 NumPy arrays: x offset from zero, dy standard normal."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(case.shape, np.float32) * 2 + 3).astype(np.float32)
    return x, rng.standard_normal(case.shape, np.float32)


def available(library: str) -> bool:
    module = {'flax two-pass': 'flax', 'jax': 'jax'}.get(library, library)
    module = {'haiku': 'haiku', 'equinox': 'equinox', 'torch': 'torch', 'flax': 'flax.linen'}.get(
        module, module)
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# JAX libraries: each builder returns (apply, params, state, x_layout) where
# apply(params, state, x) -> (y, new_state).

def _normlib(case, features):
    scale, bias = jnp.ones(features), jnp.zeros(features)
    if case.op == 'batch_norm':
        def apply(p, s, x):
            return normlib.batch_norm(x, s, *p, training=True, epsilon=EPSILON)
        return apply, (scale, bias), normlib.init_batch_norm(features)
    if case.op == 'layer_norm':
        return lambda p, s, x: (normlib.layer_norm(x, *p, epsilon=EPSILON), s), (scale, bias), None
    if case.op == 'rms_norm':
        return lambda p, s, x: (normlib.rms_norm(x, p, epsilon=EPSILON), s), scale, None
    return lambda p, s, x: (normlib.l2_normalize(x), s), (), None


def _flax(case, features, two_pass):
    import flax.linen as nn
    dtype = jnp.dtype(case.dtype)
    fast = {'use_fast_variance': not two_pass}
    module = {
        'batch_norm': lambda: nn.BatchNorm(use_running_average=False, momentum=0.99,
                                           epsilon=EPSILON, dtype=dtype, **fast),
        'layer_norm': lambda: nn.LayerNorm(epsilon=EPSILON, dtype=dtype, **fast),
        'rms_norm': lambda: None if two_pass else nn.RMSNorm(epsilon=EPSILON, dtype=dtype),
    }.get(case.op, lambda: None)()
    if module is None:
        return None
    variables = module.init(jax.random.key(0), jnp.zeros(case.shape, dtype))
    if case.op == 'batch_norm':
        def apply(p, s, x):
            y, updates = module.apply({'params': p, 'batch_stats': s}, x, mutable=['batch_stats'])
            return y, updates['batch_stats']
        return apply, variables['params'], variables['batch_stats']
    return lambda p, s, x: (module.apply({'params': p}, x), s), variables['params'], None


def _haiku(case, features):
    import haiku as hk
    if case.op == 'batch_norm':
        f = hk.transform_with_state(lambda x: hk.BatchNorm(True, True, 0.99, eps=EPSILON)(
            x, is_training=True))
        params, state = f.init(jax.random.key(0), jnp.zeros(case.shape, case.dtype))
        return lambda p, s, x: f.apply(p, s, None, x), params, state
    layer = {'layer_norm': lambda: hk.LayerNorm(-1, True, True, eps=EPSILON),
             'rms_norm': lambda: hk.RMSNorm(-1, eps=EPSILON)}.get(case.op)
    if layer is None:
        return None
    f = hk.without_apply_rng(hk.transform(lambda x: layer()(x)))
    params = f.init(jax.random.key(0), jnp.zeros(case.shape, case.dtype))
    return lambda p, s, x: (f.apply(p, x), s), params, None


def _equinox(case, features):
    import equinox as eqx
    if case.op == 'batch_norm':
        model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            features, axis_name='batch', eps=EPSILON, momentum=0.99, mode='ema',
            dtype=jnp.dtype(case.dtype))
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def apply(p, s, x):
            return jax.vmap(eqx.combine(p, static), axis_name='batch', in_axes=(0, None),
                            out_axes=(0, None))(x, s)
        return apply, params, state
    layer = {'layer_norm': lambda: eqx.nn.LayerNorm(features, eps=EPSILON),
             'rms_norm': lambda: eqx.nn.RMSNorm(features, eps=EPSILON, use_bias=False)}.get(case.op)
    if layer is None:
        return None
    params, static = eqx.partition(layer(), eqx.is_inexact_array)
    return lambda p, s, x: (jax.vmap(eqx.combine(p, static))(x), s), params, None


def _plain_jax(case, features):
    if case.op != 'l2_normalize':
        return None

    def apply(p, s, x):
        xf = x.astype(jnp.float32)
        norm = jnp.linalg.norm(xf, axis=-1, keepdims=True)
        return (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype), s
    return apply, (), None


def _jax_runner(built, case, x, dy):
    apply, params, state = built
    if case.mode == 'fwd':
        f, args = jax.jit(apply), (params, state, x)
    else:
        def f(params, state, x, dy):
            y, vjp, new_state = jax.vjp(lambda p, x: apply(p, state, x), params, x, has_aux=True)
            return y, new_state, vjp(dy)
        f, args = jax.jit(f), (params, state, x, dy)
    compiled = f.lower(*args).compile()
    return lambda: compiled(*args), compiled


def _jax_loop_runner(built, case, x, dy, repeats):
    """A runner of ``repeats`` calls in one ``fori_loop``: each iteration takes
    the last one's output as its input (y for the forward, dx for both), so
    that XLA can hoist nothing out of the loop."""
    apply, params, state = built
    if case.mode == 'fwd':
        def f(params, state, x):
            def body(_, carry):
                x, s = carry
                y, s = apply(params, s, x)
                return y.astype(x.dtype), s
            return jax.lax.fori_loop(0, repeats, body, (x, state))
        args = (params, state, x)
    else:
        def f(params, state, x, dy):
            def step(s, x):
                y, vjp, s = jax.vjp(lambda p, x: apply(p, s, x), params, x, has_aux=True)
                dp, dx = vjp(dy)
                return dx.astype(x.dtype), s, y, dp
            # y and the parameters' gradients ride in the carry: outputs of
            # the last iteration, they are computed in every one.
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                 jax.eval_shape(step, state, x)[2:])
            return jax.lax.fori_loop(0, repeats, lambda _, c: step(c[1], c[0]),
                                     (x, state, *zeros))
        args = (params, state, x, dy)
    compiled = jax.jit(f).lower(*args).compile()
    return lambda: compiled(*args)


def _torch_runner(case, x_np, dy_np, device='cpu'):
    import torch
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[case.dtype]
    features = case.shape[-1]

    def tensor(a):
        t = torch.from_numpy(a).to(device=device, dtype=dtype)
        # An NHWC array seen as NCHW is exactly PyTorch's channels-last layout.
        return t.permute(0, 3, 1, 2) if t.ndim == 4 else t

    x, dy = tensor(x_np), tensor(dy_np)
    if case.op == 'batch_norm':
        layer = (torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d)(
            features, eps=EPSILON, momentum=0.01)
    elif case.op == 'layer_norm':
        layer = torch.nn.LayerNorm(features, eps=EPSILON)
    elif case.op == 'rms_norm':
        layer = torch.nn.RMSNorm(features, eps=EPSILON)
    else:
        def layer(t):
            return torch.nn.functional.normalize(t, dim=-1)
    if isinstance(layer, torch.nn.Module):
        layer.to(device=device, dtype=dtype).train()

    if case.mode == 'fwd':
        def run():
            with torch.no_grad():
                layer(x)
    else:
        x.requires_grad_(True)

        def run():
            x.grad = None
            if isinstance(layer, torch.nn.Module):
                layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
    run()  # fails here, before timing, if PyTorch lacks this case
    return run


def _builders(case: Case) -> dict[str, Callable[[], Any]]:
    features = case.shape[-1]
    return {
        'normlib': lambda: _normlib(case, features),
        'flax': lambda: _flax(case, features, two_pass=False),
        'flax two-pass': lambda: _flax(case, features, two_pass=True),
        'haiku': lambda: _haiku(case, features),
        'equinox': lambda: _equinox(case, features),
        'jax': lambda: _plain_jax(case, features),
    }


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def device_data(case: Case, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(x, dy)`` in the case's dtype, drawn on the device as ``data`` draws them
    (x offset from zero, dy standard normal): large arrays take seconds in NumPy."""
    kx, kdy = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, case.shape, jnp.float32) * 2 + 3
    return x.astype(case.dtype), jax.random.normal(kdy, case.shape, jnp.float32).astype(case.dtype)


def loop_runners(case: Case, repeats: int, libraries=LIBRARIES, target_s: float = 0.025
                 ) -> tuple[dict[str, tuple[Callable[[], Any], int]], dict[str, str]]:
    """``({library: (runner, calls)}, {library: error})``: each runner makes
    ``calls`` calls of ``case`` and waits for the last, for timing on a GPU.

    JAX libraries run ``repeats`` calls as one ``fori_loop`` program; PyTorch
    (on a GPU only, when it has CUDA) queues eager calls, as many as last
    about ``target_s``, and synchronizes.
    """
    x, dy = device_data(case)
    builders = _builders(case)
    out, errors = {}, {}
    for library in libraries:
        if not available(library) or library in ('haiku', 'equinox'):
            continue  # their layouts and wrappers are for the CPU comparison
        try:
            if library == 'torch':
                if jax.default_backend() != 'gpu' or not _torch_cuda():
                    continue
                out[library] = _torch_queue(case, x, dy, target_s)
                continue
            built = builders[library]()
            if built is not None:
                out[library] = _jax_loop_runner(built, case, x, dy, repeats), repeats
        except Exception as e:  # noqa: BLE001 -- an anchor's failure is a result
            if library == 'normlib':
                raise
            errors[library] = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    return out, errors


def _torch_queue(case, x, dy, target_s):
    import time

    import torch
    f32 = (np.array(a.astype(jnp.float32)) for a in (x, dy))  # writable, for torch
    call = _torch_runner(case, *f32, device='cuda')

    def queue(n):
        def run():
            for _ in range(n):
                call()
            torch.cuda.synchronize()
        return run
    queue(3)()
    start = time.perf_counter()
    queue(10)()
    n = max(1, round(target_s / ((time.perf_counter() - start) / 10)))
    return queue(n), n


def runners(case: Case, libraries=LIBRARIES) -> tuple[dict[str, Callable[[], Any]], dict[str, str],
                                                    dict[str, str]]:
    """``({library: runner}, {library: compiled HLO text}, {library: error})`` for ``case``.

    Libraries that are not installed or have no such layer are left out; an
    anchor that fails on the case (a dtype it does not support) is reported
    in the errors.
    """
    x_np, dy_np = data(case)
    dtype = jnp.dtype(case.dtype)
    x, dy = jnp.asarray(x_np, dtype), jnp.asarray(dy_np, dtype)
    builders = _builders(case)
    out, hlo, errors = {}, {}, {}
    for library in libraries:
        if not available(library) or library == 'torch' and jax.default_backend() != 'cpu':
            continue  # PyTorch is timed on the CPU only
        try:
            if library == 'torch':
                out[library] = _torch_runner(case, x_np, dy_np)
                continue
            built = builders[library]()
            if built is None:
                continue
            if library == 'equinox' and len(case.shape) == 4 and case.op == 'batch_norm':
                # Equinox normalizes channels-first examples: give it that layout.
                xs, dys = (jnp.asarray(np.moveaxis(a, -1, 1), dtype) for a in (x_np, dy_np))
            else:
                xs, dys = x, dy
            out[library], compiled = _jax_runner(built, case, xs, dys)
            hlo[library] = compiled.as_text()
        except Exception as e:  # noqa: BLE001 -- an anchor's failure is a result
            if library == 'normlib':
                raise
            errors[library] = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    return out, hlo, errors


def copy_runners(case: Case) -> dict[str, Callable[[], Any]]:
    """Copies of an array of ``x``'s size: a jitted ``x + 1`` and NumPy's copyto."""
    dtype = jnp.dtype(case.dtype)
    x = jnp.asarray(data(case)[0], dtype)
    plus_one = jax.jit(lambda a: a + jnp.asarray(1, a.dtype)).lower(x).compile()
    src = np.asarray(x)
    dst = np.empty_like(src)
    out = {'copy (jax)': lambda: plus_one(x)}
    if jax.default_backend() == 'cpu':
        out['copy (numpy)'] = lambda: np.copyto(dst, src)
    return out
