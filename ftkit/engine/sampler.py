"""Turns a step's logits into each request's next token, with its own sampling parameters.

Every request is sampled from its own logits row with its own settings, so mixing greedy, seeded and
penalised requests in one batch is free. A seeded request draws from its own ``torch.Generator``: the same
seed gives the same tokens alone or in any batch. Processing order (as in vLLM and transformers):
user logits processors, ``min_tokens`` (stop tokens masked), repetition penalty (prompt and output),
presence and frequency penalties (output), then greedy argmax or temperature, top-k, top-p, min-p and a
draw. Log-probabilities are those of the model's raw logits (``log_softmax``), before any processing.

Written here rather than with transformers' logits processors because those apply one setting to a whole
batch; here every row carries its own.

A failure while sampling one request (a logits processor that raises, probabilities that are all NaN) is
that request's error; the others in the step are sampled as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftkit.engine.model_runner import StepLogits
from ftkit.engine.request import Request, SamplingParams, TokenLogprob


@dataclass
class SampledToken:
    request: Request
    token_id: int | None  # None when sampling failed
    logprob: TokenLogprob | None = None
    error: str | None = None


def _is_plain_greedy(request: Request) -> bool:
    params = request.params
    return (params.greedy and not params.logits_processors and params.repetition_penalty == 1
            and params.presence_penalty == 0 and params.frequency_penalty == 0
            and not (len(request.output_token_ids) < params.min_tokens and request.stop_ids))


def _token_logprob(logits_row: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits_row, dim=-1)
    best = {}
    if top > 0:
        values, ids = logprobs.topk(top)
        best = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, logprobs[token_id].item(), best)


def apply_penalties(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """Logits processors, ``min_tokens`` and the three penalties, on one row (a new tensor)."""
    params, output = request.params, request.output_token_ids
    logits = logits.clone()
    for processor in params.logits_processors:
        logits = processor(list(output), logits)
    if len(output) < params.min_tokens and request.stop_ids:
        logits[list(request.stop_ids)] = float("-inf")
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(request.all_token_ids)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row of logits (in place)."""
    logits /= params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        threshold = logits.topk(params.top_k).values[-1]
        logits[logits < threshold] = float("-inf")
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits[probs < params.min_p * probs.max()] = float("-inf")
    return logits


def _sample_row(logits_row: torch.Tensor, request: Request) -> int:
    params = request.params
    processed = apply_penalties(logits_row, request)
    if params.greedy:
        return int(processed.argmax())
    probs = filter_logits(processed, params).softmax(-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        raise ValueError("no token has a finite probability after the sampling filters")
    return int(torch.multinomial(probs, 1, generator=request.generator))


def sample_step(step: StepLogits) -> list[SampledToken]:
    """Sample the next token of every request in ``step`` that has a next-token row; record prompt logprobs."""
    results: list[SampledToken] = []
    for item in step.requests:
        if item.prompt_rows is not None:
            _record_prompt_logprobs(step.logits, item.request, item.prompt_rows)
    greedy = [item for item in step.requests if item.sample_row is not None and _is_plain_greedy(item.request)]
    if greedy:
        rows = torch.tensor([item.sample_row for item in greedy], device=step.logits.device)
        for item, token in zip(greedy, step.logits[rows].argmax(-1).tolist(), strict=True):
            results.append(_with_logprob(step.logits[item.sample_row], item.request, token))
    for item in step.requests:
        if item.sample_row is None or _is_plain_greedy(item.request):
            continue
        try:
            token = _sample_row(step.logits[item.sample_row], item.request)
        except Exception as error:  # one request's failure must not stop the others
            results.append(SampledToken(item.request, None, error=f"Sampling failed for request "
                                        f"{item.request.request_id}: {error}"))
            continue
        results.append(_with_logprob(step.logits[item.sample_row], item.request, token))
    return results


def _with_logprob(logits_row: torch.Tensor, request: Request, token: int) -> SampledToken:
    top = request.params.logprobs
    return SampledToken(request, token, _token_logprob(logits_row, token, top) if top is not None else None)


def _record_prompt_logprobs(logits: torch.Tensor, request: Request, prompt_rows: tuple[int, int, int]) -> None:
    first_row, first_position, count = prompt_rows
    logprobs = torch.log_softmax(logits[first_row:first_row + count], dim=-1)
    top = request.params.prompt_logprobs or 0
    targets = request.prompt_token_ids[first_position + 1:first_position + 1 + count]
    chosen = logprobs[torch.arange(count), torch.tensor(targets, device=logits.device)].tolist()
    best = logprobs.topk(top, dim=-1) if top > 0 else None
    for index, (token, value) in enumerate(zip(targets, chosen, strict=True)):
        entry_top = dict(zip(best.indices[index].tolist(), best.values[index].tolist(), strict=True)) if best is not None else {}
        request.prompt_logprobs.append(TokenLogprob(token, value, entry_top))
