"""The README is a front page a newcomer reads to the end, and every link in it and in docs/ leads somewhere.

Cheap checks on text only: the README's length, its two set-up commands, the pictures of README.md and docs/ (each
the one docs/img/render.sh made, by the sha256 it recorded), and every relative markdown link (`](path)`,
`](path#anchor)`, `](#anchor)`) in README.md and docs/**/*.md: the file exists in the repository and, for an anchor,
the target file has a heading with that GitHub-style anchor.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 150

LINK = re.compile(r"\]\(([^()\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def without_code(text: str) -> str:
    """The text outside fenced blocks and inline code (a `](x)` or `# x` there is not markdown)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text without markup, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code, emphasis
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of `path` produce; a repeated one also as `-1`, `-2`, ... as GitHub numbers them."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        anchor = github_anchor(heading)
        n = counts.get(anchor, 0)
        found.add(anchor if n == 0 else f"{anchor}-{n}")
        counts[anchor] = n + 1
    return found


def broken_links(path: Path) -> list[str]:
    """`file: target (why)` for every relative link of `path` that leads nowhere."""
    problems = []
    for target in LINK.findall(without_code(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not a file of the repository
            continue
        name, _, anchor = target.partition("#")
        dest = (path.parent / name).resolve() if name else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if not dest.is_relative_to(ROOT):
            problems.append(f"{where} (outside the repository)")
        elif not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    return problems


def test_the_readme_is_a_front_page_of_at_most_150_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"
    )


def test_the_readme_gives_the_two_set_up_commands():
    lines = README.read_text().splitlines()
    for command in ("./dev.sh run", "./dev.sh test"):
        given = any(line == command or line.startswith(f"{command} ") for line in lines)
        assert given, f"README.md: no line starting with `{command}`"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_of_the_repository(path):
    assert not broken_links(path)


PICTURE = re.compile(r"!\[[^\]]*\]\(([^()\s]+)\)")
RENDERED = ROOT / "docs" / "img" / "rendered.sha256"  # written by docs/img/render.sh


def shown_pictures() -> dict[Path, str]:
    """Every local picture README.md and docs/ show: {file: the page that shows it first}."""
    shown: dict[Path, str] = {}
    for page in markdown_files():
        for target in PICTURE.findall(without_code(page.read_text())):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):
                shown.setdefault((page.parent / target).resolve(), str(page.relative_to(ROOT)))
    return shown


def rendered() -> dict[Path, str]:
    """{picture: sha256} as render.sh last recorded them."""
    lines = [line for line in RENDERED.read_text().splitlines() if line and not line.startswith("#")]
    return {(ROOT / name.strip()).resolve(): digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def test_the_readme_pictures_exist_as_pngs():
    pictures = PICTURE.findall(README.read_text())
    assert len(pictures) >= 2, "the README's tour shows the runs page and the confirmation plot"
    for picture, page in shown_pictures().items():
        name = picture.relative_to(ROOT)
        assert picture.is_file(), f"{page} shows {name}, which does not exist"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert picture.stat().st_size < 400_000, f"{name} is {picture.stat().st_size} bytes: keep pictures small"


def test_every_picture_shown_is_the_one_render_sh_made():
    """A picture changed by hand, left from an older run, or added without render.sh fails here."""
    made = rendered()
    for picture, page in shown_pictures().items():
        name = picture.relative_to(ROOT)
        assert picture in made, f"{page} shows {name}, which docs/img/render.sh does not render"
        digest = hashlib.sha256(picture.read_bytes()).hexdigest()
        assert digest == made[picture], f"{name} is not the picture render.sh made: run bash docs/img/render.sh"
    script = (ROOT / "docs" / "img" / "render.sh").read_text()
    for picture in made:  # each recorded picture is one the script writes
        name = picture.relative_to(ROOT)
        assert picture.name in script or f"{name.parent}/*.png" in script, f"render.sh does not write {name}"


def test_the_anchor_rule_is_githubs():
    """The anchors the link check compares with, on headings of the kinds these docs use."""
    assert github_anchor("One trial: `pathsearch train`") == "one-trial-pathsearch-train"
    assert github_anchor("Trustworthy winners: three splits, a confirmation, a verdict") == (
        "trustworthy-winners-three-splits-a-confirmation-a-verdict"
    )
    assert github_anchor("A ViT is an ensemble of 2L+1 paths") == "a-vit-is-an-ensemble-of-2l1-paths"
    assert github_anchor("What a search prints, exit codes") == "what-a-search-prints-exit-codes"
    assert github_anchor("`search.confirm` and `max_kept_paths`") == "searchconfirm-and-max_kept_paths"
