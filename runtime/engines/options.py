"""An engine's options from what the user chose: where inference runs, how much the engine
may say, and TensorRT's precision, plan cache and input shapes.

``tvswitch run`` and ``bench-switch`` map their flags onto ``engine_options`` one to
one; a script calls it the same way before ``serve_bundle``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError


def engine_options(kind: str, inputs: Mapping[str, np.ndarray], *, provider: Optional[str] = None,
                   verbose: bool = False, fp16: bool = False, plan_cache: Optional[str] = None,
                   graph: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """(inputs, the options for ``load_engine(kind, ...)``).

    ``provider`` is ``cpu`` or ``cuda`` (None: cpu; TensorRT runs on CUDA only, and is
    never moved to the CPU silently). TensorRT builds its optimization profile from the
    inputs' shapes keyed by the graph's input names, so for it a bare ``input`` is renamed
    from ``graph`` before the engine exists; the other engines learn the names when loaded.
    """
    if kind == "torch":
        return dict(inputs), {}
    options: Dict[str, object] = {"verbose": verbose}
    if kind == "onnxruntime":
        options["providers"] = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                                else ["CPUExecutionProvider"])
    elif provider == "cpu":
        raise TvswitchError("provider cpu: the tensorrt engine runs on a CUDA GPU only")
    if kind == "tensorrt":
        inputs = name_inputs(inputs, graph_inputs(graph) if graph else [])
        options.update(fp16=fp16, cache_dir=plan_cache, profile={n: (tuple(a.shape),) * 3 for n, a in inputs.items()})
    return dict(inputs), options


def torch_device(provider: Optional[str]) -> str:
    """torch's device for ``provider``: ``cuda`` only where torch sees a GPU, else refused with why."""
    if provider != "cuda":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise TvswitchError("provider cuda: torch %s sees no CUDA GPU (%s)" % (
            torch.__version__, "a CPU-only build" if torch.version.cuda is None else "built for CUDA %s; no device "
            "or driver" % torch.version.cuda))
    return "cuda"


def name_inputs(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
    """``inputs`` with a bare ``input`` renamed to the network's single data input (others as given)."""
    if list(inputs) == ["input"] and len(names) == 1:
        return {names[0]: inputs["input"]}
    return dict(inputs)


def graph_inputs(path: str) -> List[str]:
    """The data inputs of the ONNX graph at ``path`` (empty if it is missing: serving it says so)."""
    from tvswitch.runtime.engines import onnx_graph

    if not os.path.isfile(path):
        return []
    proto = onnx_graph.load_model(path)
    return onnx_graph.data_inputs(proto, onnx_graph.find_weights(proto))
