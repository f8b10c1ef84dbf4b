"""Total and free memory from /proc/meminfo, and what NvMap holds for the GPU.

Jetson DRAM is shared by CPU and GPU. ``cudaMemGetInfo`` there reports a free figure
that ignores memory NvMap has handed out and page cache the kernel would drop, so the
honest budget comes from the kernel: MemAvailable, plus NvMapMemFree, with NvMapMemUsed
shown beside it (L4T R32/R35 kernels add the two NvMap lines; R36's out-of-tree NvMap,
mainline and x86 kernels do not).

Why NvMapMemFree counts as free: in L4T's kernel (drivers/video/tegra/nvmap/nvmap_pp.c)
it is ``nvmap_page_pool_get_unused_pages()``, the pages of NvMap's page pool: pages
NvMap took from the kernel and keeps, zeroed, for its next allocation. The kernel does
not count them in MemFree or MemAvailable, yet they are not in use: NvMap's next
allocations (every CUDA allocation on Jetson is one) take them first
(``nvmap_page_pool_alloc_lots``), and a registered shrinker (``nvmap_page_pool_shrinker``)
returns them to the kernel under memory pressure. Leaving them out would understate what
a deployment can allocate by up to the pool's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from tvswitch.jetson._files import read_text

MEMINFO_FILE = "/proc/meminfo"


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int
    free_bytes: int
    swap_total_bytes: int = 0
    nvmap_used_bytes: Optional[int] = None
    cma_total_bytes: Optional[int] = None
    #: NvMap's page pool: free for NvMap's (the GPU's) next allocations, not in MemAvailable
    nvmap_free_bytes: Optional[int] = None

    @property
    def usable_bytes(self) -> int:
        """What a deployment can still allocate: MemAvailable plus NvMap's unused pool."""
        return self.available_bytes + (self.nvmap_free_bytes or 0)


def parse_meminfo(text: str) -> Dict[str, int]:
    """Field -> bytes (the file states kB; a few fields are bare counts)."""
    out = {}  # type: Dict[str, int]
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if len(parts) > 1 and parts[1].lower() == "kb" else value
    return out


def read_memory(root: str = "/") -> Optional[MemoryInfo]:
    text = read_text(root, MEMINFO_FILE)
    if not text:
        return None
    m = parse_meminfo(text)
    if "MemTotal" not in m:
        return None
    free = m.get("MemFree", 0)
    # kernels before 3.14 lack MemAvailable; the L4T ones we support all have it
    available = m.get("MemAvailable", free + m.get("Cached", 0))
    return MemoryInfo(
        total_bytes=m["MemTotal"],
        available_bytes=available,
        free_bytes=free,
        swap_total_bytes=m.get("SwapTotal", 0),
        nvmap_used_bytes=m.get("NvMapMemUsed"),
        cma_total_bytes=m.get("CmaTotal"),
        nvmap_free_bytes=m.get("NvMapMemFree"),
    )
