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
from tvswitch.runtime.heads import HeadCut, output_cut, pad, padded_shapes

#: Padding must not change a task's outputs beyond float reordering: |padded - own| <=
#: ATOL + RTOL * max|own|, per output (the exporter's check of a graph against its module).
ATOL = 1e-4
RTOL = 1e-3


class TorchEngine(Engine):
    """A torch module served with switchable parameters."""

    kind = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Optional[Sequence[str]] = None, *,
                 names: Optional[Iterable[str]] = None, slots: int = 1, head_cuts: Sequence[HeadCut] = ()):
        """Serve ``module``; ``names`` limits the switchable weights (default: every float tensor).

        ``input_names`` name forward's positional arguments; ``output_names`` its flattened
        outputs (default: ``default_names("output", n)``, as the exporter names them, once
        the first inference shows how many there are).  ``defaults`` (module docstring)
        can be set to None to free it where another base is used.  ``head_cuts`` are what
        ``fit_heads`` learnt when it laid the module's heads out for a bundle.
        """
        import torch

        if slots not in (1, 2):
            raise TvswitchError("slots must be 1 (in place) or 2 (double buffer), got %r" % slots)
        self._torch = torch
        self.head_cuts = list(head_cuts)
        self.module = module.eval()
        self._inputs = list(input_names)
        self._outputs = list(output_names) if output_names else None
        state = module.state_dict(keep_vars=True)
        self.defaults: Optional[Dict[str, np.ndarray]] = {n: t.detach().cpu().numpy().copy()
                                                          for n, t in state.items()}
        wanted = set(names) if names is not None else None
        self.weight_aliases = tied_names(state)
        self.unread_weights = list(self.weight_aliases)
        self._params: Dict[str, Any] = {n: t for n, t in state.items() if t.is_floating_point()
                                        and n not in self.weight_aliases and (wanted is None or n in wanted)}
        if wanted is not None and len(self._params) != len(wanted & set(state) - set(self.weight_aliases)):
            bad = sorted(n for n in wanted & set(state) if n not in self._params and n not in self.weight_aliases)
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


def tied_names(state: Mapping[str, Any]) -> Dict[str, str]:
    """Later state_dict names of a tensor an earlier name already holds (alias -> that name).

    A tied output projection (``out.weight = emb.weight``) is one parameter under two
    names.  Served as two weights, a rebuild would write one memory twice and the value
    left would depend on which name came last: a task that changes one name only would
    be served wrong or right by chance.  So the first name is the weight, the others its
    aliases (``Engine.weight_aliases``), which ``check_engine_names`` holds to the same
    rule as a graph's tied names.  Tensors that share memory in another shape (a view)
    are not ties and stay weights of their own.
    """
    first: Dict[Tuple, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


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


def fit_heads(module: Any, heads: Mapping[str, Mapping[str, np.ndarray]], input_names: Optional[Sequence[str]],
              inputs: Optional[Mapping[str, Any]], output_names: Optional[Sequence[str]] = None) -> List[HeadCut]:
    """Lay ``module``'s task-specific tensors out for every task's head; returns the cuts of the smaller heads.

    ``heads`` is task -> tensor -> value (a bundle's ``task_specific``); tensors the module
    lacks are left alone (``check_engine_names`` judges those).  Each such tensor of the
    module becomes a zero tensor of the largest shape any task has (``heads.padded_shapes``).
    For every smaller head shape the module runs twice on ``inputs`` (name -> array, in
    ``input_names``' order), at that head's own shape and padded, which gives the cut of
    each output (named ``output_names``, default as ``default_names``) and checks that
    padding changes none of the task's outputs: a network that mixes along a padded axis
    (a softmax over the classes, a norm over a padded layer) is refused, as is one whose
    forward fails at the padded shapes.  Without ``inputs`` only heads that need no cut can
    be laid out.
    """
    import torch

    state = module.state_dict(keep_vars=True)
    served = {t: {n: a for n, a in tensors.items() if n in state} for t, tensors in heads.items()}
    shapes = padded_shapes({t: {n: np.shape(a) for n, a in tensors.items()} for t, tensors in served.items()})
    if not shapes:
        return []
    signatures: Dict[Tuple, str] = {}
    for task, tensors in served.items():
        key = tuple(sorted((n, tuple(np.shape(a))) for n, a in tensors.items()))
        if any(tuple(np.shape(a)) != shapes[n] for n, a in tensors.items()):
            signatures.setdefault(key, task)
    if signatures and inputs is None:
        raise TvswitchError("the bundle's heads differ in shape (%s): the torch engine learns each one's output size "
                            "by running the module, so give example inputs (the CLI's --input; serve_bundle's "
                            "example_inputs)" % "; ".join("task %s: %s" % (t, _shapes(v)) for t, v in served.items()))
    dtypes = {n: (state[n].dtype, state[n].device) for n in shapes}

    def put(values: Mapping[str, np.ndarray]) -> None:
        for n, a in values.items():
            dtype, device = dtypes[n]
            set_tensor(module, n, torch.as_tensor(np.array(a)).to(dtype=dtype, device=device))

    args = None if inputs is None else [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names or inputs]
    named = {} if inputs is None else dict(inputs)
    cuts = []
    module.eval()
    for key, task in signatures.items():
        own = served[task]
        put(own)
        with torch.inference_mode():
            exact = flatten_outputs(call_module(module, args, named))
        put({n: pad(a, shapes[n]) for n, a in own.items()})
        try:
            with torch.inference_mode():
                padded = flatten_outputs(module(*args))
        except Exception as exc:  # noqa: BLE001 - torch raises many types; the module cannot take padded heads
            raise TvswitchError("the network does not run with its task-specific tensors padded to %s (task %r: %s): "
                                "its forward depends on their size; serve tasks of one head shape per engine"
                                % (_shapes({n: shapes[n] for n in own}), task,
                                   (str(exc).strip().splitlines() or [type(exc).__name__])[0])) from None
        names = list(output_names) if output_names else default_names("output", len(padded))
        if len(names) != len(padded) or len(exact) != len(padded):
            raise TvswitchError("the module returns %d outputs with task %r's own head, %d padded, for %d names"
                                % (len(exact), task, len(padded), len(names)))
        cut = output_cut({n: a.shape for n, a in zip(names, padded)}, {n: a.shape for n, a in zip(names, exact)})
        for name, big, small in zip(names, padded, exact):
            lengths = cut.get(name, (None,) * big.ndim)
            got = big[tuple(slice(None) if k is None else slice(0, k) for k in lengths)]
            err = float(np.max(np.abs(got.astype(np.float64) - small))) if small.size else 0.0
            bound = ATOL + RTOL * float(np.max(np.abs(small))) if small.size else 0.0
            if not err <= bound:
                raise TvswitchError("padding the heads changes task %r's output %r (max error %.3g > %.3g): the network "
                                    "mixes values along a padded axis (a softmax over classes, a norm over a padded "
                                    "layer); serve tasks of one head shape per engine" % (task, name, err, bound))
        cuts.append(HeadCut({n: s for n, s in key}, cut))
    put({n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()})
    return cuts


def _shapes(tensors: Mapping[str, Any]) -> str:
    """``head.bias [4], head.weight [4, 8]``: tensors (arrays or shapes) for a refusal."""
    return ", ".join("%s %s" % (n, list(np.shape(a) if hasattr(a, "shape") else a)) for n, a in sorted(tensors.items()))


def set_tensor(module: Any, name: str, value: Any) -> None:
    """Replace the parameter or buffer ``name`` of ``module`` by ``value`` (any shape): how a
    head is laid out at another size.  A parameter stays a parameter (without gradient)."""
    import torch

    owner_name, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        raise TvswitchError("the module has no submodule %r (for tensor %r)" % (owner_name, name)) from None
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise TvswitchError("the module has no parameter or buffer %r" % name)
