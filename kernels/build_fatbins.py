"""Compile the rebuild kernels ahead of time, for devices that cannot run NVRTC.

    python -m tvswitch.kernels.build_fatbins --out DIR [--arch sm_53,sm_62,...] [--compiler nvrtc|nvcc]

writes one cubin per architecture, one PTX for the lowest (the driver compiles it for
any later GPU) and ``index.json`` with the source digest; point ``$TVSWITCH_KERNELS`` at
DIR (or copy it to the package's ``kernels/prebuilt``) and the GPU rebuilder loads from
it.  NVRTC from the cu12 wheel reaches sm_53..sm_90 on any machine; nvcc is the
alternative where a toolkit is installed (CUDA 13's nvcc no longer targets sm_53/62/72).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from tvswitch.files import atomic_write
from tvswitch.kernels import nvrtc


def compile_nvcc(arch: str, output: str, nvcc: str) -> bytes:
    """The same image through nvcc (the options of ``nvrtc.OPTIONS`` in nvcc's spelling)."""
    number = nvrtc.arch_number(arch)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rebuild." + output)
        target = ["-arch=sm_%d" % number, "-cubin"] if output == "cubin" else ["-arch=compute_%d" % number, "-ptx"]
        cmd = [nvcc, *target, "-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true",
               "-I", nvrtc.HERE, "-o", out, os.path.join(nvrtc.HERE, nvrtc.SOURCE)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise nvrtc.KernelBuildError("nvcc could not compile for %s:\n%s" % (arch, run.stderr.strip()))
        with open(out, "rb") as f:
            return f.read()


def build(out_dir: str, archs: Sequence[str], compiler: str = "nvrtc", nvcc: Optional[str] = None) -> Dict[str, str]:
    """Write the images and the index; returns architecture -> file name."""
    if compiler == "nvcc":
        nvcc = nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"

    def image(arch: str, output: str) -> bytes:
        if compiler == "nvcc":
            return compile_nvcc(arch, output, nvcc)
        return nvrtc.compile_kernels(arch, output)

    os.makedirs(out_dir, exist_ok=True)
    numbers = sorted({nvrtc.arch_number(a) for a in archs})
    files: Dict[str, str] = {}
    for n in numbers:
        files["sm_%d" % n] = "tvswitch-rebuild-sm_%d.cubin" % n
        atomic_write(os.path.join(out_dir, files["sm_%d" % n]), image("sm_%d" % n, "cubin"))
    lowest = "compute_%d" % numbers[0]
    files[lowest] = "tvswitch-rebuild-%s.ptx" % lowest
    atomic_write(os.path.join(out_dir, files[lowest]), image(lowest, "ptx"))
    index = {"digest": nvrtc.source_digest(), "compiler": compiler, "options": list(nvrtc.OPTIONS),
             "kernels": sorted(nvrtc.KERNELS.values()), "images": files}
    if compiler == "nvrtc":
        index["nvrtc"] = "%d.%d" % nvrtc.nvrtc_version()
    atomic_write(os.path.join(out_dir, nvrtc.INDEX), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    return files


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvswitch.kernels.build_fatbins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the images and index.json")
    ap.add_argument("--arch", default=",".join(nvrtc.TARGETS), help="comma-separated sm_XY list (default: %(default)s)")
    ap.add_argument("--compiler", choices=("nvrtc", "nvcc"), default="nvrtc")
    ap.add_argument("--nvcc", help="nvcc to run with --compiler nvcc (default: from PATH)")
    args = ap.parse_args(argv)
    try:
        files = build(args.out, [a.strip() for a in args.arch.split(",") if a.strip()], args.compiler, args.nvcc)
    except (nvrtc.KernelBuildError, ValueError) as exc:
        print("build_fatbins: %s" % exc, file=sys.stderr)
        return 1
    for arch, name in files.items():
        size = os.path.getsize(os.path.join(args.out, name))
        print("%-12s %-40s %8d bytes" % (arch, name, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
