from __future__ import annotations

import pytest

from pathsearch.config import TrialConfig, load_trial_config
from pathsearch.config.typed import ConfigError, apply_overrides, to_dict

GOOD = """\
# run: pathsearch train this.yaml
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 6, embed_dim: 64, num_heads: 2, num_classes: 10}
  pos_embed_std: 1.0
  pruned: [embed, attn.1]
  ensemble_scale: {kind: vector, init: {attn: 0.1, mlp: 1e-2}}
data: {name: digits, train_size: 300}
train: {epochs: 3, lr: 1e-3}
search: {num_samples: 4}
"""


def test_loads_typed_sections_and_converts_yaml_floats(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    cfg = load_trial_config(path)
    assert isinstance(cfg, TrialConfig)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # PyYAML reads 1e-3 as a string
    assert cfg.model.ensemble_scale.init == {"attn": 0.1, "mlp": 0.01}
    assert cfg.data.train_size == 300
    path_cfg = cfg.model.path_config()
    assert path_cfg.pruned == ["embed", "attn.1"] and path_cfg.model_kwargs["depth"] == 6
    assert to_dict(cfg)["train"]["epochs"] == 3


def test_dotted_overrides_use_the_same_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    cfg = load_trial_config(path, ["train.epochs=7", "model.ensemble_scale.init=0.1", "model.kwargs.depth=4"])
    assert cfg.train.epochs == 7
    assert cfg.model.ensemble_scale.init == 0.1
    assert cfg.model.kwargs["depth"] == 4
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}


def test_every_problem_is_reported_with_file_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {pruned: [embed, nope.3]}\n"
        "data: {name: svhn, batch_size: 0}\n"
        "train: {epochs: three, lr: -1.0, colour: red}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert "data.name" in text and "'svhn'" in text
    assert "train.epochs" in text and "'three'" in text
    assert "train.colour: unknown key" in text


def test_range_and_path_problems_are_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {pruned: [embed, nope.3]}\ndata: {batch_size: 0}\ntrain: {lr: -1.0}\n")
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    text = str(info.value)
    assert "data.batch_size: must be >= 1, got 0" in text
    assert "train.lr" in text and "-1.0" in text
    assert "'nope.3'" in text


def test_bad_override_and_missing_file_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_trial_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="no such file"):
        load_trial_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"data\.root: is required"):
        load_trial_config(None, ["data.name=cifar10"])


# ----- a search file: empty, without a space, unknown samplers, the depth its space is read against --------------
SPACELESS = """\
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 32, num_heads: 2}
data: {name: synthetic}
train: {epochs: 1}
"""


def test_an_empty_file_is_an_error_for_a_search_and_a_trial(tmp_path):
    """An empty file (a wrong path, a truncated copy) once validated as "all defaults" and started a search."""
    from pathsearch.config import load_search_file

    for text in ("", "# only a comment\n\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        for load in (load_search_file, load_trial_config):
            with pytest.raises(ConfigError) as info:
                load(path)
            assert info.value.problems == [
                f"{path}: top level: expected a mapping of sections (data, model, search, space, tracking, train), "
                "got an empty file"
            ]
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_search_file(path)


@pytest.mark.parametrize("space", ["", "space: {}\n", "space:\n"])
def test_a_search_needs_a_space_and_a_trial_does_not(tmp_path, space):
    from pathsearch.config import load_search_file

    path = tmp_path / "plain.yaml"
    path.write_text(SPACELESS + space)
    with pytest.raises(ConfigError) as info:
        load_search_file(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: space: nothing to search (no entries), got ")
    assert f"pathsearch train {path}" in info.value.problems[0]
    assert load_trial_config(path).model.kwargs["depth"] == 2  # the same file trains one trial


def test_unknown_sampler_names_are_refused_naming_the_known_ones(tmp_path):
    from pathsearch.config import load_search_file

    path = tmp_path / "s.yaml"
    path.write_text(SPACELESS + "space:\n  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    sets = ["search.sampler=cmaes", "search.two_stage.proxy_sampler=grid"]
    with pytest.raises(ConfigError) as info:
        load_search_file(path, sets)
    assert sorted(info.value.problems) == [
        f"{path}: search.sampler: expected one of 'tpe', 'nsga2', 'random', 'gp', 'qmc', got 'cmaes'",
        f"{path}: search.two_stage.proxy_sampler: expected one of 'random', 'qmc', 'tpe', got 'grid'",
    ]


@pytest.mark.filterwarnings("ignore:QMCSampler is experimental")
def test_every_sampler_the_config_accepts_is_one_optuna_builds():
    """The config's names and the sampler factory must agree: a name the config lets through and the factory does
    not know was once built as QMC, silently."""
    import typing

    from pathsearch.config import SearchConfig, TwoStageConfig
    from pathsearch.search.searcher import make_sampler

    names = typing.get_args(typing.get_type_hints(SearchConfig)["sampler"])
    proxy = typing.get_args(typing.get_type_hints(TwoStageConfig)["proxy_sampler"])
    assert set(proxy) <= set(names)
    built = {  # the Optuna class each is (nsga2: a subclass that pickles, see PicklableNSGAIISampler)
        name: next(c.__name__ for c in type(make_sampler(name, 0)).__mro__ if c.__module__.startswith("optuna."))
        for name in names
    }
    assert built == {
        "tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler", "gp": "GPSampler",
        "qmc": "QMCSampler",
    }  # fmt: skip


def test_the_dataset_shape_table_exists_once():
    """pathsearch.config.datasets.SHAPES is the one table of the datasets' shapes: the loaders and the searcher's
    max_params count read that object, and no module spells the table again (a dict keyed by the digits and two
    other datasets). A second copy once disagreed with the loaders."""
    import ast
    import typing
    from pathlib import Path

    from pathsearch.config import DataConfig, datasets
    from pathsearch.search import searcher
    from pathsearch.trial import data

    assert data.SHAPES is datasets.SHAPES and searcher.SHAPES is datasets.SHAPES
    assert set(datasets.SHAPES) == set(typing.get_args(typing.get_type_hints(DataConfig)["name"]))
    package = Path(datasets.__file__).parent
    tables = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Dict)
        and "digits" in (keys := {k.value for k in node.keys if isinstance(k, ast.Constant)})
        and len(keys & set(datasets.SHAPES)) >= 3
    ]
    assert tables == ["datasets.py:15"], f"dataset tables: {tables} (one is datasets.SHAPES: use it)"


def test_the_space_is_read_against_the_models_depth_never_an_assumed_one(tmp_path):
    """A depth-24 ViT named without model.kwargs.depth: its space has 49 paths. Once, without the model_depth
    callable (the resume path), 12 was assumed: 25 paths, so `high: 30` failed and masks were read wrongly."""
    from pathsearch.config import load_search_file
    from pathsearch.ensemble.model import model_depth

    path = tmp_path / "large.yaml"
    path.write_text(
        "model: {name: vit_large_patch16_224, kwargs: {img_size: 8, patch_size: 2, in_chans: 1}}\n"
        "space:\n  model.pruned: {by: shortest, low: 0, high: 30}\n"
    )
    assert load_search_file(path, model_depth=model_depth).space.num_paths == 49
    assert load_search_file(path, ["model.kwargs.depth=24"]).space.num_paths == 49
    with pytest.raises(ConfigError) as info:
        load_search_file(path)  # no timm at hand and no depth given: an error, not a guess
    assert info.value.problems == [
        f"{path}: model.kwargs.depth: needed to read the space, and the depth that model.name "
        "'vit_large_patch16_224' implies is only known to timm (not loaded here); set it, got None"
    ]
    # a problem elsewhere in the trial does not swap in the default model's depth (12: "would prune all 25 paths")
    with pytest.raises(ConfigError) as info:
        load_search_file(path, ["train.epochs=0", "space.train.lr.low=2", "space.train.lr.high=1"], model_depth)
    assert info.value.problems == [
        f"{path}: train.epochs: must be >= 1, got 0",
        f"{path}: space.train.lr: low must be at most high, got low 2 > high 1",
    ]
    with pytest.raises(ConfigError) as info:  # an unknown model: said once, and the rest of the space still checked
        load_search_file(path, ["model.name=no_such_vit", "space.train.lr.low=2", "space.train.lr.high=1"], model_depth)
    assert [p.split(": ")[1] for p in info.value.problems] == ["model.name", "space.train.lr"]


def test_run_folders_are_never_shared(tmp_path):
    """Two runs started in the same second get two folders (-2); an explicit name that exists is refused."""
    import time

    from pathsearch.storage.rundirs import unique_run_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seconds in range(30):  # every name the next 30 s could give is another run's already
        taken = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() + seconds))
        (tmp_path / "runs" / f"exp-{taken}").mkdir(parents=True, exist_ok=True)
    first = unique_run_dir(tmp_path / "runs", "exp")
    second = unique_run_dir(tmp_path / "runs", "exp")
    assert first.is_dir() and second.is_dir() and first != second
    assert first.name.rsplit("-", 1)[1] == "2" and second.name.rsplit("-", 1)[1] in ("2", "3")
    assert first.name >= f"exp-{stamp}-2"
    assert unique_run_dir(tmp_path, "x", "mine") == tmp_path / "mine"
    with pytest.raises(ValueError) as info:
        unique_run_dir(tmp_path, "x", "mine", "--name", "`pathsearch resume DIR`")
    assert str(info.value) == (
        f"--name mine: {tmp_path / 'mine'} already exists; choose another --name, or `pathsearch resume DIR`"
    )


def test_cluster_jobs_submitted_in_the_same_second_get_two_names(tmp_path):
    """On a cluster the job's submission id is the claim (Ray refuses a second job of one id), and a name whose run
    folder this machine sees under the storage path is skipped."""
    import time

    from pathsearch.cluster.jobs import claim_job_name

    jobs: dict[str, str] = {}

    def submit(name: str) -> str | None:  # what Ray's JobSubmissionClient does with a submission id
        if name in jobs:
            return None
        jobs[name] = f"raysubmit_{len(jobs)}"
        return name

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seconds in range(30):  # every name of the next 30 s: two jobs of it, and a run folder of the third
        base = f"exp-{time.strftime('%Y%m%d-%H%M%S', time.localtime(time.time() + seconds))}"
        jobs[base] = jobs[f"{base}-2"] = "earlier"
        (tmp_path / f"{base}-3").mkdir(exist_ok=True)
    a = claim_job_name(None, "exp", submit, str(tmp_path))
    b = claim_job_name(None, "exp", submit, str(tmp_path))
    assert a[0] >= f"exp-{stamp}-4" and a[0].endswith("-4")
    assert b[0] != a[0] and b[0].endswith(("-4", "-5"))  # -5 in the same second, -4 in the next
    assert a == (a[0], a[0]) and b == (b[0], b[0])
    with pytest.raises(ValueError, match=f"a job named '{a[0]}' already exists on the cluster: pass another --name"):
        claim_job_name(a[0], "exp", submit, str(tmp_path))
