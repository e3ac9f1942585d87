"""From a config to token ids: resolve, read, normalise, encode (cached), mix, split and pack.

``prepare_dataset`` is the one entry point train and ``ftkit data preview`` share (evaluate will
reuse it for custom datasets). The tokenised form of each dataset is cached under
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ftkit.data.encoding import EncodedExample, encode_pretrain_text, encode_supervised_example
from ftkit.data.formats import Conversation, ConversionReport, conversation_text, records_to_conversations
from ftkit.data.packing import pack_examples
from ftkit.data.readers import content_digest, read_records
from ftkit.data.registry import DatasetSpec, detect_format, resolve_dataset
from ftkit.data.replay import ReplayPlan, dataset_replay, guard_applies, plan_replay
from ftkit.data.system_prompts import vary_system_prompts
from ftkit.errors import FtkitError
from ftkit.paths import ftkit_home

T = TypeVar("T")

CACHE_VERSION = 1  # bump when encoding changes in a way the key does not capture


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
    replay_plan: ReplayPlan | None = None
    system_prompt_variants: bool = False

    @property
    def train_tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.train)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that decides ids: vocabulary, merges, special tokens, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(
        [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template,
         tokenizer.all_special_tokens, type(tokenizer).__name__], default=str).encode())
    return digest.hexdigest()


def _cache_key(spec: DatasetSpec, config: Any, tokenizer_digest: str, replacements: dict[str, str],
               variants_seed: str | None) -> str:
    payload = {
        "version": CACHE_VERSION, "tokenizer": tokenizer_digest, "stage": config.stage,
        "cutoff_len": config.cutoff_len, "train_on_prompt": config.train_on_prompt,
        "mask_history": config.mask_history, "default_system": config.default_system,
        "replacements": replacements, "spec": spec.fingerprint(), "data": content_digest(spec),
        "max_samples": config.max_samples, "system_prompt_variants": variants_seed,
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


def identity_replacements(config: Any) -> dict[str, str]:
    """The placeholders identity-style datasets contain and what the config fills them with."""
    return {"{{name}}": config.identity_name, "{{author}}": config.identity_author}


def read_conversations(spec: DatasetSpec, config: Any) -> tuple[list[Conversation], ConversionReport]:
    """The front half of a dataset: read its records, detect the format of a path, normalise to conversations.

    Uses ``max_samples``, ``stage`` (pre-training accepts records with no response) and the identity
    placeholders from ``config``. For a dataset given as a path, ``spec.detected`` says what was detected.
    """
    records = read_records(spec, config.max_samples)
    if spec.given_as_path and records:
        detect_format(spec, records[0])
    return records_to_conversations(
        records, spec, replacements=identity_replacements(config), require_response=config.stage != "pt"
    )


def _variants_seed(config: Any, name: str, vary_system: bool) -> str | None:
    return f"{config.seed}:{name}" if vary_system and config.stage == "sft" else None


def encode_dataset(name: str, config: Any, tokenizer: Any, *, use_cache: bool = True, vary_system: bool = False
                   ) -> tuple[list[EncodedExample], DatasetStats]:
    """Read, normalise and encode one dataset (registry name or path), through the cache.

    ``vary_system`` trains each sft conversation in one of its system-prompt variants (see
    ``ftkit.data.system_prompts``).
    """
    spec = resolve_dataset(name, config.dataset_dir)
    replacements = identity_replacements(config)
    variants_seed = _variants_seed(config, name, vary_system)
    key = _cache_key(spec, config, tokenizer_fingerprint(tokenizer), replacements, variants_seed)
    cache_file = ftkit_home() / "datasets" / f"{key}.npz"
    if use_cache and not config.overwrite_cache:
        cached = _load_cache(cache_file, name)
        if cached is not None:
            return cached
    conversations, report = read_conversations(spec, config)
    stats = DatasetStats(name=name, conversion=report, detected_format=spec.detected)
    examples = encode_conversations(conversations, config, tokenizer, stats, variants_seed=variants_seed)
    if use_cache:
        _save_cache(cache_file, examples, stats)
    return examples, stats


def encode_conversations(conversations: list[Conversation], config: Any, tokenizer: Any, stats: DatasetStats, *,
                         variants_seed: str | None = None) -> list[EncodedExample]:
    """Encode conversations with the config's template options, counting what happened in ``stats``."""
    pretraining = config.stage == "pt"
    if not pretraining:
        conversations = [_with_default_system(c, config.default_system) for c in conversations]
    if variants_seed is not None and not pretraining:
        conversations = vary_system_prompts(conversations, variants_seed)
    examples: list[EncodedExample] = []
    for conversation in conversations:
        if pretraining:
            pieces = encode_pretrain_text(tokenizer, conversation_text(conversation), cutoff_len=config.cutoff_len)
        else:
            encoded = encode_supervised_example(
                tokenizer, conversation, cutoff_len=config.cutoff_len,
                train_on_prompt=config.train_on_prompt, mask_history=config.mask_history,
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


ReplayAnswers = Callable[[int], tuple[list[Conversation], str]]  # count -> self-replay conversations, how obtained


def _encode_datasets(config: Any, tokenizer: Any, use_cache: bool, vary_system: bool
                     ) -> tuple[list[list[EncodedExample]], list[DatasetStats], list[str]]:
    per_dataset: list[list[EncodedExample]] = []
    stats: list[DatasetStats] = []
    notes: list[str] = []
    for name in config.dataset:
        examples, dataset_stats = encode_dataset(name, config, tokenizer, use_cache=use_cache, vary_system=vary_system)
        if dataset_stats.detected_format:
            notes.append(f"dataset {name}: detected {dataset_stats.detected_format} format")
        per_dataset.append(examples)
        stats.append(dataset_stats)
    return per_dataset, stats, notes


def replay_conversations(config: Any, plan: ReplayPlan, self_replay: ReplayAnswers | None
                         ) -> tuple[list[Conversation], str | None]:
    """The replay conversations ``plan`` asks for: self answers through ``self_replay``, or a dataset's."""
    if plan.is_self:
        if self_replay is None:
            raise ValueError("replay_source self needs a self_replay function that can generate answers")
        return self_replay(plan.count)
    conversations, _ = read_conversations(resolve_dataset(plan.source, config.dataset_dir), config)
    return dataset_replay(plan.count, conversations, config.seed), None


def prepare_dataset(config: Any, tokenizer: Any, *, use_cache: bool = True,
                    self_replay: ReplayAnswers | None = None) -> PreparedData:
    """Everything the trainer needs from the data section of a TrainConfig.

    On a small sft set the forgetting guard adds replay examples (``self_replay`` generates the base
    model's answers when ``replay_source`` is self) and trains system-prompt variants; see
    ``ftkit.data.replay`` and ``ftkit.data.system_prompts``.
    """
    vary = bool(config.system_prompt_variants) and config.stage == "sft"
    per_dataset, stats, notes = _encode_datasets(config, tokenizer, use_cache, vary)
    automatic_variants = config.system_prompt_variants is None and guard_applies(config, sum(map(len, per_dataset)))
    if automatic_variants:
        vary = True
        per_dataset, stats, notes = _encode_datasets(config, tokenizer, use_cache, vary)
    train = mix_datasets(per_dataset, config.mix_strategy, config.interleave_probs, config.seed)
    if not train:
        raise FtkitError(f"dataset {', '.join(config.dataset)} leaves no usable example after encoding with "
                         f"cutoff_len {config.cutoff_len}; raise cutoff_len or check the data.")
    train, held_out = split_validation(train, config.val_size, config.seed)
    for name in config.eval_dataset or []:
        examples, dataset_stats = encode_dataset(name, config, tokenizer, use_cache=use_cache)
        held_out.extend(examples)
        stats.append(dataset_stats)
    if automatic_variants:
        notes.append("system prompts: each example trains with its system prompt kept or swapped (in or out) by a "
                     "seeded coin, so it works with and without one; system_prompt_variants: false turns it off")
    plan = plan_replay(config, len(train))
    replay: list[EncodedExample] = []
    if plan is not None:
        conversations, how = replay_conversations(config, plan, self_replay)
        replay_stats = DatasetStats(name=f"replay ({plan.source})", conversion=ConversionReport(
            dataset=f"replay ({plan.source})", total=len(conversations), kept=len(conversations)))
        replay = encode_conversations(conversations, config, tokenizer, replay_stats,
                                      variants_seed=f"{config.seed}:replay" if vary else None)
        stats.append(replay_stats)
        notes.append(plan.notice(len(replay)) + (f"; {how}" if how else ""))
    pack = config.uses_packing
    return PreparedData(
        train=_rows(train + replay, pack=pack, cutoff_len=config.cutoff_len, seed=config.seed),
        eval=_rows(held_out, pack=False, cutoff_len=config.cutoff_len, seed=config.seed),
        stats=stats, notes=notes, packed=pack, replay_examples=len(replay), replay_plan=plan,
        system_prompt_variants=vary,
    )
