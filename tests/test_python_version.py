"""The package runs on the oldest Python that setup.cfg claims (3.10): no newer syntax or stdlib names.

Checked without a 3.10 interpreter: every source file parses with ``feature_version=(3, 10)``, and no
file imports (``from m import n``) or reads (``m.n``) a standard-library name added in 3.11 or 3.12.
Where a ``python3.10`` is on PATH, every standard-library name imported that way is also looked up in it.
"""

import ast
import configparser
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("convfactor", "passes", "examples", "benchmarks")
                 for p in (REPO / folder).rglob("*.py"))

# Standard-library names added in Python 3.11 and 3.12 that code like ours could reach for.
NEWER = {
    "datetime": {"UTC"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type",
               "dataclass_transform", "Required", "NotRequired", "TypeVarTuple", "Unpack", "override"},
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck", "FlagBoundary", "global_enum", "member", "nonmember"},
    "hashlib": {"file_digest"},
    "asyncio": {"TaskGroup", "Runner", "timeout"},
    "contextlib": {"chdir"},
    "itertools": {"batched"},
    "operator": {"call"},
    "math": {"cbrt", "exp2", "sumprod"},
    "logging": {"getLevelNamesMapping"},
    "builtins": {"ExceptionGroup", "BaseExceptionGroup"},
}
NEW_MODULES = {"tomllib", "wsgiref.types"}


def _stdlib_uses(tree: ast.AST) -> set[tuple[str, str]]:
    """(module, name) for ``from m import n`` and ``m.n`` where m is a standard-library module."""
    uses, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            uses |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                uses.add((alias.name, ""))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.add((aliases[node.value.id], node.attr))
        elif isinstance(node, ast.Name) and node.id in NEWER["builtins"]:
            uses.add(("builtins", node.id))
    return {(m, n) for m, n in uses if m.split(".")[0] in sys.stdlib_module_names}


def test_setup_cfg_claims_python_3_10():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["options"]["python_requires"].strip() == ">=3.10"
    assert "3.10" in config["metadata"]["classifiers"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_source_uses_nothing_newer_than_3_10(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 10))
    newer = sorted(f"{m}.{n}" if n else m for m, n in _stdlib_uses(tree)
                   if n in NEWER.get(m, ()) or m in NEW_MODULES)
    assert newer == [], f"{path.name} uses names added after Python 3.10"


def test_ruff_targets_python_3_10():
    assert 'target-version = "py310"' in (REPO / "pyproject.toml").read_text()


def test_stdlib_names_exist_in_a_real_python_3_10():
    python = shutil.which("python3.10")
    if python is None or subprocess.run([python, "-c", "pass"], capture_output=True).returncode != 0:
        pytest.skip("no python3.10 on PATH")
    uses = set().union(*(_stdlib_uses(ast.parse(p.read_text(encoding="utf-8"))) for p in SOURCES))
    probe = textwrap.dedent("""
        import importlib, json, sys
        missing = []
        for m, n in json.loads(sys.argv[1]):
            try:
                module = importlib.import_module(m)
            except ImportError:
                missing.append(m)
                continue
            if n and n != "*" and not hasattr(module, n):
                try:
                    importlib.import_module(f"{m}.{n}")
                except ImportError:
                    missing.append(f"{m}.{n}")
        print(sorted(missing))
    """)
    result = subprocess.run([python, "-c", probe, json.dumps(sorted(uses))], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
