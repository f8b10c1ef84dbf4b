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
