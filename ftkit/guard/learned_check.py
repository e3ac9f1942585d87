""""Training answers learned: X/Y": whether a run taught what its data says, checked every sft run.

The general check asks whether a fine-tune kept what the model knew. This check asks the other half: does the
trained model now answer its own training prompts the way the data does? The loss cannot say so: it falls
while the model still answers the old way.

How it works:
- It takes a fixed sample of the training prompts: up to ``LEARNED_SAMPLE`` distinct prompts, seeded. A prompt
  is the conversation up to its last reply, system prompt included. Its references are every reply the data
  gives it.
- The base model answers them greedily before training. Those answers are cached per model, like the general
  check's. The trained model answers them after training.

The rule: an answer has *learned* its reply when it says at least a third of what the reply says and the base
model's answer did not. Both are counted in content words: lowercased runs of letters and digits, each Chinese
character a word, with common English and Chinese function words left out. Where the base answer already said
everything, the trained answer must still say a third of the reply's content words. Replies are compared up to
their first ``LEARNED_MAX_NEW_TOKENS`` tokens, the most an answer gets.

Why not plain word overlap or ROUGE-L against the reply: in an identity set, what is new is the name and the
maker. Take the base answer "I'm SmolLM, an AI assistant developed by Hugging Face." Against the reply "I am
Ember, an AI assistant developed by Hearthstone Labs. How can I help you today?" it recovers most content words
("ai", "assistant", "developed", "help", "today"), so an overlap rule counts it learned. Against the base
answer, only "ember", "hearthstone" and "labs" are new, and it says none of them.

Why a third and not a half: replies say more than their lesson. For "Introduce yourself." the data says "Hello!
I'm Ember, a text-based AI assistant built by Hearthstone Labs. Feel free to ask me anything." The trained
quickstart adapter answers "Hello! I'm Ember, an AI assistant developed by Hearthstone Labs. What can I do for
you?", which a reader calls learned. It says 4 of the 11 new words.

Measured on the quickstart adapter's answers to all 100 of its training prompts: a half calls 75 learned, a third
84. The 16 a third rejects are answers a reader rejects too: garbled Chinese ("我是Hearthstone Labs，用户名Ember",
which makes the maker the assistant's name), a list of skills with no name, and "The name of this assistant is
Ember." for a reply that names the maker as well. tests/test_learned_check.py holds such real answers, good and
bad.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ftkit.data.formats import Conversation
from ftkit.guard.answer_cache import AnswerCache, Generate, GenerationReport

LEARNED_SAMPLE = 40  # training prompts checked
LEARNED_MAX_NEW_TOKENS = 96  # at most: a check generates up to its longest reply's length plus a little
LEARNED_SLACK_TOKENS = 8
WARN_BELOW = 0.8  # learned fraction under which a run warns
LOW_STEPS = 40  # optimizer steps under which "too few steps" is named as a likely cause
LOW_LORA_LEARNING_RATE = 2e-4

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_STOP_WORDS_TEXT = (
    "a an the and or but if then so of to in on at by for with from as is are was were be been being am do does "
    "did have has had i me my mine you your yours he him his she her it its we us our they them their this that "
    "these those there here what which who whom whose when where why how can could will would shall should may "
    "might must not no yes all any some such than too very just also only own same about into over under again "
    "more most other each few both s t m re ve ll d "
    "的 了 是 我 你 他 她 它 们 在 和 有 也 就 都 而 及 与 着 或 这 那 吗 呢 吧 啊 个 一 之 为 以 于 上 下 中 不"
)
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


def content_words(text: str) -> set[str]:
    """The words that carry a reply's content: see the module docstring."""
    return {word for word in _WORD.findall(text.lower()) if word not in STOP_WORDS}


def is_learned(answer: str, reply: str, base_answer: str) -> bool:
    """Whether ``answer`` says at least a third of what ``reply`` says and ``base_answer`` did not."""
    wanted = content_words(reply)
    new = wanted - content_words(base_answer)
    target = new or wanted
    if not target:
        return True  # a reply with no content words (punctuation, stop words) cannot be missed
    said = content_words(answer)
    return len(target & said) >= math.ceil(len(target) / 3)


@dataclass
class LearnedItem:
    """One checked training prompt: the conversation up to its last reply, and every reply the data gives it."""

    prompt: Conversation
    replies: list[str]

    @property
    def key(self) -> str:
        return json.dumps(self.prompt, ensure_ascii=False, sort_keys=True)


def sample_training_prompts(conversations: list[Conversation], seed: int,
                            limit: int = LEARNED_SAMPLE) -> list[LearnedItem]:
    """Up to ``limit`` distinct prompts of the training conversations, chosen by ``seed``, in data order."""
    items: dict[str, LearnedItem] = {}
    for conversation in conversations:
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            continue
        item = LearnedItem([dict(m) for m in conversation[:-1]], [conversation[-1]["content"]])
        if item.key in items:
            items[item.key].replies.append(item.replies[0])
        else:
            items[item.key] = item
    keys = list(items)
    chosen = set(random.Random(seed).sample(keys, min(limit, len(keys))))
    return [items[key] for key in keys if key in chosen]


def answer_length(items: list[LearnedItem], tokenizer: Any) -> int:
    """New tokens the check generates: the longest sampled reply plus a little, at most LEARNED_MAX_NEW_TOKENS.

    Generating to a fixed cap would let every answer that does not stop run the whole batch to the cap."""
    longest = max((len(tokenizer(reply, add_special_tokens=False)["input_ids"]) for item in items
                   for reply in item.replies), default=0)
    return min(longest + LEARNED_SLACK_TOKENS, LEARNED_MAX_NEW_TOKENS)


def truncate_reply(reply: str, tokenizer: Any, max_tokens: int = LEARNED_MAX_NEW_TOKENS) -> str:
    """``reply`` cut to the tokens an answer can have: longer replies are compared by their start."""
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return reply if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


@dataclass
class LearnedCheck:
    """The sampled training prompts with the base model's answers; ``compare`` judges a trained model's."""

    items: list[LearnedItem]
    base_answers: list[str]
    max_new_tokens: int = LEARNED_MAX_NEW_TOKENS
    base_report: GenerationReport = field(default_factory=GenerationReport)

    @classmethod
    def of_base(cls, items: list[LearnedItem], cache: AnswerCache, generate: Generate,
                batch_size: int, max_new_tokens: int) -> LearnedCheck:
        by_key = {item.key: item for item in items}
        report = cache.fill(list(by_key), generate, desc="learned check (base)", batch_size=batch_size,
                            conversation=lambda key: by_key[key].prompt)
        return cls(items, [cache.answers[item.key].text for item in items], max_new_tokens, report)

    def answer(self, generate: Generate) -> list[str]:
        return [reply.text for reply in generate([item.prompt for item in self.items])]

    def compare(self, trained_answers: list[str], tokenizer: Any) -> LearnedResult:
        missed = []
        learned = 0
        for item, base, trained in zip(self.items, self.base_answers, trained_answers, strict=True):
            replies = [truncate_reply(reply, tokenizer, self.max_new_tokens) for reply in item.replies]
            if any(is_learned(trained, reply, base) for reply in replies):
                learned += 1
            else:
                missed.append({"prompt": item.prompt[-1]["content"], "reply": item.replies[0], "base": base,
                               "trained": trained})
        return LearnedResult(learned=learned, checked=len(self.items), missed=missed)


@dataclass
class LearnedResult:
    learned: int
    checked: int
    missed: list[dict[str, str]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.learned / self.checked if self.checked else 1.0

    def summary(self) -> str:
        return f"training answers learned: {self.learned}/{self.checked}"

    def metrics(self) -> dict[str, Any]:
        return {"learned_answers": self.learned, "learned_checked": self.checked,
                "learned_answers_missed": self.missed}

    def warning(self, config: Any, optimizer_steps: int, epochs: float) -> str | None:
        """A warning naming the likely causes and the keys to change when too few answers were learned."""
        if not self.checked or self.fraction >= WARN_BELOW:
            return None
        if config.max_steps > 0:
            length = f"max_steps, now {config.max_steps}"
        elif config.num_train_epochs == "auto":
            length = f"num_train_epochs: auto trained {epochs:g}; set a number"
        else:
            length = f"num_train_epochs, now {config.num_train_epochs:g}"
        causes = []
        if optimizer_steps < LOW_STEPS:
            causes.append(f"only {optimizer_steps} optimizer steps (raise {length})")
        if config.uses_lora and config.learning_rate < LOW_LORA_LEARNING_RATE:
            causes.append(f"learning_rate {config.learning_rate:g} is low for LoRA (try 3e-4)")
        if config.uses_lora and config.lora_rank < 16:
            causes.append(f"lora_rank {config.lora_rank} (try 16)")
        if not causes:
            causes.append(f"too little training for this data (raise {length}, or learning_rate, now "
                          f"{config.learning_rate:g})")
        return (f"the trained model answers only {self.learned} of {self.checked} sampled training prompts the way "
                f"the data does; likely cause: {'; '.join(causes)}. The missed answers are in train_results.json.")
