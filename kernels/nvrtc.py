"""The rebuild kernels as device code: NVRTC at first use (cached on disk) or shipped images.

``kernel_image(cc)`` is what the GPU rebuilder asks for: a module image (cubin, or PTX the
driver compiles) for a device of compute capability ``cc``.  It takes, in order,

1. a prebuilt cubin for exactly this architecture from ``$TVSWITCH_KERNELS`` or
   ``kernels/prebuilt`` (written by ``python -m tvswitch.kernels.build_fatbins``) whose
   recorded source digest is this source's;
2. NVRTC: a cubin from the disk cache (``$TVSWITCH_CACHE`` or ``~/.cache/tvswitch/kernels``,
   one file per architecture, source digest, options and NVRTC version), else a fresh
   compile (about a second per architecture), then cached;
3. only where NVRTC is unavailable (a JetPack 4 board), a prebuilt image that still fits:
   a cubin of the same major and a lower minor (cubins run on later minors), else the
   newest PTX not above the device, for the driver to compile.

So a folder of older images never wins over NVRTC on a newer GPU.  A PTX's ISA version is
its compiler's: NVRTC 12.9 writes PTX 8.8, which only a CUDA 12.9 driver compiles, so
images for JetPack 4/5 boards come from the board's own nvcc (docs/kernels.md).

NVRTC compiles without a GPU, which is how CI proves every target builds.  Every image is
compiled with --fmad=false: the arithmetic contract of decode.h forbids contracted
multiply-adds, which is what makes the GPU bit-identical to the CPU build.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tvswitch.errors import TvswitchError
from tvswitch.files import atomic_write
from tvswitch.kernels.cuda import cuda_python

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "rebuild.cu"
HEADERS = ("decode.h",)
#: Kernels of rebuild.cu, by how many terms each prefetches (the host picks the smallest that covers a plan).
KERNELS = {2: "tv_rebuild_p2", 4: "tv_rebuild_p4", 10: "tv_rebuild_p10"}
#: What decode.h's arithmetic contract needs; nothing here may trade exactness for speed.
OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
#: The targets the project supports: Jetson Nano, TX2, Xavier, Orin, then x86 development GPUs.
TARGETS = ("sm_53", "sm_62", "sm_72", "sm_87", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
INDEX = "index.json"


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or no image fits the device; the message says why."""


def arch_number(arch: Any) -> int:
    """87 from "sm_87", "compute_87", "87", 87 or (8, 7)."""
    if isinstance(arch, tuple):
        return int(arch[0]) * 10 + int(arch[1])
    text = str(arch)
    for prefix in ("sm_", "compute_"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if not text.isdigit():
        raise ValueError("not a CUDA architecture: %r (use e.g. sm_87)" % (arch,))
    return int(text)


def sources() -> Tuple[bytes, List[bytes]]:
    """rebuild.cu and the headers it includes, as NVRTC takes them (no include path needed)."""
    with open(os.path.join(HERE, SOURCE), "rb") as f:
        src = f.read()
    headers = []
    for name in HEADERS:
        with open(os.path.join(HERE, name), "rb") as f:
            headers.append(f.read())
    return src, headers


def source_digest() -> str:
    """sha256 over the sources and options: what a cached or shipped image must match."""
    src, headers = sources()
    h = hashlib.sha256(src)
    for name, text in zip(HEADERS, headers):
        h.update(b"\0" + name.encode() + b"\0" + text)
    h.update(b"\0".join(o.encode() for o in OPTIONS))
    return h.hexdigest()


# ---------------------------------------------------------------- NVRTC


def nvrtc_module() -> Any:
    """cuda-python's NVRTC binding (``cuda.bindings.nvrtc``; ``cuda.nvrtc`` before 12.6 and 11.8.4)."""
    try:
        return cuda_python("nvrtc")
    except ImportError:
        raise KernelBuildError("NVRTC needs cuda-python: pip install 'tvswitch[cuda,nvrtc12]' (on JetPack 5 "
                               "that is cuda-python 11.8, with JetPack's NVRTC 11.4; JetPack 4 has none: use "
                               "prebuilt kernels, see docs/jetson.md)") from None


def _check(nvrtc: Any, call: str, result: Any) -> Any:
    err = result[0]
    if int(err) != 0:
        try:
            name = nvrtc.nvrtcGetErrorString(err)[1].decode()
        except Exception:  # noqa: BLE001 - the name is a courtesy; the code is in the message anyway
            name = str(err)
        raise KernelBuildError("%s failed: %s" % (call, name))
    return result[1] if len(result) == 2 else result[1:]


def nvrtc_version() -> Tuple[int, int]:
    nvrtc = nvrtc_module()
    try:
        result = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - a missing libnvrtc raises here, with types that vary by version
        raise KernelBuildError("libnvrtc not found (%s): pip install 'tvswitch[nvrtc12]' (JetPack 5: apt install "
                               "cuda-nvrtc-11-4, not NVRTC 12)" % exc) from None
    major, minor = _check(nvrtc, "nvrtcVersion", result)
    return int(major), int(minor)


def supported_archs() -> List[int]:
    """Architectures this NVRTC can emit cubins for (e.g. 12.9: 50..121; 13.x: 75 and up)."""
    nvrtc = nvrtc_module()
    nvrtc_version()
    return [int(a) for a in _check(nvrtc, "nvrtcGetSupportedArchs", nvrtc.nvrtcGetSupportedArchs())]


def compile_kernels(arch: Any, output: str = "cubin", extra: Sequence[str] = ()) -> bytes:
    """Compile rebuild.cu for ``arch``; ``output`` "cubin" (sm_XY) or "ptx" (compute_XY).

    Raises KernelBuildError with NVRTC's log when the source does not compile.
    """
    if output not in ("cubin", "ptx"):
        raise ValueError("output must be 'cubin' or 'ptx', got %r" % output)
    nvrtc = nvrtc_module()
    nvrtc_version()
    number = arch_number(arch)
    src, headers = sources()
    names = [h.encode() for h in HEADERS]
    prog = _check(nvrtc, "nvrtcCreateProgram",
                  nvrtc.nvrtcCreateProgram(src, SOURCE.encode(), len(headers), headers, names))
    try:
        target = ("sm_%d" if output == "cubin" else "compute_%d") % number
        opts = [b"--gpu-architecture=" + target.encode()] + [o.encode() for o in OPTIONS + tuple(extra)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc, "nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            _check(nvrtc, "nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog(prog, log))
            raise KernelBuildError("NVRTC could not compile %s for %s:\n%s"
                                   % (SOURCE, target, log.rstrip(b"\0 ").decode(errors="replace")))
        if output == "cubin":
            size = _check(nvrtc, "nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(prog))
            image = b" " * size
            _check(nvrtc, "nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(prog, image))
        else:
            size = _check(nvrtc, "nvrtcGetPTXSize", nvrtc.nvrtcGetPTXSize(prog))
            image = b" " * size
            _check(nvrtc, "nvrtcGetPTX", nvrtc.nvrtcGetPTX(prog, image))
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---------------------------------------------------------------- the disk cache


def cache_dir() -> str:
    return os.environ.get("TVSWITCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tvswitch", "kernels")


def cached_compile(arch: Any, output: str = "cubin") -> bytes:
    """``compile_kernels`` through the disk cache: a second process pays nothing."""
    major, minor = nvrtc_version()
    number = arch_number(arch)
    name = "rebuild-%s%d-nvrtc%d.%d-%s.%s" % ("sm_" if output == "cubin" else "compute_", number, major, minor,
                                             source_digest()[:16], output)
    path = os.path.join(cache_dir(), name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        pass
    image = compile_kernels(number, output)
    _write_cache(path, image)
    return image


def _write_cache(path: str, data: bytes) -> None:
    """Keep a compiled image for next time (atomically: no reader sees half an image)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, data)
    except (OSError, TvswitchError):
        pass  # a read-only home only costs a recompile next time


# ---------------------------------------------------------------- shipped images


def prebuilt_dirs() -> List[str]:
    dirs = [os.environ["TVSWITCH_KERNELS"]] if os.environ.get("TVSWITCH_KERNELS") else []
    return dirs + [os.path.join(HERE, "prebuilt")]


def read_index(folder: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(folder, INDEX)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def exact_cubin(images: Dict[str, str], cc: Tuple[int, int]) -> Optional[str]:
    """The name of the cubin built for exactly this device's architecture, if the index has one."""
    number = cc[0] * 10 + cc[1]
    return next((a for a in images if a.startswith("sm_") and arch_number(a) == number), None)


def compatible_cubin(images: Dict[str, str], cc: Tuple[int, int]) -> Optional[str]:
    """A cubin of the same major version and a lower minor (cubins run on later minors)."""
    number = cc[0] * 10 + cc[1]
    same = sorted((arch_number(a), a) for a in images
                  if a.startswith("sm_") and arch_number(a) // 10 == cc[0] and arch_number(a) <= number)
    return same[-1][1] if same else None


def ptx_not_above(images: Dict[str, str], cc: Tuple[int, int]) -> Optional[str]:
    """The newest PTX for an architecture not above the device's (the driver compiles it)."""
    number = cc[0] * 10 + cc[1]
    ptx = sorted((arch_number(a), a) for a in images if a.startswith("compute_") and arch_number(a) <= number)
    return ptx[-1][1] if ptx else None


def prebuilt_image(cc: Tuple[int, int], pick: Callable[[Dict[str, str], Tuple[int, int]], Optional[str]] = exact_cubin
                   ) -> Optional[Tuple[bytes, str]]:
    """(image, where) from the first prebuilt folder of this source where ``pick`` finds one for ``cc``."""
    digest = source_digest()
    for folder in prebuilt_dirs():
        index = read_index(folder)
        if not index or index.get("digest") != digest:
            continue
        name = pick(index.get("images", {}), cc)
        if name is None:
            continue
        path = os.path.join(folder, index["images"][name])
        with open(path, "rb") as f:
            return f.read(), path
    return None


def kernel_image(cc: Tuple[int, int]) -> Tuple[bytes, str]:
    """(image, where it came from) for a device of compute capability ``cc``."""
    found = prebuilt_image(cc, exact_cubin)
    if found is not None:
        return found
    number = cc[0] * 10 + cc[1]
    try:
        archs = supported_archs()
    except KernelBuildError as exc:
        found = prebuilt_image(cc, compatible_cubin) or prebuilt_image(cc, ptx_not_above)
        if found is not None:
            return found
        raise KernelBuildError("no prebuilt kernel image runs on sm_%d (folders: %s) and %s"
                               % (number, ", ".join(prebuilt_dirs()), exc)) from None
    if number in archs:
        return cached_compile(number, "cubin"), "NVRTC cubin sm_%d" % number
    lower = [a for a in archs if a <= number]
    if not lower:
        raise KernelBuildError("NVRTC %d.%d targets sm_%d at the lowest; this GPU is sm_%d"
                               % (nvrtc_version() + (min(archs), number)))
    # A GPU newer than this NVRTC: PTX for the newest target it knows, compiled by the driver.
    return cached_compile(lower[-1], "ptx"), "NVRTC PTX compute_%d (JIT by the driver)" % lower[-1]
