"""The user's own datasets as a benchmark: the same reading and templates as training, then scores.

A conversation dataset (any format ``ftkit train`` reads) is scored twice: the loss and perplexity of the
reply tokens, from the engine's prompt log-probabilities over the example encoded exactly as training
encodes it (same template, same labels); then the model answers each conversation's last user turn
(greedy) and the answer is compared with the dataset's last reply: exact match, BLEU-4, ROUGE-1/2/L (per
character for Chinese) and ``contains`` (does the answer name the reference, for identity checks).

A multiple-choice dataset (records with ``question``, a ``choices`` list and an ``answer`` index or letter)
is scored by log-likelihood as lm-eval's multiple_choice tasks are: the context "Question: {question}
\\nAnswer:", each choice as the continuation " {choice}", ``acc`` the highest summed log-probability,
``acc_norm`` the highest per byte of the choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluate.backends import Generation, PromptRequest
from ftkit.evaluate.metrics import mean, mean_stderr

IGNORE_INDEX = -100
SCORES = ("exact_match", "bleu4", "rouge1", "rouge2", "rougeL", "contains")


@dataclass
class DatasetBenchmark:
    """One dataset (registry name or path) from ``dataset_dir``."""

    dataset: str
    dataset_dir: str
    limit: int | None
    cutoff_len: int
    max_tokens: int
    identity: tuple[str, str] | None = None  # (name, author) for {{name}} and {{author}}
    contains: list[str] | None = None  # what ``contains`` looks for (default: the whole reply)
    kind: str = "conversation"
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    choices: list[dict[str, Any]] = field(default_factory=list)
    nll: dict[int, tuple[float, int]] = field(default_factory=dict)  # key -> (summed NLL, reply tokens)

    @property
    def name(self) -> str:
        return self.dataset

    def load(self) -> None:
        from ftkit.data.dataset import read_conversations
        from ftkit.data.options import DataOptions
        from ftkit.data.readers import read_records
        from ftkit.data.registry import resolve_dataset

        spec = resolve_dataset(self.dataset, self.dataset_dir)
        records = read_records(spec, self.limit)
        if records and "choices" in records[0]:
            self.kind = "multiple_choice"
            self.choices = [_choice_record(r, i, self.dataset) for i, r in enumerate(records)]
            return
        identity = dict(zip(("identity_name", "identity_author"), self.identity, strict=True)) if self.identity else {}
        options = DataOptions(dataset=(self.dataset,), dataset_dir=self.dataset_dir, cutoff_len=self.cutoff_len,
                              max_samples=self.limit, **identity)
        self.conversations, _ = read_conversations(spec, options)
        if not self.conversations:
            raise FtkitError(f"Dataset {self.dataset!r} has no usable conversation (a user turn answered by an "
                             "assistant turn); check its format with ftkit data preview.")

    def settings(self) -> dict[str, Any]:
        return {"benchmark": self.dataset, "dataset_dir": self.dataset_dir, "kind": self.kind, "limit": self.limit,
                "cutoff_len": self.cutoff_len, "max_new_tokens": self.max_tokens,
                "identity": list(self.identity) if self.identity else None, "contains": self.contains}

    def stop(self) -> list[str]:
        return []

    # ---- conversations: loss before generation, then the answers -----------------------------------------------

    def prepare(self, backend: Any, done: set[int]) -> None:
        """The reply tokens' NLL of every conversation not scored yet (local models only)."""
        if self.kind == "multiple_choice" and not hasattr(backend, "prompt_logprobs"):
            raise FtkitError("Multiple-choice scoring needs the model's log-probabilities, which an endpoint does "
                             "not give; evaluate the model itself (--model) instead of --endpoint.")
        if self.kind != "conversation" or not hasattr(backend, "prompt_logprobs"):
            return
        from ftkit.data.encoding import encode_supervised_example

        keys, encoded = [], []
        for key, conversation in enumerate(self.conversations):
            example = None if key in done else encode_supervised_example(backend.tokenizer, conversation,
                                                                         cutoff_len=self.cutoff_len)
            if example is not None:
                keys.append(key)
                encoded.append(example)
        for key, example, logprobs in zip(keys, encoded, backend.prompt_logprobs([e.input_ids for e in encoded]),
                                          strict=True):
            trained = [logprobs[i - 1] for i in range(1, len(example.labels)) if example.labels[i] != IGNORE_INDEX]
            self.nll[key] = (-sum(trained), len(trained))

    def requests(self) -> list[PromptRequest]:
        if self.kind != "conversation":
            return []
        return [PromptRequest(key, messages=c[:-1]) for key, c in enumerate(self.conversations)]

    def score(self, generation: Generation) -> dict[str, Any]:
        from ftkit.evaluate.metrics import contains, generation_scores

        reference = self.conversations[generation.key][-1]["content"]
        scores = generation_scores(generation.text, reference)
        if self.contains:
            scores["contains"] = contains(generation.text, self.contains)
        sample = {"doc_id": generation.key, "prompt": generation.prompt, "output": generation.text,
                  "target": reference, "scores": scores}
        if generation.key in self.nll:
            sample["nll"], sample["reply_tokens"] = self.nll[generation.key]
        return sample

    # ---- multiple choice: no generation -------------------------------------------------------------------------

    def score_directly(self, backend: Any, done: set[int], append: Callable[[dict[str, Any]], None]) -> None:
        """Score each multiple-choice item by log-likelihood and append its sample."""
        for key, item in enumerate(self.choices):
            if key in done:
                continue
            context = f"Question: {item['question']}\nAnswer:"
            context_ids = backend.encode(context)
            sequences, lengths = [], []
            for choice in item["choices"]:
                whole = backend.encode(f"{context} {choice}")
                continuation = len(whole) - len(context_ids)
                if whole[:len(context_ids)] != context_ids or continuation < 1:
                    whole, continuation = context_ids + backend.encode(f" {choice}"), len(backend.encode(f" {choice}"))
                sequences.append(whole)
                lengths.append(continuation)
            logprobs = backend.prompt_logprobs(sequences)
            loglikelihoods = [sum(lp[-n:]) for lp, n in zip(logprobs, lengths, strict=True)]
            normalised = [ll / max(len(f" {c}".encode()), 1) for ll, c in zip(loglikelihoods, item["choices"], strict=True)]
            gold = item["answer"]
            append({"doc_id": key, "prompt": context, "choices": item["choices"], "target": gold,
                    "loglikelihoods": loglikelihoods,
                    "acc": float(max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__) == gold),
                    "acc_norm": float(max(range(len(normalised)), key=normalised.__getitem__) == gold)})

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kind == "multiple_choice":
            found = {}
            for metric in ("acc", "acc_norm"):
                values = [s[metric] for s in samples]
                found |= {metric: mean(values), f"{metric}_stderr": mean_stderr(values)}
            return {"multiple_choice": found}
        scores: dict[str, Any] = {}
        scored = [s for s in samples if "nll" in s]
        if scored:
            tokens = sum(s["reply_tokens"] for s in scored)
            loss = sum(s["nll"] for s in scored) / tokens if tokens else float("nan")
            scores["loss"] = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                              "reply_tokens": tokens}
        generation = {}
        for metric in SCORES:
            values = [s["scores"][metric] for s in samples]
            generation |= {metric: mean(values), f"{metric}_stderr": mean_stderr(values)}
        scores["generation"] = generation
        return scores


def _choice_record(record: dict[str, Any], index: int, dataset: str) -> dict[str, Any]:
    """``question``, ``choices`` and the answer as an index, checked."""
    where = f"Dataset {dataset!r} record {index + 1}"
    question = record.get("question", record.get("prompt", record.get("instruction")))
    choices = record.get("choices")
    if not isinstance(question, str):
        raise FtkitError(f"{where} has no question text; a multiple-choice record needs question, choices and answer.")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise FtkitError(f"{where}: choices must be a list of at least two texts, got {choices!r}.")
    answer = record.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper().isalpha():
        answer = ord(answer.upper()) - ord("A")
    elif isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FtkitError(f"{where}: answer must be the index (0..{len(choices) - 1}), letter or text of one of the "
                         f"choices, got {record.get('answer')!r}.")
    return {"question": question, "choices": choices, "answer": answer}
