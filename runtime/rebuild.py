"""The CPU rebuild: base + sum_i w_i * deq(tau_i) written into buffers the caller owns.

Payloads stay resident in the bundle; the base stays in the caller's arrays; the output
goes into preallocated arrays (an engine's weight buffers) that are reused switch after
switch.  The work is one call into the compiled library (kernels/cpu_rebuild.c), fused
per tile with no full-size temporary.  Where that library was not built, the numpy
transcription of decode.h does the same arithmetic, much more slowly.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi, cpu, reference
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.checkpoint import as_tensors, contiguous
from tvswitch.runtime.mix import check_mix
from tvswitch.runtime.mixtables import MixTables, TableMaker, abs_max, bytes_moved, mix_key, zero_signs_of


def resolve_base(bundle: Bundle, base: Union[None, str, "os.PathLike[str]", Mapping[str, np.ndarray]],
                 verify: bool = True, label: str = "the base") -> Dict[str, np.ndarray]:
    """The base arrays a rebuild reads: the caller's (fingerprint checked) or the embedded copy.

    ``base`` may be a safetensors file's path (``checkpoint.as_tensors``)."""
    if isinstance(base, (str, os.PathLike)):
        label = os.fspath(base)
    base = as_tensors(base)
    if base is None:
        embedded = bundle.embedded_base()
        if embedded is None:
            raise TvswitchError("%s holds no base weights: give the base checkpoint (--base)" % bundle.path)
        return embedded
    base = bundle.base_view(base)
    if verify:
        bundle.check_base(base, label)
    return {name: base[name] for name in bundle.shared_specs}


#: decode.h's codes of the output dtypes a CPU rebuild writes: float32, float16 and bfloat16
#: (ml_dtypes' type: numpy has none).
_OUT_CODES = tuple(abi.ELEMENT_CODES.values())

#: Elements per call when a rebuild shows progress: enough to keep every core busy and
#: make the calls' overhead (microseconds each) vanish.
PROGRESS_CHUNK = 1 << 22


def _runs(sizes: np.ndarray, chunk: int) -> List[Tuple[int, int]]:
    """Consecutive (begin, end) ranges of segments, each about ``chunk`` elements or one tensor."""
    runs, begin, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += int(n)
        if acc >= chunk:
            runs.append((begin, i + 1))
            begin, acc = i + 1, 0
    if begin < len(sizes):
        runs.append((begin, len(sizes)))
    return runs


class CpuRebuilder:
    """Rebuilds tasks and mixes of one bundle on the CPU into caller-owned buffers."""

    def __init__(self, bundle: Bundle, base: Optional[Mapping[str, np.ndarray]] = None,
                 threads: int = 0, verify_base: bool = True, base_label: str = "the base"):
        if int(threads) < 0:
            raise TvswitchError("threads must be 0 (all cores) or more, got %d" % threads)
        self.bundle = bundle
        self.threads = int(threads)
        self._base = {name: contiguous(a) for name, a in
                      resolve_base(bundle, base, verify_base, base_label).items()}
        self._mix_tables: Dict[tuple, MixTables] = {}
        self._since: Dict[tuple, MixTables] = {}  # per (mix, held mix): what a switch writes
        self._addresses: Dict[str, int] = {}
        self._inputs: Optional[cpu.Extents] = None  # every payload a mix can read, and the base
        self._base_columns: Optional[Tuple[List[int], List[int]]] = None  # the base's addresses, dtypes
        self._base_only = frozenset(bundle.base_only)  # what ``out`` may lack: the base in every mix
        # the maker asks each tensor's bound and signs once
        self._table_maker = TableMaker(bundle, self._address, lambda n: abs_max(self._base[n]),
                                       lambda n: zero_signs_of(self._base[n]))
        self._compiled = cpu.available()
        if not self._compiled:
            warnings.warn("tvswitch: %s; rebuilding with the slow numpy reference" % cpu.unavailable_reason())

    @property
    def base(self) -> Dict[str, np.ndarray]:
        return self._base

    def _address(self, key: str) -> int:
        """A resident payload's address, read once (a table of a mix names some 1,800)."""
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = self.bundle.payload(key).ctypes.data
        return address

    def allocate(self, dtype: Union[None, str, np.dtype] = None) -> Dict[str, np.ndarray]:
        """Output buffers for every tensor a rebuild writes (the base's dtype by default;
        float32, float16, or ml_dtypes' bfloat16)."""
        return {name: np.empty(spec.shape, dtype=dtype or spec.dtype)
                for name, spec in self.bundle.shared_specs.items()}

    def mix_tables(self, mix: Mapping[str, float]) -> MixTables:
        """The (cached) tables of a mix; checks the mix first."""
        return self._cached(mix)[1]

    def _cached(self, mix: Mapping[str, float]) -> Tuple[tuple, MixTables]:
        """A checked mix's key and its tables, cached under it."""
        mix = check_mix(mix, self.bundle.tasks, self.bundle.path)
        key = mix_key(mix)
        tables = self._mix_tables.get(key)
        if tables is None:
            tables = self._table_maker.tables(mix)
            if self._base_columns is None:  # every mix's tables name the bundle's tensors in one order
                self._base_columns = ([self._base[n].ctypes.data for n in tables.names],
                                      [abi.dtype_code(self._base[n].dtype) for n in tables.names])
            tables.segments["base"], tables.segments["base_dtype"] = self._base_columns
            if len(self._mix_tables) > 64:
                self._mix_tables.clear()
                self._since.clear()
            self._mix_tables[key] = tables
        return key, tables

    def _tables_since(self, mix: Mapping[str, float], since: Mapping[str, float]) -> MixTables:
        """``MixTables.since`` of two mixes, cached per pair (a switch back and forth reuses it)."""
        key, full = self._cached(mix)
        held_key, held = self._cached(since)
        cut = self._since.get((key, held_key))
        if cut is None:
            cut = full.since(held)
            if len(self._since) > 256:
                self._since.clear()
            self._since[(key, held_key)] = cut
        return cut

    def _input_extents(self) -> cpu.Extents:
        """Every payload a mix's terms can read, and the base, as one buffer table made once:
        reading an array's address from Python costs a microsecond, a new mix's own table
        of some 700-1,900 buffers would cost 1-2 ms a switch, and the range check is a
        binary search, so checking against all of them costs what a mix's own would."""
        if self._inputs is None:
            self._inputs = cpu.Extents([self.bundle.payload(k) for k in self._table_maker.payload_keys()]
                                       + list(self._base.values()))
        return self._inputs

    def rebuild(self, mix: Mapping[str, float], out: Mapping[str, np.ndarray], progress: bool = False,
                since: Optional[Mapping[str, float]] = None) -> None:
        """Write the weights of ``mix`` into ``out``; a bad mix or buffer raises before any write.

        ``since``: the mix whose rebuild ``out`` holds now, whole and untouched since (the
        caller vouches for it: ``Server`` tracks what each slot holds). Then only the tensors
        whose inputs differ between the two mixes are read and written, and of those not
        the blocks where every term of both is +0.0 (``MixTables.since``); the result is
        bit for bit that of a full rebuild.
        ``out`` may lack the bundle's ``base_only`` tensors (the base in every mix: an engine
        holding them as constants); they are then neither read nor written.
        ``progress`` shows a bar (after half a second) over the tensors, rebuilding them in
        runs of about PROGRESS_CHUNK elements; each run is a full-speed call of its own.
        """
        full = self._cached(mix)[1]
        held_elsewhere = self._check_out(out)
        if since is not None:
            tables = self._tables_since(mix, since)  # names no base-only tensor: those never differ
        else:
            tables = full.leaving_out(held_elsewhere) if held_elsewhere else full
        addresses = {n: out[n].ctypes.data for n in tables.names}  # read once: a microsecond each
        segments = tables.segments.copy()
        segments["out"] = [addresses[n] for n in tables.names]
        segments["out_dtype"] = [abi.dtype_code(out[n].dtype) for n in tables.names]
        if self._compiled:
            outputs = cpu.Extents((a, out[n].nbytes) for n, a in addresses.items())  # ``out`` outlives the call
            buffers = self._input_extents() + outputs
            if tables.runs is not None:
                cpu.rebuild_runs(segments, tables.terms, tables.runs, buffers, self.threads)
                return
            run = lambda part: cpu.rebuild(part, tables.terms, buffers, self.threads)  # noqa: E731
        else:
            arrays = [self.bundle.payload(k) for k in full.keys]
            arrays += list(self._base.values()) + [out[n] for n in tables.names]
            if tables.runs is not None:
                reference.rebuild_reference(segments, tables.terms, arrays, tables.runs)
                return
            run = lambda part: reference.rebuild_reference(part, tables.terms, arrays)  # noqa: E731
        if not progress:
            run(segments)
            return
        from tqdm import tqdm

        with tqdm(total=len(segments), desc="rebuild", unit="tensor", delay=0.5, leave=False) as bar:
            for begin, end in _runs(segments["n"], PROGRESS_CHUNK):
                run(segments[begin:end])
                bar.update(end - begin)

    def bytes_moved(self, mix: Mapping[str, float], out_dtype: Optional[str] = None,
                    since: Optional[Mapping[str, float]] = None, leaving_out: Iterable[str] = ()) -> int:
        """Bytes one rebuild of ``mix`` reads and writes (the switch floor, docs/architecture.md);
        ``since`` as for ``rebuild``; ``leaving_out``: ``base_only`` tensors the buffers lack
        (an engine's constants), which the rebuild neither reads nor writes."""
        left = frozenset(leaving_out)
        if not left <= self._base_only:
            raise TvswitchError("tensor %r is not base-only: every rebuild writes it" % sorted(left - self._base_only)[0])
        if since is not None:
            tables = self._tables_since(mix, since)  # names no base-only tensor
        else:
            tables = self.mix_tables(mix).leaving_out(left) if left else self.mix_tables(mix)
        base_size = next(iter(self._base.values())).dtype.itemsize if self._base else 4
        out_size = np.dtype(out_dtype).itemsize if out_dtype else base_size
        return bytes_moved(tables, self.bundle, base_size, out_size)

    def _check_out(self, out: Mapping[str, np.ndarray]) -> FrozenSet[str]:
        """Refuse a buffer that cannot take its tensor; returns the tensors ``out`` lacks, which
        may only be the bundle's base-only ones (an engine holding them as constants)."""
        lacking = []
        for name, spec in self.bundle.shared_specs.items():
            a = out.get(name)
            if a is None:
                lacking.append(name)
                continue
            if tuple(a.shape) != spec.shape or abi.element_code(a.dtype) not in _OUT_CODES:
                raise TvswitchError("output buffer %r is %s%s, need float32/float16/bfloat16 of shape %s"
                                    % (name, a.dtype, list(a.shape), list(spec.shape)))
            if not (a.flags.c_contiguous and a.flags.writeable):
                raise TvswitchError("output buffer %r must be C-contiguous and writable" % name)
        changing = [n for n in lacking if n not in self._base_only]
        if changing:
            raise TvswitchError("output buffers lack tensor %r" % changing[0])
        return frozenset(lacking)
