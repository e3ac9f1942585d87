"""``ftkit evaluate`` end to end on a tiny random Llama: GSM8K, the user's own datasets, the general check.

The GSM8K run is a real ``ftkit`` subprocess; the dataset benchmarks run the stage in-process
(``run_evaluation``) so the scores can be checked against a direct transformers forward pass of the same
model on the same encoded tokens.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftkit.config import EvaluateConfig
from ftkit.evaluate import gsm8k, run_evaluation

REPO = Path(__file__).resolve().parents[1]


def write_gsm8k(folder: Path, n_test: int = 3, n_train: int = 8) -> Path:
    """A small GSM8K-format folder (test.jsonl, train.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", n_test), ("train", n_train)):
        rows = [{"question": f"{split} question {i}: what is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def ftkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=300)


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_gsm8k_run_writes_results_and_samples_that_agree(tiny_llama_dir, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k")
    done = ftkit("evaluate", "--model", str(tiny_llama_dir), "--data", str(data), "--limit", "3",
                 "--num-fewshot", "2", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "strict-match" in done.stdout and "flexible-extract" in done.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    samples = sorted(read_samples(tmp_path / "out" / "samples.jsonl"), key=lambda s: s["doc_id"])
    assert results["status"] == "complete" and results["n"] == 3 == len(samples)
    assert [s["doc_id"] for s in samples] == [0, 1, 2]
    assert (results["model"], results["dtype"], results["settings"]["num_fewshot"]) == (str(tiny_llama_dir), "float32", 2)
    test, train, _ = gsm8k.load_gsm8k(str(data), 2)
    items = gsm8k.build_items(test, train, num_fewshot=2, limit=3)
    for sample, item in zip(samples, items, strict=True):
        assert sample["prompt"] == item.prompt and sample["target"] == gsm8k.reference_answer(item.target)
        assert sample["filters"] == gsm8k.score_output(sample["output"], item.target)
        assert not any(stop in sample["output"] for stop in gsm8k.UNTIL)
    for name in gsm8k.FILTERS:
        correct = [float(s["filters"][name]["correct"]) for s in samples]
        assert results["scores"][name]["exact_match"] == pytest.approx(sum(correct) / 3)


def _config(tmp_path: Path, model: Path, benchmark: str, **keys) -> EvaluateConfig:
    return EvaluateConfig(model_name_or_path=str(model), benchmark=benchmark, output=str(tmp_path / "out"), **keys)


def _direct_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """log p(token i | tokens before it) for i >= 1, from a plain transformers forward pass in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_own_dataset_loss_is_the_reply_tokens_nll_and_generation_metrics_are_reported(tiny_llama_dir, tmp_path):
    from ftkit.data.encoding import encode_supervised_example
    from ftkit.models import load_tokenizer, resolve_model_source

    rows = [{"instruction": "Who are you?", "output": "I am Ember."}, {"instruction": "你是谁？", "output": "我是小明。"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results = run_evaluation(_config(tmp_path, tiny_llama_dir, str(tmp_path / "mine.jsonl"), max_new_tokens=4))
    samples = sorted(read_samples(tmp_path / "out" / "samples.jsonl"), key=lambda s: s["doc_id"])
    assert results["n"] == 2 and [s["target"] for s in samples] == ["I am Ember.", "我是小明。"]
    tokenizer = load_tokenizer(resolve_model_source(str(tiny_llama_dir)))
    nll, count = 0.0, 0
    for row in rows:
        example = encode_supervised_example(tokenizer, [{"role": "user", "content": row["instruction"]},
                                                        {"role": "assistant", "content": row["output"]}], cutoff_len=2048)
        logprobs = _direct_logprobs(tiny_llama_dir, example.input_ids)
        trained = [logprobs[i - 1] for i in range(1, len(example.labels)) if example.labels[i] != -100]
        nll, count = nll - sum(trained), count + len(trained)
    assert results["scores"]["loss"]["reply_tokens"] == count
    assert results["scores"]["loss"]["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert results["scores"]["loss"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert set(results["scores"]["generation"]) >= {"exact_match", "bleu4", "rouge1", "rouge2", "rougeL", "contains"}


def test_identity_placeholders_are_filled_and_contains_looks_for_the_given_names(tiny_llama_dir, tmp_path):
    rows = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."}]
    (tmp_path / "who.jsonl").write_text(json.dumps(rows[0]) + "\n")
    results = run_evaluation(_config(tmp_path, tiny_llama_dir, str(tmp_path / "who.jsonl"), max_new_tokens=12,
                                     identity_name="Ember", identity_author="Hearthstone Labs", contains=["Ember"]))
    sample = read_samples(tmp_path / "out" / "samples.jsonl")[0]
    assert sample["target"] == "I am Ember, made by Hearthstone Labs."
    assert sample["scores"]["contains"] == 0.0  # a random model does not say "Ember"
    assert results["settings"]["identity"] == ["Ember", "Hearthstone Labs"] and results["settings"]["contains"] == ["Ember"]
    from ftkit.evaluate.backends import Generation
    from ftkit.evaluate.benchmarks import resolve_benchmark

    benchmark = resolve_benchmark(str(tmp_path / "who.jsonl"), data=None, dataset_dir="data", num_fewshot=None,
                                  limit=None, chat=False, cutoff_len=64, max_new_tokens=8,
                                  identity=("Ember", "Hearthstone Labs"), contains=["Ember", "Hearthstone"])
    benchmark.load()
    scored = [benchmark.score(Generation(0, text, "p"))["scores"] for text in ("Hi! I'm EMBER.", "I'm SmolLM.")]
    assert [s["contains"] for s in scored] == [1.0, 0.0] and scored[0]["exact_match"] == 0.0


def test_multiple_choice_picks_the_choice_with_the_highest_loglikelihood(tiny_llama_dir, tmp_path):
    rows = [{"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
            {"question": "Sky colour?", "choices": ["blue", "green"], "answer": "A"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = run_evaluation(_config(tmp_path, tiny_llama_dir, str(tmp_path / "mc.jsonl")))
    samples = sorted(read_samples(tmp_path / "out" / "samples.jsonl"), key=lambda s: s["doc_id"])
    from ftkit.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(str(tiny_llama_dir)))
    context = tokenizer("Question: 2 + 2 =\nAnswer:", add_special_tokens=False)["input_ids"]
    whole = tokenizer("Question: 2 + 2 =\nAnswer: 4", add_special_tokens=False)["input_ids"]
    direct = sum(_direct_logprobs(tiny_llama_dir, whole)[len(context) - 1:])
    assert samples[0]["loglikelihoods"][1] == pytest.approx(direct, abs=1e-3)
    assert samples[1]["target"] == 0
    acc = [float(max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) == s["target"])
           for s in samples]
    assert results["scores"]["multiple_choice"]["acc"] == pytest.approx(sum(acc) / 2)


def test_general_benchmark_reports_right_answers_of_the_guards_questions(tiny_llama_dir, tmp_path):
    results = run_evaluation(_config(tmp_path, tiny_llama_dir, "general", limit=2))
    samples = read_samples(tmp_path / "out" / "samples.jsonl")
    assert results["n"] == 2 and all(isinstance(s["correct"], bool) for s in samples)
    assert results["scores"]["general"]["right_count"] == sum(s["correct"] for s in samples)


def test_chat_template_output_file_and_a_benchmark_given_as_a_path(tiny_llama_dir, tmp_path):
    data = write_gsm8k(tmp_path / "datasets" / "gsm8k")
    config = EvaluateConfig(model_name_or_path=str(tiny_llama_dir), benchmark=str(data), limit=2, num_fewshot=1,
                            apply_chat_template=True, max_new_tokens=8, output_file=str(tmp_path / "r.json"))
    results = run_evaluation(config)  # LLaMA-Factory's spelling: --benchmark datasets/gsm8k --output_file r.json
    samples = read_samples(tmp_path / "r.samples.jsonl")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    assert results["benchmark"] == "gsm8k" and results["settings"]["apply_chat_template"] is True
    prompt = samples[0]["prompt"]  # the few-shot example as a user turn and an assistant turn, then the question
    assert prompt.count("<|im_start|>user") == 2 and prompt.count("<|im_start|>assistant") == 2
    assert prompt.endswith("<|im_start|>assistant\n")


def test_base_plus_adapter_without_merge_in_bf16_says_answers_may_differ(tiny_llama_dir, tmp_path):
    from test_bad_input_paths import save_adapter

    adapter = save_adapter(tiny_llama_dir, tmp_path / "adapter")
    data = write_gsm8k(tmp_path / "gsm8k")
    results = run_evaluation(_config(tmp_path, tiny_llama_dir, "gsm8k", data=str(data), limit=1, num_fewshot=0,
                                     adapter_name_or_path=[str(adapter)], dtype="bf16"))
    assert results["adapters"] == [str(adapter)] and results["dtype"] == "bfloat16"
    assert "answers may differ from an fp32 run" in results["note"]


@pytest.mark.slow
def test_embedded_model_limit_5_results_and_samples_agree(tmp_path):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    if not (data / "test.jsonl").is_file():
        pytest.skip(f"GSM8K data not at {data}")
    done = ftkit("evaluate", "--model", "smollm2-135m-instruct", "--data", str(data), "--limit", "5",
                 "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    samples = read_samples(tmp_path / "out" / "samples.jsonl")
    assert results["n"] == 5 == len(samples) and sorted(s["doc_id"] for s in samples) == list(range(5))
    for name in gsm8k.FILTERS:
        correct = [float(s["filters"][name]["correct"]) for s in samples]
        assert results["scores"][name]["exact_match"] == pytest.approx(sum(correct) / 5)
        assert all(s["filters"][name] == gsm8k.score_output(s["output"], "#### " + s["target"])[name] for s in samples)


def test_resume_reads_complete_lines_cuts_a_torn_one_and_refuses_other_settings(tmp_path):
    from ftkit.errors import FtkitError
    from ftkit.evaluate.outputs import OutputFiles

    files = OutputFiles.at(str(tmp_path / "out"), None, default_dir="unused")
    settings = {"model": "a", "adapters": [], "settings": {"limit": 3, "num_fewshot": 5}}
    files.start(settings, overwrite=False, resume=False)
    files.append({"doc_id": 0, "output": "x"})
    with files.samples.open("a") as f:
        f.write('{"doc_id": 1, "outp')  # a kill in the middle of a line
    again = OutputFiles.at(str(tmp_path / "out"), None, default_dir="unused")
    again.start(settings, overwrite=False, resume=True)
    assert list(again.done) == [0] and files.samples.read_text().endswith('"x"}\n')
    for changed, key in (({**settings, "model": "b"}, "model"), ({**settings, "settings": {"limit": 4}}, "limit")):
        with pytest.raises(FtkitError, match=f"was a run with {key}"):
            OutputFiles.at(str(tmp_path / "out"), None, default_dir="unused").start(changed, overwrite=False,
                                                                                    resume=True)
