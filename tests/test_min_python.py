"""The device-side code must run on JetPack 5's Python 3.8: checked statically by vermin.

Device-side means what a board imports: runtime/, kernels/, jetson/, the CLI in tvswitch/
and examples/. The floor is stated twice, in pyproject.toml's requires-python (what pip
enforces) and in ``tvswitch.jetson.doctor.MIN_PYTHON`` (what doctor reports); they must agree.
"""
import pathlib
import re
import shutil
import subprocess

import pytest

from tvswitch.jetson.doctor import MIN_PYTHON

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE_SIDE = ("runtime", "kernels", "jetson", "tvswitch", "examples")


@pytest.mark.skipif(shutil.which("vermin") is None, reason="vermin not installed (pip install '.[test]')")
def test_device_side_code_runs_on_python_3_8():
    target = "-t=%d.%d-" % MIN_PYTHON
    r = subprocess.run(["vermin", "-q", target, "--no-tips", "--violations", "--eval-annotations", *DEVICE_SIDE],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def requires_python() -> str:
    """pyproject.toml's ``requires-python``, by tomllib where it exists (3.11+), else a regex."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:
        m = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M)
        assert m, "pyproject.toml states no requires-python"
        return m.group(1)
    return tomllib.loads(text)["project"]["requires-python"]


def test_doctor_states_the_floor_pip_enforces():
    spec = requires_python()
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, "requires-python %r is not a plain lower bound" % spec
    assert (int(m.group(1)), int(m.group(2))) == MIN_PYTHON


def _extra(name, python):
    """The requirements of pyproject's extra ``name`` that pip installs under ``python``."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = {}
    for text in extras[name]:
        req = requirements.Requirement(text)
        if req.marker is None or req.marker.evaluate({"python_version": python, "extra": name}):
            out[req.name] = req.specifier
    return out


@pytest.mark.parametrize("python", ["3.8", "3.9", "3.10", "3.11"])
def test_the_cuda_extras_install_a_binding_that_exists_for_each_python(python):
    """cuda-bindings 12 has no Python 3.8 wheels (pip install --dry-run fails under 3.8):
    there the cuda extra is cuda-python 11.8 (cp38 wheels for x86_64 and aarch64), the one
    JetPack 5's CUDA 11.4 driver runs, and the nvrtc12 extra adds nothing (cuda-python 11.8
    loads NVRTC 11 only; JetPack 5's own 11.4 serves). Checked by `pip download
    --python-version 3.8 --only-binary=:all: --platform manylinux2014_aarch64`, see
    docs/jetson.md; this test keeps the markers that make it so."""
    cuda, nvrtc = _extra("cuda", python), _extra("nvrtc12", python)
    if python == "3.8":
        assert list(cuda) == ["cuda-python"] and "11.8.2" in cuda["cuda-python"]
        assert "11.8.6" not in cuda["cuda-python"]  # a shell over cuda-bindings 11.8.6, which has no cp38 wheels
        assert nvrtc == {}
    else:
        assert list(cuda) == ["cuda-bindings"] and "12.9" in cuda["cuda-bindings"]
        assert "13.0" not in cuda["cuda-bindings"]
        assert list(nvrtc) == ["nvidia-cuda-nvrtc-cu12"]
