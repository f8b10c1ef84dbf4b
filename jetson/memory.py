"""Total and free memory from /proc/meminfo, and what NvMap holds for the GPU.

Jetson DRAM is shared by CPU and GPU. ``cudaMemGetInfo`` there reports a free figure
that ignores memory NvMap has handed out and page cache the kernel would drop, so the
honest budget comes from the kernel: MemAvailable, with NvMapMemUsed shown beside it
(L4T kernels add that line; mainline and x86 kernels do not).
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
    )
