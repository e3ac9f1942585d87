"""The LoRA variants on a tiny random Llama: LoRA+, PiSSA and AdaLoRA each train with falling loss and save an
adapter plain peft loads and ``ftkit merge-lora`` merges.

Each run goes through ``run_training``; a user callback (``callbacks:``, written to a module in a temporary
folder) records what only the running Trainer knows: the optimizer's parameter groups, the trained model's
logits on a fixed input.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from ftkit.config import MergeConfig, TrainConfig, load_stage_config
from ftkit.merge import run_merge
from ftkit.train import run_training
from ftkit.train.callbacks import read_log

PROBE = [[1, 520, 3817, 314, 253, 1345, 30, 2]]  # a fixed input whose logits are compared

RECORDERS = textwrap.dedent('''
    import json, os
    import torch
    from transformers import TrainerCallback

    PROBE = %r

    class RecordOptimizer(TrainerCallback):
        """Writes each parameter group's learning rate and parameter names at the first step."""
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step:
                return
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [{"lr": g["lr"], "names": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
            with open(os.path.join(args.output_dir, "groups.json"), "w") as f:
                json.dump(groups, f)

    class CrashAtStep5(TrainerCallback):
        """A run killed after its checkpoint at step 4."""
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("killed")

    class RecordLogits(TrainerCallback):
        """Saves the logits of the model being trained, at the end of training, on PROBE."""
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(PROBE)).logits
            torch.save(logits, os.path.join(os.path.dirname(args.output_dir), "trained_logits.pt"))
''') % (PROBE,)


@pytest.fixture
def recorders(tmp_path, monkeypatch) -> str:
    (tmp_path / "lx_recorders.py").write_text(RECORDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lx_recorders"


def train(model_dir: Path, output_dir: Path, **overrides):
    keys = {
        "model_name_or_path": str(model_dir), "dataset": "identity", "max_samples": 8, "cutoff_len": 128,
        "output_dir": str(output_dir), "max_steps": 10, "logging_steps": 1, "learning_rate": 5e-3,
        "per_device_train_batch_size": 8, "save_strategy": "no", "seed": 0, "lora_rank": 4,
        "replay_ratio": 0, "general_check": False, "plot_loss": False,
    }
    keys.update(overrides)
    return run_training(load_stage_config(TrainConfig, None, keys))


def assert_loss_fell(output_dir: Path) -> None:
    values = [record["loss"] for record in read_log(output_dir) if "loss" in record]
    assert len(values) >= 5 and sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.05, values


def base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits


def merged_and_verified(tmp_path: Path, model_dir: Path, adapter: Path) -> Path:
    export = tmp_path / "merged"
    run_merge(load_stage_config(MergeConfig, None, {
        "model_name_or_path": str(model_dir), "adapter_name_or_path": str(adapter), "export_dir": str(export),
        "export_dtype": "fp32"}))
    return export


# ---- LoRA+ ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loraplus_trains_b_at_ratio_times_the_learning_rate_of_a(tiny_llama_dir, tmp_path, recorders):
    out = tmp_path / "out"
    train(tiny_llama_dir, out, loraplus_lr_ratio=4, learning_rate=2e-3, lr_scheduler_type="constant",
          callbacks=f"{recorders}:RecordOptimizer")
    groups = json.loads((out / "groups.json").read_text())
    a_rates = {g["lr"] for g in groups for n in g["names"] if "lora_A" in n}
    b_rates = {g["lr"] for g in groups for n in g["names"] if "lora_B" in n}
    assert sorted(a_rates) == [2e-3] and sorted(b_rates) == [pytest.approx(4 * 2e-3)]
    assert sum(len(g["names"]) for g in groups) == 2 * 7 * 2  # every A and B of 7 modules x 2 layers
    assert_loss_fell(out)
    from peft import PeftModel

    PeftModel.from_pretrained(base_model(tiny_llama_dir), str(out))


# ---- PiSSA ---------------------------------------------------------------------------------------------


def test_pissa_initial_adapter_reproduces_the_base_output(tiny_llama_dir):
    from ftkit.models import prepare_model_for_training

    config = load_stage_config(TrainConfig, None, {
        "model_name_or_path": str(tiny_llama_dir), "dataset": "identity", "output_dir": "unused",
        "pissa_init": True, "pissa_iter": -1, "lora_rank": 4}).config
    expected = logits(base_model(tiny_llama_dir))
    model = prepare_model_for_training(base_model(tiny_llama_dir), config, gradient_checkpointing=False).eval()
    assert model.peft_config["default"].init_lora_weights == "pissa"
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.abs().sum() > 0  # the principal part moved into the adapter (plain LoRA starts with B = 0)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pissa_trains_and_its_converted_save_is_a_plain_lora_of_the_original_base(tiny_llama_dir, tmp_path,
                                                                                  recorders):
    from peft import PeftModel

    out = tmp_path / "out"
    # fp32 weights: the comparison checks the conversion, not bf16 rounding of the residual base
    train(tiny_llama_dir, out, pissa_init=True, pissa_iter=4, bf16=False, callbacks=f"{recorders}:RecordLogits")
    assert_loss_fell(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)  # rank 2 x lora_rank
    trained = torch.load(tmp_path / "trained_logits.pt")
    loaded = PeftModel.from_pretrained(base_model(tiny_llama_dir), str(out)).eval()
    torch.testing.assert_close(logits(loaded), trained, atol=1e-4, rtol=1e-4)
    export = merged_and_verified(tmp_path, tiny_llama_dir, out)
    torch.testing.assert_close(logits(base_model(export)), trained, atol=1e-4, rtol=1e-4)


# ---- AdaLoRA -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_adaptive_rank_changes_ranks_and_its_adapter_loads_and_merges(tiny_llama_dir, tmp_path, recorders, capsys):
    from peft import PeftModel

    out = tmp_path / "out"
    result = train(tiny_llama_dir, out, use_adalora=True, init_r=6, target_r=2, tinit=2, tfinal=3, bf16=False,
                   callbacks=f"{recorders}:RecordLogits")
    assert_loss_fell(out)
    ranks = result.metrics["adalora_ranks"]
    assert len(ranks) == 14 and set(ranks.values()) != {6}  # 7 modules x 2 layers, pruned from init_r
    assert sum(ranks.values()) / len(ranks) == pytest.approx(2, abs=0.5)
    assert "AdaLoRA final ranks" in capsys.readouterr().err
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    trained = torch.load(tmp_path / "trained_logits.pt")
    loaded = PeftModel.from_pretrained(base_model(tiny_llama_dir), str(out)).eval()
    torch.testing.assert_close(logits(loaded), trained, atol=1e-4, rtol=1e-4)
    export = merged_and_verified(tmp_path, tiny_llama_dir, out)
    torch.testing.assert_close(logits(base_model(export)), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_an_adaptive_rank_run_resumes_exactly_after_a_crash(tiny_llama_dir, tmp_path, recorders):
    keys = {"adaptive_rank": True, "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "save_strategy": "steps",
            "save_steps": 4, "bf16": False}
    whole = train(tiny_llama_dir, tmp_path / "whole" / "out", callbacks=f"{recorders}:RecordLogits", **keys)
    out = tmp_path / "crashed" / "out"
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_llama_dir, out, callbacks=f"{recorders}:CrashAtStep5", **keys)
    assert (out / "checkpoint-4" / "adalora_state.pt").is_file()
    resumed = train(tiny_llama_dir, out, callbacks=f"{recorders}:RecordLogits", **keys)
    assert resumed.metrics["adalora_ranks"] == whole.metrics["adalora_ranks"]
    assert resumed.metrics["train_loss"] == pytest.approx(whole.metrics["train_loss"], abs=1e-5)
    torch.testing.assert_close(torch.load(tmp_path / "crashed" / "trained_logits.pt"),
                               torch.load(tmp_path / "whole" / "trained_logits.pt"), atol=1e-5, rtol=1e-5)

    from ftkit.train.checkpoints import CHECKPOINT_MANIFEST

    for state in out.glob("checkpoint-*/adalora_state.pt"):  # checkpoints from elsewhere: one sentence
        state.unlink()
        (state.parent / CHECKPOINT_MANIFEST).unlink()  # (a checkpoint from elsewhere has no ftkit manifest)
    (out / "train_results.json").unlink()
    from ftkit.errors import FtkitError

    with pytest.raises(FtkitError, match="has no adalora_state.pt"):
        train(tiny_llama_dir, out, **keys)