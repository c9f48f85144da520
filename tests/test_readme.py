"""The README quotes only what the committed files say.

- Its generated blocks (`benchmarks/readme.py`: what the defaults do, the main command's output, the cost) are
  exactly what the results files render to.
- Outside those blocks and the code fences, every number is one of a short list (versions, the paper), so a
  number cannot be typed in by hand.
- Every relative link points to a file of the repository, and no path leads outside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import readme

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text()

# Numbers allowed in the README's prose, each with why it is not a measurement.
ALLOWED_NUMBERS = {
    "2023": "the paper's year",
    "2306.13292": "the paper's arXiv id",
    "86": "x86-64",
    "64": "x86-64",
    "3.11": "the Python version the project is tested with",
    "2.14.1": "the torch pin",
    "0.29.1": "the torchvision pin",
}


def _prose(text: str) -> str:
    """The README without its generated blocks, fenced code and inline code (commands and flags, not results)."""
    for name in readme.BLOCKS:
        text = re.sub(rf"^<!-- {name} -->\n.*?^<!-- /{name} -->$", "", text, flags=re.S | re.M)
    text = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("name", sorted(readme.BLOCKS))
def test_generated_block_is_what_the_results_files_render(name):
    blocks = readme.blocks(TEXT)
    assert name in blocks, f"README.md has no <!-- {name} --> block"
    assert blocks[name] == readme.BLOCKS[name](ROOT), (
        f"README.md's {name} block differs from the committed results: run `python -m benchmarks.readme`")
    assert re.search(r"\d", blocks[name])  # a block that quotes nothing would pass the comparison trivially


def test_numbers_outside_the_generated_blocks_are_not_measurements():
    found = set(re.findall(r"(?<![\w.])\d+(?:[.,]\d+)*", _prose(TEXT)))
    assert found - set(ALLOWED_NUMBERS) == set(), "numbers in the README's prose that no results file backs"


def test_links_stay_inside_the_repository():
    assert "shared/" not in TEXT and not re.search(r"(?<![\w.])/(work|home|root|tmp)/", TEXT)
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", TEXT)
    local = [link for link in links if not re.match(r"https?://", link)]
    assert local, "the README links to no file of the repository"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []


def test_demo_conclusion_is_the_same_on_every_committed_run():
    """The main command was run at several thread counts; each run printed the same conclusion."""
    summaries = [json.loads(p.read_text()) for p in sorted((ROOT / readme.DEMO).glob("*/summary.json"))]
    assert len({s["run"]["threads"] for s in summaries}) >= 2
    assert len({s["conclusion"]["vcreg_ahead_on_transfer"] for s in summaries}) == 1
