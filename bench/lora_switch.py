"""What a LoRA user would pick instead, side by side: tvswitch, PEFT's hotswap_adapter, ONNX Runtime's LoraAdapter.

    python bench/lora_switch.py [--cache ~/.cache/tvswitch/text8] [--threads 1] [--rounds 2]

(run as a file, as bench/switch_latency.py.) Eight tasks of MiniLM, each a rank-8 LoRA
adapter on the attention projections of the six layers (bench/switch_skip.py's
``lora_factors``) and the text8 task's head. Every way serves all eight from one network
whose head is padded to the largest (44 classes), each answer cut to its task's classes:
- tvswitch: the tasks' task vectors (B @ A) in a TVQ 4-bit bundle, one ONNX Runtime
  engine, a switch rewriting what changed (the 24 targets and the head); the tensors no
  task changes are constants of the session (what ``serve_bundle`` does), and a second
  row has every weight a graph input (``constants=False``, as before that), in one run;
- PEFT: the torch module with the LoRA layers unmerged, a switch =
  ``hotswap_adapter_from_state_dict`` with the task's A and B plus a copy of its head;
- ONNX Runtime LoraAdapter: the same PEFT network exported once with every A, B and the
  head as named graph inputs whose initializers are the defaults, each task's values in
  an ``.onnx_adapter`` file; a switch = a RunOptions with that adapter active (adapters
  loaded beforehand), or with the adapter loaded from its file at the switch.
For each: the switch (median over the 8x7 ordered pairs), the time to the first answer
(switch + one inference) at 1x16 and 8x64, and inference against constant weights (the
task's merged weights as constants: an ONNX Runtime session for tvswitch and
LoraAdapter, the plain torch module for PEFT), all in one run.
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
from typing import Any, Callable, Dict, List

import numpy as np

import switch_latency as L
import switch_skip as S
from tvswitch.commands.bench_switch import percentiles

WIDEST = 44  # text8's most classes (r52x)


def pairs(names: List[str], rounds: int):
    return [(a, b) for _ in range(rounds) for a in names for b in names if a != b]


def timed_pairs(names: List[str], rounds: int, go: Callable[[str], Any], then: Callable[[], Any] = None
                ) -> List[float]:
    """Serve a (untimed), then time the switch to b (and ``then``, the first inference) per ordered pair."""
    out = []
    for a, b in pairs(names, rounds):
        go(a)
        start = time.perf_counter()
        go(b)
        if then is not None:
            then()
        out.append(time.perf_counter() - start)
    return out


def interleaved(runs: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    for run in runs.values():
        run()
    out: Dict[str, List[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            out[k].append(L.elapsed(run))
    return out


def padded_head(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    w, b = weights["head.weight"], weights["head.bias"]
    pw = np.zeros((WIDEST, w.shape[1]), np.float32)
    pb = np.zeros(WIDEST, np.float32)
    pw[: len(w)], pb[: len(b)] = w, b
    return {"head.weight": pw, "head.bias": pb}


class Peft:
    """The PEFT way: one LoRA model (unmerged), hot-swapped per task."""

    def __init__(self, bert, factors, heads):
        import torch
        from peft import LoraConfig, get_peft_model

        self.torch = torch
        self.config = LoraConfig(r=S.RANK, lora_alpha=S.RANK, lora_dropout=0.0,
                                 target_modules=r".*attention\.(self\.(query|key|value)|output\.dense)")
        self.model = get_peft_model(L.classifier(copy.deepcopy(bert), WIDEST), self.config).eval()
        self.head = self.model.base_model.model.head
        self.states = {t: self._state(f) for t, f in factors.items()}
        self.heads = {t: {k: torch.from_numpy(v) for k, v in h.items()} for t, h in heads.items()}

    def _state(self, factors) -> Dict[str, Any]:
        state = {}
        for key in self.model.state_dict():
            for part, i in (("lora_A", 0), ("lora_B", 1)):
                if ".%s.default." % part in key:
                    target = L.PREFIX + key.split("base_model.model.bert.")[1].split(".%s." % part)[0] + ".weight"
                    state[key] = self.torch.from_numpy(factors[target][i])
        return state

    def switch(self, task: str) -> None:
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        hotswap_adapter_from_state_dict(self.model, self.states[task], "default", self.config)
        with self.torch.no_grad():
            self.head.weight.copy_(self.heads[task]["head.weight"])
            self.head.bias.copy_(self.heads[task]["head.bias"])

    def infer(self, feeds) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(*[self.torch.from_numpy(feeds[n]) for n in L.INPUTS]).numpy()


class OrtLora:
    """ONNX Runtime's way: the PEFT network as one graph whose LoRA weights and head are inputs."""

    def __init__(self, peft: Peft, factors, heads, work: pathlib.Path, threads: int):
        import onnx
        import onnxruntime as ort

        from tvswitch.runtime.engines.onnxruntime import new_session, session_options_for

        self.ort = ort
        from tvswitch.export.onnx_export import export_onnx

        path = str(work / "lora.onnx")
        example = [peft.torch.from_numpy(np.ones((1, 16), np.int64))] * 2
        dynamic = {n: {0: "batch", 1: "seq"} for n in L.INPUTS}
        graph = export_onnx(peft.model, example, input_names=L.INPUTS, output_names=[L.OUTPUT],
                            dynamic_axes=dict(dynamic, **{L.OUTPUT: {0: "batch"}}))
        names = {i.name for i in graph.graph.input}
        self.params = [t.name for t in graph.graph.initializer if "lora_" in t.name or t.name.endswith(L.HEAD)]
        for t in graph.graph.initializer:
            if t.name in self.params and t.name not in names:
                graph.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        onnx.save(graph, path)
        self.session = new_session(path, session_options_for(threads), ["CPUExecutionProvider"])
        self.files, self.adapters = {}, {}
        for task in factors:
            values = {**{k: v.numpy() for k, v in peft.states[task].items()}, **{
                n: v.numpy() for n, v in peft.heads[task].items()}}
            fmt = ort.AdapterFormat()
            fmt.set_parameters({self._param(k): ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()})
            self.files[task] = str(work / ("%s.onnx_adapter" % task))
            fmt.export_adapter(self.files[task])
            self.adapters[task] = self._load(task)
        self.options = None

    def _param(self, key: str) -> str:
        """The graph input of a state_dict key (the exporter names initializers by their state_dict key)."""
        found = [p for p in self.params if p == key or p.endswith(key.split("base_model.model.")[-1])]
        if len(found) != 1:
            raise SystemExit("lora_switch: no single graph input for %s (%s)" % (key, found))
        return found[0]

    def _load(self, task: str):
        adapter = self.ort.LoraAdapter()
        adapter.Load(self.files[task])
        return adapter

    def switch(self, task: str, from_file: bool = False) -> None:
        options = self.ort.RunOptions()
        options.add_active_adapter(self._load(task) if from_file else self.adapters[task])
        self.options = options

    def infer(self, feeds) -> np.ndarray:
        return self.session.run(None, feeds, run_options=self.options)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvswitch/text8"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the 8x7 pairs")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(args.threads, 1))
    with tempfile.TemporaryDirectory(prefix="tvswitch-lora-") as tmp:
        return run(args, pathlib.Path(tmp))


def run(args: argparse.Namespace, work: pathlib.Path) -> int:
    import onnxruntime as ort
    import peft as peft_package
    import torch

    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.server import BundleSource, Server

    bert = L.load_bert().eval()
    base = {L.PREFIX + n: t.detach().numpy().copy() for n, t in bert.state_dict().items() if t.is_floating_point()}
    dense, origin = L.task_weights(base, pathlib.Path(args.cache))
    factors = S.lora_factors(base, dense)
    tasks = S.lora_tasks(base, dense, factors)
    names = list(tasks)
    classes = {t: int(tasks[t]["head.weight"].shape[0]) for t in names}
    heads = {t: padded_head(tasks[t]) for t in names}
    rng = np.random.default_rng(0)
    sizes = {"1x16": L.token_feeds(rng, 1, 16), "8x64": L.token_feeds(rng, 8, 64)}

    target = L.OrtTarget("cpu", args.threads, work)
    bundle = export_bundle(base, tasks, str(work / "lora.tvs"), name="tvq", bits=4)
    target.prepare(bundle, bert, sizes["1x16"])
    constant = {}
    for t in names:
        target.write_task(str(work / ("%s.const.onnx" % t)), tasks[t])
        constant[t] = target.load(str(work / ("%s.const.onnx" % t)))
    servers = {}
    for constants in (True, False):
        engine = target.engine(constants={n: base[n] for n in bundle.base_only} if constants else None)
        servers[constants] = Server(engine, BundleSource(bundle, engine, base, threads=args.threads),
                                    {names[0]: 1.0})
        for t in names:
            servers[constants].switch({t: 1.0})

    peft = Peft(bert, factors, heads)
    ortl = OrtLora(peft, factors, heads, work, args.threads)
    plain = L.classifier(copy.deepcopy(bert), WIDEST)  # the first task's merged weights, as constants
    plain.load_state_dict({n: torch.from_numpy(v) for n, v in {**tasks[names[0]], **heads[names[0]]}.items()},
                          strict=False)
    first = constant[names[0]]

    ways: Dict[str, Dict[str, Any]] = {
        "tvswitch (ONNX Runtime engine, TVQ 4-bit; %d unchanged tensors constants)" % len(bundle.base_only): dict(
            go=lambda t: servers[True].switch({t: 1.0}), infer=lambda f: servers[True].infer(f)[L.OUTPUT],
            const=lambda f: first.run(None, f)[0]),
        "tvswitch, every weight a graph input": dict(
            go=lambda t: servers[False].switch({t: 1.0}), infer=lambda f: servers[False].infer(f)[L.OUTPUT],
            const=lambda f: first.run(None, f)[0]),
        "PEFT hotswap_adapter (torch, unmerged LoRA)": dict(
            go=peft.switch, infer=peft.infer,
            const=lambda f: _torch_run(plain, f)),
        "ONNX Runtime LoraAdapter, adapters loaded beforehand": dict(
            go=ortl.switch, infer=ortl.infer, const=lambda f: first.run(None, f)[0]),
        "ONNX Runtime LoraAdapter, adapter loaded at the switch": dict(
            go=lambda t: ortl.switch(t, from_file=True), infer=ortl.infer, const=None),
    }
    results = {}
    for label, way in ways.items():
        r = {"switch": percentiles(timed_pairs(names, args.rounds, way["go"]))}
        for size, feeds in sizes.items():
            r["first " + size] = percentiles(timed_pairs(names, 1, way["go"], lambda: way["infer"](feeds)))
        way["go"](names[0])
        if way["const"] is not None:
            for size, feeds in sizes.items():
                runs = interleaved({"ours": lambda: way["infer"](feeds), "const": lambda: way["const"](feeds)},
                                   15 if size == "1x16" else 5)
                r["speed " + size] = np.median(runs["const"]) / np.median(runs["ours"])
            want = first.run(None, sizes["1x16"])[0]
            got = way["infer"](sizes["1x16"])[:, : classes[names[0]]]
            r["diff"] = float(np.abs(got - want).max())
        results[label] = r

    print("LoRA switching, side by side: MiniLM-L6 (%.1f M weights), 8 tasks of rank-8 adapters on the attention "
          "projections, heads of %s classes (padded to %d)" % (sum(a.size for a in base.values()) / 1e6,
                                                              "/".join(str(classes[t]) for t in names), WIDEST))
    print("machine: %s, %d CPUs, load average %.1f; python %s, torch %s, onnxruntime %s, peft %s; threads=%d; %s; "
          "heads from %s" % (platform.machine(), os.cpu_count(), os.getloadavg()[0], platform.python_version(),
                             torch.__version__, ort.__version__, peft_package.__version__, args.threads,
                             time.strftime("%Y-%m-%d"), origin))
    print("| way | switch median / p99 | first answer 1x16 | first answer 8x64 | speed vs constant 1x16 | 8x64 "
          "| max diff to constant |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print("| %s | %.2f / %.2f ms | %.2f ms | %.1f ms | %s | %s | %s |" % (
            label, r["switch"]["median_ms"], r["switch"]["p99_ms"], r["first 1x16"]["median_ms"],
            r["first 8x64"]["median_ms"], "%.3f" % r["speed 1x16"] if "speed 1x16" in r else "as above",
            "%.3f" % r["speed 8x64"] if "speed 8x64" in r else "as above",
            "%.1e" % r["diff"] if "diff" in r else "as above"))
    return 0


def _torch_run(module, feeds) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(*[torch.from_numpy(feeds[n]) for n in L.INPUTS]).numpy()


if __name__ == "__main__":
    sys.exit(main())
