"""The flags of `qan evaluate` (qan_ray.evaluate runs it), apart from qan_ray.evaluate so that
parsing them (and `qan evaluate --help`) imports neither torch nor Ray: qan_ray.evaluate imports
the environment and the baselines when it loads."""

from __future__ import annotations

import argparse

from qan_ray.config import add_config_arguments


def configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", default="builtin",
                   help="controller folder (a `qan train --out` folder or its controller/), or "
                        "'builtin'")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds per method")
    p.add_argument("--out", required=True, help="folder for the table, Parquet and figures")
    p.add_argument("--lr-grid", default=None, help="fixed-LR grid, comma-separated (default: "
                   "the task LR x 0.2, 0.5, 1, 2, 4)")
    p.add_argument("--ablate-meta-momentum", type=float, default=0.0, metavar="COEF",
                   help="also run the controller with meta-momentum at this coefficient")
    p.add_argument("--population-baselines", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="train the baselines x seeds as populations (the fixed grid with the "
                        "adaptive baselines, then step and cosine): the same training loop, "
                        "equal to float tolerance where training is stable; "
                        "--no-population-baselines runs them episode by episode")
    p.add_argument("--lr-free", default="prodigy,schedulefree,dadapt", metavar="METHODS",
                   help="LR-free optimizer baselines, comma-separated (prodigy and dadapt at LR 1 "
                        "with cosine, schedulefree: the best of a small LR grid; qan_ray.lrfree; "
                        "the `baselines` extra), or 'none'")
    add_config_arguments(p)
