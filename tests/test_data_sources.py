"""The front half of the data pipeline: registry, readers, format detection, conversations, mixing, splits.

Every dataset is a real file written into ``tmp_path`` (or the shipped demo data); nothing is mocked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.data.dataset import mix_datasets, read_conversations, split_validation
from ftkit.data.formats import conversation_text
from ftkit.data.options import DataOptions
from ftkit.data.readers import read_records
from ftkit.data.registry import DatasetSpec, resolve_dataset
from ftkit.errors import FtkitError

REPO = Path(__file__).resolve().parents[1]
ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


def make_config(tmp_path: Path, **values) -> TrainConfig:
    base = {"dataset": "demo", "output_dir": str(tmp_path / "out"), "dataset_dir": str(tmp_path)}
    return load_stage_config(TrainConfig, None, {**base, **values}).config


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def register(tmp_path: Path, **entries) -> Path:
    return write_json(tmp_path / "dataset_info.json", entries)


def conversations_of(tmp_path: Path, name: str, **config_values):
    config = make_config(tmp_path, **config_values)
    spec = resolve_dataset(name, config.dataset_dir)
    conversations, report = read_conversations(spec, DataOptions.from_config(config))
    return spec, conversations, report


# ---- the registry --------------------------------------------------------------------------------------


def test_unregistered_name_suggests_and_lists_the_registered_ones(tmp_path):
    registry = register(tmp_path, identity={"file_name": "identity.json"}, alpaca_demo={"file_name": "a.json"})
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("identiy", tmp_path)
    assert str(caught.value) == (
        f"Dataset 'identiy' is not registered in {registry}; did you mean 'identity'? registered: alpaca_demo, "
        "identity. Register it there or give a file path."
    )


def test_unregistered_name_without_a_close_one(tmp_path):
    registry = register(tmp_path, identity={"file_name": "identity.json"})
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("zebra", tmp_path)
    assert str(caught.value) == (
        f"Dataset 'zebra' is not registered in {registry}; registered: identity. Register it there or give a file "
        "path."
    )


def test_shipped_registry_answers_when_data_has_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/dataset_info.json here
    spec = resolve_dataset("identity", "data")
    assert Path(spec.location).is_file()
    assert Path(spec.location).parent.name == "data"
    assert spec.columns["response"] == "output"


def test_dataset_dir_without_a_registry(tmp_path):
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("identity", tmp_path / "mine")
    assert str(caught.value) == (
        f"dataset_dir {tmp_path / 'mine'} has no dataset_info.json; create one or point dataset_dir at the folder "
        "that holds it."
    )


def test_registry_that_is_not_json(tmp_path):
    registry = tmp_path / "dataset_info.json"
    registry.write_text('{\n  "demo": {"file_name": "a.json",}\n}\n', encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("demo", tmp_path)
    assert str(caught.value) == f"{registry}:2:34: invalid JSON: Expecting property name enclosed in double quotes."


def test_entry_with_an_unknown_key_suggests_the_right_one(tmp_path):
    registry = register(tmp_path, demo={"file_name": "a.json", "fromatting": "sharegpt"})
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("demo", tmp_path)
    assert str(caught.value) == (
        f"{registry}: dataset 'demo' has unknown key(s) fromatting; did you mean 'formatting'? valid keys: "
        "cloud_file_name, columns, file_name, folder, formatting, hf_hub_url, ms_hub_url, num_samples, "
        "om_hub_url, ranking, script_url, split, subset, tags."
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"file_name": "a.json", "formatting": "chatml"}, "formatting 'chatml' is not one of alpaca, sharegpt, openai."),
        ({"file_name": "a.json", "columns": {"answer": "output"}},
         "unknown column role(s) answer; valid: audios, chosen, history, images, kto_tag, messages, prompt, query, "
         "rejected, response, system, tools, videos."),
        ({"file_name": "a.json", "columns": ["instruction", "output"]},
         'columns must be a JSON object mapping names to strings, not ["instruction", "output"].'),
        ({"file_name": "a.json", "formatting": "sharegpt", "tags": {"human_tag": "human"}},
         "unknown tag(s) human_tag; valid: assistant_tag, content_tag, function_tag, observation_tag, role_tag, "
         "system_tag, user_tag."),
        ({"file_name": "a.json", "num_samples": "100"}, 'num_samples must be a positive whole number, not "100".'),
    ],
    ids=["formatting", "column-role", "columns-type", "tag", "num_samples"],
)
def test_invalid_registry_entry(tmp_path, entry, problem):
    registry = register(tmp_path, demo=entry)
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("demo", tmp_path)
    assert str(caught.value) == f"{registry}: dataset 'demo': {problem}"


def test_entry_without_a_source(tmp_path):
    registry = register(tmp_path, demo={"formatting": "alpaca"})
    with pytest.raises(FtkitError) as caught:
        resolve_dataset("demo", tmp_path)
    assert str(caught.value) == f"{registry}: dataset 'demo' needs one of file_name, hf_hub_url or ms_hub_url."


def test_registered_file_that_is_missing(tmp_path):
    register(tmp_path, demo={"file_name": "gone.json"})
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset("demo", tmp_path))
    assert str(caught.value) == (
        f"Dataset 'demo': file {tmp_path / 'gone.json'} does not exist; fix file_name in dataset_info.json or the "
        "path."
    )


def test_path_that_is_missing(tmp_path):
    with pytest.raises(FtkitError) as caught:
        resolve_dataset(str(tmp_path / "gone.jsonl"), tmp_path)
    assert str(caught.value) == (
        f"Dataset file {tmp_path / 'gone.jsonl'} does not exist; check the path (relative paths start at the "
        "current directory)."
    )


# ---- a path given directly: the format is detected from the first record --------------------------------


@pytest.mark.parametrize(
    ("record", "detected", "conversation"),
    [
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]},
         "openai (messages with role/content)",
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}]),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be kind."},
         "sharegpt (conversations with from/value)",
         [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}]),
        ({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         "sharegpt (conversations with role/content)",
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
        ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
         "alpaca (instruction/input/output)",
         [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]),
        ({"prompt": "Capital of France?", "completion": "Paris."}, "prompt/completion",
         [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]),
        ({"question": "2+2?", "answer": "4"}, "question/answer",
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    ],
    ids=["openai", "sharegpt", "sharegpt-role-content", "alpaca", "prompt-completion", "question-answer"],
)
def test_format_of_a_path_is_detected_and_reported(tmp_path, record, detected, conversation):
    path = write_jsonl(tmp_path / "mine.jsonl", [record])
    spec, conversations, report = conversations_of(tmp_path, str(path))
    assert spec.given_as_path
    assert spec.detected == detected
    assert conversations == [conversation]
    assert report.summary() == f"{path}: 1/1 examples"


def test_text_file_is_detected_for_pretraining(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "First paragraph."}, {"text": "Second one."}])
    spec, conversations, _ = conversations_of(tmp_path, str(path), stage="pt")
    assert spec.detected == "raw text (text)"
    assert [conversation_text(c) for c in conversations] == ["First paragraph.", "Second one."]


def test_text_file_cannot_be_used_for_sft(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "First paragraph."}])
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, str(path))
    assert str(caught.value) == (
        f"Dataset '{path}' (alpaca format) expects column(s) prompt=text, response=output but its records have text; "
        "fix `columns` in dataset_info.json."
    )


def test_undetectable_format_lists_what_it_looked_for(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, str(path))
    assert str(caught.value) == (
        f"Cannot tell the format of {path}: its first record has keys a, q; expected messages, conversations, "
        "instruction/output, prompt/completion, question/answer or text, or register it in dataset_info.json with "
        "its columns."
    )


# ---- readers -------------------------------------------------------------------------------------------


def _write_csv(path: Path, records) -> None:
    pd.DataFrame(records).to_csv(path, index=False)


def _write_parquet(path: Path, records) -> None:
    from datasets import Dataset

    Dataset.from_list(records).to_parquet(str(path))


def _write_arrow(path: Path, records) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize(
    ("suffix", "writer"),
    [(".json", write_json), (".jsonl", write_jsonl), (".csv", _write_csv), (".parquet", _write_parquet),
     (".arrow", _write_arrow)],
)
def test_each_file_type_reads_the_same_records(tmp_path, suffix, writer):
    path = tmp_path / f"demo{suffix}"
    writer(path, ALPACA)
    register(tmp_path, demo={"file_name": path.name})
    records = read_records(resolve_dataset("demo", tmp_path))
    # CSV has no empty string: an empty cell comes back as None, which conversations read as "".
    assert [{k: v or "" for k, v in r.items()} for r in records] == ALPACA
    _, conversations, _ = conversations_of(tmp_path, "demo")
    assert conversations[1] == [{"role": "user", "content": "Add the numbers.\n2 and 3"},
                                {"role": "assistant", "content": "5"}]


def test_txt_file_is_one_text_record_per_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert read_records(resolve_dataset(str(path), tmp_path)) == [{"text": "first line"}, {"text": "second line"}]


def test_json_lines_saved_as_json(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ALPACA)
    assert read_records(resolve_dataset(str(path), tmp_path)) == ALPACA


def test_folder_of_files_is_read_in_name_order(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ALPACA[1:])
    write_jsonl(folder / "a.JSONL", ALPACA[:1])
    (folder / "README.md").write_text("not data", encoding="utf-8")
    register(tmp_path, demo={"file_name": "parts"})
    assert read_records(resolve_dataset("demo", tmp_path)) == ALPACA


def test_utf8_byte_order_mark_is_not_part_of_the_data(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfinstruction,output\nSay hi.,Hi!\n")
    assert read_records(resolve_dataset(str(path), tmp_path)) == ALPACA
    assert read_records(resolve_dataset(str(csv_path), tmp_path)) == [{"instruction": "Say hi.", "output": "Hi!"}]


def test_max_samples_and_num_samples_limit_the_records(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    register(tmp_path, demo={"file_name": "a.json"}, two={"file_name": "a.json", "num_samples": 2})
    assert read_records(resolve_dataset("demo", tmp_path), max_samples=1) == ALPACA[:1]
    assert read_records(resolve_dataset("two", tmp_path)) == ALPACA[:2]
    assert read_records(resolve_dataset("two", tmp_path), max_samples=1) == ALPACA[:1]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == f"{path}:3: invalid JSON line: Unterminated string starting at (column 10)."


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == f"{path}:2: each line must be a JSON object, not list."


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n',
                    encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == f"{path}:3:23: invalid JSON: Expecting ',' delimiter."


def test_json_file_that_is_not_a_list_of_objects(tmp_path):
    path = write_json(tmp_path / "strings.json", ["a", "b"])
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == f"{path} must hold a JSON list of objects (one per example)."


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_non_utf8_data_file_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    body = {".jsonl": '{"text": "ok"}\n{"text": "café"}\n', ".json": '[{"text": "ok"},\n {"text": "café"}]\n',
            ".csv": "text\ncafé\n", ".txt": "ok\ncafé\n"}[suffix]
    path.write_bytes(body.encode("latin-1"))
    byte = body.index("é")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte {byte}); convert the file to UTF-8."


def test_csv_that_cannot_be_parsed(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text('instruction,output\n"never closed,x\n', encoding="utf-8")
    with pytest.raises(FtkitError) as caught:
        read_records(resolve_dataset(str(path), tmp_path))
    assert str(caught.value) == (
        f"{path}:2: the double quote that opens a value in this row is never closed; close it (a quote inside a "
        'quoted value is written twice: "").'
    )


def test_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(FtkitError, match=rf"^{path}: cannot be read as parquet: "):
        read_records(resolve_dataset(str(path), tmp_path))


# ---- records -> conversations --------------------------------------------------------------------------


def test_wrong_columns_name_the_dataset_the_expected_and_the_found_ones(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    register(tmp_path, demo={"file_name": "qa.jsonl"})
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, "demo")
    assert str(caught.value) == (
        "Dataset 'demo' (alpaca format) expects column(s) prompt=instruction, response=output but its records have "
        "answer, question; fix `columns` in dataset_info.json."
    )


def test_wrong_messages_column_for_sharegpt(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    register(tmp_path, demo={"file_name": "chat.jsonl", "formatting": "sharegpt"})
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, "demo")
    assert str(caught.value) == (
        "Dataset 'demo' (sharegpt format) expects column(s) messages=conversations but its records have messages; "
        "fix `columns` in dataset_info.json."
    )


def test_columns_from_the_registry_are_used(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    register(tmp_path, demo={"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}})
    _, conversations, _ = conversations_of(tmp_path, "demo")
    assert conversations == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def _turns(*pairs):
    return [{"from": role, "value": text} for role, text in pairs]


def test_sharegpt_records_that_break_the_role_order_are_skipped_and_counted(tmp_path):
    records = [
        {"conversations": _turns(("human", "Hi"), ("gpt", "Hello"))},
        {"conversations": _turns(("gpt", "I speak first"), ("human", "Hi"))},
        {"conversations": _turns(("human", "Hi"), ("human", "Anyone?"), ("gpt", "Yes"), ("gpt", "Here"))},
        {"conversations": _turns(("human", "Hi"))},
        {"conversations": _turns(("human", "Hi"), ("system", "late system"), ("gpt", "Hello"))},
        {"conversations": _turns(("human", "Hi"), ("function_call", "{}"), ("observation", "42"), ("gpt", "42"))},
        {"conversations": _turns(("human", "Hi"), ("gpt", "  "))},
        {"conversations": _turns(("human", "Hi"), ("robot", "beep"))},
        {"conversations": []},
        {"conversations": _turns(("system", "Be brief."), ("human", "Hi again"), ("gpt", "Hello again"))},
    ]
    write_json(tmp_path / "chat.json", records)
    register(tmp_path, demo={"file_name": "chat.json", "formatting": "sharegpt"})
    _, conversations, report = conversations_of(tmp_path, "demo")
    assert conversations == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi again"},
         {"role": "assistant", "content": "Hello again"}],
    ]
    # Each reason names the first record it skipped (counted from 1), the turn and role, and the fix.
    assert report.skipped == Counter({
        "broken role order (first: record 2 has 'gpt' (assistant) as turn 1, where the user must speak; fix the "
        "record (turns alternate user, assistant), or, if 'gpt' is the user here, set \"tags\": {\"user_tag\": "
        "\"gpt\", \"assistant_tag\": \"human\"} in the entry 'demo' of dataset_info.json)": 3,
        "a system message after the first turn (first: record 5 has a 'system' turn as turn 2; make it the first "
        "turn or move it to the system column)": 1,
        "tool-call turns (not supported yet) (first: record 6 has a 'function_call' turn (turn 2); leave tool-call "
        "records out)": 1,
        "an empty turn (first: record 7 has an empty 'gpt' turn (turn 2); fill it or leave the record out)": 1,
        "an unknown role (first: record 8 has role 'robot' (turn 2), which its tags do not map; set \"tags\": "
        "{\"user_tag\": \"human\", \"assistant_tag\": \"robot\"} in the entry 'demo' of dataset_info.json)": 1,
        "no messages (first: record 9 has no turns in conversations)": 1,
    })
    assert (report.total, report.kept) == (10, 2)
    assert report.summary().startswith("demo: 2/10 examples (skipped: 3 broken role order (first: record 2 ")


def test_dataset_with_nothing_usable_left_is_an_error(tmp_path):
    records = [{"conversations": _turns(("gpt", "first"))}, {"conversations": _turns(("human", "a"), ("human", "b"))}]
    write_json(tmp_path / "chat.json", records)
    register(tmp_path, demo={"file_name": "chat.json", "formatting": "sharegpt"})
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, "demo")
    assert str(caught.value) == (
        "Dataset 'demo' has no usable examples (2 with broken role order (first: record 1 has 'gpt' (assistant) as "
        "turn 1, where the user must speak; fix the record (turns alternate user, assistant)))."
    )


def test_alpaca_records_without_prompt_or_response_are_skipped(tmp_path):
    records = [*ALPACA[:1], {"instruction": "", "input": "", "output": "x"}, {"instruction": "q", "output": ""}]
    write_json(tmp_path / "a.json", records)
    register(tmp_path, demo={"file_name": "a.json"})
    _, conversations, report = conversations_of(tmp_path, "demo")
    assert len(conversations) == 1
    assert report.skipped == Counter({"an empty prompt (first: record 2 has no text in instruction or input)": 1,
                                      "an empty response (first: record 3 has no text in output)": 1})


@pytest.mark.parametrize(
    ("filename", "content"),
    [("empty.json", "[]"), ("empty.jsonl", "\n\n"), ("empty.csv", "instruction,output\n"), ("blank.csv", "")],
)
def test_empty_dataset(tmp_path, filename, content):
    (tmp_path / filename).write_text(content, encoding="utf-8")
    register(tmp_path, demo={"file_name": filename})
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, "demo")
    assert str(caught.value) == f"Dataset 'demo' ({tmp_path / filename}) is empty."


def test_identity_placeholders_are_filled_from_the_config(tmp_path):
    _, conversations, _ = conversations_of(
        tmp_path, "identity", dataset_dir=str(REPO / "data"), identity_name="Ember", identity_author="Hearthstone Labs"
    )
    assert conversations[0] == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Ember, an AI assistant developed by Hearthstone Labs. How can I help "
                                         "you today?"},
    ]
    assert not any("{{" in m["content"] for c in conversations for m in c)


def test_alpaca_system_and_history_columns(tmp_path):
    record = {"instruction": "And 3 + 3?", "input": "", "output": "6", "system": "You are a calculator.",
              "history": [["1 + 1?", "2"], ["2 + 2?", "4"]]}
    write_json(tmp_path / "a.json", [record])
    register(tmp_path, demo={"file_name": "a.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}})
    expected = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"},
    ]
    assert conversations_of(tmp_path, "demo")[1] == [expected]
    # The same file given as a path: system and history are detected too.
    spec, conversations, _ = conversations_of(tmp_path, str(tmp_path / "a.json"))
    assert spec.detected == "alpaca (instruction/input/output/history)"
    assert conversations == [expected]


def test_malformed_history_turn_is_skipped(tmp_path):
    write_json(tmp_path / "a.json", [*ALPACA[:1], {"instruction": "q", "output": "a", "history": [["only one"]]}])
    register(tmp_path, demo={"file_name": "a.json", "columns": {"history": "history"}})
    _, conversations, report = conversations_of(tmp_path, "demo")
    assert len(conversations) == 1
    assert report.skipped == Counter({"a malformed history turn (first: record 2 has history turn 1 that is not a "
                                      "[prompt, reply] pair; write each history turn as a [prompt, reply] pair)": 1})


def test_ranking_dataset_is_refused_for_sft(tmp_path):
    write_json(tmp_path / "pairs.json", [{"instruction": "q", "chosen": "good", "rejected": "bad"}])
    register(tmp_path, demo={"file_name": "pairs.json", "ranking": True,
                             "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}})
    with pytest.raises(FtkitError) as caught:
        conversations_of(tmp_path, "demo")
    assert str(caught.value) == (
        "Dataset 'demo' is a preference dataset (ranking: true, chosen/rejected pairs); stage sft trains on plain "
        "conversations and ftkit has no preference stage (DPO, KTO) yet; use a dataset without ranking."
    )


@pytest.mark.parametrize("name", ["identity", "alpaca_en_demo", "sharegpt_demo", "openai_demo", "pt_demo"])
def test_shipped_datasets_convert_completely(tmp_path, name):
    stage = "pt" if name == "pt_demo" else "sft"
    _, conversations, report = conversations_of(tmp_path, name, dataset_dir=str(REPO / "data"), stage=stage)
    assert report.kept == report.total == len(conversations) > 0
    assert not report.skipped


# ---- mixing and the validation split -------------------------------------------------------------------

A = [f"a{i}" for i in range(5)]
B = [f"b{i}" for i in range(20)]


def test_concat_keeps_every_example_in_order():
    assert mix_datasets([A, B], "concat", None, seed=1) == A + B


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
def test_interleave_is_deterministic_for_a_seed(strategy):
    first = mix_datasets([A, B], strategy, [0.5, 0.5], seed=7)
    assert first == mix_datasets([A, B], strategy, [0.5, 0.5], seed=7)
    assert first != mix_datasets([A, B], strategy, [0.5, 0.5], seed=8)
    assert {x[0] for x in first} == {"a", "b"}


def test_interleave_under_stops_when_a_dataset_runs_out():
    for seed in range(20):
        mixed = mix_datasets([A, B], "interleave_under", None, seed)
        assert len(mixed) == len(set(mixed))  # nothing repeated
        assert set(A) <= set(mixed) or set(B) <= set(mixed)  # one dataset was used up


def test_interleave_over_sees_every_example_and_stops_then():
    for seed in range(20):
        mixed = mix_datasets([A, B], "interleave_over", None, seed)
        assert set(mixed) == set(A) | set(B)
        # It stops at the example that completes the last dataset: dropping it leaves one unseen.
        assert set(mixed[:-1]) != set(A) | set(B)


def test_interleave_weight_zero_and_empty_datasets_take_no_part():
    assert sorted(mix_datasets([A, B], "interleave_over", [1.0, 0.0], seed=0)) == A
    assert set(mix_datasets([A, [], B], "interleave_over", None, seed=0)) == set(A) | set(B)


def test_validation_split_by_fraction_and_by_count():
    examples = list(range(100))
    train, held_out = split_validation(examples, 0.1, seed=3)
    assert (len(train), len(held_out)) == (90, 10)
    assert sorted(train + held_out) == examples
    assert train == sorted(train)  # order is kept
    assert split_validation(examples, 0.1, seed=3) == (train, held_out)
    assert split_validation(examples, 0.1, seed=4)[1] != held_out
    assert len(split_validation(examples, 7, seed=3)[1]) == 7
    assert split_validation(examples, 0.0, seed=3) == (examples, [])


def test_validation_split_that_leaves_nothing_to_train_on():
    with pytest.raises(FtkitError) as caught:
        split_validation(list(range(5)), 5, seed=0)
    assert str(caught.value) == "val_size 5 would leave no training example out of 5; lower it."


def test_spec_fingerprint_ignores_the_display_name():
    one = DatasetSpec(name="a", source="file", location="x.json")
    other = DatasetSpec(name="b", source="file", location="x.json", detected="alpaca")
    assert one.fingerprint() == other.fingerprint()
