"""From a config to token ids: resolve, read, normalise, encode (cached), mix, split and pack.

``prepare_dataset`` is the one entry point train and ``ftkit data preview`` share (evaluate will
reuse it for custom datasets); it reads ``DataOptions``, not a whole stage config. The forgetting guard
(``ftkit.guard``) stands on it and hands in what it decides: system-prompt ``variants`` (any
``ConversationVariants``) and replay conversations; data knows nothing of models or generation. The tokenised form of each dataset is cached under
``$FTKIT_HOME/datasets`` keyed on everything that changes the ids: the tokenizer's vocabulary and
special tokens, the chat template, the stage, cutoff_len, the masking options, the placeholders, the
registry entry and the bytes of the data files. A cache reused across tokenizers would silently train
on wrong ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from ftkit.data.encoding import EncodedExample, encode_pretrain_text, encode_supervised_example
from ftkit.data.formats import Conversation, ConversionReport, conversation_text, records_to_conversations
from ftkit.data.options import DataOptions
from ftkit.data.packing import pack_examples
from ftkit.data.readers import content_digest, read_records
from ftkit.data.registry import DatasetSpec, detect_format, resolve_dataset
from ftkit.errors import FtkitError
from ftkit.paths import ftkit_home

T = TypeVar("T")

CACHE_VERSION = 2  # bump when reading or encoding changes in a way the key does not capture (2: csv/NaN reading)


@dataclass
class DatasetStats:
    """What happened to one dataset on its way to token ids."""

    name: str
    conversion: ConversionReport
    encoded: int = 0
    truncated: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    from_cache: bool = False
    detected_format: str | None = None

    def summary(self) -> str:
        parts = [self.conversion.summary()]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to cutoff_len")
        if self.dropped_no_trained_tokens:
            parts.append(f"{self.dropped_no_trained_tokens} dropped with no trained token left")
        parts.append(f"{self.tokens:,} tokens, {self.trained_tokens:,} trained")
        return ", ".join(parts) + (" [cached]" if self.from_cache else "")


@dataclass
class PreparedData:
    """Training (and optional evaluation) examples ready for a collator."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: list[DatasetStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    packed: bool = False
    replay_examples: int = 0
    system_prompt_variants: bool = False

    @property
    def train_tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.train)


@dataclass
class EncodedData:
    """The user's datasets encoded, mixed and split: what replay is planned from, before it is mixed in."""

    train: list[EncodedExample]
    held_out: list[EncodedExample]
    stats: list[DatasetStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReplaySet:
    """Conversations mixed into the training set only (never held out), under their own name in the stats."""

    name: str
    conversations: list[Conversation]


class ConversationVariants(Protocol):
    """A seeded rewrite of a dataset's conversations before encoding (the guard's system-prompt variants)."""

    def key(self, name: str) -> str:
        """What identifies the rewrite of dataset ``name`` in the cache key."""
        ...

    def apply(self, conversations: list[Conversation], name: str) -> list[Conversation]:
        """The rewritten conversations of dataset ``name``."""
        ...


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that decides ids: vocabulary, merges, special tokens, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(
        [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template,
         tokenizer.all_special_tokens, type(tokenizer).__name__], default=str).encode())
    return digest.hexdigest()


def _cache_key(spec: DatasetSpec, options: DataOptions, tokenizer_digest: str, variants_key: str | None) -> str:
    payload = {
        "version": CACHE_VERSION, "tokenizer": tokenizer_digest, "stage": options.stage,
        "cutoff_len": options.cutoff_len, "train_on_prompt": options.train_on_prompt,
        "mask_history": options.mask_history, "default_system": options.default_system,
        "replacements": options.replacements, "spec": spec.fingerprint(), "data": content_digest(spec),
        "max_samples": options.max_samples, "system_prompt_variants": variants_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_cache(path: Path, examples: list[EncodedExample], stats: DatasetStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int64, count=int(lengths.sum()))
    meta = {k: v for k, v in stats.__dict__.items() if k not in ("conversion", "from_cache")}
    meta["conversion"] = {"total": stats.conversion.total, "kept": stats.conversion.kept,
                          "skipped": dict(stats.conversion.skipped)}
    # A unique temporary name: two runs preparing the same dataset must not write into one file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, labels=labels, lengths=lengths, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_cache(path: Path, name: str) -> tuple[list[EncodedExample], DatasetStats] | None:
    """The cached examples and stats, or None when there is no cache file or it is damaged in any way."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            ids, labels, lengths = data["ids"].tolist(), data["labels"].tolist(), data["lengths"].tolist()
            meta = json.loads(str(data["meta"]))
        if len(ids) != sum(lengths) or len(labels) != len(ids) or min(lengths, default=1) < 1:
            return None
        conversion = meta.pop("conversion")
        report = ConversionReport(dataset=name, total=conversion["total"], kept=conversion["kept"],
                                  skipped=Counter(conversion["skipped"]))
        meta["name"] = name
        stats = DatasetStats(conversion=report, from_cache=True, **meta)
    except Exception:  # a truncated zip, a bad CRC, missing keys, old metadata: rebuild, never trust it
        return None
    if stats.encoded != len(lengths):
        return None
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    starts = [0, *ends[:-1]]
    examples = [EncodedExample(input_ids=ids[a:b], labels=labels[a:b]) for a, b in zip(starts, ends, strict=True)]
    return examples, stats


def _with_default_system(conversation: Conversation, system: str | None) -> Conversation:
    if system and conversation[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conversation]
    return conversation


def read_conversations(spec: DatasetSpec, options: DataOptions) -> tuple[list[Conversation], ConversionReport]:
    """The front half of a dataset: read its records, detect the format of a path, normalise to conversations.

    Uses ``max_samples``, ``stage`` (pre-training accepts records with no response) and the identity
    placeholders. For a dataset given as a path, ``spec.detected`` says what was detected.
    """
    records = read_records(spec, options.max_samples)
    if spec.given_as_path and records:
        detect_format(spec, records[0])
    return records_to_conversations(
        records, spec, replacements=options.replacements, require_response=options.stage != "pt"
    )


def training_conversations(options: DataOptions) -> list[Conversation]:
    """The training datasets' conversations as they are trained: read, normalised, ``default_system`` added."""
    conversations: list[Conversation] = []
    for name in options.dataset:
        read, _ = read_conversations(resolve_dataset(name, options.dataset_dir), options)
        conversations.extend(_with_default_system(c, options.default_system) for c in read)
    return conversations


def count_conversations(options: DataOptions) -> int:
    """How many usable conversations the training datasets hold (read and normalised, not encoded)."""
    return sum(read_conversations(resolve_dataset(name, options.dataset_dir), options)[1].kept
               for name in options.dataset)


def encode_dataset(name: str, options: DataOptions, tokenizer: Any, *, use_cache: bool = True,
                   variants: ConversationVariants | None = None) -> tuple[list[EncodedExample], DatasetStats]:
    """Read, normalise and encode one dataset (registry name or path), through the cache.

    ``variants`` rewrites each sft conversation first (the guard's system-prompt variants).
    """
    spec = resolve_dataset(name, options.dataset_dir)
    variants = variants if options.stage == "sft" else None
    variants_key = variants.key(name) if variants is not None else None
    key = _cache_key(spec, options, tokenizer_fingerprint(tokenizer), variants_key)
    cache_file = ftkit_home() / "datasets" / f"{key}.npz"
    if use_cache and not options.overwrite_cache:
        cached = _load_cache(cache_file, name)
        if cached is not None:
            return cached
    conversations, report = read_conversations(spec, options)
    stats = DatasetStats(name=name, conversion=report, detected_format=spec.detected)
    examples = encode_conversations(conversations, options, tokenizer, stats, variants=variants, name=name)
    if use_cache:
        _save_cache(cache_file, examples, stats)
    return examples, stats


def encode_conversations(conversations: list[Conversation], options: DataOptions, tokenizer: Any,
                         stats: DatasetStats, *, variants: ConversationVariants | None = None,
                         name: str = "") -> list[EncodedExample]:
    """Encode conversations with the template options, counting what happened in ``stats``.

    sft conversations get ``default_system`` where they have no system prompt, then ``variants`` (as the
    conversations of dataset ``name``).
    """
    pretraining = options.stage == "pt"
    if not pretraining:
        conversations = [_with_default_system(c, options.default_system) for c in conversations]
        if variants is not None:
            conversations = variants.apply(conversations, name)
    examples: list[EncodedExample] = []
    for conversation in conversations:
        if pretraining:
            pieces = encode_pretrain_text(tokenizer, conversation_text(conversation), cutoff_len=options.cutoff_len)
        else:
            encoded = encode_supervised_example(
                tokenizer, conversation, cutoff_len=options.cutoff_len,
                train_on_prompt=options.train_on_prompt, mask_history=options.mask_history,
            )
            if encoded is None:
                stats.dropped_no_trained_tokens += 1
                continue
            stats.truncated += int(getattr(encoded, "truncated", False))
            pieces = [encoded]
        examples.extend(pieces)
    stats.encoded = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.trained_tokens = sum(sum(1 for t in e.labels if t != -100) for e in examples)
    return examples


def mix_datasets(per_dataset: list[list[T]], strategy: str, probs: list[float] | None, seed: int) -> list[T]:
    """Combine datasets like ``datasets.interleave_datasets``; deterministic for a given seed.

    ``concat`` keeps every example in order. The interleave strategies draw a dataset by weight, then its
    next example (each dataset shuffled, reshuffled when it starts over): ``interleave_under`` stops as
    soon as a dataset runs out (undersampling, HF's ``first_exhausted``); ``interleave_over`` starts a
    dataset that ran out over again and stops once every dataset has been seen whole at least once
    (oversampling, HF's ``all_exhausted``). Datasets with no examples or weight 0 take no part.
    """
    if strategy == "concat" or len(per_dataset) == 1:
        return [e for examples in per_dataset for e in examples]
    weights = probs or [1.0] * len(per_dataset)
    members = [i for i, examples in enumerate(per_dataset) if examples and weights[i] > 0]
    if not members:
        return []
    rng = random.Random(seed)
    queues = {i: rng.sample(per_dataset[i], len(per_dataset[i])) for i in members}
    positions = dict.fromkeys(members, 0)
    unfinished = set(members)  # datasets not yet seen whole
    mixed: list[T] = []
    while True:
        index = rng.choices(members, weights=[weights[i] for i in members])[0]
        queue = queues[index]
        if positions[index] == len(queue):
            if strategy == "interleave_under":
                return mixed
            rng.shuffle(queue)
            positions[index] = 0
        mixed.append(queue[positions[index]])
        positions[index] += 1
        if positions[index] == len(queue):
            unfinished.discard(index)
            if strategy == "interleave_over" and not unfinished:
                return mixed


def split_validation(examples: list[T], val_size: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``val_size`` (a fraction below 1, or a count) of the examples, chosen by ``seed``; order is kept."""
    if not val_size:
        return examples, []
    count = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if count >= len(examples):
        raise FtkitError(f"val_size {val_size} would leave no training example out of {len(examples)}; lower it.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def _rows(examples: list[EncodedExample], *, pack: bool, cutoff_len: int, seed: int) -> list[dict[str, list[int]]]:
    if pack:
        return [{"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids}
                for r in pack_examples(examples, cutoff_len, seed)]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def encode_datasets(options: DataOptions, tokenizer: Any, *, variants: ConversationVariants | None = None,
                    use_cache: bool = True) -> EncodedData:
    """The training datasets encoded (with ``variants``), mixed and split, and the eval datasets encoded."""
    per_dataset: list[list[EncodedExample]] = []
    stats: list[DatasetStats] = []
    notes: list[str] = []
    for name in options.dataset:
        examples, dataset_stats = encode_dataset(name, options, tokenizer, use_cache=use_cache, variants=variants)
        if dataset_stats.detected_format:
            notes.append(f"dataset {name}: detected {dataset_stats.detected_format} format")
        per_dataset.append(examples)
        stats.append(dataset_stats)
    train = mix_datasets(per_dataset, options.mix_strategy, list(options.interleave_probs or []) or None, options.seed)
    if not train:
        raise FtkitError(f"dataset {', '.join(options.dataset)} leaves no usable example after encoding with "
                         f"cutoff_len {options.cutoff_len}; raise cutoff_len or check the data.")
    train, held_out = split_validation(train, options.val_size, options.seed)
    for name in options.eval_dataset:
        examples, dataset_stats = encode_dataset(name, options, tokenizer, use_cache=use_cache)
        held_out.extend(examples)
        stats.append(dataset_stats)
    return EncodedData(train, held_out, stats, notes)


def prepare_dataset(options: DataOptions, tokenizer: Any, *, variants: ConversationVariants | None = None,
                    replay: ReplaySet | None = None, encoded: EncodedData | None = None,
                    use_cache: bool = True) -> PreparedData:
    """Everything the trainer needs: the datasets (``encoded`` if already done) plus ``replay``, in rows.

    Replay conversations join the training rows only (with the same ``variants`` as the datasets, under
    the name ``replay``), after the validation split, so they are never held out.
    """
    encoded = encoded or encode_datasets(options, tokenizer, variants=variants, use_cache=use_cache)
    stats, replayed = list(encoded.stats), []
    if replay is not None:
        replay_stats = DatasetStats(name=replay.name, conversion=ConversionReport(
            dataset=replay.name, total=len(replay.conversations), kept=len(replay.conversations)))
        replayed = encode_conversations(replay.conversations, options, tokenizer, replay_stats, variants=variants,
                                        name="replay")
        stats.append(replay_stats)
    return PreparedData(
        train=_rows(encoded.train + replayed, pack=options.packing, cutoff_len=options.cutoff_len, seed=options.seed),
        eval=_rows(encoded.held_out, pack=False, cutoff_len=options.cutoff_len, seed=options.seed),
        stats=stats, notes=list(encoded.notes), packed=options.packing, replay_examples=len(replayed),
        system_prompt_variants=variants is not None and options.stage == "sft",
    )
