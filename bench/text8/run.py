"""The 8-task text benchmark: accuracy against bits per weight, for every merging method.

    python -m bench.text8.run [--cache ~/.cache/tvswitch/text8] [--out docs/results] [--exemplars 100]

One command from a fresh clone: fine-tunes the eight tasks once (cached in --cache),
exports each storage scheme with tvswitch's real exporter, decodes every task vector back
through the CPU rebuild (what a device would add), merges, evaluates on each task's test
split and writes docs/results/text8.{json,md,png}. Hyperparameters (task arithmetic's
lambda, TIES' lambda and keep ratio, T-Switch's keep ratio for Auto-Switch, Auto-Switch's
k, AdaMerging's stopping point) are chosen on the validation split carved from the
training data, with FP32 task vectors, and then used unchanged for every storage scheme;
AdaMerging's layer-wise coefficients are likewise learned once, offline where the FP32
checkpoints are, from unlabelled validation inputs, and applied to each scheme's decoded
task vectors. The test split is only ever used for the reported figures.

Each finished row is cached in --cache under a hash of everything it depends on (its
scheme, the hyperparameters it uses, the grids that chose them, the exemplars and router,
the fine-tuning settings), so an interrupted run resumes and a changed setting recomputes
only the rows it touches; --recompute ignores every cached row (never the checkpoints).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bench.text8 import data as D
from bench.text8 import finetune as F
from bench.text8 import model as M

import torch  # noqa: E402  (after bench.text8.model, which sets the offline environment)

from tvswitch.export import merge  # noqa: E402
from tvswitch.export.adamerging import adamerging, task_entropy  # noqa: E402
from tvswitch.export.exporter import export_bundle  # noqa: E402
from tvswitch.runtime.autoswitch import (DEFAULT_EXEMPLARS, AutoSwitch, RouterSpec,  # noqa: E402
                                         build_query_sets)
from tvswitch.runtime.bundle import Bundle  # noqa: E402
from tvswitch.runtime.mix import check_mix  # noqa: E402
from tvswitch.runtime.rebuild import CpuRebuilder  # noqa: E402
from tvswitch.runtime.server import head_task  # noqa: E402
from tvswitch.runtime.stats import bundle_stats  # noqa: E402

#: Bump when a row's code or data changes in a way its recorded settings do not show
#: (3: test texts that also occur among a task's training rows left out, bench/text8/data.py).
ROWS_VERSION = 3

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
EMR_DECODED = "EMR on decoded vectors"  # EMR re-run on each scheme's decoded task vectors
METHODS = ("Task arithmetic", "TIES", EMR_DECODED, "AdaMerging")
EMR_BUNDLE = "EMR bundle"  # the exporter's emr scheme: what a device stores and rebuilds for EMR
EMR_BUNDLE_BITS = (8, 4, 3)  # width of the shared unified vector
AUTO_PER_INPUT = "Auto-Switch per input"  # each input routed on its own, one mix per group
#: Routed per batch like "Auto-Switch", but answered with the true task's head, as the
#: papers evaluate (their heads are per dataset): the weights are routed, the classes told.
AUTO_OWN_HEAD = "Auto-Switch, task's head"
#: (row key, per input, own head) of every Auto-Switch row.
AUTO_ROWS = (("Auto-Switch", False, False), (AUTO_PER_INPUT, True, False), (AUTO_OWN_HEAD, False, True))
TSWITCH_KEEPS = (0.1, 0.3, 0.5)
TA_LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7)
TIES_GRID = tuple((keep, lam) for keep in (0.01, 0.02, 0.05, 0.1, 0.2) for lam in (0.5, 0.7, 1.0, 1.5, 2.0, 3.0))
AUTOSWITCH_KS = (1, 5, 10, 20)
#: Every task served with its own task vector (task known) by one ONNX Runtime engine: one
#: weight-stripped graph whose heads are padded to the largest (44 classes), answers cut to
#: each task's classes, as `tvswitch run --task` serves them.  T-Switch at the keep chosen
#: on validation (its torch row, T-Switch|keep, is the same vectors computed in torch).
SERVED = "Served by one engine"
SERVED_SCHEMES = ("TVQ-INT4", "TVQ-INT3", "TVQ-INT2", "RTVQ(3+2)", "RTVQ@2.5b", "T-Switch")
#: Auto-Switch's features: the encoder's last hidden state, mean-pooled over the attention
#: mask, from the average model (k is chosen on validation and written into the bundle).
ROUTER = RouterSpec(output="last_hidden_state", pool="mean", mask_input="attention_mask", network="average")


@dataclass(frozen=True)
class AdaSettings:
    """AdaMerging's recipe, sized for 2 CPU cores: 2-3 s per step and ~17 s per validation
    check, so 10-14 min in all (docs/merging.md and text8-notes.md say why each value)."""

    granularity: str = "layer"
    steps: int = 200  # the paper runs 500; validation accuracy fell steadily after step 20
    lr: float = 1e-3  # the paper's Adam lr
    batch: int = 16  # unlabelled validation inputs per task and step, as the paper's batch
    max_len: int = 64  # tokens per unlabelled input (half the evaluation length: half the cost)
    validate_every: int = 20  # labelled validation check; the best check's coefficients are kept
    normalize: bool = True  # each task's entropy over log(classes): a 44-class task weighs as a binary one
    seed: int = 0


Weights = Dict[str, np.ndarray]
Log = Callable[[str], None]


class Bench:
    """Data, checkpoints and one reusable classifier whose weights are swapped in place."""

    def __init__(self, cache: pathlib.Path, tasks: Sequence[str], eval_cap: Optional[int], log: Log) -> None:
        from safetensors.numpy import load_file

        self.log = log
        self.tasks = list(tasks)
        self.eval_cap = eval_cap
        paths = F.finetune_all(cache, self.tasks, log=log)
        self.base: Weights = load_file(str(F.pretrained_path(cache)))
        self.finetuned: Dict[str, Weights] = {}
        heads: Dict[str, Weights] = {}
        for t, p in paths.items():
            self.finetuned[t], heads[t] = M.split_state(load_file(str(p)))
        self.heads: Dict[str, M.Head] = {t: M.head_tensors(h) for t, h in heads.items()}
        self.head_nbytes = int(4 * sum(v.size for h in heads.values() for v in h.values()))
        s = F.Settings()
        self.tokenizer = M.load_tokenizer()
        self.data = {t: D.load_task(t, s.max_train, s.max_val, s.max_test, s.seed) for t in self.tasks}
        cap = lambda xs: xs[:eval_cap] if eval_cap else xs
        self.val = {t: M.Tokenized(self.tokenizer, cap(d.val.texts)) for t, d in self.data.items()}
        self.test = {t: M.Tokenized(self.tokenizer, cap(d.test.texts)) for t, d in self.data.items()}
        self.val_y = {t: cap(d.val.labels) for t, d in self.data.items()}
        self.test_y = {t: cap(d.test.labels) for t, d in self.data.items()}
        self.val_texts = {t: cap(d.val.texts) for t, d in self.data.items()}
        self.model = M.Classifier(M.load_encoder())
        self.tau32 = {t: {n: (ft[n].astype(np.float32) - self.base[n].astype(np.float32)) for n in ft}
                      for t, ft in self.finetuned.items()}

    def split(self, which: str) -> Tuple[Dict[str, M.Tokenized], Dict[str, np.ndarray]]:
        """(inputs, labels) per task of the validation or the test split."""
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


def settings_hash(config: object) -> str:
    """A short stable digest of a row's settings (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- storage ------------------------------------------------------------------------

def export_scheme(bench: Bench, cache: pathlib.Path, label: str, fields: dict,
                  query_sets: Optional[Mapping[str, np.ndarray]] = None,
                  router: Optional[RouterSpec] = None) -> Bundle:
    """Export the fine-tuned checkpoints under one scheme with the real exporter.

    The file is named by a hash of what it holds (scheme fields, query sets, router
    record, the checkpoints' sizes and times), so a bundle left by an earlier run is
    reused exactly when it would be written the same; older versions of it are removed.
    """
    folder = cache / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {t: str(F.task_path(cache, t)) for t in bench.tasks}
    stamp = [(p, pathlib.Path(p).stat().st_size, pathlib.Path(p).stat().st_mtime)
             for p in [str(F.pretrained_path(cache))] + list(tasks.values())]
    queries = None if query_sets is None else {
        t: hashlib.sha256(np.ascontiguousarray(q, dtype=np.float16).tobytes()).hexdigest() for t, q in query_sets.items()}
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")
    path = folder / ("%s-%s.tvs" % (slug, settings_hash(
        {"fields": fields, "queries": queries, "router": router and router.record(), "checkpoints": stamp})))
    if path.exists():
        return Bundle.open(str(path))
    for old in folder.glob(slug + "-*.tvs"):
        old.unlink()
    t0 = time.time()
    bundle = export_bundle(str(F.pretrained_path(cache)), tasks, str(path), query_sets=query_sets,
                           router=router, **fields)
    bench.log("exported %s in %.0fs" % (label, time.time() - t0))
    return bundle


def storage_of(bundle: Bundle) -> Dict[str, float]:
    """Bits per task-vector weight and bytes on disk of a real bundle (heads included)."""
    st = bundle_stats(bundle)
    return {"bits": float(st["bits_per_task_vector_weight"]), "bytes": int(st["task_bytes_on_disk"])}


def fp32_storage(bench: Bench) -> Dict[str, float]:
    n = sum(v.size for v in bench.tau32[bench.tasks[0]].values())
    return {"bits": 32.0, "bytes": int(4 * n * len(bench.tasks) + bench.head_nbytes)}


# ---- the table -----------------------------------------------------------------------

class Rows:
    """Finished rows, cached on disk with the hash of the settings each was made with."""

    def __init__(self, path: pathlib.Path, recompute: bool) -> None:
        self.path = path
        self.rows: Dict[str, dict] = {}
        self.computed: set = set()  # keys computed by this invocation (the others came from the cache)
        if path.exists() and not recompute:
            self.rows = json.loads(path.read_text()).get("rows", {})

    def fresh(self, key: str, config: object) -> bool:
        """Whether ``key`` was computed with exactly these settings."""
        return key in self.rows and self.rows[key].get("config") == settings_hash(config)

    def put(self, key: str, config: object, row: dict) -> None:
        self.rows[key] = dict(row, config=settings_hash(config))
        self.computed.add(key)
        self.path.write_text(json.dumps({"rows": self.rows}, indent=1))


class Table:
    """The benchmark's rows: each computed unless cached under the same settings."""

    def __init__(self, bench: Bench, cache: pathlib.Path, rows: Rows, exemplars: int,
                 ada: AdaSettings = AdaSettings()) -> None:
        self.bench, self.cache, self.rows, self.exemplars, self.ada = bench, cache, rows, exemplars, ada
        self.log = bench.log
        self.common = {"version": ROWS_VERSION, "finetune": asdict(F.Settings()), "tasks": bench.tasks,
                       "eval_cap": bench.eval_cap}

    def config(self, **extra: object) -> dict:
        return dict(self.common, **extra)

    def row(self, key: str, config: dict, method: str, scheme: str, compute: Callable[[], Dict[str, float]],
            storage: Mapping[str, float], **extra: object) -> None:
        """Compute and cache one row unless it is cached under the same settings."""
        if self.rows.fresh(key, config):
            return
        t0 = time.time()
        self.put_row(key, config, method, scheme, compute(), time.time() - t0, storage, **extra)

    def put_row(self, key: str, config: dict, method: str, scheme: str, accs: Mapping[str, float],
                seconds: float, storage: Mapping[str, float], **extra: object) -> None:
        self.rows.put(key, config, dict({"method": method, "storage": scheme, "acc": dict(accs), "avg": _avg(accs),
                                         "seconds": round(seconds, 1)}, **storage, **extra))
        self.log("%-24s %-18s avg %.4f (%.0fs)" % (method, scheme, _avg(accs), seconds))

    def cached(self, key: str, config: dict, compute: Callable[[], dict]) -> dict:
        """A cached value that is not a table row (the chosen hyperparameters)."""
        if not self.rows.fresh(key, config):
            t0 = time.time()
            value = compute()
            self.rows.put(key, config, {"values": value, "seconds": round(time.time() - t0, 1)})
        return self.rows.rows[key]["values"]


def build_table(table: Table) -> Dict[str, object]:
    """Every row of the table; returns the chosen hyperparameters."""
    bench = table.bench
    fp32 = fp32_storage(bench)
    table.row("individual", table.config(), "Individual", "FP32",
              lambda: bench.eval_per_task(lambda t: bench.tau32[t], "test"), fp32)
    table.row("pretrained", table.config(), "Pretrained", "-", lambda: bench.eval_merged({}, "test"),
              {"bits": 0.0, "bytes": bench.head_nbytes})
    # T-Switch and Auto-Switch first: they need no merging hyperparameters.
    for keep in TSWITCH_KEEPS:
        tswitch_row(table, keep)
    auto_switch_row(table)
    for bits in EMR_BUNDLE_BITS:
        emr_bundle_row(table, bits)
    hyper = choose_hyperparameters(table)
    ada = hyper["adamerging"]
    # What `tvswitch merge BUNDLE --method adamerging --coefficients FILE` reads.
    merge.Coefficients(ada["tasks"], ada["names"], np.asarray(ada["coefficients"])).save(
        str(table.cache / "adamerging-coefficients.json"))
    for scheme in sorted(SCHEMES, key=lambda s: s == "FQ-INT4"):  # the known collapse last
        scheme_rows(table, scheme, hyper)
    for scheme in SERVED_SCHEMES:
        served_row(table, scheme)
    return hyper


def tswitch_row(table: Table, keep: float) -> None:
    """T-Switch at one keep ratio, task known; validation accuracy kept to pick Auto-Switch's."""
    fields = {"name": "tswitch", "keep": keep}
    config = table.config(fields=fields)
    key = "T-Switch|%g" % keep
    if table.rows.fresh(key, config):
        return
    bench = table.bench
    bundle = export_scheme(bench, table.cache, "T-Switch-%g" % keep, fields)
    taus = merge.task_vectors_from_bundle(bundle, bench.base)
    val = bench.eval_per_task(lambda t: taus[t], "val")
    table.row(key, config, "T-Switch", "keep %g" % keep, lambda: bench.eval_per_task(lambda t: taus[t], "test"),
              storage_of(bundle), keep=keep, val_avg=_avg(val))


def emr_bundle_row(table: Table, bits: int) -> None:
    """A real ``emr`` bundle (unified vector at ``bits``, per-task masks and rescalers), each
    task served by the bundle's own rebuild of it, as a device would (task known)."""
    fields = {"name": "emr", "bits": bits}
    config = table.config(fields=fields)
    key = "%s|%d" % (EMR_BUNDLE, bits)
    if table.rows.fresh(key, config):
        return
    bench = table.bench
    bundle = export_scheme(bench, table.cache, "EMR-%d" % bits, fields)
    taus = merge.task_vectors_from_bundle(bundle, bench.base)
    table.row(key, config, EMR_BUNDLE, "unified INT%d" % bits,
              lambda: bench.eval_per_task(lambda t: taus[t], "test"), storage_of(bundle), unified_bits=bits)


# ---- hyperparameters on validation --------------------------------------------------

def choose(bench: Bench, name: str, grid: Sequence, score: Callable) -> Tuple[object, Dict[str, float]]:
    """The grid point with the best validation average (first one on ties)."""
    results = {}
    for point in grid:
        results[str(point)] = _avg(score(point))
        bench.log("  val %s %s: %.4f" % (name, point, results[str(point)]))
    best = max(grid, key=lambda p: results[str(p)])
    return best, results


def choose_hyperparameters(table: Table) -> Dict[str, object]:
    """Task arithmetic's lambda, TIES' (keep, lambda) and AdaMerging's coefficients, each
    cached under its own grid or recipe so that changing one leaves the others."""
    bench = table.bench

    def ta() -> dict:
        lam, val = choose(bench, "task arithmetic lambda", TA_LAMBDAS,
                          lambda l: bench.eval_merged(merge.task_arithmetic(bench.tau32, l), "val"))
        return {"lambda": lam, "val": val}

    def ties() -> dict:
        (keep, lam), val = choose(bench, "TIES (keep, lambda)", TIES_GRID,
                                  lambda p: bench.eval_merged(merge.ties(bench.tau32, p[1], p[0]), "val"))
        return {"keep": keep, "lambda": lam, "val": val}

    ta_values = table.cached("_ta", table.config(grid=TA_LAMBDAS), ta)
    ties_values = table.cached("_ties", table.config(grid=TIES_GRID), ties)
    ada_config = table.config(ada=asdict(table.ada), init=ta_values["lambda"])
    ada_values = table.cached("_ada", ada_config, lambda: run_adamerging(bench, ta_values["lambda"], table.ada))
    return {"task_arithmetic": ta_values, "ties": ties_values, "adamerging": ada_values,
            "adamerging_settings": asdict(table.ada), "adamerging_config": settings_hash(ada_config)}


def ada_batches(bench: Bench, settings: AdaSettings) -> Dict[str, list]:
    """Unlabelled validation inputs per task, cut to ``max_len`` tokens, in random batches
    (labels never read)."""
    rng = np.random.default_rng(settings.seed)
    size = settings.batch
    out = {}
    for t in bench.tasks:
        xs = M.Tokenized(bench.tokenizer, bench.val_texts[t], settings.max_len)
        order = rng.permutation(len(xs))
        size_t = min(size, len(xs))
        out[t] = [xs.batch(order[s:s + size_t]) for s in range(0, len(order) - size_t + 1, size_t)]
    return out


def run_adamerging(bench: Bench, init: float, settings: AdaSettings) -> dict:
    """Layer-wise AdaMerging from the validated task-arithmetic lambda, on unlabelled
    validation inputs; the labelled validation split only picks the step to keep."""
    bench.model.eval()

    def forward(params, task, batch):
        ids, mask = batch
        return bench.model.logits(ids, mask, bench.heads[task], params)

    def validate(coefficients: merge.Coefficients) -> float:
        return _avg(bench.eval_merged(coefficients.delta(bench.tau32), "val"))

    batches = ada_batches(bench, settings)
    entropies = entropy_by_lambda(bench, batches, TA_LAMBDAS, settings.normalize)
    res = adamerging(bench.base, bench.tau32, batches, forward,
                     granularity=settings.granularity, init=init, steps=settings.steps, lr=settings.lr,
                     normalize=settings.normalize, validate=validate, validate_every=settings.validate_every,
                     log=bench.log)
    return {"tasks": res.tasks, "names": res.names, "coefficients": res.values.tolist(), "entropy": res.entropy,
            "validation": res.validation, "best_step": res.best_step, "entropy_by_ta_lambda": entropies}


@torch.no_grad()
def entropy_by_lambda(bench: Bench, batches: Mapping[str, list], lambdas: Sequence[float], normalize: bool,
                      per_task: int = 4) -> Dict[str, float]:
    """AdaMerging's objective (summed over tasks, on the first ``per_task`` unlabelled batches
    of each) at each task-arithmetic lambda: where it keeps falling past the lambda that
    validation chose, minimising it leads away from the better model (text8-notes.md)."""
    bench.model.eval()
    out = {}
    for lam in lambdas:
        bench.load(merge.apply_delta(bench.base, merge.task_arithmetic(bench.tau32, lam)))
        out[str(lam)] = sum(float(task_entropy(bench.model.logits(ids, mask, bench.heads[t]), normalize))
                            for t in bench.tasks for ids, mask in batches[t][:per_task]) / per_task
        bench.log("  AdaMerging objective at task arithmetic lambda %g: %.4f" % (lam, out[str(lam)]))
    return out


def scheme_rows(table: Table, scheme: str, hyper: Mapping[str, dict]) -> None:
    """Task arithmetic, TIES, EMR and AdaMerging on one scheme's decoded task vectors."""
    bench = table.bench
    fields = SCHEMES[scheme]
    ta, ties, ada = hyper["task_arithmetic"], hyper["ties"], hyper["adamerging"]
    configs = {
        "Task arithmetic": table.config(fields=fields, lam=ta["lambda"]),
        "TIES": table.config(fields=fields, keep=ties["keep"], lam=ties["lambda"]),
        EMR_DECODED: table.config(fields=fields),
        "AdaMerging": table.config(fields=fields, ada=hyper["adamerging_config"]),
    }
    if all(table.rows.fresh("%s|%s" % (m, scheme), c) for m, c in configs.items()):
        return
    if fields is None:
        taus, storage = bench.tau32, fp32_storage(bench)
    else:
        bundle = export_scheme(bench, table.cache, scheme, fields)
        storage = storage_of(bundle)
        t0 = time.time()
        taus = merge.task_vectors_from_bundle(bundle, bench.base)
        table.log("decoded %s in %.0fs" % (scheme, time.time() - t0))
    coefficients = merge.Coefficients(ada["tasks"], ada["names"], np.asarray(ada["coefficients"]))
    compute = {
        "Task arithmetic": lambda: bench.eval_merged(merge.task_arithmetic(taus, ta["lambda"]), "test"),
        "TIES": lambda: bench.eval_merged(merge.ties(taus, ties["lambda"], ties["keep"]), "test"),
        EMR_DECODED: lambda: bench.eval_per_task(merge.emr(taus).task_delta, "test"),
        "AdaMerging": lambda: bench.eval_merged(coefficients.delta(taus), "test"),
    }
    for method in METHODS:
        table.row("%s|%s" % (method, scheme), configs[method], method, scheme, compute[method], storage)


# ---- served by one engine ------------------------------------------------------------

def chosen_keep(table: Table) -> float:
    """T-Switch's keep ratio with the best validation average (Auto-Switch's too)."""
    return max(TSWITCH_KEEPS, key=lambda k: table.rows.rows["T-Switch|%g" % k]["val_avg"])


def served_row(table: Table, scheme: str) -> None:
    """Each task switched to with its own task vector on one ONNX Runtime engine, one graph for
    all eight heads, and its test split answered through it; with the bits per weight held
    resident and on flash, raw and with --entropy lzma (whose decoded payloads are checked
    equal to the raw ones: the same bits are served)."""
    fields = {"name": "tswitch", "keep": chosen_keep(table)} if scheme == "T-Switch" else SCHEMES[scheme]
    config = table.config(fields=fields, served=1)
    key = "%s|%s" % (SERVED, scheme)
    if table.rows.fresh(key, config):
        return
    from tvswitch.runtime.server import serve_bundle

    bench = table.bench
    label = "T-Switch-%g" % fields["keep"] if scheme == "T-Switch" else scheme
    bundle = export_scheme(bench, table.cache, label, fields)
    packed = export_scheme(bench, table.cache, label + "-lzma", dict(fields, entropy="lzma"))
    differ = [k for k in bundle.manifest["payloads"] if not np.array_equal(bundle.payload(k), packed.payload(k))]
    if differ:
        raise SystemExit("%s: payload %s decodes differently from the lzma bundle" % (scheme, differ[0]))
    graph = served_graph(table, bundle)
    server = serve_bundle(bundle, "onnxruntime", model=graph, base=bench.base,
                          threads=torch.get_num_threads())

    def compute() -> Dict[str, float]:
        xs, ys = bench.split("test")
        accs = {}
        for t in bench.tasks:
            server.switch({t: 1.0})
            pred = np.zeros(len(xs[t]), dtype=np.int64)
            for idx, (ids, mask) in xs[t].batches(64):
                logits = server.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"]
                pred[idx] = logits.argmax(-1)
            accs[t] = float((pred == ys[t]).mean())
        return accs

    weights = bundle.num_shared_params * len(bundle.tasks)
    storage = dict(storage_of(bundle), resident_bits=8.0 * bundle.packed_nbytes / weights,
                   flash_lzma_bits=storage_of(packed)["bits"], flash_lzma_bytes=storage_of(packed)["bytes"],
                   graph_bytes=pathlib.Path(graph).stat().st_size)
    shown = "%s (keep %g)" % (scheme, fields["keep"]) if scheme == "T-Switch" else scheme
    table.row(key, config, SERVED, shown, compute, storage)


def served_graph(table: Table, bundle: Bundle) -> str:
    """The one graph of all eight classifiers (``export_onnx_for_bundle``), made once: every
    bundle of these checkpoints has the same heads, so the same cuts."""
    from tvswitch.export.onnx_export import export_onnx_for_bundle

    shapes = {t: {n: list(a.shape) for n, a in bundle.task_specific(t).items()} for t in bundle.tasks}
    path = table.cache / "bundles" / ("served-%s.onnx" % settings_hash({"heads": shapes, "len": M.MAX_LEN}))
    if not path.exists():
        bench = table.bench
        _, (ids, mask) = next(bench.val[bench.tasks[0]].batches(8))
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
        t0 = time.time()
        export_onnx_for_bundle(M.ServedClassifier(M.load_encoder(), 2), bundle, [ids, mask], str(path),
                               input_names=["input_ids", "attention_mask"], output_names=["logits"],
                               dynamic_axes=dynamic)
        bench.log("exported the one graph (%.2f MB, no weights) in %.0fs" % (path.stat().st_size / 1e6,
                                                                            time.time() - t0))
    return str(path)


# ---- Auto-Switch ---------------------------------------------------------------------

@torch.no_grad()
def router_features(bench: Bench, spec: RouterSpec, data: M.Tokenized) -> np.ndarray:
    """Features of every input (original order) exactly as the bundle's router record says:
    ``RouterSpec.features`` on the encoder's outputs, as ``tvswitch run --auto`` computes them."""
    bench.model.eval()
    out = np.zeros((len(data), bench.model.encoder.config.hidden_size), dtype=np.float32)
    for idx, (ids, mask) in data.batches(64):
        outputs = {spec.output: bench.model.hidden(ids, mask).numpy()}
        out[idx] = spec.features(outputs, {"input_ids": ids.numpy(), spec.mask_input: mask.numpy()})
    return out


def auto_switch_row(table: Table) -> None:
    """Auto-Switch end to end on the best-validation T-Switch bundle (see ``auto_switch``):
    one row routing per batch (what ``Server.auto`` serves), one routing per input."""
    keep = chosen_keep(table)
    config = table.config(keep=keep, ks=AUTOSWITCH_KS, exemplars=table.exemplars, router=ROUTER.record(),
                          rows=AUTO_ROWS)
    if all(table.rows.fresh(key, config) for key, _, _ in AUTO_ROWS):
        return
    t0 = time.time()
    accs, bundle, details = auto_switch(table, keep)
    table.rows.put("_autoswitch", config, {"values": details})
    seconds = (time.time() - t0) / len(AUTO_ROWS)
    for key, _, _ in AUTO_ROWS:
        table.put_row(key, config, key, "keep %g" % keep, accs[key], seconds, storage_of(bundle),
                      keep=keep, k=details["k"])


def auto_switch(table: Table, keep: float) -> Tuple[Dict[str, Dict[str, float]], Bundle, dict]:
    """Router network = the T-Switch bundle's average model; query sets of ``exemplars``
    training inputs per task (``build_query_sets``); k chosen on validation (per batch) and
    stored in the re-exported bundle's router record with the fp16 query sets; each test
    batch (one task's inputs, as the T-Switch code serves) is routed, its mix rebuilt by the
    CPU rebuilder and served with the heaviest task's head, as the runtime serves; then
    again with each input routed on its own (``AutoSwitch.split``), same k; then per batch
    with the true task's head (the papers' protocol).
    Returns the test accuracies of every mode (``AUTO_ROWS``), the bundle and what the router did."""
    bench, log = table.bench, table.log
    first = export_scheme(bench, table.cache, "T-Switch-%g" % keep, {"name": "tswitch", "keep": keep})
    rebuilder = CpuRebuilder(first, bench.base)
    out = rebuilder.allocate("float32")
    rebuilder.rebuild(ROUTER.network_mix(bench.tasks), out)
    bench.load(out)
    queries = build_query_sets(
        lambda texts: router_features(bench, ROUTER, M.Tokenized(bench.tokenizer, texts)),
        {t: d.train.texts for t, d in bench.data.items()}, n=table.exemplars, seed=F.Settings().seed)
    feats = {w: {t: router_features(bench, ROUTER, xs[t]) for t in bench.tasks}
             for w, xs in (("val", bench.val), ("test", bench.test))}
    stored = AutoSwitch(queries).query_sets()  # fp16, as the bundle keeps them
    serve = Served(bench, first)
    val = {}
    for k in AUTOSWITCH_KS:
        accs, info = serve.evaluate(AutoSwitch(stored, k=k), feats["val"], "val")
        val[k] = _avg(accs)
        log("  val Auto-Switch k=%d: %.4f (own-task weight %.3f, right head %.3f)"
            % (k, val[k], info["own_task_weight"], info["right_head"]))
    k = max(AUTOSWITCH_KS, key=lambda kk: val[kk])
    bundle = export_scheme(bench, table.cache, "Auto-Switch-%g" % keep, {"name": "tswitch", "keep": keep},
                           query_sets=queries, router=RouterSpec(**dict(ROUTER.record(), k=k)))
    read = RouterSpec.from_record(bundle.router(), bundle.path)  # what a device reads back
    router, serve = AutoSwitch(bundle.query_sets(), k=read.k), Served(bench, bundle)
    accs, details = {}, {"k": k, "val": {str(kk): v for kk, v in val.items()}, "query_bytes": bundle.query_nbytes,
                         "router": bundle.router()}
    for key, per_input, own_head in AUTO_ROWS:
        accs[key], info = serve.evaluate(router, feats["test"], "test", per_input=per_input, own_head=own_head)
        details[key] = {n + "_test": v for n, v in info.items()}
    return accs, bundle, details


class Served:
    """A bundle served as the runtime does: one mix per batch (or per group of inputs
    that share their own mix), rebuilt when it changes, answered with the head of the
    mix's heaviest task (``runtime.server.head_task``)."""

    def __init__(self, bench: Bench, bundle: Bundle) -> None:
        self.bench, self.bundle = bench, bundle
        self.rebuilder = CpuRebuilder(bundle, bench.base)
        self.out = self.rebuilder.allocate("float32")
        self.mix: Optional[Dict[str, float]] = None

    def evaluate(self, router: AutoSwitch, feats: Mapping[str, np.ndarray], which: str,
                 per_input: bool = False, own_head: bool = False) -> Tuple[Dict[str, float], Dict[str, float]]:
        """Accuracy per task (inputs answered with another task's head count as wrong),
        plus the mean weight the router gave each input's true task and how often that
        task's head served it. ``per_input``: each batch is split by its inputs' own
        mixes (``AutoSwitch.split``, what ``serve_groups`` serves), one mix per group.
        ``own_head``: the routed mix answers through the true task's head (the papers'
        protocol: the classes asked for are told, the weights are not)."""
        bench = self.bench
        xs, ys = bench.split(which)
        accs, own, right = {}, [], []
        for t in bench.tasks:
            correct = np.zeros(len(xs[t]), dtype=bool)
            for idx, (ids, mask) in xs[t].batches(64):  # batches of one task, as the T-Switch code serves
                f = feats[t][idx]
                groups = router.split(f) if per_input else [(np.arange(len(idx)), router.weights(f))]
                for rows, weights in groups:
                    mix = check_mix({n: w for n, w in weights.items() if w > 0}, self.bundle.tasks, self.bundle.path)
                    head = t if own_head else head_task(mix)
                    own += [mix.get(t, 0.0)] * len(rows)
                    right += [head == t] * len(rows)
                    if head == t:  # another task's head answers in other classes: all wrong
                        self._switch(mix)
                        sel = torch.as_tensor(rows)
                        pred = M.predict_batch(bench.model, ids[sel], mask[sel], bench.heads[t])
                        correct[idx[rows]] = pred == ys[t][idx[rows]]
            accs[t] = float(correct.mean())
        return accs, {"own_task_weight": float(np.mean(own)), "right_head": float(np.mean(right))}

    def _switch(self, mix: Dict[str, float]) -> None:
        if mix != self.mix:
            self.rebuilder.rebuild(mix, self.out)
            self.bench.load(self.out)
            self.mix = mix


# ---- reports -------------------------------------------------------------------------

def ordered_rows(rows: Rows) -> List[dict]:
    """The table's rows in the issue's order; rows not computed yet are left out."""
    keys = ["individual", "pretrained"]
    for m in METHODS:
        keys += ["%s|%s" % (m, s) for s in SCHEMES]
        if m == EMR_DECODED:
            keys += ["%s|%d" % (EMR_BUNDLE, b) for b in EMR_BUNDLE_BITS]
    keys += ["T-Switch|%g" % k for k in TSWITCH_KEEPS] + [key for key, _, _ in AUTO_ROWS]
    return [dict(rows.rows[k]) for k in keys if k in rows.rows]


def cached_hyperparameters(rows: Rows) -> Dict[str, object]:
    """The hyperparameters chosen so far (what build_table returns), for --report-only."""
    return {name: rows.rows[key]["values"] for name, key in
            (("task_arithmetic", "_ta"), ("ties", "_ties"), ("adamerging", "_ada")) if key in rows.rows}


def write_reports(rows: Rows, tasks: Sequence[str], hyper: dict, out: pathlib.Path, meta: dict) -> None:
    table = ordered_rows(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text8.json").write_text(json.dumps(
        {"tasks": list(tasks), "rows": table, "hyperparameters": hyper,
         "auto_switch": rows.rows.get("_autoswitch", {}).get("values"), "meta": meta}, indent=1))
    head = "| method | storage | " + " | ".join(tasks) + " | avg | bits/weight | bytes (8 tasks) |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for r in table:
        cells = ["%.1f" % (100 * r["acc"][t]) for t in tasks]
        lines.append("| %s | %s | %s | **%.1f** | %.3g | %s |" % (
            r["method"], r["storage"], " | ".join(cells), 100 * r["avg"], r["bits"], _mb(r["bytes"])))
    lines += served_table(rows, tasks)
    lines += ["", run_line(meta)]
    (out / "text8.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "text8.png")


def served_table(rows: Rows, tasks: Sequence[str]) -> List[str]:
    """The rows a switching user reads first: each task served with its own task vector by one
    engine, bits per weight resident and on flash; T-Switch beside its torch row."""
    served = [rows.rows["%s|%s" % (SERVED, s)] for s in SERVED_SCHEMES if "%s|%s" % (SERVED, s) in rows.rows]
    if not served:
        return []
    lines = ["", "Each task served with its own task vector (task known) by one ONNX Runtime engine: one graph for "
             "all eight heads (padded to 44 classes, no weights inside), each answer cut to its task's classes, as "
             "`tvswitch run --task` serves. Bits per task-vector weight, heads and header included: resident in "
             "memory, on flash, on flash with `--entropy lzma` (decoded at load to the same payloads).", "",
             "| storage | " + " | ".join(tasks) + " | avg | resident | flash | flash, lzma | in torch |",
             "|" + "---|" * (len(tasks) + 6)]
    for r in served:
        torch_avg = ""
        if r["storage"].startswith("T-Switch"):
            keep = r["storage"].split("keep ")[1].rstrip(")")
            twin = rows.rows.get("T-Switch|%s" % keep)
            torch_avg = "%.1f" % (100 * twin["avg"]) if twin else ""
        lines.append("| %s | %s | **%.1f** | %.3f | %.3f | %.3f | %s |" % (
            r["storage"], " | ".join("%.1f" % (100 * r["acc"][t]) for t in tasks), 100 * r["avg"],
            r["resident_bits"], r["bits"], r["flash_lzma_bits"], torch_avg))
    return lines


def run_line(meta: Mapping[str, object]) -> str:
    """The run's measured cost, under the table: wall clock of the invocation that computed
    it, and how much of the table it computed rather than read from the cache."""
    return ("Wall clock of the `python -m bench.text8.run` that computed this table: %.1f min (%d torch threads; setup, "
            "i.e. data, tokenizer and fine-tuning unless cached, %.1f min; %d rows and choices computed, %d read "
            "from the cache)." % (float(meta["seconds"]) / 60, meta["threads"], float(meta["setup_seconds"]) / 60,
                                  meta["rows_computed"], meta["rows_cached"]))


def _mb(n: float) -> str:
    return "%.1f MB" % (n / 1e6) if n >= 1e6 else "%.1f kB" % (n / 1e3)


def plot(table: Sequence[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    # One line per method through the task-vector schemes; FQ (quantized weights, not task
    # vectors) as a hollow marker of the same colour so it does not fold the line back.
    for m, marker in zip(METHODS + (EMR_BUNDLE,), "osDv^"):
        pts = sorted((r["bits"], 100 * r["avg"]) for r in table if r["method"] == m and r["storage"] != "FQ-INT4")
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=m)
        fq = [r for r in table if r["method"] == m and r["storage"] == "FQ-INT4"]
        ax.plot([r["bits"] for r in fq], [100 * r["avg"] for r in fq], marker=marker, ls="none",
                mfc="none", color=line.get_color())
    ax.plot([], [], "o", mfc="none", color="grey", label="same method on FQ-INT4")
    ts = [r for r in table if r["method"] == "T-Switch"]
    ax.plot([r["bits"] for r in ts], [100 * r["avg"] for r in ts], "k*", ms=10, label="T-Switch (task known)")
    for r in (r for r in table if r["method"] == "Auto-Switch"):
        ax.plot([r["bits"]], [100 * r["avg"]], "rP", ms=10, label="Auto-Switch per batch (task not told)")
    for r in (r for r in table if r["method"] == AUTO_PER_INPUT):
        ax.plot([r["bits"]], [100 * r["avg"]], "mX", ms=10, label="Auto-Switch per input (task not told)")
    for r in (r for r in table if r["method"] == AUTO_OWN_HEAD):
        ax.plot([r["bits"]], [100 * r["avg"]], "P", mfc="none", color="r", ms=10,
                label="Auto-Switch per batch, task's head (papers' protocol)")
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
    p.add_argument("--exemplars", type=int, default=DEFAULT_EXEMPLARS,
                   help="Auto-Switch: training inputs per task in the query sets (default %(default)s)")
    p.add_argument("--ada-steps", type=int, default=AdaSettings.steps,
                   help="AdaMerging's Adam steps (default %(default)s; fewer for smoke runs)")
    p.add_argument("--recompute", action="store_true", help="ignore cached rows (not the checkpoints)")
    p.add_argument("--report-only", action="store_true",
                   help="write the reports from the rows finished so far, computing nothing")
    p.add_argument("--eval-cap", type=int, help="evaluate on at most N rows per split (smoke runs)")
    p.add_argument("--tasks", nargs="+", choices=D.TASKS, default=list(D.TASKS),
                   help="a subset of the tasks (smoke runs; the table is for all eight)")
    args = p.parse_args(argv)
    for flag, value in (("--exemplars", args.exemplars), ("--eval-cap", args.eval_cap), ("--threads", args.threads),
                        ("--ada-steps", args.ada_steps)):
        if value is not None and value < 1:
            p.error("%s must be >= 1, got %d" % (flag, value))
    torch.set_num_threads(args.threads)
    cache = args.cache.expanduser()
    log = lambda m: print(m, flush=True)
    t0 = time.time()
    smoke = args.eval_cap is not None or list(args.tasks) != list(D.TASKS)
    rows = Rows(cache / ("rows-smoke.json" if smoke else "rows.json"), args.recompute and not args.report_only)
    out = pathlib.Path(tempfile.mkdtemp(prefix="text8-smoke-")) if smoke else args.out
    setup = 0.0
    if args.report_only:
        hyper = cached_hyperparameters(rows)
    else:
        ada = AdaSettings(steps=args.ada_steps, validate_every=min(AdaSettings.validate_every, args.ada_steps))
        bench = Bench(cache, args.tasks, args.eval_cap, log)
        setup = time.time() - t0
        hyper = build_table(Table(bench, cache, rows, args.exemplars, ada))
    meta = {"seconds": round(time.time() - t0, 1), "setup_seconds": round(setup, 1), "threads": args.threads,
            "eval_cap": args.eval_cap, "exemplars": args.exemplars, "rows_computed": len(rows.computed),
            "rows_cached": len(rows.rows) - len(rows.computed),
            "row_seconds": sum(r.get("seconds", 0) for r in rows.rows.values() if isinstance(r, dict))}
    previous = out / "text8.json"
    if args.report_only and previous.exists():  # keep the timing of the run that computed the rows
        meta = json.loads(previous.read_text()).get("meta") or meta
    write_reports(rows, args.tasks, hyper, out, meta)
    log("wrote %s in %.0fs; %s" % (out, time.time() - t0, run_line(meta)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
