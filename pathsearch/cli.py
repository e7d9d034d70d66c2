"""`pathsearch <verb>`: the command line. Each verb imports its heavy modules lazily, so `--help` is instant.

Bad input (ValueError from config/model validation) exits with code 2 and a one-line message per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from pathsearch.demo import run_demo

    print(f"training a depth-6 path-ensemble ViT on digits for {args.epochs} epochs ...", flush=True)
    result = run_demo(out_dir=args.out, epochs=args.epochs, seed=args.seed, threads=args.threads)
    print(result.analysis.format_table())
    for label, path in result.files.items():
        print(f"{label}: {path}")
    print(f"done in {result.seconds:.1f} s")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as err:
        print(f"pathsearch {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
