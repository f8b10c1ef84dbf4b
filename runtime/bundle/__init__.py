"""The bundle file in one place: ``manifest`` (the schema and every rule a reader
enforces, docs/FORMAT.md in code), ``reader`` (``Bundle``: open, check, decode) and
``writer`` (payloads, CRCs and the manifest, written atomically).  The layout of the
bits inside a payload is the kernels' (``kernels.packing``, ``kernels/decode.h``), one
layer down, so that the CPU library and the CUDA kernels read it without this package.
"""
from tvswitch.runtime.bundle.reader import Bundle

__all__ = ["Bundle"]
