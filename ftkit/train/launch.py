"""Training in several processes: what a config asks for, what is refused before any process starts, the launch.

``ftkit train`` with ``deepspeed:``, ``fsdp:``, ``tp_size``, ``nproc_per_node`` above 1 or ``nnodes`` above 1 (or
LLaMA-Factory's ``FORCE_TORCHRUN=1``) starts itself again in ``nproc_per_node`` processes per node under
torch's elastic launcher, the machinery behind ``torchrun``, called in-process. One launcher serves every
engine: the HF Trainer drives DeepSpeed, FSDP and tensor parallelism through accelerate, which needs only the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...). So nodes, ports and failures
are handled one way, and a run started by the user's own ``torchrun``, ``accelerate launch`` or
``deepspeed`` launcher (``LOCAL_RANK`` set) simply trains as the rank it was given.

Before starting anything the launcher checks what would otherwise fail in every process at once:
the DeepSpeed or FSDP file (shipped name or path, valid JSON/YAML, no value that contradicts the
training config), the packages the engine needs, the process count against the devices, and on node 0
that the rendezvous port is free. When a process fails the launcher stops the others (torch's agent)
and names the process; the process's own error is printed above it.

Inside the processes (``ftkit.train.run``) only rank 0 prints, plots and writes the run's files; it also
decides where to resume and prepares the data first (filling the caches the others then read), so the
forgetting guard's generation and checks run once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ftkit.errors import FtkitError

T = TypeVar("T")

DEEPSPEED_NAMES = ("ds_z0", "ds_z2", "ds_z2_offload", "ds_z3", "ds_z3_offload")
LLAMA_FACTORY_DEEPSPEED = re.compile(r"^(ds_z[023](?:_offload)?)_config\.json$")  # examples/deepspeed/ in its repo
FSDP_NAMES = ("full_shard", "full_shard_offload", "shard_grad_op")
# transformers' FSDP option words, as FSDP2 fsdp_config keys
FSDP_OPTIONS = {"full_shard": {"reshard_after_forward": True}, "shard_grad_op": {"reshard_after_forward": False},
                "offload": {"cpu_offload": True}, "auto_wrap": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
DEFAULT_MULTINODE_PORT = 29500  # torchrun's default; every node must agree on it


@dataclass
class Launch:
    """How many processes, where they meet, and on which engine."""

    engine: str  # "deepspeed", "fsdp", "tensor parallel" or "ddp"
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MULTINODE_PORT

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# -- inside a launched process ------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def inside_launch() -> bool:
    """This process was started by a launcher (ftkit's own, torchrun, accelerate or deepspeed)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_process_group(timeout_seconds: int) -> None:
    """Join the other processes (gloo on CPU, NCCL on GPUs) before data is prepared, so rank 0 can go first.

    accelerate, DeepSpeed and FSDP later find the group already made and use it."""
    import datetime

    import torch
    import torch.distributed as dist

    if world_size() < 2 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_seconds))


def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and give every process its result (an error stops rank 0, and with it all)."""
    if world_size() < 2:
        return decide()
    import torch.distributed as dist

    box = [decide() if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling the dataset and answer caches); the others then run it from them."""
    if world_size() < 2:
        yield
        return
    import torch.distributed as dist

    if not is_main_process():
        dist.barrier()
    yield
    if is_main_process():
        dist.barrier()


def sum_over_processes(value: int) -> int:
    if world_size() < 2:
        return value
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces only GPU tensors
    dist.all_reduce(total)
    return int(total.item())


# -- what the config asks for ---------------------------------------------------------------------------------
def wants_launch(config: Any, env: dict[str, str] | None = None) -> bool:
    """Whether ``config`` trains in several processes (and this process is not one of them already)."""
    env = os.environ if env is None else env
    if inside_launch():
        return False
    forced = env.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "yes")
    return bool(config.deepspeed or config.fsdp or (config.nproc_per_node or 1) > 1 or config.nnodes > 1 or forced
                or config.tp_size > 1 or (_env_int(env, "NNODES") or 1) > 1)


def engine_of(config: Any) -> str:
    if config.tp_size > 1:
        return "tensor parallel"
    return "deepspeed" if config.deepspeed else "fsdp" if config.fsdp else "ddp"


def plan_launch(config: Any, env: dict[str, str] | None = None) -> Launch:
    """The launch ``config`` asks for, with every check that can be made before a process starts."""
    env = os.environ if env is None else env
    import torch

    engine = engine_of(config)
    packages = ["accelerate", "deepspeed"] if engine == "deepspeed" else ["accelerate"]
    for package in packages:
        if not _installed(package):
            install = "pip install 'ftkit[distributed]'" if package == "deepspeed" else f"pip install {package}"
            raise FtkitError(f"{engine} training needs the {package} package, which is not installed; run `{install}`.")
    if engine == "fsdp":
        fsdp_settings(config)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = config.nproc_per_node or _env_int(env, "NPROC_PER_NODE")
    if nproc is None:
        if not gpus:
            raise FtkitError(f"{_reason(config)} needs nproc_per_node on a machine without GPUs: set how many "
                             f"processes to start (for example nproc_per_node: 2; this machine has {os.cpu_count()} "
                             "CPU cores).")
        nproc = gpus
    if gpus and nproc > gpus:
        raise FtkitError(f"nproc_per_node {nproc} is more than the {gpus} GPU(s) visible here; set nproc_per_node: "
                         f"{gpus} or fewer (CUDA_VISIBLE_DEVICES limits what is visible).")
    cores = os.cpu_count() or 1
    if not gpus and nproc > cores:
        raise FtkitError(f"nproc_per_node {nproc} is more than the {cores} CPU cores here; each process needs at "
                         f"least one, so set nproc_per_node: {cores} or fewer.")
    nnodes = config.nnodes if config.nnodes > 1 else (_env_int(env, "NNODES") or 1)
    node_rank = config.node_rank if config.node_rank else (_env_int(env, "NODE_RANK") or 0)
    if node_rank >= nnodes:
        raise FtkitError(f"node_rank {node_rank} is not below nnodes {nnodes}; number the nodes 0 to {nnodes - 1}.")
    addr = config.master_addr if config.master_addr != "127.0.0.1" else env.get("MASTER_ADDR", "127.0.0.1")
    port = config.master_port or _env_int(env, "MASTER_PORT")
    if port is None:
        port = _free_port(addr) if nnodes == 1 else DEFAULT_MULTINODE_PORT
    elif node_rank == 0:
        _check_port_free(addr, port)
    launch = Launch(engine, nproc, nnodes, node_rank, addr, port)
    if engine == "tensor parallel":
        tensor_parallel_check(config, launch.world_size)
    if engine == "deepspeed":
        deepspeed_config(config, world_size=launch.world_size)
    if config.quantization_bits is not None and (engine == "fsdp" or _zero_stage(config, launch.world_size) == 3):
        raise FtkitError(f"QLoRA (a {config.quantization_bits}-bit base) cannot be sharded by "
                         f"{'FSDP' if engine == 'fsdp' else 'ZeRO-3'} in ftkit: sharding bitsandbytes' packed weights "
                         "needs bnb_4bit_quant_storage set to the compute dtype, which ftkit does not set up or test; "
                         "use deepspeed: ds_z2 (the base is replicated, the adapter's states sharded) or train a LoRA "
                         "on the unquantized base.")
    return launch


def tensor_parallel_check(config: Any, world: int) -> None:
    """Refuse a ``tp_size`` that cannot split this model over these processes, before any process starts.

    transformers splits the model at load time by its ``base_model_tp_plan`` (attention heads and MLP columns
    over ``tp_size`` processes, the rest of the processes sharding by FSDP). peft's LoRA layers do not follow
    that plan on row-parallel layers (o_proj, down_proj fail with a shape error in peft 0.21), so only full
    and freeze fine-tuning run tensor parallel.
    """
    tp = config.tp_size
    if config.uses_lora:
        raise FtkitError(f"tp_size {tp} works with finetuning_type full or freeze: peft's {config.finetuning_type} "
                         "layers do not follow transformers' tensor-parallel split of o_proj and down_proj; for an "
                         "adapter on a model too big for one device use fsdp: full_shard or deepspeed: ds_z3.")
    if world % tp:
        raise FtkitError(f"tp_size {tp} does not divide the {world} processes (nproc_per_node x nnodes); choose a "
                         f"tp_size that does (the processes beyond tp_size shard the model by FSDP).")
    from ftkit.models.structure import local_config_dir

    folder = local_config_dir(config)
    if folder is None:  # not on this machine yet: the load in each process reports what does not fit
        return
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(folder).get_text_config()
    except OSError:
        return
    except ValueError:  # a model_type this transformers does not know
        model_config = None
    plan = getattr(model_config, "base_model_tp_plan", None)
    if not plan:
        architecture = getattr(model_config, "model_type", None) or "unknown"
        raise FtkitError(f"the {architecture} architecture of {config.model_name_or_path} has no tensor-parallel plan "
                         "in transformers (base_model_tp_plan); use fsdp: full_shard or deepspeed: ds_z3 to split it "
                         "over processes.")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value % tp:
            raise FtkitError(f"tp_size {tp} does not divide the model's {key} ({value}): each process takes an equal "
                             f"share; choose a tp_size that divides {value}.")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: Python's way of blocking an import
        return False


def _reason(config: Any) -> str:
    if config.deepspeed:
        return f"deepspeed: {config.deepspeed}"
    if config.fsdp:
        return f"fsdp: {config.fsdp}"
    if config.tp_size > 1:
        return f"tp_size: {config.tp_size}"
    return "multi-process training"


def _env_int(env: dict[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise FtkitError(f"environment variable {name}={value!r} is not a whole number; set it to one or unset "
                         "it.") from None


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr if addr not in ("localhost",) else "127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_port_free(addr: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((addr, port))
        except OSError as error:
            raise FtkitError(f"master_port {port} on {addr} is not free ({error.strerror or error}): another "
                             "program or run listens there; choose another master_port (every node must use the "
                             "same) or stop that program.") from None


# -- DeepSpeed and FSDP files -----------------------------------------------------------------------------------
def _shipped(folder: str, name: str, suffix: str) -> Path | None:
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    if "/" in stem or "\\" in stem:
        return None
    candidate = resources.files("ftkit") / "resources" / folder / f"{stem}{suffix}"
    return Path(str(candidate)) if candidate.is_file() else None


def deepspeed_file(value: str) -> Path:
    """The DeepSpeed JSON ``value`` names: a path, else one of ftkit's shipped configs by name; a LLaMA-Factory
    path that is not here (``examples/deepspeed/ds_z3_config.json``) is the shipped config of that name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = _shipped("deepspeed", value, ".json")
    llama_factory = LLAMA_FACTORY_DEEPSPEED.match(path.name)
    if shipped is None and llama_factory:
        shipped = _shipped("deepspeed", llama_factory.group(1), ".json")
    if shipped is not None:
        return shipped
    raise FtkitError(f"deepspeed {value}: no such file; give the path of a DeepSpeed JSON config or one of the "
                     f"shipped ones by name ({', '.join(DEEPSPEED_NAMES)}).")


def deepspeed_config(config: Any, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of ``config.deepspeed`` as the Trainer gets it, after checking it against the run
    in ``world_size`` processes.

    ``auto`` values are left for transformers to fill from the training config; a number that contradicts it
    is refused here, naming both. ZeRO-3 gathers the full weights on the final save, so the output loads
    with plain transformers/peft."""
    path = deepspeed_file(config.deepspeed)
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise FtkitError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); fix the DeepSpeed "
                         "config there.") from None
    if not isinstance(values, dict):
        raise FtkitError(f"{path} holds a JSON {type(values).__name__}, not an object of DeepSpeed settings.")
    micro = 1 if config.uses_packing else config.per_device_train_batch_size
    packed = " (1 with packing: one packed row per step)" if config.uses_packing else ""
    checks = [
        ("train_micro_batch_size_per_gpu", micro, f"per_device_train_batch_size is {micro}{packed}"),
        ("train_batch_size", micro * config.gradient_accumulation_steps * world_size,
         f"batch size is {micro * config.gradient_accumulation_steps * world_size} (per_device_train_batch_size "
         f"{micro} x gradient_accumulation_steps {config.gradient_accumulation_steps} x {world_size} processes)"),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps,
         f"gradient_accumulation_steps is {config.gradient_accumulation_steps}"),
        ("gradient_clipping", config.max_grad_norm, f"max_grad_norm is {config.max_grad_norm:g}"),
        ("optimizer.params.lr", config.learning_rate, f"learning_rate is {config.learning_rate:g}"),
        ("optimizer.params.weight_decay", config.weight_decay, f"weight_decay is {config.weight_decay:g}"),
    ]
    for key, expected, said in checks:
        value = _lookup(values, key)
        if _is_number(value) and float(value) != float(expected):
            raise FtkitError(f"{path} sets {key} to {value} but the training config's {said}; make them agree, or "
                             f"write \"auto\" in the DeepSpeed file to take the training config's value.")
    for key, flag in (("bf16.enabled", "bf16"), ("fp16.enabled", "fp16")):
        value = _lookup(values, key)
        if isinstance(value, bool) and value and getattr(config, flag) is False:
            raise FtkitError(f"{path} sets {key} to true but the training config has {flag}: false; make them "
                             f"agree, or write \"auto\" in the DeepSpeed file.")
        if isinstance(value, bool) and not value and getattr(config, flag) is True:
            raise FtkitError(f"{path} sets {key} to false but the training config has {flag}: true; make them "
                             f"agree, or write \"auto\" in the DeepSpeed file.")
    zero = values.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise FtkitError(f"{path}: zero_optimization must be an object (for example {{\"stage\": 2}}).")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise FtkitError(f"{path} sets zero_optimization.stage to {stage!r}; ZeRO has stages 0, 1, 2 and 3.")
    if stage != 3 and zero.get("offload_param"):
        raise FtkitError(f"{path} sets zero_optimization.offload_param with stage {stage}; only ZeRO-3 partitions "
                         "parameters, so only it can offload them: use stage 3 (ds_z3_offload) or keep "
                         "offload_optimizer alone.")
    for key in ("offload_param", "offload_optimizer"):
        target = zero.get(key) or {}
        if isinstance(target, dict) and target.get("device") == "nvme" and not target.get("nvme_path"):
            raise FtkitError(f"{path} offloads {key.removeprefix('offload_')} states to NVMe without "
                             f"zero_optimization.{key}.nvme_path; set it to a folder on a fast local disk.")
    if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        # Without it ZeRO-3 saves only its shards, and the output does not load with plain transformers/peft.
        values = {**values, "zero_optimization": {**zero, "stage3_gather_16bit_weights_on_model_save": True}}
    return values


def _zero_stage(config: Any, world_size: int) -> int | None:
    if not config.deepspeed:
        return None
    return (deepspeed_config(config, world_size).get("zero_optimization") or {}).get("stage", 0)


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fsdp_settings(config: Any) -> dict[str, Any]:
    """transformers' ``fsdp_config`` from ``config.fsdp`` (a YAML file of fsdp_config keys, a shipped name, or
    the option words full_shard / shard_grad_op / offload / auto_wrap); ``config.fsdp_config`` keys override."""
    import yaml

    value = str(config.fsdp).strip()
    path = Path(value).expanduser()
    file = path if path.is_file() else _shipped("fsdp", value, ".yaml")
    if file is not None:
        try:
            settings = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
            raise FtkitError(f"{where}: not valid YAML; fix the FSDP config there.") from None
        if isinstance(settings, dict) and isinstance(settings.get("fsdp_config"), dict):
            settings = settings["fsdp_config"]  # an accelerate config file
        if not isinstance(settings, dict):
            raise FtkitError(f"{file} must be a YAML mapping of transformers' fsdp_config keys (version, "
                             "reshard_after_forward, auto_wrap_policy, state_dict_type, ...).")
    elif value.endswith((".yaml", ".yml", ".json")) or "/" in value:
        raise FtkitError(f"fsdp {value}: no such file; give the path of an FSDP YAML config, one of the shipped ones "
                         f"by name ({', '.join(FSDP_NAMES)}), or option words such as 'full_shard auto_wrap'.")
    else:
        settings = {"version": 2}
        for word in value.split():
            if word not in FSDP_OPTIONS:
                raise FtkitError(f"fsdp option {word!r} is not one ftkit knows; use full_shard, shard_grad_op, offload "
                                 f"and auto_wrap, or a shipped config by name ({', '.join(FSDP_NAMES)}).")
            settings.update(FSDP_OPTIONS[word])
    return {**settings, **(config.fsdp_config or {})}


# -- the launch ------------------------------------------------------------------------------------------------
def relaunch(launch: Launch, argv: list[str], report: Callable[[str], None]) -> None:
    """Run ``ftkit <argv>`` in ``launch.nproc_per_node`` processes on this node and wait for them all.

    Raises FtkitError naming the process that failed (its own error is printed above)."""
    import logging

    import torch

    os.environ.setdefault("LOGLEVEL", "ERROR")  # the agent's own INFO/WARNING lines (each process's are its own)
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    os.environ["FTKIT_LAUNCHED"] = "1"
    if launch.engine == "deepspeed" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.cuda.is_available():  # torchrun would give each process 1 thread; share the cores instead
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    args = get_args_parser().parse_args([
        f"--nproc_per_node={launch.nproc_per_node}", f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
        f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}", "--max_restarts=0",
        "--monitor_interval=0.5", "-m", "ftkit", *argv,
    ])
    launch_config, command, command_args = config_from_args(args)
    nodes = f" on node {launch.node_rank} of {launch.nnodes}" if launch.nnodes > 1 else ""
    report(f"{launch.engine}: starting {launch.nproc_per_node} processes{nodes} ({launch.world_size} in all), "
           f"rendezvous at {launch.master_addr}:{launch.master_port}")
    try:
        elastic_launch(launch_config, command)(*command_args)
    except ChildFailedError as error:
        failed_rank, failure = error.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"stopped with exit code {code}"
        raise FtkitError(f"training process {failed_rank} {how} (its own error, if it printed one, is above); the "
                         "other processes were stopped. Run the same command again to resume from the last "
                         "complete checkpoint.") from None

