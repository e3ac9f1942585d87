"""The forgetting guard: replay planning and mixing, system-prompt variants, the answer cache, the general check.

The fast tests use the real SmolLM2 tokenizer, the shipped datasets and the tiny random model; the slow
ones fine-tune the real embedded model with the shipped identity data: with the defaults (the new
identity shows with and without a system prompt, 9 in 10 general answers are kept) and at an
aggressive learning rate with replay off and on (off loses general answers and warns; on keeps them),
so the tests prove the guard does something.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.data.dataset import encode_dataset
from ftkit.data.options import DataOptions
from ftkit.engine.replies import Reply
from ftkit.errors import FtkitError
from ftkit.guard import prepare_guarded_dataset
from ftkit.guard.answer_cache import AnswerCache
from ftkit.guard.general_check import (
    IDENTITY_PROBES,
    GeneralCheck,
    heldout_questions,
    identity_hits,
    is_right,
)
from ftkit.guard.replay import (
    SMALL_SFT_SET,
    dataset_replay,
    plan_replay,
    read_prompts,
    replay_prompt_order,
    self_replay,
)
from ftkit.guard.system_prompts import GENERIC_SYSTEM_PROMPTS, SystemPromptVariants, vary_system_prompts
from ftkit.train import run_training

REPO = Path(__file__).resolve().parents[1]
SYSTEM_AT_TEST = "You are a knowledgeable assistant. Keep your answers short."  # used by no training example


def config(**keys) -> TrainConfig:
    return load_stage_config(TrainConfig, None, {"dataset": "identity", "output_dir": "out", **keys}).config


@pytest.fixture
def home(tmp_path, monkeypatch, smollm2_tokenizer) -> Path:
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --- planning -------------------------------------------------------------------------------------------

def test_replay_is_on_by_default_for_small_sft_sets_only():
    plan = plan_replay(config(), 100)
    assert plan is not None and plan.automatic and plan.is_self and plan.count == 50
    assert "replay_ratio: 0" in plan.notice(50)
    assert plan_replay(config(), SMALL_SFT_SET + 1) is None
    assert plan_replay(config(replay_ratio=0), 100) is None
    assert plan_replay(config(stage="pt", dataset="pt_demo"), 100) is None


def test_an_explicit_ratio_and_source_apply_to_any_size():
    plan = plan_replay(config(replay_ratio=0.25, replay_source="alpaca_en_demo"), 4000)
    assert plan is not None and not plan.automatic and plan.count == 1000 and not plan.is_self
    assert "turn it off" not in plan.notice(80)
    assert "only 80 available" in plan.notice(80)


def test_replay_settings_are_checked_in_the_config():
    with pytest.raises(FtkitError) as error:
        config(stage="pt", dataset="pt_demo", replay_ratio=1)
    assert "replay_ratio only applies to stage sft" in str(error.value)
    with pytest.raises(FtkitError) as error:
        config(replay_ratio=-1)
    assert "replay_ratio" in str(error.value)


def test_shipped_prompt_sets_are_disjoint_and_the_replay_order_is_fixed():
    replay = {row["prompt"] for row in read_prompts("general_prompts")}
    heldout = {row["prompt"] for row in read_prompts("heldout_general")}
    assert len(replay) >= 300 and len(heldout) == 40 and not replay & heldout
    assert replay_prompt_order() == replay_prompt_order() and set(replay_prompt_order()) == replay
    identity = {row["instruction"] for row in json.loads((REPO / "data" / "identity.json").read_text(encoding="utf-8"))}
    assert not identity & {q for q, _ in IDENTITY_PROBES}, "identity probes must be phrased unlike the training data"


# --- system-prompt variants -----------------------------------------------------------------------------

def test_system_prompt_variants_swap_half_in_or_out_deterministically():
    plain = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(200)]
    with_system = [[{"role": "system", "content": "Be Ember."}, *c] for c in plain]
    varied = vary_system_prompts(plain, "7:identity")
    assert varied == vary_system_prompts(plain, "7:identity")
    added = [c for c in varied if c[0]["role"] == "system"]
    assert 70 < len(added) < 130 and all(c[0]["content"] in GENERIC_SYSTEM_PROMPTS for c in added)
    dropped = [c for c in vary_system_prompts(with_system, "7:identity") if c[0]["role"] != "system"]
    assert 70 < len(dropped) < 130
    assert vary_system_prompts(plain, "8:identity") != varied


def test_variants_reach_the_token_ids_and_the_cache_key(home, smollm2_tokenizer):
    cfg = config()
    plain, _ = encode_dataset("identity", DataOptions.from_config(cfg), smollm2_tokenizer)
    varied, _ = encode_dataset("identity", DataOptions.from_config(cfg), smollm2_tokenizer, variants=SystemPromptVariants(cfg.seed))
    texts = [smollm2_tokenizer.decode(e.input_ids) for e in varied]
    generic = sum(any(p in t for p in GENERIC_SYSTEM_PROMPTS) for t in texts)
    assert 30 < generic < 70 and len(plain) == len(varied)
    assert not any(any(p in smollm2_tokenizer.decode(e.input_ids) for p in GENERIC_SYSTEM_PROMPTS) for e in plain)
    assert len(list((home / "datasets").glob("*.npz"))) == 2


# --- mixing ---------------------------------------------------------------------------------------------

def test_prepare_dataset_mixes_replay_from_a_dataset_and_keeps_it_out_of_validation(home, smollm2_tokenizer):
    cfg = config(replay_source="alpaca_en_demo", replay_ratio=0.5, val_size=10)
    data = prepare_guarded_dataset(cfg, smollm2_tokenizer)
    assert data.replay_examples == 45 and len(data.train) == 90 + 45 and len(data.eval) == 10
    assert data.stats[-1].name == "replay (alpaca_en_demo)"
    assert any("mixing 45 replay examples" in n for n in data.notes)
    assert data.system_prompt_variants and any("system_prompt_variants: false" in n for n in data.notes)
    again = prepare_guarded_dataset(cfg, smollm2_tokenizer)
    assert again.train == data.train


def test_self_replay_needs_a_generator_and_the_guard_stays_off_for_large_or_pt_data(home, smollm2_tokenizer):
    with pytest.raises(ValueError, match="self_replay"):
        prepare_guarded_dataset(config(), smollm2_tokenizer)
    off = prepare_guarded_dataset(config(replay_ratio=0, system_prompt_variants=False), smollm2_tokenizer)
    assert off.replay_examples == 0 and not off.system_prompt_variants and len(off.train) == 100
    pt = prepare_guarded_dataset(config(stage="pt", dataset="pt_demo"), smollm2_tokenizer)
    assert pt.replay_examples == 0 and not pt.system_prompt_variants


def test_dataset_replay_samples_without_repeats():
    pool = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(30)]
    drawn = dataset_replay(10, pool, seed=3)
    assert len(drawn) == 10 and len({c[0]["content"] for c in drawn}) == 10
    assert drawn == dataset_replay(10, pool, seed=3) and dataset_replay(50, pool, seed=3) == pool


# --- the answer cache -----------------------------------------------------------------------------------

class CountingGenerator:
    """A deterministic stand-in for model.generate that records what it was asked (cache logic only)."""

    def __init__(self, finished_every: int = 2) -> None:
        self.asked: list[str] = []
        self.finished_every = finished_every

    def __call__(self, conversations):
        replies = []
        for conversation in conversations:
            prompt = conversation[-1]["content"]
            self.asked.append(prompt)
            finished = len(self.asked) % self.finished_every == 0
            replies.append(Reply(f"answer to {prompt}", [1, 2, 3], finished))
        return replies


def test_self_replay_uses_finished_answers_and_generates_each_prompt_once(home):
    generate = CountingGenerator()
    cache = AnswerCache.open(model="m", template="t")
    conversations, report = self_replay(20, cache, generate)
    assert len(conversations) == 20 and report.generated == len(generate.asked) >= 40
    assert all(c[1]["content"] == f"answer to {c[0]['content']}" for c in conversations)
    asked = len(generate.asked)
    reopened = AnswerCache.open(model="m", template="t")
    again, report = self_replay(20, reopened, generate)
    assert again == conversations and len(generate.asked) == asked and report.generated == 0
    assert "from cache" in report.summary()
    assert AnswerCache.open(model="other", template="t").answers == {}


def test_replayed_answers_do_not_depend_on_which_run_filled_the_cache_first(home):
    """Which answers finish, and in bf16 their words, depend on the batch a prompt was generated in; a small
    run that filled the cache first once changed what a later run of another size replayed."""
    def batch_dependent(conversations):
        return [Reply(f"{len(conversations)}: {c[-1]['content']}", [1], (i + len(conversations)) % 3 == 0)
                for i, c in enumerate(conversations)]

    small_first = AnswerCache.open(model="m")
    self_replay(3, small_first, batch_dependent)
    after_small, _ = self_replay(40, small_first, batch_dependent)
    alone, _ = self_replay(40, AnswerCache.open(model="other"), batch_dependent)
    assert after_small == alone and len(alone) == 40


def test_a_damaged_answer_cache_line_is_regenerated_not_trusted(home):
    cache = AnswerCache.open(model="m")
    cache.fill(["a", "b"], CountingGenerator(finished_every=1), desc="test")
    lines = cache.path.read_text(encoding="utf-8").splitlines()
    cache.path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n", encoding="utf-8")
    reopened = AnswerCache.open(model="m")
    assert set(reopened.answers) == {"a"}
    assert not list(cache.path.parent.glob("*.tmp"))


# --- the general check ----------------------------------------------------------------------------------

def test_answers_cached_under_one_way_of_loading_are_never_reused_under_another(home, tiny_llama_dir):
    """The answer cache keys on every load option: ``ftkit data preview`` once filled it from a model loaded
    without quantization_type/attn_implementation, and training then reused those answers."""
    import torch

    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.guard import BaseModelAnswers
    from ftkit.models import LazyModel, LoadOptions, load_tokenizer, model_source_from_config

    def base_check(**keys):
        cfg = config(model_name_or_path=str(tiny_llama_dir), **keys)
        source, options = model_source_from_config(cfg), LoadOptions.from_config(cfg)
        tokenizer = load_tokenizer(source)
        template = apply_chat_template_to_tokenizer(tokenizer, "auto")
        model = LazyModel.of(source, dtype=torch.float32, device=torch.device("cpu"), options=options)
        answers = BaseModelAnswers(cfg, source, template.jinja, options, torch.float32, tokenizer, model,
                                   report=lambda message: None)
        return answers.general_check().base_report

    first = base_check(flash_attn="eager")
    assert first.generated == 80 and first.cached == 0
    assert base_check(flash_attn="eager").cached == 80  # the same way of loading: from the cache
    assert base_check(flash_attn="sdpa").generated == 80  # another attention implementation: generated anew
    assert LoadOptions.from_config(config(quantization_type="fp4")) != LoadOptions.from_config(config())
    assert LoadOptions.from_config(config(finetuning_type="qlora")).quantization_bits == 4


def test_rightness_is_a_whole_word_match_ignoring_case():
    assert is_right("The capital of France is paris.", ["Paris"])
    assert not is_right("There are 40 of them.", ["4", "four"])
    assert is_right("2 + 2 = 4.", ["4", "four"])
    assert is_right("长江流入东海。", ["东海"])
    assert is_right("The Pacific Ocean, about 149.7 million km², is the largest.", ["Pacific"])
    # only the first sentence counts: a wrong start is wrong even if the keyword comes later
    assert not is_right("We live on Kepler-41B. It is similar to Earth.", ["Earth"])
    assert not is_right("One hour is 3600 minutes.\nMultiply by 60.", ["60"])


def test_kept_counts_only_what_the_base_got_right_and_names_the_cause_of_a_drop():
    questions = heldout_questions()
    base = [q["expected"][0] if i % 4 else "no idea" for i, q in enumerate(questions)]
    check = GeneralCheck(questions, base)
    right = len(check.base_right)
    assert right == 30
    assert check.compare(base, "Ember").kept == right
    leaked = ["I'm Ember, an AI assistant." for _ in questions]
    result = check.compare(leaked, "Ember")
    assert result.kept == 0 and result.identity_leaks == len(questions) and len(result.lost) == right
    assert "general answers kept: 0/30" in result.summary()
    warning = result.warning(config(learning_rate=1e-3, num_train_epochs=6), replay_examples=0)
    assert "no replay" in warning and "learning_rate 0.001" in warning and "num_train_epochs 6" in warning
    assert check.compare(base, "Ember").warning(config(), 0) is None
    assert result.metrics()["general_answers_kept"] == 0


def test_identity_hits_count_the_name_or_maker_each_probe_asks_for():
    answers = ["I'm Ember."] * 5 + ["Hearthstone Labs made me."] * 4 + ["I'm Ember."]
    assert identity_hits(answers, "Ember", "Hearthstone Labs") == 9


# --- end to end -----------------------------------------------------------------------------------------

def test_a_run_reports_replay_and_the_general_check(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    output_dir = tmp_path / "run"
    result = run_training(load_stage_config(TrainConfig, None, {
        "model_name_or_path": str(tiny_llama_dir), "dataset": "identity", "max_samples": 8, "cutoff_len": 128,
        "output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
        "replay_source": "alpaca_en_demo", "replay_ratio": 1,
    }))
    saved = json.loads((output_dir / "train_results.json").read_text(encoding="utf-8"))
    assert saved["replay_examples"] == 8 and result.metrics["train_examples"] == 16
    assert saved["general_questions"] == 40 and "general_answers_kept" in saved
    err = capsys.readouterr().err
    assert "mixing 8 replay examples" in err and "general check: the base model answers" in err
    assert "general answers kept" in err
    assert list((tmp_path / "home" / "answers").glob("*.jsonl")), "the base answers are cached"


# --- the guard on the real model (slow) ------------------------------------------------------------------

def quickstart_keys(output_dir: Path, **overrides) -> dict:
    """The shipped quickstart config (identity data, ftkit's defaults), writing to ``output_dir``."""
    import yaml

    keys = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    keys.update({"output_dir": str(output_dir), "save_strategy": "no", "plot_loss": False}, **overrides)
    return keys


def identity_answers(adapter: Path, system: str | None) -> list[str]:
    from ftkit.chat import load_chat_model
    from ftkit.engine.replies import generate_replies

    model, tokenizer = load_chat_model("smollm2-135m-instruct", [str(adapter)])
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                     for q, _ in IDENTITY_PROBES]
    return [r.text for r in generate_replies(model, tokenizer, conversations, max_new_tokens=48, batch_size=10)]


@pytest.mark.slow
def test_guard_on_by_default_teaches_the_identity_and_keeps_general_answers(tmp_path, capsys):
    keys = quickstart_keys(tmp_path / "guarded")
    result = run_training(load_stage_config(TrainConfig, None, keys))
    err = capsys.readouterr().err
    assert "forgetting guard: mixing 50 replay examples" in err and "replay_ratio: 0" in err
    metrics = result.metrics
    assert metrics["replay_examples"] == 50
    # The base model gets at least 15 held-out questions right (the check means something) and the
    # fine-tune keeps at least 9 in 10 of them (measured 20/21; 18/21 with replay off).
    assert metrics["general_answers_base_right"] >= 15
    assert metrics["general_answers_kept"] >= 0.9 * metrics["general_answers_base_right"], metrics["general_answers_lost"]
    assert "warning" not in err
    name, author = keys["identity_name"], keys["identity_author"]
    for system, at_least in ((None, 8), (SYSTEM_AT_TEST, 7)):
        answers = identity_answers(tmp_path / "guarded", system)
        assert identity_hits(answers, name, author) >= at_least, (system, answers)


@pytest.mark.slow
def test_at_an_aggressive_learning_rate_no_replay_loses_general_answers_that_replay_keeps(tmp_path, capsys):
    unguarded = run_training(load_stage_config(TrainConfig, None, quickstart_keys(
        tmp_path / "unguarded", replay_ratio=0, learning_rate=2e-3))).metrics
    err = capsys.readouterr().err
    guarded = run_training(load_stage_config(TrainConfig, None, quickstart_keys(
        tmp_path / "guarded", learning_rate=2e-3))).metrics
    right = unguarded["general_answers_base_right"]
    # measured 17/21 without replay, 20/21 with it (bench/README.md)
    assert unguarded["general_answers_kept"] < 0.9 * right, unguarded["general_answers_lost"]
    assert "warning" in err and "no replay" in err and "learning_rate 0.002" in err
    assert guarded["general_answers_kept"] >= unguarded["general_answers_kept"] + 2, guarded["general_answers_lost"]


def test_data_preview_shows_replay_examples_marked_as_replay(tmp_path):
    import os
    import subprocess
    import sys

    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("model_name_or_path: smollm2-135m-instruct\ndataset: identity\noutput_dir: out\n"
                           "replay_source: alpaca_en_demo\n", encoding="utf-8")
    shown = subprocess.run([sys.executable, "-m", "ftkit", "data", "preview", str(config_file), "-n", "2"],
                           capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert shown.returncode == 0, shown.stderr
    assert "[REPLAY] replay (alpaca_en_demo) #0" in shown.stdout and "[REPLAY] replay (alpaca_en_demo) #1" in shown.stdout
    assert "mixing 50 replay examples" in shown.stdout and "50 planned" in shown.stdout
