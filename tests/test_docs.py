"""The README is the front door (under 12 KB: what migrator is, install, the two commands, a walkthrough,
links); the rest lives in docs/, a mkdocs site that scripts/test builds with --strict (a broken link or a
page missing from the navigation fails there). These checks are the README's side."""

from __future__ import annotations

import re

import yaml
from conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_readme_is_a_front_door_under_12_kb() -> None:
    assert len(README.encode()) < 12 * 1024
    headings = re.findall(r"(?m)^## (.*)$", README)
    walkthrough = "A five-minute walkthrough: your own application"
    assert headings[:3] == ["Install", "Two commands on a fresh machine", walkthrough]
    assert "pipx install stamp-migrator" in README
    assert 'eval "$(_MIGRATOR_COMPLETE=bash_source migrator)"' in README


def test_every_link_of_the_readme_leads_to_a_file_and_every_docs_page_is_linked_and_in_the_navigation() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith("https://")]
    assert all((REPO / link).is_file() for link in local), [link for link in local if not (REPO / link).is_file()]
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    assert {link.removeprefix("docs/") for link in local if link.startswith("docs/")} == pages
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    assert {page for entry in nav for page in entry.values()} == pages
