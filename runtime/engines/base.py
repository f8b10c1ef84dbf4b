"""The interface every serving engine keeps: load, bind weights, infer, switch.

An engine owns *weight slots*: host-visible arrays, one per switchable weight, that a
rebuild (``CpuRebuilder.rebuild``, or the CUDA kernels' host-side view) writes in place.
The engine never allocates per switch: the slots are made once at load.

Two facts about an engine decide how ``tvswitch.runtime.server.Server`` keeps a switch
atomic, so each engine states them instead of the server guessing:

* ``slots``: how many weight sets it holds.  One slot that inference reads directly
  (ONNX Runtime bound buffers, PyTorch parameters) must not be written while a request
  runs; two slots let the server write the idle one while the other serves.
* ``publish_copies``: whether ``publish`` copies the slot into memory the engine owns
  (TensorRT refit, a CUDA torch module).  Then the slot is a staging area nobody infers
  from, so it can be written while requests run, and only ``publish`` itself needs
  requests to be drained.

An engine whose weights can be fed from device memory (TensorRT 10: buffers registered
once for refit) also offers ``device_buffers()``; after ``use_device_buffers(stream)``
its ``publish`` reads those instead of the host slot, so the GPU rebuild
(``runtime.gpu_source.GpuBundleSource``) writes them directly and no weight crosses
the host.  Engines without such buffers return None and keep the host path.
"""
from __future__ import annotations

import abc
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.heads import HeadCut

ENGINE_KINDS = ("onnxruntime", "tensorrt", "torch")


class Engine(abc.ABC):
    """One loaded network whose switchable weights live in slots the rebuild writes."""

    #: ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``.
    kind: str = ""
    #: Weight sets held; see the module docstring.
    slots: int = 1
    #: True where ``publish`` copies the slot into the engine's own weight memory.
    publish_copies: bool = False
    #: Tensors the network carries but no node reads (the exporter's ``unused`` and tied
    #: aliases): absent from ``weight_specs`` without changing any output, so a bundle's
    #: tensor of that name need not be served (``server.check_engine_names``).
    unread_weights: Sequence[str] = ()
    #: Head shapes smaller than the engine's task-specific weights that it knows how to cut
    #: its outputs for (``runtime.heads``): from the graph's record, or learnt by the torch engine.
    head_cuts: Sequence[HeadCut] = ()
    #: Weights held as constants of the network, not in any slot (name -> the array served):
    #: a bundle's ``base_only`` tensors, which no switch changes.  ONNX Runtime then
    #: pre-packs them as it does a constant-weight graph's (docs/engines.md section 2).
    constants: Mapping[str, np.ndarray] = MappingProxyType({})
    #: Constants of the network that hold a weight's value under another name (constant name
    #: -> (weight, how)): uses of the weight a switch cannot reach (``onnx_graph.weight_copies``;
    #: ``binding.check_engine_names`` refuses them where a task changes the weight).
    weight_copies: Mapping[str, Tuple[str, str]] = MappingProxyType({})
    #: Tied names (alias -> the weight read for it: the graph's record, a module's shared parameters): one
    #: tensor is read for both, so a task must change both or neither (``check_engine_names``).
    weight_aliases: Mapping[str, str] = MappingProxyType({})

    @property
    @abc.abstractmethod
    def input_names(self) -> Sequence[str]:
        """The data inputs ``infer`` takes, in graph order."""

    @property
    @abc.abstractmethod
    def output_names(self) -> Sequence[str]:
        """The outputs ``infer`` returns, in graph order."""

    @property
    @abc.abstractmethod
    def weight_specs(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """Switchable weight name -> (shape, dtype) of its slot arrays."""

    @abc.abstractmethod
    def buffers(self, slot: int = 0) -> Dict[str, np.ndarray]:
        """The arrays of ``slot``: writing them in place is how weights change (no copy)."""

    @abc.abstractmethod
    def publish(self, slot: int = 0) -> None:
        """Make what was written into ``slot`` the weights the next ``infer(slot)`` uses."""

    @abc.abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray], slot: int = 0) -> Dict[str, np.ndarray]:
        """Run the network on ``inputs`` (name -> array) with the weights of ``slot``."""

    def close(self) -> None:
        """Stop the engine's background work, if it has any (ONNX Runtime's constant sessions)."""

    def device_buffers(self) -> Optional[Dict[str, Any]]:
        """Device memory for every switchable weight (``DeviceTensor``s or CUDA arrays), or None.

        Where not None, a GPU rebuild may write these and ``use_device_buffers`` makes
        ``publish`` read them; same names, shapes and dtypes as ``weight_specs``.
        """
        return None

    def use_device_buffers(self, stream: Optional[int] = None) -> None:
        """From now on ``publish`` takes the weights from ``device_buffers()``, not the host slot.

        ``stream`` (a CUDA stream handle) is where the writer queued its work: ``publish``
        runs on it, so it is ordered after the writes without a host wait; None means the
        writer synchronized before ``publish``.
        """
        raise TvswitchError("the %s engine reads its weights from host buffers only" % self.kind)

    def bind(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy ``weights`` into every slot and publish them: the state before any switch.

        Every switchable weight must be given, so no slot starts with uninitialised memory.
        """
        missing = [n for n in self.weight_specs if n not in weights]
        if missing:
            raise TvswitchError("no value given for weight %r of the %s engine (%d missing)"
                                % (missing[0], self.kind, len(missing)))
        for slot in range(self.slots):
            bufs = self.buffers(slot)
            for name in self.weight_specs:
                copy_into(bufs[name], weights[name], name)
        for slot in range(self.slots):
            self.publish(slot)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Refuse missing or unknown data inputs with the names the graph wants."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise TvswitchError("the network takes inputs %s; got %s"
                                % (", ".join(self.input_names), ", ".join(inputs) or "none"))


def cast_input(name: str, value: np.ndarray, dtype: np.dtype,
               dims: Optional[Sequence[Any]] = None, index: bool = False) -> np.ndarray:
    """``value`` as a C-contiguous array of ``dtype``, refusing a cast that is not numpy's same_kind
    and, where ``dims`` (the declared shape) is given, a shape that does not fit it.

    int64 -> int32 or float64 -> float32 is what a caller means; float -> int64 (token ids
    from a float array) would truncate silently and answer garbage, so it is refused
    with the input's name, and so is bool -> a number (a mask given for the token ids)
    and integers the network's integer type cannot hold (they would wrap); with ``index``
    (a Gather's indices: ``onnx_graph.index_inputs``) negative values, which ONNX takes from
    the end of the table.  In ``dims`` an int is a fixed size; anything else (None, a
    symbolic name, TensorRT's -1) is a dynamic axis.  Refusing here gives one line with
    the expected and the given shape, where the engine's own error would be a stack of its
    internals.
    """
    value = np.asarray(value)
    dtype = np.dtype(dtype)
    wrapped = (value.dtype.kind in "iu" and dtype.kind in "iu" and value.size > 0  # values read on a narrowing only
               and not np.can_cast(value.dtype, dtype, casting="safe")
               and not np.iinfo(dtype).min <= int(value.min()) <= int(value.max()) <= np.iinfo(dtype).max)
    if (not np.can_cast(value.dtype, dtype, casting="same_kind") or wrapped
            or (value.dtype == np.bool_ and dtype != np.bool_)):
        raise TvswitchError("input %r is %s%s%s; the network takes %s (cast it if that is meant)"
                            % (name, value.dtype, list(value.shape),
                               " with values %d..%d" % (value.min(), value.max()) if wrapped else "", dtype))
    if index and value.dtype.kind == "i" and value.size > 0 and int(value.min()) < 0:
        raise TvswitchError("input %r holds negative values (%d..%d): it indexes a table of weights (an "
                            "embedding's Gather), which ONNX would read from the end; ids are 0 or more"
                            % (name, int(value.min()), int(value.max())))
    if dims is not None:
        fixed = [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in dims]
        if len(fixed) != value.ndim or any(d is not None and d != v for d, v in zip(fixed, value.shape)):
            raise TvswitchError("input %r is %s%s; the network takes %s%s" % (
                name, value.dtype, list(value.shape), np.dtype(dtype),
                "[%s]" % ", ".join("?" if d is None else str(d) for d in fixed)))
    return np.ascontiguousarray(value, dtype=dtype)


def describe_inputs(inputs: Mapping[str, Any]) -> str:
    """``ids int64[2, 16], mask int64[2, 16]``: what a refusal says was given."""
    return ", ".join("%s %s%s" % (n, str(getattr(a, "dtype", type(a).__name__)).replace("torch.", ""),
                                  [int(d) for d in getattr(a, "shape", np.shape(a))])
                     for n, a in inputs.items())


def run_failed(who: str, inputs: Mapping[str, Any], exc: BaseException) -> TvswitchError:
    """One line for an engine (or module) that raised on the inputs: what was given and the
    first line of its own message, which says what it expected."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return TvswitchError("%s could not run the inputs given (%s): %s" % (who, describe_inputs(inputs), first))


def copy_into(dst: np.ndarray, src: np.ndarray, name: str) -> None:
    """Write ``src`` into ``dst`` in place, refusing a shape that differs (a cast is allowed)."""
    src = np.asarray(src)
    if tuple(src.shape) != tuple(dst.shape):
        raise TvswitchError("weight %r has shape %s; the engine expects %s"
                            % (name, list(src.shape), list(dst.shape)))
    np.copyto(dst, src, casting="same_kind")
