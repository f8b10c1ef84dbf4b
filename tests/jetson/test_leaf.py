"""jetson/ is a leaf (docs/architecture.md, Imports): of tvswitch it imports only tvswitch.jetson itself."""
import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "jetson")


def _imported_names(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_jetson_imports_nothing_of_tvswitch_outside_itself():
    paths = glob.glob(os.path.join(ROOT, "*.py"))
    assert len(paths) > 10
    for path in paths:
        with open(path) as f:
            names = list(_imported_names(ast.parse(f.read())))
        for name in names:
            if name == "tvswitch" or name.startswith("tvswitch."):
                assert name == "tvswitch.jetson" or name.startswith("tvswitch.jetson."), \
                    "%s imports %s" % (os.path.basename(path), name)


def test_the_leafs_engine_list_is_the_runtimes():
    """A leaf cannot import runtime's list of engines, so it keeps a copy; this keeps the copy true."""
    from tvswitch.jetson.plan import ENGINES
    from tvswitch.runtime.engines.base import ENGINE_KINDS

    assert ENGINES == ENGINE_KINDS
