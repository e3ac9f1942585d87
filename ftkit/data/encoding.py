"""Token ids and labels for training: supervised conversations and raw pre-training text.

A supervised example is encoded from the text the chat template renders, tokenized once, so its ids are
exactly ``tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]`` (no second, hand-made
formatting that could drift from what chat and serving render). Labels come from character spans: the
reply of assistant message ``i`` starts where the rendering of ``messages[:i]`` with the generation prompt
ends and runs to the end of its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, eos, ...). Text a
template writes after that token (chatml's newline) belongs to the turn but is not trained. A token is
trained when its first character lies inside a reply span, so a token straddling the start of a reply
counts as prompt.

We wrote this rather than use ``return_assistant_tokens_mask``: that needs ``{% generation %}`` markers,
which almost no model's own template has.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from ftkit.data.templates import Message, end_of_turn_token, render_conversation
from ftkit.errors import FtkitError

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """One training sequence: ``labels[t]`` is ``input_ids[t]`` where trained, else ``IGNORE_INDEX``.

    ``truncated`` says whether tokens were cut to fit ``cutoff_len`` (for statistics).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class _Turn:
    """One prompt (everything before a reply) and its reply, as token ids with their labels."""

    prompt_ids: list[int]
    prompt_labels: list[int]
    reply_ids: list[int]
    reply_labels: list[int]


@dataclass
class _ReplySpan:
    """Character offsets of one reply in the rendered text: ``[start, trained_end)`` is trained."""

    start: int
    trained_end: int
    end: int


def encode_supervised_example(
    tokenizer: Any,
    messages: list[Message],
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedExample | None:
    """Encode a conversation into ids and labels, truncated to ``cutoff_len`` tokens.

    Labels: assistant replies (with their end-of-turn token) are trained, everything else (system, user,
    role headers, generation prompt) is ``IGNORE_INDEX``. ``train_on_prompt`` trains every token;
    ``mask_history`` trains only the last assistant reply (with both: the prompts and the last reply, as in
    LLaMA-Factory).

    Truncation (LLaMA-Factory's rule, by turn): the ids are split into (prompt, reply) turns. Whole turns are
    kept from the start while they fit (with ``mask_history`` from the end, so the last turn comes first).
    The first turn that does not fit gets the remaining budget split by ``split_budget``: a side needing at
    most half the budget keeps its whole length, otherwise the budget is shared in proportion to the
    lengths (the reply keeps at least one token). The prompt keeps its tail (the role header right before
    the reply) and the reply its head. All turns after the cut one are dropped.

    Returns None when no token would be trained (no assistant reply, or none left after truncation);
    callers count those.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    turns = _encode_turns(tokenizer, messages, train_on_prompt=train_on_prompt, mask_history=mask_history)
    if not turns:
        return None
    kept = _truncate_turns(turns, cutoff_len, keep_last_first=mask_history)
    truncated = sum(len(t.prompt_ids) + len(t.reply_ids) for t in turns) > cutoff_len
    input_ids: list[int] = []
    labels: list[int] = []
    for turn in kept:
        input_ids += turn.prompt_ids + turn.reply_ids
        labels += turn.prompt_labels + turn.reply_labels
    # The label at position 0 is never predicted (labels shift by one inside the model).
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return EncodedExample(input_ids, labels, truncated)


def trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example decoded as runs of text, each with whether it is trained (label not -100): what ``ftkit data
    preview`` and ``ftkit board`` highlight."""
    spans: list[tuple[str, bool]] = []
    start = 0
    while start < len(input_ids):
        trained = labels[start] != -100
        end = start
        while end < len(input_ids) and (labels[end] != -100) == trained:
            end += 1
        spans.append((tokenizer.decode(input_ids[start:end], skip_special_tokens=False), trained))
        start = end
    return spans


def split_budget(prompt_len: int, reply_len: int, budget: int) -> tuple[int, int]:
    """Split ``budget`` tokens between a prompt and its reply; returns (prompt tokens, reply tokens).

    LLaMA-Factory's ``infer_seqlen`` idea: a side that needs at most half the budget keeps its whole length
    and the other side gets the rest; otherwise the budget is shared in proportion to the lengths. Unlike
    LLaMA-Factory, the reply keeps at least one token when the budget has room for a prompt token too, so a
    cut turn always trains something (LLaMA-Factory can round the reply down to nothing).
    """
    if reply_len * 2 <= budget:
        new_reply_len = reply_len
    elif prompt_len * 2 <= budget:
        new_reply_len = budget - prompt_len
    else:
        new_reply_len = int(budget * reply_len / (prompt_len + reply_len))
    if budget >= 2:
        new_reply_len = max(new_reply_len, 1)
    new_reply_len = min(new_reply_len, reply_len, budget)
    new_prompt_len = min(budget - new_reply_len, prompt_len)
    return new_prompt_len, new_reply_len


def encode_pretrain_text(tokenizer: Any, text: str, *, cutoff_len: int) -> list[EncodedExample]:
    """Encode raw text for continued pre-training: [bos] + tokens + eos, every token trained.

    The sequence is cut into chunks of at most ``cutoff_len`` tokens (bos only at the very start, when the
    tokenizer adds one to plain text). A final chunk of a single token is dropped: it predicts nothing.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer):
        ids.insert(0, tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[start : start + cutoff_len] for start in range(0, len(ids), cutoff_len)]
    return [EncodedExample(chunk, list(chunk), len(chunks) > 1) for chunk in chunks if len(chunk) >= 2]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _encode_turns(
    tokenizer: Any, messages: list[Message], *, train_on_prompt: bool, mask_history: bool
) -> list[_Turn]:
    assistant_indices = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant_indices:
        return []
    if assistant_indices[0] == 0:
        raise FtkitError("A conversation starts with an assistant message; it must start with a user message.")
    text = render_conversation(tokenizer, messages)
    ids, starts = _tokenize_with_starts(tokenizer, text)
    spans = _reply_spans(tokenizer, messages, assistant_indices, text)

    def token_index(char_position: int) -> int:
        return bisect_left(starts, char_position)

    turns: list[_Turn] = []
    prompt_begin = 0
    last = len(spans) - 1
    for k, span in enumerate(spans):
        reply_begin = token_index(span.start)
        trained_end = token_index(span.trained_end)
        reply_end = len(ids) if k == last else token_index(span.end)
        prompt_ids = ids[prompt_begin:reply_begin]
        reply_ids = ids[reply_begin:reply_end]
        if train_on_prompt:
            prompt_labels = list(prompt_ids)
            reply_labels = list(reply_ids)
        else:
            prompt_labels = [IGNORE_INDEX] * len(prompt_ids)
            reply_labels = ids[reply_begin:trained_end] + [IGNORE_INDEX] * (reply_end - trained_end)
        if mask_history and k != last:
            reply_labels = [IGNORE_INDEX] * len(reply_ids)
        turns.append(_Turn(prompt_ids, prompt_labels, reply_ids, reply_labels))
        prompt_begin = reply_end
    return turns


def _tokenize_with_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (as apply_chat_template tokenizes it) and each token's first character."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise FtkitError(
            "Encoding with loss masks needs a fast tokenizer (with offset mappings); this model's tokenizer "
            "is a slow one — install `tokenizers` or use a model with a tokenizer.json."
        ) from error
    starts: list[int] = []
    for start, end in encoded["offset_mapping"]:
        # Zero-width tokens (rare, added by some normalizers) take the position of the token before them,
        # which keeps the starts sorted for bisect.
        position = start if end > start else (starts[-1] if starts else 0)
        starts.append(max(position, starts[-1]) if starts else position)
    return list(encoded["input_ids"]), starts


def _reply_spans(
    tokenizer: Any, messages: list[Message], assistant_indices: list[int], text: str
) -> list[_ReplySpan]:
    """Character spans of each assistant reply in ``text`` (the rendering of the whole conversation).

    Prefix method: the rendering of ``messages[:i]`` with the generation prompt must be a prefix of the
    full text, and the reply ends where the rendering of ``messages[:i + 1]`` ends. Templates that rewrite
    earlier turns (e.g. reasoning templates that drop the thinking of past replies) break that; then each
    reply is located by searching for its content after the previous reply.
    """
    end_of_turn = end_of_turn_token(tokenizer)
    spans: list[_ReplySpan] = []
    cursor = 0
    for i in assistant_indices:
        prompt_text = render_conversation(tokenizer, messages[:i], add_generation_prompt=True)
        upto_text = render_conversation(tokenizer, messages[: i + 1])
        is_prefix = (
            text.startswith(prompt_text)
            and text.startswith(upto_text)
            and cursor <= len(prompt_text) <= len(upto_text)
        )
        if is_prefix:
            start, end = len(prompt_text), len(upto_text)
        else:
            start, end = _search_reply(tokenizer, text, messages[i]["content"], end_of_turn, cursor)
        eot_at = text.rfind(end_of_turn, start, end)
        trained_end = eot_at + len(end_of_turn) if eot_at >= 0 else end
        spans.append(_ReplySpan(start, trained_end, end))
        cursor = end
    return spans


def _search_reply(tokenizer: Any, text: str, content: str, end_of_turn: str, cursor: int) -> tuple[int, int]:
    """Fallback: find a reply's content after ``cursor``; the span ends after the next end-of-turn token."""
    for needle in (content, content.strip()):
        at = text.find(needle, cursor) if needle else -1
        if at >= 0:
            after = at + len(needle)
            eot_at = text.find(end_of_turn, after)
            return at, (eot_at + len(end_of_turn) if eot_at >= 0 else after)
    name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
    raise FtkitError(
        f"Cannot find an assistant reply in the text rendered by the chat template of {name}; the template "
        "rewrites replies, so set `template:` to one of ftkit's named templates (e.g. chatml or default)."
    )


def _truncate_turns(turns: list[_Turn], cutoff_len: int, *, keep_last_first: bool) -> list[_Turn]:
    order = list(reversed(turns)) if keep_last_first else list(turns)
    budget = cutoff_len
    kept: list[_Turn] = []
    for turn in order:
        if budget <= 0:
            break
        prompt_len, reply_len = len(turn.prompt_ids), len(turn.reply_ids)
        if prompt_len + reply_len <= budget:
            kept.append(turn)
            budget -= prompt_len + reply_len
            continue
        new_prompt_len, new_reply_len = split_budget(prompt_len, reply_len, budget)
        if new_reply_len > 0:
            cut = prompt_len - new_prompt_len
            kept.append(
                _Turn(
                    turn.prompt_ids[cut:],
                    turn.prompt_labels[cut:],
                    turn.reply_ids[:new_reply_len],
                    turn.reply_labels[:new_reply_len],
                )
            )
        break
    return list(reversed(kept)) if keep_last_first else kept
