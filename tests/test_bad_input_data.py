"""Issue 23, the data cases: bad dataset files and registries under the real ``ftkit data preview``.

A file that cannot be read at all is exit 1 with one sentence naming the file (and line); records that
cannot be used are skipped, the command exits 0 when others are fine, and the skip reason names the first
skipped record, its role or keys, and the fix. The unit tests below the catalogue show that the right
rows are read: quoted commas, missing trailing fields, tabs, NaN cells, folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bad_input import BadInput, check_bad_input

from ftkit.data.dataset import read_conversations
from ftkit.data.formats import records_to_conversations
from ftkit.data.options import DataOptions
from ftkit.data.readers import read_records
from ftkit.data.registry import resolve_dataset
from ftkit.errors import FtkitError

PREVIEW = ["data", "preview", "{tmp}/cfg.yaml"]


def config(dataset: str, dataset_dir: str = "data") -> str:
    """A preview config on the embedded model (only its tokenizer is loaded; no replay to generate)."""
    return (f"model_name_or_path: smollm2-135m-instruct\ndataset: {dataset}\ndataset_dir: {dataset_dir}\n"
            "output_dir: out\nreplay_ratio: 0\n")


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": text} for role, text in pairs]


def sharegpt_case(case_id: str, bad_record: list[dict[str, str]], mentions: list[str]) -> BadInput:
    """A registered sharegpt dataset whose second record is ``bad_record``; the other two are fine."""
    records = [{"conversations": turns(("human", "Hi"), ("gpt", "Hello"))}, {"conversations": bad_record},
               {"conversations": turns(("human", "Bye"), ("gpt", "Goodbye"))}]
    return BadInput(case_id, PREVIEW, exit_code=0, mentions=mentions, files={
        "cfg.yaml": config("chat", "d"), "d/chat.json": json.dumps(records),
        "d/dataset_info.json": json.dumps({"chat": {"file_name": "chat.json", "formatting": "sharegpt"}}),
    })


ALPACA_ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi"},
               {"instruction": "Say bye", "input": "", "output": "Bye"}]

CASES = [
    BadInput("csv-row-with-more-fields-than-the-header", PREVIEW, mentions=["rows.csv:2", "4 fields", "header has 2"],
             files={"cfg.yaml": config("rows.csv"),
                    "rows.csv": "instruction,output\nName the primary colors,red, yellow, blue\nSay hi,hi\n"}),
    BadInput("yaml-file-as-dataset", PREVIEW, mentions=["data.yaml", "json, jsonl, csv, tsv, parquet, arrow or txt"],
             files={"cfg.yaml": config("data.yaml"), "data.yaml": "- instruction: Say hi\n  output: Hi\n"}),
    BadInput("registry-name-with-a-comma", PREVIEW, mentions=["d/dataset_info.json", '"colors,v2"', "comma"],
             files={"cfg.yaml": config("colors", "d"), "d/a.json": json.dumps(ALPACA_ROWS),
                    "d/dataset_info.json": json.dumps({"colors": {"file_name": "a.json"},
                                                       "colors,v2": {"file_name": "a.json"}})}),
    sharegpt_case("sharegpt-unknown-role", turns(("human", "Hi"), ("bot", "Hello")),
                  mentions=["'bot'", "user_tag", "assistant_tag"]),
    sharegpt_case("sharegpt-broken-role-order", turns(("human", "Hi"), ("human", "Anyone?"), ("gpt", "Yes")),
                  mentions=["'human'", "turn", "order"]),
    BadInput("alpaca-file-with-a-sharegpt-record", PREVIEW, exit_code=0, mentions=["sharegpt", "conversations"],
             files={"cfg.yaml": config("mixed.json"), "mixed.json": json.dumps(
                 [*ALPACA_ROWS, {"conversations": turns(("human", "Hi"), ("gpt", "Hello"))}])}),
    BadInput("folder-holding-dataset_info-as-a-dataset", PREVIEW, mentions=["dataset_dir: d", "dataset_info.json"],
             files={"cfg.yaml": config("./d"), "d/a.json": json.dumps(ALPACA_ROWS),
                    "d/dataset_info.json": json.dumps({"a": {"file_name": "a.json"}})}),
]

# The sentence each skip case must print whole: the first skipped record, its role or keys, and the fix.
SKIP_SENTENCES = {
    "sharegpt-unknown-role": "an unknown role (first: record 2 has role 'bot' (turn 2), which its tags do not map; "
                             'set "tags": {"user_tag": "human", "assistant_tag": "bot"} in the entry \'chat\' of '
                             "dataset_info.json)",
    "sharegpt-broken-role-order": "broken role order (first: record 2 has 'human' (user) as turn 2, where the "
                                  "assistant must speak; fix the record (turns alternate user, assistant))",
    "alpaca-file-with-a-sharegpt-record": "another format's keys (first: record 3 has sharegpt keys (conversations) "
                                          "in an alpaca dataset",
}


def readable(output: str) -> str:
    """What a reader can read in ``output``: its text with whitespace collapsed, then each table column's cells
    joined top to bottom (a long cell wraps over several lines of its column)."""
    columns: dict[int, list[str]] = {}
    for line in output.splitlines():
        if line.count("│") >= 2:
            for index, cell in enumerate(line.split("│")[1:-1]):
                columns.setdefault(index, []).append(cell)
    texts = [output, *(" ".join(cells) for _, cells in sorted(columns.items()))]
    return "\n".join(" ".join(text.split()) for text in texts)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_sentence_and_loses_nothing(case, tmp_path):
    result = check_bad_input(case, tmp_path)
    if case.id in SKIP_SENTENCES:
        assert SKIP_SENTENCES[case.id] in readable(result.stdout), result.stdout


# ---- the right rows are read ----------------------------------------------------------------------------


def records_of(path: Path) -> list[dict]:
    return read_records(resolve_dataset(str(path), path.parent))


def conversations_of(path: Path):
    """The conversations of a dataset given as a path (its format detected), and the conversion report."""
    return read_conversations(resolve_dataset(str(path), path.parent), DataOptions(dataset=(str(path),)))


def test_quoted_csv_values_keep_their_commas_quotes_and_newlines(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,output\n"Name the primary colors","red, yellow, blue"\n'
                    '"Quote ""this""","line one\nline two"\n\nSay hi,007\n', encoding="utf-8")
    assert records_of(path) == [
        {"instruction": "Name the primary colors", "output": "red, yellow, blue"},
        {"instruction": 'Quote "this"', "output": "line one\nline two"},
        {"instruction": "Say hi", "output": "007"},  # text stays text (pandas read it as the number 7)
    ]


def test_csv_extra_field_after_a_multi_line_value_names_the_line_the_row_starts_on(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,output\n"two\nlines",ok\nSay hi,hi,extra\n', encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        records_of(path)
    assert str(caught.value) == (
        f"{path}:4: this row has 3 fields but the header has 2 (instruction, output); put double quotes around a "
        'value that contains a comma ("red, yellow, blue").'
    )


def test_csv_missing_trailing_field_and_empty_cells_are_missing_values(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nSay hi,,Hi\nSay bye\nNA,None,nan\n", encoding="utf-8")
    assert records_of(path) == [
        {"instruction": "Say hi", "input": None, "output": "Hi"},
        {"instruction": "Say bye", "input": None, "output": None},
        {"instruction": "NA", "input": "None", "output": "nan"},  # only an empty cell is missing
    ]
    conversations, report = conversations_of(path)
    assert conversations[0] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]
    assert list(report.skipped) == ["an empty response (first: record 2 has no text in output)"]


def test_tsv_is_read_as_tab_separated(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("instruction\toutput\nName the primary colors\tred, yellow, blue\n", encoding="utf-8")
    assert records_of(path) == [{"instruction": "Name the primary colors", "output": "red, yellow, blue"}]


def test_nan_values_are_empty_never_the_text_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_file = tmp_path / "rows.json"
    json_file.write_text('[{"instruction": "Say hi", "input": NaN, "output": "Hi"}]', encoding="utf-8")
    parquet_file = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": ["Say hi"], "input": pa.array([math.nan], pa.float64()),
                             "output": ["Hi"]}), parquet_file)
    for path in (json_file, parquet_file):
        conversations, _ = conversations_of(path)
        assert conversations == [[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]]


def test_sharegpt_roles_under_other_keys_suggest_role_and_content_tags(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"conversations": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}]}]), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json",
                                                                     "formatting": "sharegpt"}}))
    spec = resolve_dataset("chat", tmp_path)
    with pytest.raises(FtkitError) as caught:
        records_to_conversations(read_records(spec), spec)
    assert str(caught.value) == (
        "Dataset 'chat' has no usable examples (1 with an unknown role (first: record 1 has no 'from' key (turn 1), "
        'which its tags do not map; set "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", '
        "\"assistant_tag\": \"assistant\"} in the entry 'chat' of dataset_info.json))."
    )


def test_folder_of_one_format_is_read_sorted_and_hidden_files_are_left_out(tmp_path):
    folder = tmp_path / "parts"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "b.csv").write_text("instruction,output\nSay bye,Bye\n", encoding="utf-8")
    (folder / "a.csv").write_text("instruction,output\nSay hi,Hi\n", encoding="utf-8")
    (folder / ".ipynb_checkpoints" / "a.csv").write_text("instruction,output\nold,old\n", encoding="utf-8")
    assert [r["output"] for r in read_records(resolve_dataset(str(folder), tmp_path))] == ["Hi", "Bye"]


def test_folder_of_mixed_formats_is_refused(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"instruction": "Say hi", "output": "Hi"}\n', encoding="utf-8")
    (folder / "b.json").write_text('[{"instruction": "Say bye", "output": "Bye"}]', encoding="utf-8")
    (folder / "c.csv").write_text("instruction,output\nSay yes,Yes\n", encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(folder), tmp_path))
    assert str(caught.value) == (
        f"Dataset '{folder}': folder {folder} mixes data formats (c.csv (csv), a.jsonl (json)), but a folder is read "
        "as all its files of one format; move the others out or register each file."
    )
