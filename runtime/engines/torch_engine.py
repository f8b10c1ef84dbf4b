"""The PyTorch engine: the module's own parameters are the weight buffers, written in place.

For development and as the reference the other engines are checked against.  On the CPU
slot 0 is the parameters and float buffers themselves, seen as numpy arrays that share
their memory, so a rebuild lands in the module with no copy and no new tensor.  A second
slot (double buffering) is a second copy of the module, its own parameters written the
same way.  Not ``torch.func.functional_call`` over a second set of tensors, although it
would copy nothing but the switchable weights: it swaps them into the module for the
duration of a call, so a request on the other slot running at that moment reads them
(torn reads the server's concurrency test caught).  Memory of a second slot: one more
module.  A module on a GPU cannot be written through numpy: its slot is host arrays, and
``publish`` copies them into the parameters in place (``publish_copies``).  torch is
imported only here.

``defaults`` holds a copy of the whole state_dict as the module was given (float and
non-float tensors: BatchNorm's ``num_batches_tracked`` is part of a bundle's base
fingerprint), so ``serve_bundle`` can use the module's own weights as the base, as it
uses an ONNX file's defaults; the copy is needed because the rebuild reads the base
while it overwrites the parameters.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines.base import Engine, run_failed


class TorchEngine(Engine):
    """A torch module served with switchable parameters."""

    kind = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Optional[Sequence[str]] = None, *,
                 names: Optional[Iterable[str]] = None, slots: int = 1):
        """Serve ``module``; ``names`` limits the switchable weights (default: every float tensor).

        ``input_names`` name forward's positional arguments; ``output_names`` its flattened
        outputs (default: ``default_names("output", n)``, as the exporter names them, once
        the first inference shows how many there are).  ``defaults`` (module docstring)
        can be set to None to free it where another base is used.
        """
        import torch

        if slots not in (1, 2):
            raise TvswitchError("slots must be 1 (in place) or 2 (double buffer), got %r" % slots)
        self._torch = torch
        self.module = module.eval()
        self._inputs = list(input_names)
        self._outputs = list(output_names) if output_names else None
        state = module.state_dict(keep_vars=True)
        self.defaults: Optional[Dict[str, np.ndarray]] = {n: t.detach().cpu().numpy().copy()
                                                          for n, t in state.items()}
        wanted = set(names) if names is not None else None
        self._params: Dict[str, Any] = {n: t for n, t in state.items()
                                        if t.is_floating_point() and (wanted is None or n in wanted)}
        if wanted is not None and len(self._params) != len(wanted & set(state)):
            bad = sorted(n for n in wanted & set(state) if n not in self._params)
            raise TvswitchError("tensor %r of the module is not a float tensor" % bad[0])
        self._device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
        self.publish_copies = self._device.type != "cpu"
        self.slots = slots
        #: the module each slot infers with (on a GPU: the one module, which publish writes)
        copies = 0 if self.publish_copies else slots - 1
        self._modules = [self.module] + [copy.deepcopy(self.module) for _ in range(copies)]
        self._slot_tensors: List[Dict[str, Any]] = []
        self._arrays: List[Dict[str, np.ndarray]] = []
        for slot in range(slots):
            if self.publish_copies:
                tensors = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in self._params.items()}
            else:
                own = self._modules[slot].state_dict(keep_vars=True)
                tensors = {n: own[n].detach() for n in self._params}
            for n, t in tensors.items():
                if not t.is_contiguous():
                    raise TvswitchError("parameter %r is not contiguous: it cannot be written in place" % n)
            self._slot_tensors.append(tensors)
            self._arrays.append({n: t.numpy() for n, t in tensors.items()})

    @property
    def input_names(self) -> Sequence[str]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        """The names given, else those of the first inference's outputs; empty before it.

        A torch module declares no outputs: how many there are is only known once it ran.
        """
        return list(self._outputs or ())

    @property
    def weight_specs(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        return {n: (tuple(a.shape), a.dtype) for n, a in self._arrays[0].items()}

    def buffers(self, slot: int = 0) -> Dict[str, np.ndarray]:
        return self._arrays[slot]

    def publish(self, slot: int = 0) -> None:
        """On a GPU, copy the slot into the parameters in place; on the CPU there is nothing to do."""
        if self.publish_copies:
            with self._torch.no_grad():
                for n, t in self._params.items():
                    t.copy_(self._slot_tensors[slot][n])

    def infer(self, inputs: Mapping[str, np.ndarray], slot: int = 0) -> Dict[str, np.ndarray]:
        torch = self._torch
        self.check_inputs(inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self._device) for n in self._inputs]
        with torch.inference_mode():
            result = call_module(self._modules[0 if self.publish_copies else slot], args,
                                 {n: inputs[n] for n in self._inputs})
        flat = flatten_outputs(result)
        if self._outputs is None:
            self._outputs = default_names("output", len(flat))
        if len(flat) != len(self._outputs):
            raise TvswitchError("the module returned %d outputs for %d output names" % (len(flat), len(self._outputs)))
        return dict(zip(self._outputs, flat))


def call_module(module: Any, args: Sequence[Any], named: Mapping[str, Any]) -> Any:
    """``module(*args)``; an exception becomes one line naming each input's dtype and shape (``named``)
    and torch's first line, which says what it expected.

    A module declares no input types: what it takes is only known by running it, and a
    wrong dtype or rank fails deep inside torch (a float token id, a 3-D batch) with a
    traceback of its internals.  A ``TvswitchError`` of the module's own passes as is.
    """
    try:
        return module(*args)
    except TvswitchError:
        raise
    except Exception as exc:  # torch raises RuntimeError, TypeError, ValueError, IndexError... for bad inputs
        raise run_failed("the torch module", named, exc) from None


def default_names(stem: str, n: int) -> List[str]:
    """``[stem]`` for one tensor, else ``stem_0 .. stem_{n-1}``: how the exporter names a module's
    inputs and outputs, so the torch engine's outputs are named like the graph's."""
    return [stem] if n == 1 else ["%s_%d" % (stem, i) for i in range(n)]


def flatten_outputs(obj: Any) -> List[np.ndarray]:
    """A module's output (tensor, tuple, list, dict, HF ModelOutput) as a flat list of arrays.

    The order is the one torch's ONNX exporter gives the graph's outputs.
    """
    if hasattr(obj, "detach"):
        return [obj.detach().cpu().numpy()]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in flatten_outputs(item)]
    raise TvswitchError("the module returned %s, not tensors (or tuples/dicts of them)" % type(obj).__name__)
