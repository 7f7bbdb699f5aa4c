"""`mzoo finetune`: supervised finetuning of any checkpoint on JSONL data, on the training engine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo.cli.common import console, user_errors
from mzoo.cli.generate import load_tokenizer
from mzoo.cli.train import check_memory, execute, recompute_options, resolve_layout
from mzoo.errors import UserError


def _hooks(fmt: str, save_format: str, precision: str, sft, tokenizer_dir: Path, first=None, last=None):
    import torch

    from mzoo.ckpt.hf import TOKENIZER_FILES
    from mzoo.ckpt.megatron.layout import MegatronLayout
    from mzoo.models.canonical import canonical_tensors
    from mzoo.converters.hf import save_hf
    from mzoo.ckpt.megatron.layout import Target
    from mzoo.ckpt.megatron.write import add_iteration
    from mzoo.jobs.sources import load_checkpoint
    from mzoo.models import build_chunks
    from mzoo.data import sft as sft_data
    from mzoo.train.run import Hooks

    def save(cfg, tensors, root: Path, iteration: int, extra) -> None:
        dtype = next(iter(tensors.values())).dtype
        ordered = [t.name for t in canonical_tensors(cfg)]
        if save_format == "hf":
            files = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()]
            save_hf(cfg, ((n, tensors[n]) for n in ordered), root, dtype, tokenizer_files=files, overwrite=True)
            return
        layout = MegatronLayout(iteration=iteration, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
        add_iteration(root, cfg, canonical_tensors(cfg), tensors.__getitem__, Target(fmt, layout, dtype), dtype,
                      iteration, extra)

    def samplers(cfg, tcfg, state):
        train, valid, _ = sft_data.build(sft, load_tokenizer(tokenizer_dir), tcfg.seq_len, cfg.vocab_size, tcfg.seed)
        return sft_data.sampler(train, tcfg.seed), (sft_data.sampler(valid, tcfg.seed) if valid else None)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Hooks(lambda cfg, state: build_chunks(cfg, state, dtype=dtype, first=first, last=last),
                 lambda model, path: load_checkpoint(model, path), save, samplers)


@user_errors
def finetune(
    ckpt: Path = typer.Argument(..., help="Checkpoint to start from (Hugging Face or Megatron, any layout)."),
    data: Path = typer.Option(..., "--data", help="Training examples, one JSON object per line."),
    fmt: str = typer.Option("text", "--format", help="text ({text}), prompt-completion ({prompt, completion}) or chat ({messages})."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the checkpoint's)."),
    valid_data: Optional[Path] = typer.Option(None, "--valid-data", help="Validation examples (same format)."),
    valid_fraction: float = typer.Option(0.0, "--valid-fraction", help="Hold out this share of --data for validation."),
    packing: bool = typer.Option(True, "--pack/--no-pack", help="Pack several examples per sequence (attention stays within each)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size."),
    vpp: int = typer.Option(1, "--vpp", help="Virtual pipeline stages per rank."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel size (default: processes / (tp*pp))."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel size (MoE models); divides dp."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Processes per node."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's index (multi-node)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0 (multi-node)."),
    master_port: int = typer.Option(29500, "--master-port", help="Port on node 0 (multi-node)."),
    sequence_parallel: bool = typer.Option(False, "--sequence-parallel", help="Sequence parallelism over TP."),
    distributed_optimizer: bool = typer.Option(False, "--distributed-optimizer", help="Shard optimizer states over DP."),
    seq_len: int = typer.Option(256, help="Tokens per (packed) sequence."),
    micro_batch: int = typer.Option(2, help="Sequences per micro-batch per DP rank."),
    global_batch: int = typer.Option(8, help="Sequences per optimizer step, all DP ranks together."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    lr: float = typer.Option(1e-5, help="Peak learning rate."),
    min_lr: float = typer.Option(1e-6, help="Final learning rate."),
    warmup: int = typer.Option(5, help="Linear warm-up steps."),
    schedule: str = typer.Option("cosine", help="cosine, wsd or constant."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (matrices only)."),
    clip_grad: float = typer.Option(1.0, help="Gradient-norm clipping (0 disables)."),
    seed: int = typer.Option(1234, help="Seed for data order."),
    device: str = typer.Option("auto", "--device", help="auto (this rank's GPU when torch sees CUDA, else the CPU), cuda or cpu."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 (fp32 master weights and main gradients) or fp16 "
                                            "(+ dynamic loss scaling); default bf16 on GPUs, fp32 on CPUs."),
    recompute: str = typer.Option("none", help="none, selective (--recompute-modules) or full (--recompute-num-layers)."),
    recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help="With --recompute selective: "
                                                    "comma list of core_attn (default), mlp, moe."),
    recompute_num_layers: Optional[int] = typer.Option(None, "--recompute-num-layers", help="With --recompute full: "
                                                       "the first N layers of each pipeline chunk (default all)."),
    eval_interval: int = typer.Option(0, "--eval-interval", help="Validation loss every N steps (default: at the end)."),
    eval_iters: int = typer.Option(1, "--eval-iters", help="Global batches per validation."),
    save: Optional[Path] = typer.Option(None, "--save", help="Where to save the finetuned model."),
    save_format: str = typer.Option("hf", "--save-format", help="hf (a from_pretrained folder) or megatron."),
    megatron_format: str = typer.Option("torch_dist", "--megatron-format", help="torch_dist or torch (with --save-format megatron)."),
    save_interval: int = typer.Option(0, "--save-interval", help="Also save every N steps."),
    log_json: Optional[Path] = typer.Option(None, "--log-json", help="One JSON object per step."),
    as_json: bool = typer.Option(False, "--json", help="Print the layout, losses and validation losses as JSON."),
    force: bool = typer.Option(False, "--force", help="Start even when the memory estimate exceeds the device's."),
) -> None:
    """Finetune a checkpoint on prompt/completion, chat or plain-text JSONL; the loss covers only the
    completion (assistant) tokens, examples are packed with attention kept inside each.

    Example: mzoo finetune ./llama-hf --data chat.jsonl --format chat --steps 200 --save ./llama-sft
    """
    from mzoo.jobs.sources import open_source
    from mzoo.data import sft as sft_data
    from mzoo.train.run import RunConfig
    from mzoo.train.trainer import TrainConfig

    from mzoo.train.device import default_precision, resolve_device

    precision = precision or default_precision(resolve_device(device))
    if save_format not in ("hf", "megatron"):
        raise UserError(f"unknown --save-format '{save_format}'; use hf or megatron.")
    if megatron_format not in ("torch_dist", "torch"):
        raise UserError(f"unknown --megatron-format '{megatron_format}'; use torch_dist or torch.")
    if precision not in ("fp32", "bf16", "fp16") or recompute not in ("none", "selective", "full"):
        raise UserError("--precision must be fp32, bf16 or fp16 and --recompute none, selective or full.")
    if schedule not in ("cosine", "wsd", "constant"):
        raise UserError(f"unknown --schedule '{schedule}'; use cosine, wsd or constant.")
    modules, num_layers = recompute_options(recompute, recompute_modules, recompute_num_layers)
    sft_data.read_jsonl(data, fmt)  # a bad line fails first, naming file and line
    if valid_data is not None:
        sft_data.read_jsonl(valid_data, fmt)
    src = open_source(ckpt)
    cfg = src.cfg
    if cfg.ssm is not None and packing:
        raise UserError("packed sequences need attention masks that Mamba layers do not have; add --no-pack.")
    tokenizer_dir = tokenizer or (Path(src.tokenizer_files[0]).parent if src.tokenizer_files else None)
    if tokenizer_dir is None:
        raise UserError(f"{ckpt} carries no tokenizer; pass --tokenizer DIR.")
    layout, world = resolve_layout(cfg, tp, pp, vpp, dp, ep, sequence_parallel, nproc_per_node, nnodes, master_addr,
                                   None, None, seq_len)
    sft = sft_data.SFTConfig(data, fmt, valid_data, valid_fraction, packing)
    train, valid, stats = sft_data.build(sft, load_tokenizer(tokenizer_dir), seq_len, cfg.vocab_size, seed)  # bad data fails here
    if valid is not None and not eval_interval:
        eval_interval = steps
    tcfg = TrainConfig(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, steps=steps, lr=lr,
                       min_lr=min_lr, warmup=warmup, schedule=schedule, weight_decay=weight_decay,
                       clip_grad=clip_grad, seed=seed, distributed_optimizer=distributed_optimizer,
                       precision=precision, recompute=recompute, eval_interval=eval_interval if valid else 0,
                       eval_iters=eval_iters, recompute_modules=modules, recompute_num_layers=num_layers)
    from mzoo.parallel.state import ParallelState

    tcfg.validate(ParallelState.single(layout))
    check_memory(cfg, layout, tcfg, device, world // nnodes, force)
    rc = RunConfig(cfg, layout, tcfg, str(ckpt), str(save) if save else None, save_interval, False,
                   str(log_json) if log_json else None, save_format=save_format, device=device)
    hooks = _hooks(megatron_format, save_format, precision, sft, tokenizer_dir)
    from mzoo.train.run import in_launcher

    if not as_json and not in_launcher():
        console.print(f"data: {stats['examples']} examples -> {stats['samples']} sequences of {seq_len} tokens, "
                      f"{stats['trained_tokens']} trained tokens; {stats['valid_samples']} validation sequences",
                      highlight=False)
    saved = f"saved the finetuned model ({save_format}) to {save}" if save else None
    execute("finetune", rc, hooks, world, nnodes, node_rank, master_addr, master_port, as_json, saved)
