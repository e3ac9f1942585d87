"""A model's greedy answers to prompts, cached on disk: the self-replay set and the general check read from it.

Answers are generated once per model and cached under ``$FTKIT_HOME/answers`` (an ``AnswerCache``), keyed
on everything that changes them: the model files, the chat template, how the model is loaded (dtype,
quantization, attention implementation, remote code) and the generation settings. No library offers
this: it is a cache of one model's greedy answers, so it is written here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.data.formats import Conversation
from ftkit.paths import atomic_write_text, ftkit_home

ANSWER_CACHE_VERSION = 3  # 2: answers generated on the inference engine; 3: replay in fixed batches
GENERATION_BATCH = 96  # decoding a 135M model on a CPU is overhead-bound: wide batches are nearly free

Generate = Callable[[Sequence[Conversation]], list[Any]]  # conversations -> replies with .text/.token_ids/.finished


def model_fingerprint(path: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights cheaply: its config and each weight file's name, size and mtime."""
    path = Path(path)
    files = [path / gguf_file] if gguf_file else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") or p.name == "config.json"
    ) if path.is_dir() else [path]
    return {"path": str(path.resolve()),
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]}


@dataclass
class Answer:
    text: str
    tokens: int
    finished: bool


@dataclass
class AnswerCache:
    """One model's greedy answers to prompts, stored as JSON lines under ``$FTKIT_HOME/answers/<key>.jsonl``.

    The key covers the model files, the chat template, the load dtype/quantization and the generation
    settings; a changed model or template starts a new file. Writes are atomic, after every batch, so an
    interrupted generation keeps what it finished.
    """

    key: str
    answers: dict[str, Answer] = field(default_factory=dict)

    @classmethod
    def open(cls, **identity: Any) -> AnswerCache:
        payload = json.dumps({"version": ANSWER_CACHE_VERSION, **identity}, sort_keys=True, default=str)
        cache = cls(hashlib.sha256(payload.encode()).hexdigest()[:32])
        if cache.path.is_file():
            for line in cache.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    cache.answers[row["prompt"]] = Answer(row["text"], int(row["tokens"]), bool(row["finished"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line is regenerated
        return cache

    @property
    def path(self) -> Path:
        return ftkit_home() / "answers" / f"{self.key}.jsonl"

    def save(self) -> None:
        lines = [json.dumps({"prompt": p, "text": a.text, "tokens": a.tokens, "finished": a.finished},
                            ensure_ascii=False) for p, a in self.answers.items()]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def fill(self, prompts: Sequence[str], generate: Generate, *, desc: str, batch_size: int = GENERATION_BATCH,
             conversation: Callable[[str], Conversation] | None = None) -> GenerationReport:
        """Generate the answers ``prompts`` still lack, in batches, and report the time.

        Answers are stored under the prompt; ``conversation(prompt)`` builds what the model is asked (by
        default the prompt as one user message; a variant may add a system prompt).
        """
        from tqdm import tqdm

        ask = conversation or (lambda prompt: [{"role": "user", "content": prompt}])
        missing = [p for p in dict.fromkeys(prompts) if p not in self.answers]
        report = GenerationReport(cached=len(prompts) - len(missing))
        if not missing:
            return report
        started = time.perf_counter()
        with tqdm(total=len(missing), desc=desc, unit="answer", dynamic_ncols=True, leave=False) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start:start + batch_size]
                replies = generate([ask(p) for p in batch])
                for prompt, reply in zip(batch, replies, strict=True):
                    self.answers[prompt] = Answer(reply.text, len(reply.token_ids), bool(reply.finished))
                    report.tokens += len(reply.token_ids)
                report.generated += len(batch)
                self.save()
                bar.update(len(batch))
        report.seconds = time.perf_counter() - started
        return report


@dataclass
class GenerationReport:
    cached: int = 0
    generated: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def merge(self, other: GenerationReport) -> None:
        self.cached += other.cached
        self.generated += other.generated
        self.tokens += other.tokens
        self.seconds += other.seconds

    def summary(self) -> str:
        if not self.generated:
            return f"{self.cached} answers from cache"
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"generated {self.generated} answers in {self.seconds:.0f} s ({rate:.0f} tokens/s)"
                + (f", {self.cached} from cache" if self.cached else ""))
