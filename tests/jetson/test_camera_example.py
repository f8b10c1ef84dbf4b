"""The embedded example runs end to end, keeps serving after a refused switch, and takes
its commands from stdin or from a localhost socket."""
import importlib.util
import io
import os
import socket
import threading
import time

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "camera_switch", "camera_switch.py")


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("camera_switch", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_camera_switch_example(example, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("task read_gauge\ntask nope\nmix a=b\nmix =1\n"
                                                 "mix detect_parts=0.5,follow_line=0.5\n"))
    assert example.main(["--fps", "0", "--frames", "50"]) == 0
    out = capsys.readouterr().out
    assert "switch to read_gauge:" in out and " ms" in out
    assert "switch refused" in out and "still serving read_gauge" in out
    assert "got 'a=b'" in out and "got '=1'" in out  # a malformed mix is refused, not a traceback
    assert "switch to detect_parts=0.5,follow_line=0.5:" in out


def test_parse_mix():
    spec = importlib.util.spec_from_file_location("camera_switch_parse", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_mix("read_gauge") == {"read_gauge": 1.0}
    assert mod.parse_mix("a=0.5, b=0.25") == {"a": 0.5, "b": 0.25}
    for bad in ("a=b", "a=1,b", "=1", "a=1=2"):
        with pytest.raises(ValueError, match="NAME=WEIGHT"):
            mod.parse_mix(bad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_commands_over_a_localhost_socket(example, capsys):
    port = _free_port()
    result = {}
    server = threading.Thread(target=lambda: result.setdefault("rc", example.main(["--port", str(port), "--fps", "200"])))
    server.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline, "the example never listened on its port"
            time.sleep(0.05)
    with conn:
        conn.sendall(b"task follow_line\nquit\n")
    server.join(30)
    assert not server.is_alive() and result["rc"] == 0
    out = capsys.readouterr().out
    assert "listening on 127.0.0.1:%d" % port in out and "switch to follow_line:" in out
    with pytest.raises(OSError):  # main closed its port on the way out
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.parametrize("argv,printed", [(["--print-every", "10"], [10, 20, 30]), (["--print-every", "1"], list(range(1, 31))),
                                          (["--fps", "0"], list(range(1, 31)))])
def test_the_frames_it_prints_are_the_ones_the_readme_says(example, monkeypatch, capsys, argv, printed):
    """Every Nth frame prints its inference time and the mean since the last line (N: --print-every,
    by default the frame rate: once a second); stdin stays open, so the run ends at --frames."""
    r, w = os.pipe()
    monkeypatch.setattr("sys.stdin", os.fdopen(r))
    try:
        assert example.main(["--fps", "1000", "--frames", "30"] + argv) == 0
    finally:
        os.close(w)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frame ")]
    assert [int(line.split()[1]) for line in lines] == printed
    gap = printed[1] - printed[0]
    assert all(" infer " in line and "(mean of last %d: " % gap in line for line in lines[1:])
