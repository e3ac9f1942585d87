"""The texts a quantization run reads: calibration samples (int8-static) and the held-out evaluation text.

Calibration samples are prompts rendered with the model's chat template, as the model will see them when it
answers: ftkit's 320 shipped general prompts (``calibration_dataset: general``), a dataset from
dataset_info.json, or a file (.txt: one sample per non-empty line; .json/.jsonl: conversations or
prompt/instruction/text fields, read by ``ftkit.data`` like any training dataset). The evaluation text is
``ftkit/resources/quantize/heldout.txt`` unless ``eval_data`` names another .txt or .jsonl file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.paths import package_resource

SHIPPED_CALIBRATION = "general"


def calibration_texts(name: str, dataset_dir: str, tokenizer: Any, count: int) -> list[str]:
    """``count`` calibration samples from ``name``, rendered with the tokenizer's chat template.

    Refuses a source with fewer than ``count`` samples (scales fitted on fewer samples than asked for would
    be reported as if they were not).
    """
    from ftkit.data.templates import render_conversation

    conversations = _calibration_conversations(name, dataset_dir)
    if len(conversations) < count:
        raise FtkitError(f"calibration_dataset {name} has {len(conversations)} samples but calibration_samples is "
                         f"{count}; lower calibration_samples to at most {len(conversations)} or give a larger "
                         "calibration_dataset.")
    texts = []
    for conversation in conversations[:count]:
        if conversation and conversation[-1]["role"] == "assistant":
            texts.append(render_conversation(tokenizer, conversation, add_generation_prompt=False))
        else:
            texts.append(render_conversation(tokenizer, conversation, add_generation_prompt=True))
    return texts


def _calibration_conversations(name: str, dataset_dir: str) -> list[list[dict[str, str]]]:
    if name == SHIPPED_CALIBRATION:
        from ftkit.guard.replay import replay_prompt_order

        return [[{"role": "user", "content": prompt}] for prompt in replay_prompt_order()]
    path = Path(name).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise FtkitError(f"calibration_dataset {name} does not exist; give a .txt/.json/.jsonl file, a dataset "
                             "from dataset_info.json, or general.")
        return [[{"role": "user", "content": line.strip()}]
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from ftkit.data.dataset import read_conversations
    from ftkit.data.options import DataOptions
    from ftkit.data.registry import resolve_dataset

    options = DataOptions(dataset=(name,), dataset_dir=dataset_dir, stage="pt")
    conversations, _ = read_conversations(resolve_dataset(name, dataset_dir), options)
    return [list(conversation) for conversation in conversations]


def eval_text(eval_data: str | None) -> str:
    """The held-out text scored for perplexity and agreement (the shipped one unless ``eval_data`` is given)."""
    if eval_data is None:
        return package_resource("quantize", "heldout.txt").read_text(encoding="utf-8")
    path = Path(eval_data).expanduser()
    if not path.is_file():
        raise FtkitError(f"eval_data {eval_data} does not exist; give a .txt or .jsonl file (or remove eval_data to "
                         "use ftkit's shipped text).")
    if path.suffix == ".jsonl":
        return "\n\n".join(_record_text(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
                           if line.strip())
    return path.read_text(encoding="utf-8")


def _record_text(record: Any) -> str:
    if isinstance(record, dict):
        for key in ("text", "content", "prompt", "question", "instruction"):
            if isinstance(record.get(key), str):
                return record[key]
    raise FtkitError(f"eval_data lines must be JSON objects with a text field, not {str(record)[:60]!r}.")
