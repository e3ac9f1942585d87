"""``generate_replies`` (what ``ftkit chat`` and the forgetting guard call) on the engine: greedy answers equal
``model.generate``'s in fp32, the stop token is cut, streaming gives the same text, and a batch can end
once enough answers have finished."""

from __future__ import annotations

import torch

from ftkit.data.templates import render_conversation
from ftkit.engine.replies import generate_replies
from ftkit.models import load_for_inference, stop_token_ids

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours of the rainbow."}],
    [{"role": "user", "content": "Hi"}],
]


def reference_ids(model, tokenizer, conversation, max_new_tokens):
    """transformers' own greedy ``generate`` for one conversation, cut before its first stop token."""
    prompt = render_conversation(tokenizer, conversation, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    return (out[:cut], True) if cut is not None else (out, False)


def test_greedy_replies_equal_transformers_generate_in_fp32(tiny_llama_dir):
    loaded = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    replies = generate_replies(loaded.model, loaded.tokenizer, CONVERSATIONS, max_new_tokens=20, batch_size=2)
    for conversation, reply in zip(CONVERSATIONS, replies, strict=True):
        ids, finished = reference_ids(loaded.model, loaded.tokenizer, conversation, 20)
        assert reply.token_ids == ids and reply.finished == finished
        assert reply.text == loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_streamed_text_is_the_reply_and_a_batch_can_stop_once_enough_have_finished(tiny_llama_dir):
    loaded = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    pieces: list[str] = []
    reply = generate_replies(loaded.model, loaded.tokenizer, CONVERSATIONS[:1], max_new_tokens=12,
                             on_text=pieces.append)[0]
    assert "".join(pieces).strip() == reply.text and len(pieces) > 1
    # With a threshold of 0 the batch ends after its first step: every reply has at most one token.
    eager = [*CONVERSATIONS, *CONVERSATIONS]
    replies = generate_replies(loaded.model, loaded.tokenizer, eager, max_new_tokens=30,
                               stop_batch_when_finished=0.0)
    assert all(len(r.token_ids) <= 1 for r in replies)
    assert any(not r.finished for r in replies)
