"""The Tune examples of the docs run: README.md's "QANScheduler in Ray Tune" and docs/scheduler.md.

Rule: a ```python block whose first line starts with `# runs in tests/test_docs.py` is run; the
other blocks of those files are fragments (argument sketches, a recipe to adapt) and are not.
The marked blocks of one file run in document order in one namespace (a later block may use what
an earlier one defined), under the session's Ray, on a tiny budget: a block's line
`TRIALS, EPOCHS = <n>, <m>` is replaced by `TRIALS, EPOCHS = 2, 2` (a marked block that builds a
`tune.Tuner` must have that line). Every `Tuner.fit()` they call must end with all trials
terminated, none errored, and every result carrying QAN's `qan_lr` (a trial's exception does not
make `fit()` raise, so a broken trainable would otherwise pass). A broken block fails the test
with the traceback pointing at `<file>, block <k>` and the line inside that block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MARK = "# runs in tests/test_docs.py"
BUDGET = re.compile(r"^TRIALS, EPOCHS = .+$", re.M)
TRIALS = 2

DOCS = {  # file: the section whose blocks are read (None: the whole file)
    "README.md": "## QANScheduler in Ray Tune",
    "docs/scheduler.md": None,
}


def section(text: str, heading: str | None) -> str:
    if heading is None:
        return text
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def runnable_blocks(doc: str) -> list[str]:
    text = section((ROOT / doc).read_text(), DOCS[doc])
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    return [b for b in blocks if b.startswith(MARK)]


def on_tiny_budget(block: str, where: str) -> str:
    if "tune.Tuner(" not in block:
        return block
    assert len(BUDGET.findall(block)) == 1, (
        f"{where} builds a tune.Tuner but has no single `TRIALS, EPOCHS = ...` line to shrink")
    return BUDGET.sub(f"TRIALS, EPOCHS = {TRIALS}, 2", block)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_doc_blocks_run(doc, ray_session, tmp_path, monkeypatch):
    import ray.train.constants
    import ray.tune.experiment.experiment
    from ray import tune

    blocks = runnable_blocks(doc)
    assert blocks, f"{doc}: no ```python block starts with {MARK!r} (the runnable example)"
    for module in (ray.train.constants, ray.tune.experiment.experiment):  # not ~/ray_results
        monkeypatch.setattr(module, "DEFAULT_STORAGE_PATH", str(tmp_path))
    fits = []
    fit = tune.Tuner.fit

    def checked_fit(self):
        grid = fit(self)
        fits.append(grid)
        assert not grid.errors, f"{doc}: a trial failed: {grid.errors[0]!r}"
        assert grid.num_terminated == len(grid) == TRIALS, (grid.num_terminated, len(grid))
        for result in grid:
            assert "qan_lr" in result.metrics, f"{doc}: QAN did not drive {result.path}"
        return grid

    monkeypatch.setattr(tune.Tuner, "fit", checked_fit)
    # __main__: Ray pickles the blocks' functions by value, as it does a user's script's
    namespace = {"__name__": "__main__"}
    for k, block in enumerate(blocks, 1):
        where = f"{doc}, block {k}"
        exec(compile(on_tiny_budget(block, where), where, "exec"), namespace)
    assert fits, f"{doc}: its runnable blocks never call tuner.fit()"
