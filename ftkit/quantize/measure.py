"""Measure a model the same way before and after quantization: memory, speed and quality, in one process.

* **Peak memory**: resident memory (RSS) sampled every 5 ms by a thread while the model loads and generates,
  minus the RSS before loading: what the model costs on top of the running program.
* **Prompt tokens/s**: teacher-forced forward passes over the held-out text in chunks of ``CHUNK`` tokens.
* **Generation tokens/s and latency per sample**: single-stream greedy generation of exactly
  ``new_tokens`` tokens for each of the fixed verification prompts (``ftkit.export.verify``), one at a time,
  after one untimed warm-up; latency is the mean wall time per prompt (prompt + generation).
* **Quality** on the held-out text: perplexity, and against the original's logits at every scored position
  top-1 agreement (same arg-max token) and the largest absolute logit difference.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

CHUNK = 256


@dataclass
class Measurement:
    """What one model measured; quality against the original is None for the original itself."""

    peak_memory_bytes: int
    load_seconds: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    latency_per_sample_s: float
    perplexity: float
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    scored_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class Scores:
    """The original model's logits on the held-out chunks (what a quantized model is compared with)."""

    logits: list[torch.Tensor] = field(default_factory=list)


class PeakMemory:
    """Context manager: ``.peak`` is the largest RSS increase seen since entering (sampled every 5 ms)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._baseline = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss - self._baseline)
            self._stop.wait(0.005)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss - self._baseline)


def eval_chunks(tokenizer: Any, text: str, max_tokens: int) -> list[torch.Tensor]:
    """The held-out text's first ``max_tokens`` tokens in chunks of at most ``CHUNK`` (each at least 2 long)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    chunks = [ids[start:start + CHUNK] for start in range(0, len(ids), CHUNK)]
    return [torch.tensor([chunk]) for chunk in chunks if len(chunk) >= 2]


def measure(load: Callable[[], Any], tokenizer: Any, chunks: list[torch.Tensor], prompts: list[list[int]],
            new_tokens: int, reference: Scores | None) -> tuple[Measurement, Scores, Any]:
    """Load the model with ``load`` and measure it; returns the measurement, its scores and the model."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        model = load()
        load_seconds = time.perf_counter() - start
        generation_rate, latency, generated = _time_generation(model, tokenizer, prompts, new_tokens)
    prompt_rate, scores, nll, scored = _score(model, chunks)
    result = Measurement(memory.peak, load_seconds, prompt_rate, generation_rate, latency, math.exp(nll),
                         scored_tokens=scored, generated_tokens=generated)
    if reference is not None:
        result.top1_agreement, result.max_abs_logit_diff = _agreement(reference, scores)
    return result, scores, model


@torch.inference_mode()
def _time_generation(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    model.eval()
    device = _device(model)
    settings = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                "pad_token_id": tokenizer.pad_token_id}
    model.generate(torch.tensor([prompts[0]], device=device), **{**settings, "max_new_tokens": 2,
                                                                 "min_new_tokens": 2})  # warm-up
    generated, elapsed = 0, 0.0
    for ids in prompts:
        start = time.perf_counter()
        output = model.generate(torch.tensor([ids], device=device), **settings)
        elapsed += time.perf_counter() - start
        generated += output.shape[1] - len(ids)
    return generated / elapsed, elapsed / len(prompts), generated


@torch.inference_mode()
def _score(model: Any, chunks: list[torch.Tensor]) -> tuple[float, Scores, float, int]:
    device = _device(model)
    scores, total_nll, scored, forward_seconds, tokens = Scores(), 0.0, 0, 0.0, 0
    for chunk in chunks:
        start = time.perf_counter()
        logits = model(input_ids=chunk.to(device)).logits[0].float().cpu()
        forward_seconds += time.perf_counter() - start
        tokens += chunk.shape[1]
        targets = chunk[0, 1:]
        total_nll += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
        scored += targets.numel()
        scores.logits.append(logits)
    return tokens / forward_seconds, scores, total_nll / scored, scored


def _agreement(reference: Scores, scores: Scores) -> tuple[float, float]:
    same, total, worst = 0, 0, 0.0
    for expected, got in zip(reference.logits, scores.logits, strict=True):
        same += int((expected.argmax(-1) == got.argmax(-1)).sum())
        total += expected.shape[0]
        worst = max(worst, float(torch.nan_to_num((expected - got).abs(), nan=math.inf).max()))
    return same / total, worst


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
