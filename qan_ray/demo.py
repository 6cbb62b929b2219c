"""`make demo`: the main jobs on the embedded default, run through the `qan` command line.

`make demo`: first the product as a user meets it: `qan compare` of the shipped controller
(`QANScheduler()`'s default, a generalist meta-trained on a task distribution) against ASHA, PBT
and FIFO in Ray Tune, on an embedded task it never trained on (the 2-D CNN on digits, a held-out
model family); then how a controller is made: a short `qan train` (RLlib DQN over 2 trainer
actors) on the embedded digits MLP and `qan evaluate` of the result against the baselines
(table + figures). Everything lands under runs/demo/. A few minutes on 2 CPUs.

(`qan episode`, the environment with a fixed-LR and a random controller, is qan_ray.smoke.)
"""

from __future__ import annotations

import shutil
import time

from qan_ray.cli import main as cli_main

DEMO_OUT = "runs/demo"


def demo_commands(out: str = DEMO_OUT) -> list[list[str]]:
    """The demo's steps, as `qan` argument lists (printed before they run). The trained
    controller acts once per epoch (35 mini-batches) from a random initial LR, as it will in Ray
    Tune, where trainables report once per epoch."""
    task = ["--task", "digits-mlp", "--control-interval", "35", "--lr-init-range", "0.001,1",
            "--lr-schedule", "cosine"]
    return [
        ["compare", "--task", "digits-cnn", "--schedulers", "qan,asha,pbt,fifo", "--seeds", "0",
         "--policy", "builtin", "--out", f"{out}/compare"],
        ["train", *task, "--episodes", "12", "--num-actors", "2", "--learning-starts", "32",
         "--out", f"{out}/train"],
        ["evaluate", "--controller", f"{out}/train", "--seeds", "3", "--out", f"{out}/evaluate"],
    ]


def main() -> int:
    shutil.rmtree(DEMO_OUT, ignore_errors=True)  # the demo's own folder only
    start = time.time()
    for argv in demo_commands():
        print(f"\n$ qan {' '.join(argv)}", flush=True)
        rc = cli_main(argv)
        if rc:
            return rc
    print(f"\ndemo done in {time.time() - start:.0f}s; outputs under {DEMO_OUT}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
