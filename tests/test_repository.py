"""The repository is self-contained: every document a file names (``*.md``) is in it, and the equation numbers
that code cites from docs/algorithm.md exist there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.md\b")
# Documents named without a path on purpose (generic names of files a user writes, e.g. a model card).
_GENERIC = {"README.md"}


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in listed.splitlines():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".ipynb", ".txt", ".cfg"} or path.name == "Makefile":
            files.append(path)
    return files


def test_every_named_document_is_in_the_repository():
    missing = []
    for path in _tracked_text_files():
        for name in set(DOCUMENT.findall(path.read_text(encoding="utf-8", errors="replace"))):
            if name in _GENERIC:
                continue
            candidates = (ROOT / name, path.parent / name, ROOT / "docs" / Path(name).name)
            if not any(candidate.is_file() for candidate in candidates):
                missing.append(f"{path.relative_to(ROOT)} -> {name}")
    assert not missing, "files name documents that are not in the repository: " + "; ".join(sorted(missing))


def test_cited_algorithm_equations_exist():
    """``docs/algorithm.md`` numbers its equations ``(N)``; code citing ``eq. N`` must find them there."""
    doc = (ROOT / "docs" / "algorithm.md").read_text()
    defined = set(re.findall(r"^\s+\((\d+b?)\)", doc, flags=re.MULTILINE))
    cited = set()
    for path in (ROOT / "prime_trl").rglob("*.py"):
        for first, last in re.findall(r"\beq\. (\d+b?)(?:-(\d+))?", path.read_text()):
            cited.add(first)
            if last:
                cited.update(str(n) for n in range(int(first), int(last) + 1))
    assert cited, "no code cites docs/algorithm.md equations"
    assert cited <= defined, f"cited equations missing from docs/algorithm.md: {sorted(cited - defined)}"
