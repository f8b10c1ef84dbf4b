"""The device-side code must run on JetPack 5's Python 3.8: checked statically by vermin."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("vermin") is None, reason="vermin not installed (pip install '.[test]')")
def test_device_side_code_runs_on_python_3_8():
    r = subprocess.run(["vermin", "-q", "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
                        "runtime", "kernels", "jetson"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
