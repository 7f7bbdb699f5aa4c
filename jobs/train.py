"""`mzoo train` / `mzoo finetune`: turn a request into a checked run (model, layout, schedule, data,
checkpoint I/O wired as the engine's hooks) and start it, here or under torchrun.

Every check a user can fail runs in `prepare` (or finetune's), before any weight is allocated or any
process launched; `start` then relaunches under torchrun when the layout needs several processes, or
runs in this process and reports every step through a callback.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from mzoo.ckpt.assets import Assets, tokenizer_assets
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
from mzoo.ckpt.runlock import run_lock
from mzoo.ckpt.megatron.write import add_iteration
from mzoo.config import ModelConfig
from mzoo.converters.hf import save_hf
from mzoo.data.gpt import DataConfig, build_gpt_datasets, data_config_from_flags
from mzoo.errors import UserError
from mzoo.jobs.saves import DTYPES, check_save, check_save_space, first_save
from mzoo.jobs.sources import Source, load_checkpoint, open_source
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.models.canonical import canonical_tensors, kind_tensors
from mzoo.models.gpt import RECOMPUTE_MODULES
from mzoo.parallel.pipeline import stage_layers
from mzoo.parallel.sharding import check_split
from mzoo.parallel.state import ParallelState
from mzoo.train import fit
from mzoo.train.device import default_precision, device_type, resolve_device
from mzoo.train.supervise import Outcome, supervise
from mzoo.train.run import Hooks, RunConfig, adopt_slurm_env, in_launcher, run, saved_position
from mzoo.train.trainer import StepLog, TrainConfig, dataset_samplers
from mzoo.zoo import resolve, training_settings



# ---- the parts of a request that train and finetune share ---------------------------------------------
@dataclass(frozen=True)
class LayoutFlags:
    """The parallel layout as asked for; None where the flag was not given."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    sequence_parallel: bool = False
    cp: Optional[int] = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.tp, self.pp, self.vpp, self.dp, self.ep, self.cp))


@dataclass(frozen=True)
class Launch:
    """Where the processes run: one node (torchrun --standalone) or several (run on each node)."""

    nproc_per_node: Optional[int] = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: int = 29500
    watchdog: float = 600.0  # seconds a rank may make no progress before the parent ends the job (0: off)

    def __post_init__(self) -> None:
        if not self.watchdog >= 0:  # NaN too
            raise UserError(f"--watchdog {self.watchdog:g} is not a number of seconds; give 0 (off) or more.")


@dataclass(frozen=True)
class Engine:
    """How the engine runs: device, precision, recomputation, optimizer sharding."""

    device: str = "auto"
    precision: Optional[str] = None  # default: bf16 on GPUs, fp32 on CPUs
    recompute: str = "none"
    recompute_modules: Optional[str] = None  # comma list, with recompute selective
    recompute_num_layers: Optional[int] = None  # with recompute full
    distributed_optimizer: bool = False
    force: bool = False  # start even when the memory estimate exceeds the device's
    overlap_grad_reduce: bool = False  # DP reductions inside the backward
    overlap_param_gather: bool = False  # distributed optimizer's all-gather under the next forward
    bucket_elements: int = 40_000_000  # per DP gradient bucket
    compile: bool = False  # torch.compile each decoder layer


@dataclass(frozen=True)
class Outputs:
    save: Optional[Path] = None
    save_interval: int = 0
    megatron_format: str = "torch_dist"
    log_json: Optional[Path] = None
    tensorboard: Optional[Path] = None
    eval_interval: int = 0
    eval_iters: int = 2
    overwrite: bool = False  # --save may replace what the folder holds


@dataclass
class Prepared:
    """A checked run, ready to start."""

    command: str  # train or finetune: what a torchrun relaunch runs again
    run: RunConfig
    hooks: Hooks
    world: int
    launch: Launch
    why: Optional[str] = None  # the planner's reason, when it picked the layout
    saved: Optional[str] = None  # what to say after a save
    notes: list[str] = field(default_factory=list)  # warnings (e.g. --force over the memory estimate)
    device: str = "cpu"  # the device kind the run (or a dry run's estimate) is for
    data_stats: dict[str, int] = field(default_factory=dict)  # finetune: examples, sequences, trained tokens
    loaded: Optional["Loaded"] = None  # what --load read
    nothing_to_train: bool = False  # --load is already at the target step
    lora: Optional[Any] = None  # finetune: the LoRA adapters the run trains (mzoo.parallel.lora.LoRAConfig)


@dataclass(frozen=True)
class Loaded:
    """What `--load` read: the checkpoint, its format, iteration and layout, and the step it resumes at
    (None: weights only, no optimizer state or --no-load-optim)."""

    path: str
    format: str
    iteration: int | str
    step: Optional[int]
    layout: Layout

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"path": self.path, "format": self.format, "iteration": self.iteration, "step": self.step,
                "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep}}

    def line(self) -> str:
        lay = self.layout
        at = f", step {self.step}" if self.step is not None else ", weights only"
        where = f" iteration {self.iteration}" if self.format != "hf" else ""
        return f"loaded {self.path}: {self.format}{where}{at}, tp={lay.tp} pp={lay.pp} vpp={lay.vpp} ep={lay.ep}"


def open_load(path: str, load_optim: bool, steps: int, trust_pickle: bool = False) -> tuple[Loaded, Assets]:
    """Open --load (one sentence if unreadable) and check its step against the target: a checkpoint past
    --steps is refused, before anything is launched or rewritten."""
    src = open_source(path, trust_pickle)
    position = saved_position(path) if load_optim else None
    step = int(position["step"]) if position else None
    if step is not None and step > steps:
        raise UserError(f"--steps {steps} is below step {step} that {path} was saved at; pass --steps above {step} "
                        "to train on (or --no-load-optim to start a new schedule from its weights).")
    return loaded_from(src, path, step), src.assets


def loaded_from(src: Source, path: str | Path, step: Optional[int]) -> Loaded:
    """What a run reads from `src` (train's --load, finetune's base checkpoint), as the line it prints."""
    layout = src.megatron.layout if src.megatron is not None else Layout()
    return Loaded(str(path), src.fmt, src.iteration, step, layout)


# ---- checks ---------------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--override '{item}' is not key=value; write e.g. --override num_layers=2.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def recompute_options(recompute: str, modules: Optional[str], num_layers: Optional[int]) -> tuple[tuple, Optional[int]]:
    """(--recompute-modules as a tuple, --recompute-num-layers), each checked against --recompute."""
    chosen = tuple(m.strip() for m in modules.split(",") if m.strip()) if modules else ()
    if chosen and recompute != "selective":
        raise UserError("--recompute-modules needs --recompute selective.")
    unknown = [m for m in chosen if m not in RECOMPUTE_MODULES]
    if unknown:
        raise UserError(f"unknown --recompute-modules {', '.join(unknown)}; use {', '.join(RECOMPUTE_MODULES)} "
                        "(mzoo's SwiGLU / GeGLU already recompute their activation; layernorm and moe_act are not "
                        "available yet).")
    if num_layers is not None and (recompute != "full" or num_layers < 1):
        raise UserError("--recompute-num-layers needs --recompute full and a count of at least 1.")
    return chosen, num_layers


def check_megatron_format(megatron_format: str) -> None:
    if megatron_format not in ("torch_dist", "torch"):
        raise UserError(f"unknown --megatron-format '{megatron_format}'; use torch_dist or torch.")


def resolve_layout(cfg: ModelConfig, flags: LayoutFlags, launch: Launch, seq_len: int) -> tuple[Layout, int]:
    """(Layout, world size) from the flags, every inconsistency one sentence."""
    tp, pp, vpp, ep, dp = flags.tp or 1, flags.pp or 1, flags.vpp or 1, flags.ep or 1, flags.dp
    cp = flags.cp or 1
    adopt_slurm_env()
    nnodes = launch.nnodes
    if nnodes > 1 and not in_launcher() and not launch.master_addr:
        raise UserError("multi-node training needs --master-addr (the address of node 0).")
    fewest_dp = ep // math.gcd(ep, cp)  # the smallest dp whose dp x cp ranks hold the EP groups
    world = int(os.environ.get("WORLD_SIZE", (launch.nproc_per_node or 0) * nnodes or tp * pp * cp * (dp or fewest_dp)))
    if launch.nproc_per_node is None and world % nnodes:
        raise UserError(f"{world} processes do not split evenly over {nnodes} nodes; set --nproc-per-node.")
    if dp is None:
        dp = max(1, world // (tp * pp * cp))
    layout = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, ep=ep, cp=cp, sequence_parallel=flags.sequence_parallel,
                    first_stage_layers=flags.first_stage_layers, last_stage_layers=flags.last_stage_layers)
    layout.validate_for(cfg)
    check_split(kind_tensors(cfg), layout.tp, layout.expert_tp)  # ffn, experts, Mamba: before any process starts
    if (dp * cp) % ep:
        where = "data-parallel size" if cp == 1 else "data x context parallel size"
        raise UserError(f"--ep {ep} must divide the {where} {dp * cp} (expert-parallel groups are carved out "
                        "of those ranks, as in Megatron); start a multiple of tp*pp*ep processes.")
    stage_layers(cfg.num_layers, pp, vpp, flags.first_stage_layers, flags.last_stage_layers)  # one sentence if not
    if layout.world_size != world:
        product = f"tp={tp} x pp={pp} x dp={dp}" if cp == 1 else f"tp={tp} x pp={pp} x cp={cp} x dp={dp}"
        raise UserError(f"{product} = {layout.world_size} processes, but {world} were asked for; "
                        "make the product match --nproc-per-node.")
    split = layout.sequence_problem(seq_len)
    if split is not None:
        raise UserError(split)
    if cfg.max_position_embeddings < seq_len and cfg.position_embedding == "learned":
        raise UserError(f"--seq-len {seq_len} exceeds the model's {cfg.max_position_embeddings} learned positions.")
    return layout, world


def check_memory(cfg: ModelConfig, layout: Layout, tcfg: TrainConfig, device: str, local_processes: int,
                 force: bool, lora=None) -> Optional[str]:
    """Stop in one sentence, before anything is allocated, when a rank's estimated peak exceeds what
    its device offers; with `force`, the warning to show instead. `lora`: a LoRA run's adapters."""
    where = resolve_device(device)
    result = fit.check(cfg, layout, tcfg, where, local_processes, lora)
    if result.fits:
        return None
    sentence = fit.refusal(cfg, layout, tcfg, where, result)
    if not force:
        raise UserError(f"{sentence} (--force starts anyway).")
    return f"warning: {sentence}; starting anyway (--force)."


# ---- the save folder ----------------------------------------------------------------------------------
# ---- the engine's hooks ----------------------------------------------------------------------------------
def checkpoint_layout(cfg: ModelConfig, layout: Layout, iteration: int) -> MegatronCheckpoint:
    """The layout a training save records: the one the run used (its TP, PP, VPP, EP and stage split)."""
    return MegatronCheckpoint(layout=layout, iteration=iteration, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)


def hooks(layout: Layout, precision: str, samplers: Callable, megatron_format: str = "torch_dist",
          assets: Assets = Assets(), hf: bool = False, trust_pickle: bool = False) -> Hooks:
    """The engine's hooks: build chunks at `precision`, load any checkpoint, save Megatron at the run's
    layout (or, with `hf`, Hugging Face weights), the tokenizer and special ids in `assets` with them."""
    dtype = DTYPES[precision]

    def save(cfg: ModelConfig, tensors: dict[str, torch.Tensor], root: Path, iteration: int, extra) -> None:
        stored = next(iter(tensors.values())).dtype
        if hf:
            ordered = [t.name for t in canonical_tensors(cfg)]
            save_hf(cfg, ((n, tensors[n]) for n in ordered), root, stored, assets=assets, overwrite=True)
            return
        target = Target(megatron_format, checkpoint_layout(cfg, layout, iteration), stored)
        add_iteration(root, cfg, canonical_tensors(cfg), tensors.__getitem__, target, stored, iteration, extra, assets)

    return Hooks(lambda cfg, state: build_chunks(cfg, state, dtype=dtype),
                 lambda model, path: load_checkpoint(model, path, trust_pickle), save, samplers)


def pretraining_samplers(data: Optional[DataConfig]) -> Callable:
    """Samplers over indexed (or mock) data, sized by the run's steps and evaluation."""
    def make(cfg: ModelConfig, tcfg: TrainConfig, state: ParallelState):
        data_cfg = replace(data or DataConfig(mock=True), seq_len=tcfg.seq_len, seed=tcfg.seed,
                           vocab_size=cfg.vocab_size)
        n_valid = tcfg.eval_iters * tcfg.global_batch if tcfg.eval_interval else None
        return dataset_samplers(data_cfg, tcfg.steps * tcfg.global_batch, n_valid, state)

    return make


# ---- train -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hyper:
    """Schedule and batch; None: the preset's recipe, else mzoo's default (zoo.DEFAULTS)."""

    seq_len: Optional[int] = None
    micro_batch: Optional[int] = None
    global_batch: Optional[int] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup: Optional[int] = None
    schedule: Optional[str] = None
    weight_decay: Optional[float] = None
    clip_grad: float = 1.0
    seed: int = 1234


@dataclass(frozen=True)
class TrainRequest:
    model: str  # zoo preset or model YAML
    layout: LayoutFlags = LayoutFlags()
    launch: Launch = Launch()
    engine: Engine = Engine()
    hyper: Hyper = Hyper()
    outputs: Outputs = Outputs()
    data: tuple[str, ...] = ()  # indexed dataset prefixes, Megatron blend
    split: str = "969,30,1"
    tokenizer: Optional[Path] = None
    mock_data: bool = False
    overrides: tuple[str, ...] = ()  # key=value
    gpus: Optional[int] = None  # with no layout flags: the planner picks the layout
    gpu: Optional[str] = None
    peak_tflops: Optional[float] = None
    load: Optional[str] = None
    load_optim: bool = True
    dry_run: bool = False
    trust_pickle: bool = False  # for --load


def _planned(cfg: ModelConfig, req: TrainRequest, draft: TrainConfig, target: str) -> Optional[fit.AutoLayout]:
    """The planner's layout when no layout flag is given and several GPUs are (--gpus or the launcher's world)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) if in_launcher() else None
    if req.layout.given or not (req.gpus or (launched or 1) > 1):
        return None
    if target != "cuda":
        raise UserError("the planner picks layouts for GPUs; on CPUs give the layout (--tp/--pp/--dp), or add "
                        "--dry-run --device cuda to see what it would pick.")
    return fit.auto_layout(cfg, draft, launched or req.gpus, fit.gpu_type(req.gpu))


def prepare_train(req: TrainRequest) -> Prepared:
    """Everything `mzoo train` checks before launch: preset, recipe, layout, schedule, checkpoint, data, memory."""
    eng, h, out = req.engine, req.hyper, req.outputs
    target = device_type(eng.device) if req.dry_run else resolve_device(eng.device).type  # a dry run needs no GPU
    precision = eng.precision or default_precision(target)
    s = training_settings(req.model, seq_len=h.seq_len, micro_batch=h.micro_batch, global_batch=h.global_batch,
                          lr=h.lr, min_lr=h.min_lr, warmup=h.warmup, schedule=h.schedule,
                          weight_decay=h.weight_decay, steps=h.steps)
    cfg = resolve(req.model)
    if req.overrides:
        cfg = cfg.replace(**parse_overrides(req.overrides))
    check_megatron_format(out.megatron_format)
    modules, num_layers = recompute_options(eng.recompute, eng.recompute_modules, eng.recompute_num_layers)
    draft = TrainConfig(seq_len=s["seq_len"], micro_batch=s["micro_batch"], global_batch=s["global_batch"],
                        precision=precision, recompute=eng.recompute, recompute_modules=modules,
                        recompute_num_layers=num_layers, schedule=s["schedule"])
    draft.validate_choices()
    planned = _planned(cfg, req, draft, target)
    flags, launch, distributed_optimizer = req.layout, req.launch, eng.distributed_optimizer
    overlap = False
    if planned is not None:
        p = planned.layout
        flags = LayoutFlags(p.tp, p.pp, p.vpp, p.dp, p.ep, p.first_stage_layers, p.last_stage_layers,
                            p.sequence_parallel, p.cp)
        distributed_optimizer = overlap = True  # what the planner's profile assumed
        if launch.nproc_per_node is None and not in_launcher():
            launch = replace(launch, nproc_per_node=p.world_size // launch.nnodes)
    elif req.gpus and launch.nproc_per_node is None and not in_launcher():
        launch = replace(launch, nproc_per_node=req.gpus // launch.nnodes)
    layout, world = resolve_layout(cfg, flags, launch, s["seq_len"])
    tcfg = TrainConfig(seq_len=s["seq_len"], micro_batch=s["micro_batch"], global_batch=s["global_batch"],
                       steps=s["steps"], lr=s["lr"], min_lr=s["min_lr"], warmup=s["warmup"], schedule=s["schedule"],
                       weight_decay=s["weight_decay"], clip_grad=h.clip_grad, seed=h.seed,
                       distributed_optimizer=distributed_optimizer, precision=precision, recompute=eng.recompute,
                       overlap_grad_reduce=eng.overlap_grad_reduce or overlap,
                       overlap_param_gather=eng.overlap_param_gather or overlap, bucket_elements=eng.bucket_elements,
                       peak_tflops=req.peak_tflops, eval_interval=out.eval_interval, eval_iters=out.eval_iters,
                       recompute_modules=modules, recompute_num_layers=num_layers, compile=eng.compile)
    tcfg.validate(ParallelState.single(layout))
    tcfg.validate_compile(cfg)
    loaded, assets = (open_load(req.load, req.load_optim, tcfg.steps, req.trust_pickle) if req.load
                      else (None, Assets()))
    check_save(out.save, out.overwrite, False, tcfg.steps, out.save_interval, req.load)
    start = (loaded.step or 0) if loaded is not None else 0
    if start < tcfg.steps:
        check_save_space(out.save, cfg, precision, False, first_save(start, tcfg.steps, out.save_interval))
    notes = []
    if not req.dry_run:  # before the data's indices are built
        warning = check_memory(cfg, layout, tcfg, eng.device, world // launch.nnodes, eng.force)
        notes += [warning] if warning else []
    if req.tokenizer is not None and Path(req.tokenizer).is_dir():  # the data's tokenizer travels with the saves
        assets = assets.with_tokenizer(tokenizer_assets(Path(req.tokenizer)))
    data_cfg = data_config_from_flags(req.data, req.split, req.mock_data, req.tokenizer, cfg.vocab_size)
    if not req.mock_data and not in_launcher():  # build (and cache) the sample indices now: bad data fails here
        _, valid, _ = build_gpt_datasets(
            replace(data_cfg, seq_len=tcfg.seq_len, seed=tcfg.seed, vocab_size=cfg.vocab_size),
            (tcfg.steps * tcfg.global_batch, tcfg.eval_iters * tcfg.global_batch if tcfg.eval_interval else None,
             None), (True, bool(tcfg.eval_interval), False))
        if tcfg.eval_interval and valid is None:
            raise UserError(f"the valid split is empty: --split {req.split} gives it no share, and --eval-interval "
                            "needs one; pass a valid share (e.g. --split 90,10,0) or drop --eval-interval.")
    rc = RunConfig(cfg, layout, tcfg, req.load, str(out.save) if out.save else None, out.save_interval,
                   req.load_optim, str(out.log_json) if out.log_json else None,
                   str(out.tensorboard) if out.tensorboard else None, device=eng.device)
    run_hooks = hooks(layout, precision, pretraining_samplers(data_cfg), out.megatron_format, assets,
                      trust_pickle=req.trust_pickle)
    saved = f"saved {out.megatron_format} checkpoint to {out.save}" if out.save else None
    return Prepared("train", rc, run_hooks, world, launch, planned.why if planned else None, saved, notes,
                    device=target, loaded=loaded, nothing_to_train=loaded is not None and loaded.step == tcfg.steps)


# ---- starting a run ------------------------------------------------------------------------------------------
def torchrun_command(prepared: Prepared, argv: Sequence[str]) -> list[str]:
    """The command that runs `argv` (this command's own arguments) again on every process of this node."""
    launch = prepared.launch
    per_node = prepared.world // launch.nnodes
    where = ["--standalone"] if launch.nnodes == 1 else [
        f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", f"--master-addr={launch.master_addr}",
        f"--master-port={launch.master_port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={per_node}",
            "-m", "mzoo.cli.main", prepared.command, *argv]


def needs_launcher(prepared: Prepared) -> bool:
    return prepared.world > 1 and not in_launcher()


def relaunch(prepared: Prepared, argv: Sequence[str]) -> Outcome:
    """Run the command again under torchrun, supervised: signals reach the workers, which save and
    stop; a rank without progress for --watchdog seconds ends the job (exit 124)."""
    launch = prepared.launch
    per_node = prepared.world // launch.nnodes
    ranks = range(launch.node_rank * per_node, (launch.node_rank + 1) * per_node)
    with run_lock(save_root(prepared), owner=launch.node_rank == 0):  # the node holding rank 0 owns --save
        return supervise(torchrun_command(prepared, argv), list(ranks), launch.watchdog)


def start(prepared: Prepared, on_step: Callable[[StepLog], None] = lambda log: None) -> list[StepLog]:
    """Run in this process (one of torchrun's, or the only one); rank 0 holds the run lock unless the
    `mzoo` parent that launched it does."""
    with run_lock(save_root(prepared), owner=int(os.environ.get("RANK", 0)) == 0):
        return run(prepared.run, prepared.hooks, on_step)


def save_root(prepared: Prepared) -> Optional[str]:
    """The folder a second run must not save into meanwhile: a Megatron --save root (an HF save
    replaces its whole folder, so it is guarded by its atomic switch instead)."""
    return prepared.run.save if prepared.run.save_format == "megatron" else None
