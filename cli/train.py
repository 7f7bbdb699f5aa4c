"""`mzoo train`: pretrain a zoo model on the Megatron-style engine, relaunching under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from mzoo.cli.common import console, err_console, print_json, user_errors
from mzoo.errors import UserError


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--override '{item}' is not key=value; write e.g. --override num_layers=2.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _hooks(fmt: str, tp: int, precision: str = "fp32", data=None, first=None, last=None):
    import torch

    from mzoo.ckpt.megatron.layout import MegatronLayout
    from mzoo.models.canonical import canonical_tensors
    from mzoo.ckpt.megatron.layout import Target
    from mzoo.ckpt.megatron.write import add_iteration
    from mzoo.jobs.sources import load_checkpoint
    from mzoo.models import build_chunks
    from mzoo.train.run import Hooks
    from mzoo.train.trainer import dataset_samplers

    def save(cfg, tensors, root: Path, iteration: int, extra) -> None:
        layout = MegatronLayout(tp=tp, iteration=iteration,
                                make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
        dtype = next(iter(tensors.values())).dtype
        add_iteration(root, cfg, canonical_tensors(cfg), tensors.__getitem__, Target(fmt, layout, dtype), dtype,
                      iteration, extra)

    def sampler(cfg, tcfg, state):
        from dataclasses import replace

        from mzoo.data.gpt import DataConfig

        data_cfg = replace(data or DataConfig(mock=True), seq_len=tcfg.seq_len, seed=tcfg.seed,
                           vocab_size=cfg.vocab_size)
        n_valid = tcfg.eval_iters * tcfg.global_batch if tcfg.eval_interval else None
        return dataset_samplers(data_cfg, tcfg.steps * tcfg.global_batch, n_valid, state)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Hooks(lambda cfg, state: build_chunks(cfg, state, dtype=dtype, first=first, last=last),
                 lambda model, path: load_checkpoint(model, path), save, sampler)


@user_errors
def train(
    model: str = typer.Argument(..., help="Zoo preset (e.g. llama-tiny, llama3-8b) or a model YAML file."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size (default 1, or the planner's with --gpus)."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline-parallel size (1F1B schedule)."),
    vpp: Optional[int] = typer.Option(None, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B)."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel size (default: processes / (tp*pp))."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert-parallel size (MoE models); divides dp: EP groups are carved out of DP ranks."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs in total: without --tp/--pp/--vpp/--ep/--dp the "
                                       "planner picks the layout (also inside torchrun / srun)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="The GPU type the planner assumes (default: this machine's, "
                                      "else h100-80gb)."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Processes per node (default tp*pp*dp / nnodes)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes (run the same command on each, with --node-rank)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's index (multi-node)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0 (multi-node)."),
    master_port: int = typer.Option(29500, "--master-port", help="Port on node 0 (multi-node)."),
    first_stage_layers: Optional[int] = typer.Option(None, "--first-stage-layers", help="Layers on the first pipeline stage."),
    last_stage_layers: Optional[int] = typer.Option(None, "--last-stage-layers", help="Layers on the last pipeline stage."),
    sequence_parallel: bool = typer.Option(False, "--sequence-parallel", help="Split norms/dropout along the sequence over TP."),
    distributed_optimizer: bool = typer.Option(False, "--distributed-optimizer", help="Shard fp32 master weights and Adam states over DP (on when the planner picks the layout)."),
    data: list[str] = typer.Option([], "--data", help="Indexed dataset prefix (repeat; Megatron blend: --data 30 --data a --data 70 --data b)."),
    split: str = typer.Option("969,30,1", "--split", help="train,valid,test shares of every dataset."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Check that this tokenizer fits the model's vocabulary."),
    mock_data: bool = typer.Option(False, "--mock-data", help="Random tokens instead of --data."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sample (default: the preset's recipe, else 128)."),
    micro_batch: Optional[int] = typer.Option(None, help="Samples per micro-batch per DP rank (recipe, else 2)."),
    global_batch: Optional[int] = typer.Option(None, help="Samples per optimizer step, all DP ranks together "
                                               "(recipe, else 8)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (the recipe's tokens / batch, else 20)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (recipe, else 3e-4)."),
    min_lr: Optional[float] = typer.Option(None, help="Final learning rate (recipe, else 3e-5)."),
    warmup: Optional[int] = typer.Option(None, help="Linear warm-up steps (recipe, else 2)."),
    schedule: Optional[str] = typer.Option(None, help="cosine, wsd or constant (recipe, else cosine)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay, matrices only (recipe, else 0.1)."),
    clip_grad: float = typer.Option(1.0, help="Global gradient-norm clipping (0 disables)."),
    seed: int = typer.Option(1234, help="Seed for initialisation and data."),
    device: str = typer.Option("auto", "--device", help="auto (this rank's GPU when torch sees CUDA, else the CPU), cuda or cpu."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 (fp32 master weights and main gradients) or fp16 "
                                            "(+ dynamic loss scaling); default bf16 on GPUs, fp32 on CPUs."),
    recompute: str = typer.Option("none", help="Activation recomputation: none, selective (--recompute-modules) or "
                                  "full (--recompute-num-layers)."),
    recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help="With --recompute selective: "
                                                    "comma list of core_attn (default), mlp, moe."),
    recompute_num_layers: Optional[int] = typer.Option(None, "--recompute-num-layers", help="With --recompute full: "
                                                       "recompute the first N layers of each pipeline chunk (default all)."),
    peak_tflops: Optional[float] = typer.Option(None, help="Device peak TFLOP/s for MFU (detected for known GPUs)."),
    load: Optional[str] = typer.Option(None, "--load", help="Start from this checkpoint (HF or Megatron, any layout)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Checkpoint root: iterations are added, the tracker updated last."),
    save_interval: int = typer.Option(0, "--save-interval", help="Also save every N steps (0: only at the end)."),
    load_optim: bool = typer.Option(True, "--load-optim/--no-load-optim", help="Resume optimizer state and position from --load when present."),
    megatron_format: str = typer.Option("torch_dist", "--megatron-format", help="torch_dist or torch."),
    log_json: Optional[Path] = typer.Option(None, "--log-json", help="One JSON object per step (step, loss, lr, grad_norm, tokens_per_s)."),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Write TensorBoard event files here."),
    eval_interval: int = typer.Option(0, "--eval-interval", help="Validation loss every N steps (0: never)."),
    eval_iters: int = typer.Option(2, "--eval-iters", help="Global batches per validation."),
    override: list[str] = typer.Option([], "--override", help="Preset override key=value (repeatable; dotted keys reach sub-configs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved layout and final losses as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, print one rank's parameters and memory "
                                 "estimate (meta device), and exit without allocating weights or launching."),
    dry_run_rank: int = typer.Option(0, "--dry-run-rank", help="The global rank --dry-run reports on."),
    force: bool = typer.Option(False, "--force", help="Start even when the memory estimate exceeds the device's."),
) -> None:
    """Train a zoo model with tensor, sequence and data parallelism (relaunches itself under torchrun).

    Presets with a published recipe (`mzoo zoo show PRESET`) train with its sequence length, batch,
    learning-rate schedule and token count unless a flag says otherwise. Before anything is
    allocated, each run compares its memory estimate with the device's and stops in one sentence
    when it would not fit (--force goes ahead).

    Example: mzoo train llama-tiny --tp 2 --dp 2 --steps 30 --save ./ckpt
             mzoo train mixtral-tiny --ep 2 --dp 2 --steps 30
             mzoo train llama-tiny --tp 2 --pp 2 --mock-data --dry-run --dry-run-rank 3
    """
    from mzoo.data.gpt import data_config_from_flags
    from mzoo.train.run import RunConfig, in_launcher
    from mzoo.train.device import default_precision, device_type, resolve_device
    from mzoo.train.trainer import TrainConfig
    from mzoo.zoo import resolve, training_settings

    target = device_type(device) if dry_run else resolve_device(device).type  # a dry run needs no GPU
    precision = precision or default_precision(target)
    settings = training_settings(model, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, lr=lr,
                                 min_lr=min_lr, warmup=warmup, schedule=schedule, weight_decay=weight_decay,
                                 steps=steps)
    seq_len, micro_batch, global_batch, steps = (settings[k] for k in ("seq_len", "micro_batch", "global_batch",
                                                                       "steps"))
    lr, min_lr, warmup, schedule, weight_decay = (settings[k] for k in ("lr", "min_lr", "warmup", "schedule",
                                                                        "weight_decay"))
    cfg = resolve(model)
    if override:
        cfg = cfg.replace(**_parse_overrides(override))
    if megatron_format not in ("torch_dist", "torch"):
        raise UserError(f"unknown --megatron-format '{megatron_format}'; use torch_dist or torch.")
    modules, num_layers = recompute_options(recompute, recompute_modules, recompute_num_layers)
    planned = None
    launched = int(os.environ.get("WORLD_SIZE", "1")) if in_launcher() else None
    if all(v is None for v in (tp, pp, vpp, dp, ep)) and (gpus or (launched or 1) > 1):
        from mzoo.train import fit

        if target != "cuda":
            raise UserError("the planner picks layouts for GPUs; on CPUs give the layout (--tp/--pp/--dp), or add "
                            "--dry-run --device cuda to see what it would pick.")
        draft = TrainConfig(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, precision=precision,
                            recompute=recompute, recompute_modules=modules, recompute_num_layers=num_layers)
        planned = fit.auto_layout(cfg, draft, launched or gpus, fit.gpu_type(gpu))
        tp, pp, vpp, dp, ep = planned.tp, planned.pp, planned.vpp, planned.dp, planned.ep
        sequence_parallel, distributed_optimizer = planned.sequence_parallel, True
        first_stage_layers, last_stage_layers = planned.first, planned.last
    elif gpus and nproc_per_node is None and not launched:
        nproc_per_node = gpus // nnodes
    tp, pp, vpp, ep = tp or 1, pp or 1, vpp or 1, ep or 1
    if planned is not None and nproc_per_node is None and not launched:
        nproc_per_node = tp * pp * dp // nnodes
    layout, world = resolve_layout(cfg, tp, pp, vpp, dp, ep, sequence_parallel, nproc_per_node, nnodes, master_addr,
                                   first_stage_layers, last_stage_layers, seq_len)
    if planned is not None and not as_json and int(os.environ.get("RANK", 0)) == 0:
        console.print(planned.why, highlight=False)
    tcfg = TrainConfig(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, steps=steps, lr=lr,
                       min_lr=min_lr, warmup=warmup, schedule=schedule, weight_decay=weight_decay,
                       clip_grad=clip_grad, seed=seed, distributed_optimizer=distributed_optimizer,
                       precision=precision, recompute=recompute, peak_tflops=peak_tflops,
                       eval_interval=eval_interval, eval_iters=eval_iters, recompute_modules=modules,
                       recompute_num_layers=num_layers)
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown --precision '{precision}'; use fp32, bf16 or fp16.")
    if recompute not in ("none", "selective", "full"):
        raise UserError(f"unknown --recompute '{recompute}'; use none, selective or full.")
    from mzoo.parallel.state import ParallelState

    tcfg.validate(ParallelState.single(layout))
    if schedule not in ("cosine", "wsd", "constant"):
        raise UserError(f"unknown --schedule '{schedule}'; use cosine, wsd or constant.")
    if load:
        from mzoo.jobs.sources import open_source

        open_source(load)  # fails now, in one sentence, if the checkpoint is unreadable
    data_cfg = data_config_from_flags(data, split, mock_data, tokenizer, cfg.vocab_size)
    if not mock_data and not in_launcher():  # build (and cache) the sample indices now: bad data fails here
        from dataclasses import replace as dc_replace

        from mzoo.data.gpt import build_gpt_datasets

        build_gpt_datasets(dc_replace(data_cfg, seq_len=seq_len, seed=seed, vocab_size=cfg.vocab_size),
                           (steps * global_batch, eval_iters * global_batch if eval_interval else None, None))
    if dry_run:  # everything above is what train checks before launch; stop before any real work
        from mzoo.cli.plan import dry_run as report

        report(cfg, layout, tcfg, dry_run_rank, first_stage_layers, last_stage_layers, as_json, target)
        return
    check_memory(cfg, layout, tcfg, device, world // nnodes, force, first_stage_layers, last_stage_layers)
    rc = RunConfig(cfg, layout, tcfg, load, str(save) if save else None, save_interval, load_optim,
                   str(log_json) if log_json else None, str(tensorboard) if tensorboard else None, device=device)
    hooks = _hooks(megatron_format, tp, precision, data_cfg, first_stage_layers, last_stage_layers)
    execute("train", rc, hooks, world, nnodes, node_rank, master_addr, master_port, as_json,
            f"saved {megatron_format} checkpoint to {save}" if save else None)


def recompute_options(recompute: str, modules: Optional[str], num_layers: Optional[int]) -> tuple[tuple, Optional[int]]:
    """(--recompute-modules as a tuple, --recompute-num-layers), each checked against --recompute."""
    from mzoo.models.gpt import RECOMPUTE_MODULES

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


def check_memory(cfg, layout, tcfg, device: str, local_processes: int, force: bool, first=None, last=None) -> None:
    """Stop in one sentence, before anything is allocated, when a rank's estimated peak exceeds what
    its device offers (shared by `train` and `finetune`)."""
    from mzoo.train import fit
    from mzoo.train.device import resolve_device

    where = resolve_device(device)
    result = fit.check(cfg, layout, tcfg, where, local_processes, first, last)
    if result.fits:
        return
    sentence = fit.refusal(cfg, layout, tcfg, where, result, first, last)
    if not force:
        raise UserError(f"{sentence} (--force starts anyway).")
    err_console.print(f"warning: {sentence}; starting anyway (--force).", highlight=False)


def execute(command: str, rc, hooks, world: int, nnodes: int, node_rank: int, master_addr: Optional[str],
            master_port: int, as_json: bool, saved_message: Optional[str]) -> None:
    """Relaunch under torchrun when more than one process is needed, else run here with a progress
    bar and one line per step (shared by `train` and `finetune`)."""
    from mzoo.train.run import in_launcher, run, summary

    if world > 1 and not in_launcher():
        if not as_json:
            console.print(f"layout: {summary(rc)}", highlight=False)
        per_node = world // nnodes
        where = ["--standalone"] if nnodes == 1 else [
            f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
            f"--master-port={master_port}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={per_node}",
               "-m", "mzoo.cli.main", command, *sys.argv[2:]]
        raise typer.Exit(subprocess.call(cmd))

    rank = int(os.environ.get("RANK", 0))
    if rank == 0 and not as_json and not in_launcher():
        console.print(f"layout: {summary(rc)}", highlight=False)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(command), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=rank != 0 or as_json)
    task = bar.add_task(command, total=rc.train.steps)

    def show(log) -> None:
        bar.update(task, completed=log.step)
        if rank == 0 and not as_json:
            mfu = f"  MFU {log.mfu:.1%}" if log.mfu is not None else ""
            skip = "  (skipped: overflow)" if log.skipped else ""
            skip += f"  val_loss {log.val_loss:.4f}" if log.val_loss is not None else ""
            bar.console.print(f"step {log.step:4d}  loss {log.loss:.4f}  lr {log.lr:.2e}  grad_norm "
                              f"{log.grad_norm:.3f}  {log.tokens_per_s:,.0f} tok/s  "
                              f"{log.tflops_per_device:.3f} TFLOP/s{mfu}{skip}", highlight=False)

    with bar:
        logs = run(rc, hooks, show)
    if rank == 0:
        if as_json:
            print_json({"layout": summary(rc), "losses": [log.loss for log in logs],
                        "val_losses": {log.step: log.val_loss for log in logs if log.val_loss is not None}})
        elif saved_message:
            console.print(saved_message, highlight=False)


def resolve_layout(cfg, tp: int, pp: int, vpp: int, dp: Optional[int], ep: int, sequence_parallel: bool,
                   nproc_per_node: Optional[int], nnodes: int, master_addr: Optional[str], first_stage_layers,
                   last_stage_layers, seq_len: int):
    """(ParallelConfig, world size) from the flags, every inconsistency one sentence."""
    from mzoo.config import ParallelConfig
    from mzoo.train.run import adopt_slurm_env, in_launcher

    adopt_slurm_env()
    if nnodes > 1 and not in_launcher() and not master_addr:
        raise UserError("multi-node training needs --master-addr (the address of node 0).")
    world = int(os.environ.get("WORLD_SIZE", (nproc_per_node or 0) * nnodes or tp * pp * (dp or ep)))
    if nproc_per_node is None and world % nnodes:
        raise UserError(f"{world} processes do not split evenly over {nnodes} nodes; set --nproc-per-node.")
    if dp is None:
        dp = max(1, world // (tp * pp))
    layout = ParallelConfig(tp=tp, pp=pp, vpp=vpp, dp=dp, ep=ep, sequence_parallel=sequence_parallel)
    layout.validate_for(cfg)
    if dp % ep:
        raise UserError(f"--ep {ep} must divide the data-parallel size {dp} (expert-parallel groups are carved out "
                        "of the data-parallel ranks, as in Megatron); start a multiple of tp*pp*ep processes.")
    from mzoo.parallel.pipeline import stage_layers

    stage_layers(cfg.num_layers, pp, vpp, first_stage_layers, last_stage_layers)  # one sentence if impossible
    if layout.world_size != world:
        raise UserError(f"tp={tp} x pp={pp} x dp={dp} = {layout.world_size} processes, but {world} were asked for; "
                        "make the product match --nproc-per-node.")
    if cfg.max_position_embeddings < seq_len and cfg.position_embedding == "learned":
        raise UserError(f"--seq-len {seq_len} exceeds the model's {cfg.max_position_embeddings} learned positions.")
    return layout, world
