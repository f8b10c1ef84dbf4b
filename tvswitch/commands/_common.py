"""Small pieces the CLI verbs share: task arguments, JSON output, loading a base."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from tvswitch.errors import TvswitchError


def parse_task_args(values: List[str], flag: str = "--task") -> Dict[str, str]:
    """``NAME=PATH`` pairs, in order, refusing duplicates and malformed ones."""
    tasks: Dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise TvswitchError("%s takes NAME=PATH, got %r" % (flag, v))
        if name in tasks:
            raise TvswitchError("%s names task %r twice" % (flag, name))
        tasks[name] = path
    return tasks


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def load_base(path: Optional[str], bundle: Any = None) -> Optional[Dict[str, np.ndarray]]:
    """A base checkpoint given on the command line (a file, an index or a save_pretrained
    folder), or None; under ``bundle``'s names where one is given (``Bundle.base_view``)."""
    if path is None:
        return None
    from tvswitch.export.checkpoints import load_checkpoint

    tensors = load_checkpoint(path, "base").tensors
    return dict(bundle.base_view(tensors)) if bundle is not None else tensors


#: What ``--dtype`` of rebuild and merge offers: the floating tensors of the output file.
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def output_dtype(name: Optional[str]) -> Optional[np.dtype]:
    """``--dtype``'s numpy type; bfloat16 is ml_dtypes' (numpy has none; the onnx extra
    brings it), which the rebuild writes directly and safetensors stores as BF16."""
    if name != "bfloat16":
        return None if name is None else np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise TvswitchError("--dtype bfloat16 needs the ml_dtypes package (pip install ml_dtypes, or the onnx "
                            "extra: pip install 'tvswitch[onnx]')") from None
    return np.dtype(ml_dtypes.bfloat16)


def cast_floats(tensors: Dict[str, np.ndarray], dtype: Optional[np.dtype]) -> Dict[str, np.ndarray]:
    """Every floating tensor as ``dtype`` (rounded to nearest even), the others as they are."""
    if dtype is None:
        return tensors
    return {n: a.astype(dtype) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") and a.dtype != dtype else a
            for n, a in tensors.items()}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.2f %s" % (n, unit))
        n /= 1024.0
    return "%.2f GiB" % n


def times_smaller(ratio: float) -> str:
    """``ratio`` (theirs over ours) as words: "4.2x smaller", or "1.1x larger" below 1."""
    if ratio >= 1 or ratio <= 0:
        return "%.1fx smaller" % ratio
    return "%.1fx larger" % (1.0 / ratio)


def plural(n: int, word: str) -> str:
    return "%d %s%s" % (n, word, "" if n == 1 else "s")
