"""What trains: LoRA targets, LoRA/QLoRA/DoRA set-up, freeze, full, adapter loading and merging."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama

from ftkit.config.stages import TrainConfig
from ftkit.errors import FtkitError
from ftkit.models import (
    ModelSource,
    apply_freeze,
    apply_full,
    apply_lora,
    find_lora_targets,
    load_adapters,
    load_model,
    prepare_model_for_training,
    resolve_model_source,
    trainable_parameter_summary,
)

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 200, 3000]])


def tiny(directory, **kwargs):
    return load_model(ModelSource("local", directory, display=str(directory)), **kwargs)


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(output_dir="unused", dataset=["identity"], **overrides)


def save_random_adapter(base_dir, target_dir, *, seed: int, targets=("q_proj", "v_proj")):
    """A LoRA adapter with non-zero weights (a fresh LoRA is a no-op, which would hide merge bugs)."""
    model = apply_lora(tiny(base_dir), rank=4, alpha=8, targets=list(targets), gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(target_dir)
    return model


# ---- targets ---------------------------------------------------------------------------------------------------


def test_all_targets_every_linear_layer_but_the_output_head(tiny_llama_dir):
    model = tiny(tiny_llama_dir)
    assert find_lora_targets(model, ["all"]) == ALL_LINEAR
    assert "lm_head" not in find_lora_targets(model, ["all"])
    assert find_lora_targets(model, ["all"], modules_to_save=["o_proj"]) == [n for n in ALL_LINEAR if n != "o_proj"]


def test_named_targets_are_checked(tiny_llama_dir):
    model = tiny(tiny_llama_dir)
    assert find_lora_targets(model, ["q_proj", "self_attn.v_proj"]) == ["q_proj", "self_attn.v_proj"]
    with pytest.raises(FtkitError) as error:
        find_lora_targets(model, ["q_proj", "qkv_proj", "c_attn"])
    assert str(error.value) == (
        "lora_target qkv_proj, c_attn matches no module of this model; its linear modules are down_proj, gate_proj, "
        "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or use all)."
    )
    with pytest.raises(FtkitError, match="lora_target input_layernorm names modules LoRA cannot wrap"):
        find_lora_targets(model, ["input_layernorm"])


# ---- LoRA, DoRA, rsLoRA, QLoRA --------------------------------------------------------------------------------


def test_lora_on_a_bf16_base_keeps_adapter_weights_fp32(tiny_llama_dir):
    model = apply_lora(tiny(tiny_llama_dir, dtype=torch.bfloat16), rank=8, alpha=16, targets=ALL_LINEAR)
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in name for name in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert set(model.peft_config["default"].target_modules) == set(ALL_LINEAR)
    # 2 layers x r=8 x (q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64) = 16,384
    assert trainable_parameter_summary(model) == "trainable params: 16,384 of 3,236,160 (0.51%)"


def test_dora_and_rslora_flags_reach_the_peft_config(tiny_llama_dir):
    model = apply_lora(tiny(tiny_llama_dir), rank=4, alpha=8, dropout=0.1, targets=["q_proj"], use_dora=True, use_rslora=True)
    config = model.peft_config["default"]
    assert (config.use_dora, config.use_rslora, config.r, config.lora_alpha, config.lora_dropout) == (True, True, 4, 8, 0.1)
    assert any("lora_magnitude_vector" in name for name in trainable_names(model))


def test_additional_target_trains_a_full_fp32_copy(tiny_llama_dir):
    model = apply_lora(tiny(tiny_llama_dir, dtype=torch.bfloat16), rank=4, alpha=8, targets=["q_proj"],
                       modules_to_save=["embed_tokens"])
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert copies and all(p.dtype == torch.float32 for p in copies)
    assert model.peft_config["default"].ensure_weight_tying is True  # the tiny model ties lm_head to embed_tokens
    with pytest.raises(FtkitError, match="additional_target wte matches no module of this model"):
        apply_lora(tiny(tiny_llama_dir), rank=4, alpha=8, targets=["q_proj"], modules_to_save=["wte"])


def test_qlora_trains_lora_on_4bit_layers(tiny_llama_dir):
    base = tiny(tiny_llama_dir, dtype=torch.bfloat16, quantization_bits=4, device=torch.device("cpu"))
    model = apply_lora(base, rank=4, alpha=8, targets=find_lora_targets(base, ["all"]), quantized=True)
    assert type(model.get_base_model().model.layers[0].mlp.up_proj).__module__ == "peft.tuners.lora.bnb"
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= trainable_names(model) and all("lora_" in n for n in grads)


def test_4bit_parameter_count_matches_the_full_precision_model(tiny_llama_dir):
    def total(model) -> str:
        return trainable_parameter_summary(model).split(" of ")[1].split(" (")[0]

    assert total(tiny(tiny_llama_dir, quantization_bits=4)) == total(tiny(tiny_llama_dir)) == "3,219,776"


# ---- freeze and full -------------------------------------------------------------------------------------------


def test_freeze_trains_exactly_the_last_n_layers(tiny_llama_dir):
    model = apply_freeze(tiny(tiny_llama_dir), trainable_layers=1, trainable_modules=["all"])
    layer_1 = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    assert trainable_names(model) == layer_1


def test_freeze_negative_n_trains_the_first_layers_and_picks_modules(tiny_llama_dir):
    model = apply_freeze(tiny(tiny_llama_dir), trainable_layers=-1, trainable_modules=["mlp", "self_attn.q_proj"],
                         extra_modules=["norm"])
    assert trainable_names(model) == {
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
    }


def test_freeze_errors(tiny_llama_dir):
    model = tiny(tiny_llama_dir)
    with pytest.raises(FtkitError, match=r"freeze_trainable_layers 3 must be between 1 and 2 \(the model has 2 layers\)"):
        apply_freeze(model, trainable_layers=3, trainable_modules=["all"])
    with pytest.raises(FtkitError, match="freeze_trainable_modules attention matches nothing inside a decoder layer; use all or some of"):
        apply_freeze(model, trainable_layers=1, trainable_modules=["attention"])
    with pytest.raises(FtkitError, match="freeze_extra_modules wte matches no module outside the decoder layers; use some of embed_tokens, norm"):
        apply_freeze(model, trainable_layers=1, trainable_modules=["all"], extra_modules=["wte"])


def test_full_trains_everything_in_fp32(tiny_llama_dir):
    model = apply_full(tiny(tiny_llama_dir, dtype=torch.bfloat16))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    summary = trainable_parameter_summary(model)
    assert summary.endswith("(100.00%)")


# ---- loading adapters --------------------------------------------------------------------------------------------


def test_inference_merges_adapters_into_a_plain_model(tmp_path, tiny_llama_dir):
    reference = save_random_adapter(tiny_llama_dir, tmp_path / "a", seed=1).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
    merged = load_adapters(tiny(tiny_llama_dir), [tmp_path / "a"], trainable=False)
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_training_merges_all_but_the_last_adapter(tmp_path, tiny_llama_dir):
    save_random_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    save_random_adapter(tiny_llama_dir, tmp_path / "b", seed=2, targets=("o_proj",))
    model = load_adapters(tiny(tiny_llama_dir), [tmp_path / "a", tmp_path / "b"], trainable=True)
    assert set(model.peft_config["default"].target_modules) == {"o_proj"}
    assert trainable_names(model) and all("o_proj.lora_" in n for n in trainable_names(model))
    both_merged = load_adapters(tiny(tiny_llama_dir), [tmp_path / "a", tmp_path / "b"], trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, both_merged(IDS).logits, atol=1e-4, rtol=1e-4)


def test_quantized_base_keeps_its_single_adapter_separate(tmp_path, tiny_llama_dir):
    save_random_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    model = load_adapters(tiny(tiny_llama_dir, quantization_bits=4), [tmp_path / "a"], trainable=False)
    assert hasattr(model, "peft_config") and not trainable_names(model)
    with pytest.raises(FtkitError, match="A quantized model takes one adapter, but adapter_name_or_path lists 2"):
        load_adapters(tiny(tiny_llama_dir, quantization_bits=4), [tmp_path / "a", tmp_path / "a"], trainable=False)


def test_adapter_for_another_base_names_the_mismatch(tmp_path, tiny_llama_dir):
    other_base = build_tiny_llama(tmp_path / "other-base", hidden_size=32, vocab_size=1000)
    save_random_adapter(other_base, tmp_path / "other-adapter", seed=1)
    with pytest.raises(FtkitError) as error:
        load_adapters(tiny(tiny_llama_dir), [tmp_path / "other-adapter"], trainable=False)
    assert str(error.value) == (
        f"Adapter {tmp_path / 'other-adapter'} does not fit this base model: model.layers.0.self_attn.q_proj takes 64 "
        f"input features but the adapter expects 32 (it was trained on '{other_base}'); pass that base as "
        "model_name_or_path."
    )


def test_adapter_for_another_architecture_names_the_missing_module(tmp_path, tiny_llama_dir):
    save_random_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FtkitError, match="it adapts model.layers.0.attn.c_attn, which the base model does not have"):
        load_adapters(tiny(tiny_llama_dir), [tmp_path / "a"], trainable=False)


def test_directory_without_adapter_config(tmp_path, tiny_llama_dir):
    with pytest.raises(FtkitError, match=f"Adapter directory {tmp_path} has no adapter_config.json"):
        load_adapters(tiny(tiny_llama_dir), [tmp_path], trainable=False)


# ---- the train stage's entry point ------------------------------------------------------------------------------


def test_prepare_lora_enables_checkpointing_and_input_grads(tiny_llama_dir):
    model = prepare_model_for_training(tiny(tiny_llama_dir), train_config(lora_rank=4, additional_target=["norm"]))
    base = model.get_base_model()
    assert base.is_activation_checkpointing and base.config.use_cache is False
    assert any("modules_to_save" in n for n in trainable_names(model))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_prepare_syncs_special_tokens_when_given_the_tokenizer(tiny_llama_dir):
    from ftkit.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSource("local", tiny_llama_dir))
    model = prepare_model_for_training(tiny(tiny_llama_dir), train_config(), tokenizer=tokenizer)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0


def test_prepare_respects_disable_gradient_checkpointing(tiny_llama_dir):
    model = prepare_model_for_training(tiny(tiny_llama_dir), train_config(disable_gradient_checkpointing=True))
    assert not model.get_base_model().is_activation_checkpointing


def test_prepare_dispatches_freeze_full_and_qlora(tiny_llama_dir):
    frozen = prepare_model_for_training(tiny(tiny_llama_dir), train_config(finetuning_type="freeze", freeze_trainable_layers=1))
    assert trainable_names(frozen) == {n for n, _ in frozen.named_parameters() if n.startswith("model.layers.1.")}
    assert frozen.is_activation_checkpointing
    full = prepare_model_for_training(tiny(tiny_llama_dir), train_config(finetuning_type="full"))
    assert all(p.requires_grad for p in full.parameters())
    config = train_config(finetuning_type="qlora")
    quantized = tiny(tiny_llama_dir, quantization_bits=config.quantization_bits)
    qlora = prepare_model_for_training(quantized, config)
    assert set(qlora.peft_config["default"].target_modules) == set(ALL_LINEAR)


def test_prepare_continues_the_configured_adapter(tmp_path, tiny_llama_dir):
    save_random_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    model = prepare_model_for_training(tiny(tiny_llama_dir), train_config(adapter_name_or_path=str(tmp_path / "a")))
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    assert trainable_names(model) and all("lora_" in n for n in trainable_names(model))


@pytest.mark.parametrize(("keys", "dtype", "autocast"), [
    ({}, torch.float32, False), ({}, torch.bfloat16, False), ({}, torch.bfloat16, True),
    ({"lora_dropout": 0.1}, torch.float32, False), ({"use_dora": True}, torch.float32, False),
], ids=["plain", "bf16-base", "bf16-autocast", "dropout", "dora"])
def test_the_fused_lora_sum_gives_peft_s_outputs_and_gradients(tiny_llama_dir, keys, dtype, autocast):
    """Training swaps peft's LoRA linear layers for FusedLoraLinear (the sum in one addmm); outputs and every
    gradient equal peft's own forward (on a bf16 base with fp32 adapters too, with and without autocast, and
    with dropout active: the same seed draws the same masks); with DoRA it is peft's forward that runs."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ftkit.models.fused_lora import FusedLoraLinear

    config = train_config(lora_rank=4, disable_gradient_checkpointing=True, **keys)
    fused = prepare_model_for_training(tiny(tiny_llama_dir, dtype=dtype), config)
    plain = prepare_model_for_training(tiny(tiny_llama_dir, dtype=dtype), config)
    layers = [m for m in plain.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 * 7 and all(type(m) is FusedLoraLinear for m in layers)
    for m in layers:
        m.__class__ = LoraLinear  # peft's own forward, for reference
    torch.manual_seed(0)
    for name, param in fused.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would hide the adapter's part of the sum
            param.data.normal_()
    plain.load_state_dict(fused.state_dict())
    dropout = bool(keys.get("lora_dropout"))
    losses = []
    for model in (fused, plain):
        model.train(dropout)  # with dropout, in training mode: each model draws its masks from the same seed
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(model(input_ids=IDS, labels=IDS).loss)
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = [{n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in (fused, plain)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    layer = next(m for m in fused.modules() if type(m) is FusedLoraLinear)
    assert (layer._plain_adapter() is None) == ("use_dora" in keys)  # DoRA: the fused layer defers to peft
    if dropout:  # the masks were drawn: the loss differs from the one without dropout
        fused.eval()
        with torch.no_grad():
            assert not torch.allclose(fused(input_ids=IDS, labels=IDS).loss, losses[0].detach())


@pytest.mark.slow
def test_lora_all_on_the_embedded_model():
    model = load_model(resolve_model_source("smollm2-135m-instruct"), dtype=torch.bfloat16)
    assert find_lora_targets(model, ["all"]) == ALL_LINEAR
    model = prepare_model_for_training(model, train_config(lora_rank=8))
    # 30 layers x r=8 x (q 576+576, k 576+192, v 576+192, o 576+576, gate/up 576+1536, down 1536+576)
    assert trainable_parameter_summary(model) == "trainable params: 2,442,240 of 136,957,248 (1.78%)"
