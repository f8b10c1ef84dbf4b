"""How far a bundle's rebuild of a task is from the fine-tuned checkpoint it was made from.

``rebuild_error`` rebuilds the task on the CPU and compares it with the checkpoint, tensor
by tensor, as the error relative to the task vector (``||rebuilt - fine-tuned|| /
||fine-tuned - base||``): 0 is exact, 1 is as far as the base itself.  It is what
``tvswitch verify --against NAME=CHECKPOINT`` prints, so a user can see what a scheme cost
their own model before deploying it.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export.checkpoints import Checkpoint, best_renaming
from tvswitch.export.lora import load_task
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.rebuild import CpuRebuilder, resolve_base


def rebuild_error(bundle: Bundle, task: str, checkpoint: Any, base: Optional[Mapping[str, np.ndarray]] = None
                  ) -> Dict[str, Any]:
    """Per tensor and overall, the rebuild's error relative to the task vector (see the module docstring).

    ``checkpoint`` is anything ``export`` takes for a task (a file, a folder, an adapter);
    ``base`` the base unless the bundle embeds it.  Heads (task-specific tensors) are
    compared to the checkpoint's as relative errors of their own norm (they are stored
    as-is, so only their dtype rounds them).
    """
    bundle.entries(task)  # names an unknown task
    weights = resolve_base(bundle, base)
    base_ck = Checkpoint(dict(weights), "the base")
    ck = load_task(checkpoint, base_ck, task)
    renaming = best_renaming(list(ck.tensors), list(bundle.shared_specs) + list(bundle.task_specific(task)))
    tensors = {renaming(n) if renaming else n: a for n, a in ck.tensors.items()}
    missing = [n for n in bundle.shared_specs if n not in tensors]
    if missing:
        raise TvswitchError("%s has no tensor %r of bundle %s (%d missing): not task %r's checkpoint"
                            % (ck.label, missing[0], bundle.path, len(missing), task))
    rebuilder = CpuRebuilder(bundle, base, verify_base=False)
    out = rebuilder.allocate("float32")
    rebuilder.rebuild({task: 1.0}, out)
    rows: Dict[str, Dict[str, float]] = {}
    err_sq = tau_sq = 0.0
    for name in bundle.shared_specs:
        ft = np.asarray(tensors[name], dtype=np.float64)
        if ft.shape != out[name].shape:
            raise TvswitchError("tensor %r is %s in %s, %s in bundle %s" % (name, list(ft.shape), ck.label,
                                                                          list(out[name].shape), bundle.path))
        e = float(np.sum((out[name] - ft) ** 2))
        t = float(np.sum((ft - weights[name]) ** 2))
        err_sq, tau_sq = err_sq + e, tau_sq + t
        relative = (e / t) ** 0.5 if t else (0.0 if e == 0 else float("inf"))
        rows[name] = {"error": e ** 0.5, "task_vector": t ** 0.5, "relative": relative}
    heads = {}
    for name, stored in bundle.task_specific(task).items():
        if name in tensors:
            ft = np.asarray(tensors[name], dtype=np.float64)
            if ft.shape != stored.shape:  # another task's checkpoint, or another head
                raise TvswitchError("head tensor %r is %s in %s, %s in task %r of bundle %s: is it that task's "
                                    "checkpoint?" % (name, list(ft.shape), ck.label, list(stored.shape), task,
                                                     bundle.path))
            norm = float(np.linalg.norm(ft)) or 1.0
            heads[name] = float(np.linalg.norm(stored.astype(np.float64) - ft)) / norm
    return {"task": task, "checkpoint": ck.label, "relative": (err_sq / tau_sq) ** 0.5 if tau_sq else 0.0,
            "tensors": rows, "heads": heads}
