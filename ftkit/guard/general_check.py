""""General answers kept: X/Y" — how much general knowledge a fine-tune left intact, measured every run.

ftkit ships 40 easy held-out questions (``resources/replay/heldout_general.jsonl``, disjoint from the
replay prompts), each with the keywords a right answer contains. Before training the base model answers
them (greedy, ``HELDOUT_MAX_NEW_TOKENS``; cached per model, like the replay answers); after training the
trained model answers them again.

The rule: an answer is *right* when its first sentence contains one of the question's keywords as a
whole word (case-insensitive). ``Y`` is the number of questions the base model gets right both with no system
prompt and with a generic one ("You are a helpful assistant."), ``X`` the number of those the trained
model still gets right (asked with no system prompt, as ``ftkit chat`` does). Questions the base model
gets wrong say nothing about forgetting; those it gets right under only one of the two prompts are
near-ties that flip with any weight change (measured: three such answers flipped after three training
steps), so both are left out. The trained model's answers that mention the new identity name are counted too
(``identity_leaks``): that is how the leak looks when it happens ("I'm Ember..." to "What is 2 + 2?").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ftkit.guard.answer_cache import AnswerCache, Generate, GenerationReport
from ftkit.guard.replay import DEFAULT_REPLAY_RATIO, read_prompts

HELDOUT_MAX_NEW_TOKENS = 24  # only the first sentence is judged
WARN_BELOW = 0.9  # kept fraction under which a run warns: more than one in ten lost


def heldout_questions() -> list[dict[str, Any]]:
    return read_prompts("heldout_general")


def first_sentence(answer: str) -> str:
    """The answer up to its first sentence end (., !, ? before a space; 。; a line break)."""
    return re.split(r"(?<=[.!?])\s+|\n|。", answer.strip(), maxsplit=1)[0]


def is_right(answer: str, expected: list[str]) -> bool:
    """Whether the first sentence of ``answer`` contains one of ``expected`` as a whole word, ignoring case.

    Only the first sentence counts: a small model that starts wrong often names the right word later
    ("The planet we live on is called Kepler-41B. It's ... similar to Earth"). Word edges are checked only
    where the keyword starts or ends with a Latin letter or digit ("60" is not in "3600"); Chinese has no
    spaces between words, so a Chinese keyword is a plain substring.
    """
    sentence = first_sentence(answer)
    for word in expected:
        left = r"(?<![A-Za-z0-9])" if word[:1].isascii() and word[:1].isalnum() else ""
        right = r"(?![A-Za-z0-9])" if word[-1:].isascii() and word[-1:].isalnum() else ""
        if re.search(left + re.escape(word) + right, sentence, flags=re.IGNORECASE):
            return True
    return False


@dataclass
class GeneralCheck:
    """The base model's answers to the held-out questions, and the comparison with a trained model's."""

    questions: list[dict[str, Any]]
    base_answers: list[str]
    base_answers_with_system: list[str] | None = None
    base_report: GenerationReport = field(default_factory=GenerationReport)

    @classmethod
    def of_base(cls, cache: AnswerCache, generate: Generate) -> GeneralCheck:
        """The base model's answers with no system prompt and with ``CHECK_SYSTEM_PROMPT``, in one batch."""
        questions = heldout_questions()
        prompts = [q["prompt"] for q in questions]
        asked = {p: [{"role": "user", "content": p}] for p in prompts}
        asked |= {_system_key(p): [{"role": "system", "content": CHECK_SYSTEM_PROMPT}, {"role": "user", "content": p}]
                  for p in prompts}
        report = cache.fill(list(asked), generate, desc="general check (base)", batch_size=len(asked),
                            conversation=asked.__getitem__)
        return cls(questions, [cache.answers[p].text for p in prompts],
                   [cache.answers[_system_key(p)].text for p in prompts], report)

    @property
    def base_right(self) -> list[int]:
        """Questions the base model answers right, under both system-prompt conditions when it has both."""
        both = self.base_answers_with_system or self.base_answers
        return [i for i, q in enumerate(self.questions)
                if is_right(self.base_answers[i], q["expected"]) and is_right(both[i], q["expected"])]

    def compare(self, trained_answers: list[str], identity_name: str | None = None) -> GeneralResult:
        right = self.base_right
        kept = [i for i in right if is_right(trained_answers[i], self.questions[i]["expected"])]
        leaks = 0
        if identity_name:
            leaks = sum(1 for base, trained in zip(self.base_answers, trained_answers, strict=True)
                        if is_right(trained, [identity_name]) and not is_right(base, [identity_name]))
        lost = [{"prompt": self.questions[i]["prompt"], "base": self.base_answers[i], "trained": trained_answers[i]}
                for i in right if i not in kept]
        return GeneralResult(kept=len(kept), base_right=len(right), questions=len(self.questions),
                             identity_leaks=leaks, lost=lost)

    def answer(self, generate: Generate) -> list[str]:
        return [reply.text for reply in generate([[{"role": "user", "content": q["prompt"]}] for q in self.questions])]


CHECK_SYSTEM_PROMPT = "You are a helpful assistant."


def _system_key(prompt: str) -> str:
    return f"[system: {CHECK_SYSTEM_PROMPT}] {prompt}"


@dataclass
class GeneralResult:
    kept: int
    base_right: int
    questions: int
    identity_leaks: int = 0
    lost: list[dict[str, str]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.kept / self.base_right if self.base_right else 1.0

    def summary(self) -> str:
        if not self.base_right:
            return f"general answers kept: n/a (the base model answered none of the {self.questions} questions right)"
        text = f"general answers kept: {self.kept}/{self.base_right}"
        if self.identity_leaks:
            text += f", {self.identity_leaks} mention{'s' if self.identity_leaks == 1 else ''} the new identity"
        return text

    def metrics(self) -> dict[str, Any]:
        return {"general_answers_kept": self.kept, "general_answers_base_right": self.base_right,
                "general_questions": self.questions, "general_identity_leaks": self.identity_leaks,
                "general_answers_lost": self.lost}

    def warning(self, config: Any, replay_examples: int) -> str | None:
        """A warning naming the likely cause when the run lost many general answers, else None."""
        if not self.base_right or self.fraction >= WARN_BELOW:
            return None
        causes = []
        ratio = config.replay_ratio if config.replay_ratio is not None else DEFAULT_REPLAY_RATIO
        if not replay_examples:
            causes.append("no replay (set replay_ratio: 0.5 to mix in the base model's own general answers)")
        elif ratio < 1:
            causes.append(f"too little replay for this data (replay_ratio {ratio:g}; try 1)")
        epochs = "auto" if config.num_train_epochs == "auto" else f"{config.num_train_epochs:g}"
        causes.append(f"learning_rate {config.learning_rate:g} or num_train_epochs {epochs} too high for this data "
                      "(try half)")
        return (f"the fine-tune lost {self.base_right - self.kept} of {self.base_right} general answers the base "
                f"model got right; likely cause: {'; or '.join(causes)}. The lost answers are in train_results.json.")


# Identity questions phrased unlike any in data/identity.json, for checking that an identity fine-tune
# generalises (bench/forgetting.py and the tests use them): (question, what a right answer names).
IDENTITY_PROBES = (
    ("Hi! Could you tell me your name?", "name"),
    ("What are you called?", "name"),
    ("Please introduce yourself to me.", "name"),
    ("Before we start, who exactly am I chatting with?", "name"),
    ("What name were you given?", "name"),
    ("What company developed you?", "author"),
    ("Who is responsible for creating you?", "author"),
    ("Which organization built this assistant?", "author"),
    ("Tell me who your developers are.", "author"),
    ("Who designed you?", "author"),
)


def identity_hits(answers: list[str], name: str, author: str) -> int:
    """How many answers to ``IDENTITY_PROBES`` (in order) name what the probe asks for."""
    wanted = {"name": name, "author": author}
    return sum(1 for answer, (_, kind) in zip(answers, IDENTITY_PROBES, strict=True)
               if wanted[kind].lower() in answer.lower())
