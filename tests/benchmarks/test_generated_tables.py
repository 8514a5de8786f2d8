"""The benchmark tables in docs/ are generated from the results JSON: the document matches a fresh render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.real_models import DOC_BEGIN, DOC_END, doc_table, with_doc_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_real_models_table_in_the_docs_is_the_rendered_json():
    results = json.loads((ROOT / "benchmarks/results/real_models.json").read_text())["results"]
    doc = (ROOT / "docs/results.md").read_text()
    assert with_doc_table(doc, doc_table(results)) == doc, (
        "docs/results.md's table differs from the JSON: python benchmarks/real_models.py --render "
        "benchmarks/results/real_models.json --doc docs/results.md")
    rows = doc.split(DOC_BEGIN)[1].split(DOC_END)[0].strip().splitlines()
    assert len(rows) == 2 + len(results)  # header, rule, one line per result


def test_a_changed_result_changes_the_table():
    results = json.loads((ROOT / "benchmarks/results/real_models.json").read_text())["results"]
    changed = [dict(r) for r in results]
    changed[0]["mac_ratio"] = 0.123456
    assert "| 0.123 |" in doc_table(changed) and doc_table(changed) != doc_table(results)


def test_a_document_without_markers_is_refused():
    with pytest.raises(SystemExit, match="markers"):
        with_doc_table("no table here", "| a |")
