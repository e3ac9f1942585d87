"""Chat templates: which Jinja template renders a conversation, and the one way to render it.

ftkit has exactly one way to turn a conversation into text: the tokenizer's ``chat_template``, rendered by
``tokenizer.apply_chat_template``. ``template: auto`` keeps the tokenizer's own template; a named template
replaces it once, up front (``apply_chat_template_to_tokenizer``), so that encoding, saving, chat, serving
and merging all render the same text afterwards.

Why we ship our own Jinja strings instead of LLaMA-Factory's Python formatters: a Jinja template travels with
the tokenizer (``save_pretrained`` writes it), so a merged or served model renders exactly what it was trained
on, and every later stage needs no ftkit code to do so. The templates follow each family's public format and
end every assistant turn with the model's end-of-turn token so a fine-tuned model learns to stop.

LLaMA-Factory template names are accepted: the ones that correspond to ours map to ours; the others map to the
tokenizer's own template (their models ship one), reported as a one-line note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ftkit.config.template_names import (
    FTKIT_TEMPLATE_NAMES,
    LLAMAFACTORY_TO_FTKIT,
    LLAMAFACTORY_TOKENIZER_OWN,
    MODELS_OWN_FORMAT,
    unknown_template_message,
)
from ftkit.errors import FtkitError

Message = dict[str, str]

_CHATML = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# Qwen2.5-Instruct's format without the tool-calling branches: chatml with a default system prompt.
_QWEN = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (loop.first and message['role'] == 'system') -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# Llama-3-Instruct's format (header tokens, trimmed contents, <|eot_id|> after every message).
_LLAMA3 = r"""{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"""

# Mistral-Instruct's [INST] format (v3 tokenizer layout); a system message is put before the first user
# message. "[/INST]" already prompts the reply, so the generation prompt adds nothing.
_MISTRAL = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}{%- set turns = messages -%}
{%- endif -%}
{{- bos_token if bos_token else '' -}}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{%- if loop.first and system_message -%}
{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' -}}
{%- else -%}
{{- '[INST] ' + message['content'] + '[/INST]' -}}
{%- endif -%}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + message['content'] + eos_token -}}
{%- endif -%}
{%- endfor -%}"""

_ALPACA = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] + '\n\n' -}}
{%- else -%}
{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{- '### Instruction:\n' + message['content'] + '\n\n' -}}
{%- elif message['role'] == 'assistant' -%}
{{- '### Response:\n' + message['content'] + eos_token + '\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"""

# For base models without a template. The reply starts with the space after "Assistant:" so that a
# BPE token like " Hello" lies wholly inside the reply (and is trained), not across the boundary.
_DEFAULT = r"""{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{- message['content'] + '\n\n' -}}
{%- elif message['role'] == 'user' -%}
{{- 'Human: ' + message['content'] + '\n' -}}
{%- elif message['role'] == 'assistant' -%}
{{- 'Assistant: ' + message['content'] + eos_token + '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"""

_FTKIT_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "default": _DEFAULT,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "qwen": _QWEN,
}
TEMPLATE_NAMES: tuple[str, ...] = FTKIT_TEMPLATE_NAMES  # the names live in config (checked there without imports)

# Tokens a template writes literally; each must be one token of the tokenizer or the template cannot work.
_REQUIRED_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

@dataclass(frozen=True)
class ResolvedTemplate:
    """The chat template a run uses.

    ``name`` is the ftkit template (or, for ``source == "tokenizer"``, the name that was asked for);
    ``note`` is one line for the caller to print when the choice is worth telling the user about.
    """

    name: str
    jinja: str
    source: Literal["tokenizer", "ftkit"]
    note: str | None = None


def tokenizer_chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template, or None when it has none (a dict of templates yields 'default')."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def resolve_chat_template(tokenizer: Any, name: str) -> ResolvedTemplate:
    """Decide which chat template ``name`` means for this tokenizer (without changing the tokenizer).

    ``auto`` is the tokenizer's own template, or ftkit's ``default`` when it has none. ftkit names give our
    template; LLaMA-Factory names give the corresponding ftkit template or the tokenizer's own.
    """
    key = name.strip().lower()
    own = tokenizer_chat_template(tokenizer)
    if key == "auto":
        if own is not None:
            return ResolvedTemplate("auto", own, "tokenizer")
        note = "the tokenizer has no chat template; using ftkit's 'default' template (Human:/Assistant:)"
        return _ftkit_template(tokenizer, "default", note)
    if key in _FTKIT_TEMPLATES:
        return _ftkit_template(tokenizer, key, None)
    if key in LLAMAFACTORY_TO_FTKIT:
        target = LLAMAFACTORY_TO_FTKIT[key]
        note = None if target == key else f"LLaMA-Factory template '{key}' is ftkit's '{target}' template"
        return _ftkit_template(tokenizer, target, note)
    if key in LLAMAFACTORY_TOKENIZER_OWN:
        if own is None:
            raise FtkitError(
                f"Template '{name}' is a LLaMA-Factory template that ftkit takes from the model's tokenizer, but "
                f"this tokenizer has no chat template; set template to one of {', '.join(TEMPLATE_NAMES)}."
            )
        note = None
        if key not in MODELS_OWN_FORMAT:
            note = f"ftkit ships no '{key}' template; using the tokenizer's own chat template"
        return ResolvedTemplate(key, own, "tokenizer", note)
    raise FtkitError(unknown_template_message(name))


def apply_chat_template_to_tokenizer(tokenizer: Any, name: str) -> ResolvedTemplate:
    """Resolve ``name`` and set it as ``tokenizer.chat_template``: from here on everything renders with it."""
    resolved = resolve_chat_template(tokenizer, name)
    tokenizer.chat_template = resolved.jinja
    return resolved


def render_conversation(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    """Render a conversation to text with the tokenizer's chat template (the one way ftkit does it)."""
    if tokenizer_chat_template(tokenizer) is None:
        raise FtkitError(
            "The tokenizer has no chat template; set `template:` to auto or one of "
            f"{', '.join(TEMPLATE_NAMES)} before rendering conversations."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn under the tokenizer's current chat template.

    Found by rendering a two-message conversation and taking the first special (added) token that follows
    the assistant's content, e.g. ``<|im_end|>`` for chatml, ``<|eot_id|>`` for llama3, eos for mistral.
    Falls back to the eos token when the template writes no special token after a reply.
    """
    reply = "ftkit-reply-7f3a"
    messages = [{"role": "user", "content": "ftkit-question"}, {"role": "assistant", "content": reply}]
    text = render_conversation(tokenizer, messages)
    position = text.rfind(reply)
    after = text[position + len(reply) :] if position >= 0 else ""
    candidates = [token.content for token in tokenizer.added_tokens_decoder.values() if token.content.strip()]
    if tokenizer.eos_token:
        candidates.append(tokenizer.eos_token)
    found = [(after.find(token), -len(token), token) for token in set(candidates) if token in after]
    if found:
        return min(found)[2]
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise FtkitError(
        "The chat template writes no end-of-turn token after a reply and the tokenizer has no eos token; "
        f"use a template that ends each turn with a special token (one of {', '.join(TEMPLATE_NAMES)})."
    )


def _ftkit_template(tokenizer: Any, name: str, note: str | None) -> ResolvedTemplate:
    missing = [token for token in _REQUIRED_TOKENS.get(name, ()) if not _is_single_token(tokenizer, token)]
    if missing:
        raise FtkitError(
            f"Template '{name}' needs the special tokens {', '.join(missing)}, which this tokenizer does not "
            "have; use template: auto (the model's own) or 'default'."
        )
    if name not in _REQUIRED_TOKENS and not tokenizer.eos_token:
        raise FtkitError(
            f"Template '{name}' ends each reply with the eos token, but this tokenizer has none; "
            "use template: auto or a tokenizer with an eos token."
        )
    return ResolvedTemplate(name, _FTKIT_TEMPLATES[name], "ftkit", note)


def _is_single_token(tokenizer: Any, token: str) -> bool:
    return len(tokenizer.encode(token, add_special_tokens=False)) == 1
