"""Every shipped search file loads, validates and says in its first line how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathsearch.config import load_trial_config

FILES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_search_spaces_exist():
    assert FILES, "search_spaces/ holds no YAML files"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_search_file_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "pathsearch " in first and path.name in first
    cfg = load_trial_config(path)
    assert cfg.train.epochs >= 1
