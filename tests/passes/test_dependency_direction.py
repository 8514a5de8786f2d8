"""The layering of the code, read from every import statement (function-level imports included).

    passes                          never imports convfactor
    core: pipeline, decisions,      never imports convfactor.auto, .runtime, .cli, .distill or .api;
      policy, report, costs,        everything it imports is core too (the check follows imports
      methods                       transitively), so the core cannot reach those packages indirectly
    convfactor.runtime              never imports auto, cli, distill or api (onnxruntime measurement)
    convfactor.distill              never imports auto, cli, api or runtime (auto re-exports it)
    convfactor.auto                 never imports cli or api; inside it the sub-packages import downwards:
                                    statistics and latency no other sub-package, fits only statistics,
                                    selection never search
    api                             the entry point above every layer: ``factorize`` composes the core
                                    with ``auto.resolve_policy``, ``distill`` and the held-out checks,
                                    so it is not part of the core; only cli and the top-level scripts use it

And no import cycles among convfactor's modules, counting the package ``__init__`` that importing a
submodule runs (a package may import its own submodules).
"""

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "convfactor"

CORE = ("pipeline", "decisions", "policy", "report", "costs", "methods")
NEVER = {
    "convfactor.runtime": ("auto", "cli", "distill", "api"),
    "convfactor.distill": ("auto", "cli", "api", "runtime"),
    "convfactor.auto": ("cli", "api"),
    "convfactor.auto.statistics": ("auto.fits", "auto.latency", "auto.selection", "auto.search"),
    "convfactor.auto.latency": ("auto.statistics", "auto.fits", "auto.selection", "auto.search"),
    "convfactor.auto.fits": ("auto.latency", "auto.selection", "auto.search"),
    "convfactor.auto.selection": ("auto.search",),
}
# The method registry's own import of its package (convfactor/methods/base.py loads convfactor.methods so
# that the built-in methods register): owned by the methods package, listed so that no other cycle hides.
KNOWN_CYCLES = [{"convfactor.methods", "convfactor.methods.base"}]


def _imported_modules(path: Path, package: str = "") -> set[str]:
    """Every absolute module name an ``import``/``from ... import`` statement anywhere in ``path`` names.

    Relative imports are resolved against ``package`` (the importing module's package); ``from X import Y``
    names ``X.Y`` as well as ``X`` (Y may be a submodule).
    """
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module:
                base = node.module
            else:
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, Path]:
    """Every module of convfactor by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> nx.DiGraph:
    """Module -> the modules its imports load: the named module, or the closest module above a name that
    is not one (an attribute), and the packages above it (their ``__init__`` runs first), except the
    importer's own ancestors, which are already loading."""
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in _imported_modules(path, package):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            while target and target != name:
                if target not in ancestors:
                    graph.add_edge(name, target)
                target = target.rpartition(".")[0]
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden(names, banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(_within(n, f"convfactor.{b}") for b in banned))


def test_passes_never_import_convfactor():
    files = sorted((ROOT / "passes").rglob("*.py"))
    assert len(files) >= 8  # the scan found the package
    offending = {str(f.relative_to(ROOT)): sorted(n for n in _imported_modules(f) if n.split(".")[0] == "convfactor")
                 for f in files}
    assert {f: names for f, names in offending.items() if names} == {}


def test_the_scan_sees_an_import_of_convfactor(tmp_path):
    """The check above can fail: a late import inside a function is found too."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from convfactor.methods import get_method\n    import convfactor.api\n")
    assert _imported_modules(sample) == {"convfactor.methods", "convfactor.methods.get_method", "convfactor.api"}


def test_the_scan_resolves_relative_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from ..costs import replacement_costs\ndef f():\n    from .statistics import split\n")
    assert _imported_modules(sample, "convfactor.auto") == {
        "convfactor.costs", "convfactor.costs.replacement_costs",
        "convfactor.auto.statistics", "convfactor.auto.statistics.split"}


def test_importing_passes_loads_no_convfactor_module():
    code = "import sys, passes; print(sorted(m for m in sys.modules if m.split('.')[0] == 'convfactor'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_reaches_only_the_core():
    graph = _graph()
    core = [n for n in graph if any(_within(n, f"convfactor.{c}") for c in CORE)]
    assert "convfactor.decisions" in core and "convfactor.methods.svd" in core  # the scan found the modules
    reached = set().union(*(nx.descendants(graph, n) for n in core))
    assert _forbidden(reached, ("auto", "runtime", "cli", "distill", "api")) == []


def test_each_package_keeps_off_the_layers_above_it():
    graph = _graph()
    offending = {}
    for package, banned in NEVER.items():
        for name in graph:
            if _within(name, package):
                bad = _forbidden(graph.successors(name), banned)
                if bad:
                    offending[name] = bad
    assert offending == {}


def test_no_import_cycles():
    cycles = [set(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """Two modules importing each other inside functions form a cycle the check reports."""
    package = tmp_path / "convfactor"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import a\n")
    (package / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "sub" / "b.py").write_text("from ..other import h\n")
    (package / "other.py").write_text("def h():\n    from .sub.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    cycles = [set(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert cycles == [{"convfactor.sub.a", "convfactor.sub.b", "convfactor.other", "convfactor.sub"}]
