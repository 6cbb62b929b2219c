"""qan_ray.quiet drops the known RLlib/Ray noise of `qan train` and nothing else (no Ray)."""

from __future__ import annotations

import logging
import os

import pytest

from qan_ray.quiet import NoiseFilter, filtered_stderr, install_log_filters, is_noise

# Lines as a normal `qan train --episodes 2 --num-actors 1` run printed them (Ray 2.60).
CORE_LINE = ("[2026-12-01 19:09:29,653 E 4427 4427] core_worker.cc:2465: Actor with class name: "
             "'SingleAgentEnvRunner' and ID: '50f072b6638b0cbb6123f61a01000000' has constructor "
             "arguments in the object store and max_restarts > 0. If the arguments in the object "
             "store go out of scope or are lost, the actor restart will fail. See "
             "https://github.com/ray-project/ray/issues/53727 for more details.")
REAL_CORE_LINE = ("[2026-12-01 19:09:30,001 E 4427 4427] core_worker.cc:2510: Failed to register "
                  "actor. Error message: ObjectLost")
NOISE = {
    "ray.rllib.algorithms.algorithm_config":
        "You are running DQN on the new API stack! This is the new default behavior for this "
        "algorithm. If you don't want to use the new API stack, set `config.api_stack(...)`.",
    "ray._common.deprecation":
        "DeprecationWarning: `RLModule(config=[RLModuleConfig object])` has been deprecated. Use "
        "`RLModule(observation_space=.., action_space=..)` instead. This will raise an error in "
        "the future!",
    "ray.tune.trainable.trainable":
        "Trainable.setup took 13.286 seconds. If your trainable is slow to initialize, consider "
        "setting reuse_actors=True to reduce actor creation overheads.",
    "ray.tune.utils.util": "Install gputil for GPU system monitoring.",
}
REAL = {  # same loggers, messages that matter
    "ray.rllib.algorithms.algorithm_config":
        "`num_env_runners` is 0 but `create_env_on_local_worker` is False.",
    "ray._common.deprecation":
        "DeprecationWarning: `AlgorithmConfig.rollouts` has been deprecated. Use "
        "`AlgorithmConfig.env_runners` instead.",
    "ray.tune.trainable.trainable": "Trainable.setup failed: CUDA out of memory.",
    "ray.tune.utils.util": "Install psutil to monitor system performance.",
}


def test_known_noise_lines_are_noise_and_real_errors_are_not():
    assert is_noise(CORE_LINE)
    assert not is_noise(REAL_CORE_LINE)
    for logger, line in NOISE.items():
        assert is_noise(line, logger) and is_noise(line)
        assert not is_noise(REAL[logger], logger) and not is_noise(REAL[logger])
    # a noise text from another logger is not noise there (filters are per logger)
    assert not is_noise(NOISE["ray.tune.utils.util"], "ray.rllib.algorithms.algorithm_config")
    assert not is_noise("RayActorError: The actor died unexpectedly before finishing this task.")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("logger_name", sorted(NOISE))
def test_log_filters_drop_the_noise_of_each_logger_and_keep_its_other_messages(logger_name):
    logger = logging.getLogger(logger_name)
    seen = _Collect()
    logger.addHandler(seen)
    try:
        install_log_filters()
        install_log_filters()  # idempotent
        assert sum(isinstance(f, NoiseFilter) for f in logger.filters) == 1
        logger.warning(NOISE[logger_name])
        logger.warning(REAL[logger_name])
        logger.error("a real error of %s", logger_name)
    finally:
        logger.removeHandler(seen)
    assert seen.lines == [REAL[logger_name], f"a real error of {logger_name}"]


def test_filtered_stderr_drops_the_core_noise_line_and_forwards_everything_else(capfd):
    with filtered_stderr():
        os.write(2, f"{CORE_LINE}\n".encode())
        os.write(2, f"{REAL_CORE_LINE}\n".encode())
        os.write(2, b"partial line without newline")
    os.write(2, b"\nafter the block\n")
    err = capfd.readouterr().err
    assert "has constructor arguments in the object store" not in err
    assert err == f"{REAL_CORE_LINE}\npartial line without newline\nafter the block\n"
