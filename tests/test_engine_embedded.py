"""The engine on the real embedded model (SmolLM2-135M-Instruct, fp32): chat answers batched through the
engine are token-identical to transformers' ``generate`` answering each conversation alone."""

from __future__ import annotations

import pytest
import torch

from ftkit.engine import EngineOptions, LLMEngine, SamplingParams
from ftkit.models import ensure_embedded_model, load_for_inference, stop_token_ids

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Say hello in Spanish."]


@pytest.mark.slow
def test_batched_greedy_chat_answers_on_the_embedded_model_equal_transformers_generate():
    loaded = load_for_inference(str(ensure_embedded_model()), dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    stops = stop_token_ids(tokenizer)
    expected = []
    for prompt in prompts:
        output = loaded.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=24, do_sample=False, temperature=None, top_p=None, top_k=None,
                                       eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        expected.append(output[0, len(prompt):].tolist())
    engine = LLMEngine.from_inference_model(loaded, EngineOptions(max_num_batched_tokens=64))  # chunked prompts
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stops)
    outputs = engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert "Paris" in outputs[0].outputs[0].text
    assert engine.kv_cache.num_prefix_hits > 0  # the template's default system prompt is shared
    assert engine.free_blocks_all_returned()
