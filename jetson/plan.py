"""``tvswitch plan``: will this bundle fit this device, what flash it saves, how fast it switches.

Pure arithmetic over a few numbers of the bundle (``BundleFacts``) and a row of the
device table, so every figure is tested without a bundle or a board. The switch time is
the floor of DESIGN.md section 9, bytes >= P * (2 s + sum_i b_i / 8): the rebuild reads
the base and the packed vectors and writes the weights, at the memory's peak bandwidth.
Real switches take longer; the runtime's benchmarks report them as a fraction of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tvswitch.errors import TvswitchError
from tvswitch.jetson.devices import DeviceSpec

MIB = 1 << 20
#: Engine workspace and activations when the user gives none: an assumption, stated as
#: such in every plan. TensorRT's builder defaults to much more; serving needs less.
DEFAULT_WORKSPACE_BYTES = 256 * MIB
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
    file_nbytes: int
    query_nbytes: int = 0
    base_in_bundle: bool = False
    #: packed bytes the largest one-task rebuild reads (RTVQ: the shared base vector too)
    task_read_nbytes: Optional[int] = None
    #: packed bytes a mix of every task reads (each payload once)
    mix_read_nbytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.tasks <= 0 or self.num_shared_params <= 0 or self.base_nbytes <= 0:
            raise TvswitchError("a plan needs at least one task and one shared weight")

    @property
    def weight_itemsize(self) -> float:
        return self.base_nbytes / self.num_shared_params

    @property
    def bits_per_weight_per_task(self) -> float:
        """Storage cost of one task, averaged: 8 RTVQ tasks at 2+3/8 bits give 2.375."""
        return self.packed_nbytes * 8.0 / (self.num_shared_params * self.tasks)


def facts_from_numbers(params: int, itemsize: int, tasks: int, bits_per_task: float, scheme: str = "what-if",
                       query_nbytes: int = 0) -> BundleFacts:
    """Facts for a bundle not exported yet: ``params`` shared weights of ``itemsize`` bytes."""
    packed = int(round(params * bits_per_task * tasks / 8.0))
    return BundleFacts(tasks, scheme, params, params * itemsize, packed, packed, query_nbytes,
                       task_read_nbytes=packed // tasks, mix_read_nbytes=packed)


@dataclass
class Plan:
    device: DeviceSpec
    facts: BundleFacts
    engine: str
    memory: List[Tuple[str, int]]
    total_bytes: int
    budget_bytes: int
    budget_source: str
    flash_bytes: int
    fp16_checkpoints_bytes: int
    switch_one_bytes: int
    switch_mix_bytes: int
    assumptions: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    @property
    def flash_saving(self) -> float:
        """How many times smaller than one FP16 checkpoint per task."""
        return self.fp16_checkpoints_bytes / float(self.flash_bytes)

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
            "flash_bytes": self.flash_bytes,
            "fp16_checkpoints_bytes": self.fp16_checkpoints_bytes,
            "flash_saving": self.flash_saving,
            "switch_floor": {
                "bandwidth_gbs": self.device.bandwidth_gbs,
                "bandwidth_measured": self.device.measured,
                "one_task_bytes": self.switch_one_bytes,
                "one_task_ms": self.switch_one_ms,
                "all_tasks_mix_bytes": self.switch_mix_bytes,
                "all_tasks_mix_ms": self.switch_mix_ms,
            },
            "assumptions": self.assumptions,
        }


def make_plan(
    facts: BundleFacts,
    device: DeviceSpec,
    engine: str = "onnxruntime",
    workspace_bytes: Optional[int] = None,
    reserve_bytes: Optional[int] = None,
    available_bytes: Optional[int] = None,
) -> Plan:
    """The plan of ``facts`` on ``device``.

    ``available_bytes`` (``--device this``: MemAvailable measured now) replaces the
    table's DRAM minus the JetPack line's assumed reserve.
    """
    if engine not in ENGINES:
        raise TvswitchError("unknown engine %r; choose one of %s" % (engine, ", ".join(ENGINES)))
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
        budget, source = available_bytes, "MemAvailable now"
    else:
        line = device.line
        if reserve_bytes is None:
            reserve_bytes = line.reserve_bytes if line else 0
            assumptions.append("OS, carve-outs and CUDA context take %.2f GiB (assumed for JetPack %s; --reserve-mb)"
                               % (reserve_bytes / 2.0 ** 30, device.jetpack or "?"))
        budget = device.dram_bytes - reserve_bytes
        source = "%.2f GiB DRAM - %.2f GiB reserve" % (device.dram_bytes / 2.0 ** 30, reserve_bytes / 2.0 ** 30)

    flash = facts.file_nbytes + (0 if facts.base_in_bundle else facts.base_nbytes)
    fp16 = facts.tasks * facts.num_shared_params * 2
    one = facts.task_read_nbytes
    if one is None:
        one = facts.packed_nbytes // facts.tasks
        assumptions.append("one-task read taken as the per-task average of the packed bytes")
    mix = facts.mix_read_nbytes if facts.mix_read_nbytes is not None else facts.packed_nbytes
    rw = 2 * facts.base_nbytes  # read the base, write the weights
    if not device.measured:
        assumptions.append("switch floor at the data sheet's peak bandwidth; a copy reaches 60-80 % of it")
    return Plan(device, facts, engine, memory, total, budget, source, flash, fp16, rw + one, rw + mix, assumptions)


def _mb(n: int) -> str:
    return "%.1f kB" % (n / 1e3) if abs(n) < 1e6 else "%.1f MB" % (n / 1e6)


def format_text(plan: Plan, label: str) -> str:
    f, d = plan.facts, plan.device
    lines = [
        "plan for %s (%s, %d tasks, %s shared weights of %g bytes, %.3f bits/weight/task)"
        % (label, f.scheme, f.tasks, "{:,}".format(f.num_shared_params), f.weight_itemsize, f.bits_per_weight_per_task),
        "on %s (%s, %s GB/s %s, engine %s)" % (
            d.name, ("JetPack " + d.jetpack) if d.jetpack else "no JetPack", "%.1f" % d.bandwidth_gbs,
            "measured copy" if d.measured else "peak", plan.engine),
        "",
        "memory",
    ]
    for name, n in plan.memory:
        lines.append("  %-34s %10s" % (name, _mb(n)))
    lines.append("  %-34s %10s" % ("total", _mb(plan.total_bytes)))
    lines.append("  %-34s %10s  (%s)" % ("device budget", _mb(plan.budget_bytes), plan.budget_source))
    lines.append("  %-34s %10s  -> %s" % ("headroom", _mb(plan.headroom_bytes), "fits" if plan.fits else "DOES NOT FIT"))
    lines += [
        "",
        "flash",
        "  %-34s %10s" % ("tvswitch (bundle%s)" % ("" if f.base_in_bundle else " + base"), _mb(plan.flash_bytes)),
        "  %-34s %10s  (%.1fx more)" % ("one FP16 checkpoint per task", _mb(plan.fp16_checkpoints_bytes), plan.flash_saving),
        "",
        "switch floor: read base + packed vectors, write weights (DESIGN.md s. 9)",
        "  %-34s %10s  %7.2f ms" % ("one task", _mb(plan.switch_one_bytes), plan.switch_one_ms),
        "  %-34s %10s  %7.2f ms" % ("mix of all %d tasks" % f.tasks, _mb(plan.switch_mix_bytes), plan.switch_mix_ms),
    ]
    if plan.assumptions:
        lines.append("")
        lines += ["assumed: " + a for a in plan.assumptions]
    return "\n".join(lines)
