"""Every dataset format becomes one thing: a conversation, a list of ``{"role", "content"}`` messages.

Roles are ``system`` (optional, first), then ``user`` and ``assistant`` alternating, ending with
``assistant``. Records that cannot be read that way (broken role order, empty replies, tool-call turns)
are skipped and counted by reason; a dataset with nothing left is an error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ftkit.data.registry import DatasetSpec
from ftkit.errors import FtkitError

Message = dict[str, str]
Conversation = list[Message]


@dataclass
class ConversionReport:
    """How many records of one dataset became conversations, and why the others did not."""

    dataset: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{self.dataset}: {self.kept}/{self.total} examples" + (f" (skipped: {reasons})" if reasons else "")


class _Skip(Exception):
    """A record that cannot become a conversation; the message is the counted reason."""


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
    for record in records:
        try:
            messages = convert(record, spec, require_response)
        except _Skip as skip:
            report.skipped[str(skip)] += 1
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
    if value is None:
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
    for turn in history or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise _Skip("a malformed history turn")
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    prompt = _text(record.get(spec.columns["prompt"]))
    query = _column_text(record, spec, "query")
    user = "\n".join(part for part in (prompt, query) if part)
    response_column = spec.column("response")
    response = _text(record.get(response_column)) if response_column else ""
    if not user.strip():
        raise _Skip("an empty prompt")
    if not response.strip():
        if require_response:
            raise _Skip("an empty response")
        return messages + [{"role": "user", "content": user}]  # raw text for pre-training
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def _sharegpt_record(record: dict[str, Any], spec: DatasetSpec, require_response: bool) -> Conversation:
    turns = record.get(spec.columns["messages"])
    if not isinstance(turns, list) or not turns:
        raise _Skip("no messages")
    tags = spec.tags
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
               tags["observation_tag"]: "tool", tags["function_tag"]: "tool"}
    messages: Conversation = []
    system = _column_text(record, spec, "system").strip()
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Skip("a malformed turn")
        role = role_of.get(turn.get(tags["role_tag"]))
        content = _text(turn.get(tags["content_tag"]))
        if role is None:
            raise _Skip("an unknown role")
        if role == "tool":
            raise _Skip("tool-call turns (not supported yet)")
        if role == "system":
            if index != 0:
                raise _Skip("a system message after the first turn")
            system = system or content.strip()
            continue
        messages.append({"role": role, "content": content})
    if not messages or len(messages) % 2 and require_response:
        raise _Skip("broken role order")
    for index, message in enumerate(messages):
        if message["role"] != ("user" if index % 2 == 0 else "assistant"):
            raise _Skip("broken role order")
        if not message["content"].strip():
            raise _Skip("an empty turn")
    return ([{"role": "system", "content": system}] if system else []) + messages


def conversation_text(conversation: Conversation) -> str:
    """Raw text of a conversation for pre-training: its contents joined by blank lines."""
    return "\n\n".join(m["content"] for m in conversation if m["role"] != "system")
