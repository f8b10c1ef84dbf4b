"""runtime.engines.options: what each engine is given for a provider, and TensorRT's profile."""
import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines.options import engine_options, name_inputs, torch_device

X = {"input": np.zeros((2, 3), np.float32)}


@pytest.mark.parametrize("provider,providers", [(None, ["CPUExecutionProvider"]), ("cpu", ["CPUExecutionProvider"]),
                                                ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])])
def test_onnxruntime_gets_the_providers_of_its_provider(provider, providers):
    inputs, options = engine_options("onnxruntime", X, provider=provider, verbose=True)
    assert options == {"verbose": True, "providers": providers} and list(inputs) == ["input"]


def test_tensorrt_on_the_cpu_is_refused_not_moved():
    with pytest.raises(TvswitchError, match="provider cpu: the tensorrt engine runs on a CUDA GPU only"):
        engine_options("tensorrt", X, provider="cpu")


def test_tensorrt_profile_is_the_inputs_shapes_without_a_graph():
    inputs, options = engine_options("tensorrt", X, fp16=True, plan_cache="plans")
    assert options == {"verbose": False, "fp16": True, "cache_dir": "plans", "profile": {"input": ((2, 3),) * 3}}


def test_a_bare_input_takes_the_networks_only_input_name():
    assert list(name_inputs(X, ["pixels"])) == ["pixels"]
    assert list(name_inputs(X, ["a", "b"])) == ["input"]  # several inputs: the names must be given
    assert list(name_inputs({"a": X["input"]}, ["pixels"])) == ["a"]


def test_the_torch_engine_runs_on_the_cpu_unless_cuda_is_asked_for():
    assert torch_device(None) == torch_device("cpu") == "cpu"
