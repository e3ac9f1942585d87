"""Scores: exact match as lm-evaluation-harness normalises it, its standard error, BLEU-4, ROUGE, contains.

``exact_match`` and ``mean_stderr`` follow lm-evaluation-harness 0.4.13 (``lm_eval/api/metrics.py``): the
``regexes_to_ignore`` are removed from prediction and reference in order, then both are lower-cased when
``ignore_case``; the standard error of a mean is the sample standard deviation over ``sqrt(n)`` and is
"N/A" for fewer than two items. BLEU-4 and ROUGE are written out here (a few lines each) rather than pulled
from nltk/rouge-score so that Chinese is scored per character, as Chinese users expect, with no extra
dependency: text with CJK characters is split into characters, other text into lower-cased words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalise_for_exact_match(text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False) -> str:
    """``text`` with each regex removed in turn, then lower-cased with ``ignore_case`` (lm-eval's order)."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (),
                ignore_case: bool = False) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalise_for_exact_match(prediction, regexes_to_ignore, ignore_case)
                 == normalise_for_exact_match(reference, regexes_to_ignore, ignore_case))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | str:
    """The standard error of the mean as lm-eval reports it: sample std / sqrt(n); "N/A" below two items."""
    n = len(values)
    if n < 2:
        return "N/A"
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def tokens_for_overlap(text: str) -> list[str]:
    """Characters for text with CJK characters (Chinese, Japanese, Korean), else lower-cased words."""
    if _CJK.search(text):
        return [c for c in text if not c.isspace()]
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (uniform weights, brevity penalty) with add-one smoothing of the 2- to 4-gram
    precisions (nltk's method1-style floor would give 0 to any short answer missing one 4-gram)."""
    hyp, ref = tokens_for_overlap(prediction), tokens_for_overlap(reference)
    if not hyp or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
        overlap = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
        total = max(len(hyp) - n + 1, 0)
        if n == 1:
            if overlap == 0:
                return 0.0
            precision = overlap / total
        else:
            precision = (overlap + 1) / (total + 1)
        log_precision += math.log(precision) / 4
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def _f1(overlap: int, predicted: int, wanted: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / predicted, overlap / wanted
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 over words (characters for CJK text)."""
    hyp, ref = _ngrams(tokens_for_overlap(prediction), n), _ngrams(tokens_for_overlap(reference), n)
    overlap = sum(min(count, ref[gram]) for gram, count in hyp.items())
    return _f1(overlap, sum(hyp.values()), sum(ref.values()))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the two token lists."""
    hyp, ref = tokens_for_overlap(prediction), tokens_for_overlap(reference)
    if not hyp or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for h in hyp:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if h == r else max(previous[j + 1], current[j]))
        previous = current
    return _f1(previous[-1], len(hyp), len(ref))


def contains(prediction: str, expected: str | Sequence[str]) -> float:
    """1.0 when the prediction names ``expected`` (any of several), ignoring case."""
    wanted = [expected] if isinstance(expected, str) else list(expected)
    return float(any(w and w.lower() in prediction.lower() for w in wanted))


def generation_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every generation metric of one answer against its reference."""
    return {"exact_match": exact_match(prediction.strip(), reference.strip()), "bleu4": bleu4(prediction, reference),
            "rouge1": rouge_n(prediction, reference, 1), "rouge2": rouge_n(prediction, reference, 2),
            "rougeL": rouge_l(prediction, reference), "contains": contains(prediction, reference.strip())}
