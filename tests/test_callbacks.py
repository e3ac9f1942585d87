"""User callbacks (``callbacks: [package.module:Class]``): they run inside the Trainer, can stop a run, are
still attached when a run resumes, and a wrong entry is one sentence before any model loads.

The callbacks live in a module written to a temporary folder on ``sys.path``; the tests set its module-level
knobs (threshold, crash step) and read what it recorded.
"""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.errors import FtkitError
from ftkit.train import run_training
from ftkit.train.callbacks import read_log

CALLBACKS = textwrap.dedent('''
    from transformers import TrainerCallback

    THRESHOLD = None   # StopBelowLoss stops once the logged loss is below this
    CRASH_AT = None    # Recorder raises after this step (a killed run)
    begins, steps = [], []

    class StopBelowLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and logs["loss"] < THRESHOLD:
                control.should_training_stop = True

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begins.append(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)
            if CRASH_AT is not None and state.global_step >= CRASH_AT:
                raise RuntimeError("killed")

    class NotACallback:
        pass

    class NeedsArguments(TrainerCallback):
        def __init__(self, threshold):
            self.threshold = threshold
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_callbacks")
    yield module
    del importlib.sys.modules["my_callbacks"]


def keys(model_dir: Path | str, output_dir: Path, **overrides) -> dict:
    return {
        "model_name_or_path": str(model_dir), "dataset": "identity", "max_samples": 8, "cutoff_len": 128,
        "output_dir": str(output_dir), "max_steps": 10, "logging_steps": 1, "learning_rate": 5e-3,
        "per_device_train_batch_size": 8, "save_strategy": "no", "seed": 0, "replay_ratio": 0,
        "general_check": False, "plot_loss": False, **overrides,
    }


def train(model_dir: Path | str, output_dir: Path, **overrides):
    return run_training(load_stage_config(TrainConfig, None, keys(model_dir, output_dir, **overrides)))


@pytest.mark.slow
def test_a_callback_stops_training_when_the_loss_crosses_a_threshold(tiny_llama_dir, tmp_path, user_module):
    user_module.THRESHOLD = 10.7
    result = train(tiny_llama_dir, tmp_path / "out", callbacks="my_callbacks:StopBelowLoss, my_callbacks:Recorder")
    losses = [record["loss"] for record in read_log(tmp_path / "out") if "loss" in record]
    assert losses[-1] < 10.7 <= min(losses[:-1]), losses
    assert result.metrics["global_step"] == len(losses) < 10
    assert user_module.steps == list(range(1, len(losses) + 1))  # both callbacks ran, in order
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # a stopped run still saves its adapter


@pytest.mark.slow
def test_callbacks_are_attached_again_when_a_run_resumes(tiny_llama_dir, tmp_path, user_module):
    overrides = {"callbacks": "my_callbacks:Recorder", "max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    user_module.CRASH_AT = 3
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_llama_dir, tmp_path / "out", **overrides)
    user_module.CRASH_AT = None
    result = train(tiny_llama_dir, tmp_path / "out", **overrides)
    assert result.metrics["resumed_from_step"] == 2
    assert user_module.begins == [0, 2] and user_module.steps == [1, 2, 3, 3, 4, 5, 6]


@pytest.mark.parametrize(("entry", "sentence"), [
    ("no_such_package.callbacks:Stop",
     "callbacks entry no_such_package.callbacks:Stop: no module named no_such_package; install the package or run "
     "ftkit from the folder that holds it."),
    ("my_callbacks:StopAtLoss",
     "callbacks entry my_callbacks:StopAtLoss: module my_callbacks has no StopAtLoss; check the class name after "
     "the colon."),
    ("my_callbacks:NotACallback",
     "callbacks entry my_callbacks:NotACallback: NotACallback is not a transformers.TrainerCallback subclass; "
     "derive it from TrainerCallback."),
    ("my_callbacks:NeedsArguments",
     "callbacks entry my_callbacks:NeedsArguments: NeedsArguments() failed: TypeError: "
     "NeedsArguments.__init__() missing 1 required positional argument: 'threshold' (ftkit creates each callback "
     "without arguments)."),
])
def test_a_wrong_callback_is_one_sentence_before_the_model_loads(tmp_path, user_module, entry, sentence):
    # The model does not exist: the callback is reported first, so it was checked before any model loading.
    with pytest.raises(FtkitError) as error:
        train(tmp_path / "no-model-here", tmp_path / "out", callbacks=entry)
    assert str(error.value) == sentence


def test_a_callback_entry_without_a_class_is_a_config_error(tmp_path):
    with pytest.raises(FtkitError) as error:
        load_stage_config(TrainConfig, None, keys("m", tmp_path / "out", callbacks="my_callbacks.Stop"))
    assert error.value.problems == ["command line: callbacks: callbacks entry 'my_callbacks.Stop' must be "
                                    "'package.module:ClassName' (got 'my_callbacks.Stop')"]
