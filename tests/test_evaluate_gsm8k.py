"""GSM8K as lm-evaluation-harness 0.4.13 builds and scores it: the golden prompt, both filters, exact match.

The golden prompt (the first test item's 5-shot prompt, 3,189 bytes) pins the few-shot sampler, its seed, the
document order of the draws and both delimiters at once. The table of tricky outputs pins both filters and
the normalisation: each row is (generated text, reference answer, strict answer, strict correct, flexible
answer, flexible correct), worked out by hand from lm-eval's regexes and ``exact_match`` rules.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest

from ftkit.evaluate import gsm8k
from ftkit.evaluate.metrics import (
    bleu4,
    contains,
    exact_match,
    mean_stderr,
    rouge_l,
    rouge_n,
    tokens_for_overlap,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_data = pytest.mark.skipif(not (DATA / "test.jsonl").is_file(),
                                reason=f"GSM8K data not at {DATA} (the shared copy of openai/gsm8k)")


@needs_data
def test_first_test_item_5_shot_prompt_is_lm_evals_byte_for_byte():
    test, train, _ = gsm8k.load_gsm8k(str(DATA), 5)
    prompt = gsm8k.build_items(test, train, num_fewshot=5, limit=1)[0].prompt.encode("utf-8")
    assert len(prompt) == 3189
    assert hashlib.sha256(prompt).hexdigest() == "32680f263ba83280e98a8a24ceefed10a722a4cdcd9f4d78e93c45d43143ca66"


def _docs(n: int, tag: str) -> list[dict[str, str]]:
    return [{"question": f"{tag} q{i}?", "answer": f"{tag} work {i}\n#### {i}"} for i in range(n)]


def test_fewshot_draws_share_one_generator_in_document_order():
    train = _docs(50, "train")
    items = gsm8k.build_items(_docs(3, "test"), train, num_fewshot=2)
    rnd = random.Random(1234)
    for item in items:  # item i's examples are the i-th draw of the one seeded generator
        shots = rnd.sample(train, 2)
        expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert item.prompt == expected + f"Question: test q{item.doc_id}?\nAnswer:"
    assert [i.doc_id for i in gsm8k.build_items(_docs(3, "test"), train, num_fewshot=2, limit=2)] == [0, 1]


def test_chat_template_gives_fewshot_examples_as_turns():
    item = gsm8k.build_items(_docs(1, "test"), _docs(10, "train"), num_fewshot=2, chat=True)[0]
    roles = [m["role"] for m in item.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert item.messages[0]["content"].startswith("Question: train q") and "\n#### " in item.messages[1]["content"]
    assert item.messages[-1]["content"] == "Question: test q0?\nAnswer:"


def test_zero_shot_prompt_is_the_question_alone():
    item = gsm8k.build_items(_docs(1, "test"), [], num_fewshot=0)[0]
    assert item.prompt == "Question: test q0?\nAnswer:"


TARGET_1234 = "Work.\n#### 1234"
TRICKY = [
    # plain answers
    ("She pays 18 dollars.\n#### 18", "x\n#### 18", "18", True, "18", True),
    ("The answer is 18", "x\n#### 18", "[invalid]", False, "18", True),
    # commas in numbers are ignored on both sides
    ("#### 1,234", TARGET_1234, "1,234", True, "1,234", True),
    ("So 1,000 + 234 = 1,234", TARGET_1234, "[invalid]", False, "1,234", True),
    # dollars: strict's pattern has no $, flexible keeps it and exact_match drops it
    ("#### $1234", TARGET_1234, "[invalid]", False, "$1234", True),
    ("It costs $5.", "x\n#### 5", "[invalid]", False, "$5.", True),
    # trailing periods: "\.$" removes one at the end
    ("#### 5.", "x\n#### 5", "5.", True, "5.", True),
    ("#### 5.00", "x\n#### 5", "5.00", False, "5.00", False),
    # negative numbers
    ("#### -3", "x\n#### -3", "-3", True, "-3", True),
    ("The change is -3 degrees", "x\n#### -3", "[invalid]", False, "-3", True),
    # several ####: strict takes the first, flexible the last number
    ("#### 4\nwait\n#### 5", "x\n#### 5", "4", False, "5", True),
    # no number at all
    ("I do not know.", "x\n#### 7", "[invalid]", False, "[invalid]", False),
    # flexible's second group: a single digit is found only by (-?[0-9]+)
    ("it is 7 apples", "x\n#### 7", "[invalid]", False, "7", True),
    # the last match wins even when it is not the answer; a lone "." pair like ".." is a match too
    ("#### 12 then 3 and 45", "x\n#### 12", "12", True, "45", False),
    ("#### 12 ..", "x\n#### 12", "12", True, "..", False),
    # case is ignored (only matters for text, e.g. a reference with letters)
    ("#### 10", "x\n#### 10", "10", True, "10", True),
]


@pytest.mark.parametrize(("output", "target", "strict", "strict_ok", "flexible", "flexible_ok"), TRICKY,
                         ids=[f"row{i}" for i in range(len(TRICKY))])
def test_filters_and_exact_match_reproduce_lm_eval(output, target, strict, strict_ok, flexible, flexible_ok):
    scored = gsm8k.score_output(output, target)
    assert (scored["strict-match"]["answer"], scored["strict-match"]["correct"]) == (strict, strict_ok)
    assert (scored["flexible-extract"]["answer"], scored["flexible-extract"]["correct"]) == (flexible, flexible_ok)


def test_exact_match_regexes_apply_in_order_then_case():
    regexes = gsm8k.REGEXES_TO_IGNORE
    assert exact_match("ABC.", "x\n#### abc", regexes, ignore_case=True) == 1.0
    assert exact_match("ABC.", "x\n#### abc", regexes, ignore_case=False) == 0.0
    # "(?s).*#### " removes everything up to the LAST "#### " (greedy), also in the prediction
    assert exact_match("#### 1 #### 2", "#### 2", regexes, ignore_case=True) == 1.0


def test_stderr_is_sample_std_over_sqrt_n_and_na_below_two():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    mu = 0.6
    expected = math.sqrt(sum((v - mu) ** 2 for v in values) / 4) / math.sqrt(5)
    assert mean_stderr(values) == pytest.approx(expected)
    assert mean_stderr([1.0]) == "N/A"


def test_overlap_metrics_are_word_level_for_english_and_character_level_for_chinese():
    assert tokens_for_overlap("The cat, sat.") == ["the", "cat", ",", "sat", "."]
    assert tokens_for_overlap("我是小明") == ["我", "是", "小", "明"]
    assert rouge_n("我是小明", "我叫小明", 1) == pytest.approx(0.75)
    assert rouge_n("the cat sat", "the cat sat", 2) == 1.0
    assert rouge_l("a b c d", "a x c d") == pytest.approx(0.75)
    assert bleu4("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < bleu4("the cat sat on a mat", "the cat sat on the mat") < 1
    assert bleu4("dog", "the cat sat") == 0.0
    assert contains("I am Ember, made by Acme.", "ember") == 1.0
    assert contains("I am SmolLM.", ["Ember", "Acme"]) == 0.0
