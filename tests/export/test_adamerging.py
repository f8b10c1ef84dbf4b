"""AdaMerging on a two-tensor linear model whose entropy landscape is known."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tvswitch.export.adamerging import adamerging, entropy  # noqa: E402

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])


def forward(params, task, batch):
    # logits = batch @ W.T + b; "unused" never touches the logits.
    return batch @ params["w"].T + params["b"]


def setup():
    base = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32),
            "unused": np.zeros(3, np.float32)}
    # Task "sharp" makes the classes separable (larger lambda -> lower entropy);
    # task "flat" adds a bias shared by both classes (no effect on the softmax).
    tvs = {
        "sharp": {"w": np.array([[4.0, -4.0], [-4.0, 4.0]], np.float32), "b": np.zeros(2, np.float32),
                  "unused": np.ones(3, np.float32)},
        "flat": {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32),
                 "unused": np.ones(3, np.float32), "head.weight": np.ones(1, np.float32)},
    }
    batches = {"sharp": [X], "flat": [X[:2]]}
    return base, tvs, batches


def test_entropy_of_uniform_and_certain_predictions():
    assert float(entropy(torch.zeros(3, 4))) == pytest.approx(np.log(4))
    assert float(entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_layerwise_raises_the_useful_coefficient_and_leaves_dead_ones():
    base, tvs, batches = setup()
    res = adamerging(base, tvs, batches, forward, granularity="layer", init=0.3, steps=60, lr=0.05)
    assert res.names == ["w", "b", "unused"]  # the head is task-specific, not merged
    assert res.coefficients.shape == (2, 3)
    assert res.coefficient("sharp", "w") > 0.9
    # No gradient reaches a tensor the logits do not use: its coefficients stay at init.
    assert res.coefficient("sharp", "unused") == pytest.approx(0.3)
    assert res.coefficient("flat", "unused") == pytest.approx(0.3)
    assert res.entropy[-1] < res.entropy[0]
    assert (res.coefficients >= 0).all() and (res.coefficients <= 1).all()


def test_taskwise_shares_one_coefficient_across_tensors_and_delta_matches():
    base, tvs, batches = setup()
    res = adamerging(base, tvs, batches, forward, granularity="task", init=0.3, steps=40, lr=0.05)
    assert res.coefficients.shape == (2, 1)
    lam = res.coefficient("sharp", "w")
    assert lam > 0.9 and lam == res.coefficient("sharp", "b")
    delta = res.delta(tvs)
    want = lam * tvs["sharp"]["w"] + res.coefficient("flat", "w") * tvs["flat"]["w"]
    np.testing.assert_allclose(delta["w"], want, rtol=1e-6)
    assert set(delta) == {"w", "b", "unused"}


def test_bad_arguments():
    base, tvs, batches = setup()
    with pytest.raises(ValueError, match="granularity"):
        adamerging(base, tvs, batches, forward, granularity="block")
    with pytest.raises(ValueError, match="unlabelled"):
        adamerging(base, tvs, {"sharp": [X]}, forward)
