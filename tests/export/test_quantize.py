import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvswitch.errors import TvswitchError
from tvswitch.export.quantize import dequantize, group_size, parse_granularity, quantize

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 400), elements=finite), bits=st.integers(1, 8),
       group=st.integers(1, 64))
def test_error_is_within_half_a_step(x, bits, group):
    q = quantize(x, bits, group)
    assert q.codes.max() < (1 << bits)
    deq = dequantize(q)
    step = np.repeat(q.params[0::2], group)[: x.size].astype(np.float64)
    g = np.arange(x.size) // group
    ngroups = -(-x.size // group)
    span = np.array([np.abs(x[g == k]).max() for k in range(ngroups)])[g]
    # half a step, plus the float32 rounding of the decode itself
    bound = step / 2 + 4 * np.finfo(np.float32).eps * (span + step * ((1 << bits) - 1))
    assert np.all(np.abs(deq.astype(np.float64) - x) <= bound)


def test_zero_is_exact_and_constant_groups_are_exact():
    x = np.array([-0.3, 0.0, 0.2, 0.7, 0.0], dtype=np.float32)
    assert dequantize(quantize(x, 2, 5))[1] == 0.0
    c = np.full(9, 0.125, dtype=np.float32)
    assert np.array_equal(dequantize(quantize(c, 3, 9)), c)


def test_granularities():
    assert group_size((384, 1536), "tensor") == 384 * 1536
    assert group_size((384, 1536), "channel") == 1536
    assert group_size((384,), "channel") == 384
    assert group_size((10, 10), "group:128") == 100
    assert group_size((10, 30), "group:128") == 128
    for bad in ("rows", "group:0", "group:x"):
        with pytest.raises(TvswitchError, match="--granularity"):
            parse_granularity(bad)


def test_finer_granularity_lowers_error():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (64, 256)) * rng.uniform(0.01, 1, (64, 1))).astype(np.float32)
    err = {g: np.mean((dequantize(quantize(x, 3, group_size(x.shape, g))) - x.reshape(-1)) ** 2)
           for g in ("tensor", "channel", "group:32")}
    assert err["group:32"] < err["channel"] < err["tensor"]


def test_sampled_error_counts_the_part_along_the_task_vector_extra():
    from tvswitch.export.quantize import dequantize, quantize, sampled_error

    rng = np.random.default_rng(4)
    tau = rng.normal(0, 1, 5000)
    tau[0] = 60.0  # an outlier stretches the range: at 1 bit nearly every entry becomes 0
    for bits in (1, 8):
        e = dequantize(quantize(tau, bits, tau.size)).astype(np.float64) - tau
        plain = sampled_error(tau, bits, tau.size, None)
        assert np.isclose(plain, e @ e, rtol=1e-6)
        extra = sampled_error(tau, bits, tau.size, None, along=tau, gain=100.0)
        assert np.isclose(extra, e @ e + 100.0 * (e @ tau) ** 2 / (tau @ tau), rtol=1e-6)
        coherent = (e @ tau) ** 2 / (tau @ tau) / (e @ e)
        assert coherent > 0.4 if bits == 1 else coherent < 0.01  # zeroing is coherent, rounding is not
        idx = np.sort(rng.choice(tau.size, 2000, replace=False))
        assert np.isclose(sampled_error(tau, bits, tau.size, idx, along=tau, gain=100.0), extra, rtol=0.3)
