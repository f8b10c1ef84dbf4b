"""The GPU rebuild: CpuRebuilder's API, with payloads, base and outputs in device memory.

At load every packed payload the bundle's tensors use goes to the device once, into one
arena, and the base into another; from then on a switch moves no host data.  A mix's
tables (decode.h's segments and terms, with device addresses) are uploaded the first time
that mix meets a set of output buffers and reused after, so a switch is one kernel launch
on one stream.  Outputs are device buffers the rebuilder allocates (``allocate``) or the
engine's own (``DeviceTensor`` or anything with ``__cuda_array_interface__``); every
check happens before the launch, so a refused rebuild writes nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi, nvrtc
from tvswitch.kernels.cuda import Device, open_device
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.mix import check_mix
from tvswitch.runtime.plan import Plan, build_plan, bytes_moved, mix_key, total_blocks
from tvswitch.runtime.rebuild import resolve_base

#: Every tensor and table starts on this boundary (the kernel's vector loads need 16 bytes).
ALIGN = 256
_ELEMENT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_MAX_TABLES = 64


@dataclass(frozen=True)
class DeviceTensor:
    """A C-contiguous tensor in device memory: what a rebuild reads or writes."""

    ptr: int
    shape: Tuple[int, ...]
    dtype: np.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, obj: Any) -> "DeviceTensor":
        """A DeviceTensor, or the view of a CUDA array (torch, CuPy) through ``__cuda_array_interface__``."""
        if isinstance(obj, DeviceTensor):
            return obj
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is None:
            raise TvswitchError("output %r is not device memory (give a DeviceTensor or a CUDA array)"
                                % type(obj).__name__)
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
            raise TvswitchError("a CUDA array output must be C-contiguous")
        return cls(int(cai["data"][0]), shape, dtype)


def _c_strides(shape: Tuple[int, ...], itemsize: int) -> Tuple[int, ...]:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def arena_layout(sizes: Sequence[int], align: int = ALIGN) -> Tuple[List[int], int]:
    """Offsets of blocks of ``sizes`` bytes packed one after another at ``align``; and the total."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-int(size) // align) * align
    return offsets, at


def pick_kernel(max_terms: int) -> int:
    """The smallest prefetch width of rebuild.cu that covers a plan's largest term count."""
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


def check_terms(plan: Plan) -> None:
    """What the kernel relies on and the bundle reader does not promise: groups within 32 bits."""
    codes = plan.terms[plan.terms["kind"] == abi.KIND_CODES]
    if len(codes) and (codes["group"].min() < 1 or codes["group"].max() > abi.MAX_ELEMENTS):
        raise TvswitchError("a term's group size is outside 1..%d" % abi.MAX_ELEMENTS)
    if len(codes) and (codes["bits"].min() < 1 or codes["bits"].max() > 8):
        raise TvswitchError("a term's code width is outside 1..8 bits")


@dataclass
class _Tables:
    """A plan's tables on the device, with the output signature they were made for."""

    ptr: int
    segments: int  # device address of the segment table
    terms: int  # device address of the term table
    nseg: int
    total_tiles: int
    kernel: int  # prefetch width


class GpuRebuilder:
    """Rebuilds tasks and mixes of one bundle on a GPU, into device buffers.

    ``device`` is an open ``kernels.cuda.Device`` (one is opened on GPU ``ordinal`` through
    ``binding`` otherwise); ``tiles_per_block`` is how many 1024-element tiles one CUDA
    block rebuilds (it amortises a block's segment search and table load).
    """

    def __init__(self, bundle: Bundle, base: Optional[Mapping[str, np.ndarray]] = None, *,
                 device: Optional[Device] = None, ordinal: int = 0, binding: str = "auto",
                 tiles_per_block: int = 4, verify_base: bool = True):
        if tiles_per_block < 1:
            raise ValueError("tiles_per_block must be >= 1")
        self.bundle = bundle
        self.tiles_per_block = int(tiles_per_block)
        host_base = {n: np.ascontiguousarray(a) for n, a in resolve_base(bundle, base, verify_base).items()}
        for name, a in host_base.items():
            if a.dtype not in _ELEMENT_DTYPES:
                raise TvswitchError("base tensor %r is %s: the GPU rebuild reads float32/float16" % (name, a.dtype))
        self._own_device = device is None
        self.device = device or open_device(ordinal, binding)
        self._owned: List[int] = []
        self._tables: "OrderedDict[tuple, _Tables]" = OrderedDict()
        self._plans: Dict[tuple, Plan] = {}
        try:
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
        keys: "OrderedDict[str, None]" = OrderedDict()
        for task in self.bundle.tasks:
            for name, entry in self.bundle.entries(task).items():
                if name in self.bundle.shared_specs:
                    for t in entry.terms:
                        keys.update((k, None) for k in (t.codes, t.params, t.values, t.mask) if k)
        return list(keys)

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
        names = list(self.bundle.shared_specs)
        offsets, total = arena_layout([host[n].nbytes for n in names])
        arena = self._alloc(total) if total else 0
        out = {}
        for name, off in zip(names, offsets):
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
        """Device buffers for every tensor a rebuild writes (the base's dtype by default), freed by close()."""
        specs = self.bundle.shared_specs
        dtypes = {n: np.dtype(dtype or self._base[n].dtype) for n in specs}
        for n, dt in dtypes.items():
            if dt not in _ELEMENT_DTYPES:
                raise TvswitchError("output dtype %s for %r: the GPU rebuild writes float32/float16" % (dt, n))
        offsets, total = arena_layout([specs[n].numel * dtypes[n].itemsize for n in specs])
        arena = self._alloc(total) if total else 0
        return {n: DeviceTensor(arena + off, specs[n].shape, dtypes[n]) for n, off in zip(specs, offsets)}

    def download(self, tensor: Any) -> np.ndarray:
        """A host copy of a device tensor (for checks and tests; a switch never needs it)."""
        t = DeviceTensor.of(tensor)
        host = np.empty(t.shape, dtype=t.dtype)
        if t.nbytes:
            self.device.download(host, t.ptr)
        return host

    # ---- switching ----
    def plan(self, mix: Mapping[str, float]) -> Plan:
        """The (cached) tables of a mix with device addresses; out addresses are filled per rebuild."""
        mix = check_mix(mix, self.bundle.tasks, self.bundle.path)
        key = mix_key(mix)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self.bundle, mix, self.address)
            check_terms(plan)
            plan.segments["base"] = [self._base[n].ptr for n in plan.names]
            plan.segments["base_dtype"] = [abi.dtype_code(self._base[n].dtype) for n in plan.names]
            if len(self._plans) > _MAX_TABLES:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def rebuild(self, mix: Mapping[str, float], out: Mapping[str, Any], sync: bool = True) -> None:
        """Write the weights of ``mix`` into the device buffers ``out``.

        One launch on the rebuilder's stream; with ``sync`` it returns once the weights are
        written, without, work queued later on the same stream sees them.  A bad mix or
        buffer raises before anything is written.
        """
        mix = check_mix(mix, self.bundle.tasks, self.bundle.path)
        plan = self.plan(mix)
        outs = self._check_out(out)
        tables = self._device_tables(mix_key(mix), plan, outs)
        if tables.total_tiles:
            grid = -(-tables.total_tiles // self.tiles_per_block)
            self.device.launch(self._functions[tables.kernel], grid, abi.BLOCK_THREADS, [
                ("ptr", tables.segments), ("u32", tables.nseg), ("ptr", tables.terms),
                ("u32", tables.total_tiles), ("u32", self.tiles_per_block)])
        if sync:
            self.device.synchronize()

    def bytes_moved(self, mix: Mapping[str, float], out_dtype: Optional[str] = None) -> int:
        """Bytes one rebuild of ``mix`` reads and writes (the floor of DESIGN.md section 9)."""
        plan = self.plan(mix)
        base_size = next(iter(self._base.values())).dtype.itemsize if self._base else 4
        out_size = np.dtype(out_dtype).itemsize if out_dtype else base_size
        return bytes_moved(plan, self.bundle, base_size, out_size)

    def _check_out(self, out: Mapping[str, Any]) -> Dict[str, DeviceTensor]:
        outs = {}
        for name, spec in self.bundle.shared_specs.items():
            if name not in out:
                raise TvswitchError("output buffers lack tensor %r" % name)
            t = DeviceTensor.of(out[name])
            if tuple(t.shape) != spec.shape or np.dtype(t.dtype) not in _ELEMENT_DTYPES:
                raise TvswitchError("output buffer %r is %s%s, need float32/float16 of shape %s"
                                    % (name, np.dtype(t.dtype), list(t.shape), list(spec.shape)))
            if not t.ptr and t.nbytes:
                raise TvswitchError("output buffer %r has a null device address" % name)
            outs[name] = t
        ranges = [(t.ptr, t.nbytes, "output %r" % n) for n, t in outs.items()]
        ranges.append((self._payload_arena, self._payload_bytes, "the packed payloads"))
        # An output may be its own tensor's base (rebuilt in place), never part of another's.
        ranges += [(b.ptr, b.nbytes, "base %r" % n) for n, b in self._base.items()
                   if not (outs[n].ptr == b.ptr and outs[n].nbytes == b.nbytes)]
        check_disjoint(ranges)
        return outs

    def _device_tables(self, key: tuple, plan: Plan, outs: Dict[str, DeviceTensor]) -> _Tables:
        signature = (key, tuple((outs[n].ptr, abi.dtype_code(outs[n].dtype)) for n in plan.names))
        tables = self._tables.get(signature)
        if tables is not None:
            self._tables.move_to_end(signature)
            return tables
        segments = plan.segments.copy()
        segments["out"] = [outs[n].ptr for n in plan.names]
        segments["out_dtype"] = [abi.dtype_code(outs[n].dtype) for n in plan.names]
        (seg_off, term_off), total = arena_layout([segments.nbytes, plan.terms.nbytes])
        ptr = self.device.alloc(total)
        self.device.upload(ptr + seg_off, segments)
        if len(plan.terms):
            self.device.upload(ptr + term_off, plan.terms)
        max_terms = int(segments["term_count"].max()) if len(segments) else 0
        tiles = total_blocks(plan)
        if tiles >= 2**32:
            raise TvswitchError("the bundle has %d tiles of %d elements; one launch takes < 2^32"
                                % (tiles, abi.BLOCK_ELEMS))
        tables = _Tables(ptr, ptr + seg_off, ptr + term_off, len(segments), tiles, pick_kernel(max_terms))
        self._tables[signature] = tables
        while len(self._tables) > _MAX_TABLES:
            _, old = self._tables.popitem(last=False)
            self.device.synchronize()  # no launch still reads it
            self.device.free(old.ptr)
        return tables

    # ---- lifetime ----
    def close(self) -> None:
        """Free every device buffer this rebuilder allocated (allocate()'s included)."""
        if not self._owned and not self._tables:
            return
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
