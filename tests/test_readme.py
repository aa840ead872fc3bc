"""The README's Python examples run as written, so the documentation cannot rot."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0] for b in BLOCKS])
def test_readme_example_runs(block, stats_shards, keep_shards, tmp_path, monkeypatch):
    (tmp_path / "shards").symlink_to(stats_shards)  # the examples read ./shards and ./shards-keep
    (tmp_path / "shards-keep").symlink_to(keep_shards)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
