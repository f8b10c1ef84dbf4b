"""What a bundle costs: bytes on flash, bits per task-vector weight, widths per tensor.

``tvswitch inspect`` prints this; the benchmark reports the same numbers, so they are
computed once, here.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.format import Entry


def describe_entry(entry: Entry, bundle: Bundle) -> str:
    """A short human label of how one tensor of one task is stored, e.g. ``3+2 bit``."""
    parts: List[str] = []
    for t in entry.terms:
        if t.kind == "raw":
            parts.append("raw " + bundle.payload(t.values).dtype.name)
        elif t.mask is not None and t.bits == 1:
            parts.append("mask+sign")
        else:
            parts.append("%d" % t.bits + ("+mask" if t.mask else ""))
    label = "+".join(parts)
    if entry.mode == "absolute" and entry.terms[0].kind == "codes":
        label = "abs " + label
    return label + (" bit" if entry.terms[0].kind == "codes" and "mask+sign" not in label else "")


def entry_widths(entry: Entry, bundle: Bundle) -> List[int]:
    """Bits per element of each term, in order: the code width, or 16/32 for raw values
    (a mask adds one more bit per element, which ``describe_entry`` names)."""
    return [t.bits if t.kind == "codes" else 8 * bundle.payload(t.values).dtype.itemsize for t in entry.terms]


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
    first = bundle.tasks[0] if bundle.tasks else None
    for name, spec in bundle.shared_specs.items():
        entry = bundle.entries(first).get(name) if first else None
        tensors[name] = {"shape": list(spec.shape), "dtype": spec.dtype,
                         "stored": describe_entry(entry, bundle) if entry else "unchanged",
                         "widths": entry_widths(entry, bundle) if entry else []}
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
