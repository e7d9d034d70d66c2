"""The generated reference (docs/reference/) says what the code does: it is what `python -m pathsearch.reference`
writes today, every search-file key and every CLI flag has a description, and its "searched" column is what the
validator accepts in a `space` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pathsearch.cli import build_parser
from pathsearch.config import ConfigError, load_search_file
from pathsearch.config.typed import from_dict
from pathsearch.reference import (
    COMMAND,
    EXAMPLES,
    GUIDES,
    NOT_SEARCHED,
    OUT,
    RULES,
    SECTIONS,
    SPACE_FIELDS,
    arguments_of,
    field_comments,
    need_ranges,
    pages,
    schema_keys,
    space_text,
    verbs_of,
)

KEYS = schema_keys()
NAMES = {key.name for key in KEYS}


def test_the_committed_reference_is_what_the_code_generates():
    for name, text in pages().items():
        path = OUT / name
        assert path.is_file(), f"{path} is missing: run `{COMMAND}`"
        assert path.read_text() == text, f"docs/reference/{name} disagrees with the code: run `{COMMAND}`"


def test_every_search_file_key_has_a_description():
    assert len(KEYS) >= 80, "the walk finds every key of the model, data, train, search and tracking sections"
    missing = [key.name for key in KEYS if not key.description]
    assert not missing, f"give each field a comment in pathsearch/config/__init__.py (its description): {missing}"
    for cls, names in SPACE_FIELDS:
        comments = field_comments(cls)
        assert all(comments.get(name) for name in names), f"a space field of {cls.__name__} has no comment"


def test_a_field_comment_is_read_from_its_line_or_the_lines_above():
    @dataclass
    class Example:
        same_line: int = 1  # said on its line
        # said above,
        # over two lines
        above: list[int] = field(default_factory=list)
        bare: float = 0.0

    assert field_comments(Example) == {
        "same_line": "said on its line",
        "above": "said above, over two lines",
        "bare": "",
    }


def test_every_key_is_in_the_search_file_reference():
    text = (OUT / "search-file.md").read_text()
    missing = [name for name in NAMES if f"### `{name}`" not in text]
    assert not missing, f"docs/reference/search-file.md lacks {missing}: run `{COMMAND}`"


def test_every_verb_and_flag_has_help():
    verbs = verbs_of(build_parser())
    assert {"demo", "train", "validate", "search", "resume", "export", "cluster check", "ui"} <= {
        v for v, _, _ in verbs
    }
    assert all(text for _, text, _ in verbs), [verb for verb, text, _ in verbs if not text]
    silent = [f"{verb} {a.option_strings or a.dest}" for verb, _, p in verbs for a in arguments_of(p) if not a.help]
    assert not silent, f"give each argument a help text in pathsearch/cli.py: {silent}"


def test_the_tables_beside_the_code_name_keys_that_exist():
    """RULES, EXAMPLES, NOT_SEARCHED and the ranges read from the checks name keys of the schema; GUIDES names
    sections or keys."""
    ranges = need_ranges()
    assert len(ranges) >= 40, "the ranges are read from the checks' need(...) calls"
    assert ranges["train.lr"] == ["must be a finite number > 0"]
    assert ranges["search.confirm.alpha"] == ["must be in (0, 0.5]"]
    for table in (ranges, RULES, EXAMPLES, NOT_SEARCHED):
        assert set(table) <= NAMES, set(table) - NAMES
    sections = {name.rsplit(".", 1)[0] for name in NAMES} | {"space"}
    assert set(GUIDES) <= NAMES | sections, set(GUIDES) - NAMES - sections


@pytest.mark.parametrize("section", [name for name, _ in SECTIONS])
def test_each_example_has_its_keys_type(section):
    cls = dict(SECTIONS)[section]
    data: dict = {}
    for name, value in EXAMPLES.items():
        if name.startswith(section + "."):
            node = data
            *parents, last = name.split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    problems: list[str] = []
    from_dict(cls, data, "EXAMPLES", f"{section}.", problems)
    assert not problems


def accepted(tmp_path: Path, key: str, entry: dict) -> bool:
    """Whether the loader accepts a search file whose space searches `key` with `entry` (False when a problem
    names the entry)."""
    path = tmp_path / "search.yaml"
    base = {"model": {"kwargs": {"depth": 2}}, "search": {"num_samples": 4}, "space": {key: entry}}
    path.write_text(yaml.safe_dump(base))
    try:
        load_search_file(path)
    except ConfigError as err:
        assert all(f"space.{key}" in problem for problem in err.problems), err.problems
        return False
    return True


def test_the_searched_column_is_what_the_validator_accepts(tmp_path):
    """Each key said to be searchable is accepted with `choices` (and with `low`/`high` where the page says so),
    each key said not to be is refused, and the path entries take their `by` forms."""
    special = {"model.pruned", "model.ensemble_scale.init", "model.kwargs"}
    for key in KEYS:
        if key.name in special:
            continue
        said = space_text(key)
        assert accepted(tmp_path, key.name, {"choices": [key.default]}) == (not said.startswith("no")), key.name
        if "`low`/`high`" in said and key.default is not None:
            assert accepted(tmp_path, key.name, {"low": key.default, "high": key.default}), key.name
    assert accepted(tmp_path, "model.pruned", {"by": "layer"})
    assert accepted(tmp_path, "model.pruned", {"by": "shortest", "low": 0, "high": 2})
    assert accepted(tmp_path, "model.ensemble_scale.init", {"by": "group", "low": 0.1, "high": 1.0, "log": True})
    assert accepted(tmp_path, "model.kwargs.embed_dim", {"choices": [32, 64]})
    assert not accepted(tmp_path, "model.kwargs", {"choices": [{}]})
    assert not accepted(tmp_path, "model.distill.students", {"choices": [3]}), "a student list is not a point"
