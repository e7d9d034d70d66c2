"""Every shipped search file loads, validates and says in its first line how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pathsearch.config import load_search_file
from pathsearch.config.typed import ConfigError
from pathsearch.ensemble.model import model_depth

FILES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_search_spaces_exist():
    assert FILES, "search_spaces/ holds no YAML files"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_search_file_names_its_command_and_has_every_section(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "pathsearch " in first and path.name in first
    assert set(yaml.safe_load(path.read_text())) == {"model", "data", "train", "search", "space", "tracking"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_search_file_validates_completely(path, tmp_path):
    overrides = []
    if "imagefolder" in path.read_text():
        # The shipped root is a cluster path; here a folder with train/ and val/ stands in for it.
        with pytest.raises(ConfigError, match=r"data\.root"):
            load_search_file(path, model_depth=model_depth)
        for split in ("train", "val", "test"):
            (tmp_path / split).mkdir()
        overrides = [f"data.root={tmp_path}"]
    spec = load_search_file(path, overrides, model_depth=model_depth)
    assert spec.search.num_samples >= 10
    assert spec.space.param_names()
    assert spec.search.confirm.enabled and spec.search.confirm.seeds >= 3  # every shipped search ends with a verdict
