"""GSM8K: ``ftkit evaluate`` vs lm-evaluation-harness 0.4.13 on the same items, speed and per-item answers.

Both evaluate the first ``--limit`` test items (default 100), 5-shot, fp32, greedy, on the embedded
SmolLM2-135M-Instruct (its converted Hugging Face folder). lm-eval runs ``--model hf`` at batch 1 and at
``--best-batch`` (16: its fastest here) with ``--log_samples``, from a throwaway venv (``--lm-eval-venv``;
how to make one is below). Offline it reads a copy of its stock ``gsm8k.yaml`` with ``dataset_path: json``
and ``dataset_kwargs.data_files`` pointing at the local files (written by this script; the task is named
``gsm8k_offline`` so it does not shadow the stock one).

Printed: each run's wall time (model load included, as a user waits for it) and items/minute, ftkit's speed
over lm-eval's best, both filters' scores, and the per-item agreement of the extracted answers under both
filters (ftkit vs each lm-eval run). Where an item differs, the token where the two greedy paths part and
the fp32 logit gap between the two tokens there (a near-tie explains a flip; a large gap is a bug).

    python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install --no-deps lm_eval==0.4.13 \\
        evaluate pytablewriter ... (its requirements missing from ftkit's venv), then a .pth file pointing at
        ftkit's site-packages so both use the same torch and transformers
    python bench/eval_gsm8k.py --lm-eval-venv /tmp/lmeval-venv [--limit 100] [--data ../shared/data/gsm8k]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILTERS = ("strict-match", "flexible-extract")


def offline_task(lm_eval_venv: Path, data: Path, folder: Path) -> str:
    """Write lm-eval's stock gsm8k.yaml with local data files into ``folder``; return the task name."""
    stock = next(lm_eval_venv.glob("lib/python*/site-packages/lm_eval/tasks/gsm8k/gsm8k.yaml"))
    lines = []
    for line in stock.read_text(encoding="utf-8").splitlines():
        if line.startswith("task:"):
            line = "task: gsm8k_offline"
        elif line.startswith("dataset_path:"):
            line = "dataset_path: json"
        elif line.startswith("dataset_name:"):
            line = (f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    train: {data / 'train.jsonl'}\n"
                    f"    test: {data / 'test.jsonl'}")
        lines.append(line)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k_offline.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "gsm8k_offline"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def lm_eval_answers(output: Path) -> dict[int, dict[str, str]]:
    """doc id -> {"output": raw text, filter: extracted answer} from lm-eval's --log_samples file."""
    found: dict[int, dict[str, str]] = {}
    for path in output.rglob("samples_gsm8k_offline_*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            entry = found.setdefault(sample["doc_id"], {"output": sample["resps"][0][0]})
            entry[sample["filter"]] = sample["filtered_resps"][0]
    return found


def ftkit_answers(samples: Path) -> dict[int, dict[str, str]]:
    found = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        found[sample["doc_id"]] = {"output": sample["output"], "prompt": sample["prompt"],
                                   **{f: sample["filters"][f]["answer"] for f in FILTERS}}
    return found


def parting_token(model_dir: Path, prompt: str, ours: str, theirs: str) -> str:
    """Where two greedy outputs part: the token index, both tokens, and the fp32 logit gap between them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    a = tokenizer(ours, add_special_tokens=False)["input_ids"]
    b = tokenizer(theirs, add_special_tokens=False)["input_ids"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"] + a[:same]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    ours_id = a[same] if same < len(a) else tokenizer.eos_token_id
    theirs_id = b[same] if same < len(b) else tokenizer.eos_token_id
    return (f"token {same}: ftkit {tokenizer.decode([ours_id])!r} vs lm-eval {tokenizer.decode([theirs_id])!r}, "
            f"logit gap {abs(logits[ours_id] - logits[theirs_id]).item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-venv", type=Path, default=Path("/tmp/lmeval-venv"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--best-batch", type=int, default=16)
    parser.add_argument("--skip-batch-1", action="store_true", help="Run lm-eval only at --best-batch.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftkit-bench-eval-gsm8k"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from ftkit.models.embedded import ensure_embedded_model

    model = ensure_embedded_model()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    task = offline_task(args.lm_eval_venv, args.data.resolve(), args.work / "task")
    times: dict[str, float] = {}
    times["ftkit"] = timed([sys.executable, "-m", "ftkit.cli", "evaluate", "--model", str(model), "--data",
                            str(args.data), "--limit", str(args.limit), "--dtype", "fp32", "--output",
                            str(args.work / "ftkit"), "--overwrite"], env)
    batches = [args.best_batch] if args.skip_batch_1 else [1, args.best_batch]
    for batch in batches:
        times[f"lm-eval batch {batch}"] = timed(
            [str(args.lm_eval_venv / "bin" / "lm_eval"), "--model", "hf", "--model_args",
             f"pretrained={model},dtype=float32", "--tasks", task, "--include_path", str(args.work / "task"),
             "--num_fewshot", "5", "--limit", str(args.limit), "--batch_size", str(batch), "--device", "cpu",
             "--log_samples", "--output_path", str(args.work / f"lm-eval-b{batch}")], env)

    ours = ftkit_answers(args.work / "ftkit" / "samples.jsonl")
    scores = json.loads((args.work / "ftkit" / "results.json").read_text())["scores"]
    print(f"GSM8K, first {args.limit} test items, 5-shot, fp32, {model.name}, {os.cpu_count()} CPUs")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds:7.1f} s  {args.limit / seconds * 60:6.1f} items/min")
    best = min(v for k, v in times.items() if k.startswith("lm-eval"))
    print(f"  ftkit is {best / times['ftkit']:.2f}x lm-eval's best")
    print("  ftkit scores: " + ", ".join(f"{f} {scores[f]['exact_match']:.2f}" for f in FILTERS))
    for batch in batches:
        theirs = lm_eval_answers(args.work / f"lm-eval-b{batch}")
        for f in FILTERS:
            same = sum(1 for d in ours if d in theirs and ours[d][f] == theirs[d][f])
            print(f"  vs lm-eval batch {batch}, {f}: {same}/{len(ours)} items with identical extracted answers")
        raw_same = sum(1 for d in ours if d in theirs and ours[d]["output"] == theirs[d]["output"])
        print(f"  vs lm-eval batch {batch}: {raw_same}/{len(ours)} identical raw outputs")
        for d in sorted(ours):
            if d in theirs and any(ours[d][f] != theirs[d][f] for f in FILTERS):
                print(f"    item {d}: ftkit {[ours[d][f] for f in FILTERS]} vs lm-eval {[theirs[d][f] for f in FILTERS]}; "
                      + parting_token(model, ours[d]["prompt"], ours[d]["output"], theirs[d]["output"]))


if __name__ == "__main__":
    main()
