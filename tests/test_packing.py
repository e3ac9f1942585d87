"""Packing and collation: no example sees another, padding is never trained, waste is measured."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

from ftkit.data.encoding import IGNORE_INDEX, EncodedExample
from ftkit.data.packing import (
    SupervisedCollator,
    best_fit_decreasing,
    count_real_tokens,
    pack_examples,
    padding_stats,
)
from ftkit.errors import FtkitError

VOCAB = 96
PAD = 0


def make_examples(lengths: list[int], seed: int = 0) -> list[EncodedExample]:
    """Random examples whose first half is prompt (ignored) and second half reply (trained)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        examples.append(EncodedExample(ids, labels))
    return examples


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, pad_token_id=PAD,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=request.param).eval()
    assert model.config._attn_implementation == request.param
    return model


def logits_alone(model, example: EncodedExample) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-summed next-token loss, the way causal LMs shift labels."""
    return torch.nn.functional.cross_entropy(
        logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
    )


# ---- bin packing ---------------------------------------------------------------------------------------------


def test_best_fit_decreasing_puts_each_item_in_the_fullest_bin_it_fits():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert best_fit_decreasing([], 8) == []


def test_best_fit_decreasing_rejects_an_item_larger_than_a_bin():
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit in rows of 8"):
        best_fit_decreasing([3, 9], 8)


def test_packed_rows_hold_whole_examples_with_positions_restarting():
    examples = make_examples([7, 3, 12, 5, 9, 1, 16, 4])
    rows = pack_examples(examples, cutoff_len=16, seed=0)
    assert sorted(length for row in rows for length in row.lengths) == sorted(len(e) for e in examples)
    unplaced = [tuple(e.input_ids) for e in examples]
    for row in rows:
        assert len(row) == sum(row.lengths) <= 16
        start = 0
        for length in row.lengths:
            unplaced.remove(tuple(row.input_ids[start : start + length]))  # whole example, contiguous
            assert row.position_ids[start : start + length] == list(range(length))
            assert row.labels[start] == IGNORE_INDEX  # never predicted from the previous example
            start += length
    assert unplaced == []


def test_packing_keeps_every_label_except_each_examples_first():
    examples = make_examples([6, 6, 6])
    [row] = pack_examples(examples, cutoff_len=18, seed=0)
    expected = [label for e in examples for label in [IGNORE_INDEX, *e.labels[1:]]]
    assert sorted(row.labels) == sorted(expected)


def test_packing_is_deterministic_per_seed():
    examples = make_examples([5, 9, 3, 7, 2, 8, 6, 4, 1, 10] * 3)
    first = [row.input_ids for row in pack_examples(examples, 16, seed=1)]
    assert first == [row.input_ids for row in pack_examples(examples, 16, seed=1)]
    assert sorted(first) == sorted(row.input_ids for row in pack_examples(examples, 16, seed=2))


def test_transformers_reads_our_position_ids_as_separate_sequences():
    [row] = pack_examples(make_examples([3, 2, 4]), cutoff_len=9, seed=0)
    indices = find_packed_sequence_indices(torch.tensor([row.position_ids]))
    assert indices[0].tolist() == [i for i, length in enumerate(row.lengths) for _ in range(length)]


# ---- the model sees each example as if alone ----------------------------------------------------------------


def test_a_packed_row_gives_each_example_its_own_logits_and_loss(tiny_llama):
    examples = make_examples([5, 11, 8])
    [row] = pack_examples(examples, cutoff_len=24, seed=0)
    with torch.no_grad():
        packed = tiny_llama(
            input_ids=torch.tensor([row.input_ids]), position_ids=torch.tensor([row.position_ids]), use_cache=False
        ).logits[0]
    by_ids = {tuple(e.input_ids): e for e in examples}
    start, total_loss, total_alone = 0, 0.0, 0.0
    for length in row.lengths:
        example = by_ids[tuple(row.input_ids[start : start + length])]
        alone = logits_alone(tiny_llama, example)
        torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=0)
        total_alone += summed_loss(alone, torch.tensor(example.labels))
        start += length
    total_loss = summed_loss(packed, torch.tensor(row.labels))
    torch.testing.assert_close(total_loss, total_alone, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", ["no-position-reset", "with-kv-cache"])
def test_controls_examples_see_each_other_without_resets_or_with_a_kv_cache(tiny_llama, case):
    """Controls for the test above: the comparison does catch cross-example attention, and transformers
    honours position resets only when the forward pass builds no KV cache (hence use_cache=False)."""
    examples = make_examples([5, 11])
    [row] = pack_examples(examples, cutoff_len=16, seed=0)
    inputs = {"input_ids": torch.tensor([row.input_ids])}
    if case == "no-position-reset":
        inputs["use_cache"] = False
    else:
        inputs["position_ids"] = torch.tensor([row.position_ids])  # use_cache defaults to config.use_cache
        assert tiny_llama.config.use_cache
    with torch.no_grad():
        packed = tiny_llama(**inputs).logits[0]
    first = row.lengths[0]
    second = next(e for e in examples if e.input_ids == row.input_ids[first:])
    assert not torch.allclose(packed[first:], logits_alone(tiny_llama, second), atol=1e-3)


def test_padding_free_batch_matches_each_example_alone(tiny_llama):
    examples = make_examples([4, 9, 6])
    batch = SupervisedCollator(pad_token_id=PAD, padding_free=True)([vars(e) for e in examples])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (1, 19)
    with torch.no_grad():
        logits = tiny_llama(**batch, use_cache=False).logits[0]
    start, summed, trained = 0, 0.0, 0
    for example in examples:
        alone = logits_alone(tiny_llama, example)
        torch.testing.assert_close(logits[start : start + len(example)], alone, atol=1e-5, rtol=0)
        assert batch["labels"][0, start].item() == IGNORE_INDEX
        assert batch["labels"][0, start + 1 : start + len(example)].tolist() == example.labels[1:]
        summed += summed_loss(alone, torch.tensor(example.labels))
        trained += sum(label != IGNORE_INDEX for label in example.labels[1:])
        start += len(example)
    with torch.no_grad():
        loss = tiny_llama(**batch, use_cache=False).loss  # the model's own shifted, mean loss over the flattened row
    torch.testing.assert_close(loss, summed / trained, atol=1e-5, rtol=1e-5)


def test_padded_batch_masks_padding_and_matches_each_example_alone(tiny_llama):
    examples = make_examples([4, 9, 6])
    batch = SupervisedCollator(pad_token_id=PAD)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 9)
    assert batch["input_ids"][0, 4:].tolist() == [PAD] * 5
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX] * 5
    assert batch["attention_mask"].tolist()[0] == [1] * 4 + [0] * 5
    with torch.no_grad():
        logits = tiny_llama(**batch, use_cache=False).logits
    for i, example in enumerate(examples):
        torch.testing.assert_close(logits[i, : len(example)], logits_alone(tiny_llama, example), atol=1e-5, rtol=0)


def test_padded_batch_of_packed_rows_has_no_attention_mask_and_matches_each_example_alone(tiny_llama):
    examples = make_examples([5, 7, 3, 9, 4])
    rows = pack_examples(examples, cutoff_len=12, seed=0)
    batch = SupervisedCollator(pad_token_id=PAD)([row.to_features() for row in rows])
    assert "attention_mask" not in batch  # else transformers would ignore the position resets
    with torch.no_grad():
        logits = tiny_llama(**batch, use_cache=False).logits
    by_ids = {tuple(e.input_ids): e for e in examples}
    for r, row in enumerate(rows):
        assert batch["labels"][r, len(row) :].eq(IGNORE_INDEX).all()
        start = 0
        for length in row.lengths:
            example = by_ids[tuple(row.input_ids[start : start + length])]
            torch.testing.assert_close(logits[r, start : start + length], logits_alone(tiny_llama, example), atol=1e-5, rtol=0)
            start += length


# ---- collator details ----------------------------------------------------------------------------------------


def test_collator_pads_to_a_multiple_and_uses_the_tokenizers_pad_id(qwen_tokenizer):
    collator = SupervisedCollator(qwen_tokenizer, pad_to_multiple_of=8)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8] * 10, "labels": [8] * 10}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 3:].eq(qwen_tokenizer.pad_token_id).all()
    assert batch["position_ids"][0, :3].tolist() == [0, 1, 2]


def test_collator_falls_back_to_eos_and_needs_one_of_them(base_tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 7

    assert SupervisedCollator(NoPad()).pad_token_id == 7
    NoPad.eos_token_id = None
    with pytest.raises(FtkitError, match="neither a pad nor an eos token"):
        SupervisedCollator(NoPad())
    assert SupervisedCollator(base_tokenizer).pad_token_id == base_tokenizer.pad_token_id


def test_count_real_tokens_counts_features_not_padding():
    features = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert count_real_tokens(features) == 4
    assert SupervisedCollator(pad_token_id=PAD)(features)["attention_mask"].sum().item() == 4


# ---- padding statistics --------------------------------------------------------------------------------------


def test_padding_stats_for_plain_grouped_and_packed_batches():
    stats = padding_stats([1, 4, 2, 3], batch_size=2, packing=True, cutoff_len=5)
    assert stats == {
        "examples": 4,
        "tokens": 10,
        "padded_waste": 4 / 14,  # batches [1, 4] -> 8 slots, [2, 3] -> 6 slots
        "grouped_waste": 2 / 12,  # sorted: [4, 3] -> 8, [2, 1] -> 4
        "packed_rows": 2,  # rows [4, 1] and [3, 2], both full
        "packed_waste": 0.0,
    }


def test_padding_stats_without_packing_reports_no_packed_numbers():
    stats = padding_stats([8, 8, 8], batch_size=4, packing=False, cutoff_len=16)
    assert (stats["padded_waste"], stats["grouped_waste"], stats["packed_rows"], stats["packed_waste"]) == (
        0.0, 0.0, None, None,
    )
