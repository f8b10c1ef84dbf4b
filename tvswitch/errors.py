"""The one exception type that the CLI turns into a one-line message and exit code 2.

Every layer raises it for bad input (a file, tensor, flag or bundle the user gave us),
so that a caller can tell the user's mistake from a bug in tvswitch.
"""
from typing import Optional


class TvswitchError(Exception):
    """Bad input: the message names the file, tensor or flag at fault."""


class BundleError(TvswitchError):
    """A bundle is corrupt, of another version, or does not match the base it is used with."""


#: The optional packages a verb may import, and the extra that installs each.
EXTRAS = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnx", "cuda": "cuda", "peft": "peft"}


def missing_extra(exc: ImportError) -> Optional[str]:
    """One line saying which extra to install, for an optional package that is missing
    (None for any other import error, which is a bug to show as it is)."""
    root = (getattr(exc, "name", None) or "").split(".")[0]
    if root not in EXTRAS:
        return None
    return "this needs %s, which is not installed: pip install 'tvswitch[%s]'" % (root, EXTRAS[root])
