"""The plan's arithmetic against hand-computed figures (the switch floor, docs/architecture.md)."""
import pytest

from tvswitch.jetson import plan
from tvswitch.jetson.devices import GIB, JETPACK_LINES, lookup
from tvswitch.jetson.errors import JetsonInputError

P = 22_700_000


def facts(**kw):
    return plan.facts_from_numbers(P, 4, 8, 2.375, **kw)


def test_switch_floor_matches_design_formula():
    p = plan.make_plan(facts(), lookup("nano-4gb"))
    packed = P * 2.375 * 8 / 8
    assert p.facts.bits_per_weight_per_task == pytest.approx(2.375, rel=1e-6)
    assert p.switch_mix_bytes == pytest.approx(P * (2 * 4 + 8 * 2.375 / 8), rel=1e-6)
    assert p.switch_one_bytes == pytest.approx(2 * 4 * P + packed / 8, rel=1e-6)
    assert p.switch_mix_ms == pytest.approx(P * (8 + 2.375) / 25.6e9 * 1e3, rel=1e-6)
    faster = plan.make_plan(facts(), lookup("orin-nano-8gb"))
    assert faster.switch_one_ms == pytest.approx(p.switch_one_ms * 25.6 / 68.0)


def test_vit_b32_example_of_design_doc():
    # 88 M fp16 weights, 3 bits: about 385 MB, ~1.9 ms on AGX Orin
    f = plan.facts_from_numbers(88_000_000, 2, 1, 3.0)
    p = plan.make_plan(f, lookup("agx-orin-64gb"))
    assert p.switch_one_bytes / 1e6 == pytest.approx(385, rel=0.01)
    assert p.switch_one_ms == pytest.approx(1.88, abs=0.02)


def test_memory_budget_engine_and_reserve():
    nano = lookup("nano-4gb")
    p = plan.make_plan(facts(), nano)
    assert p.budget_bytes == 3 * GIB and p.fits
    base = P * 4
    trt = plan.make_plan(facts(), nano, engine="tensorrt", workspace_bytes=0)
    ort = plan.make_plan(facts(), nano, engine="onnxruntime", workspace_bytes=0)
    assert trt.total_bytes - ort.total_bytes == base
    assert ort.total_bytes == 2 * base + p.facts.packed_nbytes
    tight = plan.make_plan(facts(), nano, reserve_bytes=4 * GIB - 100)
    assert not tight.fits and tight.headroom_bytes < 0
    measured = plan.make_plan(facts(), nano, available_bytes=10)
    assert measured.budget_source == "MemAvailable now" and not measured.fits


def test_flash_counts_the_base_in_fp16_like_the_checkpoints():
    p = plan.make_plan(facts(), lookup("orin-nano-8gb"))
    assert p.fp16_checkpoints_bytes == 8 * P * 2
    # the base's own dtype (4 bytes here) does not enter: both sides are FP16
    assert p.flash_bytes == p.facts.packed_nbytes + P * 2
    assert p.flash_saving == pytest.approx(8 * 2 / (2.375 + 2), rel=1e-6)
    assert p.task_data_saving == pytest.approx(8 * 2 * 8 / (2.375 * 8), rel=1e-6)
    # a bundle with heads: the checkpoints hold them, and so does the task data
    heads = plan.BundleFacts(8, "rtvq", P, P * 4, 100, 100, 8 * (P + 10) * 2)
    assert plan.make_plan(heads, lookup("orin-nano-8gb")).flash_saving == pytest.approx(8 * (P + 10) * 2 / (100 + 2 * P))


def test_bad_inputs_are_user_errors():
    with pytest.raises(JetsonInputError):
        plan.make_plan(facts(), lookup("nano-4gb"), engine="tflite")
    with pytest.raises(JetsonInputError):
        plan.make_plan(facts(), lookup("nano-4gb"), reserve_bytes=-1)
    with pytest.raises(JetsonInputError):
        plan.BundleFacts(0, "x", 1, 1, 1, 1, 1)
    with pytest.raises(JetsonInputError):
        plan.facts_from_numbers(P, 4, 0, 2.375)  # was a ZeroDivisionError
    with pytest.raises(JetsonInputError):
        plan.facts_from_numbers(P, 4, 8, 0.0)


def test_json_carries_the_figures():
    p = plan.make_plan(facts(), lookup("nano-4gb"))
    d = p.to_dict()
    assert d["fits"] is True and d["switch_floor"]["one_task_ms"] == p.switch_one_ms
    assert d["flash"]["total_bytes"] == p.flash_bytes and d["flash"]["saving_with_base"] == p.flash_saving


def test_a_shared_base_vector_is_read_by_every_switch():
    """RTVQ: 3-bit base vector shared by all tasks, 2-bit offsets each. One task reads both
    (5 bits a weight), not the 2.375-bit average; the mix reads every payload once."""
    rtvq = plan.facts_from_numbers(P, 4, 8, 2.0, shared_bits=3.0)
    assert rtvq.bits_per_weight_per_task == pytest.approx(2.375, rel=1e-6)
    assert rtvq.packed_nbytes == pytest.approx(P * (8 * 2 + 3) / 8, abs=1)
    assert rtvq.task_read_nbytes == pytest.approx(P * 5 / 8, abs=1)
    assert rtvq.mix_read_nbytes == rtvq.packed_nbytes
    p = plan.make_plan(rtvq, lookup("nano-4gb"))
    assert p.switch_one_bytes == pytest.approx(P * (8 + 5 / 8), abs=1)
    # without a shared vector, one task reads its own share only
    tvq = plan.facts_from_numbers(P, 4, 8, 2.0)
    assert tvq.task_read_nbytes == pytest.approx(P * 2 / 8, abs=1)
    with pytest.raises(JetsonInputError):
        plan.facts_from_numbers(P, 4, 8, 2.0, shared_bits=-1)


@pytest.mark.parametrize("name", sorted(JETPACK_LINES))
def test_engine_warnings_follow_the_support_matrix(name):
    line = JETPACK_LINES[name]
    warnings, notes = plan.engine_support("tensorrt", line)
    assert bool(warnings) == (not line.trt_python)
    host_refit_note = any("refits from host memory" in n for n in notes)
    assert host_refit_note == (line.trt_python and not line.device_refit)
    warnings, notes = plan.engine_support("onnxruntime", line)
    assert warnings == [] and bool(notes) == (not line.ort_cuda)
    assert plan.engine_support("torch", line) == ([], [])


def test_tensorrt_on_a_nano_is_planned_with_a_warning():
    p = plan.make_plan(facts(), lookup("nano-4gb"), engine="tensorrt")
    assert p.warnings and "TensorRT 8.2" in p.warnings[0] and "Python 3.6" in p.warnings[0]
    assert p.to_dict()["warnings"] == p.warnings
    assert plan.make_plan(facts(), lookup("orin-nano-8gb"), engine="tensorrt").warnings == []
