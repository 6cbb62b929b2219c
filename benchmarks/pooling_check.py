"""Question: what does pooling the per-layer weight statistics by depth (first, last, mean over
layers; a fixed length for every model) cost or gain against the old per-layer concatenation
(length grows with the layer count), for a controller meta-trained on digits-mlp?

Method: `benchmarks/meta_training.py` of qan-ray at commit BASE_COMMIT (the last commit with the
per-layer vector), run in two git worktrees that differ only in `qan_ray/features.py`:
- per-layer: unchanged (2 x 192 weight statistics + 8 signals for the digits MLP);
- pooled: the same statistics pooled into first / last / mean over layers (3 x 192 + 8).
Same RLlib DQN, same seeds, same episodes, same evaluation seeds, so the only difference is the
pooling. A third arm runs this checkout's own benchmark (the whole new contract: pooled,
subsampled statistics and the new normalised signals). Each arm: --meta-seeds 3 --episodes 20
--eval-every 10; greedy final validation accuracy, mean +- sd over meta seeds.

    python benchmarks/pooling_check.py [--episodes 20] [--meta-seeds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE_COMMIT = "2e5ce86"

POOLED_WEIGHTS = '''def weight_features(model: nn.Module, names: tuple[str, ...] = ()
                    ) -> torch.Tensor:
    """Pooled by depth: first layer, last layer, mean over layers (pooling_check arm)."""
    feats = [symlog(layer_features(m.weight)) for _, m in monitored_modules(model, names)]
    return torch.cat([feats[0], feats[-1], torch.stack(feats).mean(dim=0)])
'''


def pooled_source(src: str) -> str:
    """BASE_COMMIT's features.py with the per-layer concatenation replaced by depth pooling."""
    start = src.index("def weight_features(")
    end = src.index("def feature_names(")
    src = src[:start] + POOLED_WEIGHTS + "\n\n" + src[end:]
    src = src.replace("for layer, _ in monitored_modules(model, names) if with_weights else []:",
                      'for layer in (("first", "last", "mean") if with_weights else ()):')
    src = src.replace("layers = len(monitored_modules(model, names)) if with_weights else 0",
                      "layers = 3 if with_weights else 0")
    assert "torch.stack(feats).mean" in src and "layers = 3" in src
    return src


def worktree(path: Path, pooled: bool) -> Path:
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), BASE_COMMIT], cwd=ROOT,
                       check=True)
    features = path / "qan_ray" / "features.py"
    original = subprocess.run(["git", "show", f"{BASE_COMMIT}:qan_ray/features.py"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    features.write_text(pooled_source(original) if pooled else original)
    return path


def run_arm(name: str, root: Path, args) -> Path:
    out = RESULTS / f"pooling_check_{name}.md"
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(root / "benchmarks" / "meta_training.py"), "--episodes",
           str(args.episodes), "--meta-seeds", str(args.meta_seeds), "--eval-every",
           str(args.eval_every), "--out", str(out)]
    print(f"[{name}] {' '.join(cmd)} (PYTHONPATH={root})", flush=True)
    subprocess.run(cmd, cwd=root, env=env, check=True)
    return out


def final_row(path: Path) -> str:
    text = path.read_text()
    match = re.search(r"^\| qan \(greedy\) \| (.*?) \| (.*?) \| (.*?) \|$", text, re.M)
    matched = re.search(r"^per meta seed: (.*?) \(", text, re.M)
    return (f"{match.group(1)} | {match.group(2)} | {match.group(3)} | "
            f"{matched.group(1) if matched else '?'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--meta-seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--arms", default="per-layer,pooled,contract")
    p.add_argument("--reuse", action="store_true",
                   help="keep an arm's existing result file instead of re-running it")
    args = p.parse_args()
    arms = {
        "per-layer": lambda: worktree(Path("/tmp/qan-pooling-per-layer"), pooled=False),
        "pooled": lambda: worktree(Path("/tmp/qan-pooling-pooled"), pooled=True),
        "contract": lambda: ROOT,
    }
    outs = {}
    for name in args.arms.split(","):
        done = RESULTS / f"pooling_check_{name}.md"
        outs[name] = done if args.reuse and done.exists() else run_arm(name, arms[name](), args)
    lines = ["# Pooling check: per-layer vs depth-pooled weight statistics (digits-mlp)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| arm | greedy final val acc | test acc | mini-batches to target (reached) | "
             "episodes until it matches the best fixed LR, per meta seed |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {final_row(path)} |" for name, path in outs.items()]
    lines += ["", "Per-arm details: " + ", ".join(f"`{p.name}`" for p in outs.values()), ""]
    (RESULTS / "pooling_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
