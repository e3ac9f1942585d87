"""Packing, batch collation and padding statistics.

Packing puts several whole examples into one row of at most ``cutoff_len`` tokens (best-fit decreasing, no
example split). Examples in a row must not see each other: each example's ``position_ids`` restart at 0,
and transformers (``masking_utils.find_packed_sequence_indices``) turns those resets into a block-diagonal
causal mask for eager and sdpa attention, and into varlen boundaries for flash attention. transformers
(5.x) does that only when the forward pass has *no* ``attention_mask`` and *no* KV cache: so batches of
packed rows never carry an attention mask, and the model must be called with ``use_cache=False`` (with
the default ``config.use_cache=True`` a forward pass, even in training mode, creates a cache and the
examples silently attend to each other). The trainer passes ``use_cache=False``; the batch does not carry
it, so that ``model(**batch, use_cache=False)`` stays valid.

Labels shift by one inside the model (the logits at position t are scored against the label at t + 1), so
the last token of one example would be trained to predict the first token of the next. Each example's
first label is therefore ``IGNORE_INDEX`` in a packed row; it was never trained in the example alone either
(nothing precedes it), so a packed row's loss is exactly the sum of its examples' losses.

We wrote the collator rather than use transformers' ``DataCollatorForSeq2Seq``/``DataCollatorWithFlattening``
because one class has to cover plain padding, packed rows and padding-free batches with the rules above.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ftkit.data.encoding import IGNORE_INDEX, EncodedExample
from ftkit.errors import FtkitError

Feature = Mapping[str, Sequence[int]]


@dataclass
class PackedRow:
    """Several whole examples in one row; ``position_ids`` restart at 0 where each example starts."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_features(self) -> dict[str, list[int]]:
        """The row as collator input (``lengths`` is bookkeeping the model does not need)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids}


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by length into bins of at most ``capacity``; deterministic.

    Items are placed longest first, each into the fullest bin it still fits (ties: the earliest bin).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"an example of {length} tokens does not fit in rows of {capacity}")
        slot = bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            room, bin_index = capacity, len(bins) - 1
        else:
            room, bin_index = free.pop(slot)
            bins[bin_index].append(index)
        if room - length > 0:
            insort(free, (room - length, bin_index))
    return bins


def pack_examples(examples: Sequence[EncodedExample], cutoff_len: int, seed: int) -> list[PackedRow]:
    """Pack whole examples into rows of at most ``cutoff_len`` tokens; rows come out in a seeded order.

    The bins are filled longest first, so without the shuffle the rows would be sorted by how full they are.
    """
    bins = best_fit_decreasing([len(example) for example in examples], cutoff_len)
    rows = [_pack_row([examples[i] for i in members]) for members in bins]
    random.Random(seed).shuffle(rows)
    return rows


def _pack_row(members: list[EncodedExample]) -> PackedRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in members:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        position_ids += range(len(example))
    return PackedRow(input_ids, labels, position_ids, [len(example) for example in members])


class SupervisedCollator:
    """Turn a list of features (``input_ids``, ``labels``, optional ``position_ids``) into a batch.

    ``padding_free=False``: right-pad every row to the longest (rounded up to ``pad_to_multiple_of``) with
    the pad id, labels ``IGNORE_INDEX`` and ``attention_mask`` 0 on padding. Packed rows (features with
    ``position_ids``) get no ``attention_mask`` (see the module docstring); their padding continues the
    positions of the row's last example, which it follows, so no real token can attend to it.

    ``padding_free=True``: the whole batch becomes one row (batch size 1) with positions restarting per
    feature and each feature's first label ignored, like transformers' ``DataCollatorWithFlattening``: no
    padding at all. Best with flash attention; eager/sdpa build a mask over the whole row.

    Call the model with ``use_cache=False`` (see the module docstring). The batch holds only tensors a
    causal LM's ``forward`` accepts; ``count_real_tokens`` counts the real tokens.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        padding_free: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """Pad with ``pad_token_id`` if given, else the tokenizer's pad id (its eos id when it has none)."""
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise FtkitError("The tokenizer has neither a pad nor an eos token; set `pad_token` in its config.")
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        return self._flatten(features) if self.padding_free else self._pad(features)

    def _flatten(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for feature in features:
            input_ids += feature["input_ids"]
            labels += [IGNORE_INDEX, *feature["labels"][1:]]
            position_ids += _positions(feature)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }

    def _pad(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        packed = any("position_ids" in feature for feature in features)
        width = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, labels, position_ids, attention_mask = [], [], [], []
        for feature in features:
            length = len(feature["input_ids"])
            padding = width - length
            positions = list(_positions(feature))
            input_ids.append([*feature["input_ids"], *[self.pad_token_id] * padding])
            labels.append([*feature["labels"], *[IGNORE_INDEX] * padding])
            position_ids.append(positions + list(range(positions[-1] + 1, positions[-1] + 1 + padding)))
            attention_mask.append([1] * length + [0] * padding)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }
        if not packed:
            batch["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
        return batch


def _positions(feature: Feature) -> Sequence[int]:
    return feature["position_ids"] if "position_ids" in feature else range(len(feature["input_ids"]))


def count_real_tokens(features: Sequence[Feature]) -> int:
    """The number of real (non-padding) tokens a batch of these features carries, in any collation mode.

    Counted from the features, not the collated batch: a batch of packed rows has no ``attention_mask``
    and, when pad == eos (SmolLM2, Llama 3, Qwen), padding cannot be told from real eos tokens by id.
    """
    return sum(len(feature["input_ids"]) for feature in features)


def padding_stats(lengths: Sequence[int], batch_size: int, *, packing: bool, cutoff_len: int) -> dict:
    """Padding waste (fraction of pad tokens among all tokens in the batches) for one epoch of examples.

    Keys: ``examples``, ``tokens``; ``padded_waste`` for batches in dataset order; ``grouped_waste`` for
    length-grouped batches (sorted within windows of 50 batches, as transformers' ``group_by_length``);
    with ``packing``, ``packed_rows`` and ``packed_waste`` for padded batches of packed rows (None without).
    Padding-free batches waste nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    lengths = [min(length, cutoff_len) for length in lengths]
    window = batch_size * 50
    grouped = [
        length
        for start in range(0, len(lengths), window)
        for length in sorted(lengths[start : start + window], reverse=True)
    ]
    stats: dict = {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "padded_waste": _batched_waste(lengths, batch_size),
        "grouped_waste": _batched_waste(grouped, batch_size),
        "packed_rows": None,
        "packed_waste": None,
    }
    if packing:
        rows = [sum(lengths[i] for i in members) for members in best_fit_decreasing(lengths, cutoff_len)]
        stats["packed_rows"] = len(rows)
        stats["packed_waste"] = _batched_waste(rows, batch_size)
    return stats


def _batched_waste(lengths: Sequence[int], batch_size: int) -> float:
    slots = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        slots += max(batch) * len(batch)
    return (slots - sum(lengths)) / slots if slots else 0.0
