"""The import graph (tvswitch.importgraph): no cycles, every import down the layers, jetson a leaf;
and the walker itself finds a cycle and an upward import when there is one."""
import os

from tvswitch import importgraph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_tree_has_no_cycle_and_no_import_against_the_layers():
    edges = importgraph.graph(ROOT)
    assert len(edges) > 60  # every part was found
    assert importgraph.cycles(edges) == []
    assert importgraph.against_direction(edges) == []


def test_lazy_imports_inside_functions_count():
    edges = importgraph.graph(ROOT)
    # runtime.engines loads each engine inside load_engine, never at import
    assert "tvswitch.runtime.engines.onnxruntime" in edges["tvswitch.runtime.engines"]


def test_the_walker_finds_a_cycle_and_an_upward_import():
    edges = {"tvswitch.runtime.a": {"tvswitch.runtime.b"}, "tvswitch.runtime.b": {"tvswitch.runtime.a"},
             "tvswitch.kernels.c": {"tvswitch.export.d"}, "tvswitch.export.d": set(),
             "tvswitch.jetson.e": {"tvswitch.errors"}, "tvswitch.errors": set()}
    assert importgraph.cycles(edges) == [["tvswitch.runtime.a", "tvswitch.runtime.b"]]
    assert importgraph.against_direction(edges) == [("tvswitch.jetson.e", "tvswitch.errors"),
                                                    ("tvswitch.kernels.c", "tvswitch.export.d")]


def test_relative_imports_resolve_to_the_namespace(tmp_path):
    pkg = tmp_path / "runtime"
    pkg.mkdir()
    (pkg / "x.py").write_text("from . import y\nfrom .y import name\n")
    found = importgraph.imports(str(pkg / "x.py"), "tvswitch.runtime.x", {"tvswitch.runtime.y", "tvswitch.runtime.x"})
    assert found == {"tvswitch.runtime.y"}
