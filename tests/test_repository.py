"""The repository keeps its shape: the README is the front door and links every page of docs/, links
point at files that exist, argparse lives only in the command line, and no module grows past ~400 lines."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "mitigation", "service", "bna_gateway")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_front_door_that_links_every_page_of_docs() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block, "the two commands come first"
    linked = {Path(m).as_posix() for m in LINK.findall(text)}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"docs pages not linked from README.md: {sorted(pages - linked)}"


def test_every_relative_link_in_the_docs_points_at_a_file() -> None:
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def test_argparse_lives_only_in_the_command_line() -> None:
    users = [p.relative_to(ROOT).as_posix() for p in _modules() if re.search(r"\bargparse\b", p.read_text())]
    assert users and all(u.startswith("mitigation/cli/") for u in users), users


def test_no_module_passes_400_lines() -> None:
    long = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
