"""The CPU library under AddressSanitizer and UBSan: no read or write outside a buffer, no
undefined behaviour, on tables of every code width, mask, group size, raw term and output
dtype, and tables past a buffer refused (the driver of test_aarch64.py, built sanitized and
held to the plain build's bytes)."""
import pathlib
import shutil
import subprocess

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"
DRIVER = pathlib.Path(__file__).resolve().parent / "aarch64" / "driver.c"
FLAGS = ["-O1", "-g", "-std=c99", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-I%s" % KERNELS]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _build(tmp_path, name, extra):
    exe = tmp_path / name
    built = subprocess.run(["gcc", *FLAGS, *extra, str(DRIVER), str(KERNELS / "cpu_rebuild.c"), "-o", str(exe)],
                           capture_output=True, text=True)
    if built.returncode != 0 and extra and "sanitize" in built.stderr:
        pytest.skip("gcc here cannot build with sanitizers: %s" % built.stderr.strip().splitlines()[-1])
    assert built.returncode == 0, built.stderr
    return exe


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_cpu_library_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    plain = subprocess.run([str(_build(tmp_path, "plain", []))], capture_output=True, timeout=600)
    assert plain.returncode == 0, plain.stderr.decode(errors="replace")[-2000:]
    sanitized = subprocess.run([str(_build(tmp_path, "asan", SANITIZE))], capture_output=True, timeout=600,
                               env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert sanitized.returncode == 0, sanitized.stderr.decode(errors="replace")[-3000:]
    assert sanitized.stdout == plain.stdout and len(plain.stdout) > 100000
