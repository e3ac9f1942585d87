"""The merge self-check: merged weights, and the export read back from disk, give base + adapter's logits.

Before merging, the unmerged model (base in fp32 + the last adapter as peft computes it) scores a few fixed
conversations rendered with the export's chat template: the reference. Then three comparisons:

1. Merge (fp32, tolerance 1e-3): right after ``merge_and_unload`` the merged model scores the same token
   ids. Only the order of floating-point operations differs (``x @ (W + BA)`` against ``x @ W + (x @ A) @ B``):
   measured 1e-4 on the 30-layer embedded model, 4e-6 on the tiny test model.
2. Files (exact): after the cast to the export dtype the model is scored once more, saved and freed; the
   export is loaded back from the staging directory in its own dtype (memory-mapped, no second copy) and
   must reproduce those logits bit for bit: same weights, same arithmetic. This covers everything on disk
   that the model reads (weights, tied or untied head, resized embeddings, config.json).
3. Against base + adapter (the number reported): the export's logits from step 2 against the reference.
   fp32 exports meet 1e-3 again. A bf16 or fp16 export rounds every weight and computes in that dtype,
   which moves logits in proportion to the activations behind them: measured 1.6 = 4% of the largest
   logit (embedded) and 8% (tiny random model, whose logits are small sums with much cancellation) for
   bf16, 0.6-0.7% for fp16. The allowance is 25% (bf16) and 4% (fp16) of the largest reference logit:
   3-6x what was measured, a bound for what these dtypes do to a correct merge. Steps 1 and 2 are the
   sharp checks; an fp16 export that overflows (inf/NaN logits) fails here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftkit.data.templates import render_conversation
from ftkit.errors import FtkitError

Message = dict[str, str]

VERIFICATION_CONVERSATIONS: tuple[list[Message], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name the three primary colours."},
        {"role": "assistant", "content": "Red, yellow and blue."},
        {"role": "user", "content": "And the secondary ones?"},
    ],
    [{"role": "user", "content": "Write one sentence about the sea, then count to five."}],
)
"""Fixed prompts: single- and multi-turn, with and without a system message."""

SCORED_POSITIONS = 32
FP32_TOLERANCE = 1e-3
RELOAD_TOLERANCE = 0.0
"""The export read back must give the in-memory merged model's logits exactly (same weights, same arithmetic)."""
HALF_TOLERANCE = {torch.bfloat16: 0.25, torch.float16: 0.04}
"""Allowed difference as a fraction of the largest reference logit."""


@dataclass(frozen=True)
class VerificationPrompts:
    """The rendered prompts and their token ids (what both models are scored on)."""

    texts: list[str]
    token_ids: list[list[int]]


@dataclass(frozen=True)
class Verification:
    """The outcome of comparing the export's logits with the reference."""

    max_difference: float
    tolerance: float
    dtype: torch.dtype
    prompts: int

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_difference) and self.max_difference <= self.tolerance

    def describe(self) -> str:
        name = dtype_name(self.dtype)
        return (f"max logit difference {self.max_difference:.2e} against base + adapter on {self.prompts} fixed "
                f"prompts (tolerance {self.tolerance:.2e} for {name} weights)")


def render_prompts(tokenizer: Any, conversations: Sequence[list[Message]] = VERIFICATION_CONVERSATIONS) -> VerificationPrompts:
    """Render the fixed conversations with the tokenizer's chat template, as ``ftkit chat`` prompts them."""
    texts = [render_conversation(tokenizer, list(c), add_generation_prompt=True) for c in conversations]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return VerificationPrompts(texts, ids)


@torch.inference_mode()
def score(model: Any, prompts: VerificationPrompts) -> list[torch.Tensor]:
    """fp32 logits of the last ``SCORED_POSITIONS`` positions of each prompt, one prompt at a time (no padding
    to reason about). Every earlier position still flows through every layer; keeping only the last logits
    (where the prompts differ: the system prompt before them is shared) keeps three score sets small."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for ids in prompts.token_ids:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits
        scores.append(logits[0, -SCORED_POSITIONS:].float().cpu().clone())
    return scores


def logit_tolerance(dtype: torch.dtype, reference: Sequence[torch.Tensor]) -> float:
    """The largest logit difference an export in ``dtype`` may show (see the module docstring)."""
    if dtype == torch.float32:
        return FP32_TOLERANCE
    scale = max(float(logits.abs().max()) for logits in reference)
    return max(FP32_TOLERANCE, HALF_TOLERANCE.get(dtype, 0.25) * scale)


def check_reference(reference: Sequence[torch.Tensor], adapter: Path) -> None:
    """A reference with NaN or inf means the adapter weights are broken; nothing can be verified against it."""
    if not all(bool(torch.isfinite(logits).all()) for logits in reference):
        raise FtkitError(f"Base + adapter {adapter} gives non-finite logits (NaN or inf) on the fixed prompts: the "
                         "adapter weights are broken; train or save it again.")


def compare(reference: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], dtype: torch.dtype,
            tolerance: float | None = None) -> Verification:
    """Maximum absolute difference over every prompt, position and vocabulary entry (NaN counts as inf);
    the tolerance is ``logit_tolerance(dtype, reference)`` unless given."""
    tolerance = logit_tolerance(dtype, reference) if tolerance is None else tolerance
    worst = 0.0
    for expected, got in zip(reference, scores, strict=True):
        if expected.shape != got.shape:
            return Verification(math.inf, tolerance, dtype, len(reference))
        difference = torch.nan_to_num((expected - got).abs(), nan=math.inf)
        worst = max(worst, float(difference.max()))
    return Verification(worst, tolerance, dtype, len(reference))


def check_saved_tokenizer(saved: Any, prompts: VerificationPrompts) -> None:
    """The saved tokenizer must render and encode the fixed prompts exactly as the one used for the reference."""
    again = render_prompts(saved)
    if again.texts != prompts.texts or again.token_ids != prompts.token_ids:
        raise FtkitError("Merge verification failed: the saved tokenizer renders or encodes the fixed prompts "
                         "differently from the adapter's; nothing was exported (please report this as a bug).")


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16 (a dtype's name in messages and model cards)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def load_export(directory: Path, dtype: torch.dtype) -> Any:
    """The export as written, in its own dtype (no conversion, so no second copy in memory)."""
    from ftkit.models import ModelSource, load_model

    return load_model(ModelSource("local", directory, display=str(directory)), dtype=dtype)


def verify_export_on_disk(directory: Path, prompts: VerificationPrompts, reference: Sequence[torch.Tensor],
                          in_memory: Sequence[torch.Tensor], dtype: torch.dtype) -> Verification:
    """Load the export in ``directory`` back and score it: it must give the in-memory model's logits exactly,
    and the reference's (base + adapter) within the dtype's tolerance; its tokenizer must encode as before."""
    from ftkit.export.staging import release_freed_memory
    from ftkit.models import ModelSource, load_tokenizer

    model = load_export(directory, dtype)
    scores = score(model, prompts)
    del model
    release_freed_memory()
    check_saved_tokenizer(load_tokenizer(ModelSource("local", directory, display=str(directory))), prompts)
    stored = compare(in_memory, scores, dtype, tolerance=RELOAD_TOLERANCE)
    if not stored.passed:
        raise FtkitError(f"Merge verification failed: the export read back from disk gives logits up to "
                         f"{stored.max_difference:.3g} away from the merged model it was saved from; nothing was "
                         "exported.")
    result = compare(reference, scores, dtype)
    if not result.passed:
        raise FtkitError(f"Merge verification failed: the export's logits differ from base + adapter by up to "
                         f"{result.max_difference:.3g} (tolerance {result.tolerance:.3g} for {dtype_name(dtype)} "
                         "weights) on the fixed prompts; nothing was exported.")
    return result
