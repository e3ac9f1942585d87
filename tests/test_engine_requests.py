"""Per-request behaviour: stop strings across token boundaries, stop ids, min_tokens, ignore_eos, lengths,
and bad requests refused or failed one by one while the engine and the other requests carry on."""

from __future__ import annotations

import logging

import pytest
import torch

from ftkit.engine import EngineOptions, LLMEngine, SamplingParams
from ftkit.errors import FtkitError
from ftkit.models import load_for_inference

PROMPT = "The quick brown fox jumps over the lazy dog and then"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture
def engine(tiny):
    engine = LLMEngine.from_inference_model(tiny)
    yield engine
    assert engine.free_blocks_all_returned()


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 20, "ignore_eos": True, **overrides})


def seeded(**overrides) -> SamplingParams:
    """Seeded sampling: varied tokens (greedy on a random model repeats one), the same every run."""
    return greedy(temperature=1.0, seed=3, **overrides)


def baseline(engine: LLMEngine) -> list[int]:
    return engine.generate([PROMPT], seeded())[0].outputs[0].token_ids


def first_new_token(tokens: list[int], start: int) -> int:
    """The index of the first token at or after ``start`` that does not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_a_stop_string_split_across_tokens_ends_the_answer_before_it(engine, tiny):
    sampled = seeded()
    tokens = baseline(engine)
    decode = tiny.tokenizer.decode
    text = decode(tokens)
    for k in range(3, 18):  # a string made of the end of token k-1 and the start of token k
        boundary = len(decode(tokens[:k]))
        stop = text[boundary - 2:boundary + 2]
        if len(stop) == 4 and text.find(stop) == boundary - 2 and \
                len(decode(tokens[k - 1:k])) >= 2 and len(decode(tokens[k:k + 1])) >= 2:
            break
    else:
        pytest.fail("no token boundary to test in this output")
    sampled.stop = ["never there", stop]
    completion = engine.generate([PROMPT], sampled)[0].outputs[0]
    assert completion.text == text[:boundary - 2]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.token_ids == tokens[:k + 1]


def test_stop_token_ids_end_the_answer_but_not_before_min_tokens(engine):
    tokens = baseline(engine)
    index = first_new_token(tokens, 1)
    stop_id = tokens[index]
    stopped = engine.generate([PROMPT], seeded(stop_token_ids=[stop_id]))[0].outputs[0]
    assert stopped.token_ids == tokens[:index + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)
    held = engine.generate([PROMPT], seeded(stop_token_ids=[stop_id], min_tokens=index + 3))[0].outputs[0]
    assert len(held.token_ids) >= index + 3 and stop_id not in held.token_ids[:index + 3]


def test_eos_ends_the_answer_unless_ignore_eos(tiny):
    reference = LLMEngine.from_inference_model(tiny)
    tokens = baseline(reference)
    saved = tiny.model.generation_config.eos_token_id
    index = first_new_token(tokens, 2)
    tiny.model.generation_config.eos_token_id = tokens[index]
    try:
        engine = LLMEngine.from_inference_model(tiny)
    finally:
        tiny.model.generation_config.eos_token_id = saved
    stopped = engine.generate([PROMPT], seeded(ignore_eos=False))[0].outputs[0]
    assert stopped.token_ids == tokens[:index + 1] and stopped.finish_reason == "stop" and stopped.stop_reason is None
    ignored = engine.generate([PROMPT], seeded(ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"
    assert engine.free_blocks_all_returned()


def test_a_request_ends_at_max_model_len(tiny):
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_model_len=20))
    output = engine.generate([list(range(100, 115))], greedy(max_tokens=100))[0].outputs[0]
    assert len(output.token_ids) == 5 and output.finish_reason == "length"


def test_a_prompt_longer_than_max_model_len_is_one_sentence_naming_both_lengths(tiny):
    engine = LLMEngine.from_inference_model(tiny, EngineOptions(max_model_len=32))
    with pytest.raises(FtkitError, match=r"Request 'long': the prompt has 40 tokens but max_model_len is 32"):
        engine.add_request("long", list(range(100, 140)), greedy())
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize(("params", "adapter", "words"), [
    (greedy(max_tokens=0), None, "max_tokens must be at least 1, got 0"),
    (greedy(max_tokens=-3), None, "max_tokens must be at least 1, got -3"),
    (greedy(top_p=0), None, "top_p must be in (0, 1], got 0"),
    (greedy(), "french", "asks for adapter 'french', which is not loaded (loaded: none)"),
], ids=["max-tokens-zero", "max-tokens-negative", "top-p-zero", "unknown-adapter"])
def test_a_bad_request_is_refused_alone_and_the_others_finish(engine, params, adapter, words):
    with pytest.raises(FtkitError) as refused:
        engine.add_request("bad", PROMPT, params, adapter=adapter)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    outputs = engine.generate([PROMPT, PROMPT], [greedy(max_tokens=3), params], adapters=[None, adapter])
    assert len(outputs[0].outputs[0].token_ids) == 3 and outputs[0].error is None
    assert words in outputs[1].error and outputs[1].finished


def test_a_sampling_error_in_one_request_ends_only_that_request(engine):
    def broken(_generated: list[int], _logits: torch.Tensor) -> torch.Tensor:
        raise ValueError("this processor is broken")

    outputs = engine.generate([PROMPT, PROMPT, PROMPT],
                              [greedy(max_tokens=4), greedy(logits_processors=[broken]), greedy(max_tokens=4)])
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 0, 4]
    assert outputs[1].outputs[0].finish_reason == "error"
    assert "this processor is broken" in outputs[1].error


def test_abort_gives_the_blocks_back_at_once_and_the_engine_goes_on(engine):
    engine.add_request("stay", PROMPT, greedy(max_tokens=5))
    engine.add_request("go", PROMPT, greedy(max_tokens=50))
    engine.step()
    engine.abort("go")
    with pytest.raises(FtkitError, match="already in use"):
        engine.add_request("stay", PROMPT)
    finished = []
    while engine.has_unfinished_requests:
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["stay"]


def test_a_model_the_paged_runner_does_not_know_falls_back_to_the_logged_slow_path(tiny_llama_dir, caplog):
    loaded = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    loaded.model._supports_attention_backend = False
    with caplog.at_level(logging.WARNING, logger="ftkit.engine.model_runner"):
        slow = LLMEngine.from_inference_model(loaded)
    assert "slower path" in caplog.text
    loaded.model._supports_attention_backend = True
    fast = LLMEngine.from_inference_model(loaded)
    prompts = [PROMPT, "Hello"]
    assert [o.outputs[0].token_ids for o in slow.generate(prompts, greedy(max_tokens=6))] == \
        [o.outputs[0].token_ids for o in fast.generate(prompts, greedy(max_tokens=6))]
