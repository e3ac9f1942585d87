"""Every dataset format becomes one thing: a conversation, a list of ``{"role", "content"}`` messages.

Roles are ``system`` (optional, first), then ``user`` and ``assistant`` alternating, ending with
``assistant``. Records that cannot be read that way (broken role order, unknown roles, empty replies,
tool-call turns, a record of another format) are skipped and counted by reason; each reason names the
first record it skipped (counted from 1 in file order, across a folder's files) and, where one exists,
the fix: for roles the dataset's registry entry does not map, the ``tags`` that would map them. A
dataset with nothing left is an error. A missing value (None, or a float NaN from a JSON ``NaN`` or an empty Parquet/Arrow cell) is
empty text, never the text "nan".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ftkit.data.registry import DatasetSpec
from ftkit.errors import FtkitError

Message = dict[str, str]
Conversation = list[Message]

# The keys that give a record's format away (the default columns of each format).
_FORMAT_KEYS = {"alpaca": ("instruction", "input", "output"), "sharegpt": ("conversations",), "openai": ("messages",)}
_USUAL_ROLE_KEYS = ("role", "from", "speaker", "author")
_USUAL_CONTENT_KEYS = ("content", "value", "text", "message")


@dataclass
class ConversionReport:
    """How many records of one dataset became conversations, and why the others did not.

    ``skipped`` counts records by reason; a reason's key names the first record skipped for it.
    """

    dataset: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    _first: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def skip(self, number: int, reason: str, detail: str) -> None:
        """Count record ``number`` (from 1) as skipped for ``reason``; ``detail`` completes "record N ..."."""
        key = self._first.setdefault(reason, f"{reason} (first: record {number} {detail})")
        self.skipped[key] += 1

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{self.dataset}: {self.kept}/{self.total} examples" + (f" (skipped: {reasons})" if reasons else "")


class _Skip(Exception):
    """A record that cannot become a conversation: the counted ``reason`` and what is wrong with this record."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def fill_placeholders(text: str, replacements: dict[str, str]) -> str:
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def records_to_conversations(
    records: list[dict[str, Any]],
    spec: DatasetSpec,
    *,
    replacements: dict[str, str] | None = None,
    require_response: bool = True,
) -> tuple[list[Conversation], ConversionReport]:
    """Normalise raw records of any supported format into conversations.

    ``require_response=False`` (pre-training) also accepts records with only a prompt/text column.
    """
    if spec.ranking:
        stage = "sft" if require_response else "pt"
        raise FtkitError(f"Dataset '{spec.name}' is a preference dataset (ranking: true, chosen/rejected pairs); "
                         f"stage {stage} trains on plain conversations and ftkit has no preference stage (DPO, KTO) "
                         "yet; use a dataset without ranking.")
    _check_columns(records, spec, require_response)
    convert = _alpaca_record if spec.formatting == "alpaca" else _sharegpt_record
    report = ConversionReport(dataset=spec.name, total=len(records))
    conversations: list[Conversation] = []
    for number, record in enumerate(records, start=1):
        try:
            messages = convert(record, spec, require_response)
        except _Skip as skip:
            report.skip(number, skip.reason, skip.detail)
            continue
        if replacements:
            messages = [{**m, "content": fill_placeholders(m["content"], replacements)} for m in messages]
        conversations.append(messages)
    report.kept = len(conversations)
    if not conversations:
        reasons = "; ".join(f"{n} with {reason}" for reason, n in report.skipped.most_common()) or "it is empty"
        raise FtkitError(f"Dataset '{spec.name}' has no usable examples ({reasons}).")
    return conversations, report


def _check_columns(records: list[dict[str, Any]], spec: DatasetSpec, require_response: bool) -> None:
    if not records:
        raise FtkitError(f"Dataset '{spec.name}' ({spec.location}) is empty.")
    found = set(records[0])
    required = ["messages"] if spec.formatting != "alpaca" else ["prompt"]
    if spec.formatting == "alpaca" and require_response:
        required.append("response")
    missing = [spec.columns[role] for role in required if spec.columns.get(role) not in found]
    if missing:
        expected = ", ".join(f"{role}={spec.columns.get(role)}" for role in required)
        raise FtkitError(f"Dataset '{spec.name}' ({spec.formatting} format) expects column(s) {expected} but its "
                         f"records have {', '.join(sorted(found))}; fix `columns` in dataset_info.json.")


def _text(value: Any) -> str:
    """A cell as text: a missing value (None or NaN) is empty."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    return value if isinstance(value, str) else str(value)


def _column_text(record: dict[str, Any], spec: DatasetSpec, role: str) -> str:
    """The text in the record's column for ``role`` ('' when the role has no column or the cell is empty)."""
    column = spec.column(role)
    return _text(record.get(column)) if column else ""


def _alpaca_record(record: dict[str, Any], spec: DatasetSpec, require_response: bool) -> Conversation:
    messages: Conversation = []
    system = _column_text(record, spec, "system").strip()
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(spec.column("history")) if spec.column("history") else None
    for number, turn in enumerate(history or [], start=1):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise _Skip("a malformed history turn", f"has history turn {number} that is not a [prompt, reply] pair; "
                        "write each history turn as a [prompt, reply] pair")
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    prompt = _text(record.get(spec.columns["prompt"]))
    query = _column_text(record, spec, "query")
    user = "\n".join(part for part in (prompt, query) if part)
    response_column = spec.column("response")
    response = _text(record.get(response_column)) if response_column else ""
    if not user.strip():
        _check_own_format(record, spec)
        prompt_columns = " or ".join(c for c in (spec.columns["prompt"], spec.column("query")) if c)
        raise _Skip("an empty prompt", f"has no text in {prompt_columns}")
    if not response.strip():
        if require_response:
            raise _Skip("an empty response", f"has no text in {response_column}")
        return messages + [{"role": "user", "content": user}]  # raw text for pre-training
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def _check_own_format(record: dict[str, Any], spec: DatasetSpec) -> None:
    """Skip a record that lacks its dataset's columns but has another format's keys (a mixed file)."""
    for other, keys in _FORMAT_KEYS.items():
        found = [key for key in keys if key in record]
        if other != spec.formatting and found and not (other == "alpaca" and "instruction" not in found):
            article = "an" if spec.formatting[0] in "aeiou" else "a"
            raise _Skip("another format's keys", f"has {other} keys ({', '.join(found)}) in {article} "
                        f"{spec.formatting} dataset; put each format in its own file, registered with its own "
                        "formatting")


def _sharegpt_record(record: dict[str, Any], spec: DatasetSpec, require_response: bool) -> Conversation:
    turns = record.get(spec.columns["messages"])
    if not isinstance(turns, list) or not turns:
        _check_own_format(record, spec)
        raise _Skip("no messages", f"has no turns in {spec.columns['messages']}")
    tags = spec.tags
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
               tags["observation_tag"]: "tool", tags["function_tag"]: "tool"}
    messages: Conversation = []
    spoken: list[tuple[int, str]] = []  # (turn number, role as written) of each message
    system = _column_text(record, spec, "system").strip()
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _Skip("a malformed turn", f"has turn {number} that is not an object with "
                        f"{tags['role_tag']} and {tags['content_tag']}")
        written = turn.get(tags["role_tag"])
        role = role_of.get(written) if isinstance(written, str) else None
        content = _text(turn.get(tags["content_tag"]))
        if role is None:
            found = f"role '{written}'" if written is not None else f"no '{tags['role_tag']}' key"
            raise _Skip("an unknown role", f"has {found} (turn {number}), which its tags do not map; "
                        f"{_tags_fix(turns, spec)}")
        if role == "tool":
            raise _Skip("tool-call turns (not supported yet)", f"has a '{written}' turn (turn {number}); leave "
                        "tool-call records out")
        if role == "system":
            if number != 1:
                raise _Skip("a system message after the first turn", f"has a '{written}' turn as turn {number}; "
                            "make it the first turn or move it to the system column")
            system = system or content.strip()
            continue
        messages.append({"role": role, "content": content})
        spoken.append((number, written))
    _check_role_order(messages, spoken, spec, require_response)
    for message, (number, written) in zip(messages, spoken, strict=True):
        if not message["content"].strip():
            raise _Skip("an empty turn", f"has an empty '{written}' turn (turn {number}); fill it or leave the "
                        "record out")
    return ([{"role": "system", "content": system}] if system else []) + messages


def _check_role_order(messages: Conversation, spoken: list[tuple[int, str]], spec: DatasetSpec,
                      require_response: bool) -> None:
    """Skip a conversation that does not alternate user, assistant (ending with the assistant for sft)."""
    if not messages:
        raise _Skip("broken role order", "has no user or assistant turn; give it a prompt and a reply")
    for index, (message, (number, written)) in enumerate(zip(messages, spoken, strict=True)):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            fix = "fix the record (turns alternate user, assistant)"
            swapped_fits = len(messages) % 2 == 0 or not require_response
            if swapped_fits and all(m["role"] == ("assistant" if i % 2 == 0 else "user")
                                    for i, m in enumerate(messages)):
                tags = spec.tags  # every turn is the other speaker's: the tags may be swapped
                fix += (f", or, if '{tags['assistant_tag']}' is the user here, "
                        + _in_registry(spec, json.dumps({"user_tag": tags["assistant_tag"],
                                                         "assistant_tag": tags["user_tag"]})))
            raise _Skip("broken role order", f"has '{written}' ({message['role']}) as turn {number}, where the "
                        f"{expected} must speak; {fix}")
    if len(messages) % 2 and require_response:
        number, written = spoken[-1]
        raise _Skip("broken role order", f"ends with a '{written}' (user) turn, turn {number}, that has no reply; "
                    "add the reply or drop that turn")


def _in_registry(spec: DatasetSpec, tags: str) -> str:
    """Where a ``tags`` fix goes: the dataset's dataset_info.json entry (a path dataset must be registered)."""
    if spec.given_as_path:
        return (f'register the file in dataset_info.json with "formatting": "{spec.formatting}" and '
                f'"tags": {tags}')
    return f"set \"tags\": {tags} in the entry '{spec.name}' of dataset_info.json"


def _tags_fix(turns: list[Any], spec: DatasetSpec) -> str:
    """The ``tags`` that would map a record's roles: its speakers in order of appearance are user, assistant."""
    tags = spec.tags
    keys = [key for turn in turns if isinstance(turn, dict) for key in turn]
    fix: dict[str, str] = {}
    for tag, usual in (("role_tag", _USUAL_ROLE_KEYS), ("content_tag", _USUAL_CONTENT_KEYS)):
        if tags[tag] not in keys:
            found = next((key for key in usual if key in keys), None)
            if found is None:
                return (f"its turns have keys {', '.join(dict.fromkeys(keys))}; name the role and text keys with "
                        f"role_tag and content_tag: " + _in_registry(spec, '{"role_tag": ..., "content_tag": ...}'))
            fix[tag] = found
    role_key = fix.get("role_tag", tags["role_tag"])
    roles = list(dict.fromkeys(str(t[role_key]) for t in turns if isinstance(t, dict) and t.get(role_key) is not None))
    systems = [r for r in roles if r in (tags["system_tag"], "system")]
    speakers = [r for r in roles if r not in systems and r not in (tags["observation_tag"], tags["function_tag"])]
    if len(speakers) != 2:
        return (f"its roles are {', '.join(roles)}; map them with user_tag, assistant_tag and system_tag: "
                + _in_registry(spec, '{"user_tag": ..., "assistant_tag": ...}'))
    fix.update(user_tag=speakers[0], assistant_tag=speakers[1])
    if systems and systems[0] != tags["system_tag"]:
        fix["system_tag"] = systems[0]
    return _in_registry(spec, json.dumps(fix))


def conversation_text(conversation: Conversation) -> str:
    """Raw text of a conversation for pre-training: its contents joined by blank lines."""
    return "\n\n".join(m["content"] for m in conversation if m["role"] != "system")
