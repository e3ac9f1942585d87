"""The engine generates what the model generates: greedy equals transformers' ``generate`` token for token,
whatever the batch, chunking, preemption or prefix caching; seeded sampling is batch-independent; logprobs
are the model's. Every test ends with every block back in the pool.

A tiny random model's greedy tokens hardly depend on attention (it mostly repeats a token), so the
comparisons also hold each token's log-probability to 1e-4: a wrong mask or a stale cache block shows there.
"""

from __future__ import annotations

import pytest
import torch

from ftkit.engine import EngineOptions, LLMEngine, SamplingParams
from ftkit.models import load_for_inference

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
Answer = tuple[list[int], list[float]]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny random Llama in fp32 through the shared inference loader."""
    return load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 40000, (n,), generator=generator).tolist() for n in lengths]


def transformers_greedy(model, prompt: list[int], max_new_tokens: int) -> Answer:
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                            temperature=None, top_p=None, top_k=None, return_dict_in_generate=True,
                            output_logits=True)
    tokens = output.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(output.logits, tokens, strict=True)]
    return tokens, logprobs


def run(engine: LLMEngine, prompts, params=GREEDY) -> list[Answer]:
    outputs = engine.generate(prompts, params)
    assert all(output.error is None for output in outputs)
    assert engine.free_blocks_all_returned()
    return [(o.outputs[0].token_ids, [entry.logprob for entry in o.outputs[0].logprobs]) for o in outputs]


def assert_same(answers: list[Answer], expected: list[Answer]) -> None:
    """Same tokens, and the same log-probability for each (to 1e-4)."""
    assert [tokens for tokens, _ in answers] == [tokens for tokens, _ in expected]
    for (_, logprobs), (_, wanted) in zip(answers, expected, strict=True):
        assert logprobs == pytest.approx(wanted, abs=1e-4)


def test_greedy_is_token_identical_to_transformers_generate_for_single_prompts_of_several_lengths(tiny):
    engine = LLMEngine.from_inference_model(tiny)
    for prompt in random_prompts([1, 9, 16, 40, 130]):
        assert_same(run(engine, [prompt]), [transformers_greedy(tiny.model, prompt, 20)])


def test_a_mixed_batch_with_chunked_prefill_gives_each_request_what_it_gives_alone(tiny):
    prompts = random_prompts([3, 50, 17, 90, 1], seed=1)
    alone = [run(LLMEngine.from_inference_model(tiny), [p])[0] for p in prompts]
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_num_batched_tokens=32, block_size=8))
    assert_same(run(engine, prompts), alone)
    assert engine.stats.steps > 20  # prefills were chunked and ran beside decodes


def test_preempted_and_recomputed_requests_give_what_unpreempted_ones_give(tiny):
    prompts = random_prompts([12, 20, 7, 15], seed=2)
    roomy = run(LLMEngine.from_inference_model(tiny), prompts)
    cramped = LLMEngine.from_inference_model(tiny, EngineOptions(block_size=4, num_kv_blocks=16))
    assert_same(run(cramped, prompts), roomy)
    assert cramped.stats.num_preemptions > 0


def test_prefix_cached_requests_equal_uncached_ones_and_hit_the_cache(tiny):
    system = random_prompts([45], seed=3)[0]
    prompts = [system + tail for tail in random_prompts([4, 9, 1], seed=4)]
    uncached = run(LLMEngine.from_inference_model(tiny, EngineOptions(enable_prefix_caching=False)), prompts)
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(block_size=8))
    assert_same(run(engine, prompts[:1]), uncached[:1])
    assert_same(run(engine, prompts[1:]), uncached[1:])
    assert engine.kv_cache.num_prefix_hits >= 2 * 40  # five full blocks of the system prompt, twice


def test_decodes_under_a_long_shared_prefix_use_cascade_attention_and_give_what_they_give_uncached(tiny, monkeypatch):
    from ftkit.engine import paged_attention

    calls = []
    real = paged_attention.cascade_decode_attention
    monkeypatch.setattr(paged_attention, "cascade_decode_attention", lambda *a: calls.append(1) or real(*a))
    system = random_prompts([paged_attention.CASCADE_MIN_SHARED_TOKENS + 20], seed=13)[0]
    prompts = [system + tail for tail in random_prompts([3, 8, 1, 5, 12, 2], seed=14)]
    uncached = run(LLMEngine.from_inference_model(tiny, EngineOptions(enable_prefix_caching=False)), prompts)
    assert not calls  # nothing shared: no cascade
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_num_batched_tokens=40))
    assert_same(run(engine, prompts[:1]), uncached[:1])  # computes and caches the system prompt's blocks
    assert_same(run(engine, prompts[1:]), uncached[1:])  # chunked prefills of the tails beside cascade decodes
    assert calls


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny):
    prompt = random_prompts([10], seed=5)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11, max_tokens=15, ignore_eos=True)
    engine = LLMEngine.from_inference_model(tiny)
    alone = engine.generate([prompt], seeded)[0].outputs[0].token_ids
    others = random_prompts([30, 5], seed=6)
    batch = engine.generate([others[0], prompt, others[1]],
                            [SamplingParams(temperature=1.0, max_tokens=15), seeded, GREEDY])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=12, max_tokens=15, ignore_eos=True)
    assert engine.generate([prompt], other_seed)[0].outputs[0].token_ids != alone
    assert engine.free_blocks_all_returned()


def test_n_samples_share_the_prompts_blocks_and_each_follows_its_own_seed(tiny):
    prompt = random_prompts([40], seed=7)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(block_size=8))
    output = engine.generate([prompt], params)[0]
    samples = [c.token_ids for c in output.outputs]
    assert [c.index for c in output.outputs] == [0, 1, 2] and len({tuple(s) for s in samples}) == 3
    assert engine.kv_cache.num_prefix_hits == 2 * 32  # siblings found the four full prompt blocks
    single = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    assert engine.generate([prompt], single)[0].outputs[0].token_ids == samples[0]
    assert engine.free_blocks_all_returned()


def test_logprobs_and_prompt_logprobs_equal_log_softmax_of_the_models_logits(tiny):
    prompt = random_prompts([12], seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_num_batched_tokens=5))  # chunked prompt
    output = engine.generate([prompt], params)[0]
    tokens = output.outputs[0].token_ids
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt + tokens])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    for index, entry in enumerate(output.outputs[0].logprobs):
        row = expected[len(prompt) - 1 + index]
        assert entry.token_id == tokens[index]
        assert entry.logprob == pytest.approx(row[tokens[index]].item(), abs=1e-4)
        assert list(entry.top) == row.topk(3).indices.tolist()
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(expected[position - 1, prompt[position]].item(), abs=1e-4)
        assert len(entry.top) == 2
    assert engine.free_blocks_all_returned()


def test_a_higher_priority_request_finishes_first_under_load(tiny):
    prompts = random_prompts([20, 20, 20], seed=9)
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_num_seqs=1, scheduling_policy="priority"))
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, GREEDY, priority=[5, 5, 0][index])
    order = []
    while engine.has_unfinished_requests:
        order += [output.request_id for output in engine.step() if output.finished]
    assert order == ["r2", "r0", "r1"]
    assert engine.free_blocks_all_returned()
