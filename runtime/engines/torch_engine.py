"""The PyTorch engine: the module's own parameters are the weight buffers, written in place.

For development and as the reference the other engines are checked against.  On the CPU
slot 0 is the parameters and float buffers themselves, seen as numpy arrays that share
their memory, so a rebuild lands in the module with no copy and no new tensor.  A second
slot (double buffering) is a set of tensors of the same shapes run through
``torch.func.functional_call``.  A module on a GPU cannot be written through numpy:
its slot is host arrays, and ``publish`` copies them into the parameters in place
(``publish_copies``).  torch is imported only here.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines.base import Engine


class TorchEngine(Engine):
    """A torch module served with switchable parameters."""

    kind = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Optional[Sequence[str]] = None, *,
                 names: Optional[Iterable[str]] = None, slots: int = 1):
        """Serve ``module``; ``names`` limits the switchable weights (default: every float tensor).

        ``input_names`` name forward's positional arguments; ``output_names`` its flattened
        outputs (default ``output`` or ``output_i``).
        """
        import torch

        if slots not in (1, 2):
            raise TvswitchError("slots must be 1 (in place) or 2 (double buffer), got %r" % slots)
        self._torch = torch
        self.module = module.eval()
        self._inputs = list(input_names)
        self._outputs = list(output_names) if output_names else None
        state = module.state_dict(keep_vars=True)
        wanted = set(names) if names is not None else None
        self._params: Dict[str, Any] = {n: t for n, t in state.items()
                                        if t.is_floating_point() and (wanted is None or n in wanted)}
        if wanted is not None and len(self._params) != len(wanted & set(state)):
            bad = sorted(n for n in wanted & set(state) if n not in self._params)
            raise TvswitchError("tensor %r of the module is not a float tensor" % bad[0])
        self._device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
        self.publish_copies = self._device.type != "cpu"
        self.slots = slots
        self._slot_tensors: List[Dict[str, Any]] = []
        self._arrays: List[Dict[str, np.ndarray]] = []
        for slot in range(slots):
            if slot == 0 and not self.publish_copies:
                tensors = {n: t.detach() for n, t in self._params.items()}
            else:
                tensors = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in self._params.items()}
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
        return self._outputs or ["output"]

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
            if slot == 0 or self.publish_copies:
                result = self.module(*args)
            else:
                result = torch.func.functional_call(self.module, self._slot_tensors[slot], tuple(args))
        flat = flatten_outputs(result)
        if self._outputs is None:
            self._outputs = ["output"] if len(flat) == 1 else ["output_%d" % i for i in range(len(flat))]
        if len(flat) != len(self._outputs):
            raise TvswitchError("the module returned %d outputs for %d output names" % (len(flat), len(self._outputs)))
        return dict(zip(self._outputs, flat))


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


def load_module(spec: str, weights: Optional[Mapping[str, np.ndarray]] = None) -> Any:
    """The torch module ``spec`` names, ``package.module:factory`` or ``path/file.py:factory``.

    ``factory()`` must return the network (its architecture); ``weights``, if given, are
    loaded into it (strictly: every name must match).
    """
    import importlib
    import importlib.util
    import os

    import torch

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise TvswitchError("--module takes MODULE:FACTORY or FILE.py:FACTORY, got %r" % spec)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise TvswitchError("%s: no such file" % where)
            loader_spec = importlib.util.spec_from_file_location("tvswitch_user_module", where)
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ImportError as exc:
        raise TvswitchError("cannot import %s (%s)" % (where, exc)) from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise TvswitchError("%s has no callable %r" % (where, attr))
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise TvswitchError("%s returned %s, not a torch.nn.Module" % (spec, type(module).__name__))
    if weights is not None:
        try:
            module.load_state_dict({n: torch.from_numpy(np.array(a)) for n, a in weights.items()}, strict=True)
        except RuntimeError as exc:
            raise TvswitchError("weights do not fit %s: %s" % (spec, str(exc).splitlines()[0])) from None
    return module.eval()
