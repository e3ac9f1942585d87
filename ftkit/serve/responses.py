"""Engine outputs as OpenAI response bodies and Server-Sent Event chunks.

Streamed text is sent as deltas of the detokenised text. A delta never ends inside a character (a
trailing U+FFFD is held back until the next token completes it) nor with the beginning of a stop string
(held back until the string is either complete, and cut, or ruled out), so the concatenated deltas equal
the non-streamed text.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ftkit.engine import CompletionOutput, RequestOutput, TokenLogprob
from ftkit.serve.generation import Job
from ftkit.serve.protocol import APIError

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def raise_sample_error(output: RequestOutput) -> None:
    """A sample that failed inside the engine (a failing logits processor) fails its request with a 500."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            raise APIError(500, f"Generation failed for this request: {output.error or 'unknown error'}")


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _stop_reason(job: Job, completion: CompletionOutput) -> str | int | None:
    """The stop string or id the request asked for that ended the sample (None for eos/end of turn, as vLLM)."""
    reason = completion.stop_reason
    return None if isinstance(reason, int) and reason in job.implicit_stop_ids else reason


# ---- chat -------------------------------------------------------------------------------------------------


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs.content``: each token with its logprob, bytes and top alternatives."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top.items()]} for lp in logprobs]}


def chat_response(job: Job, model: str, output: RequestOutput, want_logprobs: bool) -> dict[str, Any]:
    raise_sample_error(output)
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": chat_logprobs(job.served.tokenizer, c.logprobs or []) if want_logprobs else None,
        "finish_reason": FINISH_REASONS.get(c.finish_reason or "", c.finish_reason),
        "stop_reason": _stop_reason(job, c),
    } for c in output.outputs]
    return {"id": job.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage([output])}


# ---- completions ------------------------------------------------------------------------------------------


def completion_logprobs(tokenizer: Any, entries: list[TokenLogprob | None], token_ids: list[int],
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs``: tokens, their logprobs, top alternatives (the token itself included)
    and text offsets; a position without a logprob (the first prompt token) has None."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top = {_token_text(tokenizer, t): v for t, v in entry.top.items()}
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _completion_choice(job: Job, prompt_index: int, output: RequestOutput, completion: CompletionOutput,
                       echo: bool) -> dict[str, Any]:
    tokenizer = job.served.tokenizer
    prefix = job.prompt_texts[prompt_index] if echo and job.prompt_texts else ""
    logprobs = None
    if job.params.logprobs is not None:
        entries: list[TokenLogprob | None] = list(completion.logprobs or [])
        token_ids = list(completion.token_ids)
        if echo:
            prompt_entries = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids))
            entries, token_ids = [*prompt_entries, *entries], [*output.prompt_token_ids, *token_ids]
        logprobs = completion_logprobs(tokenizer, entries, token_ids)
    return {"index": prompt_index * job.params.n + completion.index, "text": prefix + completion.text,
            "logprobs": logprobs, "finish_reason": FINISH_REASONS.get(completion.finish_reason or "",
                                                                      completion.finish_reason),
            "stop_reason": _stop_reason(job, completion)}


def completion_response(job: Job, model: str, outputs: list[RequestOutput], echo: bool) -> dict[str, Any]:
    for output in outputs:
        raise_sample_error(output)
    choices = [_completion_choice(job, i, o, c, echo) for i, o in enumerate(outputs) for c in o.outputs]
    return {"id": job.request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(outputs)}


# ---- streaming --------------------------------------------------------------------------------------------


def sse(payload: dict[str, Any] | str) -> str:
    """One Server-Sent Event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def safe_text_end(text: str, stops: list[str], finished: bool) -> int:
    """How much of ``text`` may be sent now (see the module docstring)."""
    if finished:
        return len(text)
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:size], 0, end):
                held = max(held, size)
                break
    return end - held


class StreamState:
    """What has been sent of each choice: characters of text, logprob entries, and whether it finished."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sent_chars: dict[int, int] = {}
        self.sent_logprobs: dict[int, int] = {}
        self.finals: dict[int, RequestOutput] = {}
        self.done: set[int] = set()

    def deltas(self, prompt_index: int, output: RequestOutput):
        """(choice index, new text, new logprob entries, finish reason or None) for each choice that changed."""
        if output.finished:
            self.finals[prompt_index] = output
            raise_sample_error(output)
        for completion in output.outputs:
            index = prompt_index * self.job.params.n + completion.index
            if index in self.done:
                continue
            done = completion.finish_reason is not None
            if done:
                self.done.add(index)
            end = max(safe_text_end(completion.text, self.job.params.stop, done), self.sent_chars.get(index, 0))
            text = completion.text[self.sent_chars.get(index, 0):end]
            self.sent_chars[index] = end
            entries = completion.logprobs or []
            new_entries = entries[self.sent_logprobs.get(index, 0):]
            self.sent_logprobs[index] = len(entries)
            reason = FINISH_REASONS.get(completion.finish_reason or "", completion.finish_reason) if done else None
            if text or new_entries or reason:
                yield index, text, new_entries, reason

    def usage(self) -> dict[str, int]:
        return usage([self.finals[i] for i in sorted(self.finals)])


def error_event(error: APIError) -> str:
    return sse(error.body())
