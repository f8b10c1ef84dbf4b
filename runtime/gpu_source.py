"""The GPU weight source: the CUDA kernels rebuild straight into an engine's device buffers.

``BundleSource``'s contract (``check(mix)``, ``write(mix, buffers)``) for an engine that
offers device buffers for its weights (``Engine.device_buffers()``: TensorRT 10's buffers
registered once for refit).  A switch is one launch of the rebuild kernel writing every
shared tensor into those buffers, then one device-to-device copy per task-specific
tensor (a head: every task's is uploaded once at load), all on the rebuilder's stream;
``engine.publish`` then refits on that same stream.  No weight is rebuilt on the CPU, no
host staging is written, no weight is copied host to device per switch.  (A mix's
launch tables go up once, the first time that mix is served; TensorRT's BatchNorm folds
are the engine's business: per-channel vectors, see ``engines/tensorrt.py``.)

Atomicity is the server's *staged* mode: TensorRT's refit copies the registered buffers
into the engine's own memory, so the kernels may write them while requests run on the
previous weights; requests are held only for the refit.  A failed launch raises before
any refit (the engine still serves the previous weights; the next switch rewrites every
buffer); a failed refit is undone by the server, which rebuilds the previous mix into the
buffers and refits again.  Memory on the device: the engine's registered buffers W (one
set, no second slot) and its own weights W, plus the base B and the packed payloads
(``resident_bytes``), plus scratch for shared tensors the engine does not read.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels.cuda import Device, DeviceTensor
from tvswitch.runtime.binding import BoundSource, EngineBinding
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.engines.base import Engine
from tvswitch.runtime.gpu_rebuild import GpuRebuilder, arena_layout
from tvswitch.runtime.mix import Mix, head_task

#: (destination, source, bytes) of one device-to-device copy.
Copy = Tuple[int, int, int]


def stream_handle(device: Device) -> Optional[int]:
    """The raw handle of ``device``'s stream (what TensorRT's refit takes), or None if it has none."""
    handle = getattr(device, "stream_handle", None)
    return None if handle is None else int(handle)


class GpuBundleSource(BoundSource):
    """Writes a bundle's tasks and mixes into ``engine.device_buffers()`` with ``GpuRebuilder``.

    ``device`` is an open ``kernels.cuda.Device`` (one is opened otherwise); ``base`` as
    for ``CpuRebuilder`` (it goes to the device once and is not kept on the host);
    ``allow_unmatched``, ``what`` and ``binding`` as for ``server.BundleSource``.
    """

    #: Where the rebuild runs (``Server.rebuild_on``).
    where = "gpu"

    def __init__(self, bundle: Bundle, engine: Engine, base: Optional[Mapping[str, np.ndarray]] = None, *,
                 device: Optional[Device] = None, tiles_per_block: int = 4, verify_base: bool = True,
                 allow_unmatched: bool = False, what: str = "the engine", binding: Optional[EngineBinding] = None,
                 base_label: str = "the base"):
        targets = engine.device_buffers()
        if targets is None:
            raise TvswitchError("the %s engine has no device buffers to rebuild into" % engine.kind)
        if engine.constants:
            raise TvswitchError("the GPU rebuild writes every tensor of the bundle; the %s engine holds %d as "
                                "constants" % (engine.kind, len(engine.constants)))
        specs = engine.weight_specs
        self.binding = binding or EngineBinding.of_engine(bundle, engine, allow_unmatched=allow_unmatched, what=what)
        self.unmatched = self.binding.unmatched
        self.bundle = bundle
        self.engine = engine
        self._targets: Dict[str, DeviceTensor] = {}
        for name, (shape, dtype) in specs.items():
            if name not in targets:
                raise TvswitchError("the %s engine has no device buffer for weight %r" % (engine.kind, name))
            t = DeviceTensor.of(targets[name])
            if tuple(t.shape) != tuple(shape) or np.dtype(t.dtype) != np.dtype(dtype):
                raise TvswitchError("device buffer %r is %s%s, the weight is %s%s"
                                    % (name, np.dtype(t.dtype), list(t.shape), np.dtype(dtype), list(shape)))
            self._targets[name] = t
        self.writes = 0
        self._holds: Optional[Mix] = None  # the mix the device buffers hold whole (None: unknown)
        self._owned: List[int] = []
        self.rebuilder = GpuRebuilder(bundle, base, device=device, tiles_per_block=tiles_per_block,
                                      verify_base=verify_base, base_label=base_label)
        self.device = self.rebuilder.device
        try:
            self._outputs = self._rebuild_outputs()
            self._heads = self._upload_heads(self.binding.heads.padded)
            self.stream = stream_handle(self.device)
            engine.use_device_buffers(self.stream)  # last: nothing can fail after the engine switched paths
        except BaseException:
            self.close()
            raise

    def _alloc(self, nbytes: int) -> int:
        ptr = self.device.alloc(nbytes)
        self._owned.append(ptr)
        return ptr

    def _rebuild_outputs(self) -> Dict[str, DeviceTensor]:
        """The engine's buffers for the shared tensors it reads; one scratch arena for the others."""
        base = self.rebuilder.base
        spare = [n for n in self.bundle.shared_specs if n not in self._targets]
        offsets, total = arena_layout([base[n].nbytes for n in spare])
        arena = self._alloc(total) if total else 0
        outputs = {n: DeviceTensor(arena + off, base[n].shape, base[n].dtype) for n, off in zip(spare, offsets)}
        outputs.update((n, t) for n, t in self._targets.items() if n in self.bundle.shared_specs)
        return outputs

    def _upload_heads(self, host: Mapping[str, Mapping[str, np.ndarray]]) -> Dict[str, List[Copy]]:
        """Every task's task-specific tensors, padded and in the engine's dtype, uploaded once into one arena."""
        items = [(task, name, np.ascontiguousarray(a, dtype=self._targets[name].dtype))
                 for task, heads in host.items() for name, a in heads.items()]
        offsets, total = arena_layout([a.nbytes for _, _, a in items])
        arena = self._alloc(total) if total else 0
        copies: Dict[str, List[Copy]] = {task: [] for task in self.bundle.tasks}
        for (task, name, a), off in zip(items, offsets):
            self.device.upload(arena + off, a)
            copies[task].append((self._targets[name].ptr, arena + off, a.nbytes))
        return copies

    @property
    def tasks(self) -> List[str]:
        return self.bundle.tasks

    @property
    def resident_bytes(self) -> int:
        """Device memory this source holds: payloads, base, heads and scratch (not the engine's buffers)."""
        scratch = sum(t.nbytes for n, t in self._outputs.items() if n not in self._targets)
        heads = sum(n for copies in self._heads.values() for _, _, n in copies)
        return self.rebuilder.resident_bytes + scratch + heads

    def write(self, mix: Mix, buffers: Any = None) -> None:
        """Queue the rebuild of ``mix`` into the engine's device buffers (``buffers``, the host slot,
        is not touched).  Ordered before the engine's next ``publish`` by the shared stream.

        The device buffers are one set whatever the server's slots, so this source keeps
        what they hold itself: a switch launches over the tensors that differ from it only
        (``GpuRebuilder.rebuild``'s ``since``), and copies the head only if another task's."""
        since, self._holds = self._holds, None
        heads = self._heads[head_task(mix)]
        if since is not None and head_task(since) == head_task(mix):
            heads = []
        with self.device.current():
            self.rebuilder.rebuild(mix, self._outputs, sync=self.stream is None, since=since)
            for dst, src, nbytes in heads:
                self.device.copy(dst, src, nbytes)
            if self.stream is None and heads:
                self.device.synchronize()
        self._holds = mix
        self.writes += 1

    def close(self) -> None:
        """Free the scratch and head arenas and the rebuilder's device memory."""
        if self._owned:
            with self.device.current():
                self.device.synchronize()
                for ptr in self._owned:
                    self.device.free(ptr)
            self._owned = []
        self.rebuilder.close()
