"""Measure this machine's memory copy bandwidth, the yardstick of a switch (the switch floor, docs/architecture.md).

A rebuild reads the base and writes the weights, so its floor is set by copy bandwidth,
not by the data sheet's peak. Measured the same way on every machine (numpy copy of a
buffer far larger than the caches, best of a few), it makes switch times comparable
across machines as a fraction of what the memory can do.
"""
from __future__ import annotations

import time


def measure_copy_gbs(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second in GB/s (1e9), best of ``repeats``."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * src.nbytes / best / 1e9
