"""Every relative link in the Markdown docs points at a file that exists (a page renamed or not yet
written shows up here, not in a reader's 404)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    pages += [path for path in (ROOT / "SECURITY.md", ROOT / "bench" / "README.md") if path.exists()]
    return pages


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in markdown_files():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # absolute URLs and anchors within the page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_pattern_finds_links() -> None:
    """The check above would pass vacuously if the pattern found nothing."""
    found = [target for page in markdown_files() for target in LINK.findall(page.read_text())]
    assert "docs/quickstart.md" in found
    assert len(found) > 50
