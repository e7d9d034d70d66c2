"""`pathsearch <verb>`: the command line. Each verb imports its heavy modules lazily, so `--help` is instant.

Bad input (ValueError from config/model validation) exits with code 2 and a one-line message per problem.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

INTERRUPTED = 130  # exit code after Ctrl-C, as a shell reports a command SIGINT ended


def _demo(args: argparse.Namespace) -> int:
    from pathsearch.demo import run_demo
    from pathsearch.trial.train import resolve_device

    device = resolve_device(args.device)  # a missing GPU is bad input: exit 2 before any work
    print(f"training a depth-6 path-ensemble ViT on digits for {args.epochs} epochs on {device} ...", flush=True)
    result = run_demo(out_dir=args.out, epochs=args.epochs, seed=args.seed, threads=args.threads, device=device)
    print(result.analysis.format_table())
    for label, path in result.files.items():
        print(f"{label}: {path}")
    print(f"done in {result.seconds:.1f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathsearch.preflight import load_trial
    from pathsearch.storage.rundirs import unique_run_dir

    cfg = load_trial(args.file, args.set)  # ConfigError (a ValueError): exit 2 before any work
    from pathsearch.trial.train import check_compile, resolve_device

    device = resolve_device(args.device)  # so are a device that is not there and a torch that cannot compile
    if cfg.train.compile:
        check_compile()

    # Every run gets a folder of its own (two runs in one folder would mix checkpoints and results): a new one under
    # runs/train/ (-2, -3, ... when started in the same second), or --out when it does not exist yet. A resumed run
    # may write into an existing --out: the run it continues, whose checkpoint it was given.
    made = not (args.resume and args.out)
    if args.out is None:
        out = unique_run_dir("runs/train", Path(args.file).stem)
    elif made:
        out = unique_run_dir(".", Path(args.file).stem, args.out, "--out", "--resume a checkpoint of the run in it")
    else:
        out = Path(args.out)
    from pathsearch.trial.train import NonFiniteLossError, fit, load_trial_data

    # a progress bar redraws itself with carriage returns: only on a terminal, never into a log or a pipe
    progress = not args.no_progress and sys.stderr.isatty()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        std = f" ± {100 * metrics['val_acc_std']:.2f}" if "val_acc_std" in metrics else ""
        print(
            f"epoch {metrics['epoch']:>3}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_acc {100 * metrics['val_acc']:.2f}%{std}  "
            f"val_acc_full {100 * metrics['val_acc_full']:.2f}%  {metrics['images_per_s']:.0f} img/s",
            flush=True,
        )

    try:
        result = fit(cfg, report, checkpoint_dir=args.resume, work_dir=out, device=device, progress=progress)
    except BaseException as err:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # failed before writing anything (bad input: exit 2): no empty folder left behind
        if isinstance(err, NonFiniteLossError):
            print(f"pathsearch train: trial failed: {err}", file=sys.stderr)
            return 1
        raise
    print(f"final metrics (trained on {device}):")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
    test = load_trial_data(cfg).test  # loaded once per process: fit already holds it
    if cfg.train.test and test is not None and "test_acc" in result.metrics:
        seeds = ", ".join(str(cfg.train.seed + k) for k in range(cfg.train.seeds))
        m = result.metrics
        std = f" ± {100 * m['test_acc_std']:.2f}" if "test_acc_std" in m else ""
        print(f"test ({len(test)} images, seeds {seeds}): test_acc {100 * m['test_acc']:.2f}%{std}")  # type: ignore[arg-type]
    print(f"checkpoint: {result.checkpoint_dir}")
    for label, path in result.files.items():
        print(f"{label}: {path}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pathsearch.preflight import load_search

    spec = load_search(args.file, args.set)
    print(f"# {args.file}: valid; resolved with defaults and overrides:")
    print(spec.to_yaml(), end="")
    names = spec.space.param_names()
    print(f"# {len(names)} searched parameter(s) over {spec.space.num_paths} paths: {', '.join(names) or 'none'}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from pathsearch.preflight import load_search

    spec = load_search(args.file, args.set)  # nothing is written when invalid
    from pathsearch.search.driver import run_search

    result = run_search(
        spec,
        storage_path=args.storage_path,
        tracking_uri=args.tracking_uri,
        name=args.name,
        address=args.address,
        library_output=args.verbose,
        keep_copy=args.keep_working_copy,
    )
    _print_result(result, spec.search.metrics, spec.search.modes)
    return INTERRUPTED if result.interrupted else 0


def _resume(args: argparse.Namespace) -> int:
    import tempfile

    from pathsearch import storage
    from pathsearch.preflight import load_search
    from pathsearch.search.driver import resume_search

    result = resume_search(
        args.run_dir,
        address=args.address,
        library_output=args.verbose,
        keep_copy=args.keep_working_copy,
        max_seeds=args.max_seeds,
    )
    with tempfile.TemporaryDirectory(prefix="pathsearch-") as tmp:
        folder = result.run_dir
        if result.stored_at and not folder.is_dir():  # a finished search's working copy is removed: from the store
            folder = Path(tmp)
            storage.fetch(result.stored_at, ["search.yaml"], folder)
        spec = load_search(folder / "search.yaml")
    _print_result(result, spec.search.metrics, spec.search.modes)
    return INTERRUPTED if result.interrupted else 0


def _print_result(result: Any, metrics: list[str], modes: list[str]) -> None:
    """The search's trials, files and MLflow run, then the confirmation; the verdict is the last line."""
    if result.counts:
        print(f"\ntrials: {', '.join(f'{k} {v}' for k, v in result.counts.items())}")
    if result.ended_early:
        print(f"the searcher ended the search early: {result.ended_early} (the space has few distinct configurations)")
    columns = list(dict.fromkeys([*metrics, "val_acc", "kept_paths"]))  # each metric once
    rows = [("baseline", result.baseline), ("best", result.best)]
    rows += [(f"pareto {k}", row) for k, row in enumerate(result.pareto)]
    if result.baseline is not None or result.best is not None:
        print(f"{'search':<10} " + " ".join(f"{c:>16}" for c in columns) + "  configuration (one seed, val split)")
    for label, row in rows:
        if row is not None:
            print(f"{label:<10} " + " ".join(f"{_cell(row, c):>16}" for c in columns) + f"  {row['overrides']}")
    if result.pareto:
        print(f"Pareto front over {', '.join(f'{m} ({o})' for m, o in zip(metrics, modes, strict=True))}")
    # a finished search kept in a store has removed this machine's working copy: its files are in the store
    removed = bool(result.stored_at) and not result.run_dir.is_dir()
    for label, path in result.files.items():
        print(f"{label}: {_stored(path, result) if removed else path}")
    if removed:
        print(f"run directory: {result.stored_at}")
    elif result.stored_at:
        print(f"run directory: {result.stored_at} (this machine's working copy: {result.run_dir})")
    else:
        print(f"run directory: {result.run_dir}")
    print(f"MLflow experiment {result.experiment!r}, parent run {result.parent_run_id}")
    if result.interrupted:
        print(f"the search was interrupted; continue it with: pathsearch resume {result.stored_at or result.run_dir}")
    elif result.confirmation is not None:
        from pathsearch.search.verdict import format_confirmation

        print(format_confirmation(result.confirmation))
    else:
        print(
            "verdict: none: search.confirm is off, so 'best' is one seed's val score, chosen on the split it is "
            "reported on (add search.confirm for a paired-seed verdict on a test split)"
        )


def _stored(path: Path, result: Any) -> str:
    """Where a file of the run's removed working copy lives in the store."""
    from pathsearch import storage

    try:
        return storage.join(result.stored_at, *path.relative_to(result.run_dir).parts)
    except ValueError:  # not in the run folder
        return str(path)


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if column.endswith("_acc"):
        std = row.get(f"{column}_std")
        return f"{100 * value:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _export(args: argparse.Namespace) -> int:
    from pathsearch.export import export_best, export_pareto

    if args.pareto:
        if args.register is not None:
            raise ValueError(f"--register {args.register}: a Pareto front is not one model; export it without --pareto")
        metrics = args.metric or ["val_acc", "kept_paths"]
        modes = args.mode or ["max", "min"][: len(metrics)]
        if len(modes) != len(metrics):
            raise ValueError(f"--pareto needs one --mode per --metric, got {metrics} and {modes}")
        front = export_pareto(args.experiment, args.out, metrics, modes, args.tracking_uri, run_id=args.run_id)
        for item in front:
            print(f"run {item.run_id}  {item.metrics}  -> {item.files['path_config']}")
        print(f"Pareto front of {len(front)} configuration(s): {args.out}")
        return 0
    metric, mode = (args.metric or ["val_acc"])[0], (args.mode or ["max"])[0]
    seed = args.seed if args.seed in (None, "all") else _int_arg("--seed", args.seed)
    result = export_best(
        args.experiment,
        args.out,
        args.tracking_uri,
        metric,
        mode,
        args.with_weights,
        run_id=args.run_id,
        seed=seed,
        register=args.register,
    )
    p = result.provenance
    if p.get("confirmed"):
        print(f"confirmed winner of search {p['search_name']} ({p['search_run_id']}): {p['configuration']}")
        mean_std = "val_acc {:.2f} ± {:.2f}%, test_acc {:.2f} ± {:.2f}%".format(
            *(100 * (p[k] or float("nan")) for k in ("val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std"))
        )
        print(f"  over seeds {p['seeds']}: {mean_std}")
        print(f"  verdict: {p['verdict']}")
        weights = "weights and learned EnsembleScale" if args.with_weights else "learned EnsembleScale values"
        print(f"  {weights} of seed {p['weights_seed'] if args.seed != 'all' else 'each seed'}")
    else:
        print(
            f"search {p['search_name']} ({p['search_run_id']}) ran no confirmation: best trial by one seed's {metric}"
        )
        print(f"  run {result.run_id}: {metric} {result.metrics.get(metric)}")
    for label, path in result.files.items():
        print(f"{label}: {path}")
    if result.registered is not None:
        name, version = result.registered
        print(f"registered: model {name!r} version {version} (mlflow.pyfunc.load_model('models:/{name}/{version}'))")
    return 0


def _int_arg(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag}: expected a seed number or 'all', got {text!r}") from None


def _fit_scales(args: argparse.Namespace) -> int:
    from pathsearch.fitscales import fit_scales_run
    from pathsearch.trial.train import resolve_device

    device = resolve_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = fit_scales_run(
        args.run_id,
        args.tracking_uri,
        search_file=args.file,
        out_dir=args.out,
        fit_fraction=args.fit_fraction,
        steps=args.steps,
        lr=args.lr,
        prune=args.prune,
        seed=args.seed,
        device=device,
    )
    m = result.metrics
    print(f"fitted on {int(m['fit_images'])} held-out images, reported on the other {int(m['val_images'])}:")
    for label, key in (("fit split", "fit_split_acc"), ("validation split", "val_acc")):
        before, after = 100 * m[f"{key}_before"], 100 * m[f"{key}_after"]
        print(f"  {label:<16} accuracy {before:6.2f}% -> {after:6.2f}% ({after - before:+.2f} points)")
    print("  EnsembleScale factors: " + ", ".join(f"{n} {f:.3g}" for n, f in result.factors.items()))
    if result.pruned:
        print(f"  pruned: {', '.join(result.pruned)}")
    print(f"new child run {result.run_id} of run {result.source_run_id}")
    for label, path in result.files.items():
        print(f"{label}: {path}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pathsearch.cluster.jobs import submit_resume, submit_search
    from pathsearch.preflight import load_search

    if (args.file is None) == (args.resume is None):
        raise ValueError("give a search file to submit, or --resume RUN_DIR (not both)")
    if args.resume:
        job = submit_resume(args.resume, args.address, name=args.name)
    else:
        load_search(args.file, args.set)  # invalid: exit 2, nothing submitted
        job = submit_search(
            args.file, args.address, args.tracking_uri, args.storage_path, args.set, args.name, not args.no_check
        )
    print(f"submitted job {job.job_id} to {job.address}", flush=True)
    print(f"  follow it:  pathsearch logs {job.job_id} --address {job.address} --follow")
    print(f"  results:    MLflow at {job.tracking_uri}, trials under {job.storage_path}/{job.name}")
    if not args.wait:
        return 0
    return _follow(job.address, job.job_id)


def _follow(address: str, job_id: str) -> int:
    from pathsearch.cluster.jobs import TERMINAL_EXIT, job_logs

    try:
        status = job_logs(address, job_id, follow=True)
    except KeyboardInterrupt:
        print(f"\nthe job goes on; stop it with: pathsearch stop {job_id} --address {address}", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    return TERMINAL_EXIT.get(status, 1)


def _status(args: argparse.Namespace) -> int:
    from pathsearch.cluster.jobs import job_status

    info = job_status(args.address, args.job)
    print(f"job {info['job_id']}: {info['status']}")
    if info["message"]:
        print(f"  {info['message']}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from pathsearch.cluster.jobs import dashboard_address, job_logs

    if args.follow:
        return _follow(dashboard_address(args.address), args.job)
    job_logs(args.address, args.job)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from pathsearch.cluster.jobs import stop_job

    print(f"job {args.job}: {stop_job(args.address, args.job)}")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from pathsearch.cluster.check import check_cluster

    report = check_cluster(args.address, args.tracking_uri, args.storage_path, verbose=args.verbose)
    print(report.last_line())
    return 1 if report.failed else 0


def _ui(args: argparse.Namespace) -> int:
    from pathsearch.ui import serve

    return serve(args.tracking_uri, args.port, args.experiment, verbose=args.verbose)


def _override(text: str) -> str:
    """One --set item. Any word without `=` is refused: --set takes every word up to the next option, so a search
    file written after it would otherwise be read as an override."""
    if "=" not in text.lstrip("="):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, got {text!r} (give a file before --set: FILE --set a=1 b=2)"
        )
    return text


def _add_set(verb: argparse.ArgumentParser, help_text: str = "override(s): --set a.b=1 c=x, or one --set each") -> None:
    verb.add_argument(
        "--set", nargs="+", action="extend", type=_override, default=[], metavar="KEY=VALUE", help=help_text
    )


def _add_keep_copy(verb: argparse.ArgumentParser) -> None:
    verb.add_argument(
        "--keep-working-copy",
        action="store_true",
        help="with an object store: keep this machine's working copy of the run when the search finishes (by "
        "default it is removed once everything is uploaded; an interrupted or failed search keeps it)",
    )


def _add_device(verb: argparse.ArgumentParser) -> None:
    verb.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)"
    )


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line as every other bad input is (`pathsearch VERB: error:
    what`, exit 2), without the usage text argparse prints before them (`--help` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pathsearch", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="train a tiny ViT on the offline digits data and analyse its paths")
    demo.add_argument("--out", default="runs/demo", help="folder for path_analysis.json/.png and path_config.yaml")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _add_device(demo)
    demo.set_defaults(func=_demo)
    train = verbs.add_parser("train", help="run one trial of a search file's base configuration (no Ray)")
    train.add_argument("file", help="search file (YAML) whose model/data/train sections define the trial")
    _add_set(train, "override(s), e.g. --set train.epochs=3 data.batch_size=32")
    train.add_argument("--out", default=None, help="folder for checkpoints and results (default runs/train/...)")
    train.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR", help="continue from a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    _add_device(train)
    train.set_defaults(func=_train)
    validate = verbs.add_parser("validate", help="check a search file and print it resolved (exit 2 if invalid)")
    validate.add_argument("file", help="search file (YAML)")
    _add_set(validate)
    validate.set_defaults(func=_validate)
    search = verbs.add_parser("search", help="run the search of a search file (Ray Tune + Optuna + MLflow)")
    search.add_argument("file", help="search file (YAML)")
    _add_set(search)
    search.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    search.add_argument(
        "--storage-path",
        default="runs/search",
        help="where the search keeps its state: a folder, or an object store URI (s3://bucket/prefix, gs://...; "
        "endpoint and credentials from the store's environment variables, e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)",
    )
    search.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    search.add_argument("--name", default=None, help="run name (default: file name + time)")
    _add_keep_copy(search)
    search.set_defaults(func=_search)
    resume = verbs.add_parser("resume", help="continue an interrupted search from its run directory")
    resume.add_argument("run_dir", help="the run directory, or its URI in an object store (s3://bucket/prefix/NAME)")
    resume.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    resume.add_argument(
        "--max-seeds",
        type=int,
        default=None,
        help="extend a finished sequential confirmation that left challengers undecided up to this many paired "
        "seeds (once: a reserve of its alpha pays for it, so the whole confirmation keeps its error at alpha)",
    )
    _add_keep_copy(resume)
    resume.set_defaults(func=_resume)
    export = verbs.add_parser(
        "export", help="write a search's confirmed winner (or best trial) as a PathConfig, read from MLflow"
    )
    export.add_argument("--experiment", required=True, help="the MLflow experiment of the search (tracking.experiment)")
    export.add_argument("--run-id", default=None, help="the search's parent run (default: the latest finished search)")
    export.add_argument("--seed", default=None, help="which confirmation seed's weights (default: the first), or all")
    export.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    export.add_argument("--metric", action="append", default=None, help="metric to rank by (default val_acc)")
    export.add_argument(
        "--mode",
        action="append",
        choices=["max", "min"],
        default=None,
        help="one per --metric (default max; with --pareto max for val_acc, min for kept_paths)",
    )
    export.add_argument("--pareto", action="store_true", help="export every Pareto-front configuration")
    export.add_argument("--with-weights", action="store_true", help="also write the weights (.safetensors)")
    export.add_argument(
        "--register", default=None, metavar="NAME", help="also register the confirmed winner in MLflow's Model Registry"
    )
    export.add_argument("--out", required=True, help="output PathConfig file (.yaml or .json)")
    export.set_defaults(func=_export)
    fit = verbs.add_parser("fit-scales", help="fit a trained run's EnsembleScale (and mask) on held-out data")
    fit.add_argument("--run-id", required=True, help="MLflow run of a trained trial (with path_config and weights)")
    fit.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    fit.add_argument("--file", default=None, help="search file for the data (default: the run's search.yaml)")
    fit.add_argument("--fit-fraction", type=float, default=0.5, help="share of the validation images to fit on")
    fit.add_argument("--steps", type=int, default=300, help="gradient steps (Adam, full batch)")
    fit.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate")
    fit.add_argument("--prune", action="store_true", help="also prune paths greedily on the fit split")
    fit.add_argument("--seed", type=int, default=0, help="seed of the fit/validation split")
    fit.add_argument("--out", default=None, help="folder for the fitted path_config.yaml and weights")
    fit.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _add_device(fit)
    fit.set_defaults(func=_fit_scales)
    submit = verbs.add_parser("submit", help="run a search on a Ray cluster as a Ray job (Jobs API)")
    submit.add_argument("file", nargs="?", help="search file (or --resume RUN_DIR)")
    submit.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped search on the cluster")
    submit.add_argument("--address", default=None, help="Ray dashboard http://HEAD:8265 (default: $RAY_ADDRESS)")
    _add_set(submit)
    submit.add_argument("--tracking-uri", default=None, help="MLflow server every node can reach (required)")
    submit.add_argument(
        "--storage-path", default=None, help="a folder every node mounts, or s3://... / gs://... (required)"
    )
    submit.add_argument("--name", default=None, help="job id and run name (default: file name + time)")
    submit.add_argument("--wait", action="store_true", help="follow the logs; exit 0 succeeded, 1 failed, 3 stopped")
    submit.add_argument("--no-check", action="store_true", help="skip the check from every node before submitting")
    submit.set_defaults(func=_submit)
    for verb, func, help_text in (
        ("status", _status, "a submitted search's status"),
        ("logs", _logs, "a submitted search's output"),
        ("stop", _stop, "stop a submitted search (Ray interrupts its driver, which ends unfinished runs)"),
    ):
        sub = verbs.add_parser(verb, help=help_text)
        sub.add_argument("job", help="job id printed by submit")
        sub.add_argument("--address", default=None, help="Ray dashboard http://HEAD:8265 (default: $RAY_ADDRESS)")
        if verb == "logs":
            sub.add_argument("--follow", action="store_true", help="stream until the job ends; exit as --wait does")
        sub.set_defaults(func=func)
    cluster = verbs.add_parser("cluster", help="check a Ray cluster before the first submit")
    what = cluster.add_subparsers(dest="cluster_verb", metavar="check", required=True)
    check = what.add_parser(
        "check",
        help="what a search on the cluster at ADDRESS needs and whether it holds (give the --tracking-uri and "
        "--storage-path you will submit with): exit 0 when nothing failed, 1 with the first fix",
    )
    check.add_argument(
        "address", nargs="?", default=None, help="Ray dashboard http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    check.add_argument(
        "--tracking-uri", default=None, help="the MLflow server you will submit with (each node reaches it)"
    )
    check.add_argument("--storage-path", default=None, help="the storage path you will submit with (each node sees it)")
    # (SUPPRESS: `pathsearch cluster -v check` keeps the -v given before the sub-verb)
    check.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="also print the job's log"
    )
    check.set_defaults(func=_cluster)
    ui = verbs.add_parser("ui", help="serve the MLflow UI on 127.0.0.1, opened on the latest search's runs")
    ui.add_argument("--tracking-uri", default=None, help="MLflow store or server (default: sqlite:///mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="port of the UI on 127.0.0.1")
    ui.add_argument("--experiment", default=None, help="open this experiment (default: the latest search's)")
    ui.set_defaults(func=_ui)
    for sub in verbs.choices.values():
        sub.add_argument(
            "-v", "--verbose", action="store_true", help="show Ray's and Optuna's own output, and tracebacks"
        )
    return parser


def flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with a verb's own flags, told before it reads a file or a store, opens a server or downloads
    anything: one line each, naming the flag and the value. Checks the flags this verb has (by name)."""
    from pathsearch import storage
    from pathsearch.config import tracking_uri_problems
    from pathsearch.config.checks import MAX_PROCESSES, SEED_MAX
    from pathsearch.storage.rundirs import name_problems

    got = vars(args)
    problems = []

    def need(flag: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"--{flag.replace('_', '-')}: {what}, got {got[flag]!r}")

    if args.verb in ("search", "submit"):
        problems += name_problems(got.get("name"))
        stem = Path(got["file"]).stem if got.get("file") and got.get("name") is None else None
        if stem is not None and name_problems(stem):  # the run is named after the file: FILE-<time>
            problems.append(f"{got['file']}: without --name the run is named after the file, and {stem!r} is not one "
                            "folder name of letters, digits, '.', '_' and '-' (not starting with '.' or '-'); give "
                            "--name or rename the file")  # fmt: skip
    if got.get("storage_path") is not None:
        where = got["storage_path"]
        if storage.is_remote(where):
            try:
                storage.check_form(str(where))
            except ValueError as err:
                problems.append(str(err))
        else:
            problems += storage.local_problems(where)
    problems += tracking_uri_problems(got.get("tracking_uri"), f"--tracking-uri {got.get('tracking_uri')}")
    if "fit_fraction" in got:
        need("fit_fraction", 0 < got["fit_fraction"] < 1, "must be between 0 and 1 (the share of images to fit on)")
    if args.verb == "fit-scales":
        need("steps", got["steps"] >= 1, "must be >= 1")
        need("lr", got["lr"] > 0 and math.isfinite(got["lr"]), "must be a finite number > 0")
    if args.verb in ("fit-scales", "demo"):  # (export's --seed names a confirmation seed, or all)
        need("seed", 0 <= got["seed"] <= SEED_MAX, "must be 0 to 2**32 - 1 (numpy's seeds)")
    for flag in ("threads", "epochs"):
        if got.get(flag) is not None:
            need(flag, got[flag] >= 1, "must be >= 1")
    if got.get("threads") is not None:
        need("threads", got["threads"] <= MAX_PROCESSES, f"must be at most {MAX_PROCESSES}")
    if args.verb == "ui":
        need("port", 1 <= got["port"] <= 65535, "must be a port number, 1 to 65535")
    for flag in ("out", "resume"):  # (a search file is read, and judged, by its loader before any work)
        if got.get(flag) is None or storage.is_remote(got[flag]):
            continue  # a store is judged by its own check
        path = Path(got[flag]).expanduser()
        if flag == "out" and args.verb == "export":
            if path.is_dir():
                need("out", False, "is a folder; give the file to write (.yaml, .yml or .json)")
            else:
                need("out", path.suffix.lower() in (".yaml", ".yml", ".json"), "must end in .yaml, .yml or .json")
        elif flag == "out":
            need("out", not (path.exists() and not path.is_dir()), "is a file; give a folder")
        else:
            need(flag, path.exists(), "does not exist")
    if got.get("run_id") is not None:
        need("run_id", re.fullmatch(r"[0-9a-zA-Z-]{1,64}", got["run_id"]) is not None,
             "is not an MLflow run id (the 32 hex digits a search or trial prints)")  # fmt: skip
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one verb. Every way it ends is one line and an exit code: 0 done, 1 failed, 2 bad input, 3 stopped (a
    submitted job), 130 interrupted (Ctrl-C). With -v a failure shows its traceback."""
    args = build_parser().parse_args(argv)
    if not args.verbose:  # MLflow's INFO lines (store creation, migrations) are its business, not the user's
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # if it already was
    try:
        problems = flag_problems(args)
        if problems:
            raise ValueError("\n".join(problems))
        return int(args.func(args))
    except ValueError as err:  # bad input (ConfigError included): one line per problem, exit code 2
        for line in str(err).splitlines():
            print(f"pathsearch {args.verb}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        run_dir = getattr(err, "run_dir", None)  # search.Interrupted: a started search, which resume continues
        hint = f"; continue it with: pathsearch resume {run_dir}" if run_dir else ""
        print(f"pathsearch {args.verb}: interrupted{hint}", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # a failure: one line; the traceback with -v (or for a bug report)
        if args.verbose:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"pathsearch {args.verb}: failed: {type(err).__name__}: {first} (-v shows the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
