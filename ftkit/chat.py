"""``ftkit chat``: try a model (with LoRA adapters) in the terminal, one-shot or interactive.

With ``--adapter``, the tokenizer and chat template saved next to the adapter by ``ftkit train`` are
used, so the model is prompted exactly as it was trained.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(stderr=True, highlight=False)


def load_chat_model(model: str, adapters: list[str], template: str = "auto"):
    """Load model, tokenizer (the adapter's own if it has one) and adapters for inference."""
    from dataclasses import replace

    import torch

    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.models import (
        default_device,
        inference_dtype,
        load_adapters,
        load_model,
        load_tokenizer,
        resolve_adapter_dir,
        resolve_model_source,
        sync_special_tokens,
    )

    source = resolve_model_source(model)
    adapter_dirs = [resolve_adapter_dir(a) for a in adapters]
    tokenizer_source = source
    if adapter_dirs and (adapter_dirs[-1] / "tokenizer_config.json").is_file():
        # The tokenizer and chat template the adapter was trained with.
        tokenizer_source = replace(source, path=adapter_dirs[-1], gguf_file=None)
    tokenizer = load_tokenizer(tokenizer_source)
    apply_chat_template_to_tokenizer(tokenizer, template)
    device = default_device()
    dtype = inference_dtype(device)
    # Adapters are merged into fp32 weights and the result cast once, exactly as `ftkit merge-lora` exports
    # it: merging into bf16 weights rounds twice and drops small LoRA updates.
    loaded = load_model(source, dtype=torch.float32 if adapter_dirs else dtype, device=device)
    if adapter_dirs:
        loaded = load_adapters(loaded, [str(d) for d in adapter_dirs], trainable=False, dtype=dtype)
    sync_special_tokens(loaded, tokenizer)
    loaded.eval()
    return loaded, tokenizer


def run_chat(*, model: str, adapters: list[str], prompt: str | None, system: str | None, template: str,
             max_new_tokens: int, temperature: float) -> None:
    """One answer to ``prompt`` on stdout, or an interactive session when no prompt is given."""
    from transformers import TextStreamer

    from ftkit.models.generate import generate_replies

    loaded, tokenizer = load_chat_model(model, adapters, template)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        reply = generate_replies(loaded, tokenizer, [[*history, {"role": "user", "content": prompt}]],
                                 max_new_tokens=max_new_tokens, temperature=temperature)[0]
        print(reply.text)
        _note_if_cut(reply, max_new_tokens)
        return
    console.print("[bold]ftkit chat[/] — type a message; /clear forgets the conversation, /exit (or Ctrl-D) quits.")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
                                 temperature=temperature, streamer=streamer)[0]
        _note_if_cut(reply, max_new_tokens)
        history.append({"role": "assistant", "content": reply.text})


def _note_if_cut(reply, max_new_tokens: int) -> None:
    """Say so when an answer hit --max-new-tokens instead of ending by itself (stderr, so stdout stays the answer)."""
    if not reply.finished:
        console.print(f"[dim](cut at --max-new-tokens {max_new_tokens}; the model had not finished its answer)[/]")
