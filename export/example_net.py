"""The network of the built-in example (``tvswitch example``), so its checkpoints can be served.

``export.example`` writes weights only: names and shapes of a small transformer encoder.
This is a torch module with exactly those names, one factory per task (the tasks' heads
have 3, 4 and 5 classes), for ``tvswitch export-onnx`` and ``tvswitch run --engine torch``::

    tvswitch export-onnx --module tvswitch.export.example_net:detect --weights demo/detect.safetensors \\
        --input ids=demo/ids.npy -o demo/detect.onnx

A graph has one head shape, so it serves the tasks whose heads fit it: ``detect.onnx``
serves ``detect``, and a switch to ``gauge`` on it is refused (docs/engines.md).  The
forward is one plausible encoder over those weights (token embeddings, two blocks of
multi-head attention and a GELU MLP in parallel after one LayerNorm, mean pooling, the
weights-free BatchNorm whose statistics the example carries, the head); the example's
weights are synthetic, so the outputs mean nothing beyond being a function of them.
"""
from __future__ import annotations

from typing import Any


from tvswitch.export.example import CLASSES, VOCAB, example_ids

#: The shapes ``export.example`` writes (``make_example``'s defaults): loading its files
#: strictly, as ``--weights`` does, checks that they still agree.
DIM, LAYERS, HEADS = 128, 2, 4


def build(classes: int) -> Any:
    """The example network with a head of ``classes`` outputs, randomly initialised."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value, self.output = (nn.Linear(DIM, DIM) for _ in range(4))

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            b, s, _ = x.shape

            def split(t: "torch.Tensor") -> "torch.Tensor":
                return t.view(b, s, HEADS, DIM // HEADS).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, dim=-1)
            return self.output((att @ v).transpose(1, 2).reshape(b, s, DIM))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()
            self.mlp = nn.ModuleDict(dict(up=nn.Linear(DIM, 4 * DIM, bias=False),
                                          down=nn.Linear(4 * DIM, DIM, bias=False)))
            self.norm = nn.LayerNorm(DIM)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            h = self.norm(x)
            return x + self.attn(h) + self.mlp["down"](torch.nn.functional.gelu(self.mlp["up"](h)))

    class ExampleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.ModuleDict(dict(word=nn.Embedding(VOCAB, DIM)))
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.pool = nn.ModuleDict(dict(bn=nn.BatchNorm1d(DIM, affine=False)))
            self.head = nn.Linear(DIM, classes)

        def forward(self, ids: "torch.Tensor") -> "torch.Tensor":
            x = self.embeddings["word"](ids)
            for block in self.layers:
                x = block(x)
            return self.head(self.pool["bn"](x.mean(1)))

    return ExampleNet().eval()


def detect() -> Any:
    """The network for task ``detect``'s head (``--module tvswitch.export.example_net:detect``)."""
    return build(CLASSES["detect"])


def gauge() -> Any:
    """The network for task ``gauge``'s head."""
    return build(CLASSES["gauge"])


def line() -> Any:
    """The network for task ``line``'s head."""
    return build(CLASSES["line"])


__all__ = ["build", "detect", "gauge", "line", "example_ids", "VOCAB", "DIM", "LAYERS", "HEADS"]
