"""AdaMerging on a two-tensor linear model whose entropy landscape is known, and its
shortcut gradient against autograd on a small nonlinear one."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tvswitch.export.adamerging import MergedParams, adamerging, entropy, task_entropy  # noqa: E402
from tvswitch.export.merge import Coefficients  # noqa: E402

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
    # normalised by log(classes): a uniform 4-class and a uniform 2-class prediction both score 1
    assert float(task_entropy(torch.zeros(3, 4), normalize=True)) == pytest.approx(1.0)
    assert float(task_entropy(torch.zeros(3, 2), normalize=True)) == pytest.approx(1.0)


def test_layerwise_raises_the_useful_coefficient_and_leaves_dead_ones():
    base, tvs, batches = setup()
    res = adamerging(base, tvs, batches, forward, granularity="layer", init=0.3, steps=60, lr=0.05)
    assert res.names == ["w", "b", "unused"]  # the head is task-specific, not merged
    assert res.values.shape == (2, 3)
    assert res.coefficient("sharp", "w") > 0.9
    # No gradient reaches a tensor the logits do not use: its coefficients stay at init.
    assert res.coefficient("sharp", "unused") == pytest.approx(0.3)
    assert res.coefficient("flat", "unused") == pytest.approx(0.3)
    assert res.entropy[-1] < res.entropy[0]
    assert (res.values >= 0).all() and (res.values <= 1).all()
    assert res.best_step == -1 and res.validation == []


def test_taskwise_shares_one_coefficient_across_tensors_and_delta_matches():
    base, tvs, batches = setup()
    res = adamerging(base, tvs, batches, forward, granularity="task", init=0.3, steps=40, lr=0.05)
    assert res.values.shape == (2, 1)
    lam = res.coefficient("sharp", "w")
    assert lam > 0.9 and lam == res.coefficient("sharp", "b")
    delta = res.delta(tvs)
    want = lam * tvs["sharp"]["w"] + res.coefficient("flat", "w") * tvs["flat"]["w"]
    np.testing.assert_allclose(delta["w"], want, rtol=1e-6)
    assert set(delta) == {"w", "b", "unused"}


def test_validation_keeps_the_best_step_including_the_start():
    base, tvs, batches = setup()
    # A validation score that prefers the starting point: step 0 is kept although entropy fell.
    res = adamerging(base, tvs, batches, forward, init=0.3, steps=10, lr=0.05,
                     validate=lambda c: -abs(c.coefficient("sharp", "w") - 0.3), validate_every=4)
    assert [s for s, _ in res.validation] == [0, 4, 8, 10]
    assert res.best_step == 0
    np.testing.assert_allclose(res.values, 0.3)
    assert res.entropy[-1] < res.entropy[0]
    # One that prefers larger coefficients keeps the last check.
    res = adamerging(base, tvs, batches, forward, init=0.3, steps=10, lr=0.05,
                     validate=lambda c: c.coefficient("sharp", "w"), validate_every=4)
    assert res.best_step == 10 and res.coefficient("sharp", "w") > 0.7


def test_init_may_be_an_array_per_task_and_tensor():
    base, tvs, batches = setup()
    init = np.array([[0.5, 0.1, 0.2], [0.0, 0.3, 0.4]])
    res = adamerging(base, tvs, batches, forward, init=init, steps=0)
    np.testing.assert_allclose(res.values, init)
    with pytest.raises(ValueError, match="init of shape"):
        adamerging(base, tvs, batches, forward, init=np.zeros((3, 3)), steps=0)


def _tiny():
    rng = np.random.default_rng(0)
    base = {"w1": rng.normal(size=(5, 3)).astype(np.float32), "w2": rng.normal(size=(4, 5)).astype(np.float32),
            "b2": rng.normal(size=4).astype(np.float32)}
    tvs = {t: {n: rng.normal(0, 0.5, a.shape).astype(np.float32) for n, a in base.items()} for t in ("p", "q", "r")}
    batches = {t: torch.as_tensor(rng.normal(size=(6, 3)).astype(np.float32)) for t in tvs}

    def net(params, task, batch):  # a nonlinear two-layer net; task r reads only 3 of 4 logits
        logits = torch.tanh(batch @ params["w1"].T) @ params["w2"].T + params["b2"]
        return logits[:, :3] if task == "r" else logits

    return base, tvs, batches, net


@pytest.mark.parametrize("width_of", [lambda names: 1, len])
def test_shortcut_gradient_equals_autograd(width_of):
    base, tvs, batches, net = _tiny()
    tasks, names = list(tvs), list(base)
    width = width_of(names)
    lam = torch.as_tensor(np.random.default_rng(1).uniform(0, 1, (len(tasks), width)).astype(np.float32))

    # autograd: the merged weights as a differentiable function of lambda
    lam_ad = lam.clone().requires_grad_(True)
    merged = {n: torch.as_tensor(base[n]) + sum(lam_ad[i, 0 if width == 1 else j] * torch.as_tensor(tvs[t][n])
                                                 for i, t in enumerate(tasks)) for j, n in enumerate(names)}
    loss = sum(task_entropy(net(merged, t, batches[t]), normalize=True) for t in tasks)
    (want,) = torch.autograd.grad(loss, lam_ad)

    # the shortcut: leaves filled in place, then <dL/dtheta_l, tau_tl>
    mp = MergedParams(base, tvs, tasks, names)
    params = mp.fill(lam)
    for t in tasks:
        task_entropy(net(params, t, batches[t]), normalize=True).backward()
    got = mp.coefficient_grad(width)
    assert got.shape == (len(tasks), width)
    assert float(want.abs().max()) > 1e-3  # a real gradient, not zeros on both sides
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    base, tvs, batches = setup()
    with pytest.raises(ValueError, match="granularity"):
        adamerging(base, tvs, batches, forward, granularity="block")
    with pytest.raises(ValueError, match="unlabelled"):
        adamerging(base, tvs, {"sharp": [X]}, forward)
    with pytest.raises(ValueError, match="steps"):
        adamerging(base, tvs, batches, forward, steps=-1)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_coefficients_round_trip(tmp_path, suffix):
    base, tvs, batches = setup()
    res = adamerging(base, tvs, batches, forward, steps=5, lr=0.05)
    path = str(tmp_path / ("c" + suffix))
    res.save(path)
    back = Coefficients.load(path)
    assert back.tasks == res.tasks and back.names == res.names
    np.testing.assert_array_equal(back.values, res.values)
    np.testing.assert_allclose(back.delta(tvs)["w"], res.delta(tvs)["w"])


def test_coefficients_refuse_what_does_not_fit(tmp_path):
    base, tvs, batches = setup()
    with pytest.raises(ValueError, match="shape"):
        Coefficients(["sharp", "flat"], ["w", "b"], np.zeros((2, 3)))
    c = Coefficients(["sharp", "flat"], ["w", "b"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="none for tensor 'unused'"):
        c.delta(tvs)
    with pytest.raises(ValueError, match="tasks"):
        Coefficients(["sharp"], ["w"], np.zeros((1, 1))).delta(tvs)
    bad = tmp_path / "bad.json"
    bad.write_text('{"tasks": ["a"]}')
    with pytest.raises(ValueError, match="bad.json: not a coefficients file"):
        Coefficients.load(str(bad))
    with pytest.raises(ValueError, match="no such coefficients file"):
        Coefficients.load(str(tmp_path / "missing.json"))
