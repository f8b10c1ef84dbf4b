"""The GPU rebuild: CpuRebuilder's API, with payloads, base and outputs in device memory.

At load every packed payload the bundle's tensors use goes to the device once, into one
arena, and the base into another; from then on a switch moves no host data.  A mix's
tables (decode.h's segments and terms, with device addresses) are uploaded the first time
that mix meets a set of output buffers and reused after, so a switch is one kernel launch
on one stream.  Outputs are device buffers the rebuilder allocates (``allocate``) or the
engine's own (``DeviceTensor`` or anything with ``__cuda_array_interface__``), in float32,
float16 or bfloat16; every check happens before the launch, so a refused rebuild writes
nothing.  The resident base is never an output: every later switch reads it.

What a repeated switch costs on the host is a few dictionary lookups: a mix is checked
once per distinct weights, a set of ``DeviceTensor`` outputs once per set of objects (they
are immutable, so the same objects are the same buffers; other objects are read again on
every switch), and the launch's arguments are kept with the mix's tables.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi, cpu, nvrtc
from tvswitch.kernels.cuda import Device, DeviceTensor, open_device
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.mix import check_mix
from tvswitch.runtime.mixtables import (MixTables, TableMaker, abs_max, bytes_moved, element_runs, mix_key,
                                        zero_signs_of)
from tvswitch.runtime.rebuild import resolve_base
from tvswitch.runtime.zeroblocks import blocks_of

#: Every tensor and table starts on this boundary (the kernel's vector loads need 16 bytes).
ALIGN = 256
_MAX_TABLES = 64
_MAX_OUTPUT_SETS = 16
_MAX_MIXES = 256


def arena_layout(sizes: Sequence[int], align: int = ALIGN) -> Tuple[List[int], int]:
    """Offsets of blocks of ``sizes`` bytes packed one after another at ``align``; and the total."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-int(size) // align) * align
    return offsets, at


def pick_kernel(max_terms: int) -> int:
    """The smallest prefetch width of rebuild.cu that covers a mix's largest term count."""
    for width in sorted(nvrtc.KERNELS):
        if max_terms <= width:
            return width
    return max(nvrtc.KERNELS)


def check_disjoint(ranges: Sequence[Tuple[int, int, str]]) -> None:
    """Refuse overlapping [start, start + size) ranges, naming both."""
    spans = sorted((s, s + n, what) for s, n, what in ranges if n > 0)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise TvswitchError("device buffers overlap: %s and %s" % (a, b))


#: What check_out calls the base arena in its refusal.
RESIDENT_BASE = ("the resident base (every switch reads it, so no rebuild may write it: "
                 "rebuild into allocate()'s buffers or the engine's)")


#: A GPU switch that writes part of a tensor launches one segment per stretch of the blocks
#: it writes, stretches less than this many blocks apart merged: rewriting a block that
#: holds its bits already is exact, and every CUDA block scans the segment table once for
#: its first segment, so the table must stay a few hundred long. A switch between two real
#: text8 tasks (TVQ-INT4): 318 segments writing 0.882 of the weights, against 1,544 writing
#: 0.801 unmerged and 101 writing all (a choice made without a GPU to time it).
MERGE_GAP_BLOCKS = 4


def block_stretches(tables: MixTables) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per launch segment: (index into ``tables``' segments, its first block, its block count)."""
    n = tables.segments["n"].astype(np.int64)
    if tables.runs is None:
        return np.arange(len(n)), np.zeros(len(n), dtype=np.int64), -(-n // abi.BLOCK_ELEMS)
    runs = tables.runs
    seg = runs["segment"].astype(np.int64)
    first = runs["start"].astype(np.int64) // abi.BLOCK_ELEMS
    end = (runs["start"].astype(np.int64) + runs["len"] - 1) // abi.BLOCK_ELEMS + 1
    new = np.ones(len(runs), dtype=bool)
    new[1:] = (seg[1:] != seg[:-1]) | (first[1:] - end[:-1] >= MERGE_GAP_BLOCKS)
    heads = np.flatnonzero(new)
    if not len(heads):
        return heads, heads, heads
    return seg[heads], first[heads], np.maximum.reduceat(end, heads) - first[heads]


def launch_segments(tables: MixTables) -> Tuple[np.ndarray, List[str], int]:
    """The launch's segment table (decode.h: a tensor written in part is one segment per
    stretch of blocks, ``block_offset`` its first), the tensor each segment writes, and
    the launch's total blocks."""
    seg, first, count = block_stretches(tables)
    segments = tables.segments[seg].copy()
    segments["block_offset"] = first
    segments["first_block"] = np.concatenate([[0], np.cumsum(count)[:-1]]) if len(count) else count
    return segments, [tables.names[i] for i in seg], int(count.sum())


def check_terms(mix_tables: MixTables) -> None:
    """What the kernel relies on of a table it did not build: group sizes of 1..MAX_ELEMENTS
    elements and code widths of 1..8 bits (decode.h divides by the one and shifts by the other)."""
    codes = mix_tables.terms[np.isin(mix_tables.terms["kind"], (abi.KIND_CODES, abi.KIND_GROUPS, abi.KIND_SPARSE))]
    if len(codes) and (codes["group"].min() < 1 or codes["group"].max() > abi.MAX_ELEMENTS):
        raise TvswitchError("a term's group size is outside 1..%d" % abi.MAX_ELEMENTS)
    if len(codes) and (codes["bits"].min() < 1 or codes["bits"].max() > 8):
        raise TvswitchError("a term's code width is outside 1..8 bits")


@dataclass
class _Tables:
    """A mix's tables on the device and the launch that runs them (None: nothing to write)."""

    ptr: int
    kernel: int  # prefetch width
    launch: Optional[Tuple[Any, int, int, Tuple[Tuple[str, int], ...]]]  # Device.launch's arguments


@dataclass
class _Outputs:
    """A checked set of output buffers; ``token`` names their addresses and dtypes in the table cache."""

    token: int
    tensors: Dict[str, DeviceTensor]
    objects: Tuple[Any, ...]  # the caller's objects, held so that their ids stay theirs while cached


class GpuRebuilder:
    """Rebuilds tasks and mixes of one bundle on a GPU, into device buffers.

    ``device`` is an open ``kernels.cuda.Device`` (one is opened on GPU ``ordinal`` through
    ``binding`` otherwise); ``tiles_per_block`` is how many 1024-element tiles one CUDA
    block rebuilds (it amortises a block's segment search and table load).  Every call
    runs inside ``device.current()``, so any thread may switch.
    """

    def __init__(self, bundle: Bundle, base: Optional[Mapping[str, np.ndarray]] = None, *,
                 device: Optional[Device] = None, ordinal: int = 0, binding: str = "auto",
                 tiles_per_block: int = 4, verify_base: bool = True, base_label: str = "the base"):
        if tiles_per_block < 1:
            raise ValueError("tiles_per_block must be >= 1")
        self.bundle = bundle
        self.tiles_per_block = int(tiles_per_block)
        host_base = {n: np.ascontiguousarray(a) for n, a in resolve_base(bundle, base, verify_base, base_label).items()}
        for name, a in host_base.items():
            if abi.element_code(a.dtype) is None:
                raise TvswitchError("base tensor %r is %s: the GPU rebuild reads float32, float16 or bfloat16"
                                    % (name, a.dtype))
        self._names = list(bundle.shared_specs)
        #: max|base| per tensor, for the range check of a mix (``mixtables.TableMaker``): the base leaves the host
        self._base_bounds = {n: abs_max(a) for n, a in host_base.items()}
        #: each base tensor's smallest magnitudes by sign (where c * base can be -0.0), which
        #: decides what a switch may skip
        self._zero_signs = {n: zero_signs_of(a) for n, a in host_base.items()}
        self._own_device = device is None
        self.device = device or open_device(ordinal, binding)
        self._owned: List[int] = []
        self._tables: "OrderedDict[tuple, _Tables]" = OrderedDict()
        self._mix_tables: Dict[tuple, MixTables] = {}
        self._base_columns: Optional[Tuple[List[int], List[int]]] = None  # the base's addresses, dtypes
        self._table_maker = TableMaker(bundle, self.address, self._base_bounds.get, self._zero_signs.get)
        self._mix_keys: Dict[tuple, tuple] = {}
        self._out_sets: "OrderedDict[tuple, _Outputs]" = OrderedDict()
        self._tokens: Dict[tuple, int] = {}
        self._next_token = 0
        try:
            with self.device.current():
                self._payload_offsets, self._payload_arena, self._payload_bytes = self._upload_payloads()
                self._base = self._upload_base(host_base)
                image, self.kernel_source = nvrtc.kernel_image(self.device.cc)
                module = self.device.load_module(image)
                self._functions = {w: self.device.function(module, name) for w, name in nvrtc.KERNELS.items()}
        except BaseException:
            self.close()
            raise
    # ---- resident data ----
    def _payload_keys(self) -> List[str]:
        return self.bundle.payloads_read(self.bundle.tasks, self.bundle.shared_specs)

    def _alloc(self, nbytes: int) -> int:
        ptr = self.device.alloc(nbytes)
        self._owned.append(ptr)
        return ptr

    def _upload_payloads(self) -> Tuple[Dict[str, int], int, int]:
        keys = self._payload_keys()
        arrays = [self.bundle.payload(k) for k in keys]
        offsets, total = arena_layout([a.nbytes for a in arrays])
        arena = self._alloc(total) if total else 0
        for a, off in zip(arrays, offsets):
            self.device.upload(arena + off, a)
        return dict(zip(keys, offsets)), arena, total

    def _upload_base(self, host: Mapping[str, np.ndarray]) -> Dict[str, DeviceTensor]:
        offsets, total = arena_layout([host[n].nbytes for n in self._names])
        arena = self._alloc(total) if total else 0
        self._base_arena, self._base_bytes = arena, total
        out = {}
        for name, off in zip(self._names, offsets):
            self.device.upload(arena + off, host[name])
            out[name] = DeviceTensor(arena + off, tuple(host[name].shape), host[name].dtype)
        return out

    @property
    def base(self) -> Dict[str, DeviceTensor]:
        """The base weights in device memory (read by every rebuild, never written)."""
        return dict(self._base)

    @property
    def resident_bytes(self) -> int:
        """Device memory held for the bundle: packed payloads and base."""
        return self._payload_bytes + sum(t.nbytes for t in self._base.values())

    def address(self, key: str) -> int:
        """Device address of payload ``key``."""
        return self._payload_arena + self._payload_offsets[key]

    # ---- outputs ----
    def allocate(self, dtype: Optional[str] = None) -> Dict[str, DeviceTensor]:
        """Device buffers for every tensor a rebuild writes (the base's dtype by default;
        float32, float16 or bfloat16), freed by close()."""
        specs = self.bundle.shared_specs
        if dtype is not None and abi.element_code(dtype) is None:
            raise TvswitchError("output dtype %s: the GPU rebuild writes float32, float16 or bfloat16" % dtype)
        tensors = {n: DeviceTensor(0, specs[n].shape, dtype or self._base[n].dtype) for n in specs}
        offsets, total = arena_layout([t.nbytes for t in tensors.values()])
        with self.device.current():
            arena = self._alloc(total) if total else 0
        return {n: DeviceTensor(arena + off, t.shape, t.dtype) for (n, t), off in zip(tensors.items(), offsets)}

    def download(self, tensor: Any) -> np.ndarray:
        """A host copy of a device tensor (for checks and tests; a switch never needs it).
        bfloat16 comes back as its bits (uint16) where numpy has no bfloat16."""
        t = DeviceTensor.of(tensor)
        host = np.empty(t.shape, dtype=t.host_dtype)
        if t.nbytes:
            with self.device.current():
                self.device.download(host, t.ptr)
        return host

    # ---- switching ----
    def mix_tables(self, mix: Mapping[str, float]) -> MixTables:
        """The (cached) tables of a mix with device addresses; out addresses are filled per rebuild."""
        return self._host_tables(self._mix_key(mix))

    def _mix_key(self, mix: Mapping[str, float]) -> tuple:
        """``mix_key`` of the checked mix; each distinct mix is checked once."""
        try:
            items: Optional[tuple] = tuple(mix.items())
            key = self._mix_keys.get(items)  # type: ignore[arg-type]
        except (AttributeError, TypeError):  # not a mapping, or an unhashable weight: check_mix says which
            items, key = None, None
        if key is None:
            key = mix_key(check_mix(mix, self.bundle.tasks, self.bundle.path))
            if items is not None:
                if len(self._mix_keys) >= _MAX_MIXES:
                    self._mix_keys.clear()
                self._mix_keys[items] = key
        return key

    def _host_tables(self, key: tuple) -> MixTables:
        mix_tables = self._mix_tables.get(key)
        if mix_tables is None:
            mix_tables = self._table_maker.tables(dict(key))
            check_terms(mix_tables)
            if self._base_columns is None:  # every mix's tables name the bundle's tensors in one order
                self._base_columns = ([self._base[n].ptr for n in mix_tables.names],
                                      [abi.element_code(self._base[n].dtype) for n in mix_tables.names])
            mix_tables.segments["base"], mix_tables.segments["base_dtype"] = self._base_columns
            if len(self._mix_tables) > _MAX_TABLES:
                self._mix_tables.clear()
            self._mix_tables[key] = mix_tables
        return mix_tables

    def rebuild(self, mix: Mapping[str, float], out: Mapping[str, Any], sync: bool = True,
                since: Optional[Mapping[str, float]] = None) -> None:
        """Write the weights of ``mix`` into the device buffers ``out``.

        One launch on the rebuilder's stream; with ``sync`` it returns once the weights are
        written, without, work queued later on the same stream sees them.  A bad mix or
        buffer raises before anything is written.  ``since``: the mix ``out`` holds whole;
        the launch table then covers only the tensors whose inputs differ, less the blocks
        zero in both mixes (``MixTables.since``, ``launch_segments``), as
        ``CpuRebuilder.rebuild`` does.
        """
        with self.device.current():
            launch = self.launch_of(mix, out, since)
            if launch is not None:
                self.device.launch(*launch)
            if sync:
                self.device.synchronize()

    def launch_of(self, mix: Mapping[str, float], out: Mapping[str, Any],
                  since: Optional[Mapping[str, float]] = None) -> Optional[tuple]:
        """``Device.launch``'s arguments for a rebuild of ``mix`` into ``out`` (None: nothing to
        write), its tables uploaded: what ``rebuild`` launches, and what a benchmark times alone.
        Call it inside ``device.current()`` (``rebuild`` does)."""
        key = self._mix_key(mix)
        held = None if since is None else self._mix_key(since)
        outs = self._outputs(out)
        cache_key = (key, held, outs.token)
        tables = self._tables.get(cache_key)
        if tables is None:
            tables = self._upload_tables(cache_key, self.host_tables(mix, since), outs.tensors)
        else:
            self._tables.move_to_end(cache_key)
        return tables.launch

    def host_tables(self, mix: Mapping[str, float], since: Optional[Mapping[str, float]] = None) -> MixTables:
        """The host side of the launch tables of ``mix`` (over the tensors that differ from
        ``since``'s, with one); what ``launch_of`` uploads, and what the host emulation runs.
        Where a switch writes part of a tensor, ``runs`` cover the blocks the launch writes
        (``block_stretches``: the CPU's runs, merged across short gaps)."""
        tables = self._host_tables(self._mix_key(mix))
        if since is None:
            return tables
        cut = tables.since(self._host_tables(self._mix_key(since)))
        if cut.runs is None:
            return cut
        nblocks = blocks_of(cut.segments["n"].astype(np.int64))
        offsets = np.cumsum(nblocks) - nblocks
        written = np.zeros(int(nblocks.sum()), dtype=bool)
        for seg, first, count in zip(*block_stretches(cut)):
            written[offsets[seg] + first:offsets[seg] + first + count] = True
        return replace(cut, runs=element_runs(cut.segments["n"], written))

    def bytes_moved(self, mix: Mapping[str, float], out_dtype: Optional[str] = None,
                    since: Optional[Mapping[str, float]] = None) -> int:
        """Bytes one rebuild of ``mix`` reads and writes (the switch floor of docs/architecture.md, with a
        payload counted once per term that reads it); ``since`` as for ``rebuild``."""
        mix_tables = self.host_tables(mix, since)
        base_size = next(iter(self._base.values())).itemsize if self._base else 4
        out_size = DeviceTensor(0, (), out_dtype).itemsize if out_dtype else base_size
        return bytes_moved(mix_tables, self.bundle, base_size, out_size)

    def _outputs(self, out: Mapping[str, Any]) -> _Outputs:
        """The checked outputs; a set of DeviceTensor objects seen before is not checked again."""
        objects = tuple(out.values())
        key = (tuple(out), tuple(map(id, objects)))
        entry = self._out_sets.get(key)
        if entry is not None:
            return entry
        tensors = self._check_out(out)
        signature = tuple((tensors[n].ptr, abi.element_code(tensors[n].dtype)) for n in self._names)
        token = self._tokens.get(signature)
        if token is None:
            if len(self._tokens) > 4 * _MAX_TABLES:
                self._tokens.clear()  # forgotten sets get new tokens, and new tables if they come back
            token = self._tokens[signature] = self._next_token
            self._next_token += 1
        entry = _Outputs(token, tensors, objects)
        if all(type(o) is DeviceTensor for o in objects):  # immutable: the same objects are the same buffers
            self._out_sets[key] = entry
            while len(self._out_sets) > _MAX_OUTPUT_SETS:
                self._out_sets.popitem(last=False)
        return entry

    def _check_out(self, out: Mapping[str, Any]) -> Dict[str, DeviceTensor]:
        outs = {}
        for name, spec in self.bundle.shared_specs.items():
            if name not in out:
                raise TvswitchError("output buffers lack tensor %r" % name)
            t = DeviceTensor.of(out[name])
            if tuple(t.shape) != spec.shape or abi.element_code(t.dtype) is None:
                raise TvswitchError("output buffer %r is %s%s, need float32/float16/bfloat16 of shape %s"
                                    % (name, t.dtype, list(t.shape), list(spec.shape)))
            if not t.ptr and t.nbytes:
                raise TvswitchError("output buffer %r has a null device address" % name)
            outs[name] = t
        ranges = [(t.ptr, t.nbytes, "output %r" % n) for n, t in outs.items()]
        ranges.append((self._payload_arena, self._payload_bytes, "the packed payloads"))
        ranges.append((self._base_arena, self._base_bytes, RESIDENT_BASE))
        check_disjoint(ranges)
        return outs

    def _upload_tables(self, cache_key: tuple, mix_tables: MixTables, outs: Dict[str, DeviceTensor]) -> _Tables:
        segments, names, tiles = launch_segments(mix_tables)
        segments["out"] = [outs[n].ptr for n in names]
        segments["out_dtype"] = [abi.element_code(outs[n].dtype) for n in names]
        buffers = [(self._payload_arena, self._payload_bytes), (self._base_arena, self._base_bytes)]
        cpu.check_tables(segments, mix_tables.terms, buffers + [(t.ptr, t.nbytes) for t in outs.values()])
        if tiles >= 2**32:
            raise TvswitchError("the bundle has %d tiles of %d elements; one launch takes < 2^32"
                                % (tiles, abi.BLOCK_ELEMS))
        (seg_off, term_off), total = arena_layout([segments.nbytes, mix_tables.terms.nbytes])
        ptr = self.device.alloc(total)
        self.device.upload(ptr + seg_off, segments)
        if len(mix_tables.terms):
            self.device.upload(ptr + term_off, mix_tables.terms)
        kernel = pick_kernel(int(segments["term_count"].max()) if len(segments) else 0)
        launch = None
        if tiles:
            args = (("ptr", ptr + seg_off), ("u32", len(segments)), ("ptr", ptr + term_off),
                    ("u32", tiles), ("u32", self.tiles_per_block))
            launch = (self._functions[kernel], -(-tiles // self.tiles_per_block), abi.BLOCK_THREADS, args)
        tables = _Tables(ptr, kernel, launch)
        self._tables[cache_key] = tables
        while len(self._tables) > _MAX_TABLES:
            _, old = self._tables.popitem(last=False)
            self.device.synchronize()  # no launch still reads it
            self.device.free(old.ptr)
        return tables

    # ---- lifetime ----
    def close(self) -> None:
        """Free every device buffer this rebuilder allocated (allocate()'s included)."""
        if not self._owned and not self._tables:
            if self._own_device:
                self.device.close()
            return
        with self.device.current():
            self.device.synchronize()
            for t in self._tables.values():
                self.device.free(t.ptr)
            self._tables.clear()
            for ptr in self._owned:
                self.device.free(ptr)
            self._owned = []
        if self._own_device:
            self.device.close()

    def __enter__(self) -> "GpuRebuilder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
