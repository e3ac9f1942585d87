"""``ftkit chat``: try a model (with LoRA adapters) in the terminal, one-shot or interactive.

With ``--adapter``, the tokenizer and chat template saved next to the adapter by ``ftkit train`` are
used, so the model is prompted exactly as it was trained. Answers come from the inference engine
(``ftkit.engine.replies``), streamed token by token in the interactive mode.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(stderr=True, highlight=False)


def load_chat_model(model: str, adapters: list[str], template: str = "auto"):
    """The model (adapters merged) and tokenizer ``ftkit chat`` talks to; see ``ftkit.models.load_for_inference``."""
    from ftkit.models import load_for_inference

    loaded = load_for_inference(model, adapters, template=template)
    return loaded.model, loaded.tokenizer


def run_chat(*, model: str, adapters: list[str], prompt: str | None, system: str | None, template: str,
             max_new_tokens: int, temperature: float) -> None:
    """One answer to ``prompt`` on stdout, or an interactive session when no prompt is given."""
    from ftkit.engine.replies import generate_replies

    loaded, tokenizer = load_chat_model(model, adapters, template)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        reply = generate_replies(loaded, tokenizer, [[*history, {"role": "user", "content": prompt}]],
                                 max_new_tokens=max_new_tokens, temperature=temperature)[0]
        print(reply.text)
        _note_if_cut(reply, max_new_tokens)
        return
    console.print("[bold]ftkit chat[/] — type a message; /clear forgets the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            user = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return
        if user == "/clear":
            history = history[:1] if system else []
            console.print("[dim](conversation cleared)[/]")
            continue
        history.append({"role": "user", "content": user})
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        reply = generate_replies(loaded, tokenizer, [history], max_new_tokens=max_new_tokens,
                                 temperature=temperature, on_text=_write)[0]
        print()
        _note_if_cut(reply, max_new_tokens)
        history.append({"role": "assistant", "content": reply.text})


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note_if_cut(reply, max_new_tokens: int) -> None:
    """Say so when an answer hit --max-new-tokens instead of ending by itself (stderr, so stdout stays the answer)."""
    if not reply.finished:
        console.print(f"[dim](cut at --max-new-tokens {max_new_tokens}; the model had not finished its answer)[/]")
