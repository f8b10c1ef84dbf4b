"""Writing a bundle: payloads with CRCs, the manifest with its digest, atomically
(``tvswitch.files.atomic_write``: a crash leaves the old file or the new one)."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import zlib
from typing import Dict

import numpy as np

from tvswitch import __version__
from tvswitch.errors import TvswitchError
from tvswitch.runtime.bundle import manifest as fmt
from tvswitch.runtime.checkpoint import contiguous, write_safetensors


class PayloadStore:
    """The payloads of a bundle being written, with their manifest descriptions."""

    def __init__(self, entropy: str = "none"):
        if entropy not in fmt.CODECS:
            raise TvswitchError("--entropy must be one of %s, got %r" % (", ".join(fmt.CODECS), entropy))
        self.entropy = entropy
        self.stored: Dict[str, np.ndarray] = {}
        self.info: Dict[str, dict] = {}

    def add(self, key: str, array: np.ndarray, compress: bool = True) -> str:
        """Store ``array`` under ``key``, entropy coded when that makes it smaller."""
        if key in self.stored:
            raise ValueError("payload %r added twice" % key)
        array = contiguous(array)
        stored, codec = array, "none"
        if compress and self.entropy != "none" and array.nbytes >= 256:
            raw = array.reshape(-1).view(np.uint8).tobytes()
            packed = zlib.compress(raw, 9) if self.entropy == "zlib" else lzma.compress(raw, preset=6)
            if len(packed) < len(raw):
                stored, codec = np.frombuffer(packed, dtype=np.uint8).copy(), self.entropy
        self.stored[key] = stored
        self.info[key] = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "codec": codec,
            "crc32": zlib.crc32(stored.reshape(-1).view(np.uint8).data),
        }
        return key

    def copy_from(self, key: str, stored: np.ndarray, info: dict) -> None:
        """Carry a payload over from another bundle byte for byte (add/remove task)."""
        self.stored[key] = stored
        self.info[key] = dict(info)


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, separators=(",", ":"), sort_keys=False)


def write_bundle(path: str, manifest: dict, store: PayloadStore) -> int:
    """Write ``manifest`` and the payloads to ``path`` atomically; returns the file size."""
    manifest = dict(manifest)
    manifest["format"] = fmt.FORMAT
    manifest["version"] = fmt.VERSION
    manifest.setdefault("created_by", "tvswitch " + __version__)
    manifest["payloads"] = store.info
    text = manifest_text(manifest)
    meta = {fmt.MANIFEST_KEY: text, fmt.DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    write_safetensors(path, store.stored, meta)
    return os.path.getsize(path)
