"""docs/troubleshooting.md quotes pathsearch's messages: each entry's `> message:` line holds, in backticks, the
parts of a message that stay the same. Each must still be a piece of a message written in pathsearch/, so that a
reworded or removed message fails here until its entry is changed with it.

The code's messages are read from the AST, as the parser joins them: every string constant and f-string (implicit
concatenation `"a" "b"` is one string there), and `+` chains of them, with each `{placeholder}` a break a
fragment cannot span. Docstrings do not count: a fragment must be something pathsearch says. Links in the page are
checked with every other page's, by tests/test_readme.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"
PACKAGE = ROOT / "pathsearch"

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
ENTRY = re.compile(r"^### (.+)$", re.M)
MESSAGE_LINE = re.compile(r"^> message: (.+)$", re.M)
CODE_SPAN = re.compile(r"`([^`]+)`")
HOLE = "\x00"  # where a placeholder's value goes: no fragment spans it
MIN_ENTRIES = 30
MIN_FRAGMENT = 8  # characters: shorter ones would be found anywhere


def entries(text: str) -> dict[str, list[str]]:
    """{entry heading: the fragments of its `> message:` line} for every `###` entry (code blocks left out)."""
    text = FENCE.sub("", text)
    heads = list(ENTRY.finditer(text))
    found = {}
    for head, after in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.end() : after.start() if after else len(text)]
        found[head.group(1)] = [span for line in MESSAGE_LINE.findall(body) for span in CODE_SPAN.findall(line)]
    return found


def render(node: ast.expr) -> str | None:
    """The text of a string expression with each placeholder as HOLE, or None when `node` is not one."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = render(node.left), render(node.right)
        if left is not None or right is not None:  # "text" + name: the name is a placeholder
            return (HOLE if left is None else left) + (HOLE if right is None else right)
    return None


def message_texts(source: str) -> list[str]:
    """Every string the module `source` builds (outermost expressions whole, and their parts), not its docstrings."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.expr) and id(node) not in docstrings and (text := render(node)) is not None:
            texts.append(text)
    return texts


def code_messages(package: Path = PACKAGE) -> str:
    """All of the package's texts in one string, each apart (HOLE between them)."""
    return HOLE.join(text for path in sorted(package.rglob("*.py")) for text in message_texts(path.read_text()))


PAGE_ENTRIES = entries(PAGE.read_text())
FRAGMENTS = sorted({fragment for fragments in PAGE_ENTRIES.values() for fragment in fragments})


@pytest.fixture(scope="module")
def messages() -> str:
    return code_messages()


def test_each_entry_quotes_its_message():
    assert len(PAGE_ENTRIES) >= MIN_ENTRIES, f"{PAGE.name}: {len(PAGE_ENTRIES)} entries"
    unquoted = [heading for heading, fragments in PAGE_ENTRIES.items() if not fragments]
    assert not unquoted, f"entries without a `> message:` line of backticked fragments: {unquoted}"


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_a_documented_message_is_one_pathsearch_still_says(fragment, messages):
    assert len(fragment) >= MIN_FRAGMENT, f"{fragment!r}: too short to name one message"
    assert fragment in messages, (
        f"{PAGE.relative_to(ROOT)} quotes {fragment!r}, which no message under pathsearch/ says any more: "
        "change the entry with the message"
    )


def test_a_reworded_or_removed_message_is_found():
    source = '''
def f(path, n):
    """A docstring that says gone missing."""
    if n:
        raise ValueError(f"{path}: no such "
                         "file here, got {n}")
    return "the count " + str(n) + " is odd"
'''
    said = HOLE.join(message_texts(source))
    assert "no such file here" in said  # joined over two lines, as the parser joins them
    assert "got {n}" in said  # (a plain string's braces are text)
    assert " is odd" in said and "the count " in said
    assert "gone missing" not in said  # a docstring is no message
    assert "path: no such" not in said  # nor a value: the placeholder breaks the text
    assert "no such file there" not in said
