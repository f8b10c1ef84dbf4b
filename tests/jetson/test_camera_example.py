"""The embedded example runs end to end and keeps serving after a refused switch."""
import importlib.util
import io
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "camera_switch", "camera_switch.py")


def test_camera_switch_example(monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("camera_switch", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr("sys.stdin", io.StringIO("task read_gauge\ntask nope\n"))
    assert mod.main(["--fps", "0", "--frames", "50"]) == 0
    out = capsys.readouterr().out
    assert "switch to read_gauge:" in out and " ms" in out
    assert "switch refused" in out and "still serving read_gauge" in out
