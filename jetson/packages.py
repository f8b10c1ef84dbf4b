"""Versions of CUDA, cuDNN, TensorRT and Python from the dpkg database.

JetPack installs them all as Debian packages, so /var/lib/dpkg/status answers without
running anything or loading a library (loading libnvinfer costs seconds on a Nano). The
package names change between lines (libnvinfer8 -> libnvinfer10, libcudnn8 ->
libcudnn9-cuda-12), so each component has a pattern, not a name.
"""
from __future__ import annotations

import json
import re
from typing import Dict, Optional

from tvswitch.jetson._files import read_text

STATUS_FILE = "/var/lib/dpkg/status"

#: component -> package name pattern; the highest installed match wins
COMPONENTS = {
    "cuda": re.compile(r"^cuda-cudart-(\d+)-(\d+)$"),
    "cudnn": re.compile(r"^libcudnn(\d+)(-cuda-\d+)?$"),
    "tensorrt": re.compile(r"^libnvinfer(\d+)$"),
    "python3": re.compile(r"^python3$"),
    "l4t_core": re.compile(r"^nvidia-l4t-core$"),
    "jetpack": re.compile(r"^nvidia-jetpack$"),
    "python3_tensorrt": re.compile(r"^python3-libnvinfer$"),
}


def parse_status(text: str) -> Dict[str, str]:
    """Installed packages -> version, from dpkg's status file (stanzas split by blank lines)."""
    installed = {}  # type: Dict[str, str]
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}  # type: Dict[str, str]
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        name, version = fields.get("Package"), fields.get("Version")
        if name and version and fields.get("Status", "").endswith(" installed"):
            installed[name] = version
    return installed


def upstream_version(debian_version: str) -> str:
    """``8.2.1-1+cuda10.2`` -> ``8.2.1``; ``3.6.7-1~18.04`` -> ``3.6.7``."""
    v = debian_version.split(":", 1)[-1]
    return re.split(r"[-~+]", v)[0]


def component_versions(installed: Dict[str, str]) -> Dict[str, str]:
    """component -> upstream version of the newest matching package."""
    found = {}  # type: Dict[str, str]
    for component, pattern in COMPONENTS.items():
        names = sorted(n for n in installed if pattern.match(n))
        if names:
            best = max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", upstream_version(installed[n]))])
            found[component] = upstream_version(installed[best])
    return found


def read_cuda_version_file(root: str = "/") -> Optional[str]:
    """The toolkit's own stamp: version.json (CUDA 11+) or version.txt (CUDA 10.2)."""
    text = read_text(root, "/usr/local/cuda/version.json")
    if text:
        try:
            data = json.loads(text)
            return str(data.get("cuda_cudart", data.get("cuda", {})).get("version"))
        except (ValueError, AttributeError):
            pass
    text = read_text(root, "/usr/local/cuda/version.txt")
    if text:
        m = re.search(r"CUDA Version\s+([\d.]+)", text)
        if m:
            return m.group(1)
    return None


def read_versions(root: str = "/") -> Dict[str, str]:
    """Everything this module can tell about the installed NVIDIA stack (may be empty)."""
    text = read_text(root, STATUS_FILE, limit=64 << 20)
    versions = component_versions(parse_status(text)) if text else {}
    if "cuda" not in versions:
        cuda = read_cuda_version_file(root)
        if cuda:
            versions["cuda"] = cuda
    return versions
