"""Benchmarks: normlib against Flax, Haiku, Equinox and PyTorch.

``python -m benchmarks`` times every case in one process, interleaving the
libraries round by round so that they all see the same machine load, and
compares each median with the memory-bandwidth floor measured in the same
rounds. It also reads the compiled HLO (fusions and bytes moved), the
temporaries of a jitted training step, and the output spread on offset data,
then writes ``RESULTS.md`` and ``results.png``. ``--smoke`` runs every path on
tiny inputs in seconds. Libraries that are not installed are skipped.
``bash benchmarks/gpu.sh`` (``python -m benchmarks --gpu-run``) is the run
for a GPU: device-side timing, bandwidth against the device's peak.
"""
