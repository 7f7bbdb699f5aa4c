"""One training run inside a (possibly torchrun-launched) process: process group, layout, model,
weights, data, loop, logs, checkpoint.

The core cannot import models or converters (they sit above it), so the caller injects them
through `Hooks`; `mzoo train` passes the real ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from mzoo.config import ConfigError, ModelConfig
from mzoo.layout import Layout
from mzoo.parallel.sharding import to_global, to_local
from mzoo.parallel.state import ParallelState
from mzoo.signals import Heartbeat, RUN_DIR_ENV, StopFlag, Stopped, stop_sentence, write_stop_report
from mzoo.train.device import configure, init_process_group, resolve_device
from mzoo.train.trainer import Sampler, StepLog, TrainConfig, Trainer


@dataclass
class Hooks:
    build_model: Callable[[ModelConfig, ParallelState], torch.nn.Module]
    load_weights: Callable[[torch.nn.Module, str], None]  # any checkpoint, any layout
    # rank 0: canonical tensors -> a new iteration in the root; the callback adds files to that folder
    save_checkpoint: Callable[[ModelConfig, dict[str, torch.Tensor], Path, int, Callable[[Path], None]], None]
    # (train, valid or None) samplers by global sample index
    make_samplers: Callable[[ModelConfig, TrainConfig, ParallelState], tuple[Sampler, Optional[Sampler]]]


@dataclass
class RunConfig:
    model: ModelConfig
    layout: Layout
    train: TrainConfig
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: int = 0
    load_optimizer: bool = True
    log_json: Optional[str] = None
    tensorboard: Optional[str] = None
    save_format: str = "megatron"  # or "hf": weights only, for inference and sharing (finetuning)
    device: str = "auto"  # auto (this rank's GPU when there is one), cuda or cpu
    adapter_only: bool = False  # LoRA: a save holds the trainable (adapter) tensors only, the base is frozen
    resume_from: Optional[str] = None  # LoRA: an adapter folder whose optimizer state and position to restore


OPTIMIZER_FILE = "mzoo_optimizer.safetensors"
TRAIN_STATE_FILE = "mzoo_train_state.json"


def in_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_slurm_env() -> None:
    """Inside `srun` (one task per process) take rank and world size from SLURM, as torchrun would
    set them; MASTER_ADDR must come from the job script (e.g. the first host of the allocation)."""
    from mzoo.errors import UserError

    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in env:
        raise UserError("running under srun needs MASTER_ADDR (and MASTER_PORT) exported by the job script.")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_PORT", "29500")


def build_state(layout: Layout, device: Optional[torch.device] = None) -> ParallelState:
    if not dist.is_initialized():
        if layout.world_size != 1:
            raise ConfigError(f"the layout needs {layout.world_size} processes but this is a single process.")
        return ParallelState.single(layout, device)
    return ParallelState.build(layout, device)


@torch.no_grad()
def gather_canonical(model: torch.nn.Module, state: ParallelState,
                     values: Optional[list[torch.Tensor]] = None, trainable: bool = False) -> dict[str, torch.Tensor]:
    """Canonical tensors of the parameters (or of per-parameter `values`, e.g. Adam states):
    TP shards merged on every rank, pipeline stages collected on the first stage. Holds the whole
    model: fine for the sizes `mzoo train` saves today (see the issue notes). `trainable`: only the
    parameters that train (a LoRA run's adapters)."""
    out: dict[str, torch.Tensor] = {}
    named = [(n, p) for n, p in model.canonical_parameters() if p.requires_grad or not trainable]
    for i, (name, p) in enumerate(named):
        local = p if values is None else values[i]
        if name in out:  # a tied copy on the last stage repeats the embedding
            continue
        out[name] = to_global(p, local, state.tp_group, state.tp, model.cfg.vocab_size).cpu().clone()
    # experts differ across EP ranks (the rest is replicated), then stages differ across PP
    for group, size in ((state.ep_group, state.config.ep), (state.pp_group, state.pp)):
        if group is not None:
            gathered: list = [None] * size
            dist.all_gather_object(gathered, out, group=group)
            out = {}
            for part in gathered:
                for name, value in part.items():
                    out.setdefault(name, value)
    return out


def save(rc: RunConfig, hooks: Hooks, model: torch.nn.Module, trainer: Trainer, state: ParallelState) -> None:
    """Weights in the requested Megatron format plus, in the same iteration folder, the optimizer
    states as canonical tensors (so a resume may use another layout) and the loop's position. A
    LoRA run (`adapter_only`) hands the hook its adapters with the same optimizer files (the frozen
    base has none); a full Hugging Face save is weights only."""
    from safetensors.torch import save_file

    trainer.optimizer.finish_param_gather()  # an interval save comes right after a step's update
    tensors = gather_canonical(model, state, trainable=rc.adapter_only)
    if rc.save_format == "hf" and not rc.adapter_only:  # a Hugging Face folder (replaced at each save): no optimizer
        if state.rank == 0:
            hooks.save_checkpoint(rc.model, tensors, Path(rc.save), trainer.step, lambda folder: None)
        if dist.is_initialized():
            dist.barrier()
        return
    opt = {}
    for kind, values in trainer.optimizer.param_states().items():
        for name, value in gather_canonical(model, state, values, trainable=True).items():  # states: trainable only
            opt[f"{kind}/{name}"] = value.contiguous()
    position = {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
                "optimizer_step": trainer.optimizer.step_count}
    rngs = _gather_rng(state)

    def extra(folder: Path) -> None:  # (a LoRA adapter folder gets them too: its optimizer is the adapters')
        save_file(opt, str(folder / OPTIMIZER_FILE))
        (folder / TRAIN_STATE_FILE).write_text(json.dumps(position) + "\n")
        _write_rng(folder, rngs, _layout_key(state))

    if state.rank == 0:
        hooks.save_checkpoint(rc.model, tensors, Path(rc.save), trainer.step, extra)
    if dist.is_initialized():
        dist.barrier()


def _layout_key(state: ParallelState) -> str:
    c = state.config
    cp = f"-cp{c.cp}" if c.cp > 1 else ""  # runs without CP keep the key their checkpoints were saved under
    return f"tp{c.tp}-pp{c.pp}-vpp{c.vpp}-dp{c.dp}-ep{c.ep}-sp{int(c.sequence_parallel)}{cp}"


def _gather_rng(state: ParallelState) -> list[dict[str, torch.Tensor]]:
    """Every rank's random streams (dropout), collected on rank 0 so that they are written inside
    the iteration folder before it is renamed and the tracker moves (a save killed at any moment
    leaves either a complete iteration or none)."""
    mine = {k: v.clone() for k, v in state.rng.state_dict().items()}
    if not dist.is_initialized():
        return [mine]
    gathered: list = [None] * dist.get_world_size() if state.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered if state.rank == 0 else []


def _write_rng(folder: Path, rngs: list[dict[str, torch.Tensor]], layout: str) -> None:
    """`mzoo_rng/rank_XXXXX.safetensors` per global rank, restored on resume in the same layout."""
    from safetensors.torch import save_file

    out = folder / "mzoo_rng"
    out.mkdir(exist_ok=True)
    for rank, streams in enumerate(rngs):
        save_file(streams, str(out / f"rank_{rank:05d}.safetensors"), metadata={"layout": layout})


def _load_rng(folder: Path, state: ParallelState) -> bool:
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = folder / "mzoo_rng" / f"rank_{state.rank:05d}.safetensors"
    if not file.exists():
        return False
    with safe_open(str(file), "pt") as f:
        if (f.metadata() or {}).get("layout") != _layout_key(state):
            return False  # another layout: streams cannot map one to one; keep the fresh seeding
    state.rng.load_state_dict(load_file(str(file)))
    return True


def saved_position(path: str | Path) -> Optional[dict[str, Any]]:
    """The loop's position a checkpoint was saved at ({step, consumed_samples, optimizer_step}), or
    None when it carries no optimizer state to resume (a conversion, Hugging Face weights)."""
    from mzoo.ckpt.hf import CheckpointError
    from mzoo.ckpt.megatron.tracker import find_iteration_dir

    try:
        folder, _ = find_iteration_dir(Path(path))
    except CheckpointError:
        return None
    if not (folder / OPTIMIZER_FILE).exists() or not (folder / TRAIN_STATE_FILE).exists():
        return None
    return json.loads((folder / TRAIN_STATE_FILE).read_text())


def resume(path: str, model: torch.nn.Module, trainer: Trainer, state: ParallelState) -> bool:
    """Restore optimizer states and the loop's position when the checkpoint has them."""
    from mzoo.ckpt.hf import CheckpointError
    from mzoo.ckpt.megatron.tracker import find_iteration_dir

    try:
        folder, _ = find_iteration_dir(Path(path))
    except CheckpointError:
        return False
    return restore(folder, model, trainer, state)


def restore(folder: Path, model: torch.nn.Module, trainer: Trainer, state: ParallelState) -> bool:
    """Optimizer states of the trainable parameters, the loop's position and the random streams saved
    in `folder` (an iteration, or a LoRA adapter folder), when it has them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / OPTIMIZER_FILE).exists() or not (folder / TRAIN_STATE_FILE).exists():
        return False
    saved = load_file(str(folder / OPTIMIZER_FILE))
    states = {}
    for kind in trainer.optimizer.KINDS:
        states[kind] = [to_local(p, saved[f"{kind}/{n}"], state.tp, state.tp_rank)
                        for n, p in model.canonical_parameters() if p.requires_grad]
    position = json.loads((folder / TRAIN_STATE_FILE).read_text())
    trainer.optimizer.load_param_states(states, position["optimizer_step"])
    trainer.step, trainer.consumed_samples = position["step"], position["consumed_samples"]
    _load_rng(folder, state)
    return True


class _Stop(Exception):
    """Every rank agreed to stop after this step (a signal reached one of them)."""

    def __init__(self, signum: int):
        self.signum = signum


def agreed_stop(flag: StopFlag, device: torch.device) -> int:
    """The signal any rank received (MAX over the world), so that all stop after the same step."""
    pending = flag.pending()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return pending
    value = torch.tensor([pending], dtype=torch.int32, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def run(rc: RunConfig, hooks: Hooks, on_step: Callable[[StepLog], None] = lambda s: None) -> list[StepLog]:
    heartbeat = Heartbeat(int(os.environ.get("RANK", 0))).start()
    try:
        device = resolve_device(rc.device)
        owns_group = init_process_group(device)
        configure(device)
        stopped: Optional[Stopped] = None
        try:
            logs = _run(rc, hooks, on_step, device, heartbeat)  # on an error the launcher tears every rank down
        except Stopped as e:
            if not getattr(e, "agreed", False):
                raise  # a signal before the loop: this rank alone, no teardown in step
            stopped = e
        if owns_group:  # tear the group down in step, so no rank exits under a live communicator thread
            dist.barrier()
            dist.destroy_process_group()
        if stopped is not None:
            raise stopped
        return logs
    finally:
        heartbeat.stop()


def _stopped(rc: RunConfig, hooks: Hooks, model: torch.nn.Module, trainer: Trainer, state: ParallelState,
             signum: int) -> Stopped:
    """Save the step every rank stopped after (as an interval save would) and say so."""
    if rc.save:
        save(rc, hooks, model, trainer, state)
    if state.rank == 0:
        write_stop_report(signum, trainer.step, rc.save, rc.save_format == "hf")
    error = Stopped(signum, stop_sentence(signum, trainer.step, rc.save, rc.save_format == "hf"))
    error.agreed = True
    error.supervised = RUN_DIR_ENV in os.environ  # the parent prints the sentence and sets the exit code
    return error


def _run(rc: RunConfig, hooks: Hooks, on_step: Callable[[StepLog], None], device: torch.device,
         heartbeat: Optional[Heartbeat] = None) -> list[StepLog]:
    heartbeat = heartbeat or Heartbeat(0)
    flag = StopFlag()
    state = build_state(rc.layout, device)
    torch.manual_seed(rc.train.seed)
    model = hooks.build_model(rc.model, state)
    if rc.load:
        hooks.load_weights(model, rc.load)
    else:
        model.init_weights(seed=rc.train.seed)
    train_sampler, valid_sampler = hooks.make_samplers(rc.model, rc.train, state)
    trainer = Trainer(model, rc.model, state, rc.train, train_sampler, valid_sampler)
    if rc.load and rc.load_optimizer:
        resume(rc.load, model, trainer, state)
    if rc.resume_from:
        restore(Path(rc.resume_from), model, trainer, state)
    log_file = open(rc.log_json, "a" if trainer.step else "w") if rc.log_json and state.rank == 0 else None
    board = None
    if rc.tensorboard and state.rank == 0:
        from mzoo.train.tensorboard import EventWriter

        board = EventWriter(rc.tensorboard)

    def step(log: StepLog) -> None:
        if log_file:
            log_file.write(json.dumps(asdict(log)) + "\n")
            log_file.flush()
        if board:
            values = {"train/loss": log.loss, "train/lr": log.lr, "train/grad_norm": log.grad_norm,
                      "perf/tokens_per_s": log.tokens_per_s, "perf/tflops_per_device": log.tflops_per_device,
                      "train/loss_scale": log.loss_scale}
            if log.mfu is not None:
                values["perf/mfu"] = log.mfu
            if log.val_loss is not None:
                values["valid/loss"] = log.val_loss
            board.scalars(log.step, values)
        on_step(log)
        heartbeat.beat(log.step)
        signum = agreed_stop(flag, device)
        if signum:
            raise _Stop(signum)
        if rc.save and rc.save_interval and log.step % rc.save_interval == 0 and log.step < rc.train.steps:
            save(rc, hooks, model, trainer, state)

    with flag.armed():  # a signal during any save (interval, stop or final) waits for it to finish
        try:
            logs = trainer.train(on_step=step)
        except _Stop as stop:
            raise _stopped(rc, hooks, model, trainer, state, stop.signum) from None
        finally:
            if log_file:
                log_file.close()
            if board:
                board.close()
        heartbeat.beat(trainer.step)
        if rc.save:
            save(rc, hooks, model, trainer, state)
    return logs


def summary(rc: RunConfig) -> dict[str, Any]:
    lay = rc.layout
    return {"model": rc.model.name or rc.model.family, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep,
            "cp": lay.cp,
            "sequence_parallel": lay.sequence_parallel, "world_size": lay.world_size,
            "global_batch": rc.train.global_batch, "micro_batch": rc.train.micro_batch,
            "microbatches_per_rank": rc.train.global_batch // (rc.train.micro_batch * lay.dp),
            "seq_len": rc.train.seq_len, "steps": rc.train.steps, "compile": rc.train.compile,
            "distributed_optimizer": rc.train.distributed_optimizer,
            "overlap_grad_reduce": rc.train.overlap_grad_reduce, "overlap_param_gather": rc.train.overlap_param_gather}
