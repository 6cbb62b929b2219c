"""BASE+cosine schedulers of `qan compare` (asha+cosine, fifo+cosine, ...): every trial decays its
sampled LR along a cosine over its epoch budget, applied by the trainable, while BASE decides
STOP/CONTINUE as alone. One real Tune run (the conftest Ray session) plus pure checks."""

from __future__ import annotations

import math

import pytest

from qan_ray import protocol
from qan_ray.config import from_dict
from qan_ray.schedules import baseline_schedule
from trainables.targets import check_trial_schedule, scheduled_lr, split_config

EPOCHS = 3


def _proto(**kw) -> protocol.Protocol:
    return protocol.Protocol(task_config={"task": "digits-mlp", "torch_threads": 1},
                             **{"samples": 2, "epochs": EPOCHS, "max_concurrent": 1, **kw})


def _sampled(proto: protocol.Protocol, name: str, seed: int) -> list[dict]:
    """The trial configs the protocol's search algorithm hands out, in trial order (no Ray)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    gen = BasicVariantGenerator(random_state=seed)
    gen.add_configurations([Experiment("sampled", run="__fake", num_samples=proto.samples,
                                       config=protocol.param_space(proto, name))])
    return [gen.next_trial().config for _ in range(proto.samples)]


def test_asha_cosine_trials_follow_the_cosine_of_their_sampled_lr(ray_session, tmp_path):
    proto, seed = _proto(), 3
    configs = _sampled(proto, "asha+cosine", seed)
    assert [c["trial_schedule"] for c in configs] == ["cosine", "cosine"]
    run = protocol.run_experiment("asha+cosine", proto, seed, tmp_path / "ray",
                                  log=lambda *_: None)
    rows = run["rows"]
    assert run["summary"]["trials"] == 2 and rows
    clamp = from_dict(task="digits-mlp")
    by_trial: dict[int, list[float]] = {}
    for r in rows:
        index = int(r["trial"].rsplit("_", 1)[1])  # trial ids end in _00000, _00001, ...
        lr0 = configs[index]["lr"]
        progress = (r["iteration"] - 1) / EPOCHS  # epoch e trains at progress e / epochs
        want = min(max(lr0 * 0.5 * (1 + math.cos(math.pi * progress)), clamp.lr_min),
                   clamp.lr_max)
        assert r["lr"] == pytest.approx(want, rel=1e-6), (r, lr0)
        by_trial.setdefault(index, []).append(r["lr"])
    assert sorted(by_trial) == [0, 1]
    assert [by_trial[i][0] for i in (0, 1)] == pytest.approx([c["lr"] for c in configs])
    longest = max(by_trial.values(), key=len)
    assert len(longest) >= 2 and all(a > b for a, b in zip(longest, longest[1:]))  # it decays


def test_base_cosine_stops_trials_like_base_and_samples_the_same_trials():
    proto = _proto()
    alone, scheduled = (protocol.make_scheduler(n, proto) for n in ("asha", "asha+cosine"))
    assert type(scheduled) is type(alone)
    assert type(scheduled).__name__ == "AsyncHyperBandScheduler"
    assert (scheduled._max_t, scheduled._reduction_factor, scheduled._brackets[0]._rungs) == (
        alone._max_t, alone._reduction_factor, alone._brackets[0]._rungs)
    assert type(protocol.make_scheduler("fifo+cosine", proto)).__name__ == "FIFOScheduler"
    assert type(protocol.make_scheduler("median+cosine", proto)).__name__ == "MedianStoppingRule"
    # the constant `trial_schedule` key leaves the sampled LRs and seeds those of BASE alone
    strip = [{k: v for k, v in c.items() if k != "trial_schedule"}
             for c in _sampled(proto, "asha+cosine", 0)]
    assert strip == _sampled(proto, "asha", 0)
    assert "trial_schedule" not in protocol.param_space(proto, "asha")
    assert protocol.trial_schedule("fifo+cosine") == "cosine"
    assert protocol.trial_schedule("qan+asha") is None


@pytest.mark.parametrize("name", ["pbt+cosine", "pb2+cosine", "qan+cosine", "sha+cosine"])
def test_an_unknown_cosine_combination_names_the_valid_ones(name):
    with pytest.raises(ValueError) as err:
        protocol.make_scheduler(name, _proto())
    text = str(err.value)
    assert f"scheduler {name!r} is unknown" in text
    for valid in ("fifo+cosine", "asha+cosine", "hyperband+cosine", "median+cosine"):
        assert valid in text
    with pytest.raises(ValueError, match="asha\\+cosine"):  # checked before Ray starts
        protocol.align_action_mode([name], _proto())


def test_the_unknown_name_error_lists_the_cosine_names_too():
    with pytest.raises(ValueError, match=r"unknown; .*'asha\+cosine'"):
        protocol.make_scheduler("asha+step", _proto())


def test_scheduled_lr_is_the_baseline_cosine_at_the_epoch_progress():
    assert split_config({"lr": 0.1, "trial_schedule": "cosine"})[1] == {"trial_schedule": "cosine"}
    cosine = baseline_schedule("cosine", 0.2)
    assert [scheduled_lr("cosine", 0.2, e, 4) for e in range(4)] == [
        cosine(0.0), cosine(0.25), cosine(0.5), cosine(0.75)]
    assert scheduled_lr("cosine", 0.2, 0, 4) == 0.2
    assert scheduled_lr("cosine", 0.2, 2, 4) == pytest.approx(0.1)
    assert check_trial_schedule(None) is None
    with pytest.raises(ValueError, match=r"`trial_schedule` is 'cosin'; it must be one of"):
        check_trial_schedule("cosin")
