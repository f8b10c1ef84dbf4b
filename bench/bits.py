"""Bits per weight of each scheme's task data: resident, on flash, and the entropy bound.

    python -m bench.bits [--bundles ~/.cache/tvswitch/text8/bundles] [--out FILE]

For every bundle the text8 benchmark wrote (bench/text8; a ``NAME-lzma-HASH.tvs`` beside
``NAME-HASH.tvs`` gives the flash figure under lzma), over the shared weights of all tasks
(heads and query sets left out, a payload shared by tasks counted once):

- resident: bits a device holds per weight, the payloads as decoded at load;
- flash: bits the file stores per weight (the payloads as the safetensors header sizes them);
- bound: the order-0 empirical entropy of what a decoder needs: per code stream the
  entropy of its codes' histogram (over the kept positions only, where a mask says which
  ones count), per mask the binary entropy of its keep rate, parameters at their 32 bits.
  A memoryless coder cannot go below it; lzma can, where it finds repeats (identical rows);
- masks: what the masks take as bitmaps (1 bit per element, the streams layout) and
  two-level (1 bit per group of 4 elements plus the 4 bits of every group with a kept
  element, the T-Switch authors' form): EMR's, and T-Switch's in bundles written before
  its terms were ternary codes (a T-Switch term is now one 2-bit code, no mask);
- the codes in each layout of docs/FORMAT.md: streams (a b-bit stream), compact (the
  sparse layout of 3.4 with the most common code as the fill), and auto, compact per term
  where it takes at most the exporter's AUTO_COMPACT of the streams' bits; each counted by
  ``exporter.term_form``, which picks what ``--layout`` stores, a T-Switch term of an older
  bundle (masked signs) as its ternary codes.
  Over every codes term that has a compact form (EMR's masked shared codes have none); a
  bundle stored in any layout gives the same figures: they are computed from the decoded
  codes and masks.

The bits are read from the files, nothing is trained or rebuilt; the bundles' accuracy is
docs/results/text8.md's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set

import numpy as np

from tvswitch.export.exporter import term_form
from tvswitch.kernels.abi import code_words
from tvswitch.kernels.packing import unpack_codes, unpack_groups, unpack_mask, unpack_sparse
from tvswitch.runtime.bundle import Bundle

DEFAULT = os.path.expanduser("~/.cache/tvswitch/text8/bundles")


@dataclass
class Tally:
    """Bits of one bundle's task data over its shared weights (``weights``: tasks x params)."""

    weights: int = 0
    resident: int = 0
    bound: float = 0.0
    mask_bits: int = 0  # masks as bitmaps (1 bit per element)
    two_level: int = 0  # masks as 1 bit per group of 4 + 4 bits per group with a kept element
    streams: int = 0  # codes terms with a compact form, as streams (T-Switch: a mask and a sign bitmap)
    compact: int = 0  # the same terms compact: groups (T-Switch) or sparse (codes without a mask)
    auto: int = 0  # per term compact where it is at most AUTO_COMPACT of streams, else streams
    keys: Set[str] = field(default_factory=set)


def entropy_bits(values: np.ndarray) -> float:
    """n times the order-0 empirical entropy of ``values`` (small non-negative integers)."""
    if values.size == 0:
        return 0.0
    counts = np.bincount(values.astype(np.intp))
    p = counts[counts > 0] / values.size
    return float(values.size * -(p * np.log2(p)).sum())


def two_level_bits(keep: np.ndarray) -> int:
    groups = np.pad(keep, (0, -keep.size % 4)).reshape(-1, 4).any(axis=1)
    return int(groups.size + 4 * groups.sum())


def tally(bundle: Bundle) -> Tally:
    t = Tally(weights=bundle.num_shared_params * len(bundle.tasks))
    users = Counter(term.codes for task in bundle.tasks for entry in bundle.entries(task).values()
                    for term in entry.terms if term.codes)
    for task in bundle.tasks:
        for name, entry in bundle.entries(task).items():
            if name not in bundle.shared_specs:
                continue
            n = bundle.shared_specs[name].numel
            for term in entry.terms:
                keep = codes = None
                if term.layout == "groups":
                    keep, codes = unpack_groups(bundle.payload(term.mask), bundle.payload(term.codes), n)
                elif term.layout == "sparse":
                    codes = unpack_sparse(bundle.payload(term.mask), bundle.payload(term.codes), term.bits,
                                          term.fill, n)
                elif term.mask is not None:
                    keep = unpack_mask(bundle.payload(term.mask), n)
                if keep is not None and term.mask not in t.keys:
                    rate = keep.mean()
                    t.bound += 0.0 if rate in (0.0, 1.0) else n * float(
                        -(rate * np.log2(rate) + (1 - rate) * np.log2(1 - rate)))
                    t.mask_bits += 32 * code_words(n, 1)
                    t.two_level += two_level_bits(keep)
                for key in term.payloads:
                    if key not in t.keys:
                        t.resident += 8 * bundle.payload(key).nbytes
                if term.kind == "codes" and term.codes not in t.keys:
                    # codes of one task count where its mask keeps them; shared ones (RTVQ's
                    # base, EMR's unified vector) everywhere, once
                    if codes is None:
                        codes = unpack_codes(bundle.payload(term.codes), term.bits, n)
                    t.bound += entropy_bits(codes if keep is None or users[term.codes] > 1 else codes[keep])
                    bits, priced = term.bits, codes
                    legacy = keep is not None and term.bits == 1 and users[term.codes] == 1
                    if legacy:  # T-Switch as written before its terms were ternary codes: priced
                        bits, priced = 2, np.where(keep, 2 * codes, 1)  # as the exporter writes it now
                    if legacy or (keep is None and n):
                        t.streams += 32 * term_form(priced, bits, None, "streams")[1]
                        t.compact += 32 * term_form(priced, bits, None, "compact")[1]
                        t.auto += 32 * term_form(priced, bits, None, "auto")[1]
                if term.params is not None and term.params not in t.keys:
                    t.bound += 8 * bundle.payload(term.params).nbytes
                if term.kind == "raw" and term.values not in t.keys:
                    t.bound += 8 * bundle.payload(term.values).nbytes  # as-is values: no model of them
                t.keys.update(term.payloads)
    return t


def stored_bits(path: str, keys: Iterable[str]) -> int:
    """Bits the file at ``path`` stores for ``keys`` (its safetensors header's offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(8 * (header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) for k in keys)


def label(path: str) -> str:
    return re.sub(r"-[0-9a-f]{16}\.tvs$", "", os.path.basename(path))


def rows(folder: str) -> List[Dict[str, object]]:
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tvs"))
    by_label = {label(p): p for p in files}
    out = []
    for name, path in by_label.items():
        if name.endswith("-lzma"):
            continue
        bundle = Bundle.open(path, verify=False)
        t = tally(bundle)
        packed = by_label.get(name + "-lzma")
        lzma = None
        if packed is not None:
            other = tally(Bundle.open(packed, verify=False))
            lzma = stored_bits(packed, other.keys) / other.weights
        w = t.weights
        out.append(dict(scheme=name, tasks=len(bundle.tasks), resident=t.resident / w,
                        flash=stored_bits(path, t.keys) / w, lzma=lzma, bound=t.bound / w,
                        mask=t.mask_bits / w if t.mask_bits else None,
                        two_level=t.two_level / w if t.mask_bits else None,
                        **{k: getattr(t, k) / w if t.streams else None for k in ("streams", "compact", "auto")}))
        print("  read %s" % name, file=sys.stderr)
    return out


def table(found: List[Dict[str, object]]) -> str:
    def f(v: Optional[float]) -> str:
        return "-" if v is None else "%.3f" % v

    columns = ("resident", "flash", "lzma", "bound", "mask", "two_level", "streams", "compact", "auto")
    lines = ["| bundle (8 tasks) | resident | flash | flash, lzma | order-0 bound | masks as bitmaps "
             "| masks two-level | codes as streams | compact | auto |", "|---" * 10 + "|"]
    for r in found:
        lines.append("| %s | %s |" % (r["scheme"], " | ".join(f(r[c]) for c in columns)))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", default=DEFAULT, help="the folder bench/text8 wrote its bundles to")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if not os.path.isdir(args.bundles):
        print("bench.bits: %s: no such folder; run bench/text8 first (docs/results/text8-notes.md)" % args.bundles,
              file=sys.stderr)
        return 2
    text = table(rows(args.bundles))
    print("bits per weight, over the shared weights of all tasks\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
