"""Detection on captured Jetson trees: each field as the board would report it."""
import os

import pytest

from tvswitch.jetson import devices, memory, packages, power, release
from tvswitch.jetson.platform import detect

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

CASES = {
    # fixture: (device key, L4T, JetPack, line, SoC, CC, CUDA, TensorRT, system python, power mode)
    "nano-4gb-jp46": ("nano-4gb", "32.7.1", "4.6.1", "4.6", "tegra210", (5, 3), "10.2.300", "8.2.1", "3.6.7", "5W"),
    "xavier-nx-jp51": ("xavier-nx-8gb", "35.3.1", "5.1.1", "5.1", "tegra194", (7, 2), "11.4.298", "8.5.2", "3.8.2",
                       "MODE_20W_6CORE"),
    "orin-nano-8gb-jp62": ("orin-nano-8gb-super", "36.4.3", "6.2", "6.2", "tegra234", (8, 7), "12.6.68", "10.3.0.30",
                           "3.10.6", "MAXN_SUPER"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_detects_as_the_board(name):
    key, l4t, jp, line, soc, cc, cuda, trt, py, mode = CASES[name]
    r = detect(os.path.join(FIX, name))
    assert r.is_jetson
    assert (r.device_key, r.l4t, r.jetpack, r.jetpack_line, r.soc) == (key, l4t, jp, line, soc)
    assert r.compute_capability == cc
    assert (r.versions["cuda"], r.versions["tensorrt"], r.python_system) == (cuda, trt, py)
    assert r.power_mode.name == mode
    assert r.memory.total_bytes > 3 * 2 ** 30
    d = r.to_dict()
    assert d["python_system"] == py and d["device_key"] == key


def test_nano_reports_nvmap_and_slow_power_mode():
    r = detect(os.path.join(FIX, "nano-4gb-jp46"))
    assert r.memory.nvmap_used_bytes == 191864 * 1024
    assert r.clocks.at_max is False
    assert any("nvpmodel -m 0" in n for n in r.notes)


def test_x86_says_it_is_not_a_jetson():
    r = detect(os.path.join(FIX, "x86-workstation"))
    assert not r.is_jetson and r.device_key is None
    assert "not a Jetson" in r.summary
    assert r.memory.available_bytes == 28000000 * 1024


def test_this_machine_runs():
    r = detect("/")
    assert r.python_running and r.summary


def test_release_parse_and_jetpack_fallbacks():
    rel = release.parse_release("# R35 (release), REVISION: 6.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x")
    assert rel.version == "35.6.0" and rel.board == "generic"
    assert release.jetpack_for(rel) == ("5.1.4", "L4T 35.6.0")
    unknown = release.parse_release("# R36 (release), REVISION: 9.9")
    assert release.jetpack_for(unknown)[0] == "6.2.x"
    assert release.jetpack_for(rel, "5.1.4-b17")[0] == "5.1.4"
    assert release.parse_release("Ubuntu 22.04") is None


def test_dpkg_picks_installed_and_newest():
    text = ("Package: libnvinfer8\nStatus: deinstall ok config-files\nVersion: 8.2.1-1+cuda10.2\n\n"
            "Package: libnvinfer10\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda12.5\n\n"
            "Package: cuda-cudart-11-4\nStatus: install ok installed\nVersion: 11.4.298-1\n\n"
            "Package: cuda-cudart-12-6\nStatus: install ok installed\nVersion: 12.6.68-1\n")
    v = packages.component_versions(packages.parse_status(text))
    assert v == {"tensorrt": "10.3.0.30", "cuda": "12.6.68"}


def test_nvpmodel_query_and_fastest_mode():
    with open(os.path.join(FIX, "nano-4gb-jp46", "nvpmodel-q.txt")) as f:
        q = power.parse_query(f.read())
    assert (q.id, q.name) == (1, "5W")
    assert power.fastest_mode({0: "15W", 1: "25W", 2: "MAXN_SUPER", 3: "MAXN"}) == 2
    assert power.fastest_mode({0: "MODE_10W"}) is None


def test_meminfo_units():
    m = memory.parse_meminfo("MemTotal: 10 kB\nHugePages_Total: 3\n")
    assert m == {"MemTotal": 10240, "HugePages_Total": 3}


def test_device_table_is_consistent():
    for spec in devices.DEVICES.values():
        assert spec.line is not None, spec.key
        assert devices.SOC_COMPUTE_CAPABILITY[spec.soc] == spec.compute_capability
        assert spec.bandwidth_gbs > 20
    assert devices.lookup("nano-4gb").bandwidth_gbs == 25.6
    assert devices.match_board([], "tegra210", int(3.9 * 2 ** 30)).key == "nano-4gb"
    assert "this" in devices.device_keys()
    with pytest.raises(Exception, match="unknown device"):
        devices.lookup("nano-8gb")
