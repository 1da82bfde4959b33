"""Every ```python block of README.md runs as written (each alone, in a fresh namespace).

A block may opt out only because it needs a GPU, by starting with the line
``# needs a GPU``; it is then skipped, visibly, where there is none.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
GPU_MARK = "# needs a GPU"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of each fenced ```python block."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, source):
    if source.startswith(GPU_MARK) and jax.default_backend() == "cpu":
        pytest.skip(f"README.md:{line} needs a GPU")
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": f"readme_block_{line}"})
