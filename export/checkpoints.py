"""Reading checkpoints for export as users have them, and sorting their tensors into what a bundle stores how.

Checkpoints come as a safetensors file, a torch state_dict file (read with
``weights_only=True``: never unpickled), a sharded index (``*.safetensors.index.json``,
``pytorch_model.bin.index.json``), a ``save_pretrained`` folder holding any of those, an
in-memory state_dict or torch module; a task may also be a PEFT LoRA adapter folder
(``export.lora``).  bfloat16 is widened to float32 exactly.

Names are matched before anything is compared (``align``): a backbone saved alone
(``BertModel``: ``encoder.*``) against the same backbone inside each task's model
(``BertForSequenceClassification``: ``bert.encoder.*`` and ``classifier.*``) differs by
a prefix, which is found and mapped, the tasks' names winning (they are what a graph of
the fine-tuned network serves); each mapping is one note on the ``tvswitch.export``
logger.  Buffers that inference never reads or that a model may or may not save
(``UNSAVED_BUFFERS``) are handled without refusal, each with a note.

Every tensor is then one of:
- a task vector: a float tensor the base has too, at the base's shape (quantised by the scheme);
- stored as-is per task: float buffers such as BatchNorm statistics and the tensors the
  user names with ``--task-specific``;
- task-only: float tensors the base lacks (a head), and heads the base has at another
  shape (a 1000-class pretrained classifier against 4-class fine-tunes): the base's is
  then left out of the bundle;
- fixed: integer and bool tensors (and empty ones), which must equal the base's (not
  stored, only fingerprinted), but for ``num_batches_tracked``.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.checkpoint import read_safetensors

log = logging.getLogger("tvswitch.export")

#: Float buffers that are statistics, not weights: never turned into task vectors.
BUFFER_SUFFIXES = ("running_mean", "running_var")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Integer buffers that one save of a model holds and another does not (transformers marks
#: them non-persistent in some versions), all constant at inference: a base or task that
#: lacks one is not refused.
UNSAVED_BUFFERS = ("position_ids", "token_type_ids", "num_batches_tracked")
#: The integer counter every train-mode step of a BatchNorm bumps and inference never reads:
#: a task's value may differ from the base's, and the base's is kept.
UNREAD_COUNTERS = ("num_batches_tracked",)
#: What a ``save_pretrained`` folder holds, in the order looked for.
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
#: Heads the base has at another shape than every task are task-specific when they are one
#: module's or hold at most this share of the base's weights; more would be another network.
HEAD_SHARE = 0.05


@dataclass
class Checkpoint:
    """A checkpoint's tensors as numpy arrays, its label for messages, and its buffer names."""

    tensors: Dict[str, np.ndarray]
    label: str
    buffers: Set[str] = field(default_factory=set)


def load_checkpoint(source: Any, label: str = "") -> Checkpoint:
    """A path (file, index or folder), a state_dict (numpy or torch tensors) or a torch module, as numpy arrays."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return Checkpoint(_read_folder(path), path)
        return Checkpoint(_read_file(path), path)
    if hasattr(source, "state_dict") and hasattr(source, "named_buffers"):
        buffers = {name for name, _ in source.named_buffers()}
        return Checkpoint(_to_numpy(source.state_dict(), label), label or type(source).__name__, buffers)
    if isinstance(source, Mapping):
        return Checkpoint(_to_numpy(source, label), label or "<state_dict>")
    raise TvswitchError("cannot read a checkpoint from %r" % type(source).__name__)


ADAPTER_CONFIG = "adapter_config.json"


def _read_file(path: str) -> Dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise TvswitchError("%s: no such file or folder" % path)
    if path.endswith(".index.json"):
        return _read_index(path)
    if path.endswith(TORCH_SUFFIXES):
        return _read_torch_file(path)
    return read_safetensors(path)


def _read_folder(path: str) -> Dict[str, np.ndarray]:
    """The checkpoint a ``save_pretrained`` folder holds (config.json is not needed)."""
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise TvswitchError("%s is a PEFT adapter: give it as a task (--task NAME=%s), which is taken against the "
                            "base" % (path, path))
    for name in FOLDER_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return _read_file(candidate)
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(found) == 1:
        return read_safetensors(os.path.join(path, found[0]))
    raise TvswitchError("%s: a folder with no checkpoint tvswitch reads (looked for %s%s)"
                        % (path, ", ".join(FOLDER_FILES),
                           "; it holds several .safetensors files and no index" if found else ""))


def _read_index(path: str) -> Dict[str, np.ndarray]:
    """A sharded checkpoint: the index's ``weight_map`` names each tensor's shard beside it."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is a %s" % type(weight_map).__name__)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TvswitchError("%s: not a readable shard index (%s)" % (path, exc)) from None
    folder = os.path.dirname(os.path.abspath(path))
    out: Dict[str, np.ndarray] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise TvswitchError("%s: shard %r is not a file name beside the index" % (path, shard))
        out.update(_read_file(os.path.join(folder, shard)))
    missing = [n for n, shard in weight_map.items() if n not in out]
    if missing:
        raise TvswitchError("%s names tensor %r in shard %s, which does not hold it" % (path, missing[0],
                                                                                      weight_map[missing[0]]))
    return {n: out[n] for n in weight_map}


def _read_torch_file(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise TvswitchError("%s is a torch file: install torch (pip install 'tvswitch[torch]') "
                            "or convert it to safetensors" % path) from None
    if not os.path.isfile(path):
        raise TvswitchError("%s: no such file" % path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable or unsafe files
        raise TvswitchError(_torch_load_error(path, exc)) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TvswitchError("%s: holds a %s, not a state_dict" % (path, type(obj).__name__))
    return _to_numpy(obj, path)


def _torch_load_error(path: str, exc: Exception) -> str:
    """One clean line for torch.load's failure: its own message is paragraphs long, with
    terminal colour codes, and suggests unpickling the file, which tvswitch never does."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return ("%s: holds a pickled %s, and tvswitch loads tensors only (weights_only=True): "
                "save a plain state_dict or a safetensors file" % (path, unsafe.group(1)))
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = detail.group(1) if detail else (text.splitlines()[0] if text else type(exc).__name__)
    return "%s: not a loadable torch state_dict (%s)" % (path, reason.strip())


def _to_numpy(state: Mapping[str, Any], label: str) -> Dict[str, np.ndarray]:
    out = {}
    for name, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy type: widen exactly
            t = value.detach().cpu()
            if str(t.dtype) == "torch.bfloat16":
                t = t.float()
            value = t.numpy()
        elif isinstance(value, np.generic):  # a 0-d value that numpy arithmetic made a scalar
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise TvswitchError("%s: entry %r is a %s, not a tensor" % (label, name, type(value).__name__))
        out[name] = value
    return out


# ---- names ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Renaming:
    """Names that begin with ``strip`` begin with ``add`` instead: one prefix for another."""

    strip: str
    add: str

    def __call__(self, name: str) -> str:
        return self.add + name[len(self.strip):] if name.startswith(self.strip) else name

    def describe(self) -> str:
        if self.strip and self.add:
            return "'%s' for '%s'" % (self.add, self.strip)
        return ("'%s' added" % self.add) if self.add else ("'%s' stripped" % self.strip)


def best_renaming(names: Sequence[str], targets: Iterable[str]) -> Optional[Renaming]:
    """The prefix change that makes the most of ``names`` into ``targets``, if it beats none.

    Candidates come from every pair of names that end alike (two dotted parts at least, or
    the whole name); each is scored by the names it maps onto a target exactly.  A change
    must move most of the names, as a prefix saved another way does (``bert.``, DDP's
    ``module.``): one that moves a single module onto another (``classifier.dense`` to
    a ``pooler.dense`` the names lack) is no renaming but two different tensors.
    """
    targets = set(targets)
    ends: Dict[str, Set[str]] = {}
    for t in targets:
        parts = t.split(".")
        for k in range(len(parts) - 1):
            ends.setdefault(".".join(parts[k:]), set()).add(".".join(parts[:k]) + "." if k else "")
    candidates: Dict[Renaming, int] = {}
    for n in names:
        parts = n.split(".")
        for k in range(len(parts) - 1):
            strip = ".".join(parts[:k]) + "." if k else ""
            for add in ends.get(".".join(parts[k:]), ()):
                if strip != add:
                    key = Renaming(strip, add)
                    candidates[key] = candidates.get(key, 0) + 1
    plain = sum(1 for n in names if n in targets)
    best, score = None, plain
    for r in sorted(candidates, key=lambda r: -candidates[r])[:8]:
        hits = sum(1 for n in names if r(n) in targets)
        if hits > score and 2 * sum(1 for n in names if n.startswith(r.strip)) > len(names):
            best, score = r, hits
    return best


def align(base: Checkpoint, tasks: Mapping[str, Checkpoint]
          ) -> Tuple[Checkpoint, Dict[str, Checkpoint], Optional[Renaming]]:
    """``base`` and ``tasks`` under one set of names, those of the task with the most tensors
    (``_network_size``; of those, the one most named as the base, then the first), and the
    base's renaming (None: none), each mapping a note.

    The task with the most tensors is the whole network, head included, where others may be
    its bare backbone (``BertModel`` beside ``BertForSequenceClassification``): its names
    are the ones a graph of the network has, whatever order the tasks come in.  The base is
    renamed into them where a prefix change matches more of them (the bundle records it:
    ``Bundle.base_view`` applies it to a base given later); every other task into those
    names likewise.  Integer buffers of ``UNSAVED_BUFFERS``
    that one side lacks are dropped from the other (noted), and so is a module of the base
    that no task has (``_drop_untaken``: a backbone's pooler), and from a task a tensor the
    base lacks that is a copy of one it has (``drop_tied_copies``: a tied output projection).
    """
    lead = max(tasks, key=lambda t: (_network_size(tasks[t]), sum(1 for n in tasks[t].tensors if n in base.tensors)))
    first = tasks[lead]
    renaming = best_renaming(list(base.tensors), first.tensors)
    if renaming is not None:
        base = renamed(base, renaming, "the base (%s)" % base.label, "task %r (%s)" % (lead, first.label))
    out = {}
    for name, ck in tasks.items():
        if ck is not first:
            r = best_renaming(list(ck.tensors), base.tensors)
            if r is not None:
                ck = renamed(ck, r, "task %r (%s)" % (name, ck.label), "the base")
        out[name] = ck
    base, out = _drop_unsaved(base, out)
    out = {name: drop_tied_copies(ck, base, name) for name, ck in out.items()}
    return _drop_untaken(base, out), out, renaming


def _network_size(ck: Checkpoint) -> int:
    """Tensors of the network ``ck`` was saved from: a tensor saved twice (tied) and buffers
    some saves hold and others not count for nothing, so that a ``torch.save`` of a DDP
    model does not outnumber a ``save_pretrained`` of the same network.  A copy is told by
    its shape and its first and last bytes: cheap, and alike for checkpoints of one network."""
    seen, size = set(), 0
    for name, a in ck.tensors.items():
        if name.rsplit(".", 1)[-1] in UNSAVED_BUFFERS:
            continue
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        key = (a.shape, a.dtype.str, raw[:256].tobytes(), raw[-256:].tobytes())
        size += key not in seen
        seen.add(key)
    return size


def drop_tied_copies(ck: Checkpoint, base: Checkpoint, task: str) -> Checkpoint:
    """``ck`` without the tensors the base lacks that hold, bit for bit, the task's value of
    a tensor the base has: a tied weight saved under both names (``torch.save`` of a
    state_dict keeps GPT-2's ``lm_head.weight``; ``save_pretrained`` and the base leave it
    out).  Kept, it would be a head of this task alone, and the engine would then refuse
    every task that lacks it; the network's tie gives it its value."""
    extra = [n for n in ck.tensors if n not in base.tensors and np.issubdtype(ck.tensors[n].dtype, np.floating)]
    if not extra:
        return ck
    shared = {}
    for n, a in ck.tensors.items():
        if n in base.tensors:
            shared.setdefault((a.shape, a.dtype.str), []).append(n)
    copies = {}
    for n in extra:
        a = ck.tensors[n]
        same = next((m for m in shared.get((a.shape, a.dtype.str), ()) if np.array_equal(ck.tensors[m], a)), None)
        if same is not None and a.size > 1 and np.ptp(a) > 0:  # a constant tensor matches too much
            copies[n] = same
    if not copies:
        return ck
    log.info("task %r (%s): %s, which the base lacks, is a copy of %s (tied weights): left out", task, ck.label,
             ", ".join(copies), ", ".join(sorted(set(copies.values()))))
    return Checkpoint({n: a for n, a in ck.tensors.items() if n not in copies}, ck.label, ck.buffers - set(copies))


def _drop_untaken(base: Checkpoint, tasks: Mapping[str, Checkpoint]) -> Checkpoint:
    """The base without the tensors that no task has, where they are one module or at most
    HEAD_SHARE of its weights: a backbone saved alone keeps its pooler (``ViTModel``,
    ``RobertaModel``), which the tasks' classification networks do not have
    (``ViTForImageClassification``, ``RobertaForSequenceClassification``), so no task vector
    of it exists and nothing serves it.  Tensors some tasks have and others lack, a larger
    share (likely another network), or ones a task holds under a name the base lacks with
    values near the base's (renamed, not fine-tuned from scratch: ``layer.1`` as
    ``layers.1``; a new head of the same shape is far from them) are left to ``classify``'s
    name check, which names the nearest pairs."""
    untaken = [n for n in base.tensors if not any(n in ck.tensors for ck in tasks.values())]
    if not untaken or len(untaken) == len(base.tensors):
        return base
    for n in untaken:
        u = base.tensors[n].astype(np.float64)
        for ck in tasks.values():
            for m, a in ck.tensors.items():
                if m not in base.tensors and a.shape == u.shape and a.dtype == base.tensors[n].dtype and (
                        np.linalg.norm(a.astype(np.float64) - u) <= 0.5 * np.linalg.norm(u)):
                    return base
    owner = os.path.commonprefix([n.split(".")[:-1] for n in untaken])
    total = sum(a.size for a in base.tensors.values())
    if not owner and sum(base.tensors[n].size for n in untaken) > HEAD_SHARE * total:
        return base
    log.info("%d tensor%s of base %s that no task has, left out: %s", len(untaken), "" if len(untaken) == 1 else "s",
             base.label, ", ".join(untaken[:3]) + (" ..." if len(untaken) > 3 else ""))
    drop = set(untaken)
    return Checkpoint({n: a for n, a in base.tensors.items() if n not in drop}, base.label, base.buffers - drop)


def renamed(ck: Checkpoint, r: Renaming, who: str, whose: str) -> Checkpoint:
    """``ck`` under ``r``'s names, with a note; refused where two names would become one."""
    tensors = {r(n): a for n, a in ck.tensors.items()}
    if len(tensors) != len(ck.tensors):
        raise TvswitchError("%s: renaming its tensors to %s's names (%s) makes two of them one name"
                            % (who, whose, r.describe()))
    moved = sum(1 for n in ck.tensors if r(n) != n)
    log.info("names of %s mapped to %s's: %s (%d of %d tensors)", who, whose, r.describe(), moved, len(ck.tensors))
    return Checkpoint(tensors, ck.label, {r(n) for n in ck.buffers})


def _unsaved(name: str, a: np.ndarray) -> bool:
    return name.rsplit(".", 1)[-1] in UNSAVED_BUFFERS and not np.issubdtype(a.dtype, np.floating)


def _drop_unsaved(base: Checkpoint, tasks: Dict[str, Checkpoint]) -> Tuple[Checkpoint, Dict[str, Checkpoint]]:
    """Drop the unsaved-buffer kind of tensor wherever the base or a task lacks it."""
    everyone = [base] + list(tasks.values())
    names = {n for ck in everyone for n, a in ck.tensors.items() if _unsaved(n, a)}
    partial = sorted(n for n in names if not all(n in ck.tensors for ck in everyone))
    if not partial:
        return base, tasks
    log.info("%d buffer%s that some checkpoints save and others do not, constant at inference, left out: %s",
             len(partial), "" if len(partial) == 1 else "s",
             ", ".join(partial[:3]) + (" ..." if len(partial) > 3 else ""))
    drop = set(partial)
    keep = lambda ck: Checkpoint({n: a for n, a in ck.tensors.items() if n not in drop}, ck.label,  # noqa: E731
                                 ck.buffers - drop)
    return keep(base), {t: keep(ck) for t, ck in tasks.items()}


# ---- layout -----------------------------------------------------------------------------

@dataclass
class Layout:
    """Which tensors a bundle stores how (see the module docstring)."""

    vectors: List[str]  # task vectors, in base order
    as_is: List[str]  # base tensors stored per task as-is
    task_only: Dict[str, List[str]]  # per task: tensors the base does not have (or has at another shape)
    fixed: List[str]  # non-float (and empty) base tensors, equal in every task
    replaced: List[str] = field(default_factory=list)  # base tensors every task replaces by its own shape


def classify(base: Checkpoint, tasks: Mapping[str, Checkpoint], patterns: Sequence[str]) -> Layout:
    """Sort tensors; refuse missing tensors (saying how many names matched, and the nearest
    pairs), shape/dtype mismatches (naming both files) and NaN/inf in any float tensor
    (naming its file)."""
    for task, ck in tasks.items():
        _check_names(base, task, ck)
    replaced = _replaced_heads(base, tasks, patterns)
    vectors, as_is, fixed = [], [], []
    counters = []
    for name, a in base.tensors.items():
        if name in replaced:
            continue
        for task, ck in tasks.items():
            b = ck.tensors[name]
            if b.shape != a.shape or b.dtype != a.dtype:
                raise TvswitchError("tensor %r is %s%s in base %s but %s%s in task %r (%s)"
                                    % (name, a.dtype, list(a.shape), base.label, b.dtype, list(b.shape),
                                       task, ck.label))
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:  # nothing to vary: fixed
            for task, ck in tasks.items():
                if not np.array_equal(ck.tensors[name], a):
                    if name.rsplit(".", 1)[-1] in UNREAD_COUNTERS:
                        counters.append(name)
                        continue
                    raise TvswitchError("non-float tensor %r differs between base %s and task %r (%s)"
                                        % (name, base.label, task, ck.label))
            fixed.append(name)
        elif a.dtype not in (np.float32, np.float16):
            raise TvswitchError("tensor %r of %s is %s: tvswitch stores float32 and float16 weights"
                                % (name, base.label, a.dtype))
        else:
            _check_finite(name, a, "base " + base.label)
            for task, ck in tasks.items():
                _check_finite(name, ck.tensors[name], "task %r (%s)" % (task, ck.label))
            (as_is if _as_is(name, base, patterns) else vectors).append(name)
    if counters:
        log.info("%s differs from the base's in some task (a counter train-mode BatchNorm bumps; inference never "
                 "reads it): the base's value is kept%s", counters[0],
                 " (and %d more such)" % (len(set(counters)) - 1) if len(set(counters)) > 1 else "")
    task_only = {}
    for task, ck in tasks.items():
        extra = [n for n in ck.tensors if n not in base.tensors or n in replaced]
        for n in extra:
            if not np.issubdtype(ck.tensors[n].dtype, np.floating):
                raise TvswitchError("tensor %r of task %r (%s) is not in base %s and not float"
                                    % (n, task, ck.label, base.label))
            _check_finite(n, ck.tensors[n], "task %r (%s)" % (task, ck.label))
        task_only[task] = extra
    return Layout(vectors, as_is, task_only, fixed, sorted(replaced))


def _check_names(base: Checkpoint, task: str, ck: Checkpoint) -> None:
    """Refuse a task that lacks base tensors: how many names matched, and the nearest pairs."""
    missing = [n for n in base.tensors if n not in ck.tensors]
    if not missing:
        return
    matched = len(base.tensors) - len(missing)
    extra = [n for n in ck.tensors if n not in base.tensors]
    pairs = []
    for n in missing[:3]:
        close = difflib.get_close_matches(n, extra, n=1, cutoff=0.5)
        pairs.append("%r ~ %r" % (n, close[0]) if close else "%r (none near)" % n)
    raise TvswitchError("task %r (%s) matches %d of the %d tensors of base %s by name (no prefix change matches "
                        "more); %d are missing, nearest: %s" % (task, ck.label, matched, len(base.tensors), base.label,
                                                                 len(missing), "; ".join(pairs)))


def _replaced_heads(base: Checkpoint, tasks: Mapping[str, Checkpoint], patterns: Sequence[str]) -> Set[str]:
    """Base float tensors that every task has at another shape (a pretrained head replaced by
    the tasks' own): the user's ``--task-specific`` ones (where any task has another shape),
    and, unnamed, those that differ in
    their number of outputs only (axis 0) and are of one module (``_fc.*``, ``classifier.*``)
    or of at most HEAD_SHARE of the base's weights.  Anything else is likely a base of
    another network: left to the shape check, which names it."""
    differ = [n for n, a in base.tensors.items() if np.issubdtype(a.dtype, np.floating)
              and all(ck.tensors[n].shape != a.shape for ck in tasks.values())]
    # named ones: where any task has another shape (heads of 3, 5 and 2 labels over a 2-label base)
    named = {n for n, a in base.tensors.items() if np.issubdtype(a.dtype, np.floating)
             and any(fnmatch.fnmatchcase(n, p) for p in patterns)
             and any(ck.tensors[n].shape != a.shape for ck in tasks.values())}
    rest = [n for n in differ if n not in named]
    outputs_only = all(ck.tensors[n].shape[1:] == base.tensors[n].shape[1:]
                       and ck.tensors[n].ndim == base.tensors[n].ndim for n in rest for ck in tasks.values())
    if not outputs_only:  # a head changes its number of outputs (axis 0) and nothing else
        return named
    if not rest:
        return named
    owner = os.path.commonprefix([n.split(".")[:-1] for n in rest])
    total = sum(a.size for a in base.tensors.values())
    if not owner and sum(base.tensors[n].size for n in rest) > HEAD_SHARE * total:
        return named
    log.info("%d tensor%s of base %s every task has at another shape (%s): a head each task replaces, stored per "
             "task, the base's left out", len(rest), "" if len(rest) == 1 else "s", base.label,
             ", ".join("%s %s" % (n, list(base.tensors[n].shape)) for n in rest[:2])
             + (" ..." if len(rest) > 2 else ""))
    return set(rest) | named


def _check_finite(name: str, a: np.ndarray, where: str) -> None:
    """A NaN or inf would quantise to garbage steps (or poison a whole mix): refuse it."""
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise TvswitchError("tensor %r of %s holds %d NaN/inf value%s: export needs finite weights"
                            % (name, where, bad, "" if bad == 1 else "s"))


def _as_is(name: str, base: Checkpoint, patterns: Sequence[str]) -> bool:
    return (name in base.buffers or name.endswith(BUFFER_SUFFIXES)
            or any(fnmatch.fnmatchcase(name, p) for p in patterns))


def task_vectors(base: Checkpoint, tasks: Mapping[str, Checkpoint], name: str) -> Tuple[np.ndarray, np.ndarray]:
    """(stacked float32 task vectors of tensor ``name``, tasks x elements; the base, flat float32)."""
    b = base.tensors[name].astype(np.float32).reshape(-1)
    taus = np.stack([ck.tensors[name].astype(np.float32).reshape(-1) - b for ck in tasks.values()])
    return taus, b
