"""What ``--benchmark`` names: GSM8K, the forgetting guard's general check, or one of the user's datasets.

Each benchmark turns its data into ``PromptRequest``s (``requests``), one finished generation into one
sample line (``score``), and the samples into the scores of results.json (``aggregate``). A user's dataset
is a conversation dataset (scored by loss and perplexity over the reply tokens, then by generation
metrics against the last reply) or a multiple-choice dataset (``choices`` and an ``answer`` index, scored
by log-likelihood as lm-eval's multiple_choice tasks are: accuracy, and accuracy normalised by length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluate import gsm8k
from ftkit.evaluate.backends import Generation, PromptRequest
from ftkit.evaluate.metrics import mean, mean_stderr

KNOWN = ("gsm8k", "general")


def _with_stderr(name: str, values: list[float]) -> dict[str, Any]:
    return {name: mean(values), f"{name}_stderr": mean_stderr(values)}


@dataclass
class Gsm8kBenchmark:
    """lm-eval's stock gsm8k task (see ``ftkit.evaluate.gsm8k``)."""

    data: str | None
    num_fewshot: int
    limit: int | None
    chat: bool
    name: str = "gsm8k"
    items: list[gsm8k.Gsm8kItem] = field(default_factory=list)
    source: str = ""
    max_tokens: int = gsm8k.MAX_GEN_TOKS

    def load(self) -> None:
        test, train, self.source = gsm8k.load_gsm8k(self.data, self.num_fewshot)
        self.items = gsm8k.build_items(test, train, num_fewshot=self.num_fewshot, limit=self.limit, chat=self.chat)

    def settings(self) -> dict[str, Any]:
        return {"benchmark": "gsm8k", "data": self.source, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "fewshot_seed": gsm8k.FEWSHOT_SEED, "apply_chat_template": self.chat,
                "max_new_tokens": self.max_tokens, "until": list(gsm8k.UNTIL),
                "matches": f"lm-evaluation-harness {gsm8k.LM_EVAL_VERSION} gsm8k (task version {gsm8k.TASK_VERSION})"}

    def requests(self) -> list[PromptRequest]:
        return [PromptRequest(i.doc_id, i.prompt, i.messages) for i in self.items]

    def stop(self) -> list[str]:
        return list(gsm8k.UNTIL)

    def score(self, generation: Generation) -> dict[str, Any]:
        item = self.items[generation.key]
        filters = gsm8k.score_output(generation.text, item.target)
        return {"doc_id": item.doc_id, "question": item.question, "prompt": generation.prompt,
                "output": generation.text, "target": gsm8k.reference_answer(item.target),
                "filters": filters, "finish_reason": generation.finish_reason}

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {name: _with_stderr("exact_match", [float(s["filters"][name]["correct"]) for s in samples])
                for name in gsm8k.FILTERS}


@dataclass
class GeneralBenchmark:
    """The forgetting guard's held-out general questions: right when the first sentence names a keyword."""

    limit: int | None
    name: str = "general"
    questions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_tokens(self) -> int:
        from ftkit.guard.general_check import HELDOUT_MAX_NEW_TOKENS

        return HELDOUT_MAX_NEW_TOKENS

    def load(self) -> None:
        from ftkit.guard.general_check import heldout_questions

        self.questions = heldout_questions()[:self.limit]

    def settings(self) -> dict[str, Any]:
        return {"benchmark": "general", "limit": self.limit, "max_new_tokens": self.max_tokens,
                "rule": "right when the answer's first sentence contains an expected keyword (ftkit's forgetting guard)"}

    def requests(self) -> list[PromptRequest]:
        return [PromptRequest(i, messages=[{"role": "user", "content": q["prompt"]}])
                for i, q in enumerate(self.questions)]

    def stop(self) -> list[str]:
        return []

    def score(self, generation: Generation) -> dict[str, Any]:
        from ftkit.guard.general_check import is_right

        question = self.questions[generation.key]
        return {"doc_id": generation.key, "prompt": generation.prompt, "question": question["prompt"],
                "output": generation.text, "target": question["expected"],
                "correct": is_right(generation.text, question["expected"])}

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        right = [float(s["correct"]) for s in samples]
        return {"general": {**_with_stderr("right", right), "right_count": int(sum(right))}}


def resolve_benchmark(name: str, *, data: str | None, dataset_dir: str, num_fewshot: int | None, limit: int | None,
                      chat: bool, cutoff_len: int, max_new_tokens: int, identity: tuple[str, str] | None = None,
                      contains: list[str] | None = None) -> Any:
    """The benchmark ``name`` means: gsm8k, general, a GSM8K folder, or a dataset (registry name or path);
    ``identity`` (name, author) fills an identity dataset's placeholders, ``contains`` is what its answers
    should name."""
    from ftkit.evaluate.own_data import DatasetBenchmark

    fewshot = gsm8k.DEFAULT_NUM_FEWSHOT if num_fewshot is None else num_fewshot
    if name == "gsm8k":
        return Gsm8kBenchmark(data, fewshot, limit, chat)
    if name == "general":
        return GeneralBenchmark(limit)
    path = Path(name).expanduser()
    if path.is_dir() and any((f / "test.jsonl").is_file() for f in (path, path / "main")) or _is_gsm8k_file(path):
        return Gsm8kBenchmark(str(path), fewshot, limit, chat)  # LLaMA-Factory's spelling: --benchmark datasets/gsm8k
    if path.exists() or _in_registry(name, dataset_dir):
        return DatasetBenchmark(name, dataset_dir=dataset_dir, limit=limit, cutoff_len=cutoff_len,
                                max_tokens=max_new_tokens, identity=identity, contains=contains)
    registered = _registered(dataset_dir)
    datasets = f"a dataset of {dataset_dir}/dataset_info.json ({', '.join(registered)})" if registered else \
        "a dataset registered in dataset_info.json (--dataset-dir)"
    raise FtkitError(f"Unknown benchmark {name!r}: known benchmarks are {', '.join(KNOWN)}, {datasets}, or a path "
                     "to a GSM8K folder or a data file.")


def _is_gsm8k_file(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".jsonl"):
        return False
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "question" in record and "####" in str(record.get("answer", ""))


def _registered(dataset_dir: str) -> list[str]:
    from ftkit.data.registry import load_registry

    try:
        return sorted(load_registry(dataset_dir)[1])
    except FtkitError:
        return []


def _in_registry(name: str, dataset_dir: str) -> bool:
    return name in _registered(dataset_dir)

