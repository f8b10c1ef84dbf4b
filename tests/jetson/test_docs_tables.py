"""docs/jetson.md prints the device table and the support matrix of jetson/devices.py: a
number changed in one place and not the other fails here."""
import os
import re

import pytest

from tvswitch.jetson.devices import DEVICES, JETPACK_LINES, X86_INSTALL

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "jetson.md")


def table_after(heading):
    """The first markdown table under ``heading``, as rows of stripped cells."""
    with open(DOC) as f:
        text = f.read()
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [r for r in rows if not set("".join(r)) <= set("-: ")]  # drop the |---| line


def test_the_device_table_is_the_codes():
    header, *rows = table_after("## The device table")
    assert header == ["key", "module", "CC", "DRAM GiB", "peak GB/s", "JetPack"]
    got = {r[0]: r[1:] for r in rows}
    want = {d.key: [d.name, "%d.%d" % d.compute_capability, "%g" % (d.dram_bytes / 2 ** 30), "%g" % d.bandwidth_gbs,
                    d.jetpack] for d in DEVICES.values()}
    assert got == want


def _matrix():
    header, *rows = table_after("## Support matrix")
    by_row = {r[0]: r[1:] for r in rows}
    columns = {}
    for name in JETPACK_LINES:
        hits = [i for i, h in enumerate(header[1:]) if re.search(r"JetPack [\d./]*\b%s\b" % re.escape(name), h)]
        assert len(hits) == 1, "no single column for JetPack %s in %s" % (name, header)
        columns[name] = hits[0]
    return by_row, columns


@pytest.mark.parametrize("name", sorted(JETPACK_LINES))
def test_the_support_matrix_is_the_codes(name):
    line = JETPACK_LINES[name]
    rows, columns = _matrix()
    cell = {row: cells[columns[name]] for row, cells in rows.items()}
    assert cell["L4T / Ubuntu"].startswith(line.l4t_name) and cell["L4T / Ubuntu"].endswith("/ " + line.ubuntu)
    assert cell["CUDA / cuDNN / TensorRT"] == "%s / %s / %s" % (line.cuda, line.cudnn, line.tensorrt)
    assert cell["system Python"].startswith("%d.%d" % line.python)
    kernels = cell["CUDA kernels through"]
    assert (line.cuda_python or "pycuda") in kernels
    assert ("NVRTC %s" % line.nvrtc in kernels) if line.nvrtc else "NVRTC" not in kernels
    refit = cell["TensorRT refit"]
    if not line.trt_python:  # what plan --engine tensorrt warns about
        assert refit.startswith("no")
    else:
        assert ("from device memory (%s)" if line.device_refit else "from host memory (%s)") % line.tensorrt == refit


def test_the_install_table_is_the_codes():
    """The install advice doctor prints is the docs' table, line by line and for x86."""
    header, *rows = table_after("## Installing the CUDA kernels' bindings")
    assert header == ["", "driver API", "NVRTC"]
    got = {r[0]: r[1:] for r in rows}
    want = {"JetPack " + name: [line.install.driver, line.install.nvrtc] for name, line in JETPACK_LINES.items()}
    want["x86"] = [X86_INSTALL.driver, X86_INSTALL.nvrtc]
    assert got == want
