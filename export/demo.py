"""The quick start's main job in one call: pack the built-in example, make one graph, serve and switch.

``run_demo(folder)`` is what ``tvswitch demo FOLDER`` runs, step by step as a user would
with the separate verbs (``example``, ``export``, ``export-onnx --bundle``, ``run``):

1. the example's base and three fine-tuned checkpoints (heads of 3, 4 and 5 classes);
2. one RTVQ bundle of the three task vectors;
3. one weight-stripped ONNX graph for all three tasks (heads padded, outputs cut back);
4. one ONNX Runtime engine serving it: for every task a switch (the rebuild into the
   engine's buffers) and one answer, checked against torch on that task's rebuilt,
   unpadded weights;
5. beside it, measured in the same run, the naive way: a fresh engine from that task's
   own checkpoint (a new session of its own constant-weight graph, read from flash, and
   one answer), the graphs made beforehand, as a user without tvswitch keeps one per task.

Times are medians over ``rounds`` cycles through the tasks, each switch a real rebuild.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export import example, example_net
from tvswitch.export.exporter import export_bundle
from tvswitch.export.onnx_export import export_onnx, export_onnx_for_bundle, write_model
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.checkpoint import read_safetensors
from tvswitch.runtime.rebuild import CpuRebuilder


@dataclass
class DemoRow:
    """One task of the demo: what the switch cost and answered, against the naive way."""

    task: str
    switch_ms: float
    first_answer_ms: float  # switch + one inference
    naive_ms: float  # a new session of the task's own constant-weight graph, one inference
    output: np.ndarray  # the engine's answer to the example input
    torch_error: float  # max |engine - torch on the rebuilt, unpadded weights|


@dataclass
class DemoReport:
    folder: str
    bundle: str
    graph: str
    bundle_bytes: int
    graph_bytes: int
    checkpoint_bytes: int  # the three fine-tuned checkpoints the bundle replaces
    rows: List[DemoRow]


def run_demo(folder: str, rounds: int = 5, threads: int = 1) -> DemoReport:
    """Build everything under ``folder`` and serve it (see the module docstring)."""
    if rounds < 1:
        raise TvswitchError("rounds must be at least 1, got %d" % rounds)
    paths = example.make_example(folder)
    base_path, task_paths = paths[0], dict(zip(example.TASKS, paths[1:]))
    bundle_path = os.path.join(folder, "tasks.tvs")
    bundle = export_bundle(base_path, task_paths, bundle_path, name="rtvq")
    ids = example.example_ids()
    graph_path = os.path.join(folder, "tasks.onnx")
    export_onnx_for_bundle(example_net.detect(), bundle, [ids], graph_path, input_names=["ids"])
    naive = _naive_graphs(folder, task_paths, ids)
    base = read_safetensors(base_path)
    server = _serve(bundle, graph_path, base, threads)
    references = _torch_answers(bundle, base, ids)
    switch: Dict[str, List[float]] = {t: [] for t in bundle.tasks}
    first: Dict[str, List[float]] = {t: [] for t in bundle.tasks}
    answers: Dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for task in bundle.tasks[1:] + bundle.tasks[:1]:  # the server starts on the first: every switch rebuilds
            start = time.perf_counter()
            server.switch({task: 1.0})
            switched = time.perf_counter()
            answers[task] = server.infer({"ids": ids})["output"]
            done = time.perf_counter()
            switch[task].append(switched - start)
            first[task].append(done - start)
    rows = []
    for task in bundle.tasks:
        naive_ms = 1e3 * float(np.median([_naive_answer(naive[task], ids, threads)
                                          for _ in range(rounds)]))
        rows.append(DemoRow(task, 1e3 * float(np.median(switch[task])), 1e3 * float(np.median(first[task])),
                            naive_ms, answers[task], float(np.max(np.abs(answers[task] - references[task])))))
    return DemoReport(folder, bundle_path, graph_path, os.path.getsize(bundle_path), os.path.getsize(graph_path),
                      sum(os.path.getsize(p) for p in task_paths.values()), rows)


def _serve(bundle: Bundle, graph: str, base: Dict[str, np.ndarray], threads: int):
    from tvswitch.runtime.server import serve_bundle

    return serve_bundle(bundle, "onnxruntime", model=graph, base=base, threads=threads)


def _naive_graphs(folder: str, task_paths: Dict[str, str], ids: np.ndarray) -> Dict[str, str]:
    """One graph per task, its own network with its checkpoint's weights as constants (made
    beforehand, not timed): what serving without tvswitch keeps on flash for every task."""
    import torch

    from tvswitch.runtime.engines import onnx_graph

    out = {}
    os.makedirs(os.path.join(folder, "naive"), exist_ok=True)
    for task, path in task_paths.items():
        weights = read_safetensors(path)
        module = example_net.build(example.CLASSES[task])
        module.load_state_dict({n: torch.from_numpy(a) for n, a in weights.items()})
        proto = export_onnx(module, [ids], input_names=["ids"])
        names = onnx_graph.find_weights(proto)
        out[task] = os.path.join(folder, "naive", task + ".onnx")
        write_model(onnx_graph.constant_graph(proto, {n: weights[n] for n in names}), out[task])
    return out


def _naive_answer(graph: str, ids: np.ndarray, threads: int) -> float:
    """Seconds to the first answer of a fresh engine for one task: a new session of its own
    constant-weight graph, read from flash, and one run."""
    from tvswitch.runtime.engines.onnxruntime import new_session, session_options_for

    start = time.perf_counter()
    session = new_session(graph, session_options_for(threads), ["CPUExecutionProvider"])
    session.run(None, {"ids": ids})
    return time.perf_counter() - start


def _torch_answers(bundle: Bundle, base: Dict[str, np.ndarray], ids: np.ndarray) -> Dict[str, np.ndarray]:
    """Each task's answer in torch, on its rebuilt weights and its own head at its own shape."""
    import torch

    rebuilder = CpuRebuilder(bundle, base)
    out = {}
    for task in bundle.tasks:
        weights = rebuilder.allocate()
        rebuilder.rebuild({task: 1.0}, weights)
        weights.update(bundle.task_specific(task))
        weights.update((n, base[n]) for n in bundle.manifest["base"]["other"])
        module = example_net.build(example.CLASSES[task])
        module.load_state_dict({n: torch.from_numpy(np.asarray(a, dtype=np.float32) if a.dtype.kind == "f" else a)
                                for n, a in weights.items()})
        with torch.no_grad():
            out[task] = module(torch.from_numpy(ids)).numpy()
    return out
