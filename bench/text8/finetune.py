"""Fine-tune one encoder + linear head per task, cached as safetensors outside the repo.

Settings follow the benchmark's reference run (docs/results/text8-notes.md): <=1,500 train / 300 val / 1,000 test
examples, max length 128, 2 epochs, AdamW (encoder lr 5e-5, head lr 1e-3: one lr of 5e-5
left the 44-class task far behind), 10% linear warm-up then linear decay, batch 16,
seed 0. A checkpoint is reused when its recorded settings match, so a second run of the
benchmark costs no training.

    python -m bench.text8.finetune [--cache DIR] [--tasks 20news r8 ...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from bench.text8 import data as D
from bench.text8 import model as M

import torch  # noqa: E402  (after model, which sets the offline environment)

DEFAULT_CACHE = pathlib.Path("~/.cache/tvswitch/text8").expanduser()


@dataclass(frozen=True)
class Settings:
    max_train: int = 1500
    max_val: int = 300
    max_test: int = 1000
    max_len: int = M.MAX_LEN
    epochs: int = 2
    lr_encoder: float = 5e-5
    lr_head: float = 1e-3
    warmup: float = 0.1
    batch: int = 16
    weight_decay: float = 0.01
    seed: int = 0
    version: int = 1  # bump when the recipe or the data splits change


def pretrained_path(cache: pathlib.Path) -> pathlib.Path:
    return cache / "pretrained.safetensors"


def task_path(cache: pathlib.Path, task: str) -> pathlib.Path:
    return cache / ("%s.safetensors" % task)


def _state_np(module: torch.nn.Module, prefix: str = "") -> Dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def save_pretrained(cache: pathlib.Path) -> pathlib.Path:
    from safetensors.numpy import save_file

    path = pretrained_path(cache)
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        save_file(_state_np(M.load_encoder()), str(path))
    return path


def _meta_ok(cache: pathlib.Path, task: str, settings: Settings) -> bool:
    meta = cache / ("%s.json" % task)
    if not (meta.exists() and task_path(cache, task).exists()):
        return False
    return json.loads(meta.read_text()).get("settings") == asdict(settings)


Log = Callable[[str], None]


def finetune_task(task: str, cache: pathlib.Path, settings: Settings = Settings(),
                  log: Log = print) -> pathlib.Path:
    """Train (or reuse) the checkpoint of one task; returns its safetensors path."""
    from safetensors.numpy import save_file

    if _meta_ok(cache, task, settings):
        return task_path(cache, task)
    save_pretrained(cache)
    t0 = time.time()
    td = D.load_task(task, settings.max_train, settings.max_val, settings.max_test, settings.seed)
    torch.manual_seed(settings.seed)
    tok = M.load_tokenizer()
    model = M.Classifier(M.load_encoder(), len(td.classes))
    train = M.Tokenized(tok, td.train.texts, settings.max_len)
    labels = torch.from_numpy(td.train.labels)
    opt = torch.optim.AdamW(
        [{"params": model.encoder.parameters(), "lr": settings.lr_encoder},
         {"params": model.head.parameters(), "lr": settings.lr_head}],
        weight_decay=settings.weight_decay)
    steps_per_epoch = (len(train) + settings.batch - 1) // settings.batch
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    gen = np.random.default_rng(settings.seed)
    model.train()
    step = 0
    for epoch in range(settings.epochs):
        order = gen.permutation(len(train))
        for s in range(0, len(order), settings.batch):
            idx = order[s:s + settings.batch]
            ids, mask = train.batch(idx)
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log("  %s epoch %d step %d/%d loss %.3f (%.0fs)" % (task, epoch, step, total, loss.item(), time.time() - t0))
    state = _state_np(model.encoder)
    state.update(_state_np(model.head, "head."))
    _, head = M.split_state(state)
    val = M.Tokenized(tok, td.val.texts, settings.max_len)
    val_acc = float((M.predict(model, val, head) == td.val.labels).mean())
    cache.mkdir(parents=True, exist_ok=True)
    save_file(state, str(task_path(cache, task)))
    meta = {"settings": asdict(settings), "classes": td.classes, "val_acc": val_acc,
            "n_train": len(td.train.texts), "seconds": round(time.time() - t0, 1)}
    (cache / ("%s.json" % task)).write_text(json.dumps(meta, indent=1))
    log("%s: val acc %.4f in %.0fs" % (task, val_acc, time.time() - t0))
    return task_path(cache, task)


def finetune_all(cache: pathlib.Path, tasks: Optional[List[str]] = None,
                 settings: Settings = Settings(), log: Log = print) -> Dict[str, pathlib.Path]:
    """Every task's checkpoint path, training the ones the cache lacks (the run's first cost)."""
    return {t: finetune_task(t, cache, settings, log) for t in (tasks or list(D.TASKS))}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                   help="checkpoint folder (default %(default)s)")
    p.add_argument("--tasks", nargs="*", choices=D.TASKS, help="default: all eight")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    finetune_all(args.cache.expanduser(), args.tasks, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
