"""Shared pytest fixtures.

Session-scoped tokenizers are shared by many tests: never modify one in place; ``copy.deepcopy`` it first.
"""

from __future__ import annotations

import copy
import os

import pytest

# Two pytest-xdist workers share two cores: one thread each, or the OpenMP pools oversubscribe the CPU and
# every test slows down many times over. Subprocesses the tests start inherit the same limit.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# ---- chat-template tokenizers (data/templates, encoding, packing) --------------------------------------

# The public chat template of Meta-Llama-3-8B-Instruct, verbatim.
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
    "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The public chat template of Qwen2.5-Instruct, verbatim (with its tool-calling branches).
QWEN25_INSTRUCT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's real tokenizer (SmolLM2-135M-Instruct, chatml-style template), offline."""
    from transformers import AutoTokenizer

    from ftkit.models.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(str(ensure_embedded_model()))


@pytest.fixture(scope="session")
def llama3_tokenizer(smollm2_tokenizer):
    """SmolLM2's vocabulary with Llama 3's special tokens, bos/eos and public Instruct chat template."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.pad_token = "<|eot_id|>"
    tokenizer.add_bos_token = True  # Llama 3 prepends <|begin_of_text|> to plain text
    tokenizer.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer(smollm2_tokenizer):
    """SmolLM2's vocabulary set up like Qwen2.5-Instruct: no bos, eos <|im_end|>, pad <|endoftext|>."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.bos_token = None
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN25_INSTRUCT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def base_tokenizer(smollm2_tokenizer):
    """A base model's tokenizer: no chat template, bos = eos = pad = <|endoftext|> (not chatml's tokens)."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


# ---- tiny models (models/, train) ------------------------------------------------------------------------


def build_tiny_llama(directory, *, vocab_size: int = 49152, hidden_size: int = 64, seed: int = 0):
    """Save a random 2-layer LlamaForCausalLM (tied embeddings) to ``directory``; return the directory.

    The default vocabulary is SmolLM2's, so the embedded model's tokenizer files can sit beside it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (hidden 64, 2 layers) with the SmolLM2 tokenizer and chat template.

    Read-only: tests that change files copy it first (``shutil.copytree``).
    """
    import shutil

    from ftkit.models.embedded import ensure_embedded_model

    directory = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    embedded = ensure_embedded_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def embedded_gguf_model():
    """The real embedded GGUF file loaded once per session through ftkit's loader (about 20 s)."""
    import torch

    from ftkit.models import ModelSource, load_model
    from ftkit.models.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    source = ModelSource("gguf", gguf.parent, gguf_file=gguf.name, display=str(gguf))
    return source, load_model(source, dtype=torch.float32)
