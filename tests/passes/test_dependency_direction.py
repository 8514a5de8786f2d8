"""The dependency between the packages runs one way: convfactor imports passes, passes never imports convfactor."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name an ``import``/``from ... import`` statement in ``path`` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


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
    assert _imported_modules(sample) == {"convfactor.methods", "convfactor.api"}


def test_importing_passes_loads_no_convfactor_module():
    code = "import sys, passes; print(sorted(m for m in sys.modules if m.split('.')[0] == 'convfactor'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
