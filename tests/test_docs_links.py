"""Every relative link of the Markdown documentation (README.md, CHANGELOG.md, docs/*.md) points to an existing file,
and an anchor into a Markdown file names one of its headings."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; <target> for targets with spaces
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without code blocks, inline code and HTML comments, where link syntax is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", HTML_COMMENT.sub("", text)))


def link_targets(text: str) -> list[str]:
    """The targets of the inline, reference-style and HTML links of a Markdown text, in order of appearance."""
    text = prose(text)
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK):
        for match in pattern.finditer(text):
            found.append((match.start(), match.group(1).strip("<>")))
    return [target for _, target in sorted(found)]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Anchors of a Markdown page's headings, with GitHub's -1, -2 ... suffixes for repeated ones."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        anchor = heading_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` that point to no file, or to a heading its target does not have."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        path_part = path_part.split("?", 1)[0]
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file {destination}")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: {destination.name} has no heading with anchor #{fragment}")
    return broken


def test_documentation_pages_exist() -> None:
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "CHANGELOG.md", "docs/trpo.md", "docs/acktr.md"} <= names, names
    assert all(page.exists() for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_relative_links_point_to_existing_files(page: Path) -> None:
    assert broken_links(page) == []


def test_link_targets_are_found_and_code_is_ignored() -> None:
    text = """
See [the page](docs/a.md), ![a plot](../img/b.png "title") and [c](<with space.md>).
[web](https://example.org) [here](#local) `[not](code.md)` [ref][r]
<!-- [hidden](comment.md) -->
```python
x = '[not](fenced.md)'
```
[r]: ref/target.md
<a href="html/link.md">x</a> <img src="pic.png">
"""
    assert link_targets(text) == [
        "docs/a.md",
        "../img/b.png",
        "with space.md",
        "https://example.org",
        "#local",
        "ref/target.md",
        "html/link.md",
        "pic.png",
    ]


def test_broken_file_and_anchor_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Results: A2C vs `PPO` (2.9)\n\n## Results: A2C vs `PPO` (2.9)\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#results-a2c-vs-ppo-29) [ok](other.md#results-a2c-vs-ppo-29-1) [ok](#title)\n"
        "[gone](missing.md) [bad anchor](other.md#results) [bad local](#nothing)\n\n# Title\n"
    )
    assert broken_links(page) == [
        f"missing.md: no such file {tmp_path / 'missing.md'}",
        "other.md#results: other.md has no heading with anchor #results",
        "#nothing: page.md has no heading with anchor #nothing",
    ]
