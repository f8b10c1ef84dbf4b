"""Opening a bundle: every check of FORMAT.md before anything is used, then resident payloads.

``Bundle.open`` reads the safetensors header, verifies the manifest's digest and schema,
and (by default) every payload's CRC-32.  Packed payloads are small, so they are read
into memory once and stay there; the embedded base, if any, is read only on request.
Nothing in here writes: a refused bundle leaves every buffer as it was.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

import numpy as np

from tvswitch.errors import BundleError, TvswitchError
from tvswitch.runtime.bundle import manifest as fmt
from tvswitch.runtime.checkpoint import fingerprint

_ST_DTYPES = {"U32": "uint32", "F32": "float32", "F16": "float16", "U8": "uint8", "I8": "int8",
              "I16": "int16", "I32": "int32", "I64": "int64", "U16": "uint16", "U64": "uint64",
              "BOOL": "bool", "F64": "float64"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a rebuild writes: its shape and element dtype (numpy name)."""

    shape: Tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # 1 for a 0-d tensor; plain ints: tables ask per switch


#: The most memory an lzma payload's decoder may take (its dictionary, which the stream
#: names): preset 6, which the writer uses, needs 9 MiB; preset 9 (64 MiB) is refused.
LZMA_MEMLIMIT = 32 << 20


def decode_payload(stored: np.ndarray, info: Mapping) -> np.ndarray:
    """A payload as the manifest describes it, decompressed if it was entropy coded.

    Decompression stops one byte past the described size: a stream that would inflate to
    more (a decompression bomb) never holds more memory than its description claims, and
    is refused as a ``ValueError`` (``Bundle.open`` makes it a ``BundleError``).  An lzma
    stream's header names its decoder's dictionary, which the decoder allocates whatever
    the output: ``LZMA_MEMLIMIT`` bounds it (the writer's preset 6 needs 9 MiB).
    """
    codec = info["codec"]
    if codec == "none":
        return stored
    expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(info["dtype"]).itemsize
    decoder = zlib.decompressobj() if codec == "zlib" else lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT)
    try:
        data = decoder.decompress(stored.tobytes(), expected + 1)
    except lzma.LZMAError as exc:
        raise ValueError("its lzma stream is refused (%s; a reader allows %d MiB)"
                         % (exc, LZMA_MEMLIMIT >> 20)) from None
    done = decoder.eof if codec == "lzma" else (decoder.eof and not decoder.unconsumed_tail)
    if len(data) != expected or not done:
        raise ValueError("it decodes to %s bytes, its description says %d" % (
            "more than %d" % expected if len(data) > expected or not done else len(data), expected))
    return np.frombuffer(data, dtype=info["dtype"]).reshape(info["shape"])


class Bundle:
    """A verified bundle: its manifest, and its packed payloads held in memory."""

    def __init__(self, path: str, manifest: dict, payloads: Dict[str, np.ndarray], file_nbytes: int):
        self.path = path
        self.manifest = manifest
        self._payloads = payloads
        self.file_nbytes = file_nbytes
        self.tasks: List[str] = list(manifest["tasks"])
        self.scheme: str = manifest.get("scheme", {}).get("name", "?")
        self.base_fingerprint: str = manifest["base"]["fingerprint"]
        self.shared_specs: Dict[str, TensorSpec] = {
            name: TensorSpec(tuple(spec["shape"]), spec["dtype"]) for name, spec in manifest["tensors"].items()
        }
        self._entries = {
            task: {name: fmt.parse_entry(path, task + "/" + name, raw) for name, raw in per.items()}
            for task, per in manifest["entries"].items()
        }
        changed = {name for per in self._entries.values() for name in per}
        #: Shared tensors no task stores an entry for: every mix writes them as the base
        #: itself (coefficient 1, no term), so an engine may hold them as constants
        #: (``OnnxRuntimeEngine(constants=...)``) and a rebuild need not write them.
        self.base_only: List[str] = [name for name in self.shared_specs if name not in changed]

    # ---- opening ----
    @classmethod
    def open(cls, path: str, verify: bool = True) -> "Bundle":
        """Open and check a bundle; ``verify=False`` skips the payload CRCs (not the schema)."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TvswitchError("%s: no such bundle file" % path)
        size = os.path.getsize(path)
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                stored = {k: (_ST_DTYPES.get(f.get_slice(k).get_dtype(), "?"),
                              tuple(f.get_slice(k).get_shape())) for k in keys}
                manifest = _read_manifest(path, meta)
                roles = fmt.check_manifest(path, manifest, stored)
                payloads = {}
                for key in keys:
                    if roles[key] == "base":
                        continue  # read only on request (embedded_base)
                    info = manifest["payloads"][key]
                    data = f.get_tensor(key)
                    if verify:
                        _check_crc(path, key, data, info)
                    payloads[key] = _decode(path, key, data, info)
                    if roles[key] in FINITE_ROLES:
                        _check_finite(path, key, payloads[key])
                fmt.check_group_layouts(path, manifest, payloads)
        except SafetensorError as exc:
            raise BundleError("%s: truncated or not a safetensors file (%s)" % (path, exc)) from None
        except (OSError, ValueError, OverflowError) as exc:
            raise BundleError("%s: unreadable bundle (%s)" % (path, exc)) from None
        return cls(path, manifest, payloads, size)

    # ---- what is inside ----
    def entries(self, task: str) -> Dict[str, fmt.Entry]:
        """How ``task`` changes each tensor it changes."""
        if task not in self._entries:
            raise TvswitchError("%s: no task %r (tasks: %s)" % (self.path, task, ", ".join(self.tasks)))
        return self._entries[task]

    def payload(self, key: str) -> np.ndarray:
        return self._payloads[key]

    def payloads_read(self, tasks: Iterable[str], names: Optional[Iterable[str]] = None) -> List[str]:
        """The payload keys the terms of ``tasks`` read (for the tensors in ``names``, if
        given), each once, in the order first read."""
        keep = None if names is None else set(names)
        keys: Dict[str, None] = {}
        for task in tasks:
            for name, entry in self.entries(task).items():
                if keep is None or name in keep:
                    for t in entry.terms:
                        keys.update((k, None) for k in t.payloads)
        return list(keys)

    def task_specific(self, task: str) -> Dict[str, np.ndarray]:
        """Tensors only ``task`` has (a classification head), as stored."""
        self.entries(task)
        names = self.manifest["task_specific"].get(task, {})
        return {name: self._payloads[key] for name, key in names.items()}

    @property
    def head_names(self) -> Set[str]:
        """The tensors some task has alone (heads): every task's ``task_specific`` names."""
        return {name for task in self.tasks for name in self.manifest["task_specific"].get(task, {})}

    def query_sets(self) -> Optional[Dict[str, np.ndarray]]:
        """Auto-Switch's exemplar features per task, if the exporter stored them."""
        queries = self.manifest.get("queries")
        if not queries:
            return None
        return {task: self._payloads[key] for task, key in queries.items()}

    def router(self) -> Optional[dict]:
        """How Auto-Switch's features are taken (model part, k), if stored."""
        return self.manifest.get("router")

    @property
    def has_embedded_base(self) -> bool:
        return bool(self.manifest["base"].get("embedded"))

    def embedded_base(self) -> Optional[Dict[str, np.ndarray]]:
        """The base weights stored in the bundle (``--include-base``), checked against their CRCs."""
        embedded = self.manifest["base"].get("embedded")
        if not embedded:
            return None
        from safetensors import safe_open

        from safetensors import SafetensorError

        out = {}
        try:
            with safe_open(self.path, framework="numpy") as f:
                for name, key in embedded.items():
                    info = self.manifest["payloads"][key]
                    data = f.get_tensor(key)
                    _check_crc(self.path, key, data, info)
                    out[name] = _decode(self.path, key, data, info)
                    if name in self.shared_specs:
                        _check_finite(self.path, key, out[name])
        except (SafetensorError, OSError) as exc:
            raise BundleError("%s: the embedded base cannot be read (%s)" % (self.path, exc)) from None
        return out

    def base_view(self, base: Optional[Mapping[str, np.ndarray]]) -> Optional[Mapping[str, np.ndarray]]:
        """``base`` under the bundle's names.

        The exporter names a bundle's tensors as its tasks name them; a base saved alone
        (``BertModel``: ``encoder.*``) may differ from them by a prefix (``bert.encoder.*``),
        which the manifest records (``base.renamed``, FORMAT.md section 2) and this applies.
        A base already named as the bundle is returned as it is.
        """
        renamed = self.manifest["base"].get("renamed")
        if base is None or not renamed:
            return base
        strip, add = renamed["strip"], renamed["add"]
        view = {(add + n[len(strip):] if n.startswith(strip) else n): a for n, a in base.items()}
        as_is = sum(1 for n in self.shared_specs if n in base)
        return view if sum(1 for n in self.shared_specs if n in view) > as_is else base

    def check_base(self, base: Mapping[str, np.ndarray], label: str = "the base") -> None:
        """Refuse a base that is not the one the bundle was exported against."""
        base = self.base_view(base)
        names = list(self.shared_specs) + list(self.manifest["base"].get("other", []))
        missing = [n for n in names if n not in base]
        if missing:
            raise BundleError("%s lacks tensor %r that bundle %s was exported with" % (label, missing[0], self.path))
        self.check_base_shapes(base, label)
        if fingerprint(base, names) != self.base_fingerprint:
            raise BundleError("%s is not the base bundle %s was exported against (fingerprint differs)"
                              % (label, self.path))

    def check_base_shapes(self, base: Mapping[str, np.ndarray], label: str = "the base",
                          names: Optional[Iterable[str]] = None) -> None:
        """Refuse a tensor of ``base`` (of ``names``, default every shared one it holds) whose
        shape or dtype is not the bundle's: ``check_base`` without the fingerprint, for a
        caller that takes some of the base's arrays before the rebuild checks it whole."""
        for name in self.shared_specs if names is None else names:
            spec, a = self.shared_specs[name], base.get(name)
            if a is not None and (tuple(a.shape) != spec.shape or a.dtype.name != spec.dtype):
                raise BundleError("%s: tensor %r is %s%s, bundle %s expects %s%s"
                                  % (label, name, a.dtype.name, list(a.shape), self.path, spec.dtype, list(spec.shape)))

    # ---- sizes ----
    @property
    def num_shared_params(self) -> int:
        return sum(s.numel for s in self.shared_specs.values())

    @property
    def base_nbytes(self) -> int:
        return sum(s.numel * np.dtype(s.dtype).itemsize for s in self.shared_specs.values())

    @property
    def query_nbytes(self) -> int:
        return sum(a.nbytes for a in (self.query_sets() or {}).values())

    @property
    def packed_nbytes(self) -> int:
        """Bytes of task data held resident: packed vectors and task-specific tensors."""
        queries = set((self.manifest.get("queries") or {}).values())
        return sum(a.nbytes for k, a in self._payloads.items() if k not in queries)


def _read_manifest(path: str, meta: Mapping[str, str]) -> dict:
    text = meta.get(fmt.MANIFEST_KEY)
    if text is None:
        raise BundleError("%s: not a tvswitch bundle (no manifest)" % path)
    if len(text) > fmt.MAX_MANIFEST_BYTES:
        raise BundleError("%s: a manifest of %d bytes, over the %d a reader takes" % (path, len(text),
                                                                                     fmt.MAX_MANIFEST_BYTES))
    digest = hashlib.sha256(text.encode()).hexdigest()
    if meta.get(fmt.DIGEST_KEY) != digest:
        raise BundleError("%s: manifest checksum mismatch (the header is corrupt)" % path)
    try:
        return json.loads(text)
    except ValueError:
        raise BundleError("%s: manifest is not valid JSON" % path) from None
    except RecursionError:
        raise BundleError("%s: manifest nests too deeply to be one tvswitch writes" % path) from None


#: Payloads whose values become weights (the exporter refuses non-finite checkpoints, so NaN
#: or inf there was never written by it): refused at open.
FINITE_ROLES = ("params", "values", "head", "query", "base")


def _check_finite(path: str, key: str, data: np.ndarray) -> None:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise BundleError("%s: payload %r holds NaN or inf" % (path, key))


def _check_crc(path: str, key: str, data: np.ndarray, info: Mapping) -> None:
    if zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data) != info["crc32"]:
        raise BundleError("%s: payload %r fails its CRC-32 (the file is corrupt)" % (path, key))


def _decode(path: str, key: str, data: np.ndarray, info: Mapping) -> np.ndarray:
    try:
        out = decode_payload(data, info)
    except (zlib.error, lzma.LZMAError, ValueError) as exc:
        raise BundleError("%s: payload %r does not decode (%s)" % (path, key, exc)) from None
    if tuple(out.shape) != tuple(info["shape"]) or out.dtype.name != info["dtype"]:
        raise BundleError("%s: payload %r decodes to the wrong size" % (path, key))
    return out
