"""The offline exporter: checkpoints -> task vectors -> packed payloads -> one bundle file.

``export_bundle`` is what ``tvswitch export`` runs.  Each scheme turns one tensor's task
vectors into *entries* (per task: mode + terms, FORMAT.md) whose payloads go into a
``PayloadStore``; the writer then adds CRCs and the manifest and renames the file into
place.  Editing a bundle in place (``add_task``, ``remove_task``) is ``export.edit``'s,
which carries every other payload over byte for byte.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export import allocate as alloc
from tvswitch.export.checkpoints import Checkpoint, Layout, align, classify, load_checkpoint, task_vectors
from tvswitch.export.lora import load_task
from tvswitch.kernels.packing import (group_index_words, pack_codes, pack_mask, pack_sparse, sparse_words,
                                      stored_groups)
from tvswitch.export.quantize import (Quantized, dequantize, group_size, parse_granularity, quantize,
                                      sampled_error)
from tvswitch.export.rtvq import quantize_residual
from tvswitch.export.tswitch import binarize, ternary
from tvswitch.runtime.bundle.writer import PayloadStore, write_bundle
from tvswitch.files import same_file
from tvswitch.kernels.abi import code_words
from tvswitch.runtime.bundle import manifest as fmt
from tvswitch.runtime.autoswitch import RouterSpec
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.checkpoint import fingerprint
from tvswitch.runtime.rebuild import CpuRebuilder

#: Scheme.layout's values: codes as streams (FORMAT.md 3.1), compact (groups of four that
#: hold nothing of their own left out: the sparse layout of 3.4, T-Switch's ternary codes
#: included), or auto: compact for a term where it takes at most AUTO_COMPACT of the
#: streams' bits.
TERM_LAYOUTS = ("auto", "streams", "compact")
#: A compact row decodes slower than a stream's where stored and unstored groups mix
#: (docs/results/layouts.md: an 8-task mix of 3-bit codes, all compact, takes 3.3x), so
#: auto takes the compact form only where it at least halves a term; a saving that large
#: comes from tensors fine-tuning left mostly alone, whose rows are all fill and decode fast.
AUTO_COMPACT = 0.5
#: RTVQ (base bits, offset bits) pairs the budget allocator may choose per tensor.
RTVQ_OPTIONS = ((2, 1), (2, 2), (3, 1), (3, 2), (4, 2), (3, 3), (4, 3), (5, 3), (4, 4), (6, 4))
#: Elements on which the allocator estimates each option's error (the steps use them all).
ERROR_SAMPLE = 1 << 16
#: How much more an error along the task vector itself counts than one in a random direction
#: (export/allocate.py and docs/allocation.md: chosen on MiniLM fine-tunes, not derived).
COHERENT_GAIN = 100.0
#: ||tau|| / ||base|| above which a "fine-tune" is likely of another base: real fine-tunes
#: measure about 0.01 (MiniLM's eight text8 tasks: 0.005-0.009), a network trained apart
#: about 1 or more.  A warning; ``strict`` makes it a refusal.
MAX_RELATIVE_NORM = 0.5

log = logging.getLogger("tvswitch.export")


@dataclass
class Scheme:
    """Everything that says how task vectors are stored; recorded in the manifest."""

    name: str = "tvq"
    bits: int = 4
    granularity: str = "tensor"
    base_bits: int = 3
    offset_bits: int = 2
    budget_bits: Optional[float] = None
    keep: float = 0.3
    #: how each term's codes are held (TERM_LAYOUTS): "streams", "compact" or "auto"
    layout: str = "auto"
    raw_dtype: str = "float16"
    task_specific: List[str] = field(default_factory=list)

    def check(self) -> None:
        if self.name not in fmt.SCHEMES:
            raise TvswitchError("--scheme must be one of %s, got %r" % (", ".join(fmt.SCHEMES), self.name))
        parse_granularity(self.granularity)
        for flag, b in (("--bits", self.bits), ("--base-bits", self.base_bits), ("--offset-bits", self.offset_bits)):
            if not 1 <= b <= 8:
                raise TvswitchError("%s must be 1..8, got %d" % (flag, b))
        if self.raw_dtype not in fmt.ELEMENT_DTYPES:
            raise TvswitchError("--raw-dtype must be float16 or float32, got %r" % self.raw_dtype)
        if self.budget_bits is not None:
            if "budget_bits" not in fmt.SCHEMES[self.name]:
                raise TvswitchError("--budget-bits applies to --scheme tvq or rtvq")
            if not self.budget_bits > 0:
                raise TvswitchError("--budget-bits must be positive, got %g" % self.budget_bits)
        if self.name == "tswitch" and not 0 < self.keep <= 1:
            raise TvswitchError("--keep must be in (0, 1], got %g" % self.keep)
        if self.layout not in TERM_LAYOUTS:
            raise TvswitchError("--layout must be one of %s, got %r" % (", ".join(TERM_LAYOUTS), self.layout))


def export_bundle(base: Any, tasks: Mapping[str, Any], out: str, scheme: Optional[Scheme] = None, *,
                  include_base: Optional[str] = None, entropy: str = "none",
                  query_sets: Optional[Mapping[str, np.ndarray]] = None,
                  router: Optional[Union[RouterSpec, dict]] = None,
                  progress: bool = False, strict: bool = False, **scheme_fields: Any) -> Bundle:
    """Export ``tasks`` (name -> checkpoint) against ``base`` into bundle ``out``.

    Checkpoints are paths (safetensors or torch files, shard indexes, save_pretrained folders;
    a task may be a PEFT LoRA adapter folder), state_dicts or torch modules
    (``export.checkpoints``); names that differ by a prefix are mapped, with a note.
    A tensor a task leaves exactly as the base has it is stored for no task that does.
    ``strict`` refuses a task vector larger than ``MAX_RELATIVE_NORM`` of the base (else a
    warning).
    ``include_base`` ("float16"/"float32") embeds the base for a self-contained bundle;
    ``entropy`` ("zlib"/"lzma") compresses payloads on flash (decoded once at load).
    ``query_sets`` (task -> exemplars x features, e.g. ``autoswitch.build_query_sets``) are
    stored as fp16 for Auto-Switch, with ``router`` saying how their features were taken.
    Returns the written bundle, opened and verified.
    """
    scheme = scheme or Scheme(**scheme_fields)
    scheme.check()
    if not tasks:
        raise TvswitchError("give at least one task (--task NAME=PATH)")
    for name in tasks:
        if not fmt.task_name_ok(name):
            raise TvswitchError("task name %r: use letters, digits and _ . + - only" % name)
    if include_base not in (None, "float16", "float32"):
        raise TvswitchError("--include-base must be float16 or float32, got %r" % include_base)
    for name, src in tasks.items():
        if isinstance(src, (str, os.PathLike)) and isinstance(out, (str, os.PathLike)) and same_file(src, out):
            raise TvswitchError("-o %s is task %r's checkpoint: writing it would destroy that input" % (out, name))
    if isinstance(base, (str, os.PathLike)) and same_file(base, out):
        raise TvswitchError("-o %s is the base checkpoint: writing it would destroy that input" % out)
    base_ck = load_checkpoint(base, "base")
    cks = {name: load_task(src, base_ck, name) for name, src in tasks.items()}
    base_ck, cks, renaming = align(base_ck, cks)
    layout = classify(base_ck, cks, scheme.task_specific)
    check_magnitudes(base_ck, cks, layout.vectors, strict)
    store = PayloadStore(entropy)
    entries: Dict[str, Dict[str, dict]] = {t: {} for t in cks}
    widths = _widths(scheme, base_ck, cks, layout, progress)
    if scheme.name == "emr":
        _encode_emr(scheme, base_ck, cks, layout, entries, store)
    for name in _progress(layout.vectors if scheme.name != "emr" else [], progress, "encode"):
        taus, flat_base = task_vectors(base_ck, cks, name)
        changed = changed_tasks(taus)  # an unchanged tensor is stored for no task
        if not changed.size:
            continue
        names = [list(cks)[i] for i in changed]
        encoded = encode_tensor(scheme, name, base_ck.tensors[name].shape, names, taus[changed], flat_base,
                          widths.get(name), store)
        for task, entry in zip(names, encoded):
            entries[task][name] = entry
    for name in layout.as_is:
        for task, ck in cks.items():
            if not np.array_equal(ck.tensors[name], base_ck.tensors[name]):
                key = store.add("%s/%s/values" % (task, name), ck.tensors[name].astype(scheme.raw_dtype))
                entries[task][name] = {"mode": "absolute", "terms": [{"kind": "raw", "values": key}]}
    task_specific = {}
    for task, names in layout.task_only.items():
        task_specific[task] = {n: store.add("%s/%s" % (task, n), cks[task].tensors[n].astype(scheme.raw_dtype))
                               for n in names}
    shared = layout.vectors + layout.as_is
    manifest = {
        "scheme": dict(_scheme_record(scheme), entropy=entropy),
        "base": {
            "fingerprint": fingerprint(base_ck.tensors, shared + layout.fixed),
            "other": layout.fixed,
            "embedded": _embed_base(base_ck, shared, layout.fixed, include_base, store),
        },
        "tasks": list(cks),
        "tensors": {n: {"shape": list(base_ck.tensors[n].shape), "dtype": base_ck.tensors[n].dtype.name}
                    for n in base_ck.tensors if n in set(shared)},
        "entries": entries,
        "task_specific": task_specific,
    }
    if renaming is not None:
        manifest["base"]["renamed"] = {"strip": renaming.strip, "add": renaming.add}
    add_queries(manifest, store, query_sets, router, list(cks))
    write_bundle(out, manifest, store)
    bundle = Bundle.open(out)
    if scheme.name == "rtvq":
        warn_shared_losses(bundle, base_ck, cks, layout.vectors)
    return bundle


def warn_shared_losses(bundle: Bundle, base: Checkpoint, tasks: Mapping[str, Checkpoint], names: Sequence[str]
                       ) -> None:
    """Warn for a task the bundle stores worse than not at all: its rebuild further from its
    fine-tune than the base is (error above its task vector's norm). RTVQ's shared base
    vector does that to a small task when another task's vector is much larger, as a LoRA
    task beside dense fine-tunes can be; a scheme per task (TVQ) does not. (EMR's unified
    vector loses more by design: that is the merging method's, not a storage accident.)"""
    if not names:
        return
    rebuilder = CpuRebuilder(bundle, {n: base.tensors[n] for n in bundle.shared_specs}, verify_base=False)
    out = rebuilder.allocate("float32")
    for task, ck in tasks.items():
        rebuilder.rebuild({task: 1.0}, out)
        err_sq = tau_sq = 0.0
        for n in names:
            fine = ck.tensors[n].astype(np.float32).ravel()
            err, tau = out[n].ravel() - fine, fine - base.tensors[n].astype(np.float32).ravel()
            err_sq, tau_sq = err_sq + float(np.dot(err, err)), tau_sq + float(np.dot(tau, tau))
        if tau_sq > 0 and err_sq > tau_sq:
            log.warning("task %r (%s): the %s bundle rebuilds it %.2g of its task vector's norm away from its "
                        "fine-tune, further than the base is; another task's much larger vector dominates the "
                        "shared base vector. Store it with a scheme per task (--scheme tvq) or in a bundle of its own"
                        % (task, ck.label, bundle.scheme, (err_sq / tau_sq) ** 0.5))


def check_magnitudes(base: Checkpoint, tasks: Mapping[str, Checkpoint], names: Sequence[str], strict: bool) -> None:
    """Warn (or, ``strict``, refuse) for a task vector far larger than a fine-tune's, naming the task and figure."""
    if not names:
        return
    base_sq = sum(float(np.sum(base.tensors[n].astype(np.float64) ** 2)) for n in names)
    for task, ck in tasks.items():
        tau_sq = sum(float(np.sum((ck.tensors[n].astype(np.float64) - base.tensors[n]) ** 2)) for n in names)
        ratio = (tau_sq / base_sq) ** 0.5 if base_sq > 0 else 0.0
        if ratio > MAX_RELATIVE_NORM:
            message = ("task %r (%s): its task vector's norm is %.3g of the base's, where fine-tunes measure "
                       "about 0.01 (above %g it is likely not a fine-tune of this base)"
                       % (task, ck.label, ratio, MAX_RELATIVE_NORM))
            if strict:
                raise TvswitchError(message + "; refused (--strict)")
            log.warning(message)


def _scheme_record(scheme: Scheme) -> dict:
    record = asdict(scheme)
    return {k: v for k, v in record.items() if v is not None}


def _embed_base(base: Checkpoint, shared: List[str], fixed: List[str], dtype: Optional[str],
                store: PayloadStore) -> Optional[Dict[str, str]]:
    if dtype is None:
        return None
    # The manifest's tensors keep the checkpoint's dtypes, which the fingerprint hashes and
    # an outside base must have; a float16 copy only says so in its payload descriptions.
    out = {}
    for n in shared:
        out[n] = store.add("@base/" + n, base.tensors[n].astype(dtype), compress=False)
    for n in fixed:
        out[n] = store.add("@base/" + n, base.tensors[n], compress=False)
    return out


def add_queries(manifest: dict, store: PayloadStore, query_sets: Optional[Mapping[str, np.ndarray]],
                 router: Optional[Union[RouterSpec, dict]], tasks: List[str]) -> None:
    """Auto-Switch's query sets and the router record that says how their features are
    taken, validated here so that no bundle carries a record its reader would refuse."""
    if router is not None and not query_sets:
        raise TvswitchError("a router record describes query sets: give the query sets too")
    if not query_sets:
        return
    unknown = sorted(set(query_sets) - set(tasks))
    if unknown:
        raise TvswitchError("query sets name unknown task %r" % unknown[0])
    dims = {np.asarray(q).shape[1] if np.asarray(q).ndim == 2 else -1 for q in query_sets.values()}
    if len(dims) != 1 or -1 in dims:
        raise TvswitchError("query sets must be 2-D (exemplars x features) with one feature size")
    manifest["queries"] = {t: store.add("@query/" + t, np.asarray(q, dtype=np.float16)) for t, q in query_sets.items()}
    if router is not None:
        record = router.record() if isinstance(router, RouterSpec) else router
        manifest["router"] = RouterSpec.from_record(record, "the router record").record()


# ---- per-scheme encoding of one tensor --------------------------------------------------

def term_form(codes: np.ndarray, bits: int, mask: Optional[np.ndarray], layout: str) -> Tuple[str, int, Optional[int]]:
    """(layout, uint32 words of codes and index, fill) a codes term is stored in under
    ``layout`` (TERM_LAYOUTS): compact is the sparse layout, with the most common code as
    the fill; a masked term (EMR's), and under auto a compact form above AUTO_COMPACT of the
    streams, stays streams.  The exporter stores by it and the budget allocator prices by
    it, so a budget holds to what is written.  (The groups layout, FORMAT.md 3.3, is T-Switch's
    form before its terms were ternary codes: read, no longer written.)"""
    n = codes.size
    streams = ("streams", code_words(n, bits) + (code_words(n, 1) if mask is not None else 0), None)
    if layout == "streams" or mask is not None or not n:
        return streams
    fill = int(np.bincount(codes.reshape(-1)).argmax())
    compact = ("sparse", group_index_words(n) + sparse_words(stored_groups(codes, fill), bits), fill)
    return compact if layout == "compact" or compact[1] <= AUTO_COMPACT * streams[1] else streams


def codes_term(store: PayloadStore, prefix: str, q: Quantized, mask: Optional[np.ndarray] = None,
               layout: str = "streams") -> dict:
    """A codes term (FORMAT.md section 4) whose payloads go into ``store`` under ``prefix``,
    in the form ``term_form`` picks for ``layout``."""
    form, _, fill = term_form(q.codes, q.bits, mask, layout)
    if form == "sparse":
        index, words = pack_sparse(q.codes, q.bits, fill)
        term = {"kind": "codes", "layout": "sparse", "bits": q.bits, "group": q.group, "fill": fill,
                "codes": store.add(prefix + "/codes", words), "mask": store.add(prefix + "/index", index)}
    else:
        term = {"kind": "codes", "bits": q.bits, "group": q.group,
                "codes": store.add(prefix + "/codes", pack_codes(q.codes, q.bits))}
        if mask is not None:
            term["mask"] = store.add(prefix + "/mask", pack_mask(mask))
    term["params"] = store.add(prefix + "/params", q.params, compress=False)
    return term


def _encode_emr(scheme: Scheme, base: Checkpoint, cks: Mapping[str, Checkpoint], layout: Layout,
                entries: Dict[str, Dict[str, dict]], store: PayloadStore) -> None:
    """EMR-Merging stored as T-Switch-like bitmaps: one unified vector (codes at ``bits``,
    shared), and per task a mask over it and a rescaler carried as the term's scale."""
    from tvswitch.export.merge import emr

    tasks = list(cks)
    vectors: Dict[str, Dict[str, np.ndarray]] = {t: {} for t in tasks}
    for name in layout.vectors:
        taus, _ = task_vectors(base, cks, name)
        for t, tau in zip(tasks, taus):
            vectors[t][name] = tau
    merged = emr(vectors)
    for name in layout.vectors:
        # a task whose mask keeps nothing of a tensor (it left it as the base has it, or
        # disagrees in sign everywhere) adds zero there: it gets no entry, as in the other
        # schemes, and a tensor no task keeps anything of stores no unified vector either
        keeping = [t for t in tasks if merged.masks[t][name].any()]
        if not keeping:
            continue
        group = group_size(base.tensors[name].shape, scheme.granularity)
        shared = codes_term(store, "@shared/%s" % name, quantize(merged.unified[name], scheme.bits, group))
        for t in keeping:
            term = dict(shared, mask=store.add("%s/%s/mask" % (t, name), pack_mask(merged.masks[t][name].reshape(-1))),
                        scale=float(merged.rescalers[t]))
            entries[t][name] = {"mode": "delta", "terms": [term]}


def encode_tensor(scheme: Scheme, name: str, shape, tasks: List[str], taus: np.ndarray, flat_base: np.ndarray,
                  width: Optional[tuple], store: PayloadStore) -> List[dict]:
    """Entries (one per task, in task order) for tensor ``name``."""
    group = group_size(shape, scheme.granularity)
    if scheme.name == "tvq":
        bits = width[0] if width else scheme.bits
        return [{"mode": "delta", "terms": [codes_term(store, "%s/%s" % (t, name), quantize(tau, bits, group),
                                                       layout=scheme.layout)]}
                for t, tau in zip(tasks, taus)]
    if scheme.name == "fq":
        return [{"mode": "absolute",
                 "terms": [codes_term(store, "%s/%s" % (t, name), quantize(tau + flat_base, scheme.bits, group),
                                      layout=scheme.layout)]}
                for t, tau in zip(tasks, taus)]
    if scheme.name == "rtvq":
        base_bits, offset_bits = width if width else (scheme.base_bits, scheme.offset_bits)
        res = quantize_residual(taus, base_bits, offset_bits, group)
        shared = codes_term(store, "@shared/%s" % name, res.base, layout=scheme.layout)
        return [{"mode": "delta", "terms": [shared, codes_term(store, "%s/%s" % (t, name), off, layout=scheme.layout)]}
                for t, off in zip(tasks, res.offsets)]
    return [{"mode": "delta", "terms": [codes_term(store, "%s/%s" % (t, name), ternary(binarize(tau, scheme.keep)),
                                                   layout=scheme.layout)]}
            for t, tau in zip(tasks, taus)]


# ---- bit allocation under a budget ------------------------------------------------------

def term_bits(x: np.ndarray, bits: int, group: int, layout: str) -> int:
    """Bits a codes term of flat ``x`` at ``bits`` stores, as ``--budget-bits`` counts them:
    its code words (and index) in the form ``term_form`` picks for ``layout``, and a float32
    (scale, offset) pair per group: at ``group:32`` the pairs alone are 2 bits per weight."""
    n = x.size
    words = (code_words(n, bits) if layout == "streams"
             else term_form(quantize(x, bits, group).codes, bits, None, layout)[1])
    return 32 * words + 64 * (-(-n // group))


def changed_tasks(taus: np.ndarray) -> np.ndarray:
    """Rows of a tensor's stacked task vectors that are not all zero: the tasks it is stored for."""
    return np.flatnonzero(taus.any(axis=1))


def _widths(scheme: Scheme, base: Checkpoint, cks: Mapping[str, Checkpoint], layout: Layout,
            progress: bool) -> Dict[str, tuple]:
    """Per-tensor widths chosen under ``--budget-bits`` (empty: the scheme's uniform widths).
    Each option is priced as it would be written (``term_bits``, over the tasks the tensor
    is stored for, a shared base once), so under ``--layout auto`` or ``compact`` the bits a
    sparse term saves are spent on wider codes elsewhere."""
    if scheme.budget_bits is None or not layout.vectors:
        return {}
    T = len(cks)
    options: List[List[alloc.Option]] = []
    total = 0
    rng = np.random.default_rng(0)
    for name in _progress(layout.vectors, progress, "allocate"):
        taus, flat_base = task_vectors(base, cks, name)
        n = taus.shape[1]
        total += n
        changed = changed_tasks(taus)
        if not changed.size:  # stored for no task: costs nothing at any width
            options.append([alloc.Option(cost=0.0, error=0.0)])
            continue
        taus = taus[changed]
        group = group_size(base.tensors[name].shape, scheme.granularity)
        idx = np.sort(rng.choice(n, ERROR_SAMPLE, replace=False)) if n > ERROR_SAMPLE else None
        ft_norm = float(np.mean([np.sum((tau + flat_base).astype(np.float64) ** 2) for tau in taus]))
        weight = 1.0 / max(ft_norm, 1e-30)
        opts = []
        if scheme.name == "tvq":
            for b in range(1, 9):
                err = sum(sampled_error(tau, b, group, idx, along=tau, gain=COHERENT_GAIN) for tau in taus)
                cost = sum(term_bits(tau, b, group, scheme.layout) for tau in taus) / T
                opts.append(alloc.Option(cost=cost, error=weight * err, label=(b,)))
        else:
            mean = taus.mean(axis=0, dtype=np.float64).astype(np.float32)
            refs = {bb: dequantize(quantize(mean, bb, group)) for bb in sorted({o[0] for o in RTVQ_OPTIONS})}
            for bb, bo in RTVQ_OPTIONS:
                err, cost = 0.0, term_bits(mean, bb, group, scheme.layout)
                for tau in taus:
                    offset = tau - refs[bb]
                    err += sampled_error(offset, bo, group, idx, along=tau, gain=COHERENT_GAIN)
                    cost += term_bits(offset, bo, group, scheme.layout)
                opts.append(alloc.Option(cost=cost / T, error=weight * err, label=(bb, bo)))
        options.append(opts)
    choice = alloc.allocate(options, scheme.budget_bits * total, weights=total)
    return {name: opts[c].label for name, opts, c in zip(layout.vectors, options, choice) if opts[c].label}


def _progress(items: Sequence[str], enabled: bool, what: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="tensor", leave=False)
