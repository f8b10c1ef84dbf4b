"""``tvswitch plan``: will this bundle fit this device, what flash it saves, how fast it switches.

Pure arithmetic over a few numbers of the bundle (``BundleFacts``) and a row of the
device table, so every figure is tested without a bundle or a board. The switch time is
the switch floor of docs/architecture.md, bytes >= P * (2 s + sum_i b_i / 8): the rebuild reads
the base and the packed vectors and writes the weights, at the memory's peak bandwidth.
Real switches take longer; the runtime's benchmarks report them as a fraction of it.

Flash is compared in one dtype on both sides: tvswitch's task data plus the base in FP16
against one FP16 checkpoint per task (each holding the shared weights and the task's own
head), so the ratio does not mix an FP32 base with FP16 checkpoints. The task data alone
against the same checkpoints is the ratio ``tvswitch inspect`` prints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tvswitch.jetson.devices import DeviceSpec, JetPackLine
from tvswitch.jetson.errors import JetsonInputError

MIB = 1 << 20
#: Engine workspace and activations when the user gives none: an assumption, stated as
#: such in every plan. TensorRT's builder defaults to much more; serving needs less.
DEFAULT_WORKSPACE_BYTES = 256 * MIB
#: The runtime's engines (runtime.engines.base.ENGINE_KINDS): a leaf keeps its own copy,
#: which tests/jetson/test_leaf.py holds equal.
ENGINES = ("onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True)
class BundleFacts:
    """The numbers of a bundle that a plan needs (``runtime.bundle.Bundle`` has them all)."""

    tasks: int
    scheme: str
    num_shared_params: int
    #: the shared (rebuilt) tensors at their dtype: base and rebuilt buffer are this size
    base_nbytes: int
    #: packed task data held resident: all tasks' vectors and task-specific tensors
    packed_nbytes: int
    #: the bundle on flash without an embedded base (``inspect``'s "task data")
    task_data_nbytes: int
    #: one FP16 checkpoint per task: shared weights plus that task's own tensors, 2 bytes each
    fp16_checkpoints_nbytes: int
    query_nbytes: int = 0
    #: packed bytes the largest one-task rebuild reads (RTVQ: the shared base vector too)
    task_read_nbytes: Optional[int] = None
    #: packed bytes a mix of every task reads (each payload once)
    mix_read_nbytes: Optional[int] = None
    #: the serving graph on flash (an ONNX file; 0: none counted)
    graph_nbytes: int = 0

    def __post_init__(self) -> None:
        if self.tasks <= 0 or self.num_shared_params <= 0 or self.base_nbytes <= 0:
            raise JetsonInputError("a plan needs at least one task and one shared weight")

    @property
    def weight_itemsize(self) -> float:
        return self.base_nbytes / self.num_shared_params

    @property
    def bits_per_weight_per_task(self) -> float:
        """Storage cost of one task, averaged: 8 RTVQ tasks at 2+3/8 bits give 2.375."""
        return self.packed_nbytes * 8.0 / (self.num_shared_params * self.tasks)


def facts_from_numbers(params: int, itemsize: int, tasks: int, bits_per_task: float, scheme: str = "what-if",
                       query_nbytes: int = 0, shared_bits: float = 0.0) -> BundleFacts:
    """Facts for a bundle not exported yet: ``params`` shared weights of ``itemsize`` bytes, no heads.

    Each task stores ``bits_per_task`` bits a weight of its own; ``shared_bits`` are those of
    a vector every task shares (RTVQ's base vector: 3 bits, with 2-bit offsets per task).
    Every switch reads the shared vector, so a one-task switch reads
    ``bits_per_task + shared_bits`` bits a weight, not the per-task average.
    """
    if tasks <= 0 or params <= 0 or itemsize <= 0 or bits_per_task <= 0:
        raise JetsonInputError("a what-if plan needs positive weights, tasks and bits per weight")
    if shared_bits < 0:
        raise JetsonInputError("a what-if plan's shared bits per weight cannot be negative")
    packed = int(round(params * (bits_per_task * tasks + shared_bits) / 8.0))
    one = int(round(params * (bits_per_task + shared_bits) / 8.0))
    return BundleFacts(tasks, scheme, params, params * itemsize, packed, packed, tasks * params * 2, query_nbytes,
                       task_read_nbytes=one, mix_read_nbytes=packed)


@dataclass
class Plan:
    device: DeviceSpec
    facts: BundleFacts
    engine: str
    memory: List[Tuple[str, int]]
    total_bytes: int
    budget_bytes: int
    budget_source: str
    #: tvswitch on flash: the task data, the serving graph and the base in FP16 (the checkpoints' dtype)
    flash_bytes: int
    fp16_checkpoints_bytes: int
    switch_one_bytes: int
    switch_mix_bytes: int
    assumptions: List[str] = field(default_factory=list)
    #: the engine cannot run on the device's JetPack line as shipped (docs/jetson.md's matrix)
    warnings: List[str] = field(default_factory=list)
    #: what the engine costs there beyond these figures
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    @property
    def base_fp16_bytes(self) -> int:
        return self.facts.num_shared_params * 2

    @property
    def shipped_bytes(self) -> int:
        """What a device stores as shipped: the task data, the graph and the base at its own dtype."""
        return self.facts.task_data_nbytes + self.facts.graph_nbytes + self.facts.base_nbytes

    @property
    def fp32_checkpoints_bytes(self) -> int:
        return 2 * self.fp16_checkpoints_bytes

    @property
    def flash_saving(self) -> float:
        """One FP16 checkpoint per task over tvswitch's flash, the base counted in FP16 too."""
        return self.fp16_checkpoints_bytes / float(self.flash_bytes)

    @property
    def task_data_saving(self) -> float:
        """One FP16 checkpoint per task over the task data alone: ``tvswitch inspect``'s ratio."""
        return self.fp16_checkpoints_bytes / float(self.facts.task_data_nbytes)

    def _ms(self, nbytes: int) -> float:
        return nbytes / (self.device.bandwidth_gbs * 1e9) * 1e3

    @property
    def switch_one_ms(self) -> float:
        return self._ms(self.switch_one_bytes)

    @property
    def switch_mix_ms(self) -> float:
        return self._ms(self.switch_mix_bytes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "device": asdict(self.device),
            "bundle": asdict(self.facts),
            "bits_per_weight_per_task": self.facts.bits_per_weight_per_task,
            "engine": self.engine,
            "memory": {label: n for label, n in self.memory},
            "memory_total_bytes": self.total_bytes,
            "memory_budget_bytes": self.budget_bytes,
            "memory_budget_source": self.budget_source,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "flash": {
                "task_data_bytes": self.facts.task_data_nbytes,
                "graph_bytes": self.facts.graph_nbytes,
                "base_fp16_bytes": self.base_fp16_bytes,
                "total_bytes": self.flash_bytes,
                "shipped_bytes": self.shipped_bytes,
                "fp16_checkpoints_bytes": self.fp16_checkpoints_bytes,
                "fp32_checkpoints_bytes": self.fp32_checkpoints_bytes,
                "saving_with_base": self.flash_saving,
                "saving_task_data": self.task_data_saving,
            },
            "switch_floor": {
                "bandwidth_gbs": self.device.bandwidth_gbs,
                "bandwidth_measured": self.device.measured,
                "one_task_bytes": self.switch_one_bytes,
                "one_task_ms": self.switch_one_ms,
                "all_tasks_mix_bytes": self.switch_mix_bytes,
                "all_tasks_mix_ms": self.switch_mix_ms,
            },
            "assumptions": self.assumptions,
            "warnings": self.warnings,
            "notes": self.notes,
        }


def engine_support(engine: str, line: Optional[JetPackLine]) -> Tuple[List[str], List[str]]:
    """(warnings, notes) of ``engine`` on ``line``, from the support matrix of ``devices``.

    A warning means the engine does not run there as shipped; a plan is still printed,
    since a user may build what is missing (TensorRT's bindings for Python 3.8 on a
    Nano), but it must not read as a deployment that works.
    """
    if line is None:
        return [], []
    warnings, notes = [], []  # type: List[str], List[str]
    py = "%d.%d" % line.python
    if engine == "tensorrt":
        if not line.trt_python:
            warnings.append("TensorRT does not run with tvswitch on JetPack %s: TensorRT %s's Python bindings are "
                            "built for Python %s, which tvswitch does not run on; serve with --engine onnxruntime "
                            "(CPU), or build TensorRT's bindings for Python 3.8 yourself (docs/jetson.md)"
                            % (line.name, line.tensorrt, py))
        elif not line.device_refit:
            notes.append("TensorRT %s on JetPack %s refits from host memory only: every switch also copies the "
                         "rebuilt weights into the engine, which the switch floor below leaves out"
                         % (line.tensorrt, line.name))
    elif engine == "onnxruntime" and not line.ort_cuda:
        notes.append("ONNX Runtime on JetPack %s has no CUDA build for the Python tvswitch runs on: it serves "
                     "from the CPU" % line.name)
    return warnings, notes


def make_plan(
    facts: BundleFacts,
    device: DeviceSpec,
    engine: str = "onnxruntime",
    workspace_bytes: Optional[int] = None,
    reserve_bytes: Optional[int] = None,
    available_bytes: Optional[int] = None,
    available_source: str = "MemAvailable now",
) -> Plan:
    """The plan of ``facts`` on ``device``.

    ``available_bytes`` (``--device this``: what is free now, ``available_source`` says
    how it was counted) replaces the table's DRAM minus the JetPack line's assumed reserve.
    """
    if engine not in ENGINES:
        raise JetsonInputError("unknown engine %r; choose one of %s" % (engine, ", ".join(ENGINES)))
    if (workspace_bytes or 0) < 0 or (reserve_bytes or 0) < 0:
        raise JetsonInputError("engine workspace and memory reserve cannot be negative")
    assumptions = []  # type: List[str]
    if workspace_bytes is None:
        workspace_bytes = DEFAULT_WORKSPACE_BYTES
        assumptions.append("engine workspace and activations: %d MiB assumed (--workspace-mb)" % (workspace_bytes // MIB))
    memory = [
        ("base weights", facts.base_nbytes),
        ("packed task vectors (resident)", facts.packed_nbytes),
        ("rebuilt weights", facts.base_nbytes),
    ]
    if engine == "tensorrt":
        # a refittable engine keeps its own copy of every weight besides our buffer
        memory.append(("TensorRT engine's weight copy", facts.base_nbytes))
    memory.append(("engine workspace", workspace_bytes))
    memory.append(("query sets (Auto-Switch)", facts.query_nbytes))
    total = sum(n for _, n in memory)

    if available_bytes is not None:
        budget, source = available_bytes, available_source
    else:
        line = device.line
        if reserve_bytes is None:
            reserve_bytes = line.reserve_bytes if line else 0
            assumptions.append("OS, carve-outs and CUDA context take %.2f GiB (assumed for JetPack %s; --reserve-mb)"
                               % (reserve_bytes / 2.0 ** 30, device.jetpack or "?"))
        budget = device.dram_bytes - reserve_bytes
        source = "%.2f GiB DRAM - %.2f GiB reserve" % (device.dram_bytes / 2.0 ** 30, reserve_bytes / 2.0 ** 30)

    flash = facts.task_data_nbytes + facts.graph_nbytes + facts.num_shared_params * 2
    one = facts.task_read_nbytes
    if one is None:
        one = facts.packed_nbytes // facts.tasks
        assumptions.append("one-task read taken as the per-task average of the packed bytes")
    mix = facts.mix_read_nbytes if facts.mix_read_nbytes is not None else facts.packed_nbytes
    rw = 2 * facts.base_nbytes  # read the base, write the weights
    if not device.measured:
        assumptions.append("switch floor at the data sheet's peak bandwidth; a copy reaches 60-80 % of it")
    warnings, notes = engine_support(engine, device.line)
    return Plan(device, facts, engine, memory, total, budget, source, flash, facts.fp16_checkpoints_nbytes, rw + one,
                rw + mix, assumptions, warnings, notes)

