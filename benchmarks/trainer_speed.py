"""Claim: TargetTrainer's overhead over a bare PyTorch loop is under 5% (ratio >= 0.95).

Evidence: mini-batches per second of `TargetTrainer.train(k)` against a bare loop doing the same
work on the same device -- same model class and init, same data tensors, same batch size, same
optimizer, an on-device permutation per epoch and an on-device running loss (the way a careful
PyTorch loop avoids a host sync per step). The two alternate in rounds so drift hits both; we
report mean and std over rounds and ratio = mean trainer speed / mean bare speed.

    python benchmarks/trainer_speed.py [--task digits-mlp] [--batches 400] [--rounds 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from bare_loop import bare_member, bare_train

from qan_ray.config import from_dict
from qan_ray.data import load_data, resolve_device
from qan_ray.trainer import TargetTrainer

RESULTS = Path(__file__).parent / "results" / "trainer_speed.md"


def bare_loop(cfg, data, device, batches: int, seed: int) -> float:
    model, opt, gen = bare_member(cfg, data, device, seed)
    start = time.perf_counter()
    bare_train(model, opt, gen, cfg, data, device, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches / (time.perf_counter() - start)


def trainer_loop(cfg, data, device, batches: int, seed: int) -> float:
    tr = TargetTrainer(cfg.replace(seed=seed), data=data, device=device)
    start = time.perf_counter()
    tr.train(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cfg = from_dict(task=args.task, amp=False)  # the bare loop has no autocast either
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    bare_loop(cfg, data, device, 50, 0)  # warm-up both paths
    trainer_loop(cfg, data, device, 50, 0)
    bare, ours = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(cfg, data, device, args.batches, r))
        ours.append(trainer_loop(cfg, data, device, args.batches, r))
        print(f"round {r + 1}/{args.rounds}: bare {bare[-1]:.0f}/s, trainer {ours[-1]:.0f}/s",
              flush=True)
    ratio = statistics.mean(ours) / statistics.mean(bare)
    lines = [
        "# TargetTrainer speed vs a bare PyTorch loop",
        "",
        f"- task: {args.task} (model {cfg.model}, batch {cfg.batch_size}, optimizer "
        f"{cfg.optimizer}), device {device}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}",
        f"- {args.rounds} alternating rounds of {args.batches} mini-batches each",
        f"- bare loop: {statistics.mean(bare):.0f} +- {statistics.stdev(bare):.0f} batches/s",
        f"- TargetTrainer: {statistics.mean(ours):.0f} +- {statistics.stdev(ours):.0f} batches/s",
        "- goal: ratio >= 0.95",
        "",
        f"ratio: {ratio:.3f}",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
