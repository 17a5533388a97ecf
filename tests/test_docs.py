"""README is the front page and docs/ the manual: every relative link resolves, README stays short."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: pathlib.Path):
    for target in LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_a_broken_link_is_caught(tmp_path):
    """Negative control: the link check sees a link to a file that does not exist."""
    page = tmp_path / "page.md"
    page.write_text("see [there](nowhere.md) and [web](https://example.org)")
    assert list(relative_links(page)) == ["nowhere.md"]
    assert not (page.parent / "nowhere.md").exists()


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "make train" in text and "make test" in text
