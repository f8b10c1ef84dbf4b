"""jetson/ is a leaf (DESIGN.md s. 2): it must not import runtime, export or kernels."""
import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "jetson")
FORBIDDEN = ("tvswitch.runtime", "tvswitch.export", "tvswitch.kernels")


def test_jetson_imports_nothing_above_it():
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), "%s imports %s" % (os.path.basename(path), name)
