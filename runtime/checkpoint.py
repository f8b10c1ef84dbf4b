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
from typing import Any, Dict, Iterable, Mapping, Optional

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


def as_tensors(source: Any, what: str = "the base") -> Optional[Mapping[str, np.ndarray]]:
    """A safetensors file's tensors, or the caller's mapping as it is (None stays None).

    The API takes a path where the CLI does (``--base``); folders, shard indexes and
    pickled formats are read by ``export.checkpoints.load_checkpoint``, which the runtime
    does not import.  Anything else is refused, never searched as if it were a mapping."""
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise TvswitchError("%s %s is a folder: give a safetensors file or a mapping of names to arrays (a "
                                "save_pretrained folder or shard index: "
                                "tvswitch.export.checkpoints.load_checkpoint(path).tensors)" % (what, os.fspath(source)))
        return read_safetensors(os.fspath(source))
    if source is not None and not isinstance(source, Mapping):
        raise TvswitchError("%s must be a safetensors path or a mapping of names to arrays, not %s"
                            % (what, type(source).__name__))
    return source


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


#: numpy dtype name -> the safetensors dtype string.
_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
             "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically (``tvswitch.files.atomic_write``): a crash or a
    full disk leaves the previous file (or none), never a half-written one.

    Written here rather than by ``safetensors.numpy.save_file``, whose metadata order
    changes from run to run: the same tensors and metadata give the same bytes (a bundle
    can be content-hashed, a build reproduced), and each tensor streams to the file from
    its own memory with no copy of the whole.  The layout is safetensors' own (header
    keys sorted, tensors by alignment then name, the header padded to 8 bytes), which
    safetensors reads back and every test holds it to.
    """
    arrays = {k: _little_endian(contiguous(v)) for k, v in tensors.items()}
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        a = arrays[name]
        if a.dtype.name not in _ST_NAMES:
            raise TvswitchError("%s: tensor %r is %s, which safetensors does not store" % (path, name, a.dtype))
        header[name] = {"dtype": _ST_NAMES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                if arrays[name].nbytes:
                    f.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))  # any dtype: bfloat16 too

    atomic_write(path, write)


def _little_endian(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
