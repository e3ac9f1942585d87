"""Encoding: ids equal apply_chat_template, labels train exactly the assistant replies, truncation by turn."""

from __future__ import annotations

import copy
import itertools

import pytest

from ftkit.data.encoding import (
    IGNORE_INDEX,
    encode_pretrain_text,
    encode_supervised_example,
    split_budget,
)
from ftkit.data.templates import apply_chat_template_to_tokenizer, end_of_turn_token
from ftkit.errors import FtkitError

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4."}]
SINGLE_WITH_SYSTEM = [{"role": "system", "content": "You answer in one line."}, *SINGLE]
MULTI = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one,\nplease!"},
    {"role": "assistant", "content": "Red, then green:\n- red\n- green"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]
MULTI_WITH_SYSTEM = [{"role": "system", "content": "Be helpful."}, *MULTI]
CONVERSATIONS = {"single": SINGLE, "single+system": SINGLE_WITH_SYSTEM, "multi": MULTI, "multi+system": MULTI_WITH_SYSTEM}

# (tokenizer fixture, template to apply or None for the tokenizer's own, text the template puts before a reply)
TEMPLATE_CASES = {
    "smollm2-own": ("smollm2_tokenizer", None, ""),
    "llama3-public": ("llama3_tokenizer", None, ""),
    "qwen2.5-public": ("qwen_tokenizer", None, ""),
    "ftkit-chatml": ("base_tokenizer", "chatml", ""),
    "ftkit-qwen": ("base_tokenizer", "qwen", ""),
    "ftkit-llama3": ("llama3_tokenizer", "llama3", ""),
    "ftkit-mistral": ("base_tokenizer", "mistral", " "),
    "ftkit-alpaca": ("base_tokenizer", "alpaca", ""),
    "ftkit-default": ("base_tokenizer", "default", " "),
}


@pytest.fixture(params=sorted(TEMPLATE_CASES))
def template_case(request):
    fixture, template, reply_lead = TEMPLATE_CASES[request.param]
    tokenizer = request.getfixturevalue(fixture)
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        apply_chat_template_to_tokenizer(tokenizer, template)
    return tokenizer, reply_lead


def chat_template_ids(tokenizer, messages) -> list[int]:
    """What transformers itself gives: apply_chat_template(tokenize=True) returns a BatchEncoding in 5.x."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(encoded["input_ids"])


def trained_texts(tokenizer, example) -> list[str]:
    """Each run of consecutive trained tokens, decoded."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def replies(messages, lead: str, end_of_turn: str) -> list[str]:
    return [lead + m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_ids_equal_apply_chat_template_and_only_replies_are_trained(template_case, conversation):
    tokenizer, lead = template_case
    messages = CONVERSATIONS[conversation]
    example = encode_supervised_example(tokenizer, messages, cutoff_len=4096)
    assert example.input_ids == chat_template_ids(tokenizer, messages)
    assert not example.truncated
    assert trained_texts(tokenizer, example) == replies(messages, lead, end_of_turn_token(tokenizer))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_mask_history_trains_only_the_last_reply(template_case, conversation):
    tokenizer, lead = template_case
    messages = CONVERSATIONS[conversation]
    example = encode_supervised_example(tokenizer, messages, cutoff_len=4096, mask_history=True)
    assert example.input_ids == chat_template_ids(tokenizer, messages)
    assert trained_texts(tokenizer, example) == replies(messages, lead, end_of_turn_token(tokenizer))[-1:]


def test_train_on_prompt_trains_every_token(template_case):
    tokenizer, _ = template_case
    example = encode_supervised_example(tokenizer, MULTI_WITH_SYSTEM, cutoff_len=4096, train_on_prompt=True)
    assert example.labels == example.input_ids == chat_template_ids(tokenizer, MULTI_WITH_SYSTEM)


def test_smollm2_single_turn_golden_ids_and_labels(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = encode_supervised_example(smollm2_tokenizer, messages, cutoff_len=1024)
    # <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n
    system = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
              19712, 8182, 2, 198]
    user = [1, 4093, 198, 26843, 2, 198]  # <|im_start|>user\nHi<|im_end|>\n
    header = [1, 520, 9531, 198]  # <|im_start|>assistant\n  (the generation prompt)
    reply = [19556, 17, 2]  # Hello ! <|im_end|>
    assert example.input_ids == system + user + header + reply + [198]
    assert example.labels == [IGNORE_INDEX] * 31 + [19556, 17, 2] + [IGNORE_INDEX]
    assert trained_texts(smollm2_tokenizer, example) == ["Hello!<|im_end|>"]
    assert smollm2_tokenizer.decode(example.input_ids[27:31]) == "<|im_start|>assistant\n"


def test_a_template_that_rewrites_earlier_turns_falls_back_to_finding_the_replies(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    # Like reasoning templates: only the last reply carries a (here empty) thinking block.
    tokenizer.chat_template = (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and loop.last -%}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    example = encode_supervised_example(tokenizer, MULTI, cutoff_len=4096)
    assert example.input_ids == chat_template_ids(tokenizer, MULTI)
    assert trained_texts(tokenizer, example) == [
        "Blue.<|im_end|>",
        "Red, then green:\n- red\n- green<|im_end|>",
        "<think>\n\n</think>\n\nYou're welcome.<|im_end|>",
    ]


def test_a_template_that_rewrites_replies_beyond_recognition_is_an_error(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
        "{%- if m['role'] == 'assistant' and not loop.last -%}{{- m['content'] | upper -}}"
        "{%- else -%}{{- m['content'] -}}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    with pytest.raises(FtkitError, match="Cannot find an assistant reply in the text rendered by the chat template"):
        encode_supervised_example(tokenizer, MULTI, cutoff_len=4096)


def test_a_conversation_without_a_reply_encodes_to_none(smollm2_tokenizer):
    assert encode_supervised_example(smollm2_tokenizer, SINGLE[:1], cutoff_len=64) is None


def test_a_conversation_starting_with_the_assistant_is_an_error(smollm2_tokenizer):
    with pytest.raises(FtkitError, match="starts with an assistant message"):
        encode_supervised_example(smollm2_tokenizer, SINGLE[::-1], cutoff_len=64)


# ---- truncation --------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
]
# With SmolLM2's template: turn 1 = 31 prompt tokens (default system + user + header) + 4 reply tokens
# (Hello ! <|im_end|> \n); turn 2 = 11 prompt tokens + 4 reply tokens (A 2 <|im_end|> \n); 50 in all.


@pytest.mark.parametrize(
    ("prompt_len", "reply_len", "budget", "expected"),
    [
        (10, 3, 8, (5, 3)),  # short reply: kept whole, the prompt gets the rest
        (3, 10, 8, (3, 5)),  # short prompt: kept whole, the reply gets the rest
        (31, 4, 8, (4, 4)),  # a side needing exactly half the budget counts as short
        (10, 10, 8, (4, 4)),  # both long: proportional
        (30, 10, 8, (6, 2)),
        (31, 4, 5, (4, 1)),  # proportional would leave no reply token; it keeps one
        (5, 5, 1, (1, 0)),
    ],
)
def test_split_budget(prompt_len, reply_len, budget, expected):
    assert split_budget(prompt_len, reply_len, budget) == expected


def test_truncation_keeps_whole_first_turn_and_the_tail_of_the_cut_prompt(smollm2_tokenizer):
    full = chat_template_ids(smollm2_tokenizer, TWO_TURNS)
    example = encode_supervised_example(smollm2_tokenizer, TWO_TURNS, cutoff_len=40)
    # budget 5 for turn 2: split_budget(11, 4, 5) == (4, 1)
    assert example.input_ids == full[:35] + full[42:46] + full[46:47]
    assert smollm2_tokenizer.decode(example.input_ids[35:]) == "<|im_start|>assistant\nA"
    assert trained_texts(smollm2_tokenizer, example) == ["Hello!<|im_end|>", "A"]
    assert example.truncated


def test_truncation_with_mask_history_keeps_the_last_turn_first(smollm2_tokenizer):
    full = chat_template_ids(smollm2_tokenizer, TWO_TURNS)
    example = encode_supervised_example(smollm2_tokenizer, TWO_TURNS, cutoff_len=20, mask_history=True)
    # turn 2 whole (15 tokens); budget 5 for turn 1: split_budget(31, 4, 5) == (4, 1)
    assert example.input_ids == full[27:31] + full[31:32] + full[35:]
    assert trained_texts(smollm2_tokenizer, example) == ["A2<|im_end|>"]


def test_truncating_a_long_prompt_keeps_its_role_header_and_the_whole_reply(smollm2_tokenizer):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "OK"}]
    full = chat_template_ids(smollm2_tokenizer, messages)
    example = encode_supervised_example(smollm2_tokenizer, messages, cutoff_len=32)
    assert len(example) == 32
    assert example.input_ids == full[-32:]  # reply (OK <|im_end|> \n) whole, prompt tail
    assert smollm2_tokenizer.decode(example.input_ids).endswith("word <|im_end|>\n<|im_start|>assistant\nOK<|im_end|>\n")
    assert trained_texts(smollm2_tokenizer, example) == ["OK<|im_end|>"]


def test_truncating_a_long_prompt_and_a_long_reply_splits_the_budget_in_proportion(smollm2_tokenizer):
    messages = [{"role": "user", "content": "ask " * 90}, {"role": "assistant", "content": "answer " * 30}]
    full = chat_template_ids(smollm2_tokenizer, messages)
    reply_start = len(chat_template_ids(smollm2_tokenizer, messages[:1])) + 4  # after "<|im_start|>assistant\n"
    prompt_len, reply_len = reply_start, len(full) - reply_start
    kept_prompt, kept_reply = split_budget(prompt_len, reply_len, 40)
    example = encode_supervised_example(smollm2_tokenizer, messages, cutoff_len=40)
    assert example.input_ids == full[reply_start - kept_prompt : reply_start] + full[reply_start : reply_start + kept_reply]
    assert kept_prompt + kept_reply == 40 and kept_reply > 5 and kept_prompt > 5


@pytest.mark.parametrize(("train_on_prompt", "mask_history"), list(itertools.product([False, True], repeat=2)))
def test_every_cutoff_gives_an_example_with_trained_tokens(smollm2_tokenizer, train_on_prompt, mask_history):
    full = chat_template_ids(smollm2_tokenizer, TWO_TURNS)
    for cutoff_len in range(2, len(full) + 2):
        example = encode_supervised_example(
            smollm2_tokenizer, TWO_TURNS, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt,
            mask_history=mask_history,
        )
        assert example is not None and len(example) <= cutoff_len
        assert any(label != IGNORE_INDEX for label in example.labels[1:])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))
        assert example.truncated == (cutoff_len < len(full))
        if cutoff_len >= len(full):
            assert example.input_ids == full


def test_cutoff_below_two_is_rejected(smollm2_tokenizer):
    with pytest.raises(ValueError, match="cutoff_len must be at least 2"):
        encode_supervised_example(smollm2_tokenizer, SINGLE, cutoff_len=1)


# ---- pre-training text ---------------------------------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


def test_pretrain_text_is_tokens_plus_eos_all_trained(smollm2_tokenizer):
    [example] = encode_pretrain_text(smollm2_tokenizer, TEXT, cutoff_len=1024)
    plain = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert example.input_ids == [*plain, smollm2_tokenizer.eos_token_id]  # SmolLM2 adds no bos to plain text
    assert example.labels == example.input_ids


def test_pretrain_text_is_cut_into_chunks_and_starts_with_bos_when_the_tokenizer_adds_one(llama3_tokenizer):
    plain = llama3_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids = [llama3_tokenizer.bos_token_id, *plain, llama3_tokenizer.eos_token_id]
    chunks = encode_pretrain_text(llama3_tokenizer, TEXT, cutoff_len=8)
    assert all(len(chunk) <= 8 and chunk.labels == chunk.input_ids for chunk in chunks)
    assert chunks[0].input_ids[0] == llama3_tokenizer.bos_token_id
    kept = len(ids) - (1 if len(ids) % 8 == 1 else 0)  # a final one-token chunk predicts nothing
    assert [token for chunk in chunks for token in chunk.input_ids] == ids[:kept]
