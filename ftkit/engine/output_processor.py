"""After each sampled token: append it, detokenise, and decide whether the request has finished.

A request stops at an end-of-sequence or stop token id (kept in ``token_ids``, not in the text: it is a
special token), at a stop string (matched on the detokenised text, so a string split across several tokens
is found; the text is cut before it), at ``max_tokens`` or at ``max_model_len`` (``"length"``). Stop ids
cannot end a request before ``min_tokens`` (the sampler masks them) and stop strings are not looked for
before then either.
"""

from __future__ import annotations

from typing import Any

from ftkit.engine.request import Request, TokenLogprob


def detokenize(tokenizer: Any, request: Request) -> str:
    return tokenizer.decode(request.output_token_ids, skip_special_tokens=request.params.skip_special_tokens)


def append_token(request: Request, token_id: int, logprob: TokenLogprob | None, tokenizer: Any) -> None:
    """Add ``token_id`` to ``request``'s output and finish the request when a stop condition holds."""
    params = request.params
    request.output_token_ids.append(token_id)
    if logprob is not None:
        request.logprobs.append(logprob)
    generated = len(request.output_token_ids)
    if token_id in request.stop_ids and generated >= params.min_tokens:
        request.text = detokenize(tokenizer, request)
        request.finish("stop", token_id if token_id in params.stop_token_ids else None)
        return
    if params.stop and generated >= params.min_tokens:
        text = detokenize(tokenizer, request)
        found = [(text.find(stop), stop) for stop in params.stop if stop in text]
        if found:
            index, stop = min(found)
            request.text = text[:index]
            request.finish("stop", stop)
            return
    if generated >= params.max_tokens or request.num_tokens >= request.max_model_len:
        request.text = detokenize(tokenizer, request)
        request.finish("length")
