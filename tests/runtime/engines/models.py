"""Small networks and bundles for the engine and server tests (random init: fast, no download).

``bert_case`` is transformers' own BertModel (a tiny random config, nothing downloaded),
the code the MiniLM benchmark runs; a hand-written BertModel-shaped encoder (embeddings,
LayerNorm, attention, GELU MLP) covers the same ground without transformers; a conv net
with BatchNorm and a per-task head stands for the vision case.  Task checkpoints are the
base plus random deltas (and, for the conv net, their own BatchNorm statistics and
head), exported as a real bundle.
"""
from __future__ import annotations

import copy
import os
import textwrap
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from tvswitch.export.exporter import export_bundle
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.rebuild import CpuRebuilder

TASKS = ("a", "b", "c")


def write_factory_file(path: "os.PathLike[str]", body: str) -> None:
    """Write a file for the CLI's ``--module FILE:FACTORY``: it loads this file as ``M``
    (the tests' models are no package to import from), then defines ``body``'s factories."""
    header = textwrap.dedent("""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("engine_models", %r)
        M = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(M)
        """) % os.path.abspath(__file__)
    with open(path, "w") as f:
        f.write(header + textwrap.dedent(body))


class TinyEncoder(torch.nn.Module):
    """BertModel-shaped: word + position embeddings, LayerNorm, 2 post-LN transformer layers."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, max_len: int = 16):
        super().__init__()
        self.heads = heads
        self.word = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(max_len, d)
        self.ln = torch.nn.LayerNorm(d)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            self.layers.append(torch.nn.ModuleDict(dict(
                q=torch.nn.Linear(d, d), k=torch.nn.Linear(d, d), v=torch.nn.Linear(d, d), o=torch.nn.Linear(d, d),
                ln1=torch.nn.LayerNorm(d), up=torch.nn.Linear(d, 2 * d), down=torch.nn.Linear(2 * d, d),
                ln2=torch.nn.LayerNorm(d))))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        x = self.ln(self.word(ids) + self.pos(torch.arange(s).unsqueeze(0)))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            def split(t):
                return t.view(b, s, self.heads, -1).transpose(1, 2)
            q, k, v = split(layer["q"](x)), split(layer["k"](x)), split(layer["v"](x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + bias, dim=-1)
            x = layer["ln1"](x + layer["o"]((att @ v).transpose(1, 2).reshape(b, s, -1)))
            x = layer["ln2"](x + layer["down"](torch.nn.functional.gelu(layer["up"](x))))
        return x


class ConvBN(torch.nn.Module):
    """Two conv + BatchNorm + ReLU blocks, global average pool, a linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.head(x.mean((2, 3)))


def encoder_case(seed: int = 0) -> Tuple[torch.nn.Module, Dict[str, np.ndarray], List[str]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, size=(2, 8))
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, 6:] = 0
    return TinyEncoder().eval(), {"ids": ids, "mask": mask}, ["ids", "mask"]


class BertEncoder(torch.nn.Module):
    """transformers' BertModel taking (input_ids, attention_mask), returning last_hidden_state (as bench/ wraps it)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert_case(seed: int = 0) -> Tuple[torch.nn.Module, Dict[str, np.ndarray], List[str]]:
    """A 2-layer, d=32 random BertModel (with its pooler, which the graph does not read); skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, size=(2, 8))
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, 5:] = 0
    names = ["input_ids", "attention_mask"]
    return BertEncoder(transformers.BertModel(config)).eval(), dict(zip(names, (ids, mask))), names


def conv_case(seed: int = 0) -> Tuple[torch.nn.Module, Dict[str, np.ndarray], List[str]]:
    torch.manual_seed(seed)
    net = ConvBN().eval()
    with torch.no_grad():  # non-trivial statistics, as after training
        for bn in (net.b1, net.b2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)
    return net, {"x": x}, ["x"]


def task_checkpoints(module: torch.nn.Module, heads: Tuple[str, ...] = (), seed: int = 1,
                     only: Optional[Tuple[str, ...]] = None
                     ) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]]]:
    """(base, task -> fine-tuned): float tensors moved by ~5%, BatchNorm statistics redrawn.

    ``heads`` are tensor-name prefixes kept out of the base: each task has its own.
    ``only``: name suffixes of the tensors the tasks change (as a LoRA adapter changes its
    target layers alone); every other tensor stays the base's in every task.
    """
    rng = np.random.default_rng(seed)
    state = {n: t.detach().numpy().copy() for n, t in module.state_dict().items()}
    base = {n: a for n, a in state.items() if not n.startswith(heads)}
    tasks = {}
    for task in TASKS:
        ft = {}
        for n, a in state.items():
            if not np.issubdtype(a.dtype, np.floating) or (only is not None and not n.endswith(only)):
                ft[n] = a
            elif n.endswith("running_var"):
                ft[n] = rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
            else:
                ft[n] = (a + 0.05 * (np.abs(a).mean() + 0.1) * rng.standard_normal(a.shape)).astype(a.dtype)
        tasks[task] = ft
    return base, tasks


def make_bundle(tmp_path, module: torch.nn.Module, heads: Tuple[str, ...] = (), name: str = "model.tvs",
                query_sets: Optional[Dict[str, np.ndarray]] = None, router: Optional[dict] = None,
                only: Optional[Tuple[str, ...]] = None) -> Tuple[Bundle, Dict[str, np.ndarray]]:
    base, tasks = task_checkpoints(module, heads, only=only)
    bundle = export_bundle(base, tasks, os.path.join(str(tmp_path), name), name="tvq", bits=8, query_sets=query_sets,
                           router=router)
    return bundle, base


def torch_reference(module: torch.nn.Module, bundle: Bundle, base: Dict[str, np.ndarray], mix: Dict[str, float],
                    inputs: Dict[str, np.ndarray], input_names: List[str]) -> np.ndarray:
    """The module run in torch with the weights the rebuild gives ``mix`` (heads of its heaviest task)."""
    rebuilder = CpuRebuilder(bundle, base)
    out = rebuilder.allocate()
    rebuilder.rebuild(mix, out)
    out.update(bundle.task_specific(max(mix, key=mix.get)))
    ref = copy.deepcopy(module)
    ref.load_state_dict({n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in out.items()}, strict=False)
    with torch.no_grad():
        return ref(*[torch.from_numpy(inputs[n]) for n in input_names]).numpy()

