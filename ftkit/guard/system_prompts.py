"""System-prompt variants: behaviour taught under one system prompt must show under another, or none.

Many chat templates (SmolLM2's, Qwen's) insert their own default system prompt when a conversation has
none, and users chat with whatever system prompt their front end sends. A fine-tune whose data all share
one system prompt (or none) learns its behaviour *conditioned on that prompt*; measured on the embedded
model, an identity learned with the template's default system prompt mostly vanished under "You are a
helpful assistant." So, for small sft sets by default, each conversation is trained in one of two
variants, chosen by a seeded coin per example:

- a conversation with a system prompt keeps it, or drops it (the template's default then applies);
- a conversation without one stays so, or gets one of a few generic system prompts.

Half the examples in each variant costs no extra training time, unlike training every example twice.
"""

from __future__ import annotations

import random

from ftkit.data.formats import Conversation

GENERIC_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful AI assistant.",
    "You are a friendly, knowledgeable assistant. Answer clearly.",
    "You are an AI assistant. Answer the user's questions accurately and concisely.",
    "Be helpful and honest.",
)


def vary_system_prompts(conversations: list[Conversation], seed: str) -> list[Conversation]:
    """Each conversation in one of its two system-prompt variants, chosen by a coin seeded with ``seed``."""
    rng = random.Random(f"system-prompt-variants:{seed}")
    varied: list[Conversation] = []
    for conversation in conversations:
        flip, generic = rng.random() < 0.5, rng.choice(GENERIC_SYSTEM_PROMPTS)
        has_system = bool(conversation) and conversation[0]["role"] == "system"
        if not flip:
            varied.append(conversation)
        elif has_system:
            varied.append(conversation[1:])
        else:
            varied.append([{"role": "system", "content": generic}, *conversation])
    return varied


class SystemPromptVariants:
    """The variants as ``ftkit.data`` applies them while encoding: per dataset, seeded by the run's seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def key(self, name: str) -> str:
        """The seed of dataset ``name``'s coins (also its part of the tokenised-data cache key)."""
        return f"{self.seed}:{name}"

    def apply(self, conversations: list[Conversation], name: str) -> list[Conversation]:
        return vary_system_prompts(conversations, self.key(name))
