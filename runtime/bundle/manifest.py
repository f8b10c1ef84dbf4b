"""The bundle's manifest: its schema, and every rule a reader enforces before using it.

A bundle is one safetensors file.  Its ``__metadata__`` holds the manifest (JSON, key
``tvswitch.manifest``) and the manifest's sha256 (key ``tvswitch.manifest.sha256``);
its tensors are the payloads the manifest names.  docs/FORMAT.md is the prose version of
this module; ``check_manifest`` is the refusal list of that document, in code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from tvswitch.errors import BundleError
from tvswitch.kernels.abi import FLOAT32_MAX, MAX_ELEMENTS, code_words
from tvswitch.kernels.packing import group_index_words, group_layout_error, sparse_layout_error

#: A manifest larger than this is refused before it is parsed (8 tasks of MiniLM: 60 kB).
MAX_MANIFEST_BYTES = 64 << 20

FORMAT = "tvswitch.bundle"
VERSION = 1
MANIFEST_KEY = "tvswitch.manifest"
DIGEST_KEY = "tvswitch.manifest.sha256"
CODECS = ("none", "zlib", "lzma")
#: How a codes term's codes and mask are laid out (Term.layout, FORMAT.md 3.1, 3.3, 3.4).
LAYOUTS = ("streams", "groups", "sparse")
#: The schemes, each with the settings (Scheme fields, CLI flags) it reads; the manifest
#: records them all, and the CLI refuses a flag the chosen scheme would ignore.
SCHEMES = {"fq": ("bits", "granularity", "layout"), "tvq": ("bits", "granularity", "budget_bits", "layout"),
           "rtvq": ("base_bits", "offset_bits", "granularity", "budget_bits", "layout"),
           "tswitch": ("keep", "layout"), "emr": ("bits", "granularity")}
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
    #: how a codes term's codes and mask are laid out: "streams" (a code stream and a 1-bit
    #: mask stream), "groups" (1-bit codes under a mask, by groups of four: ``codes`` names
    #: the group bytes, ``mask`` the group index; FORMAT.md 3.3) or "sparse" (b-bit codes
    #: of the groups not all ``fill``: ``codes`` names their stream, ``mask`` the group
    #: index, and there is no mask; FORMAT.md 3.4)
    layout: str = "streams"
    fill: int = 0

    @property
    def payloads(self) -> Tuple[str, ...]:
        """The payload keys this term reads."""
        return tuple(k for k in (self.codes, self.params, self.values, self.mask) if k)


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_key(x: Any) -> bool:
    """A payload key: a string (a JSON list or number there is a malformed manifest)."""
    return isinstance(x, str) and bool(x)


def parse_entry(path: str, where: str, raw: Any) -> Entry:
    """One entry, every field of the right type and range (a ``BundleError`` naming ``where`` else)."""
    _require(isinstance(raw, dict) and raw.get("mode") in ("delta", "absolute")
             and isinstance(raw.get("terms"), list) and raw["terms"],
             path, "malformed entry for %s" % where)
    terms = []
    for t in raw["terms"]:
        _require(isinstance(t, dict) and t.get("kind") in ("codes", "raw"), path,
                 "malformed term in %s" % where)
        scale = t.get("scale", 1.0)
        _require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale)
                 and abs(scale) <= FLOAT32_MAX, path, "bad term scale in %s (a finite float32 is needed)" % where)
        mask = t.get("mask")
        _require(mask is None or _is_key(mask), path, "bad mask key in %s" % where)
        if t["kind"] == "codes":
            _require(_is_int(t.get("bits")) and 1 <= t["bits"] <= 8, path,
                     "code width must be 1..8 bits in %s" % where)
            _require(_is_int(t.get("group")) and 1 <= t["group"] <= MAX_ELEMENTS, path,
                     "bad group size in %s" % where)
            _require(_is_key(t.get("codes")) and _is_key(t.get("params")), path, "bad payload keys in %s" % where)
            layout = t.get("layout", "streams")
            _require(layout in LAYOUTS, path, "term layout must be one of %s in %s" % (", ".join(LAYOUTS), where))
            _require(layout != "groups" or (t["bits"] == 1 and mask is not None), path,
                     "the groups layout holds masked 1-bit codes only, in %s" % where)
            fill = t.get("fill", 0)
            _require(layout != "sparse" or (mask is not None and _is_int(fill) and 0 <= fill < 1 << t["bits"]),
                     path, "a sparse term needs its group index and a fill code of %d bits, in %s" % (t["bits"], where))
            _require(layout == "sparse" or "fill" not in t, path,
                     "a fill code outside the sparse layout, in %s" % where)
            terms.append(Term("codes", float(scale), codes=t["codes"], params=t["params"], bits=t["bits"],
                              group=t["group"], mask=mask, layout=layout, fill=fill if layout == "sparse" else 0))
        else:
            _require(_is_key(t.get("values")), path, "bad payload key in %s" % where)
            _require("fill" not in t and "layout" not in t, path, "a raw term with a layout or fill, in %s" % where)
            terms.append(Term("raw", float(scale), values=t["values"], mask=mask))
    return Entry(raw["mode"], tuple(terms))


class _Roles:
    """What each payload is used as; one payload may serve many terms, but in one role only
    (a task's codes named as the base's embedded copy, or as a head, is a lie)."""

    def __init__(self, path: str, payloads: Mapping[str, Any]):
        self.path, self.payloads, self.of = path, payloads, {}

    def claim(self, key: Any, role: str, where: str) -> dict:
        _require(_is_key(key) and key in self.payloads, self.path, "%s of %s names no payload" % (role, where))
        _require(self.of.setdefault(key, role) == role, self.path,
                 "payload %r is used as %s and as %s (%s)" % (key, self.of[key], role, where))
        return self.payloads[key]


def check_manifest(path: str, m: Any, stored: Mapping[str, Tuple[str, Tuple[int, ...]]]) -> Dict[str, str]:
    """Refuse a manifest that breaks any rule of FORMAT.md; ``stored`` = key -> (dtype, shape).

    Returns each payload's role (``codes``, ``params``, ``mask``, ``values``, ``head``,
    ``base``, ``query``), for the checks that need the decoded values (``Bundle.open``).
    """
    _require(isinstance(m, dict), path, "manifest is not a JSON object")
    _require(m.get("format") == FORMAT, path, "not a tvswitch bundle (format %r)" % m.get("format"))
    _require(m.get("version") == VERSION, path,
             "bundle format version %r, this tvswitch reads version %d" % (m.get("version"), VERSION))
    for key, kind in (("tasks", list), ("tensors", dict), ("payloads", dict), ("entries", dict),
                      ("task_specific", dict), ("base", dict)):
        _require(isinstance(m.get(key), kind), path, "manifest has no %r %s" % (key, kind.__name__))
    scheme = m.get("scheme", {})
    _require(isinstance(scheme, dict) and isinstance(scheme.get("name", ""), str), path, "bad scheme record")
    payloads = m["payloads"]
    # Every stored tensor is described, and every description is stored: no hidden bytes.
    extra = sorted(set(stored) - set(payloads))
    missing = sorted(set(payloads) - set(stored))
    _require(not extra, path, "tensor %r is not described by the manifest" % (extra[:1] or [""])[0])
    _require(not missing, path, "payload %r is missing" % (missing[:1] or [""])[0])
    for key, info in payloads.items():
        _check_payload(path, key, info, stored[key])
    tasks = m["tasks"]
    _require(len(set(map(repr, tasks))) == len(tasks) and all(isinstance(t, str) and task_name_ok(t) for t in tasks),
             path, "bad task list")
    tensors = m["tensors"]
    for name, spec in tensors.items():
        _require(isinstance(spec, dict) and spec.get("dtype") in ELEMENT_DTYPES
                 and isinstance(spec.get("shape"), list) and all(_is_int(d) and d >= 0 for d in spec["shape"]),
                 path, "bad spec for tensor %r" % name)
        _require(_numel(spec["shape"]) <= MAX_ELEMENTS, path, "tensor %r is too large" % name)
    roles = _Roles(path, payloads)
    entries = m["entries"]
    _require(sorted(entries) == sorted(tasks), path, "entries do not list exactly the bundle's tasks")
    for task in tasks:
        per = entries[task]
        _require(isinstance(per, dict), path, "bad entries for task %r" % task)
        for name, raw in per.items():
            _require(name in tensors, path, "task %r changes unknown tensor %r" % (task, name))
            where = "%s/%s" % (task, name)
            entry = parse_entry(path, where, raw)
            n = _numel(tensors[name]["shape"])
            for term in entry.terms:
                _check_term(path, where, term, n, roles)
    ts = m["task_specific"]
    _require(set(ts) <= set(tasks), path, "bad task-specific table")
    for task, names in ts.items():
        _require(isinstance(names, dict), path, "task-specific tensors of %r are not a table" % task)
        for name, key in names.items():
            info = roles.claim(key, "head", "task-specific tensor %r of %r" % (name, task))
            _require(info["dtype"] in ELEMENT_DTYPES, path, "task-specific tensor %r of %r is %s: float16 or "
                     "float32 is needed" % (name, task, info["dtype"]))
    _check_base(path, m["base"], tensors, roles)
    _check_queries(path, m, tasks, roles)
    unused = sorted(set(payloads) - set(roles.of))
    _require(not unused, path, "payload %r is used by nothing (no hidden bytes)" % (unused[:1] or [""])[0])
    return dict(roles.of)


def _check_base(path: str, base: dict, tensors: Mapping[str, dict], roles: _Roles) -> None:
    """The base record: fingerprint, fixed tensors, renaming, and an embedded copy that stands
    for exactly the bundle's tensors at their shapes (a rebuild reads it by those shapes)."""
    _require(isinstance(base.get("fingerprint"), str), path, "bad base record")
    other = base.get("other", [])
    _require(isinstance(other, list) and all(isinstance(n, str) for n in other), path, "bad base 'other' list")
    renamed = base.get("renamed")
    _require(renamed is None or (isinstance(renamed, dict) and set(renamed) == {"strip", "add"}
                                 and all(isinstance(v, str) for v in renamed.values())), path,
             "bad base renaming record")
    embedded = base.get("embedded")
    if embedded is None:
        return
    _require(isinstance(embedded, dict), path, "the embedded base is not a table")
    _require(set(embedded) == set(tensors) | set(other), path,
             "the embedded base does not hold exactly the bundle's tensors and fixed tensors")
    for name, key in embedded.items():
        info = roles.claim(key, "base", "embedded base tensor %r" % name)
        if name in tensors:
            _require(info["dtype"] in ELEMENT_DTYPES and info["shape"] == tensors[name]["shape"], path,
                     "embedded base tensor %r is %s%s, the bundle's is %s%s" % (
                         name, info["dtype"], info["shape"], tensors[name]["dtype"], tensors[name]["shape"]))


def _check_queries(path: str, m: dict, tasks: List[str], roles: _Roles) -> None:
    queries = m.get("queries")
    if queries is None:
        _require(m.get("router") is None, path, "a router record with no query sets")
        return
    _require(isinstance(queries, dict) and set(queries) <= set(tasks), path, "bad query set table")
    features = set()
    for task, key in queries.items():
        info = roles.claim(key, "query", "the query set of %r" % task)
        _require(info["dtype"] == "float16" and len(info["shape"]) == 2, path,
                 "query set payload %r is not float16 and 2-D" % key)
        features.add(info["shape"][1])
    _require(len(features) <= 1, path, "query sets of different feature sizes")
    _require(m.get("router") is None or isinstance(m["router"], dict), path, "bad router record")


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_payload(path: str, key: str, info: Any, stored: Tuple[str, Tuple[int, ...]]) -> None:
    _require(isinstance(info, dict) and info.get("codec") in CODECS
             and info.get("dtype") in PAYLOAD_DTYPES and isinstance(info.get("shape"), list)
             and all(_is_int(d) and d >= 0 for d in info["shape"]) and _is_int(info.get("crc32"))
             and 0 <= info["crc32"] < 2 ** 32, path, "bad description of payload %r" % key)
    _require(_numel(info["shape"]) <= MAX_ELEMENTS, path, "payload %r is too large" % key)
    if info["codec"] == "none":
        _require(stored == (info["dtype"], tuple(info["shape"])), path,
                 "payload %r is stored as %s%s, the manifest says %s%s"
                 % (key, stored[0], list(stored[1]), info["dtype"], info["shape"]))
    else:
        _require(stored[0] == "uint8" and len(stored[1]) == 1, path,
                 "compressed payload %r must be stored as bytes" % key)


def _check_term(path: str, where: str, t: Term, n: int, roles: _Roles) -> None:
    """Each payload a term reads has the dtype and element count its use implies (for the
    groups and sparse layouts, what can be known before the payloads are read:
    ``check_group_layouts`` checks their contents)."""
    if t.layout in ("groups", "sparse"):
        role = "group bytes" if t.layout == "groups" else "sparse codes"
        info = roles.claim(t.codes, role, where)
        _require(info["dtype"] == "uint32" and len(info["shape"]) == 1, path,
                 "%s of %s: a 1-D uint32 array is needed" % (role, where))
        info = roles.claim(t.mask, "group index", where)
        _require(info["dtype"] == "uint32" and info["shape"] == [group_index_words(n)], path,
                 "group index of %s: need %d uint32 words" % (where, group_index_words(n)))
        info = roles.claim(t.params, "params", where)
        _require(info["dtype"] == "float32" and info["shape"] == [2 * (-(-n // t.group) if n else 0)], path,
                 "params of %s: need %d float32 (scale, offset) values" % (where, 2 * (-(-n // t.group) if n else 0)))
        return
    if t.kind == "codes":
        info = roles.claim(t.codes, "codes", where)
        _require(info["dtype"] == "uint32" and info["shape"] == [code_words(n, t.bits)], path,
                 "codes of %s: %d-bit stream of %d values needs %d uint32 words"
                 % (where, t.bits, n, code_words(n, t.bits)))
        info = roles.claim(t.params, "params", where)
        groups = -(-n // t.group) if n else 0
        _require(info["dtype"] == "float32" and info["shape"] == [2 * groups], path,
                 "params of %s: need %d float32 (scale, offset) values" % (where, 2 * groups))
    else:
        info = roles.claim(t.values, "values", where)
        _require(info["dtype"] in ELEMENT_DTYPES and _numel(info["shape"]) == n, path,
                 "values of %s: need %d float32/float16 elements" % (where, n))
    if t.mask is not None:
        info = roles.claim(t.mask, "mask", where)
        _require(info["dtype"] == "uint32" and info["shape"] == [code_words(n, 1)], path,
                 "mask of %s: need %d uint32 words" % (where, code_words(n, 1)))


def check_group_layouts(path: str, manifest: Mapping, payloads: Mapping[str, np.ndarray]) -> None:
    """Refuse a groups or sparse term whose index and stored groups disagree (FORMAT.md
    3.3-3.4, rule 8): the decoders find a group by counting flags and trust the counts."""
    for task, entries in manifest["entries"].items():
        for name, raw in entries.items():
            n = _numel(manifest["tensors"][name]["shape"])
            for t in parse_entry(path, "%s/%s" % (task, name), raw).terms:
                if t.layout == "groups":
                    error = group_layout_error(payloads[t.mask], payloads[t.codes], n)
                elif t.layout == "sparse":
                    error = sparse_layout_error(payloads[t.mask], payloads[t.codes], t.bits, n)
                else:
                    continue
                _require(error is None, path, "%s term of %s/%s: %s" % (t.layout, task, name, error))
