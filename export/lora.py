"""PEFT LoRA adapters as tasks: the fine-tuned weights an adapter folder stands for, against the base.

An adapter folder (what ``peft``'s ``save_pretrained`` writes) holds ``adapter_config.json``
and ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
``weights_only=True``).  Reading it needs json and safetensors only, not peft.  For each
adapted module the task vector is

    delta W = s * B @ A,   s = lora_alpha / r   (rslora: lora_alpha / sqrt(r))

with ``r`` and ``lora_alpha`` per module where ``rank_pattern`` / ``alpha_pattern`` say
so, transposed for ``fan_in_fan_out`` (GPT-2's Conv1D), reshaped for a Conv2d's kernel,
and ``(B @ A)^T`` for an embedding (``lora_embedding_A/B``).  Full tensors the adapter
saves (``modules_to_save``, biases under ``bias="all"``/``"lora_only"``) replace the
base's: a classification head the base lacks becomes task-specific, as for any
checkpoint.  Every other base tensor is unchanged, so its task vector is zero and the
bundle stores nothing for it: a LoRA task costs about what its adapter costs.

Names: peft saves ``base_model.model.<module path>.lora_A.weight``; the path is the
model's the adapter was made on (``bert.encoder...`` for a BertForSequenceClassification),
which may differ from the base's by a prefix (a BertModel: ``encoder...``), found as for
any checkpoint (``checkpoints.best_renaming``).  The task's tensors carry the adapter's
names.  Refused in one line: DoRA (``use_dora``: a magnitude vector rescales every
column, not a low-rank sum), other PEFT types, an adapted module the base lacks, A and B
of shapes that do not multiply to the base weight's.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export.checkpoints import ADAPTER_CONFIG, Checkpoint, best_renaming, load_checkpoint

PEFT_PREFIX = "base_model.model."
#: ``<module>.lora_A[.<adapter>].weight`` / ``<module>.lora_embedding_A[.<adapter>]``
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>embedding_)?(?P<side>[AB])(?:\.[^.]+)?(?:\.weight)?$")


def read_adapter(folder: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(adapter_config.json, the adapter's tensors with peft's model prefix stripped)."""
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise TvswitchError("%s: unreadable %s (%s)" % (folder, ADAPTER_CONFIG, exc)) from None
    if not isinstance(config, dict):
        raise TvswitchError("%s: %s is not a JSON object" % (folder, ADAPTER_CONFIG))
    if config.get("peft_type", "LORA") != "LORA":
        raise TvswitchError("%s: a %s adapter; tvswitch reads LoRA adapters" % (folder, config.get("peft_type")))
    if config.get("use_dora"):
        raise TvswitchError("%s: a DoRA adapter (use_dora): its magnitude vector rescales whole columns, which is "
                            "no low-rank sum; merge it into the weights (peft's merge_and_unload) and give those"
                            % folder)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            tensors = load_checkpoint(path, path).tensors
            break
    else:
        raise TvswitchError("%s: no adapter_model.safetensors (or .bin) beside %s" % (folder, ADAPTER_CONFIG))
    return config, {(n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n): a for n, a in tensors.items()}


def load_task(source: Any, base: Checkpoint, label: str) -> Checkpoint:
    """A task's checkpoint: as ``load_checkpoint``, or a PEFT LoRA adapter folder made into the
    fine-tuned weights it stands for against ``base`` (``adapter_checkpoint``)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(os.fspath(source), ADAPTER_CONFIG)):
        return adapter_checkpoint(os.fspath(source), base, label)
    return load_checkpoint(source, label)


def adapter_checkpoint(folder: str, base: Checkpoint, label: str) -> Checkpoint:
    """The fine-tuned checkpoint an adapter folder stands for: ``base`` plus each adapted
    weight's ``delta W``, and the tensors the adapter saves whole, under the adapter's names.

    Unchanged tensors are the base's own arrays (no copy): their task vectors are zero.
    """
    config, tensors = read_adapter(folder)
    pairs: Dict[str, Dict[str, np.ndarray]] = {}
    whole: Dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        m = _LORA_KEY.match(name)
        if m:
            key = m.group("module") + ("|embedding" if m.group("kind") else "")
            pairs.setdefault(key, {})[m.group("side")] = a
        else:
            whole[name] = a
    targets = {(k[:-len("|embedding")] if k.endswith("|embedding") else k) + ".weight": k for k in pairs}
    renaming = best_renaming(list(base.tensors), list(targets) + list(whole))
    names = {(renaming(n) if renaming else n): n for n in base.tensors}  # adapter name -> base name
    out = {adapter_name: base.tensors[base_name] for adapter_name, base_name in names.items()}
    for weight, key in targets.items():
        if weight not in names:
            raise TvswitchError("%s: the adapter changes %r, which base %s does not have"
                                % (folder, weight, base.label))
        if set(pairs[key]) != {"A", "B"}:
            raise TvswitchError("%s: the adapter has lora_A or lora_B of %r, not both" % (folder, weight))
        w = base.tensors[names[weight]]
        delta = _delta(config, key, pairs[key], w.shape, folder, weight)
        out[weight] = (w.astype(np.float32) + delta).astype(w.dtype)
    out.update(whole)
    return Checkpoint(out, "%s (LoRA adapter%s)" % (folder, ", r=%s" % config.get("r") if "r" in config else ""),
                      {n for n, base_name in names.items() if base_name in base.buffers})


def _delta(config: Mapping, key: str, ab: Mapping[str, np.ndarray], shape: Tuple[int, ...], folder: str,
           weight: str) -> np.ndarray:
    """``s * B @ A`` laid out as the base weight of ``shape`` (float32)."""
    module = key.split("|")[0]
    a, b = (np.asarray(ab[s], dtype=np.float32) for s in ("A", "B"))
    r = _pattern(config, "rank_pattern", module, config.get("r", a.shape[0]))
    alpha = _pattern(config, "alpha_pattern", module, config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if key.endswith("|embedding"):  # lora_embedding_A: [r, num_embeddings], _B: [dim, r]
        delta = (b @ a).T
    else:
        delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        if config.get("fan_in_fan_out"):
            delta = delta.T
    if delta.size != int(np.prod(shape)):
        raise TvswitchError("%s: lora_B @ lora_A of %r is %s, the base weight is %s"
                            % (folder, weight, list(delta.shape), list(shape)))
    return (np.float32(scale) * delta).reshape(shape)


def _pattern(config: Mapping, field: str, module: str, default: float) -> float:
    """A per-module value of ``rank_pattern``/``alpha_pattern`` (keys match the end of a module's name)."""
    for pattern, value in (config.get(field) or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(value)
    return float(default)
