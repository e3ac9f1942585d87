"""Answer whole conversations on the engine: what ``ftkit chat`` and the forgetting guard call.

Each conversation is rendered with the tokenizer's chat template (as training renders it) and all of them
go through one ``LLMEngine``: a finished answer leaves the batch at once and the next conversation takes
its place, where a statically padded ``generate`` batch pads to the longest prompt and waits for the
slowest answer. Answers stop at eos or the template's end-of-turn token; greedy answers equal
``model.generate``'s in fp32 (tests/test_engine_generation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ftkit.data.templates import render_conversation
from ftkit.engine.engine import LLMEngine
from ftkit.engine.options import EngineOptions
from ftkit.engine.request import SamplingParams
from ftkit.models.loader import stop_token_ids

Message = dict[str, str]
SAMPLING_TOP_P = 0.95  # with temperature > 0 (chat's --temperature)


@dataclass
class Reply:
    text: str
    token_ids: list[int]  # without the stop token
    finished: bool  # stopped at an end-of-turn/eos token rather than at max_new_tokens


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 64,
    on_text: Callable[[str], None] | None = None,
    stop_batch_when_finished: float | None = None,
) -> list[Reply]:
    """One reply per conversation (greedy when ``temperature`` is 0), at most ``batch_size`` running at once.

    ``on_text`` receives each new piece of the first reply's text as it is generated (interactive chat).
    ``stop_batch_when_finished`` (a fraction) ends generation once that share of the replies has finished:
    callers that need only *some* finished answers (the self-replay set) do not wait on answers that loop;
    replies still running then come back unfinished.
    """
    stops = stop_token_ids(tokenizer)
    engine = LLMEngine(model, tokenizer, EngineOptions(max_num_seqs=max(1, batch_size), max_loras=0))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                            top_p=SAMPLING_TOP_P if temperature > 0 else 1.0, stop_token_ids=stops,
                            skip_special_tokens=True)
    for index, conversation in enumerate(conversations):
        prompt = render_conversation(tokenizer, list(conversation), add_generation_prompt=True)
        engine.add_request(str(index), tokenizer(prompt, add_special_tokens=False)["input_ids"], params)
    results: dict[int, list[int]] = {}
    finished: set[int] = set()
    shown = ""
    enough = None if stop_batch_when_finished is None else stop_batch_when_finished * len(conversations)
    while engine.has_unfinished_requests:
        for output in engine.step():
            index, completion = int(output.request_id), output.outputs[0]
            results[index] = completion.token_ids
            if output.finished:
                finished.add(index)
            if on_text is not None and index == 0 and completion.text.startswith(shown):
                on_text(completion.text[len(shown):])
                shown = completion.text
        if enough is not None and len(finished) >= enough:
            for index in range(len(conversations)):
                if index not in finished:
                    aborted = engine.abort(str(index))
                    if aborted is not None:
                        results[index] = aborted.outputs[0].token_ids
    replies = []
    for index in range(len(conversations)):
        ids = list(results.get(index, []))
        stopped = bool(ids) and ids[-1] in stops
        ids = ids[:-1] if stopped else ids
        replies.append(Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, stopped))
    return replies
