"""The bundle's manifest: its schema, and every rule a reader enforces before using it.

A bundle is one safetensors file.  Its ``__metadata__`` holds the manifest (JSON, key
``tvswitch.manifest``) and the manifest's sha256 (key ``tvswitch.manifest.sha256``);
its tensors are the payloads the manifest names.  docs/FORMAT.md is the prose version of
this module; ``check_manifest`` is the refusal list of that document, in code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np

from tvswitch.errors import BundleError
from tvswitch.kernels.abi import MAX_ELEMENTS, code_words

FORMAT = "tvswitch.bundle"
VERSION = 1
MANIFEST_KEY = "tvswitch.manifest"
DIGEST_KEY = "tvswitch.manifest.sha256"
CODECS = ("none", "zlib", "lzma")
#: The schemes, each with the settings (Scheme fields, CLI flags) it reads; the manifest
#: records them all, and the CLI refuses a flag the chosen scheme would ignore.
SCHEMES = {"fq": ("bits", "granularity"), "tvq": ("bits", "granularity", "budget_bits"),
           "rtvq": ("base_bits", "offset_bits", "granularity", "budget_bits"), "tswitch": ("keep",),
           "emr": ("bits", "granularity")}
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ELEMENT_DTYPES = ("float32", "float16")
PAYLOAD_DTYPES = ("uint32", "float32", "float16", "uint8", "int8", "int16", "int32", "int64",
                  "uint16", "uint64", "bool", "float64")


@dataclass(frozen=True)
class Term:
    """One term of a task's contribution to a tensor (decode.h's tv_term, by payload key)."""

    kind: str  # "codes" or "raw"
    scale: float  # multiplies the mix weight (EMR's rescaler; 1 otherwise)
    codes: Optional[str] = None
    params: Optional[str] = None
    bits: int = 0
    group: int = 0
    values: Optional[str] = None
    mask: Optional[str] = None


@dataclass(frozen=True)
class Entry:
    """How one task changes one tensor: ``delta`` adds to the base, ``absolute`` replaces it."""

    mode: str
    terms: Tuple[Term, ...]


def task_name_ok(name: str) -> bool:
    return bool(TASK_NAME.match(name))


def _fail(path: str, msg: str) -> BundleError:
    return BundleError("%s: %s" % (path, msg))


def _require(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise _fail(path, msg)


def parse_entry(path: str, where: str, raw: Any) -> Entry:
    _require(isinstance(raw, dict) and raw.get("mode") in ("delta", "absolute")
             and isinstance(raw.get("terms"), list) and raw["terms"],
             path, "malformed entry for %s" % where)
    terms = []
    for t in raw["terms"]:
        _require(isinstance(t, dict) and t.get("kind") in ("codes", "raw"), path,
                 "malformed term in %s" % where)
        scale = t.get("scale", 1.0)
        _require(isinstance(scale, (int, float)) and np.isfinite(scale), path,
                 "bad term scale in %s" % where)
        if t["kind"] == "codes":
            _require(isinstance(t.get("bits"), int) and 1 <= t["bits"] <= 8, path,
                     "code width must be 1..8 bits in %s" % where)
            _require(isinstance(t.get("group"), int) and 1 <= t["group"] <= MAX_ELEMENTS, path,
                     "bad group size in %s" % where)
            terms.append(Term("codes", float(scale), codes=t.get("codes"), params=t.get("params"),
                              bits=t["bits"], group=t["group"], mask=t.get("mask")))
        else:
            terms.append(Term("raw", float(scale), values=t.get("values"), mask=t.get("mask")))
    return Entry(raw["mode"], tuple(terms))


def check_manifest(path: str, m: Any, stored: Mapping[str, Tuple[str, Tuple[int, ...]]]) -> None:
    """Refuse a manifest that breaks any rule of FORMAT.md; ``stored`` = key -> (dtype, shape)."""
    _require(isinstance(m, dict), path, "manifest is not a JSON object")
    _require(m.get("format") == FORMAT, path, "not a tvswitch bundle (format %r)" % m.get("format"))
    _require(m.get("version") == VERSION, path,
             "bundle format version %r, this tvswitch reads version %d" % (m.get("version"), VERSION))
    for key in ("tasks", "tensors", "payloads", "entries", "task_specific", "base"):
        _require(key in m, path, "manifest has no %r" % key)
    payloads = m["payloads"]
    _require(isinstance(payloads, dict), path, "bad payload table")
    # Every stored tensor is described, and every description is stored: no hidden bytes.
    extra = sorted(set(stored) - set(payloads))
    missing = sorted(set(payloads) - set(stored))
    _require(not extra, path, "tensor %r is not described by the manifest" % (extra[:1] or [""])[0])
    _require(not missing, path, "payload %r is missing" % (missing[:1] or [""])[0])
    for key, info in payloads.items():
        _check_payload(path, key, info, stored[key])
    tasks = m["tasks"]
    _require(isinstance(tasks, list) and len(set(tasks)) == len(tasks)
             and all(isinstance(t, str) and task_name_ok(t) for t in tasks), path, "bad task list")
    tensors = m["tensors"]
    _require(isinstance(tensors, dict), path, "bad tensor table")
    for name, spec in tensors.items():
        _require(isinstance(spec, dict) and spec.get("dtype") in ELEMENT_DTYPES
                 and isinstance(spec.get("shape"), list)
                 and all(isinstance(d, int) and d >= 0 for d in spec["shape"]),
                 path, "bad spec for tensor %r" % name)
        _require(_numel(spec["shape"]) <= MAX_ELEMENTS, path, "tensor %r is too large" % name)
    entries = m["entries"]
    _require(isinstance(entries, dict) and sorted(entries) == sorted(tasks), path,
             "entries do not list exactly the bundle's tasks")
    for task in tasks:
        per = entries[task]
        _require(isinstance(per, dict), path, "bad entries for task %r" % task)
        for name, raw in per.items():
            _require(name in tensors, path, "task %r changes unknown tensor %r" % (task, name))
            entry = parse_entry(path, "%s/%s" % (task, name), raw)
            n = _numel(tensors[name]["shape"])
            for term in entry.terms:
                _check_term(path, "%s/%s" % (task, name), term, n, payloads)
    ts = m["task_specific"]
    _require(isinstance(ts, dict) and set(ts) <= set(tasks), path, "bad task-specific table")
    for task, names in ts.items():
        _require(isinstance(names, dict) and all(k in payloads for k in names.values()), path,
                 "task-specific tensors of %r name missing payloads" % task)
    base = m["base"]
    _require(isinstance(base, dict) and isinstance(base.get("fingerprint"), str), path, "bad base record")
    renamed = base.get("renamed")
    _require(renamed is None or (isinstance(renamed, dict) and set(renamed) == {"strip", "add"}
                                 and all(isinstance(v, str) for v in renamed.values())), path,
             "bad base renaming record")
    for key in (base.get("embedded") or {}).values():
        _require(key in payloads, path, "embedded base names missing payload %r" % key)
    for key in (m.get("queries") or {}).values():
        _require(key in payloads and len(payloads[key]["shape"]) == 2, path,
                 "query set payload %r is missing or not 2-D" % key)


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_payload(path: str, key: str, info: Any, stored: Tuple[str, Tuple[int, ...]]) -> None:
    _require(isinstance(info, dict) and info.get("codec") in CODECS
             and info.get("dtype") in PAYLOAD_DTYPES and isinstance(info.get("shape"), list)
             and isinstance(info.get("crc32"), int), path, "bad description of payload %r" % key)
    if info["codec"] == "none":
        _require(stored == (info["dtype"], tuple(info["shape"])), path,
                 "payload %r is stored as %s%s, the manifest says %s%s"
                 % (key, stored[0], list(stored[1]), info["dtype"], info["shape"]))
    else:
        _require(stored[0] == "uint8" and len(stored[1]) == 1, path,
                 "compressed payload %r must be stored as bytes" % key)


def _check_term(path: str, where: str, t: Term, n: int, payloads: Mapping[str, Any]) -> None:
    def shape_of(key: Optional[str], what: str) -> Tuple[str, List[int]]:
        _require(key is not None and key in payloads, path, "%s of %s names no payload" % (what, where))
        return payloads[key]["dtype"], payloads[key]["shape"]

    if t.kind == "codes":
        dt, shape = shape_of(t.codes, "codes")
        _require(dt == "uint32" and shape == [code_words(n, t.bits)], path,
                 "codes of %s: %d-bit stream of %d values needs %d uint32 words"
                 % (where, t.bits, n, code_words(n, t.bits)))
        dt, shape = shape_of(t.params, "params")
        groups = -(-n // t.group) if n else 0
        _require(dt == "float32" and shape == [2 * groups], path,
                 "params of %s: need %d float32 (scale, offset) values" % (where, 2 * groups))
    else:
        dt, shape = shape_of(t.values, "values")
        _require(dt in ELEMENT_DTYPES and _numel(shape) == n, path,
                 "values of %s: need %d float32/float16 elements" % (where, n))
    if t.mask is not None:
        dt, shape = shape_of(t.mask, "mask")
        _require(dt == "uint32" and shape == [code_words(n, 1)], path,
                 "mask of %s: need %d uint32 words" % (where, code_words(n, 1)))
