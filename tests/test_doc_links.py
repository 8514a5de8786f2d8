"""The README's and the manuals' references to other documents name files that exist: a moved or split manual
leaves no dead link behind (Markdown links, relative to the file, and `docs/NAME.md` mentioned in code spans)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def references(path: Path) -> list[tuple[str, Path]]:
    """(as written, the file it names) for each relative Markdown link and each `docs/NAME.md` in ``path``."""
    text = path.read_text()
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:|#", target):
            found.append((target, path.parent / target.split("#")[0]))
    for name in re.findall(r"`(docs/[\w.-]+\.md)`", text):
        found.append((name, ROOT / name))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_document_reference_names_an_existing_file(document):
    dead = [written for written, target in references(document) if not target.exists()]
    assert not dead, f"{document.relative_to(ROOT)} names missing files: {dead}"


def test_references_are_found(tmp_path):
    """The check can fail: a link and a code-span mention of missing files are both reported."""
    page = tmp_path / "page.md"
    page.write_text("see [gone](gone.md#part), `docs/nothing.md`, [web](https://example.org/x.md) and [here](#top)\n")
    assert [written for written, target in references(page) if not target.exists()] == ["gone.md#part", "docs/nothing.md"]
