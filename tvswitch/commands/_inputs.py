"""What the command line names: input arrays (``--input``), a torch network (``--module``), an output path.

Shared by export-onnx, run and bench-switch.  ``load_module`` runs the user's own code,
which is why it lives with the CLI and not in ``tvswitch.runtime``: a device serving a
bundle never imports a factory by name.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export.checkpoints import UNSAVED_BUFFERS, Checkpoint, best_renaming, renamed


def threads(text: str) -> int:
    """argparse type of ``--threads``: 0 (every core) or a count; a negative one is a typo."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number, got %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (all cores) or more, got %d" % value)
    return value


def parse_inputs(values: List[str]) -> Dict[str, np.ndarray]:
    """``NAME=X.npy`` (or a bare ``X.npy`` for a single input named ``input``, or a bare
    ``X.npz`` for its arrays under their own names) -> arrays, in order."""
    arrays: Dict[str, np.ndarray] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            if len(values) != 1:
                raise TvswitchError("with several --input, name each: --input NAME=X.npy")
            return load_arrays(v, "--input")
        if name in arrays:
            raise TvswitchError("--input names %r twice" % name)
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TvswitchError("%s: not a readable .npy file (%s)" % (path, exc)) from None
        if not isinstance(arrays[name], np.ndarray):
            arrays.pop(name).close()
            raise TvswitchError("--input %s=%s is an .npz archive: give one .npy per input (NAME=X.npy), or the "
                                ".npz alone, its arrays named as the inputs" % (name, path))
    return arrays


def load_arrays(path: str, flag: str) -> Dict[str, np.ndarray]:
    """The arrays of a ``.npy`` (one, called ``input``) or a ``.npz`` (by name, in the file's
    order): one task's inputs where a network takes several (``merge --inputs``, ``router --inputs``)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TvswitchError("%s %s: not a readable .npy or .npz file (%s)" % (flag, path, exc)) from None
    if isinstance(loaded, np.ndarray):
        return {"input": loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def check_output_path(path: str, flag: str, inputs: Iterable[Optional[str]] = ()) -> None:
    """Refuse an output path that cannot or must not be written, before any work is done for it.

    The write itself is atomic (temp file beside it, then rename: ``tvswitch.files``), so
    it needs the folder to exist and be writable; a folder, device node, FIFO or socket
    named as the file is refused, and so is a path that is one of the command's
    ``inputs`` (the same file after resolving links; a folder input covers the weight
    files a checkpoint folder holds): writing it would destroy that input.
    """
    from tvswitch.files import resolve_output, same_file

    try:
        target = resolve_output(path)
    except TvswitchError as exc:
        raise TvswitchError("%s %s" % (flag, exc)) from None
    folder = os.path.dirname(target)
    if not os.access(folder, os.W_OK):
        raise TvswitchError("%s %s: folder %s is not writable" % (flag, path, folder))
    for given in inputs:
        for source in _input_files(given):
            if same_file(source, target):
                shown = given if os.path.abspath(source) == os.path.abspath(given or "") else "%s (in %s)" % (
                    source, given)
                raise TvswitchError("%s %s is also an input of this command (%s): writing it would destroy that "
                                    "input; give another output name" % (flag, path, shown))


def _input_files(path: Optional[str]) -> List[str]:
    """The files an input path stands for: itself, or the files inside a folder."""
    if not path:
        return []
    if os.path.isdir(path):
        try:
            return [os.path.join(path, n) for n in os.listdir(path)]
        except OSError:
            return []
    return [path]


def load_module(spec: str, weights: Optional[Mapping[str, np.ndarray]] = None,
                may_lack: Iterable[str] = ()) -> Any:
    """The torch module ``spec`` names, ``package.module:factory`` or ``path/file.py:factory``.

    ``factory()`` must return the network (its architecture); ``weights``, if given, are
    loaded into it strictly: every name must match, except that ``weights`` may lack the
    names in ``may_lack`` (a bundle's task-specific heads, which a base does not hold and
    every switch writes).  Weights named with another prefix than the network's (a
    ``BertModel`` file for a ``BertForSequenceClassification``, a DDP ``module.``) are
    mapped as ``export`` maps a task's names, with a note.
    """
    import torch

    module = _factory(spec)()
    if not isinstance(module, torch.nn.Module):
        raise TvswitchError("%s returned %s, not a torch.nn.Module" % (spec, type(module).__name__))
    if weights is not None:
        renaming = best_renaming(list(weights), module.state_dict())
        if renaming is not None and all(n.startswith(renaming.strip) for n in weights):  # a prefix of every name
            weights = renamed(Checkpoint(dict(weights), "the weights"), renaming, "the weights", spec).tensors
            may_lack = [renaming(n) for n in may_lack]
        try:
            result = module.load_state_dict({n: torch.from_numpy(np.array(a)) for n, a in weights.items()},
                                            strict=False)
        except RuntimeError as exc:  # a shape that differs: torch's first line names no tensor
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise TvswitchError("weights do not fit %s: %s" % (spec, next(
                (line for line in lines if line.startswith("size mismatch")), lines[0] if lines else exc))) from None
        from tvswitch.runtime.engines.torch_engine import tied_names

        # a tied name (GPT-2's lm_head.weight, which save_pretrained leaves out) holds the
        # value of the name it is tied to once that one is loaded
        tied = {a: w for a, w in tied_names(module.state_dict(keep_vars=True)).items() if w in weights}
        lacking = set(may_lack) | set(tied)
        missing = [n for n in result.missing_keys if n not in lacking]
        # A buffer some checkpoints save and the network keeps unsaved (transformers'
        # position_ids): its value is the network's own either way.
        unexpected = [n for n in result.unexpected_keys if n.rpartition(".")[2] not in UNSAVED_BUFFERS]
        if missing or unexpected:
            raise TvswitchError("weights do not fit %s: %s" % (
                spec, "the weights lack %r (%d such)" % (missing[0], len(missing)) if missing else
                "the network has no tensor %r (%d such)" % (unexpected[0], len(unexpected))))
    return module.eval()


def module_weights(base: Mapping[str, np.ndarray], bundle: Any) -> Dict[str, np.ndarray]:
    """What of ``base`` a torch module of ``bundle``'s network loads: the tensors the bundle
    was exported with and the base's buffers; not a float module export left out (a pooler
    no task has), nor a head the tasks replace (laid out per task at each switch)."""
    heads = bundle.head_names
    known = set(bundle.shared_specs) | set(bundle.manifest["base"].get("other", []))
    return {n: a for n, a in base.items()
            if n not in heads and (n in known or not np.issubdtype(a.dtype, np.floating))}


def _factory(spec: str) -> Any:
    """The callable ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` names (importing, i.e. running, its module)."""
    import importlib
    import importlib.util

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
    return factory
