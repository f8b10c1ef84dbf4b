"""The CPU library built for aarch64 (a Jetson's CPU) computes what the x86 build does.

Built with a cross compiler and run under qemu; skipped where those are not installed
(Debian: apt-get install gcc-aarch64-linux-gnu qemu-user).  The driver first holds each
build's SIMD rows (NEON there, SSE2 and AVX2 here) to the scalar path, decode.h's
functions alone, for every code width.
"""
import pathlib
import shutil
import subprocess

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"
DRIVER = pathlib.Path(__file__).resolve().parent / "aarch64" / "driver.c"
FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-I%s" % KERNELS]


def _build_and_run(compiler, runner, tmp_path, name):
    exe = tmp_path / name
    subprocess.run([compiler, *FLAGS, "-static", str(DRIVER), str(KERNELS / "cpu_rebuild.c"), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([*runner, str(exe)], capture_output=True, timeout=600)
    assert run.returncode == 0, "%s build: %s" % (name, run.stderr.decode(errors="replace")[-2000:])
    return run.stdout


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (Debian packages)")
def test_aarch64_build_is_bit_identical_to_the_host_build(tmp_path):
    host = _build_and_run("gcc", [], tmp_path, "host")
    arm = _build_and_run("aarch64-linux-gnu-gcc", ["qemu-aarch64"], tmp_path, "arm")
    assert len(host) > 100000
    assert arm == host
