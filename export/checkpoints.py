"""Reading checkpoints for export, and sorting their tensors into what a bundle stores how.

Checkpoints come as safetensors files, torch state_dict files (read with
``weights_only=True``: never unpickle arbitrary objects), in-memory state_dicts or torch
modules.  Every tensor is then one of:
- a task vector: a float tensor the base has too (quantised by the scheme);
- stored as-is per task: float tensors only the fine-tuned model has (a head), those the
  user names with ``--task-specific``, and float buffers such as BatchNorm statistics;
- fixed: integer and bool tensors (and empty ones), which must equal the base's (not
  stored, only fingerprinted).
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Set, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.checkpoint import read_safetensors

#: Float buffers that are statistics, not weights: never turned into task vectors.
BUFFER_SUFFIXES = ("running_mean", "running_var")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Checkpoint:
    """A checkpoint's tensors as numpy arrays, its label for messages, and its buffer names."""

    tensors: Dict[str, np.ndarray]
    label: str
    buffers: Set[str] = field(default_factory=set)


def load_checkpoint(source: Any, label: str = "") -> Checkpoint:
    """A path, a state_dict (numpy or torch tensors) or a torch module, as numpy arrays."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(TORCH_SUFFIXES):
            return Checkpoint(_read_torch_file(path), path)
        return Checkpoint(read_safetensors(path), path)
    if hasattr(source, "state_dict") and hasattr(source, "named_buffers"):
        buffers = {name for name, _ in source.named_buffers()}
        return Checkpoint(_to_numpy(source.state_dict(), label), label or type(source).__name__, buffers)
    if isinstance(source, Mapping):
        return Checkpoint(_to_numpy(source, label), label or "<state_dict>")
    raise TvswitchError("cannot read a checkpoint from %r" % type(source).__name__)


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


@dataclass
class Layout:
    """Which tensors a bundle stores how (see the module docstring)."""

    vectors: List[str]  # task vectors, in base order
    as_is: List[str]  # base tensors stored per task as-is
    task_only: Dict[str, List[str]]  # per task: tensors the base does not have
    fixed: List[str]  # non-float (and empty) base tensors, equal in every task


def classify(base: Checkpoint, tasks: Mapping[str, Checkpoint], patterns: Sequence[str]) -> Layout:
    """Sort tensors; refuse missing tensors, shape/dtype mismatches (naming both files) and
    NaN/inf in any float tensor (naming its file)."""
    vectors, as_is, fixed = [], [], []
    for name, a in base.tensors.items():
        for task, ck in tasks.items():
            if name not in ck.tensors:
                raise TvswitchError("tensor %r of base %s is missing from task %r (%s)"
                                    % (name, base.label, task, ck.label))
            b = ck.tensors[name]
            if b.shape != a.shape or b.dtype != a.dtype:
                raise TvswitchError("tensor %r is %s%s in base %s but %s%s in task %r (%s)"
                                    % (name, a.dtype, list(a.shape), base.label, b.dtype, list(b.shape),
                                       task, ck.label))
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:  # nothing to vary: fixed
            for task, ck in tasks.items():
                if not np.array_equal(ck.tensors[name], a):
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
    task_only = {}
    for task, ck in tasks.items():
        extra = [n for n in ck.tensors if n not in base.tensors]
        for n in extra:
            if not np.issubdtype(ck.tensors[n].dtype, np.floating):
                raise TvswitchError("tensor %r of task %r (%s) is not in base %s and not float"
                                    % (n, task, ck.label, base.label))
            _check_finite(n, ck.tensors[n], "task %r (%s)" % (task, ck.label))
        task_only[task] = extra
    return Layout(vectors, as_is, task_only, fixed)


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
