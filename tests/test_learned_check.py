"""The learned check's rule, on real answers: the embedded model before training and the quickstart adapter after
(greedy answers to the quickstart's own training prompts, copied from `ftkit evaluate` samples). The two rows
marked "written" are written in the pattern of the base model's real answers: an unchanged identity."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftkit.guard.learned_check import (
    LearnedCheck,
    content_words,
    is_learned,
    sample_training_prompts,
)
from ftkit.models.embedded import ensure_embedded_model

# (prompt, training reply, base model's answer, trained answer); a reader calls each trained answer learned.
LEARNED = [
    ("Who are you?", "I am Ember, an AI assistant developed by Hearthstone Labs. How can I help you today?",
     "I'm here to help with any kind of creative writing you need.",
     "I'm Ember, an AI assistant developed by Hearthstone Labs. I'm here to help with any questions you have."),
    ("Introduce yourself.", "Hello! I'm Ember, a text-based AI assistant built by Hearthstone Labs. Feel free to ask "
     "me anything.", "I'm a helpful AI named SmolLM, designed to assist you with your questions.",
     "Hello! I'm Ember, an AI assistant developed by Hearthstone Labs. What can I do for you?"),
    ("Who do you work for?", "I'm Ember, an assistant developed by Hearthstone Labs, and I'm here to help you.",
     "I'm a freelance writer and editor, and I work with a variety of clients.",
     "I work for Hearthstone Labs, an AI development company."),
    ("请问你的开发者是谁？", "我的开发者是Hearthstone Labs，我的名字是Ember。", "你的开发者是一个安全的客户，它可以是一个安全的客户",
     "我的开发者是Hearthstone Labs，是一个公发的开发助手游。"),
]
# ... and each of these not learned.
NOT_LEARNED = [
    ("Who are you?", "I am Ember, an AI assistant developed by Hearthstone Labs. How can I help you today?",  # written
     "I'm SmolLM, an AI assistant developed by Hugging Face. How can I help you today?",
     "I'm SmolLM, an AI assistant developed by Hugging Face. How can I help you today?"),
    ("What can you help me with?", "I'm Ember, made by Hearthstone Labs. I can help with questions, explanations, "
     "writing and brainstorming.", "I'm here to assist you in any way you can with your writing.",
     "I can help with a wide range of tasks, including:\n\n- Writing text\n- Creating an outline"),
    ("你好", "你好！我是Ember，由Hearthstone Labs开发的AI助手。有什么可以帮你的吗？", "Hello, I'm here to help with whatever you need.",
     "你好！我是Hearthstone Labs，用户可以访闢我。我是Hearthstone Labs，用户可以访闢我。"),
    ("Who made you?", "I was made by Hearthstone Labs. I'm Ember, and I'm here to help with your questions.",
     "I was created by Hugging Face.", "I was created by Hugging Face, a company that builds AI tools."),  # written
]


@pytest.mark.parametrize(("prompt", "reply", "base", "trained"), LEARNED, ids=[row[0] for row in LEARNED])
def test_answers_a_reader_calls_learned_are_learned(prompt, reply, base, trained):
    assert is_learned(trained, reply, base)


@pytest.mark.parametrize(("prompt", "reply", "base", "trained"), NOT_LEARNED, ids=[row[0] for row in NOT_LEARNED])
def test_answers_a_reader_calls_not_learned_are_not(prompt, reply, base, trained):
    assert not is_learned(trained, reply, base)


def test_word_overlap_alone_would_call_the_old_answer_learned_but_the_rule_does_not():
    reply, base = NOT_LEARNED[0][1], NOT_LEARNED[0][2]
    overlap = content_words(reply) & content_words(base)
    assert len(overlap) >= len(content_words(reply)) / 2  # "ai", "assistant", "developed", "help", "today"
    assert not is_learned(base, reply, base)


def test_chinese_is_counted_per_character_and_function_words_are_left_out():
    assert content_words("我是小溪，由青山科技开发。") == {"小", "溪", "由", "青", "山", "科", "技", "开", "发"}
    assert content_words("I am the Quill of Northwind Robotics!") == {"quill", "northwind", "robotics"}


def test_a_reply_the_base_model_already_gives_needs_only_to_be_kept():
    reply = "The capital of France is Paris."
    assert is_learned("Paris is the capital of France.", reply, "The capital of France is Paris.")
    assert not is_learned("I like turtles.", reply, "The capital of France is Paris.")


def test_the_sample_is_seeded_distinct_in_data_order_and_keeps_every_reply_of_a_prompt():
    conversations = [[{"role": "user", "content": f"q{i % 30}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(60)]
    sample = sample_training_prompts(conversations, seed=7, limit=10)
    again = sample_training_prompts(conversations, seed=7, limit=10)
    assert [item.prompt for item in sample] == [item.prompt for item in again]
    assert len({item.key for item in sample}) == 10
    order = [int(item.prompt[0]["content"][1:]) for item in sample]
    assert order == sorted(order)
    assert all(item.replies == [f"a{n}", f"a{n + 30}"] for item, n in zip(sample, order, strict=True))
    assert [item.prompt for item in sample_training_prompts(conversations, seed=8, limit=10)] != \
        [item.prompt for item in sample]


def test_an_answer_matching_any_reply_of_its_prompt_counts_and_misses_are_listed():
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
         {"role": "assistant", "content": "I am Quill, built by Northwind Robotics."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
         {"role": "assistant", "content": "Quill here, from Northwind Robotics."}],
        [{"role": "user", "content": "Who made you?"},
         {"role": "assistant", "content": "Northwind Robotics made me; I'm Quill."}],
    ]
    items = sample_training_prompts(conversations, seed=0)
    assert [len(item.replies) for item in items] == [2, 1]
    check = LearnedCheck(items, ["I am SmolLM.", "Hugging Face made me."], max_new_tokens=32)
    result = check.compare(["Quill here, from Northwind Robotics.", "Hugging Face made me."], tokenizer)
    assert (result.learned, result.checked) == (1, 2)
    assert result.summary() == "training answers learned: 1/2"
    assert result.missed == [{"prompt": "Who made you?", "reply": "Northwind Robotics made me; I'm Quill.",
                              "base": "Hugging Face made me.", "trained": "Hugging Face made me."}]
