"""Does the bit allocator's sensitivity pay off?  Uniform widths vs allocated widths at the
same budget, judged on what the allocator never sees: the fine-tuned models' outputs.

    python -m bench.allocation [--cache ~/.cache/tvswitch/text8] [--out FILE]

Needs bench/text8's cached fine-tunes (real MiniLM checkpoints) and its data packages.
For every task: rebuild its encoder from each bundle, run the task's validation texts,
and compare with the fine-tuned FP32 model: relative error of the pooled features
||f - f_ft|| / ||f_ft||, and validation accuracy through the task's own head.
Budgets run twice, with widths priced as streams and as the terms ``--layout auto``
writes (sparse where that halves a term), so the table shows what spending the sparse
terms' saving buys at the same budget.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from bench.text8 import data as D
from bench.text8 import model as M
from tvswitch.export.exporter import COHERENT_GAIN, export_bundle
from tvswitch.runtime.checkpoint import read_safetensors
from tvswitch.runtime.rebuild import CpuRebuilder
from tvswitch.runtime.stats import bundle_stats


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="~/.cache/tvswitch/text8")
    ap.add_argument("--texts", type=int, default=200, help="validation texts per task")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cache = pathlib.Path(os.path.expanduser(args.cache))
    tasks = [t for t in D.TASKS if (cache / ("%s.safetensors" % t)).exists()]
    if len(tasks) < 2:
        print("bench.allocation: needs at least two fine-tuned tasks in %s (run python -m bench.text8.finetune)"
              % cache, file=sys.stderr)
        return 2
    base = read_safetensors(str(cache / "pretrained.safetensors"))
    fts = {t: read_safetensors(str(cache / ("%s.safetensors" % t))) for t in tasks}
    T = len(tasks)
    configs = [
        ("TVQ-INT2 uniform, streams", dict(name="tvq", bits=2, layout="streams")),
        ("TVQ budget 2.0, streams", dict(name="tvq", budget_bits=2.0, layout="streams")),
        ("TVQ budget 2.0, auto", dict(name="tvq", budget_bits=2.0, layout="auto")),
        ("TVQ-INT2 uniform, auto", dict(name="tvq", bits=2, layout="auto")),
        # a budget of a row above is that row's codes bits: the allocation at equal bits
        ("TVQ budget = the row above's bits, auto", dict(name="tvq", budget_bits="TVQ-INT2 uniform, auto",
                                                         layout="auto")),
        ("TVQ budget 1.5, auto", dict(name="tvq", budget_bits=1.5, layout="auto")),
        ("RTVQ(3+2) uniform, streams", dict(name="rtvq", base_bits=3, offset_bits=2, layout="streams")),
        ("RTVQ budget %.3f, streams" % (2 + 3 / T), dict(name="rtvq", budget_bits=2 + 3 / T, layout="streams")),
        ("RTVQ budget %.3f, auto" % (2 + 3 / T), dict(name="rtvq", budget_bits=2 + 3 / T, layout="auto")),
        ("TVQ-INT3 uniform, streams", dict(name="tvq", bits=3, layout="streams")),
        ("TVQ budget 3.0, streams", dict(name="tvq", budget_bits=3.0, layout="streams")),
        ("TVQ budget 3.0, auto", dict(name="tvq", budget_bits=3.0, layout="auto")),
    ]
    tok = M.load_tokenizer()
    net = M.Classifier(M.load_encoder())
    texts = {t: D.load_task(t).val for t in tasks}
    tokenized = {t: M.Tokenized(tok, texts[t].texts[: args.texts]) for t in tasks}
    labels = {t: texts[t].labels[: args.texts] for t in tasks}
    reference: Dict[str, np.ndarray] = {}
    acc_ft = {}
    for t in tasks:
        enc, head = M.split_state(fts[t])
        M.load_weights(net.encoder, enc)
        reference[t] = M.features(net, tokenized[t])
        acc_ft[t] = float(np.mean(M.predict(net, tokenized[t], head) == labels[t]))
    rows = ["| configuration | codes bits per weight (budget's count) | bits per weight (file) | feature error "
            "| val accuracy | export |", "|---|---|---|---|---|---|",
            "| fine-tuned FP32 | 32 | 32 | 0 | %.4f | |" % np.mean(list(acc_ft.values()))]
    with tempfile.TemporaryDirectory() as tmp:
        codes_bits: Dict[str, float] = {}
        for label, kw in configs:
            if isinstance(kw.get("budget_bits"), str):
                kw = dict(kw, budget_bits=codes_bits[kw["budget_bits"]])
            start = time.perf_counter()
            bundle = export_bundle(base, fts, os.path.join(tmp, "b.tvs"), **kw)
            seconds = time.perf_counter() - start
            stats = bundle_stats(bundle)
            codes_bits[label] = stats["budget_bits_per_weight"]
            r = CpuRebuilder(bundle, base)
            out = r.allocate()
            errs, accs = [], []
            for t in tasks:
                r.rebuild({t: 1.0}, out)
                M.load_weights(net.encoder, out)
                f = M.features(net, tokenized[t])
                errs.append(float(np.mean(np.linalg.norm(f - reference[t], axis=1)
                                          / np.linalg.norm(reference[t], axis=1))))
                _, head = M.split_state(fts[t])
                accs.append(float(np.mean(M.predict(net, tokenized[t], head) == labels[t])))
            rows.append("| %s | %.3f | %.3f | %.5f | %.4f | %.0f s |" % (
                label, stats["budget_bits_per_weight"], stats["bits_per_task_vector_weight"], np.mean(errs),
                np.mean(accs), seconds))
            print(rows[-1], flush=True)
    report = "\n".join(["# Bit allocation vs uniform widths at equal budget, MiniLM, %d tasks" % T, "",
                        "- tasks: %s (fine-tuned checkpoints from %s)" % (", ".join(tasks), cache),
                        "- %d validation texts per task; feature error = mean ||f - f_ft|| / ||f_ft|| "
                        "of mean-pooled encoder features" % args.texts,
                        "- allocator: relative error with the part along the task vector counted "
                        "COHERENT_GAIN = %g more (docs/allocation.md)" % COHERENT_GAIN,
                        "- codes bits: what --budget-bits holds to (codes, group index, scale pairs; "
                        "FORMAT.md section 6); file bits: all of the file but the base; export: seconds "
                        "to write the bundle, allocation included",
                        "- command: `python -m bench.allocation`", "", *rows, ""])
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
