"""The 8-task text benchmark: accuracy against bits per weight, for every merging method.

    python -m bench.text8.run [--cache ~/.cache/tvswitch/text8] [--out docs/results]

One command from a fresh clone: fine-tunes the eight tasks once (cached in --cache),
exports each storage scheme with tvswitch's real exporter, decodes every task vector back
through the CPU rebuild (what a device would add), merges, evaluates on each task's test
split and writes docs/results/text8.{json,md,png}. Hyperparameters (task arithmetic's
lambda, TIES' lambda and keep ratio, T-Switch's keep ratio for Auto-Switch, Auto-Switch's
k) are chosen on the validation split carved from the training data, with FP32 task
vectors, and then used unchanged for every storage scheme; AdaMerging's layer-wise
coefficients are likewise learned once, offline where the FP32 checkpoints are, from
unlabelled validation inputs, and applied to each scheme's decoded task vectors. The test
split is only ever used for the reported figures. Each finished row is cached in --cache, so an interrupted
run resumes; --recompute ignores those rows (never the fine-tuned checkpoints).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bench.text8 import data as D
from bench.text8 import finetune as F
from bench.text8 import model as M

import torch  # noqa: E402  (after bench.text8.model, which sets the offline environment)

from tvswitch.export import merge  # noqa: E402
from tvswitch.export.adamerging import AdaMergingResult, adamerging  # noqa: E402
from tvswitch.export.exporter import export_bundle  # noqa: E402
from tvswitch.runtime.autoswitch import AutoSwitch, select_exemplars  # noqa: E402
from tvswitch.runtime.bundle import Bundle  # noqa: E402
from tvswitch.runtime.rebuild import CpuRebuilder  # noqa: E402
from tvswitch.runtime.stats import bundle_stats  # noqa: E402

ROWS_VERSION = 1  # bump when a row's recipe changes, so cached rows are recomputed

#: Storage schemes of the task vectors: label -> exporter Scheme fields (None: FP32 as is).
SCHEMES: Dict[str, Optional[dict]] = {
    "FP32": None,
    "FQ-INT4": {"name": "fq", "bits": 4},
    "TVQ-INT4": {"name": "tvq", "bits": 4},
    "TVQ-INT3": {"name": "tvq", "bits": 3},
    "TVQ-INT2": {"name": "tvq", "bits": 2},
    "RTVQ(3+2)": {"name": "rtvq", "base_bits": 3, "offset_bits": 2},
    "RTVQ@2.5b": {"name": "rtvq", "budget_bits": 2.5},
}
METHODS = ("Task arithmetic", "TIES", "EMR", "AdaMerging")
TSWITCH_KEEPS = (0.1, 0.3, 0.5)
TA_LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7)
TIES_GRID = tuple((keep, lam) for keep in (0.1, 0.2) for lam in (0.7, 1.0, 1.5))
AUTOSWITCH_KS = (1, 5, 10, 20)
EXEMPLARS = 100
# AdaMerging's budget on 2 CPU cores: 30 Adam steps (lr 1.5e-2, so lambdas can move by
# ~0.45 from 0.3), each on 4 unlabelled validation inputs per task cut to 64 tokens.
ADA_STEPS, ADA_LR, ADA_BATCH, ADA_LEN = 30, 1.5e-2, 4, 64

Weights = Dict[str, np.ndarray]


class Bench:
    """Data, checkpoints and one reusable classifier whose weights are swapped in place."""

    def __init__(self, cache: pathlib.Path, tasks: Sequence[str], eval_cap: Optional[int], log) -> None:
        from safetensors.numpy import load_file

        self.log = log
        self.tasks = list(tasks)
        paths = F.finetune_all(cache, self.tasks, log=log)
        self.base: Weights = load_file(str(F.pretrained_path(cache)))
        self.heads: Dict[str, Weights] = {}
        self.finetuned: Dict[str, Weights] = {}
        for t, p in paths.items():
            self.finetuned[t], self.heads[t] = M.split_state(load_file(str(p)))
        s = F.Settings()
        tok = M.load_tokenizer()
        self.data = {t: D.load_task(t, s.max_train, s.max_val, s.max_test, s.seed) for t in self.tasks}
        cap = lambda xs: xs[:eval_cap] if eval_cap else xs
        self.val = {t: M.Tokenized(tok, cap(d.val.texts)) for t, d in self.data.items()}
        self.test = {t: M.Tokenized(tok, cap(d.test.texts)) for t, d in self.data.items()}
        self.val_y = {t: cap(d.val.labels) for t, d in self.data.items()}
        self.unlabelled = {t: M.Tokenized(tok, cap(d.val.texts), ADA_LEN) for t, d in self.data.items()}
        self.test_y = {t: cap(d.test.labels) for t, d in self.data.items()}
        self.exemplars = {t: M.Tokenized(tok, [d.train.texts[i] for i in select_exemplars(
            np.arange(len(d.train.texts)), EXEMPLARS, seed=s.seed)]) for t, d in self.data.items()}
        self.model = M.Classifier(M.load_encoder())
        self.tau32 = {t: {n: (ft[n].astype(np.float32) - self.base[n].astype(np.float32)) for n in ft}
                      for t, ft in self.finetuned.items()}

    def split(self, which: str):
        return (self.val, self.val_y) if which == "val" else (self.test, self.test_y)

    def load(self, weights: Mapping[str, np.ndarray]) -> None:
        M.load_weights(self.model.encoder, weights)

    def accuracy(self, task: str, which: str) -> float:
        xs, ys = self.split(which)
        return float((M.predict(self.model, xs[task], self.heads[task]) == ys[task]).mean())

    def eval_merged(self, delta: Mapping[str, np.ndarray], which: str) -> Dict[str, float]:
        """One set of weights (base + delta) serving every task through its own head."""
        self.load(merge.apply_delta(self.base, delta))
        return {t: self.accuracy(t, which) for t in self.tasks}

    def eval_per_task(self, delta_of: Callable[[str], Mapping[str, np.ndarray]], which: str) -> Dict[str, float]:
        """Task t served by base + delta_of(t): the task is known (individual, EMR, T-Switch)."""
        out = {}
        for t in self.tasks:
            self.load(merge.apply_delta(self.base, delta_of(t)))
            out[t] = self.accuracy(t, which)
        return out


def _avg(accs: Mapping[str, float]) -> float:
    return float(np.mean(list(accs.values())))


# ---- storage ------------------------------------------------------------------------

def export_scheme(bench: Bench, cache: pathlib.Path, label: str, fields: dict,
                  query_sets: Optional[Mapping[str, np.ndarray]] = None, router: Optional[dict] = None):
    """Export the fine-tuned checkpoints under one scheme with the real exporter.

    A bundle left in the cache by an earlier run is reused when it is newer than every
    checkpoint and was written with the same scheme fields.
    """
    folder = cache / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("%s.tvs" % label.replace("(", "").replace(")", "").replace("@", "-").replace("+", "-"))
    tasks = {t: str(F.task_path(cache, t)) for t in bench.tasks}
    if path.exists() and path.stat().st_mtime > max(pathlib.Path(p).stat().st_mtime for p in tasks.values()):
        old = Bundle.open(str(path))
        if (all(old.manifest["scheme"].get(k) == v for k, v in fields.items())
                and list(old.tasks) == list(tasks) and bool(old.query_sets()) == bool(query_sets)):
            return old
    t0 = time.time()
    bundle = export_bundle(str(F.pretrained_path(cache)), tasks, str(path), query_sets=query_sets,
                           router=router, **fields)
    bench.log("exported %s in %.0fs" % (label, time.time() - t0))
    return bundle


def storage_of(bundle) -> Dict[str, float]:
    st = bundle_stats(bundle)
    return {"bits": float(st["bits_per_task_vector_weight"]), "bytes": int(st["task_bytes_on_disk"])}


def fp32_storage(bench: Bench) -> Dict[str, float]:
    n = sum(v.size for v in bench.tau32[bench.tasks[0]].values())
    heads = sum(v.size for h in bench.heads.values() for v in h.values())
    return {"bits": 32.0, "bytes": int(4 * (n * len(bench.tasks) + heads))}


# ---- hyperparameters on validation --------------------------------------------------

def choose(bench: Bench, name: str, grid: Sequence, score: Callable) -> Tuple[object, Dict[str, float]]:
    """The grid point with the best validation average (first one on ties)."""
    results = {}
    for point in grid:
        results[str(point)] = _avg(score(point))
        bench.log("  val %s %s: %.4f" % (name, point, results[str(point)]))
    best = max(grid, key=lambda p: results[str(p)])
    return best, results


def ada_batches(bench: Bench, seed: int = 0) -> Dict[str, list]:
    """Unlabelled validation inputs per task in random batches (labels never read)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in bench.tasks:
        xs = bench.unlabelled[t]
        order = rng.permutation(len(xs))
        out[t] = [xs.batch(order[s:s + ADA_BATCH]) for s in range(0, len(order) - ADA_BATCH + 1, ADA_BATCH)]
    return out


def run_adamerging(bench: Bench, taus: Mapping[str, Weights]) -> AdaMergingResult:
    """Layer-wise AdaMerging on unlabelled validation inputs (labels never read)."""
    heads = {t: (torch.from_numpy(h["weight"]), torch.from_numpy(h["bias"])) for t, h in bench.heads.items()}
    enc = bench.model.encoder
    bench.model.eval()

    def forward(params, task, batch):
        ids, mask = batch
        hidden = torch.func.functional_call(enc, params, (), {"input_ids": ids, "attention_mask": mask})
        m = mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        feats = (hidden.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)
        w, b = heads[task]
        return feats @ w.T + b

    return adamerging(bench.base, taus, ada_batches(bench), forward, granularity="layer",
                      steps=ADA_STEPS, lr=ADA_LR, log=bench.log)


# ---- the table -----------------------------------------------------------------------

class Rows:
    """Finished rows, cached on disk so that an interrupted run resumes."""

    def __init__(self, path: pathlib.Path, recompute: bool) -> None:
        self.path = path
        self.rows: Dict[str, dict] = {}
        if path.exists() and not recompute:
            saved = json.loads(path.read_text())
            if saved.get("version") == ROWS_VERSION:
                self.rows = saved["rows"]

    def has(self, key: str) -> bool:
        return key in self.rows

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        self.path.write_text(json.dumps({"version": ROWS_VERSION, "rows": self.rows}, indent=1))


def build_table(bench: Bench, cache: pathlib.Path, rows: Rows) -> Dict[str, object]:
    log = bench.log
    fp32 = fp32_storage(bench)
    hyper: Dict[str, object] = rows.rows.get("_hyper", {}).get("values", {})

    def row(key: str, method: str, scheme: str, compute: Callable[[], Dict[str, float]],
            storage: Dict[str, float], **extra) -> None:
        if rows.has(key):
            return
        t0 = time.time()
        accs = compute()
        rows.put(key, dict({"method": method, "storage": scheme, "acc": accs, "avg": _avg(accs),
                            "seconds": round(time.time() - t0, 1)}, **storage, **extra))
        log("%-16s %-10s avg %.4f (%.0fs)" % (method, scheme, _avg(accs), time.time() - t0))

    row("individual", "Individual", "FP32", lambda: bench.eval_per_task(lambda t: bench.tau32[t], "test"), fp32)
    heads_bytes = 4 * sum(v.size for h in bench.heads.values() for v in h.values())
    row("pretrained", "Pretrained", "-", lambda: bench.eval_merged({}, "test"), {"bits": 0.0, "bytes": heads_bytes})

    # T-Switch at a few keep ratios (task known; validation accuracy kept to pick one for
    # Auto-Switch) and Auto-Switch come first: they need no merging hyperparameters.
    for keep in TSWITCH_KEEPS:
        key = "T-Switch|%g" % keep
        if rows.has(key):
            continue
        bundle = export_scheme(bench, cache, "T-Switch-%g" % keep, {"name": "tswitch", "keep": keep})
        taus = merge.task_vectors_from_bundle(bundle, bench.base)
        val = bench.eval_per_task(lambda t: taus[t], "val")
        row(key, "T-Switch", "keep %g" % keep, lambda: bench.eval_per_task(lambda t: taus[t], "test"),
            storage_of(bundle), keep=keep, val_avg=_avg(val))
        del taus

    if not rows.has("Auto-Switch"):
        keep = max(TSWITCH_KEEPS, key=lambda k: rows.rows["T-Switch|%g" % k]["val_avg"])
        row("Auto-Switch", "Auto-Switch", "keep %g" % keep, lambda: auto_switch(bench, cache, keep, rows),
            {}, keep=keep)

    if not rows.has("_hyper"):
        t0 = time.time()
        lam, ta_val = choose(bench, "task arithmetic lambda", TA_LAMBDAS,
                             lambda l: bench.eval_merged(merge.task_arithmetic(bench.tau32, l), "val"))
        ties_pt, ties_val = choose(bench, "TIES (keep, lambda)", TIES_GRID,
                                   lambda p: bench.eval_merged(merge.ties(bench.tau32, p[1], p[0]), "val"))
        ada = run_adamerging(bench, bench.tau32)
        hyper = {"ta_lambda": lam, "ta_val": ta_val, "ties_keep": ties_pt[0], "ties_lambda": ties_pt[1],
                 "ties_val": ties_val, "ada_tasks": ada.tasks, "ada_names": ada.names,
                 "ada_coefficients": ada.coefficients.tolist(), "ada_entropy": ada.entropy}
        rows.put("_hyper", {"values": hyper, "seconds": round(time.time() - t0, 1)})

    ada = AdaMergingResult(hyper["ada_tasks"], hyper["ada_names"], np.asarray(hyper["ada_coefficients"]),
                           hyper["ada_entropy"])
    for scheme in sorted(SCHEMES, key=lambda s: s == "FQ-INT4"):  # the known collapse last
        fields = SCHEMES[scheme]
        keys = {m: "%s|%s" % (m, scheme) for m in METHODS}
        if all(rows.has(k) for k in keys.values()):
            continue
        if fields is None:
            taus, storage = bench.tau32, fp32
        else:
            bundle = export_scheme(bench, cache, scheme, fields)
            storage = storage_of(bundle)
            t0 = time.time()
            taus = merge.task_vectors_from_bundle(bundle, bench.base)
            log("decoded %s in %.0fs" % (scheme, time.time() - t0))
        row(keys["Task arithmetic"], "Task arithmetic", scheme,
            lambda: bench.eval_merged(merge.task_arithmetic(taus, hyper["ta_lambda"]), "test"), storage)
        row(keys["TIES"], "TIES", scheme,
            lambda: bench.eval_merged(merge.ties(taus, hyper["ties_lambda"], hyper["ties_keep"]), "test"), storage)

        def emr_eval():
            res = merge.emr(taus)
            return bench.eval_per_task(res.task_delta, "test")
        row(keys["EMR"], "EMR", scheme, emr_eval, storage)
        row(keys["AdaMerging"], "AdaMerging", scheme,
            lambda: bench.eval_merged(ada.delta(taus), "test"), storage)
        del taus

    return hyper


def auto_switch(bench: Bench, cache: pathlib.Path, keep: float, rows: Rows) -> Dict[str, float]:
    """Auto-Switch end to end: router = the T-Switch bundle's average model; query sets of
    100 training exemplars per task stored (fp16) in a re-exported bundle; k chosen on
    validation; per test batch, one mix rebuilt by the CPU rebuilder and served."""
    log = bench.log
    first = export_scheme(bench, cache, "T-Switch-%g" % keep, {"name": "tswitch", "keep": keep})
    rebuilder = CpuRebuilder(first, bench.base)
    out = rebuilder.allocate("float32")
    rebuilder.rebuild({t: 1.0 / len(bench.tasks) for t in bench.tasks}, out)
    bench.load(out)  # the router network: the average of the decoded task vectors
    queries = {t: M.features(bench.model, bench.exemplars[t]) for t in bench.tasks}
    router_feats = {w: {t: M.features(bench.model, xs[t]) for t in bench.tasks}
                    for w, xs in (("val", bench.val), ("test", bench.test))}
    bundle = export_scheme(bench, cache, "Auto-Switch-%g" % keep, {"name": "tswitch", "keep": keep},
                           query_sets=queries, router={"network": "average", "features": "encoder mean pool"})
    stored = bundle.query_sets()
    rebuilder = CpuRebuilder(bundle, bench.base)
    state = {"mix": None}

    def evaluate(k: int, which: str) -> Tuple[Dict[str, float], float]:
        router = AutoSwitch(stored, k=k)
        xs, ys = bench.split(which)
        accs, own = {}, []
        for t in bench.tasks:
            pred = np.zeros(len(xs[t]), dtype=np.int64)
            for idx, (ids, mask) in xs[t].batches(64):  # batches of one task, as the T-Switch code serves
                mix = router.weights(router_feats[which][t][idx])
                own.append(mix[t])
                mix = {n: w for n, w in mix.items() if w > 0}
                if mix != state["mix"]:
                    rebuilder.rebuild(mix, out)
                    bench.load(out)
                    state["mix"] = mix
                pred[idx] = M.predict_batch(bench.model, ids, mask, bench.heads[t])
            accs[t] = float((pred == ys[t]).mean())
        return accs, float(np.mean(own))

    val = {}
    for k in AUTOSWITCH_KS:
        accs, share = evaluate(k, "val")
        val[k] = _avg(accs)
        log("  val Auto-Switch k=%d: %.4f (own-task weight %.3f)" % (k, val[k], share))
    k = max(AUTOSWITCH_KS, key=lambda kk: val[kk])
    accs, share = evaluate(k, "test")
    st = storage_of(bundle)
    rows.rows.setdefault("_autoswitch", {}).update(
        {"k": k, "val": {str(kk): v for kk, v in val.items()}, "own_task_weight_test": share,
         "bits": st["bits"], "bytes": st["bytes"], "query_bytes": int(sum(q.nbytes for q in stored.values()))})
    return accs


# ---- reports -------------------------------------------------------------------------

def ordered_rows(rows: Rows) -> List[dict]:
    """The table's rows in the issue's order; rows not computed yet are left out."""
    keys = ["individual", "pretrained"] + ["%s|%s" % (m, s) for m in METHODS for s in SCHEMES]
    keys += ["T-Switch|%g" % k for k in TSWITCH_KEEPS] + ["Auto-Switch"]
    out = [dict(rows.rows[k]) for k in keys if rows.has(k)]
    for r in out:
        if r["method"] == "Auto-Switch":
            r.update({k: rows.rows["_autoswitch"][k] for k in ("bits", "bytes")})
    return out


def write_reports(rows: Rows, tasks: Sequence[str], hyper: dict, out: pathlib.Path, meta: dict) -> None:
    table = ordered_rows(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text8.json").write_text(json.dumps(
        {"tasks": list(tasks), "rows": table, "hyperparameters": hyper,
         "auto_switch": rows.rows.get("_autoswitch"), "meta": meta}, indent=1))
    head = "| method | storage | " + " | ".join(tasks) + " | avg | bits/weight | bytes (8 tasks) |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for r in table:
        cells = ["%.1f" % (100 * r["acc"][t]) for t in tasks]
        lines.append("| %s | %s | %s | **%.1f** | %.3g | %s |" % (
            r["method"], r["storage"], " | ".join(cells), 100 * r["avg"], r["bits"], _mb(r["bytes"])))
    (out / "text8.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "text8.png")


def _mb(n: float) -> str:
    return "%.1f MB" % (n / 1e6) if n >= 1e6 else "%.1f kB" % (n / 1e3)


def plot(table: Sequence[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    # One line per method through the task-vector schemes; FQ (quantized weights, not task
    # vectors) as a hollow marker of the same colour so it does not fold the line back.
    for m, marker in zip(METHODS, "osD^"):
        pts = sorted((r["bits"], 100 * r["avg"]) for r in table if r["method"] == m and r["storage"] != "FQ-INT4")
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=m)
        fq = [r for r in table if r["method"] == m and r["storage"] == "FQ-INT4"]
        ax.plot([r["bits"] for r in fq], [100 * r["avg"] for r in fq], marker=marker, ls="none",
                mfc="none", color=line.get_color())
    ax.plot([], [], "o", mfc="none", color="grey", label="same method on FQ-INT4")
    ts = [r for r in table if r["method"] == "T-Switch"]
    ax.plot([r["bits"] for r in ts], [100 * r["avg"] for r in ts], "k*", ms=10, label="T-Switch (task known)")
    for r in (r for r in table if r["method"] == "Auto-Switch"):
        ax.plot([r["bits"]], [100 * r["avg"]], "rP", ms=10, label="Auto-Switch (task not told)")
    for r in table:
        if r["method"] in ("Individual", "Pretrained"):
            style = "--" if r["method"] == "Individual" else ":"
            ax.axhline(100 * r["avg"], color="g" if r["method"] == "Individual" else "k", ls=style, lw=1,
                       label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per task-vector weight (on disk)")
    ax.set_ylabel("average test accuracy over 8 tasks (%)")
    ax.set_title("tvswitch text8: MiniLM-L6, 8 text tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=pathlib.Path, default=F.DEFAULT_CACHE,
                   help="fine-tuned checkpoints, bundles and finished rows (default %(default)s)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/results"),
                   help="where text8.{json,md,png} go (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--recompute", action="store_true", help="ignore cached rows (not the checkpoints)")
    p.add_argument("--report-only", action="store_true",
                   help="write the reports from the rows finished so far, computing nothing")
    p.add_argument("--eval-cap", type=int, help="evaluate on at most N rows per split (smoke runs)")
    p.add_argument("--tasks", nargs="+", choices=D.TASKS, default=list(D.TASKS),
                   help="a subset of the tasks (smoke runs; the table is for all eight)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache.expanduser()
    log = lambda m: print(m, flush=True)
    t0 = time.time()
    smoke = args.eval_cap is not None or list(args.tasks) != list(D.TASKS)
    rows = Rows(cache / ("rows-smoke.json" if smoke else "rows.json"), (args.recompute or smoke) and not args.report_only)
    if args.report_only:
        hyper = rows.rows.get("_hyper", {}).get("values", {})
    else:
        hyper = build_table(Bench(cache, args.tasks, args.eval_cap, log), cache, rows)
    out = pathlib.Path(tempfile.mkdtemp(prefix="text8-smoke-")) if smoke else args.out
    meta = {"seconds": round(time.time() - t0, 1), "threads": args.threads, "eval_cap": args.eval_cap,
            "row_seconds": sum(r.get("seconds", 0) for r in rows.rows.values() if isinstance(r, dict))}
    write_reports(rows, args.tasks, hyper, out, meta)
    log("wrote %s in %.0fs" % (out, time.time() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
