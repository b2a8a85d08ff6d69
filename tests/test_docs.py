"""The README stays a few screens, its set-up commands are what CI runs, and its links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_readme_fits_in_a_few_screens():
    assert len(README.read_text().splitlines()) <= 250


def test_ci_runs_exactly_the_readmes_set_up_commands():
    text = README.read_text()
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    install, test = block
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install.removesuffix(" && sieve demo") in ci  # CI installs as the README says, without the demo
    assert test in ci and test == "python -m pytest"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_lead_to_a_file_and_heading_that_exist(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)
    assert not broken, broken


def test_every_bench_script_has_its_figures_in_the_benchmarks_page():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    missing = [p.name for p in sorted((ROOT / "bench").iterdir()) if p.suffix in (".py", ".sh") and p.name not in page]
    assert not missing, missing
