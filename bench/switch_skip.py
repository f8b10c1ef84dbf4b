"""A switch costs what changed: switches with and without skipping unchanged tensors, MiniLM, one engine.

    python bench/switch_skip.py [--cache ~/.cache/tvswitch/text8] [--threads 1] [--rounds 3]

(run as a file, as bench/switch_latency.py, whose parts it uses: the repository's root stays
off sys.path, where its kernels/ folder would shadow the package transformers looks for)

Two suites of 8 tasks on the same 22.7 M-weight encoder, each served by one ONNX Runtime
engine (one graph for all tasks, heads padded, as bench/switch_latency.py):
- dense: the 8 real text8 fine-tunes (every weight of the encoder changed; synthetic
  stand-ins where the cache lacks them, and the output says so);
- LoRA: 8 task vectors made from rank-8 LoRA adapters on the attention projections
  (query, key, value, attention output) of the six layers, B @ A at the RMS the real
  fine-tunes moved those tensors by, with the real tasks' heads: 24 of the 100 shared
  tensors, 15.6% of the weights, change.

For each: every ordered pair of tasks (8 x 7) and a sequence of random mixes of 2-3 tasks,
each switch timed with skipping (a tensor whose inputs are the same in the mix left and
the mix entered is neither read nor written, nor is a 1024-element block where every term
of both is +0.0) and without (every tensor rewritten), on two engines of their own that
take each switch in turn (so the VM's drift falls on both); bytes moved per switch both
ways (the rebuilder's own count); and the naive reload of that task (a new session from
its own constant-weight ONNX file, in the page cache) in the same run. The copy reference
is bench/copyref.py.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np

import switch_latency as L
from copyref import copy_bandwidth
from tvswitch.commands.bench_switch import percentiles

#: the attention projections a LoRA adapter of BERT-style encoders targets (PEFT's usual choice)
LORA_TARGETS = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
                "attention.output.dense.weight")
RANK = 8


def lora_factors(base: Dict[str, np.ndarray], dense: Dict[str, Dict[str, np.ndarray]], seed: int = 0
                 ) -> Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Per task of ``dense``, per LoRA target: (A, B) of rank 8, float32, with B @ A at the RMS
    that task's real fine-tune moved that tensor by (PEFT's layout: A is rank x in, B out x rank)."""
    rng = np.random.default_rng(seed)
    out: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]] = {}
    for task, ft in dense.items():
        out[task] = {}
        for name, a in base.items():
            if name.endswith(LORA_TARGETS):
                rms = float(np.sqrt(np.mean((ft[name].astype(np.float64) - a) ** 2)))
                A, B = rng.standard_normal((RANK, a.shape[1])), rng.standard_normal((a.shape[0], RANK))
                B *= rms / np.sqrt(np.mean((B @ A) ** 2))
                out[task][name] = (A.astype(np.float32), B.astype(np.float32))
    return out


def lora_tasks(base: Dict[str, np.ndarray], dense: Dict[str, Dict[str, np.ndarray]],
               factors: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]) -> Dict[str, Dict[str, np.ndarray]]:
    """Each task's whole weights: the base plus B @ A on each LoRA target, the task's own head
    from ``dense``, every other tensor as the base."""
    out = {}
    for task, pairs in factors.items():
        weights = dict(base)
        for name, (A, B) in pairs.items():
            weights[name] = (base[name] + B @ A).astype(base[name].dtype)
        weights.update((n, dense[task][n]) for n in L.HEAD)
        out[task] = weights
    return out


def pair_switches(servers, names: List[str], rounds: int) -> List[List[float]]:
    """Each ordered pair (a, b), a != b: serve a (untimed), then time the switch to b; the
    servers take each pair in turn, so drift in the machine's speed falls on all alike."""
    times: List[List[float]] = [[] for _ in servers]
    for _ in range(rounds):
        for a in names:
            for b in names:
                if a != b:
                    for server, mine in zip(servers, times):
                        server.switch({a: 1.0})
                        mine.append(L.elapsed(lambda: server.switch({b: 1.0})))
    return times


def random_mixes(names: List[str], count: int, seed: int = 1) -> List[Dict[str, float]]:
    """Mixes of 2-3 tasks at weights 0.3, 0.5 or 1, each differing from the one before."""
    rng = np.random.default_rng(seed)
    mixes: List[Dict[str, float]] = []
    while len(mixes) < count:
        tasks = rng.choice(names, int(rng.integers(2, 4)), replace=False)
        mix = {str(t): float(rng.choice([0.3, 0.5, 1.0])) for t in tasks}
        if not mixes or mix != mixes[-1]:
            mixes.append(mix)
    return mixes


def mix_switches(servers, mixes: List[Dict[str, float]]) -> List[List[float]]:
    """The switches through ``mixes``, the servers taking each in turn."""
    times: List[List[float]] = [[] for _ in servers]
    for server in servers:
        server.switch(mixes[0])
    for m in mixes[1:]:
        for server, mine in zip(servers, times):
            mine.append(L.elapsed(lambda: server.switch(m)))
    return times


def moved(rebuilder, pairs: List[Tuple[Dict[str, float], Dict[str, float]]]) -> Tuple[float, float, float, float]:
    """(mean bytes a switch moves with skipping, without, mean tensors rewritten with skipping,
    mean share of the shared weights it writes)."""
    skip = [rebuilder.bytes_moved(b, since=a) for a, b in pairs]
    full = [rebuilder.bytes_moved(b) for _, b in pairs]
    cuts = [rebuilder.mix_tables(b).since(rebuilder.mix_tables(a)) for a, b in pairs]
    total = sum(spec.numel for spec in rebuilder.bundle.shared_specs.values())
    return (float(np.mean(skip)), float(np.mean(full)), float(np.mean([len(c.names) for c in cuts])),
            float(np.mean([c.written().sum() / total for c in cuts])))


def suite(label: str, tasks: Dict[str, Dict[str, np.ndarray]], base: Dict[str, np.ndarray], bert, feeds,
          args: argparse.Namespace, work: pathlib.Path) -> Dict[str, Any]:
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.server import BundleSource, Server

    names = list(tasks)
    bundle = export_bundle(base, tasks, str(work / ("%s.tvs" % label.split()[0])), name=args.scheme, bits=args.bits)
    target = L.OrtTarget("cpu", args.threads, work)
    target.prepare(bundle, bert, feeds)
    paths = {t: str(work / ("%s-%s.onnx" % (label.split()[0], t))) for t in names}
    for t in names:
        target.write_task(paths[t], tasks[t])
    mixes = random_mixes(names, 8 * 7 * args.rounds + 1)
    result: Dict[str, Any] = dict(label=label, tensors=len(bundle.shared_specs),
                                  stored=int(np.mean([len(bundle.entries(t)) for t in names])))
    servers, sources = [], []
    for skip in (True, False):  # one engine each, switched in turn
        engine = target.engine()
        sources.append(BundleSource(bundle, engine, base, threads=args.threads))
        servers.append(Server(engine, sources[-1], {names[0]: 1.0}, skip_unchanged=skip))
        for m in mixes[:4] + [{t: 1.0} for t in names]:  # warm: tables of what follows
            servers[-1].switch(m)
    for key, times in zip(("skip", "full"), pair_switches(servers, names, args.rounds)):
        result[key + "_pairs"] = percentiles(times)
    for key, times in zip(("skip", "full"), mix_switches(servers, mixes)):
        result[key + "_mixes"] = percentiles(times)
    pairs = [({a: 1.0}, {b: 1.0}) for a in names for b in names if a != b]
    result["pair_bytes"] = moved(sources[0].rebuilder, pairs)
    result["mix_bytes"] = moved(sources[0].rebuilder, list(zip(mixes, mixes[1:])))
    del servers, sources
    loads, _ = L.measure_naive(target, paths, names, args.rounds, feeds, cold=False)
    result["naive"] = percentiles(loads)
    full_bytes = result["pair_bytes"][1]
    result["copy_gbs"] = copy_bandwidth(int(full_bytes), 15, args.threads) / 1e9
    for p in paths.values():
        os.unlink(p)
    return result


def report(results: List[Dict[str, Any]], facts: Dict[str, Any], args: argparse.Namespace) -> None:
    print("tvswitch skip benchmark: MiniLM-L6 (%.1f M shared weights), 8 tasks per suite, one ONNX Runtime %s engine "
          "each way, %s %d-bit" % (facts["weights"] / 1e6, facts["ort"], args.scheme, args.bits))
    print("machine: %s, %d CPUs, load average %.1f; python %s; threads=%d; date %s; dense tasks: %s" % (
        platform.machine(), os.cpu_count(), os.getloadavg()[0], platform.python_version(), args.threads,
        time.strftime("%Y-%m-%d"), facts["origin"]))
    for r in results:
        sp, fp, sm, fm, nv = r["skip_pairs"], r["full_pairs"], r["skip_mixes"], r["full_mixes"], r["naive"]
        pb, mb = r["pair_bytes"], r["mix_bytes"]
        print("")
        print("%s: %d shared tensors, %d stored per task" % (r["label"], r["tensors"], r["stored"]))
        print("  one task to another (8x7 pairs x %d): skipping median %.2f ms p99 %.2f, every tensor median %.2f ms "
              "p99 %.2f -> %.2fx  [n=%d each]" % (args.rounds, sp["median_ms"], sp["p99_ms"], fp["median_ms"],
                                                  fp["p99_ms"], fp["median_ms"] / sp["median_ms"], sp["n"]))
        print("    moved per switch: %.1f MB skipping (%.1f tensors rewritten, %.3f of the weights), %.1f MB every "
              "tensor (%.3f of it)" % (pb[0] / 1e6, pb[2], pb[3], pb[1] / 1e6, pb[0] / pb[1]))
        print("  random mixes of 2-3 tasks (%d switches): skipping median %.2f ms p99 %.2f, every tensor median %.2f "
              "ms p99 %.2f -> %.2fx; moved %.1f vs %.1f MB (%.1f tensors rewritten, %.3f of the weights)" % (
                  sm["n"], sm["median_ms"], sm["p99_ms"], fm["median_ms"], fm["p99_ms"],
                  fm["median_ms"] / sm["median_ms"], mb[0] / 1e6, mb[1] / 1e6, mb[2], mb[3]))
        print("  naive reload (a new session from the task's constant-weight file, warm): median %.1f ms -> the "
              "switch is %.1fx faster skipping, %.1fx rewriting everything" % (
                  nv["median_ms"], nv["median_ms"] / sp["median_ms"], nv["median_ms"] / fp["median_ms"]))
        print("  every-tensor switch at %.2f of a plain copy of its bytes (%.2f GB/s, bench/copyref.py)" % (
            pb[1] / (fp["median_ms"] / 1e3) / 1e9 / r["copy_gbs"], r["copy_gbs"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvswitch/text8"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the 8x7 pairs, and naive reloads per task")
    ap.add_argument("--scheme", default="tvq", choices=["tvq", "rtvq", "tswitch"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--workdir", help="where the bundles and graphs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(max(args.threads, 1))
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="tvswitch-skip-") as tmp:
            return run(args, pathlib.Path(tmp), ort.__version__)
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
    return run(args, pathlib.Path(args.workdir), ort.__version__)


def run(args: argparse.Namespace, work: pathlib.Path, ort_version: str) -> int:
    bert = L.load_bert().eval()
    base = {L.PREFIX + n: t.detach().numpy().copy() for n, t in bert.state_dict().items() if t.is_floating_point()}
    feeds = L.token_feeds(np.random.default_rng(0), 1, 16)
    dense, origin = L.task_weights(base, pathlib.Path(args.cache))
    facts = dict(weights=sum(a.size for a in base.values()), origin=origin, ort=ort_version)
    results = [suite("dense", dense, base, bert, feeds, args, work),
               suite("LoRA rank 8", lora_tasks(base, dense, lora_factors(base, dense)), base, bert, feeds, args, work)]
    report(results, facts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
