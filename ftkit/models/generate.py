"""Answer conversations with a loaded model: batched, left-padded ``generate`` that stops at end of turn.

Used by ``ftkit chat`` and by every stage that needs a model's own answers (the merge self-check, the
forgetting guard). The serving engine has its own scheduler; this is the simple, exact path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ftkit.data.templates import end_of_turn_token, render_conversation

Message = dict[str, str]


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    finished: bool  # stopped at an end-of-turn/eos token rather than at max_new_tokens


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: eos and the template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(eot_id, int) and eot_id != tokenizer.unk_token_id:
            ids.add(eot_id)
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    streamer: Any = None,
    stop_batch_when_finished: float | None = None,
) -> list[Reply]:
    """Generate one reply per conversation (greedy when temperature is 0), in batches.

    ``stop_batch_when_finished`` (a fraction) ends a batch as soon as that share of its rows has finished:
    a static batch otherwise runs until its longest answer ends, and callers that only need *some* finished
    answers (the self-replay set) would wait on the slowest row. Rows cut short come back unfinished.
    """
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    replies: list[Reply] = []
    original_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            prompts = [render_conversation(tokenizer, list(c), add_generation_prompt=True) for c in batch]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            criteria = None
            if stop_batch_when_finished is not None:
                criteria = StoppingCriteriaList(
                    [_EnoughFinished(encoded["input_ids"].shape[1], stops, stop_batch_when_finished)])
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                    stopping_criteria=criteria, **sampling)
            for row in output[:, encoded["input_ids"].shape[1]:].tolist():
                ids, finished = _cut_at_stop(row, stops)
                replies.append(Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished))
    finally:
        tokenizer.padding_side = original_side
    return replies


def _cut_at_stop(ids: list[int], stops: list[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index], True
    return ids, False


class _EnoughFinished(StoppingCriteria):
    """A transformers stopping criterion: stop every row once ``fraction`` of the batch has finished."""

    def __init__(self, prompt_length: int, stops: list[int], fraction: float) -> None:
        self.prompt_length, self.fraction = prompt_length, fraction
        self.stops = torch.tensor(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        finished = torch.isin(input_ids[:, self.prompt_length:], self.stops.to(input_ids.device)).any(dim=1)
        if finished.float().mean().item() >= self.fraction:
            return torch.ones_like(finished)
        return finished
