"""Every kernel compiles for every target through NVRTC, and decode.h is portable C and C++.

NVRTC needs no GPU, so this runs in CI: the cu12 wheel is the one that still reaches the
Jetson targets sm_53/62/72 (CUDA 13 dropped them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tvswitch.kernels import build_fatbins, nvrtc

#: The targets of docs/kernels.md (Targets and loading): Nano, TX2, Xavier, Orin, then x86 sm_75..sm_90.
TARGETS = ("sm_53", "sm_62", "sm_72", "sm_87", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")


def _nvrtc_or_skip() -> None:
    try:
        nvrtc.nvrtc_version()
    except nvrtc.KernelBuildError as exc:
        pytest.skip("NVRTC is not usable here: %s" % exc)


@pytest.mark.parametrize("arch", TARGETS)
def test_every_kernel_compiles_to_a_cubin(arch):
    _nvrtc_or_skip()
    image = nvrtc.compile_kernels(arch, "cubin")
    assert image[:4] == b"\x7fELF"
    for name in nvrtc.KERNELS.values():
        assert name.encode() + b"\0" in image, "%s is missing from the %s cubin" % (name, arch)


def test_ptx_holds_every_kernel_for_the_oldest_target():
    _nvrtc_or_skip()
    ptx = nvrtc.compile_kernels("sm_53", "ptx").decode()
    assert ".target sm_53" in ptx
    for name in nvrtc.KERNELS.values():
        assert ".entry " + name in ptx
    assert "fma.rn.f32" not in ptx, "a multiply-add was contracted: --fmad=false is not in effect"


def test_a_compile_error_carries_nvrtc_log():
    _nvrtc_or_skip()
    with pytest.raises(nvrtc.KernelBuildError, match="rebuild.cu.*sm_87"):
        nvrtc.compile_kernels("sm_87", extra=["-Duint32_t=@"])


def test_compiled_images_are_cached_per_arch_and_source(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    monkeypatch.setenv("TVSWITCH_CACHE", str(tmp_path))
    calls = []
    real = nvrtc.compile_kernels
    monkeypatch.setattr(nvrtc, "compile_kernels", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = nvrtc.cached_compile("sm_87")
    again = nvrtc.cached_compile("sm_87")
    assert first == again and len(calls) == 1
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith("rebuild-sm_87-nvrtc") and nvrtc.source_digest()[:16] in cached


def test_images_are_picked_by_compute_capability():
    images = {"sm_53": "a", "sm_80": "b", "sm_87": "c", "compute_53": "p"}
    assert nvrtc.exact_cubin(images, (8, 7)) == "sm_87"
    assert nvrtc.exact_cubin(images, (8, 6)) is None  # only the exact architecture beats NVRTC
    assert nvrtc.compatible_cubin(images, (8, 6)) == "sm_80"  # an sm_80 cubin runs on 8.6
    assert nvrtc.compatible_cubin(images, (7, 5)) is None
    assert nvrtc.ptx_not_above(images, (7, 5)) == "compute_53"  # the driver JITs the PTX
    assert nvrtc.ptx_not_above(images, (5, 0)) is None
    assert nvrtc.arch_number("compute_90") == nvrtc.arch_number((9, 0)) == 90
    with pytest.raises(ValueError):
        nvrtc.arch_number("sm_eighty")


def _folder(root, name, images):
    """A prebuilt folder of this source holding fake images (their bytes name them)."""
    folder = root / name
    folder.mkdir()
    files = {}
    for arch in images:
        files[arch] = "%s-%s.img" % (name, arch)
        (folder / files[arch]).write_bytes(("%s/%s" % (name, arch)).encode())
    (folder / "index.json").write_text(json.dumps({"digest": nvrtc.source_digest(), "images": files}))
    return str(folder)


@pytest.fixture
def loader(tmp_path, monkeypatch):
    """kernel_image over fake prebuilt folders, with NVRTC present (sm_50..sm_90) or absent."""
    def setup(folders, nvrtc_works):
        dirs = [_folder(tmp_path, n, imgs) for n, imgs in folders]
        monkeypatch.setattr(nvrtc, "prebuilt_dirs", lambda: dirs)

        def archs():
            if not nvrtc_works:
                raise nvrtc.KernelBuildError("NVRTC needs cuda-python (simulated)")
            return [50, 53, 60, 62, 70, 72, 75, 80, 86, 87, 89, 90]

        monkeypatch.setattr(nvrtc, "supported_archs", archs)
        monkeypatch.setattr(nvrtc, "cached_compile", lambda arch, output="cubin": ("nvrtc/%s%d" % (
            "sm_" if output == "cubin" else "compute_", arch)).encode())
        monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (12, 9))
        return lambda cc: nvrtc.kernel_image(cc)[0].decode()
    return setup


def test_older_prebuilt_images_never_win_over_nvrtc(loader):
    ptx_only = [("old", ["compute_53"])]
    assert loader(ptx_only, True)((8, 7)) == "nvrtc/sm_87"  # not the sm_53 PTX, JIT-compiled
    assert loader([("x", ["sm_80"])], True)((8, 6)) == "nvrtc/sm_86"  # nor a lower minor's cubin


def test_an_exact_cubin_wins_from_any_folder(loader):
    pick = loader([("first", ["compute_53", "sm_80"]), ("second", ["sm_87"])], True)
    assert pick((8, 7)) == "second/sm_87"


def test_without_nvrtc_a_compatible_cubin_then_ptx_not_above_the_device(loader):
    pick = loader([("jp4", ["sm_53", "sm_62", "compute_53"]), ("x86", ["sm_80", "compute_80"])], False)
    assert pick((6, 2)) == "jp4/sm_62"
    assert pick((8, 6)) == "x86/sm_80"  # same major, lower minor
    assert pick((7, 2)) == "jp4/compute_53"  # the newest PTX not above 7.2 (compute_80 is above)


def test_without_nvrtc_and_no_fitting_image_the_error_says_both(loader):
    pick = loader([("new", ["compute_90"])], False)
    with pytest.raises(nvrtc.KernelBuildError, match="no prebuilt kernel image runs on sm_87.*simulated"):
        pick((8, 7))


def test_build_fatbins_writes_images_an_index_and_is_found(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    out = tmp_path / "k"
    assert build_fatbins.main(["--out", str(out), "--arch", "sm_87,sm_53"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["digest"] == nvrtc.source_digest()
    assert sorted(index["images"]) == ["compute_53", "sm_53", "sm_87"]
    monkeypatch.setenv("TVSWITCH_KERNELS", str(out))
    image, where = nvrtc.kernel_image((8, 7))
    assert where == str(out / "tvswitch-rebuild-sm_87.cubin") and image[:4] == b"\x7fELF"
    # A shipped image of another source is never used.
    index["digest"] = "0" * 64
    (out / "index.json").write_text(json.dumps(index))
    assert nvrtc.prebuilt_image((8, 7)) is None


@pytest.mark.parametrize("compiler,flags", [
    ("gcc", ["-x", "c", "-std=c99", "-pedantic"]),
    ("g++", ["-x", "c++", "-std=c++11"]),
])
def test_decode_h_is_portable_host_code(tmp_path, compiler, flags):
    cc = shutil.which(compiler)
    if cc is None:
        pytest.skip("%s is not installed" % compiler)
    src = tmp_path / "use.c"
    src.write_text('#include "decode.h"\n'
                   "float f(const tv_segment *s, const tv_term *t, uint32_t i) {\n"
                   "    return tv_rebuild_element(s, t, i) + tv_half_to_float(tv_float_to_half(1.5f))\n"
                   "           + tv_bf16_to_float(tv_float_to_bf16(2.5f));\n}\n")
    run = subprocess.run([cc, *flags, "-Wall", "-Wextra", "-Werror", "-I", nvrtc.HERE, "-c", str(src),
                          "-o", str(tmp_path / "use.o")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
