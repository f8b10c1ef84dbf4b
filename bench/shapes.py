"""Parameter shapes of the networks the benchmarks rebuild, for when no checkpoint is at hand."""
from __future__ import annotations

from typing import Dict, Tuple


def minilm_shapes() -> Dict[str, Tuple[int, ...]]:
    d, ff = 384, 1536
    shapes: Dict[str, Tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (30522, d), "embeddings.position_embeddings.weight": (512, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
    for i in range(6):
        p = "encoder.layer.%d." % i
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"], shapes[p + m + ".bias"] = (d, d), (d,)
        shapes[p + "attention.output.LayerNorm.weight"] = shapes[p + "attention.output.LayerNorm.bias"] = (d,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ff, d), (ff,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, ff), (d,)
        shapes[p + "output.LayerNorm.weight"] = shapes[p + "output.LayerNorm.bias"] = (d,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (d, d), (d,)
    return shapes


def vit_b32_shapes() -> Dict[str, Tuple[int, ...]]:
    """OpenCLIP's ViT-B/32 image tower: 12 layers, d=768, 32x32 patches, 50 tokens (87.8 M)."""
    d, ff = 768, 3072
    shapes: Dict[str, Tuple[int, ...]] = {
        "conv1.weight": (d, 3, 32, 32), "class_embedding": (d,), "positional_embedding": (50, d),
        "ln_pre.weight": (d,), "ln_pre.bias": (d,)}
    for i in range(12):
        p = "transformer.resblocks.%d." % i
        shapes[p + "attn.in_proj_weight"], shapes[p + "attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        shapes[p + "attn.out_proj.weight"], shapes[p + "attn.out_proj.bias"] = (d, d), (d,)
        for ln in ("ln_1", "ln_2"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (d,), (d,)
        shapes[p + "mlp.c_fc.weight"], shapes[p + "mlp.c_fc.bias"] = (ff, d), (ff,)
        shapes[p + "mlp.c_proj.weight"], shapes[p + "mlp.c_proj.bias"] = (d, ff), (d,)
    shapes["ln_post.weight"], shapes["ln_post.bias"], shapes["proj"] = (d,), (d,), (d, 512)
    return shapes
