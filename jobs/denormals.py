"""Subnormal floats flushed to zero on CPU, in every process that trains or runs the detector there.

x86 CPUs compute on subnormal operands (float32 magnitudes below 1.18e-38) many times slower than on normal
ones. This detector produces them in the backward pass of the box head's classification branch: the softmax
cross-entropy gradient ``p - y`` of confidently classified RoIs holds probabilities below 1.18e-38 for the
unlikely classes, and the fc7/fc6 gradients computed from it inherit them. Counted with hooks on a random
R-50 ``fc`` head at 512x672, batch 1, SGD: 5,342 of the 41,472 ``fc_cls`` output gradients subnormal in the
first step; 1.37 M subnormal values in ``fc6.weight.grad`` (12.8 M) and 171 k in ``fc7.weight.grad`` by the sixth;
none in the forward activations, weights or momentum. What they cost depends on the CPU: on the 2-core machine
where issue 11 was measured (1 thread, process clock, ``benchmarks/model_step.py``), six consecutive identical
``fc`` train steps took 4.7-39.0 s without flushing and 4.5-7.0 s with it; on an AMD EPYC machine a 1024x1024
matmul with subnormal operands took 23.1 ms, as with normal ones, and the same six steps 5.5-5.8 s either way.
Flushing is free where it is not needed.

``torch.set_flush_denormal(True)`` sets the FTZ/DAZ bits of the calling thread; threads created afterwards (the
intra-op pool) inherit them, so call :func:`flush_denormals` first thing in the process, before any parallel
op. Results change only where a value would have been below 1.18e-38. GPUs are unaffected.
"""

from __future__ import annotations

import torch


def flush_denormals() -> bool:
    """Flush subnormal floats to zero in this process's CPU arithmetic; ``False`` where the CPU cannot."""
    return bool(torch.set_flush_denormal(True))
