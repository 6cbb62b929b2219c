"""`qan` command line: one subcommand per job; each lives in the module that implements it.

A command module exposes `configure_<name>(parser)` (its flags) and `run_<name>(args) -> int`.
Building the parser imports every command's flags module, and those import neither torch nor
Ray: the command modules import them inside `run_*` (and the functions it calls), so `qan --help`
and `qan <command> --help` stay fast (tests/test_cli.py checks both). Only the command that runs
is imported in full.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    """Defines run_<name> (and configure_<name>, unless `flags` names another module)."""
    help: str
    flags: str = ""
    """The module of configure_<name> when `module` imports torch when it loads."""


COMMANDS: dict[str, Command] = {
    "episode": Command("qan_ray.smoke",
                       "run the QAN environment with a fixed-LR or random controller"),
    "train": Command("qan_ray.meta", "meta-train a controller: RLlib DQN over Ray trainer actors"),
    "evaluate": Command("qan_ray.evaluate",
                        "greedy controller vs fixed/step/cosine baselines, seeds",
                        flags="qan_ray.evaluate_flags"),
    "tune": Command("qan_ray.compare", "one Ray Tune experiment with a chosen scheduler"),
    "compare": Command("qan_ray.compare",
                       "QAN vs ASHA/PBT/... on the same task, seeds and budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qan", description="QAN on Ray: a learned controller that drives NN training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        flags = importlib.import_module(command.flags or command.module)
        getattr(flags, f"configure_{name}")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command].module)
    try:
        return int(getattr(mod, f"run_{args.command}")(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"qan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM where the command has no handler of its own
        print(f"qan {args.command}: interrupted; nothing more was written. Run the same command "
              "again.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
