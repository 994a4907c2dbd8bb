#!/usr/bin/env bash
# The GPU run in one command, from anywhere: bash benchmarks/gpu.sh [ARGS...]
#
# 1. Finds a Python whose jax sees a GPU and that has flax, optax, numpy and
#    tqdm: $PYTHON if set, else out/gpu-venv (made by an earlier run), else
#    python3 (machines with a CUDA image ship one). normlib runs from this
#    checkout (PYTHONPATH), so nothing needs installing there.
# 2. Else makes out/gpu-venv and installs `-e ".[bench]"` and jax[cuda12] at
#    the installed jax's version, with short network timeouts: without a
#    reachable package index it says so and exits 3 within about a minute.
# 3. Runs `python -m benchmarks --gpu-run --out "${OUT:-out/gpu}"` under a
#    wall-clock limit, ARGS appended (e.g. --smoke). Budget for building and
#    timing: GPU_BUDGET_S seconds (default 270; results are saved after every
#    round). Writes results.json, RESULTS.md and log.txt there.
#
# Exit codes: 0 done, 2 no GPU, 3 installation failed, else the run's own.
# GPU_SH_ALLOW_CPU=1 lets it run without a GPU (to try it with --smoke).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out="${OUT:-out/gpu}"
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
budget="${GPU_BUDGET_S:-270}"
venv=out/gpu-venv
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# PyTorch (timed when it has CUDA) shares the card with JAX's preallocation.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
start=$SECONDS

ready() {  # ready PYTHON: jax on a GPU (or the CPU, if allowed) and the run's imports
    "$1" - <<'EOF' 2>/dev/null
import os, sys
import jax, flax, optax, numpy, tqdm  # noqa: F401
import normlib  # noqa: F401
on_gpu = jax.default_backend() == 'gpu'
print(f'{sys.executable}: jax {jax.__version__} on {jax.devices()[0].device_kind}')
sys.exit(0 if on_gpu or os.environ.get('GPU_SH_ALLOW_CPU') == '1' else 1)
EOF
}

python=""
for candidate in ${PYTHON:-} "$venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && timeout 120 bash -c "$(declare -f ready); ready $candidate"; then
        python="$candidate"
        break
    fi
done

if [ -z "$python" ]; then
    echo "gpu.sh: no Python with jax on a GPU here; installing into $venv"
    base=$(command -v python3 || command -v python) || { echo "gpu.sh: no python3"; exit 3; }
    version=$("$base" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
    [ -x "$venv/bin/python" ] || "$base" -m venv "$venv" || { echo "gpu.sh: venv failed"; exit 3; }
    pip=("$venv/bin/python" -m pip install --disable-pip-version-check --timeout 15 --retries 1)
    if ! timeout 240 "${pip[@]}" -e ".[bench]" "jax[cuda12]${version:+==$version}"; then
        echo "gpu.sh: pip could not install normlib[bench] and jax[cuda12]${version:+==$version}:"
        echo "gpu.sh: no package index reachable (or no matching wheel). Nothing was timed."
        exit 3
    fi
    python="$venv/bin/python"
    if ! ready "$python"; then
        echo "gpu.sh: jax installed but sees no GPU (jax.default_backend() is not 'gpu')."
        nvidia-smi -L 2>/dev/null || echo "gpu.sh: nvidia-smi finds no device either."
        exit 2
    fi
fi
echo "gpu.sh: python $python ready after $((SECONDS - start)) s; nvidia-smi:"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true

# The run stops adding rounds at its budget; the limit here only catches a hang.
timeout -k 10 $((budget + 120)) "$python" -m benchmarks --gpu-run --budget "$budget" \
    --out "$out" "$@"
status=$?
echo "gpu.sh: exit $status after $((SECONDS - start)) s; results in $out"
exit $status
