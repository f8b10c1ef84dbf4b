"""Weights on the device side: safetensors files as numpy arrays, and the base fingerprint.

The device reads checkpoints without torch.  The fingerprint ties a bundle to the exact
base weights the task vectors were taken against: a bundle applied to any other base
would rebuild plausible-looking garbage, so the reader refuses it instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.files import atomic_write


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (no torch, no pickle).

    bfloat16 tensors, which numpy has no type for, are widened to float32 exactly (a
    bfloat16 is the top half of a float32).
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise TvswitchError("%s: no such file" % path)
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            wide = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
            out = {k: f.get_tensor(k) for k in keys if k not in wide}
        if wide:
            out.update(_bfloat16_as_float32(path, wide))
        return {k: out[k] for k in keys}
    except (SafetensorError, ValueError, TypeError, OSError, KeyError) as exc:
        raise TvswitchError("%s: not a readable safetensors file (%s)" % (path, exc)) from None


def _bfloat16_as_float32(path: str, names: Iterable[str]) -> Dict[str, np.ndarray]:
    """The bfloat16 tensors ``names`` of a safetensors file, read from its header's offsets."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        out = {}
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(8 + length + begin)
            raw = np.frombuffer(f.read(end - begin), dtype="<u2")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, keeping its shape: np.ascontiguousarray turns a 0-d array (a
    BatchNorm's ``num_batches_tracked``) into shape (1,), which would change what is
    fingerprinted and what is written."""
    return np.asarray(a, order="C")


def fingerprint(tensors: Mapping[str, np.ndarray], names: Iterable[str]) -> str:
    """sha256 over the named tensors' names, dtypes, shapes and bytes, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(names):
        a = contiguous(tensors[name])
        h.update(("%s|%s|%s\n" % (name, a.dtype.str, list(a.shape))).encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return "sha256:" + h.hexdigest()


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically (``tvswitch.files.atomic_write``): a crash or a
    full disk leaves the previous file (or none), never a half-written one."""
    from safetensors.numpy import save_file

    arrays = {k: contiguous(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
