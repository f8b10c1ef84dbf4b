"""The copy reference of every benchmark: what "x of copy" means in docs/results.

A ratio to copy is (bytes the operation must move / its time) over (the bandwidth of a
plain copy of the same number of bytes, on as many threads, measured in the same run).
"Bytes moved" counts reads and writes alike: a rebuild reads the base and the packed
task vectors and writes the weights; a copy of N bytes reads N/2 and writes N/2.

On the CPU the copy is ``numpy.copyto`` between two buffers of N/2 bytes, split in
``threads`` slices copied at once (numpy releases the GIL while it copies), the median
of ``repeat`` runs after a warm-up that pages the buffers in; where a benchmark times an
operation against it, the two are timed in turn (``timed_beside_copy``). On a GPU it is the
device's own copy, ``cuMemcpyDtoD`` of N/2 bytes timed with CUDA events
(bench/gpu_rebuild.py), the same definition on the device.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, List, NamedTuple, Sequence

import numpy as np


#: Seconds timed_beside_copy waits before each call it times.
SETTLE_S = 0.05


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """The median time of ``repeat`` calls of ``fn``, after one untimed call."""
    fn()  # warm caches and page in the buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@contextmanager
def copiers(sizes: Sequence[int], threads: int = 1) -> Iterator[List[Callable[[], None]]]:
    """Per size in ``sizes``, a plain copy that moves that many bytes (read + write) on
    ``threads`` threads; the copies share one pair of buffers, the largest's."""
    src = np.ones(max(max(sizes) // 2, 1), dtype=np.uint8)
    dst = np.empty_like(src)
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        def copy_of(nbytes: int) -> Callable[[], None]:
            n = max(nbytes // 2, 1)
            if threads <= 1:
                return lambda: np.copyto(dst[:n], src[:n])
            bounds = np.linspace(0, n, threads + 1).astype(np.int64)
            slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

            def copy() -> None:
                list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            return copy
        yield [copy_of(n) for n in sizes]


def copy_bandwidth(nbytes: int, repeat: int = 15, threads: int = 1) -> float:
    """Bytes moved per second by a plain copy that moves ``nbytes`` (read + write)."""
    with copiers([nbytes], threads) as (copy,):
        return nbytes / median_seconds(copy, repeat)


class BesideCopy(NamedTuple):
    """An operation that moves ``nbytes`` and a copy of as many bytes, timed in turn: the
    medians, and the fastest calls (what the machine does when nobody else runs on it,
    timeit's advice for a shared machine)."""

    nbytes: int
    seconds: float
    copy_seconds: float
    fastest_seconds: float
    fastest_copy_seconds: float

    @property
    def copy_bw(self) -> float:
        return self.nbytes / self.copy_seconds

    @property
    def ratio(self) -> float:
        """The operation's bandwidth over the copy's, medians: the copy's time over its."""
        return self.copy_seconds / self.seconds

    @property
    def fastest_ratio(self) -> float:
        """The same of the fastest calls."""
        return self.fastest_copy_seconds / self.fastest_seconds


def timed_beside_copy(fn: Callable[[], object], nbytes: int, repeat: int = 15, threads: int = 1) -> BesideCopy:
    """``fn`` and a copy of ``nbytes`` timed in turn (``fn``, copy, ``fn``, copy, ...)
    after one untimed call of each, each call after a pause of ``SETTLE_S``.

    On a shared machine the speed moves from second to second (another tenant, the clock);
    timing the operation and then the copy lets one slow spell land on one of them and
    move their ratio by a third.  In turn, a slow spell slows both.  The pause keeps one
    call's leftovers off the next: libgomp's threads spin for a while after a parallel
    region before they sleep, and a two-thread copy right after a two-thread rebuild moved
    17.5 GB/s against 23.8 alone, 22.1 after 50 ms (one run; docs/kernels.md, "Threads
    between switches").  So the ratios since 2026-12-08 are of calls from a rested state,
    not back to back as before.
    """
    with copiers([nbytes], threads) as (copy,):
        fn()
        copy()
        op_times, copy_times = [], []
        for _ in range(repeat):
            for call, times in ((fn, op_times), (copy, copy_times)):
                time.sleep(SETTLE_S)
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
    return BesideCopy(nbytes, float(np.median(op_times)), float(np.median(copy_times)), min(op_times),
                      min(copy_times))
