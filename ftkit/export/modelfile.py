"""An Ollama ``Modelfile`` for the export: the chat template translated to Ollama's Go template, stops filled in.

Ollama cannot run Jinja, and translating arbitrary Jinja is not possible. Most chat templates, though,
write each message as ``prefix(role) + content + suffix(role)`` plus a generation prompt (chatml, Llama 3,
SmolLM2, alpaca, ftkit's default). We render a marker conversation with the template, cut it into those
pieces, rebuild the conversation from the pieces and keep the result only if it reproduces the template's
own rendering exactly (with and without a system message). A template that does not fit that shape
(e.g. Mistral's, which folds the system prompt into the first user turn) gets no Modelfile, and a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftkit.data.templates import end_of_turn_token, render_conversation
from ftkit.errors import FtkitError

MODELFILE_NAME = "Modelfile"
_SYSTEM, _USER, _ASSISTANT, _USER2 = "ftkitSYS7f3a", "ftkitUSR7f3a", "ftkitAST7f3a", "ftkitUSR27f3a"


@dataclass(frozen=True)
class MessagePieces:
    """The literal text around each message of a per-message chat template."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation_prompt: str
    default_system: str | None


def ollama_modelfile(tokenizer: Any) -> str | None:
    """The Modelfile text (``FROM .`` + TEMPLATE + SYSTEM + stops), or None when the template cannot be translated."""
    pieces = split_chat_template(tokenizer)
    if pieces is None:
        return None
    template = go_template(pieces)
    if '"""' in template or "{{" in "".join(_literals(pieces)):
        return None
    lines = [
        "# Ollama Modelfile written by ftkit merge-lora. In this directory: ollama create NAME -f Modelfile",
        "FROM .",
        f'TEMPLATE """{template}"""',
    ]
    if pieces.default_system:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    lines += [f"PARAMETER stop {_quote(token)}" for token in stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"


def go_template(pieces: MessagePieces) -> str:
    """Ollama's TEMPLATE for the pieces (no whitespace trimming: the literal newlines matter)."""
    (sp, ss), (up, us), (ap, as_) = pieces.system, pieces.user, pieces.assistant
    return (f"{{{{ if .System }}}}{sp}{{{{ .System }}}}{ss}{{{{ end }}}}"
            f"{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{up}{{{{ .Content }}}}{us}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{ap}{{{{ .Content }}}}{as_}{{{{ end }}}}{{{{ end }}}}"
            f"{pieces.generation_prompt}")


def stop_tokens(tokenizer: Any) -> list[str]:
    """The end-of-turn token, then eos when it differs."""
    tokens = [end_of_turn_token(tokenizer), tokenizer.eos_token]
    return [token for index, token in enumerate(tokens) if token and token not in tokens[:index]]


def split_chat_template(tokenizer: Any) -> MessagePieces | None:
    """Cut the template's rendering of a marker conversation into per-message pieces; None if it does not fit."""
    try:
        full = _render(tokenizer, [("system", _SYSTEM), ("user", _USER), ("assistant", _ASSISTANT), ("user", _USER2)], True)
        user_only = _render(tokenizer, [("user", _USER)], False)
        prompt_only = _render(tokenizer, [("user", _USER)], True)
        eot = end_of_turn_token(tokenizer)
    except (FtkitError, ValueError, TypeError, KeyError, IndexError):  # templates may raise on this conversation
        return None
    markers = [full.find(marker) for marker in (_SYSTEM, _USER, _ASSISTANT, _USER2)]
    if min(markers) < 0 or markers != sorted(markers) or not prompt_only.startswith(user_only):
        return None
    s, u, a, u2 = markers
    generation_prompt = prompt_only[len(user_only):]
    system_prefix = full[:s]
    after_system = full[s + len(_SYSTEM):u]
    after_user = full[u + len(_USER):a]
    after_assistant = full[a + len(_ASSISTANT):u2]
    tail = full[u2 + len(_USER2):]
    if generation_prompt and not tail.endswith(generation_prompt):
        return None
    user_suffix = tail[: len(tail) - len(generation_prompt)]
    if not after_user.startswith(user_suffix) or eot not in after_assistant:
        return None
    assistant_prefix = after_user[len(user_suffix):]
    cut = after_assistant.index(eot) + len(eot)
    cut += len(after_assistant[cut:]) - len(after_assistant[cut:].lstrip("\n"))  # the newline ends the turn too
    assistant_suffix, user_prefix = after_assistant[:cut], after_assistant[cut:]
    if not after_system.endswith(user_prefix):
        return None
    system_suffix = after_system[: len(after_system) - len(user_prefix)]
    default_block = user_only[: user_only.find(_USER) - len(user_prefix)] if _USER in user_only else None
    if default_block is None or not user_only[: user_only.find(_USER)].endswith(user_prefix):
        return None
    default_system = None
    if default_block:
        if not (default_block.startswith(system_prefix) and default_block.endswith(system_suffix)):
            return None
        default_system = default_block[len(system_prefix): len(default_block) - len(system_suffix)]
    pieces = MessagePieces((system_prefix, system_suffix), (user_prefix, user_suffix),
                           (assistant_prefix, assistant_suffix), generation_prompt, default_system)
    return pieces if _reproduces(pieces, full, prompt_only) else None


def _reproduces(pieces: MessagePieces, full: str, prompt_only: str) -> bool:
    """Rebuilding both marker conversations from the pieces must give the template's exact text."""
    (sp, ss), (up, us), (ap, as_) = pieces.system, pieces.user, pieces.assistant
    rebuilt = sp + _SYSTEM + ss + up + _USER + us + ap + _ASSISTANT + as_ + up + _USER2 + us + pieces.generation_prompt
    default = sp + pieces.default_system + ss if pieces.default_system else ""
    return rebuilt == full and default + up + _USER + us + pieces.generation_prompt == prompt_only


def _render(tokenizer: Any, messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    text = render_conversation(tokenizer, [{"role": role, "content": content} for role, content in messages],
                               add_generation_prompt=generation_prompt)
    bos = getattr(tokenizer, "bos_token", None)
    # A BOS written once at the very start is the sequence start, which llama.cpp/Ollama add themselves;
    # one that opens every message (SmolLM2's <|im_start|>) is part of the message format and stays.
    return text[len(bos):] if bos and text.startswith(bos) and text.count(bos) == 1 else text


def _literals(pieces: MessagePieces) -> list[str]:
    return [*pieces.system, *pieces.user, *pieces.assistant, pieces.generation_prompt]


def _quote(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'
