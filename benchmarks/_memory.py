"""Temporaries and time of a jitted training step of an MLP with batch norm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import normlib.linen

# The BatchNorm layers compared, all in training mode.
NORMS = {
    'normlib': lambda: normlib.linen.BatchNorm(use_running_average=False),
    'flax': lambda: nn.BatchNorm(use_running_average=False),
    'flax two-pass': lambda: nn.BatchNorm(use_running_average=False, use_fast_variance=False),
}


class MLP(nn.Module):
    """``depth`` times Dense (no bias), BatchNorm, ReLU."""
    norm: str
    depth: int
    width: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(NORMS[self.norm]()(nn.Dense(self.width, use_bias=False)(x)))
        return x


def training_step(norm: str, batch: int, width: int, depth: int = 8):
    """A compiled SGD step ``(variables, x) -> (variables, loss)`` and its arguments.

    The variables are donated, as in a training loop, so the step's
    temporaries are what it needs beyond its inputs and outputs.
    """
    model = MLP(norm, depth, width)
    x = jax.random.normal(jax.random.key(0), (batch, width))
    variables = model.init(jax.random.key(1), x)

    def step(variables, x):
        def loss(params):
            y, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                     x, mutable=['batch_stats'])
            return jnp.mean(jnp.square(y)), updates['batch_stats']
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
        params = jax.tree.map(lambda p, g: p - 0.01 * g, variables['params'], grads)
        return {'params': params, 'batch_stats': stats}, value

    compiled = jax.jit(step, donate_argnums=0).lower(variables, x).compile()
    return compiled, variables, x


def measure(batch: int, width: int, depth: int = 8) -> tuple[dict, dict]:
    """``({norm: temp bytes}, {norm: runner})`` for every BatchNorm in NORMS."""
    temps, runners = {}, {}
    for norm in NORMS:
        compiled, variables, x = training_step(norm, batch, width, depth)
        temps[norm] = compiled.memory_analysis().temp_size_in_bytes
        state = {'variables': variables}

        def run(compiled=compiled, state=state, x=x):
            state['variables'], value = compiled(state['variables'], x)
            return value
        runners[norm] = run
    return temps, runners
