"""What a bundle costs: bytes on flash, bits per task-vector weight, widths per tensor.

``tvswitch inspect`` prints this; the benchmark reports the same numbers, so they are
computed once, here.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.bundle.manifest import Entry


def describe_entry(entry: Entry, bundle: Bundle) -> str:
    """A short human label of how one tensor of one task is stored, e.g. ``3+2 bit``."""
    parts: List[str] = []
    ternary = bundle.manifest["scheme"].get("name") == "tswitch"  # 0: -lambda, 1: dropped, 2: +lambda
    for t in entry.terms:
        if ternary and t.kind == "codes" and t.bits == 2 and (t.mask is None or t.layout == "sparse"):
            parts.append("ternary" + (" sparse" if t.layout == "sparse" else ""))
        elif t.kind == "raw":
            parts.append("raw " + bundle.payload(t.values).dtype.name)
        elif t.layout == "groups":
            parts.append("mask+sign groups")
        elif t.layout == "sparse":
            parts.append("%d sparse" % t.bits)
        elif t.mask is not None and t.bits == 1:
            parts.append("mask+sign")
        else:
            parts.append("%d" % t.bits + ("+mask" if t.mask else ""))
    label = "+".join(parts)
    if entry.mode == "absolute" and entry.terms[0].kind == "codes":
        label = "abs " + label
    return label + (" bit" if entry.terms[0].kind == "codes" and "mask+sign" not in label and "ternary" not in label
                    else "")


def entry_widths(entry: Entry, bundle: Bundle) -> List[int]:
    """Bits per element of each term, in order: the code width, or 16/32 for raw values
    (a mask adds one more bit per element, which ``describe_entry`` names)."""
    return [t.bits if t.kind == "codes" else 8 * bundle.payload(t.values).dtype.itemsize for t in entry.terms]


def budget_bits(bundle: Bundle) -> float:
    """What ``--budget-bits`` holds to (FORMAT.md section 6): the bits of the task vectors' codes
    terms (code streams with their trailing word, a sparse term's group index, 64 bits per
    (scale, offset) group; a shared payload such as RTVQ's base vector once), per weight and
    task over the tensors that are task vectors (not stored as-is)."""
    keys, weights = set(), 0
    for name, spec in bundle.shared_specs.items():
        entries = [bundle.entries(t).get(name) for t in bundle.tasks]
        if any(e is not None and (e.mode != "delta" or e.terms[0].kind != "codes") for e in entries):
            continue  # stored as-is, or FQ's absolute codes: outside the budget
        weights += spec.numel
        for e in entries:
            for t in e.terms if e is not None else ():
                keys.update((t.codes, t.params, t.mask) if t.layout == "sparse" else (t.codes, t.params))
    bits = sum(8 * bundle.payload(k).nbytes for k in keys)
    return bits / float(weights * len(bundle.tasks)) if weights and bundle.tasks else 0.0


def bundle_stats(bundle: Bundle) -> Dict[str, object]:
    """Sizes and ratios of a bundle, as plain data for ``--json``."""
    m = bundle.manifest
    T = len(bundle.tasks)
    n_shared = bundle.num_shared_params
    embedded = set((m["base"].get("embedded") or {}).values())
    payload_bytes = {k: int(np.prod(v["shape"], dtype=np.int64)) * np.dtype(v["dtype"]).itemsize
                     for k, v in m["payloads"].items()}
    head_params = sum(int(np.prod(bundle.payload(k).shape)) for per in m["task_specific"].values()
                      for k in per.values())
    base_embedded_bytes = sum(payload_bytes[k] for k in embedded)
    task_bytes_on_disk = bundle.file_nbytes - base_embedded_bytes
    # One task's checkpoint: the shared tensors plus its own head (averaged over tasks).
    checkpoint_params = n_shared + (head_params / T if T else 0)
    tensors = {}
    changed_weights = 0
    for name, spec in bundle.shared_specs.items():
        changing = [t for t in bundle.tasks if name in bundle.entries(t)]
        changed_weights += spec.numel * len(changing)
        entry = bundle.entries(changing[0]).get(name) if changing else None
        tensors[name] = {"shape": list(spec.shape), "dtype": spec.dtype,
                         "stored": describe_entry(entry, bundle) if entry else "unchanged",
                         "widths": entry_widths(entry, bundle) if entry else [], "tasks": len(changing)}
    task_specific = {task: {name: {"shape": list(bundle.payload(key).shape),
                                   "dtype": bundle.payload(key).dtype.name,
                                   "bytes": int(bundle.payload(key).nbytes)}
                            for name, key in per.items()}
                     for task, per in m["task_specific"].items() if per}
    bits = 8.0 * task_bytes_on_disk / (T * n_shared) if T and n_shared else 0.0
    return {
        "path": bundle.path,
        "scheme": m.get("scheme", {}),
        "tasks": list(bundle.tasks),
        "file_bytes": bundle.file_nbytes,
        "base_embedded_bytes": base_embedded_bytes,
        "task_bytes_on_disk": task_bytes_on_disk,
        "entropy_coded_payloads": sum(1 for v in m["payloads"].values() if v["codec"] != "none"),
        "shared_params": n_shared,
        "bits_per_task_vector_weight": bits,
        "changed_weights": changed_weights,
        "bits_per_changed_weight": 8.0 * task_bytes_on_disk / changed_weights if changed_weights else 0.0,
        "budget_bits_per_weight": budget_bits(bundle),
        "base_bytes": base_embedded_bytes or bundle.base_nbytes,
        "with_base_bytes": bundle.file_nbytes if base_embedded_bytes else task_bytes_on_disk + bundle.base_nbytes,
        "ratio_with_base_to_fp32_checkpoints": (4 * checkpoint_params * T / (
            bundle.file_nbytes if base_embedded_bytes else task_bytes_on_disk + bundle.base_nbytes)) if T else 0.0,
        "fp32_checkpoints_bytes": int(4 * checkpoint_params * T),
        "fp16_checkpoints_bytes": int(2 * checkpoint_params * T),
        "ratio_to_fp32_checkpoints": (4 * checkpoint_params * T / task_bytes_on_disk) if task_bytes_on_disk else 0.0,
        "ratio_to_fp16_checkpoints": (2 * checkpoint_params * T / task_bytes_on_disk) if task_bytes_on_disk else 0.0,
        "resident_packed_bytes": bundle.packed_nbytes,
        "query_bytes": bundle.query_nbytes,
        "tensors": tensors,
        "task_specific": task_specific,
        "base_fingerprint": bundle.base_fingerprint,
    }


def device_footprint(bundle: Bundle) -> Dict[str, object]:
    """The numbers a device memory plan (``tvswitch plan``) needs of a bundle, named as the
    fields of ``jetson.plan.BundleFacts``: sizes resident, on flash, and read per switch
    (the largest one-task rebuild, and a mix of every task with each payload read once)."""
    stats = bundle_stats(bundle)

    def size(keys) -> int:
        return sum(bundle.payload(k).nbytes for k in keys)

    return dict(
        tasks=len(bundle.tasks), scheme=bundle.scheme, num_shared_params=bundle.num_shared_params,
        base_nbytes=bundle.base_nbytes, packed_nbytes=bundle.packed_nbytes,
        task_data_nbytes=int(stats["task_bytes_on_disk"]), fp16_checkpoints_nbytes=int(stats["fp16_checkpoints_bytes"]),
        query_nbytes=bundle.query_nbytes,
        task_read_nbytes=max(size(bundle.payloads_read([t])) for t in bundle.tasks) if bundle.tasks else 0,
        mix_read_nbytes=size(bundle.payloads_read(bundle.tasks)))
