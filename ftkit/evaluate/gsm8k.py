"""GSM8K exactly as lm-evaluation-harness 0.4.13 scores its stock ``gsm8k`` task (task version 3.0).

What is matched (read from lm-eval 0.4.13: ``lm_eval/tasks/gsm8k/gsm8k.yaml``, ``lm_eval/api/samplers.py``,
``lm_eval/filters/extraction.py``, ``lm_eval/api/metrics.py``):

- prompt: ``doc_to_text`` "Question: {question}\\nAnswer:", the full ``answer`` as the few-shot target, target
  delimiter " " and few-shot delimiter "\\n\\n"; the few-shot examples are drawn from the train split by the
  default sampler, ``random.Random(1234).sample(train, k)``, one draw per test item *in document order* from
  one shared generator (so item i's examples depend on every draw before it; ``--limit`` keeps the first
  items); no BOS token is added;
- generation: greedy, at most 256 new tokens, stopped at "Question:", "</s>", "<|im_end|>" and the EOS
  token, the text cut at the first of them; prompts longer than the model's length keep their last
  ``max_length - 256`` tokens (lm-eval's HF model does the same);
- filters: ``strict-match`` (``#### (\\-?[0-9\\.\\,]+)``, first match) and ``flexible-extract``
  (``(-?[$0-9.,]{2,})|(-?[0-9]+)``, last match), "[invalid]" when nothing matches;
- metric: ``exact_match`` with ``ignore_case`` and ``regexes_to_ignore`` ",", "\\$", "(?s).*#### ", "\\.$"
  applied to the extracted answer and to the full reference answer.

``--apply-chat-template`` gives the few-shot examples as user/assistant turns and the question as the last
user turn, as lm-eval's ``--apply_chat_template --fewshot_as_multiturn`` does.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluate.metrics import exact_match

LM_EVAL_VERSION = "0.4.13"
TASK_VERSION = 3.0
DEFAULT_NUM_FEWSHOT = 5
FEWSHOT_SEED = 1234
MAX_GEN_TOKS = 256
UNTIL = ("Question:", "</s>", "<|im_end|>")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FALLBACK = "[invalid]"
REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
# name -> (pattern, which match: 0 = first, -1 = last)
FILTERS: dict[str, tuple[re.Pattern[str], int]] = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
MODELSCOPE_ID = "modelscope/gsm8k"


@dataclass
class Gsm8kItem:
    """One test question with its prompt (plain text, or chat ``messages`` to render) and reference answer."""

    doc_id: int
    question: str
    target: str
    prompt: str
    messages: list[dict[str, str]] | None = None


def doc_to_text(doc: dict[str, str]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def build_items(test: list[dict[str, str]], train: list[dict[str, str]], *, num_fewshot: int = DEFAULT_NUM_FEWSHOT,
                limit: int | None = None, chat: bool = False) -> list[Gsm8kItem]:
    """The first ``limit`` test items with their few-shot prompts, drawn as lm-eval draws them."""
    rnd = random.Random(FEWSHOT_SEED)
    items = []
    for doc_id, doc in enumerate(test[:limit] if limit else test):
        shots = [d for d in rnd.sample(train, num_fewshot) if d != doc][:num_fewshot] if num_fewshot else []
        if chat:
            messages = []
            for shot in shots:
                messages += [{"role": "user", "content": doc_to_text(shot)},
                             {"role": "assistant", "content": shot["answer"]}]
            messages.append({"role": "user", "content": doc_to_text(doc)})
            items.append(Gsm8kItem(doc_id, doc["question"], doc["answer"], "", messages))
        else:
            context = "".join(doc_to_text(s) + TARGET_DELIMITER + s["answer"] + FEWSHOT_DELIMITER for s in shots)
            items.append(Gsm8kItem(doc_id, doc["question"], doc["answer"], context + doc_to_text(doc)))
    return items


def extract_answer(text: str, filter_name: str) -> str:
    """What lm-eval's regex filter (then take_first) makes of one generated text."""
    pattern, group_select = FILTERS[filter_name]
    found = pattern.findall(text)
    if not found:
        return FALLBACK
    match = found[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else FALLBACK
    return match.strip()


def score_output(output: str, target: str) -> dict[str, dict[str, Any]]:
    """Each filter's extracted answer and whether it is an exact match of ``target``."""
    scored = {}
    for name in FILTERS:
        answer = extract_answer(output, name)
        scored[name] = {"answer": answer,
                        "correct": bool(exact_match(answer, target, REGEXES_TO_IGNORE, ignore_case=True))}
    return scored


def reference_answer(target: str) -> str:
    """The number after "#### " in a reference answer (for the samples file and the table)."""
    return target.split("#### ")[-1].strip()


# ---- data ---------------------------------------------------------------------------------------------------

def read_jsonl_docs(path: Path) -> list[dict[str, str]]:
    """GSM8K records (``question`` and ``answer`` strings, one JSON object a line) from ``path``."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise FtkitError(f"{path} line {line_no} is not JSON; GSM8K data is one JSON object per line with "
                                 "question and answer fields.") from None
            if not isinstance(record, dict):
                raise FtkitError(f"{path} line {line_no} is not a JSON object; each line needs question and "
                                 "answer fields.")
            for field in ("question", "answer"):
                if not isinstance(record.get(field), str):
                    what = "lacks the field" if field not in record else "has a non-text field"
                    raise FtkitError(f"{path} line {line_no} {what} {field!r}; each GSM8K line needs question and "
                                     "answer as text (the openai/gsm8k jsonl format).")
            docs.append({"question": record["question"], "answer": record["answer"]})
    if not docs:
        raise FtkitError(f"{path} holds no GSM8K records; give the openai/gsm8k jsonl files (question, answer).")
    return docs


def local_split_files(data: Path) -> tuple[Path, Path | None]:
    """(test file, train file or None) of a ``--data`` folder or file."""
    if data.is_dir():
        for folder in (data, data / "main"):
            if (folder / "test.jsonl").is_file():
                train = folder / "train.jsonl"
                return folder / "test.jsonl", train if train.is_file() else None
        raise FtkitError(f"--data folder {data} has no test.jsonl; put GSM8K's test.jsonl (and train.jsonl for "
                         "few-shot examples) there, in the openai/gsm8k jsonl format.")
    if data.is_file():
        if data.suffix != ".jsonl":
            raise FtkitError(f"--data file {data} is not a .jsonl file; GSM8K data is read from the openai/gsm8k "
                             "jsonl files (question, answer per line).")
        train = data.with_name("train.jsonl")
        return data, train if train.is_file() and train != data else None
    raise FtkitError(f"--data {data} does not exist; give a folder holding GSM8K's test.jsonl and train.jsonl.")


def load_gsm8k(data: str | None, num_fewshot: int) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """(test docs, train docs, where they came from): ``data`` if given, else the hub, else ModelScope."""
    if data:
        test_file, train_file = local_split_files(Path(data).expanduser())
        if num_fewshot and train_file is None:
            raise FtkitError(f"{num_fewshot}-shot GSM8K needs the train split for its examples but there is no "
                             f"train.jsonl beside {test_file}; add it or pass --num-fewshot 0.")
        train = read_jsonl_docs(train_file) if train_file is not None and num_fewshot else []
        return read_jsonl_docs(test_file), train, str(test_file.parent)
    return _load_from_hub()


def _load_from_hub() -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    problems = []
    try:
        import datasets

        loaded = datasets.load_dataset(HUB_ID, HUB_CONFIG)
        return ([dict(r) for r in loaded["test"]], [dict(r) for r in loaded["train"]], f"hf://{HUB_ID}")
    except Exception as error:  # offline, no cache, hub down: try ModelScope, then say how to give the data
        problems.append(f"Hugging Face: {type(error).__name__}")
    try:
        from modelscope.msdatasets import MsDataset

        test = [dict(r) for r in MsDataset.load(MODELSCOPE_ID, subset_name=HUB_CONFIG, split="test")]
        train = [dict(r) for r in MsDataset.load(MODELSCOPE_ID, subset_name=HUB_CONFIG, split="train")]
        return test, train, f"ms://{MODELSCOPE_ID}"
    except Exception as error:
        problems.append(f"ModelScope: {type(error).__name__}")
    raise FtkitError(f"No GSM8K data: --data was not given and neither the hub ({HUB_ID}) nor ModelScope could be "
                     f"read ({', '.join(problems)}); download test.jsonl and train.jsonl of {HUB_ID} (config main) "
                     "into a folder and pass --data FOLDER.")
