"""The L4T release from /etc/nv_tegra_release, and the JetPack it belongs to.

The device records only the L4T release (``# R32 (release), REVISION: 7.1, ...``);
people quote JetPack numbers, so the map lives here. Where the ``nvidia-jetpack``
package is installed its version is the better answer and ``platform`` prefers it.
The file has one line on L4T R32 and R35 (older R28-era files followed it with sha1
sums of the Tegra libraries) and, from R36, ``# KERNEL_VARIANT: oot`` and two
``TARGET_USERSPACE_LIB_DIR`` lines; only the first line is parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from tvswitch.jetson._files import read_text
from tvswitch.jetson.devices import JetPackLine, line_for_l4t

RELEASE_FILE = "/etc/nv_tegra_release"

_HEAD = re.compile(r"#\s*R(\d+)\s*\(release\)\s*,\s*REVISION:\s*([\d.]+)", re.IGNORECASE)
_FIELD = re.compile(r"(GCID|BOARD|EABI|DATE):\s*([^,\n]+)")

#: L4T release -> JetPack release (NVIDIA's JetPack archive). Unknown patch levels fall
#: back to their line (4.6, 5.1, 6.0, 6.2) in ``jetpack_for``.
L4T_TO_JETPACK: Dict[str, str] = {
    "32.4.3": "4.4", "32.4.4": "4.4.1", "32.5.0": "4.5", "32.5.1": "4.5.1", "32.5.2": "4.5.1",
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "32.7.6": "4.6.6",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}


@dataclass(frozen=True)
class L4TRelease:
    major: int
    revision: str
    board: str = ""
    date: str = ""

    @property
    def version(self) -> str:
        """``32.7.1``: major plus revision, the form NVIDIA's tables use."""
        rev = self.revision if self.revision.count(".") >= 1 else self.revision + ".0"
        return "%d.%s" % (self.major, rev)

    @property
    def minor(self) -> int:
        head = self.revision.split(".")[0]
        return int(head) if head.isdigit() else 0

    @property
    def line(self) -> Optional[JetPackLine]:
        """The JetPack line of this release (R36.3 is 6.0, R36.4 is 6.1/6.2), or None."""
        return line_for_l4t(self.major, self.minor)


def parse_release(text: str) -> Optional[L4TRelease]:
    """Parse the file's first line; None when it is not an L4T release stamp."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    m = _HEAD.search(first)
    if m is None:
        return None
    fields = {k.upper(): v.strip() for k, v in _FIELD.findall(first)}
    return L4TRelease(int(m.group(1)), m.group(2).strip("."), fields.get("BOARD", ""), fields.get("DATE", ""))


def read_release(root: str = "/") -> Optional[L4TRelease]:
    """The release stamp under ``root``, or None where there is none (x86, a bare container)."""
    text = read_text(root, RELEASE_FILE)
    return parse_release(text) if text else None


def jetpack_for(release: L4TRelease, jetpack_package: Optional[str] = None) -> Tuple[str, str]:
    """(JetPack version, how we know): the installed meta-package beats the map."""
    if jetpack_package:
        # "4.6.1-b110", "5.1.1-b56", "6.2+b77": the part before the build number
        return re.split(r"[-+]", jetpack_package)[0], "nvidia-jetpack package"
    if release.version in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[release.version], "L4T %s" % release.version
    if release.line:
        return release.line.name + ".x", "L4T %s line" % release.line.l4t_name
    return "unknown", "L4T %s is not in tvswitch's table" % release.version
