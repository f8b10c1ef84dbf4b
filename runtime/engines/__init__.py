"""Serving engines behind one interface (``base.Engine``); each imported only when asked for.

``load_engine("onnxruntime" | "tensorrt" | "torch", ...)`` is the one entry point, so a
device that serves with ONNX Runtime never imports torch or TensorRT.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines.base import ENGINE_KINDS, Engine

__all__ = ["ENGINE_KINDS", "Engine", "load_engine"]


def load_engine(kind: str, model: Any = None, *, names: Optional[Iterable[str]] = None, slots: int = 1,
                threads: int = 0, module: Any = None, input_names: Optional[Sequence[str]] = None,
                **options: Any) -> Engine:
    """Load an engine of ``kind``.

    Not every argument means something to every engine (``serve_bundle`` passes them all,
    whatever the engine, because ``threads`` also sizes the rebuild):

    ============  =======================  =========================  ======================
    argument      onnxruntime              tensorrt                   torch
    ============  =======================  =========================  ======================
    model         ONNX path/bytes/proto    ONNX path/bytes/proto      ignored
    names         weights of a graph       same                       limits the weights
                  without tvswitch record
    slots         1 or 2                   1 only (refused else)      1 or 2
    threads       intra-op threads         ignored (GPU)              ignored (torch's own
                                                                      ``set_num_threads``)
    module        ignored                  ignored                    the network
    input_names   ignored (the graph's)    ignored (the graph's)      forward's arguments
    ============  =======================  =========================  ======================

    ``options`` go to the engine's constructor (``providers``, ``verbose``,
    ``weights_device`` for ONNX Runtime; ``fp16``, ``profile``, ``cache_dir``, ``verbose``
    for TensorRT; ``output_names`` for torch).
    """
    if kind == "onnxruntime":
        from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine

        _need(model, "an ONNX model", kind)
        return OnnxRuntimeEngine(model, names=names, slots=slots, threads=threads, **options)
    if kind == "tensorrt":
        from tvswitch.runtime.engines.tensorrt import TensorRTEngine

        _need(model, "an ONNX model", kind)
        if slots != 1:
            raise TvswitchError("the tensorrt engine refits from one staging slot; slots must be 1")
        return TensorRTEngine(model, names=names, **options)
    if kind == "torch":
        from tvswitch.runtime.engines.torch_engine import TorchEngine

        _need(module, "a torch module", kind)
        _need(input_names, "the names of forward's inputs", kind)
        return TorchEngine(module, input_names, names=names, slots=slots, **options)
    raise TvswitchError("unknown engine %r (engines: %s)" % (kind, ", ".join(ENGINE_KINDS)))


def _need(value: Any, what: str, kind: str) -> None:
    if value is None:
        raise TvswitchError("the %s engine needs %s" % (kind, what))
