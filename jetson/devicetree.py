"""Board model, module part numbers, SoC and compute capability from the device tree.

``compatible`` is the reliable source: its last entry names the SoC (``nvidia,tegra210``)
and its first names carrier and module (``nvidia,p3768-0000+p3767-0005``). ``model`` is
for people: NVIDIA changes its wording between releases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from tvswitch.jetson._files import read_strings, read_text
from tvswitch.jetson.devices import SOC_COMPUTE_CAPABILITY

MODEL_FILE = "/proc/device-tree/model"
COMPATIBLE_FILE = "/proc/device-tree/compatible"

_PART = re.compile(r"p\d{4}-\d{4}")


@dataclass(frozen=True)
class DeviceTree:
    model: str = ""
    compatible: List[str] = field(default_factory=list)

    @property
    def soc(self) -> str:
        """``tegra210`` etc., or "" when no entry names a Tegra SoC."""
        for entry in reversed(self.compatible):
            name = entry.split(",", 1)[-1]
            if name.startswith("tegra"):
                return name
        return ""

    @property
    def parts(self) -> List[str]:
        """Module and carrier part numbers (``p3767-0005``) in the order the tree names them."""
        found = []  # type: List[str]
        for entry in self.compatible:
            for p in _PART.findall(entry):
                if p not in found:
                    found.append(p)
        return found

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]:
        return SOC_COMPUTE_CAPABILITY.get(self.soc)


def read_device_tree(root: str = "/") -> Optional[DeviceTree]:
    """None when there is no device tree (x86) or it names no NVIDIA SoC."""
    model = (read_text(root, MODEL_FILE) or "").replace("\x00", "").strip()
    compatible = read_strings(root, COMPATIBLE_FILE)
    if not model and not compatible:
        return None
    return DeviceTree(model, compatible)
