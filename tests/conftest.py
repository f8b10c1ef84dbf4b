"""Shared fixtures: small random checkpoints shaped like a network, bundle factories, test networks."""
from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest

ENGINE_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime", "engines", "models.py")


def make_checkpoints(seed: int = 0, tasks=("a", "b", "c"), with_head: bool = True):
    """A base state_dict and per-task fine-tuned ones (numpy), with odd sizes on purpose."""
    rng = np.random.default_rng(seed)
    base = {
        "enc.weight": rng.normal(0, 0.05, (37, 29)).astype(np.float32),
        "enc.bias": rng.normal(0, 0.01, 37).astype(np.float32),
        "mlp.weight": rng.normal(0, 0.05, (53, 37)).astype(np.float32),
        "norm.weight": np.ones(53, np.float32),
        "half.weight": rng.normal(0, 0.05, (7, 13)).astype(np.float16),
        "bn.running_mean": rng.normal(0, 0.1, 11).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }
    fts = {}
    for i, t in enumerate(tasks):
        ft = {}
        for k, v in base.items():
            if np.issubdtype(v.dtype, np.floating):
                ft[k] = (v + rng.normal(0, 0.003 * (i + 1), v.shape)).astype(v.dtype)
            else:
                ft[k] = v.copy()
        if with_head:
            ft["head.weight"] = rng.normal(0, 0.1, (3 + i, 53)).astype(np.float32)
        fts[t] = ft
    return base, fts


@pytest.fixture
def checkpoints():
    return make_checkpoints()


@pytest.fixture
def bundle_factory(tmp_path, checkpoints):
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints

    def make(name="tvq", filename="b.tvs", **kw):
        return export_bundle(base, fts, str(tmp_path / filename), name=name, **kw)

    return make


@pytest.fixture(scope="session")
def engine_models():
    """tests/runtime/engines/models.py (small networks, task bundles, the torch reference), loaded once.

    Loaded by path because the tests run with ``--import-mode=importlib``: test folders
    are not packages to import from.  Its file is ``engine_models.__file__``.
    """
    pytest.importorskip("torch", reason="the test networks are torch modules (the torch extra)")
    spec = importlib.util.spec_from_file_location("engine_models", ENGINE_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def legacy_tswitch():
    return as_legacy_tswitch


def as_legacy_tswitch(bundle, out: str, layout: str = "groups"):
    """A T-Switch ``bundle`` written as the exporter wrote T-Switch until 2026-12-07: each
    term a 1-bit sign code under a mask, (scale, offset) = (2 lambda, -lambda), as streams
    or in the groups layout (FORMAT.md 3.3).  Bundles on devices still hold that form, and
    readers must refuse a bad one and serve a good one bit for bit as its ternary codes.
    ``bundle`` must hold its terms as streams (``layout="streams"``)."""
    from tvswitch.kernels.packing import pack_codes, pack_groups, pack_mask, unpack_codes
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.bundle.writer import PayloadStore, write_bundle

    manifest = copy.deepcopy(bundle.manifest)
    store = PayloadStore()
    ternary = set()
    for task, entries in manifest["entries"].items():
        for name, entry in entries.items():
            term = entry["terms"][0]
            if term.get("kind") != "codes" or term["bits"] != 2:
                continue
            assert term.get("layout", "streams") == "streams", "give a bundle written with layout='streams'"
            n = int(np.prod(manifest["tensors"][name]["shape"]))
            codes = unpack_codes(bundle.payload(term["codes"]), 2, n)
            lam = bundle.payload(term["params"])[0]
            keep, sign = codes != 1, (codes == 2).astype(np.uint8)
            ternary.update((term["codes"], term["params"]))
            prefix = "%s/%s/legacy" % (task, name)
            new = {"kind": "codes", "bits": 1, "group": term["group"],
                   **({"scale": term["scale"]} if "scale" in term else {}),
                   "params": store.add(prefix + "/params", np.array([2 * lam, -lam], np.float32), compress=False)}
            if layout == "groups":
                index, data = pack_groups(keep, sign)
                new.update(layout="groups", codes=store.add(prefix + "/bytes", data),
                           mask=store.add(prefix + "/index", index))
            else:
                new.update(codes=store.add(prefix + "/codes", pack_codes(sign, 1)),
                           mask=store.add(prefix + "/mask", pack_mask(keep)))
            entry["terms"] = [new]
    for key in manifest.pop("payloads"):
        if key not in ternary:
            store.add(key, bundle.payload(key))
    write_bundle(out, manifest, store)
    return Bundle.open(out)
