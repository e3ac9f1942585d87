"""Training in several processes: real 2-process runs on CPU (DeepSpeed with DS_ACCELERATOR=cpu, plain DDP
on gloo), two "nodes" on one machine, a process killed and the run resumed, a damaged checkpoint skipped,
and every refusal the launcher makes before a process starts.

The runs are real ``ftkit train`` commands; ``ftkit`` starts its own processes (``ftkit.train.launch``).
Every process runs one thread, so the arithmetic repeats exactly between runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftkit.config import TrainConfig, load_stage_config
from ftkit.errors import FtkitError
from ftkit.train import launch_training
from ftkit.train.callbacks import read_log
from ftkit.train.checkpoints import CHECKPOINT_MANIFEST, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8


def keys(model_dir: Path, output_dir: Path, **overrides) -> dict:
    """A short run of the tiny model: 16 identity examples, batches of 4 per process (2 steps an epoch)."""
    values = {
        "model_name_or_path": str(model_dir), "dataset": "identity", "max_samples": 16, "cutoff_len": 128,
        "output_dir": str(output_dir), "max_steps": MAX_STEPS, "save_steps": 2, "logging_steps": 1,
        "learning_rate": 5e-3, "per_device_train_batch_size": 4, "seed": 0, "lora_dropout": 0.1,
        "replay_ratio": 0, "general_check": False, "nproc_per_node": 2,
    }
    values.update(overrides)
    return values


def write_config(folder: Path, values: dict) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ftkit", "train", str(config), *overrides]


def run(config: Path, *overrides: str, expect: int = 0, timeout: float = 240) -> str:
    result = subprocess.run(command(config, *overrides), capture_output=True, text=True, env=env(), cwd=REPO,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


def losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in read_log(output_dir) if "loss" in record]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_writer(output_dir: Path, output: str) -> None:
    """Rank 0 alone printed the summary and wrote one log line per step."""
    assert output.count("done: loss") == 1, output[-3000:]
    assert [r["step"] for r in read_log(output_dir) if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert json.loads((output_dir / "train_results.json").read_text())["processes"] == 2


def test_deepspeed_zero3_full_finetune_gathers_a_plain_transformers_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "out"
    output = run(write_config(tmp_path, keys(tiny_llama_dir, output_dir, deepspeed="ds_z3", finetuning_type="full",
                                             learning_rate=1e-3)))
    assert_one_writer(output_dir, output)
    values = losses(output_dir)
    assert values[-1] < values[0] - 0.1, values
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()  # gathered, not ZeRO shards
    assert trained.keys() == base.keys()
    assert all(trained[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert not any(output_dir.glob("global_step*")) and not (output_dir / "zero_to_fp32.py").exists()


def test_fsdp_full_finetune_saves_sharded_checkpoints_that_another_process_count_resumes(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    output_dir, resumed = tmp_path / "out", tmp_path / "resumed"
    config = write_config(tmp_path, keys(tiny_llama_dir, output_dir, fsdp="full_shard", finetuning_type="full",
                                         learning_rate=1e-3))
    output = run(config)
    assert "x 2 processes (fsdp)" in output
    assert_one_writer(output_dir, output)
    values = losses(output_dir)
    assert values[-1] < values[0] - 0.1, values
    checkpoint = output_dir / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded
    trained = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()  # gathered into one plain model
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)

    output = run(config, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}", "nproc_per_node=1")
    assert "checkpoint-4 was saved by 2 process(es) and this run has 1" in output
    results = json.loads((resumed / "train_results.json").read_text())
    assert (results["resumed_from_step"], results["global_step"]) == (4, MAX_STEPS)
    assert [r["step"] for r in read_log(resumed) if "loss" in r] == list(range(5, MAX_STEPS + 1))
    assert AutoModelForCausalLM.from_pretrained(resumed).state_dict().keys() == base.keys()


def test_two_processes_train_exactly_as_one_process_with_their_combined_batch(tiny_llama_dir, tmp_path):
    """Data parallel is the same optimisation: 2 processes x 2 examples = 1 process x 4 (the loss is the token
    mean over the global batch, not over each process's half)."""
    values = keys(tiny_llama_dir, tmp_path / "unused", lora_dropout=0.0, group_by_length=False, save_strategy="no",
                  learned_check=False)
    config = write_config(tmp_path, values)
    one, two = tmp_path / "one", tmp_path / "two"
    run(config, f"output_dir={one}", "nproc_per_node=1", "per_device_train_batch_size=4")
    run(config, f"output_dir={two}", "nproc_per_node=2", "per_device_train_batch_size=2")
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert losses(one)[0] > 10  # a random model over SmolLM2's 49,152 tokens: ln(49152) = 10.8
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (two, one))
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5


def test_tensor_parallel_full_finetune_trains_as_one_process_and_resumes_its_split_checkpoints(tiny_llama_dir,
                                                                                              tmp_path):
    """tp_size 2: every layer's weights split over 2 processes (both see the same batch), the same optimisation as
    one process; its checkpoints (each process's shards, torch's distributed checkpoint) resume exactly."""
    from transformers import AutoModelForCausalLM

    # replay on: rank 0 generates it alone, with a plain copy (the split model loads in every process at once)
    values = keys(tiny_llama_dir, tmp_path / "unused", finetuning_type="full", learning_rate=1e-3,
                  group_by_length=False, learned_check=False, tp_size=2, replay_ratio=0.5)
    config = write_config(tmp_path, values)
    one, split, resumed = tmp_path / "one", tmp_path / "split", tmp_path / "resumed"
    output = run(config, f"output_dir={split}")
    assert "x 2 processes (tensor parallel)" in output
    assert_one_writer(split, output)
    run(config, f"output_dir={one}", "nproc_per_node=1", "tp_size=1", "save_strategy=no")
    assert losses(split) == pytest.approx(losses(one), abs=1e-4)
    assert losses(split)[-1] < losses(split)[0] - 0.1
    want = AutoModelForCausalLM.from_pretrained(one).state_dict()
    got = AutoModelForCausalLM.from_pretrained(split).state_dict()  # gathered: one plain model
    assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-4
    checkpoint = split / "checkpoint-4"
    assert (checkpoint / "split_state").is_dir()
    assert json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text())["engine"] == "tensor parallel"

    run(config, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}")
    assert [r["step"] for r in read_log(resumed) if "loss" in r] == list(range(5, MAX_STEPS + 1))
    assert losses(resumed) == pytest.approx(losses(split)[4:], abs=1e-6)
    again = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert max((again[k] - got[k]).abs().max().item() for k in got) <= 1e-6


def test_a_deepspeed_checkpoint_is_resumed_only_by_as_many_processes(tmp_path):
    from ftkit.train.checkpoints import plan_resume, write_checkpoint_manifest

    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    (checkpoint / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    write_checkpoint_manifest(checkpoint, processes=2, engine="deepspeed")
    assert plan_resume(tmp_path, None, False, world_size=2, report=print).step == 2
    with pytest.raises(FtkitError) as caught:
        plan_resume(tmp_path, None, False, world_size=4, report=print)
    assert str(caught.value) == (
        f"{checkpoint} was saved by 2 DeepSpeed processes and this run has 4; DeepSpeed shards resume only "
        "with as many processes as saved them, so launch 2 (nproc_per_node x nnodes), or start over with "
        "resume_from_checkpoint: false and overwrite_output_dir: true.")


def test_two_nodes_on_one_machine_train_as_one_run(tiny_llama_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path, keys(tiny_llama_dir, output_dir, nproc_per_node=1, nnodes=2,
                                         master_port=free_port(), save_strategy="no"))
    nodes = [subprocess.Popen(command(config, f"node_rank={rank}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env(), cwd=REPO) for rank in (1, 0)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[1][-3000:] + outputs[0][-3000:]
    assert "on node 1 of 2 (2 in all)" in outputs[0] and "on node 0 of 2 (2 in all)" in outputs[1]
    assert "done: loss" not in outputs[0]  # node 1's process is rank 1: rank 0 speaks and writes
    assert_one_writer(output_dir, outputs[1])
    values = losses(output_dir)
    assert values[-1] < values[0] - 0.1, values
    assert load_file(str(output_dir / "adapter_model.safetensors"))


def test_deepspeed_zero2_lora_trains_checks_once_and_resumes_a_killed_run_past_a_damaged_checkpoint(
        tiny_llama_dir, tmp_path):
    """An uninterrupted ZeRO-2 LoRA run: rank 0 alone checks and writes, the adapter loads with peft. Then the
    same run with one process killed mid-way: all stop, the launcher names it. The newest checkpoint is damaged:
    the rerun says so, resumes from the one before, and ends with the uninterrupted run's steps, weights, log."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference, output_dir = tmp_path / "reference", tmp_path / "out"
    config = write_config(tmp_path, keys(tiny_llama_dir, reference, deepspeed="ds_z2"))
    output = run(config)
    assert "deepspeed: starting 2 processes" in output and "x 2 processes (deepspeed)" in output
    assert output.count("learned check: 16 training prompts") == 1  # asked of the base once, by rank 0
    assert output.count("training answers learned") == 2  # the check after training, and the summary line
    assert "Traceback" not in output
    assert_one_writer(reference, output)
    values = losses(reference)
    assert values[-1] < values[0] - 0.1, values
    manifest = json.loads((list_checkpoints(reference)[-1].path / CHECKPOINT_MANIFEST).read_text())
    assert (manifest["processes"], manifest["engine"]) == (2, "deepspeed")
    assert any(name.startswith("global_step") for name in manifest["files"])  # ZeRO's own shards are listed
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), reference)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 49152

    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(command(config, f"output_dir={output_dir}"), stdout=sink,
                                    stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    deadline = time.monotonic() + 180
    while len(list_checkpoints(output_dir)) < 2:
        assert launcher.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no second checkpoint in time"
        time.sleep(0.01)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "ftkit" in " ".join(p.cmdline())]
    rank_one = next(p for p in workers if p.environ().get("RANK") == "1")
    rank_one.send_signal(signal.SIGKILL)
    launcher.wait(timeout=60)  # the agent stops the other process within seconds; nothing hangs
    output = log.read_text()
    assert launcher.returncode == 1, output[-3000:]
    assert "training process 1 was killed by signal 9" in output
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)

    checkpoints = list_checkpoints(output_dir)
    newest = checkpoints[-1]
    assert newest.step < MAX_STEPS
    shard = next(newest.path.glob("global_step*/*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as a failed copy to shared storage would leave it
    output = run(config, f"output_dir={output_dir}")
    assert f"{newest.path.name} cannot be resumed ({shard.relative_to(newest.path)} has 100 bytes" in output
    assert f"resuming from {checkpoints[-2].path.name}" in output

    results, expected = (json.loads((d / "train_results.json").read_text()) for d in (output_dir, reference))
    assert results["global_step"] == expected["global_step"] == MAX_STEPS
    assert results["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-4)
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (output_dir, reference))
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert losses(output_dir) == pytest.approx(losses(reference), abs=1e-5)


def test_a_failing_process_stops_the_others_and_its_error_is_shown(tiny_llama_dir, tmp_path):
    (tmp_path / "failing_callback.py").write_text(
        "import os\nfrom transformers import TrainerCallback\n\n"
        "class FailOnRankOne(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kwargs):\n"
        "        if os.environ['RANK'] == '1' and state.global_step == 2:\n"
        "            raise RuntimeError('rank one gives up at step 2')\n")
    config = write_config(tmp_path, keys(tiny_llama_dir, tmp_path / "out", callbacks="failing_callback:FailOnRankOne",
                                         save_strategy="no"))
    started = time.monotonic()
    result = subprocess.run(command(config), capture_output=True, text=True, cwd=REPO, timeout=180,
                            env={**env(), "PYTHONPATH": str(tmp_path)})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "RuntimeError: rank one gives up at step 2" in output  # the failing process's own error
    assert "training process 1 stopped with exit code 1" in output
    assert time.monotonic() - started < 150


# -- refused before any process starts --------------------------------------------------------------------------
def refused(values: dict) -> str:
    with pytest.raises(FtkitError) as caught:
        launch_training(load_stage_config(TrainConfig, None, values), ["train", "unused.yaml"])
    assert not Path(values["output_dir"]).exists()
    return str(caught.value)


def deepspeed_file(folder: Path, values: dict) -> str:
    path = folder / "ds.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_a_deepspeed_file_that_contradicts_the_training_config_is_refused_naming_both(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    path = deepspeed_file(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    assert refused(keys(tiny_llama_dir, out, deepspeed=path)) == (
        f"{path} sets train_micro_batch_size_per_gpu to 8 but the training config's per_device_train_batch_size is 4; "
        "make them agree, or write \"auto\" in the DeepSpeed file to take the training config's value.")
    path = deepspeed_file(tmp_path, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    assert refused(keys(tiny_llama_dir, out, deepspeed=path, bf16=False)) == (
        f"{path} sets bf16.enabled to true but the training config has bf16: false; make them agree, or write "
        "\"auto\" in the DeepSpeed file.")
    path = deepspeed_file(tmp_path, {"train_batch_size": 4})
    assert refused(keys(tiny_llama_dir, out, deepspeed=path)) == (
        f"{path} sets train_batch_size to 4 but the training config's batch size is 8 (per_device_train_batch_size 4 "
        "x gradient_accumulation_steps 1 x 2 processes); make them agree, or write \"auto\" in the DeepSpeed file to "
        "take the training config's value.")
    path = deepspeed_file(tmp_path, {"gradient_clipping": 0.5})
    assert "gradient_clipping to 0.5 but the training config's max_grad_norm is 1" in refused(
        keys(tiny_llama_dir, out, deepspeed=path))


def test_deepspeed_files_that_cannot_work_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    assert refused(keys(tiny_llama_dir, out, deepspeed=str(broken))).startswith(f"{broken}:2:")
    assert refused(keys(tiny_llama_dir, out, deepspeed="ds_z5")) == (
        "deepspeed ds_z5: no such file; give the path of a DeepSpeed JSON config or one of the shipped ones by name "
        "(ds_z0, ds_z2, ds_z2_offload, ds_z3, ds_z3_offload).")
    path = deepspeed_file(tmp_path, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert "offload_param with stage 2; only ZeRO-3 partitions parameters" in refused(
        keys(tiny_llama_dir, out, deepspeed=path))
    path = deepspeed_file(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    assert "without zero_optimization.offload_param.nvme_path" in refused(keys(tiny_llama_dir, out, deepspeed=path))
    assert "QLoRA (a 4-bit base) cannot be sharded by ZeRO-3" in refused(
        keys(tiny_llama_dir, out, deepspeed="ds_z3", finetuning_type="qlora"))


def test_process_counts_ports_and_engines_this_machine_cannot_run_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cores = os.cpu_count()
    assert refused(keys(tiny_llama_dir, out, nproc_per_node=cores + 1)) == (
        f"nproc_per_node {cores + 1} is more than the {cores} CPU cores here; each process needs at least one, so set "
        f"nproc_per_node: {cores} or fewer.")
    assert refused(keys(tiny_llama_dir, out, nproc_per_node=None, deepspeed="ds_z2")).startswith(
        "deepspeed: ds_z2 needs nproc_per_node on a machine without GPUs")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert refused(keys(tiny_llama_dir, out, master_port=port)).startswith(
            f"master_port {port} on 127.0.0.1 is not free")


def test_tensor_parallel_settings_that_cannot_split_the_model_are_refused(tiny_llama_dir, tmp_path):
    import shutil

    out = tmp_path / "out"
    full = {"finetuning_type": "full", "tp_size": 2}
    assert refused(keys(tiny_llama_dir, out, tp_size=2)).startswith(
        "tp_size 2 works with finetuning_type full or freeze: peft's lora layers do not follow")
    assert refused(keys(tiny_llama_dir, out, finetuning_type="full", tp_size=2, nproc_per_node=1)) == (
        "tp_size 2 does not divide the 1 processes (nproc_per_node x nnodes); choose a tp_size that does (the "
        "processes beyond tp_size shard the model by FSDP).")
    odd = shutil.copytree(tiny_llama_dir, tmp_path / "odd")
    settings = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**settings, "num_key_value_heads": 1}))
    assert refused({**keys(odd, out), **full}) == (
        "tp_size 2 does not divide the model's num_key_value_heads (1): each process takes an equal share; choose a "
        "tp_size that divides 1.")
    (odd / "config.json").write_text(json.dumps({**settings, "model_type": "gpt2"}))
    assert refused({**keys(odd, out), **full}).startswith(
        "the gpt2 architecture of " + str(odd) + " has no tensor-parallel plan in transformers")
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, None, {**keys(tiny_llama_dir, out, deepspeed="ds_z3"), **full})
    assert "tp_size 2 splits the model itself and shards the remaining processes by FSDP; remove deepspeed" in str(
        caught.value)


def test_a_missing_deepspeed_install_is_named(tiny_llama_dir, tmp_path):
    """deepspeed made unimportable the way Python blocks a module (``sys.modules[name] = None``)."""
    config = write_config(tmp_path, keys(tiny_llama_dir, tmp_path / "out", deepspeed="ds_z2"))
    script = ("import sys; sys.modules['deepspeed'] = None; from ftkit.cli import main; "
              f"sys.argv = ['ftkit', 'train', {str(config)!r}]; main()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), cwd=REPO,
                            timeout=120)
    assert result.returncode == 1
    assert "error: deepspeed training needs the deepspeed package, which is not installed; run `pip install " \
           "'ftkit[distributed]'`." in result.stderr
    assert "Traceback" not in result.stderr


def test_pipeline_parallelism_is_refused_saying_what_to_use(tiny_llama_dir, tmp_path):
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, None, keys(tiny_llama_dir, tmp_path / "out", pipeline_parallel_size=2))
    assert "ftkit does not pipeline layers across devices" in str(caught.value)
    assert "deepspeed: ds_z3 or fsdp: full_shard" in str(caught.value)


def test_llama_factory_launch_variables_ask_for_a_launch_and_set_it(tiny_llama_dir, tmp_path):
    from ftkit.train.launch import plan_launch, wants_launch

    config = load_stage_config(TrainConfig, None, keys(tiny_llama_dir, tmp_path / "out", nproc_per_node=None)).config
    assert not wants_launch(config, env={})
    assert wants_launch(config, env={"FORCE_TORCHRUN": "1"}) and wants_launch(config, env={"NNODES": "2"})
    launch = plan_launch(config, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1",
                                      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"})
    assert (launch.engine, launch.nproc_per_node, launch.nnodes, launch.node_rank, launch.master_addr,
            launch.master_port, launch.world_size) == ("ddp", 2, 2, 1, "10.0.0.1", 29511, 4)
    with pytest.raises(FtkitError) as caught:
        plan_launch(config, env={"NPROC_PER_NODE": "two"})
    assert str(caught.value) == "environment variable NPROC_PER_NODE='two' is not a whole number; set it to one or unset it."
