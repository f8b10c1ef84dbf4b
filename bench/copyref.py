"""The copy reference of every benchmark: what "x of copy" means in docs/results.

A ratio to copy is (bytes the operation must move / its time) over (the bandwidth of a
plain copy of the same number of bytes, on as many threads, measured in the same run).
"Bytes moved" counts reads and writes alike: a rebuild reads the base and the packed
task vectors and writes the weights; a copy of N bytes reads N/2 and writes N/2.

On the CPU the copy is ``numpy.copyto`` between two buffers of N/2 bytes, split in
``threads`` slices copied at once (numpy releases the GIL while it copies), the median
of ``repeat`` runs after a warm-up that pages the buffers in. On a GPU it is the
device's own copy, ``cuMemcpyDtoD`` of N/2 bytes timed with CUDA events
(bench/gpu_rebuild.py), the same definition on the device.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """The median time of ``repeat`` calls of ``fn``, after one untimed call."""
    fn()  # warm caches and page in the buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(nbytes: int, repeat: int = 15, threads: int = 1) -> float:
    """Bytes moved per second by a plain copy that moves ``nbytes`` (read + write)."""
    src = np.ones(max(nbytes // 2, 1), dtype=np.uint8)
    dst = np.empty_like(src)
    if threads <= 1:
        return nbytes / median_seconds(lambda: np.copyto(dst, src), repeat)
    bounds = np.linspace(0, src.size, threads + 1).astype(np.int64)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy() -> None:
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
        return nbytes / median_seconds(copy, repeat)
