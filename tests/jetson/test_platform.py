"""Detection on captured Jetson trees: each field as the board would report it."""
import os

import pytest

from tvswitch.jetson import devices, memory, packages, power, release
from tvswitch.jetson.errors import JetsonInputError
from tvswitch.jetson.platform import detect

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

CASES = {
    # fixture: (device key, L4T, JetPack, line, SoC, CC, CUDA, TensorRT, system python, power mode)
    "nano-4gb-jp46": ("nano-4gb", "32.7.1", "4.6.1", "4.6", "tegra210", (5, 3), "10.2.300", "8.2.1", "3.6.7", "5W"),
    "xavier-nx-jp51": ("xavier-nx-8gb", "35.3.1", "5.1.1", "5.1", "tegra194", (7, 2), "11.4.298", "8.5.2", "3.8.2",
                       "MODE_20W_6CORE"),
    "agx-orin-64gb-jp60": ("agx-orin-64gb", "36.3.0", "6.0", "6.0", "tegra234", (8, 7), "12.2.140", "8.6.2.3", "3.10.6",
                           "MAXN"),
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_stock_tree_has_no_version_notes(name):
    """Each tree runs its line's stock CUDA, cuDNN and TensorRT: no note may say otherwise."""
    notes = detect(os.path.join(FIX, name)).notes
    assert not [n for n in notes if "differs" in n or "not found" in n], notes


def test_a_hand_changed_stack_is_noted(tmp_path):
    status = tmp_path / "var" / "lib" / "dpkg"
    status.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic\n")
    (status / "status").write_text("Package: libnvinfer10\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda12.5\n")
    notes = detect(str(tmp_path)).notes
    assert any("tensorrt 10.3.0.30 differs from JetPack 6.0's 8.6" in n for n in notes), notes


def test_l4t_releases_map_to_their_jetpack_line():
    lines = {"32.7.1": "4.6", "35.2.1": "5.1", "35.6.0": "5.1", "36.2.0": "6.0", "36.3.0": "6.0",
             "36.4.0": "6.2", "36.4.3": "6.2", "36.4.4": "6.2"}
    for version, line in lines.items():
        major, minor, _ = version.split(".")
        assert devices.line_for_l4t(int(major), int(minor)).name == line, version
    # JetPack 4.6.0 (R32.6, TensorRT 8.0) and 5.0.2 (R35.1, TensorRT 8.4) predate the lines' stacks
    assert devices.line_for_l4t(32, 6) is None and devices.line_for_l4t(35, 1) is None
    old = release.parse_release("# R35 (release), REVISION: 1.0, GCID: 31346300, BOARD: t186ref, EABI: aarch64")
    assert old.line is None and release.jetpack_for(old) == ("5.0.2", "L4T 35.1.0")


def test_an_uncovered_release_says_so(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t210ref\n")
    r = detect(str(tmp_path))
    assert r.is_jetson and r.jetpack == "4.6" and r.jetpack_line is None
    assert any("L4T 32.6.1 is in none of the JetPack lines" in n for n in r.notes)


def test_clocks_compare_with_the_power_modes_caps():
    # the Xavier tree runs at its 20W_6CORE caps (1.42 GHz of the silicon's 1.91): at max
    xavier = detect(os.path.join(FIX, "xavier-nx-jp51")).clocks
    assert xavier.cpu_max_khz == [1420800] * 6 and xavier.at_max is True
    # the Nano's CPUs sit at the 5W cap but its GPU does not; the Orin Nano's CPUs idle
    assert detect(os.path.join(FIX, "nano-4gb-jp46")).clocks.at_max is False
    orin = detect(os.path.join(FIX, "orin-nano-8gb-jp62")).clocks
    assert orin.cpu_cur_khz[0] < orin.cpu_max_khz[0] and orin.at_max is False


def test_nano_reports_nvmap_and_slow_power_mode():
    r = detect(os.path.join(FIX, "nano-4gb-jp46"))
    assert r.memory.nvmap_used_bytes == 191864 * 1024
    assert r.clocks.gpu_node == "57000000.gpu"
    assert any("nvpmodel -m 0" in n for n in r.notes)


def test_x86_says_it_is_not_a_jetson():
    r = detect(os.path.join(FIX, "x86-workstation"))
    assert not r.is_jetson and r.device_key is None
    assert "not a Jetson (the tree under" in r.summary
    assert r.memory.available_bytes == 28000000 * 1024


def test_a_missing_root_is_refused():
    with pytest.raises(JetsonInputError, match="/nonexistent: no such folder"):
        detect("/nonexistent")


def test_this_machine_runs():
    r = detect("/")
    assert r.python_running and r.summary


def test_release_parse_and_jetpack_fallbacks():
    rel = release.parse_release("# R35 (release), REVISION: 6.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x")
    assert rel.version == "35.6.0" and rel.board == "generic"
    assert release.jetpack_for(rel) == ("5.1.4", "L4T 35.6.0")
    unknown = release.parse_release("# R36 (release), REVISION: 9.9")
    assert release.jetpack_for(unknown) == ("6.2.x", "L4T R36.4 line")
    assert release.jetpack_for(rel, "5.1.4-b17")[0] == "5.1.4"
    assert release.parse_release("Ubuntu 22.04") is None


def test_release_file_with_more_lines():
    with open(os.path.join(FIX, "orin-nano-8gb-jp62", "etc", "nv_tegra_release")) as f:
        r36 = f.read()
    assert len(r36.splitlines()) == 4 and release.parse_release(r36).version == "36.4.3"
    # the older form: the release line, then sha1 sums of the Tegra libraries
    sums = ("# R32 (release), REVISION: 1.0, GCID: 14531094, BOARD: t210ref, EABI: aarch64, DATE: Wed Mar 13 2019\n"
            "0c165125388fbd943e7f8b37a272dec7c5d57c15 */usr/lib/aarch64-linux-gnu/tegra/libnvmm.so\n")
    rel = release.parse_release(sums)
    assert (rel.version, rel.board, rel.date) == ("32.1.0", "t210ref", "Wed Mar 13 2019")


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
    parts = [p for spec in devices.DEVICES.values() for p in spec.parts]
    assert len(parts) == len(set(parts)), "a part number names two rows"
    assert devices.lookup("nano-4gb").bandwidth_gbs == 25.6
    assert "this" in devices.device_keys()
    with pytest.raises(JetsonInputError, match="unknown device"):
        devices.lookup("nano-8gb")


def test_part_numbers_pick_the_module_that_has_them():
    assert devices.match_board(["p2822-0000", "p2888-0001"], "tegra194", None).key == "agx-xavier-16gb"
    assert devices.match_board(["p3737-0000", "p3701-0000"], "tegra234", None).key == "agx-orin-32gb"
    assert devices.match_board(["p3489-0888"], "tegra186", None).key == "tx2-4gb"


def test_memory_fallback_refuses_to_guess_between_modules():
    gib = 2 ** 30
    assert devices.match_board([], "tegra210", int(3.9 * gib)).key == "nano-4gb"
    # 15.5 GiB on a Xavier: an NX 16GB (59.7 GB/s) or an AGX 16GB (136.5 GB/s)
    assert devices.match_board([], "tegra194", int(15.5 * gib)) is None
    assert devices.match_board([], "tegra194", int(31 * gib)).key == "agx-xavier-32gb"


def _orin_nano_4gb(tmp_path, mode):
    """The Orin Nano 8GB tree with a 4GB module's part number and memory, in power mode ``mode``."""
    import shutil

    root = tmp_path / "orin-nano-4gb"
    shutil.copytree(os.path.join(FIX, "orin-nano-8gb-jp62"), str(root))
    (root / "proc" / "device-tree" / "compatible").write_bytes(
        b"nvidia,p3768-0000+p3767-0004-super\0nvidia,p3767-0004\0nvidia,tegra234\0")
    (root / "proc" / "meminfo").write_text("MemTotal:        3735000 kB\nMemFree:   2000000 kB\n"
                                           "MemAvailable:    2600000 kB\n")
    (root / "var" / "lib" / "nvpmodel" / "status").write_text("pmode:%04d fmode:quiet\n" % mode)
    return str(root)


@pytest.mark.parametrize("mode,key,gbs", [(2, "orin-nano-4gb-super", 51.0), (0, "orin-nano-4gb", 34.0)])
def test_orin_nano_4gb_in_maxn_super_gets_the_super_bandwidth(tmp_path, mode, key, gbs):
    r = detect(_orin_nano_4gb(tmp_path, mode))
    assert r.device_key == key and devices.lookup(key).bandwidth_gbs == gbs
    assert devices.lookup(key).dram_bytes == 4 * 2 ** 30


def test_every_super_row_is_its_module_faster():
    for key, spec in devices.DEVICES.items():
        if key.endswith("-super"):
            plain = devices.lookup(key[:-len("-super")])
            assert (spec.soc, spec.dram_bytes, spec.compute_capability) == (plain.soc, plain.dram_bytes,
                                                                             plain.compute_capability)
            assert spec.bandwidth_gbs == pytest.approx(plain.bandwidth_gbs * 1.5, rel=0.01)
            assert "-super" in plain.note


@pytest.mark.parametrize("name,usable_kb", [("nano-4gb-jp46", 3128712 + 27408), ("xavier-nx-jp51", 6627520),
                                            ("orin-nano-8gb-jp62", 6103388), ("agx-orin-64gb-jp60", 60927104)])
def test_usable_memory_adds_nvmaps_unused_pool(name, usable_kb):
    m = detect(os.path.join(FIX, name)).memory
    assert m.usable_bytes == usable_kb * 1024
    assert detect(os.path.join(FIX, name)).to_dict()["memory"]["usable_bytes"] == usable_kb * 1024
