"""Builds the CPU rebuild library: plain C over kernels/decode.h, loaded with ctypes.

It is a shared library, not a Python extension module, so it carries no CPython ABI;
setuptools only compiles and places it inside the package.
"""
import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
setup(
    ext_modules=[
        Extension(
            "tvswitch.kernels._tvcpu",
            sources=["kernels/cpu_rebuild.c"],
            depends=["kernels/decode.h", "kernels/cpu_planned.h"],
            include_dirs=["kernels"],
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-strict-aliasing", *openmp],
            extra_link_args=openmp,
        )
    ]
)
