"""`qan` command line: one subcommand per job; each lives in the module that implements it.

A command module exposes `configure_<name>(parser)` and `run_<name>(args) -> int`. Modules import
Ray and friends inside `run_*`, so `qan --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "episode": ("qan_ray.demo", "run the QAN environment with a fixed-LR or random controller"),
    "train": ("qan_ray.meta", "meta-train a controller: RLlib DQN over Ray trainer actors"),
    "evaluate": ("qan_ray.evaluate", "greedy controller vs fixed/step/cosine baselines, seeds"),
    "tune": ("qan_ray.compare", "one Ray Tune experiment with a chosen scheduler"),
    "compare": ("qan_ray.compare", "QAN vs ASHA/PBT/... on the same task, seeds and budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qan", description="QAN on Ray: a learned controller that drives NN training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, f"configure_{name}")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(getattr(mod, f"run_{args.command}")(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"qan {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
