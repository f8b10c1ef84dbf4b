"""Reading files under a root folder, so that every reader runs on captured copies.

Files under /proc and /sys are read at their real size (stat says 0 or 4096), may end
in NUL bytes (device-tree strings do) and may vanish between listing and reading; the
readers treat any of that as "absent" rather than failing the whole report.
"""
from __future__ import annotations

import os
from typing import List, Optional


def path_under(root: str, absolute: str) -> str:
    """Join an absolute device path onto ``root`` (``/`` on the device itself)."""
    return os.path.join(root, absolute.lstrip("/"))


def read_text(root: str, absolute: str, limit: int = 4 << 20) -> Optional[str]:
    """The file's text, or None when it is absent or unreadable (never raises)."""
    try:
        with open(path_under(root, absolute), "rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")


def read_strings(root: str, absolute: str) -> List[str]:
    """A device-tree string list: NUL-separated, NUL-terminated."""
    text = read_text(root, absolute)
    if text is None:
        return []
    return [s.strip() for s in text.split("\x00") if s.strip()]


def read_int(root: str, absolute: str) -> Optional[int]:
    text = read_text(root, absolute)
    if text is None:
        return None
    try:
        return int(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def list_dir(root: str, absolute: str) -> List[str]:
    try:
        return sorted(os.listdir(path_under(root, absolute)))
    except OSError:
        return []
