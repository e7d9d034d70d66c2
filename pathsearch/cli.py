"""`pathsearch <verb>`: the command line. Each verb imports its heavy modules lazily, so `--help` is instant.

Bad input (ValueError from config/model validation) exits with code 2 and a one-line message per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from pathsearch.demo import run_demo

    print(f"training a depth-6 path-ensemble ViT on digits for {args.epochs} epochs ...", flush=True)
    result = run_demo(out_dir=args.out, epochs=args.epochs, seed=args.seed, threads=args.threads)
    print(result.analysis.format_table())
    for label, path in result.files.items():
        print(f"{label}: {path}")
    print(f"done in {result.seconds:.1f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from pathsearch.config import load_trial_config

    cfg = load_trial_config(args.file, args.set)  # ConfigError (a ValueError): exit 2 before any work
    from pathsearch.train import NonFiniteLossError, fit

    out = Path(args.out or f"runs/train/{Path(args.file).stem}-{time.strftime('%Y%m%d-%H%M%S')}")

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        std = f" ± {100 * metrics['val_acc_std']:.2f}" if "val_acc_std" in metrics else ""
        print(
            f"epoch {metrics['epoch']:>3}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_acc {100 * metrics['val_acc']:.2f}%{std}  "
            f"val_acc_full {100 * metrics['val_acc_full']:.2f}%  {metrics['images_per_s']:.0f} img/s",
            flush=True,
        )

    try:
        result = fit(cfg, report, checkpoint_dir=args.resume, work_dir=out, progress=not args.no_progress)
    except NonFiniteLossError as err:
        print(f"pathsearch train: trial failed: {err}", file=sys.stderr)
        return 1
    print("final metrics:")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"checkpoint: {result.checkpoint_dir}")
    for label, path in result.files.items():
        print(f"{label}: {path}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pathsearch.config import load_search_file
    from pathsearch.model import model_depth

    spec = load_search_file(args.file, args.set, model_depth=model_depth)
    print(f"# {args.file}: valid; resolved with defaults and overrides:")
    print(spec.to_yaml(), end="")
    names = spec.space.param_names()
    print(f"# {len(names)} searched parameter(s) over {spec.space.num_paths} paths: {', '.join(names) or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathsearch", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="train a tiny ViT on the offline digits data and analyse its paths")
    demo.add_argument("--out", default="runs/demo", help="folder for path_analysis.json/.png and path_config.yaml")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    demo.set_defaults(func=_demo)
    train = verbs.add_parser("train", help="run one trial of a search file's base configuration (no Ray)")
    train.add_argument("file", help="search file (YAML) whose model/data/train sections define the trial")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    train.add_argument("--out", default=None, help="folder for checkpoints and results (default runs/train/...)")
    train.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR", help="continue from a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    train.set_defaults(func=_train)
    validate = verbs.add_parser("validate", help="check a search file and print it resolved (exit 2 if invalid)")
    validate.add_argument("file")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    validate.set_defaults(func=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as err:  # bad input (ConfigError included): one line per problem, exit code 2
        for line in str(err).splitlines():
            print(f"pathsearch {args.verb}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
