"""Multi-LoRA: requests for different adapters of one base in one batch each give what the adapter merged into
the base gives; adapters are loaded by name, at most ``max_loras`` resident."""

from __future__ import annotations

import pytest
import torch

from ftkit.engine import EngineOptions, LLMEngine, SamplingParams
from ftkit.errors import FtkitError
from ftkit.models import load_for_inference

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
PROMPT = list(range(1000, 1040))  # two and a half blocks: the prefix cache is exercised


def save_random_lora(base_dir, directory, seed: int):
    """A LoRA adapter with random A and B (peft initialises B to zero: that would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: save_random_lora(tiny_llama_dir, root / name, seed) for name, seed in (("red", 1), ("blue", 2))}


def answer(output) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    return completion.token_ids, [round(entry.logprob, 4) for entry in completion.logprobs]


def merged_answer(base_dir, adapter_dir) -> tuple[list[int], list[float]]:
    loaded = load_for_inference(str(base_dir), [adapter_dir] if adapter_dir else None, dtype=torch.float32,
                                device=torch.device("cpu"))
    return answer(LLMEngine.from_inference_model(loaded).generate([PROMPT], GREEDY)[0])


def assert_close(got: tuple[list[int], list[float]], wanted: tuple[list[int], list[float]]) -> None:
    assert got[0] == wanted[0] and got[1] == pytest.approx(wanted[1], abs=2e-4)


def test_requests_for_different_adapters_in_one_batch_each_get_their_merged_models_answer(tiny_llama_dir, adapters):
    expected = {name: merged_answer(tiny_llama_dir, adapters.get(name)) for name in (None, "red", "blue")}
    assert len({tuple(tokens) for tokens, _ in expected.values()}) == 3  # the adapters do change the answer
    base = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    engine = LLMEngine.from_inference_model(base)
    for name, directory in adapters.items():
        engine.load_adapter(name, directory)
    order = [None, "red", "blue", "red", None]
    outputs = engine.generate([PROMPT] * len(order), GREEDY, adapters=order)
    for output, name in zip(outputs, order, strict=True):
        assert_close(answer(output), expected[name])
    again = engine.generate([PROMPT], GREEDY, adapters=["blue"])[0]  # after the cache holds all three prompts
    assert_close(answer(again), expected["blue"])
    assert engine.free_blocks_all_returned()


def test_at_most_max_loras_are_resident_and_a_busy_one_is_never_evicted(tiny_llama_dir, adapters):
    base = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    engine = LLMEngine.from_inference_model(base, EngineOptions(max_loras=1))
    engine.load_adapter("red", adapters["red"])
    engine.add_request("busy", PROMPT, GREEDY, adapter="red")
    with pytest.raises(FtkitError, match="all max_loras=1 resident adapters are serving requests"):
        engine.load_adapter("blue", adapters["blue"])
    while engine.has_unfinished_requests:
        engine.step()
    engine.load_adapter("blue", adapters["blue"])  # red is idle now: evicted
    assert engine.adapters == ["blue"]
    with pytest.raises(FtkitError, match="asks for adapter 'red', which is not loaded \\(loaded: blue\\)"):
        engine.add_request("late", PROMPT, GREEDY, adapter="red")
    engine.add_request("blue-busy", PROMPT, GREEDY, adapter="blue")
    with pytest.raises(FtkitError, match="Adapter 'blue' is serving requests; unload it when they have finished"):
        engine.unload_adapter("blue")
    engine.abort("blue-busy")
    engine.unload_adapter("blue")
    assert engine.adapters == []
    with pytest.raises(FtkitError, match="No adapter named 'blue' is loaded \\(loaded: none\\)"):
        engine.unload_adapter("blue")


def save_random_adalora(base_dir, directory):
    """An AdaLoRA adapter (A, singular values E, B) pruned to uneven ranks, one module to rank 0, as training ends."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    keeps = [[True, False, True, True], [False] * 4, [True, False, False, False]]
    names = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_E")]
    pattern = {f"{name.removeprefix('base_model.model.')}.lora_E": keeps[index % 3] for index, name in enumerate(names)}
    peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.save_pretrained(directory)
    return directory


def test_an_adalora_adapter_is_served_beside_lora_as_peft_loads_it(tiny_llama_dir, adapters, tmp_path):
    adalora = save_random_adalora(tiny_llama_dir, tmp_path / "adaptive")
    expected = merged_answer(tiny_llama_dir, adalora)
    assert expected[0] != merged_answer(tiny_llama_dir, None)[0]
    base = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    engine = LLMEngine.from_inference_model(base)
    engine.load_adapter("adaptive", adalora)
    engine.load_adapter("red", adapters["red"])
    outputs = engine.generate([PROMPT] * 2, GREEDY, adapters=["adaptive", "red"])
    assert_close(answer(outputs[0]), expected)
    assert_close(answer(outputs[1]), merged_answer(tiny_llama_dir, adapters["red"]))
