"""Chat templates: named templates render the public formats, names resolve, errors say what to do."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from ftkit.data.templates import (
    TEMPLATE_NAMES,
    apply_chat_template_to_tokenizer,
    end_of_turn_token,
    render_conversation,
    resolve_chat_template,
)
from ftkit.errors import FtkitError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

# What each ftkit template renders for CONVERSATION (base tokenizer: eos = bos = <|endoftext|>).
GOLDEN_RENDERS = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "qwen": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "mistral": "<|endoftext|>[INST] Be brief.\n\nHi[/INST] Hello!<|endoftext|>[INST] 2+2?[/INST] 4<|endoftext|>",
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n4<|endoftext|>\n\n"
    ),
    "default": "Be brief.\n\nHuman: Hi\nAssistant: Hello!<|endoftext|>\nHuman: 2+2?\nAssistant: 4<|endoftext|>\n",
}
GOLDEN_GENERATION_PROMPTS = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ),
    "mistral": "<|endoftext|>[INST] Hi[/INST]",
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\n"
    ),
    "default": "Human: Hi\nAssistant:",
}
LLAMA3_RENDER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)


def _with_template(tokenizer, name: str):
    tokenizer = copy.deepcopy(tokenizer)
    apply_chat_template_to_tokenizer(tokenizer, name)
    return tokenizer


def test_template_names_are_the_six_we_ship():
    assert TEMPLATE_NAMES == ("alpaca", "chatml", "default", "llama3", "mistral", "qwen")


@pytest.mark.parametrize("name", sorted(GOLDEN_RENDERS))
def test_named_template_renders_its_public_format(base_tokenizer, name):
    tokenizer = _with_template(base_tokenizer, name)
    assert render_conversation(tokenizer, CONVERSATION) == GOLDEN_RENDERS[name]
    prompt = render_conversation(tokenizer, CONVERSATION[1:2], add_generation_prompt=True)
    assert prompt == GOLDEN_GENERATION_PROMPTS[name]


def test_llama3_template_renders_like_the_public_llama3_instruct_template(llama3_tokenizer):
    assert render_conversation(llama3_tokenizer, CONVERSATION) == LLAMA3_RENDER  # the public template
    tokenizer = _with_template(llama3_tokenizer, "llama3")
    assert render_conversation(tokenizer, CONVERSATION) == LLAMA3_RENDER
    assert render_conversation(tokenizer, CONVERSATION[:2], add_generation_prompt=True).endswith(
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_qwen_template_renders_like_the_public_qwen25_instruct_template(qwen_tokenizer):
    ours = _with_template(qwen_tokenizer, "qwen")
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:4]):
        for generation_prompt in (False, True):
            expected = render_conversation(qwen_tokenizer, messages, add_generation_prompt=generation_prompt)
            assert render_conversation(ours, messages, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("chatml", "<|im_end|>"), ("qwen", "<|im_end|>"), ("mistral", "<|endoftext|>"),
     ("alpaca", "<|endoftext|>"), ("default", "<|endoftext|>")],
)
def test_end_of_turn_token_of_each_named_template(base_tokenizer, name, expected):
    assert end_of_turn_token(_with_template(base_tokenizer, name)) == expected


def test_end_of_turn_token_of_the_models_own_templates(smollm2_tokenizer, llama3_tokenizer, qwen_tokenizer):
    assert end_of_turn_token(smollm2_tokenizer) == "<|im_end|>"
    assert end_of_turn_token(llama3_tokenizer) == "<|eot_id|>"
    assert end_of_turn_token(qwen_tokenizer) == "<|im_end|>"
    assert end_of_turn_token(_with_template(llama3_tokenizer, "llama3")) == "<|eot_id|>"


def test_auto_keeps_the_tokenizers_own_template(smollm2_tokenizer):
    resolved = resolve_chat_template(smollm2_tokenizer, "auto")
    assert (resolved.source, resolved.note) == ("tokenizer", None)
    assert resolved.jinja == smollm2_tokenizer.chat_template


def test_auto_without_a_tokenizer_template_falls_back_to_default_and_says_so(base_tokenizer):
    resolved = resolve_chat_template(base_tokenizer, "auto")
    assert (resolved.name, resolved.source) == ("default", "ftkit")
    assert resolved.note == "the tokenizer has no chat template; using ftkit's 'default' template (Human:/Assistant:)"


def test_apply_sets_the_template_on_the_tokenizer_and_it_survives_saving(base_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(base_tokenizer)
    resolved = apply_chat_template_to_tokenizer(tokenizer, "chatml")
    assert tokenizer.chat_template == resolved.jinja
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert render_conversation(reloaded, CONVERSATION) == GOLDEN_RENDERS["chatml"]


@pytest.mark.parametrize(
    ("name", "expected_name", "expected_note"),
    [
        ("qwen", "qwen", None),
        ("qwen2_vl", "qwen", "LLaMA-Factory template 'qwen2_vl' is ftkit's 'qwen' template"),
        ("empty", "default", "LLaMA-Factory template 'empty' is ftkit's 'default' template"),
        ("ChatML", "chatml", None),
        ("mistral", "mistral", None),
    ],
)
def test_llamafactory_names_that_are_ours_map_to_ours(smollm2_tokenizer, name, expected_name, expected_note):
    resolved = resolve_chat_template(smollm2_tokenizer, name)
    assert (resolved.name, resolved.source, resolved.note) == (expected_name, "ftkit", expected_note)


@pytest.mark.parametrize("name", ["smollm", "smollm2"])
def test_llamafactory_smollm_names_use_the_tokenizers_template_quietly(smollm2_tokenizer, name):
    resolved = resolve_chat_template(smollm2_tokenizer, name)
    assert (resolved.source, resolved.note, resolved.jinja) == ("tokenizer", None, smollm2_tokenizer.chat_template)


@pytest.mark.parametrize("name", ["qwen3", "gemma", "glm4", "phi", "deepseek3", "llama2", "yi", "baichuan2", "cohere"])
def test_llamafactory_names_we_do_not_ship_use_the_tokenizers_template_with_a_note(smollm2_tokenizer, name):
    resolved = resolve_chat_template(smollm2_tokenizer, name)
    assert resolved.source == "tokenizer"
    assert resolved.jinja == smollm2_tokenizer.chat_template
    assert resolved.note == f"ftkit ships no '{name}' template; using the tokenizer's own chat template"


def test_llamafactory_name_without_a_tokenizer_template_is_an_error(base_tokenizer):
    with pytest.raises(FtkitError) as error:
        resolve_chat_template(base_tokenizer, "gemma")
    assert str(error.value) == (
        "Template 'gemma' is a LLaMA-Factory template that ftkit takes from the model's tokenizer, but this "
        "tokenizer has no chat template; set template to one of alpaca, chatml, default, llama3, mistral, qwen."
    )


def test_unknown_template_name_suggests_the_closest(smollm2_tokenizer):
    with pytest.raises(FtkitError) as error:
        resolve_chat_template(smollm2_tokenizer, "chatlm")
    assert str(error.value) == (
        "Unknown template 'chatlm' (did you mean 'chatml'?); ftkit templates are auto, alpaca, chatml, default, "
        "llama3, mistral, qwen, and LLaMA-Factory template names are accepted too."
    )


def test_unknown_template_name_may_suggest_a_llamafactory_name(smollm2_tokenizer):
    with pytest.raises(FtkitError, match=r"did you mean 'gemma3'\?"):
        resolve_chat_template(smollm2_tokenizer, "gemma-3")


def test_template_whose_special_tokens_the_tokenizer_lacks_is_an_error(smollm2_tokenizer):
    with pytest.raises(FtkitError) as error:
        resolve_chat_template(smollm2_tokenizer, "llama3")
    assert str(error.value) == (
        "Template 'llama3' needs the special tokens <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, "
        "<|eot_id|>, which this tokenizer does not have; use template: auto (the model's own) or 'default'."
    )


def test_rendering_without_any_template_is_an_error(base_tokenizer):
    with pytest.raises(FtkitError, match="The tokenizer has no chat template"):
        render_conversation(base_tokenizer, CONVERSATION)
