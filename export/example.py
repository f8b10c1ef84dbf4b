"""A small built-in example: a base checkpoint and three "fine-tuned" ones, made on the spot.

It lets the quick start run with no download.  The weights are synthetic but shaped like
a small transformer encoder (embeddings, attention and MLP blocks, LayerNorm, a
BatchNorm-style buffer pair, a per-task head), and each task moves them the way
fine-tuning does: a low-rank change plus small dense noise, scaled well below the
weights themselves.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.files import atomic_write
from tvswitch.runtime.checkpoint import write_safetensors

TASKS = ("detect", "gauge", "line")
#: Classes of each task's head (the heads differ: ``export.example_net`` builds the network per task).
CLASSES = {task: 3 + i for i, task in enumerate(TASKS)}
VOCAB = 1000


def _base(rng: np.random.Generator, d: int = 128, layers: int = 2, vocab: int = VOCAB) -> Dict[str, np.ndarray]:
    w: Dict[str, np.ndarray] = {"embeddings.word.weight": rng.normal(0, 0.05, (vocab, d))}
    for i in range(layers):
        p = "layers.%d." % i
        for name in ("query", "key", "value", "output"):
            w[p + "attn.%s.weight" % name] = rng.normal(0, d ** -0.5, (d, d))
            w[p + "attn.%s.bias" % name] = np.zeros(d)
        w[p + "mlp.up.weight"] = rng.normal(0, d ** -0.5, (4 * d, d))
        w[p + "mlp.down.weight"] = rng.normal(0, (4 * d) ** -0.5, (d, 4 * d))
        w[p + "norm.weight"] = np.ones(d)
        w[p + "norm.bias"] = np.zeros(d)
    w["pool.bn.running_mean"] = rng.normal(0, 0.1, d)
    w["pool.bn.running_var"] = rng.uniform(0.5, 1.5, d)
    out = {k: v.astype(np.float32) for k, v in w.items()}
    out["pool.bn.num_batches_tracked"] = np.array(1000, dtype=np.int64)
    return out


def _finetune(base: Dict[str, np.ndarray], rng: np.random.Generator, classes: int) -> Dict[str, np.ndarray]:
    ft = {}
    for name, a in base.items():
        if not np.issubdtype(a.dtype, np.floating):
            ft[name] = a.copy()
            continue
        scale = 0.02 * (float(np.abs(a).mean()) or 0.02)
        delta = rng.normal(0, scale, a.shape)
        if a.ndim == 2:
            u = rng.normal(0, 1, (a.shape[0], 4))
            v = rng.normal(0, 1, (4, a.shape[1]))
            delta += 2 * scale * (u @ v) / 4
        ft[name] = (a + delta).astype(a.dtype)
    d = base["layers.0.norm.weight"].size
    ft["head.weight"] = rng.normal(0, d ** -0.5, (classes, d)).astype(np.float32)
    ft["head.bias"] = np.zeros(classes, dtype=np.float32)
    return ft


def example_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> np.ndarray:
    """Token ids the example network takes (int64, ``batch`` x ``seq``): an input for export-onnx and run."""
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def make_example(folder: str, seed: int = 0) -> List[str]:
    """Write base.safetensors, one checkpoint per task and ids.npy (an input) into ``folder``;
    returns the checkpoints' paths, the base first."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TvswitchError("%s: exists and is not a folder" % folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise TvswitchError("%s: cannot create the folder (%s)" % (folder, exc.strerror or exc)) from None
    rng = np.random.default_rng(seed)
    base = _base(rng)
    paths = [os.path.join(folder, "base.safetensors")]
    write_safetensors(paths[0], base)
    for task in TASKS:
        path = os.path.join(folder, task + ".safetensors")
        write_safetensors(path, _finetune(base, rng, classes=CLASSES[task]))
        paths.append(path)
    buf = io.BytesIO()
    np.save(buf, example_ids())
    atomic_write(os.path.join(folder, "ids.npy"), buf.getvalue())
    return paths
