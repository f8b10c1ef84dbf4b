"""Benchmarks that print figures (``python -m bench.NAME`` from the repository root).

``python -m`` puts the repository root first on ``sys.path``, where the folder
``kernels/`` (installed as ``tvswitch.kernels``) would shadow PyPI's ``kernels``
package, which transformers 5 requires and imports by that name: transformers then
fails at import with "cannot import name ... from 'kernels'".  Once this package is
imported its submodules resolve through ``bench.__path__``, so the root can leave
``sys.path`` and every other top-level name resolves as it would anywhere else.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
