"""Packed bf16 linear weights (``pack_weights``) change speed only: the same tokens and the same
log-probabilities, bit for bit, with and without an adapter, for decodes and prefills in one batch."""

from __future__ import annotations

import pytest
import torch

from ftkit.engine import EngineOptions, LLMEngine, SamplingParams
from ftkit.engine.cpu_weights import PackedLinear, can_pack
from ftkit.models import load_for_inference
from tests.test_engine_lora import save_random_lora

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU has no oneDNN bf16 support")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


def answers(tiny_llama_dir, pack: bool, adapter=None) -> tuple[list, int]:
    loaded = load_for_inference(str(tiny_llama_dir), dtype=torch.bfloat16, device=torch.device("cpu"))
    engine = LLMEngine.from_inference_model(loaded, EngineOptions(pack_weights=pack, max_num_batched_tokens=48))
    if adapter is not None:
        engine.load_adapter("red", adapter)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 40000, (n,), generator=generator).tolist() for n in (5, 70, 33)]
    names = ["red", None, "red"] if adapter is not None else None
    outputs = engine.generate(prompts, GREEDY, adapters=names)
    packed = sum(isinstance(m, PackedLinear) for m in loaded.model.modules())
    return [(o.outputs[0].token_ids, [(e.logprob, e.top) for e in o.outputs[0].logprobs]) for o in outputs], packed


def test_packed_weights_give_bit_identical_answers(tiny_llama_dir):
    plain, none_packed = answers(tiny_llama_dir, pack=False)
    packed, count = answers(tiny_llama_dir, pack=True)
    assert none_packed == 0 and count > 0
    assert packed == plain


def test_an_adapter_over_packed_weights_gives_what_it_gives_over_plain_ones(tiny_llama_dir, tmp_path):
    adapter = save_random_lora(tiny_llama_dir, tmp_path / "red", seed=1)
    plain, _ = answers(tiny_llama_dir, pack=False, adapter=adapter)
    packed, _ = answers(tiny_llama_dir, pack=True, adapter=adapter)
    assert packed == plain


def test_a_packed_layer_still_trains_through_its_plain_weight():
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    packed = PackedLinear(linear, batch_hint=8)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    packed(x).float().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
