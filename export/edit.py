"""Adding a task to a bundle, or removing one, rewriting only what must change.

Every payload of the other tasks is carried over byte for byte (compressed or not).  For
RTVQ the shared base vector is the mean of the tasks it was exported with; a task added
later keeps that base and quantises its offset against the same error-corrected
reference, and removing a task leaves the base alone.  That keeps every other task
exactly as it was.  The price is the added task's: its offset spans about T/(T-1) the
range a fresh export would give it, so its error is about that much larger (x1.13-1.16
measured for the 8th of 8 weakly correlated tasks, docs/FORMAT.md section 7).  Re-centring
the base on the *decoded* tasks instead would quantise every other task's offset a second
time, which costs them more (x1.2-1.3) than it saves the new one; re-export from the
checkpoints to re-centre the base on a new set of tasks.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export.checkpoints import (Checkpoint, best_renaming, classify, drop_tied_copies,
                                        load_checkpoint, renamed, task_vectors)
from tvswitch.export.exporter import Scheme, add_queries, codes_term, encode_tensor
from tvswitch.export.lora import load_task
from tvswitch.export.quantize import quantize
from tvswitch.runtime.bundle.writer import PayloadStore, write_bundle
from tvswitch.kernels.packing import unpack_codes, unpack_sparse
from tvswitch.kernels.reference import dequantize
from tvswitch.runtime.bundle import manifest as fmt
from tvswitch.runtime.bundle import Bundle

log = logging.getLogger("tvswitch.export")


def _stored_payloads(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _carry(bundle: Bundle, keep) -> PayloadStore:
    store = PayloadStore(bundle.manifest["scheme"].get("entropy", "none"))
    for key, stored in _stored_payloads(bundle.path).items():
        if keep(key):
            store.copy_from(key, stored, bundle.manifest["payloads"][key])
    return store


def remove_task(path: str, task: str, out: Optional[str] = None) -> Bundle:
    """Drop ``task`` and the payloads only it uses; write to ``out`` (default: in place)."""
    bundle = Bundle.open(path)
    bundle.entries(task)  # names the task's absence clearly
    if len(bundle.tasks) == 1:
        raise TvswitchError("%s: cannot remove %r, the bundle's only task" % (path, task))
    m = dict(bundle.manifest)
    m["tasks"] = [t for t in bundle.tasks if t != task]
    m["entries"] = {t: e for t, e in m["entries"].items() if t != task}
    m["task_specific"] = {t: e for t, e in m["task_specific"].items() if t != task}
    if m.get("queries"):
        m["queries"] = {t: k for t, k in m["queries"].items() if t != task}
    used = _referenced(m)
    store = _carry(bundle, lambda key: key in used)
    write_bundle(out or path, m, store)
    return Bundle.open(out or path)


def add_task(path: str, task: str, source: Any, base: Any = None, out: Optional[str] = None) -> Bundle:
    """Add ``task`` (a checkpoint) to the bundle at ``path``, encoded as its tasks are."""
    bundle = Bundle.open(path)
    if task in bundle.tasks:
        raise TvswitchError("%s already has a task %r" % (path, task))
    if not fmt.task_name_ok(task):
        raise TvswitchError("task name %r: use letters, digits and _ . + - only" % task)
    if base is None:
        embedded = bundle.embedded_base()  # CRC-checked: the bundle's own base, no fingerprint to match
        if embedded is None:
            raise TvswitchError("%s holds no base weights: give the base checkpoint (--base)" % path)
        # A float16 copy (--include-base float16) is widened to the checkpoint's dtype; the new
        # task vector is then taken against the base that rebuilds from this bundle read.
        base_ck = Checkpoint({n: a.astype(bundle.shared_specs[n].dtype) if n in bundle.shared_specs else a
                              for n, a in embedded.items()}, "the base embedded in %s" % path)
    else:
        given = load_checkpoint(base, "base")
        base_ck = Checkpoint(dict(bundle.base_view(given.tensors)), given.label, given.buffers)
        bundle.check_base(base_ck.tensors, base_ck.label)
    record = dict(bundle.manifest["scheme"])
    if record.get("name") == "emr":
        raise TvswitchError("%s: EMR's unified vector depends on every task; re-export to add one" % path)
    record.setdefault("layout", "streams")  # written before the compact layouts: every term a stream
    scheme = Scheme(**{k: v for k, v in record.items() if k in Scheme.__dataclass_fields__})
    ck = drop_tied_copies(_in_bundle_names(load_task(source, base_ck, task), bundle, task), base_ck, task)
    covered = set(bundle.shared_specs) | set(bundle.manifest["base"].get("other", []))
    base_ck = Checkpoint({n: a for n, a in base_ck.tensors.items() if n in covered}, base_ck.label, base_ck.buffers)
    layout = classify(base_ck, {task: ck}, scheme.task_specific)
    store = _carry(bundle, lambda key: True)
    entries: Dict[str, dict] = {}
    for name in layout.vectors:
        if name not in bundle.shared_specs:
            raise TvswitchError("tensor %r of %s is not in bundle %s" % (name, ck.label, path))
        taus, flat_base = task_vectors(base_ck, {task: ck}, name)
        if not taus[0].any():
            continue  # unchanged: stored for no task that leaves it as the base has it
        old = next((bundle.manifest["entries"][t][name] for t in bundle.tasks
                    if name in bundle.manifest["entries"][t]), None)
        if scheme.name == "rtvq" and old is not None:
            entries[name] = _rtvq_entry(bundle, old, task, name, taus[0], store, scheme.layout)
        else:
            width = (old["terms"][0]["bits"],) if scheme.name == "tvq" and old else None
            entries[name] = encode_tensor(scheme, name, base_ck.tensors[name].shape, [task], taus, flat_base,
                                          width, store)[0]
    for name in layout.as_is:
        if not np.array_equal(ck.tensors[name], base_ck.tensors[name]):
            key = store.add("%s/%s/values" % (task, name), ck.tensors[name].astype(scheme.raw_dtype))
            entries[name] = {"mode": "absolute", "terms": [{"kind": "raw", "values": key}]}
    m = dict(bundle.manifest)
    m["tasks"] = bundle.tasks + [task]
    m["entries"] = dict(m["entries"], **{task: entries})
    m["task_specific"] = dict(m["task_specific"], **{task: {
        n: store.add("%s/%s" % (task, n), ck.tensors[n].astype(scheme.raw_dtype)) for n in layout.task_only[task]}})
    write_bundle(out or path, m, store)
    if m.get("queries"):
        log.warning("%s: task %r has no Auto-Switch query sets, so --auto never picks it: run tvswitch router "
                    "again with exemplars of every task", out or path, task)
    return Bundle.open(out or path)


def _in_bundle_names(ck: Checkpoint, bundle: Bundle, task: str) -> Checkpoint:
    """The task's checkpoint under the bundle's tensor names (a prefix mapped, as at export)."""
    renaming = best_renaming(list(ck.tensors), bundle.shared_specs)
    if renaming is None:
        return ck
    return renamed(ck, renaming, "task %r (%s)" % (task, ck.label), bundle.path)


def set_query_sets(path: str, query_sets: Mapping[str, np.ndarray], router: Any, out: Optional[str] = None) -> Bundle:
    """Store Auto-Switch's query sets (fp16) and ``router`` record (a ``RouterSpec`` or its
    dict) in the bundle at ``path``, replacing any it had; write to ``out`` (default: in place)."""
    bundle = Bundle.open(path)
    old = set((bundle.manifest.get("queries") or {}).values())
    m = {k: v for k, v in bundle.manifest.items() if k not in ("queries", "router")}
    store = _carry(bundle, lambda key: key not in old)
    add_queries(m, store, query_sets, router, bundle.tasks)
    write_bundle(out or path, m, store)
    return Bundle.open(out or path)


def _rtvq_entry(bundle: Bundle, old: dict, task: str, name: str, tau: np.ndarray, store: PayloadStore,
                layout: str) -> dict:
    """A new task's RTVQ entry: the shared base vector as the other tasks have it, and the
    task's own offset from it."""
    shared, offset = old["terms"]
    t = fmt.parse_entry(bundle.path, name, old).terms[0]
    n = tau.size
    codes = (unpack_sparse(bundle.payload(t.mask), bundle.payload(t.codes), t.bits, t.fill, n)
             if t.layout == "sparse" else unpack_codes(bundle.payload(t.codes), t.bits, n))
    ref = dequantize(codes, bundle.payload(t.params), t.group)
    q = quantize(tau - ref, offset["bits"], offset["group"])
    return {"mode": "delta", "terms": [shared, codes_term(store, "%s/%s" % (task, name), q, layout=layout)]}


def _referenced(m: dict) -> set:
    keys = set()
    for per in m["entries"].values():
        for entry in per.values():
            keys.update(k for t in fmt.parse_entry("", "", entry).terms for k in t.payloads)
    for per in m["task_specific"].values():
        keys.update(per.values())
    keys.update((m["base"].get("embedded") or {}).values())
    keys.update((m.get("queries") or {}).values())
    return keys
