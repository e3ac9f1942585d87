"""Issue 17's bad input for ``ftkit evaluate``: each mistake is one sentence, exit 1, and nothing is written.

Every refusal comes before results.json or samples.jsonl exist: the benchmark and its data are checked
first, then the output folder, then the model (an adapter of another model) or the endpoint.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from bad_input import BadInput, check_bad_input
from conftest import build_tiny_llama
from test_bad_input_paths import save_adapter

ASSETS: dict[str, Path] = {}
GOOD = "".join(json.dumps({"question": f"q{i}?", "answer": f"w\n#### {i}"}) + "\n" for i in range(3))
DATA = {"gsm/test.jsonl": GOOD, "gsm/train.jsonl": GOOD}
EVAL = ["evaluate", "--data", "gsm", "--num-fewshot", "1"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def assets(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate-assets")
    ASSETS["model"] = tiny_llama_dir
    ASSETS["other-ad"] = save_adapter(build_tiny_llama(folder / "other-base", hidden_size=32, vocab_size=1000),
                                      folder / "other-ad")


def copy_assets(root: Path) -> None:
    shutil.copytree(ASSETS["model"], root / "model")
    shutil.copytree(ASSETS["other-ad"], root / "other-ad")


PORT = _closed_port()
CASES = [
    BadInput("unknown-benchmark", ["evaluate", "--benchmark", "mmlu"],
             mentions=["Unknown benchmark 'mmlu'", "gsm8k, general"]),
    BadInput("data-line-without-answer", [*EVAL, "--model", "model"],
             mentions=["gsm/test.jsonl line 2 lacks the field 'answer'"],
             files={**DATA, "gsm/test.jsonl": GOOD.splitlines()[0] + '\n{"question": "no answer?"}\n'}),
    BadInput("data-line-not-json", [*EVAL, "--model", "model"], mentions=["gsm/train.jsonl line 1 is not JSON"],
             files={**DATA, "gsm/train.jsonl": "question,answer\n"}),
    BadInput("limit-zero", [*EVAL, "--limit", "0"], mentions=["limit", "greater than or equal to 1"], files=DATA),
    BadInput("adapter-of-another-model", [*EVAL, "--model", "model", "--adapter", "other-ad"],
             mentions=["Adapter other-ad does not fit this base model", "the adapter expects 32"], files=DATA, setup=copy_assets),
    BadInput("endpoint-down", [*EVAL, "--endpoint", f"http://127.0.0.1:{PORT}/v1"],
             mentions=[f"Endpoint http://127.0.0.1:{PORT}/v1 failed 5 times", "ConnectError", "server is running"],
             files=DATA),
    BadInput("output-holds-another-run", [*EVAL, "--model", "model", "--output", "out"],
             mentions=["out/results.json already holds another evaluation's results", "--resume", "--overwrite"],
             files={**DATA, "out/results.json": '{"status": "complete"}\n', "out/samples.jsonl": ""}),
    BadInput("no-gsm8k-data-offline", ["evaluate", "--model", "model"],
             mentions=["No GSM8K data", "openai/gsm8k", "--data FOLDER"]),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_sentence_and_loses_nothing(case, tmp_path):
    check_bad_input(case, tmp_path)
