"""The README's Python blocks run as written (in a temporary directory), so the docs match the code."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):  # later blocks use the names earlier ones define
        exec(compile(block, f"README python block {index}", "exec"), namespace)
    assert (tmp_path / "fast.onnx").is_file()
    assert namespace["convfactor"].get_report(namespace["fast"]).macs_ratio <= 0.5
