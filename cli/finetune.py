"""`mzoo finetune`: parse, call mzoo.jobs.finetune, print (relaunching under torchrun when needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, user_errors


@user_errors
def finetune(
    ckpt: Path = typer.Argument(..., help="Checkpoint to start from (Hugging Face or Megatron, any layout)."),
    data: Path = typer.Option(..., "--data", help="Training examples, one JSON object per line."),
    fmt: str = typer.Option("text", "--format", help="text ({text}), prompt-completion ({prompt, completion}) or "
                            "chat ({messages})."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the checkpoint's)."),
    valid_data: Optional[Path] = typer.Option(None, "--valid-data", help="Validation examples (same format)."),
    valid_fraction: float = O.option(0.0, "--valid-fraction", help="Hold out this share of --data for validation.",
                                     rule=V.FRACTION),
    packing: bool = typer.Option(True, "--pack/--no-pack", help="Pack several examples per sequence (attention stays "
                                 "within each)."),
    tp: Optional[int] = O.TP, pp: Optional[int] = O.PP, vpp: Optional[int] = O.VPP, dp: Optional[int] = O.DP,
    ep: Optional[int] = O.EP, cp: Optional[int] = O.CP,
    nproc_per_node: Optional[int] = O.NPROC_PER_NODE, nnodes: int = O.NNODES, node_rank: int = O.NODE_RANK,
    master_addr: Optional[str] = O.MASTER_ADDR, master_port: int = O.MASTER_PORT, watchdog: float = O.WATCHDOG,
    sequence_parallel: bool = O.SEQUENCE_PARALLEL, distributed_optimizer: bool = O.DISTRIBUTED_OPTIMIZER,
    overlap_grad_reduce: bool = O.OVERLAP_GRAD_REDUCE, overlap_param_gather: bool = O.OVERLAP_PARAM_GATHER,
    ddp_bucket_size: int = O.DDP_BUCKET_SIZE,
    seq_len: int = O.option(256, help="Tokens per (packed) sequence.", rule=V.POSITIVE),
    micro_batch: int = O.option(2, help="Sequences per micro-batch per DP rank.", rule=V.POSITIVE),
    global_batch: int = O.option(8, help="Sequences per optimizer step, all DP ranks together.", rule=V.POSITIVE),
    steps: int = O.option(100, help="Optimizer steps.", rule=V.POSITIVE),
    lr: float = O.option(1e-5, help="Peak learning rate.", rule=V.FINITE_NON_NEGATIVE),
    min_lr: float = O.option(1e-6, help="Final learning rate.", rule=V.FINITE_NON_NEGATIVE),
    warmup: int = O.option(5, help="Linear warm-up steps.", rule=V.NON_NEGATIVE),
    schedule: str = typer.Option("cosine", help="cosine, wsd or constant."),
    weight_decay: float = O.option(0.0, help="AdamW weight decay (matrices only).", rule=V.FINITE_NON_NEGATIVE),
    clip_grad: float = O.CLIP_GRAD, seed: int = O.SEED, device: str = O.DEVICE,
    precision: Optional[str] = O.PRECISION, recompute: str = O.RECOMPUTE,
    recompute_modules: Optional[str] = O.RECOMPUTE_MODULES, recompute_num_layers: Optional[int] = O.RECOMPUTE_NUM_LAYERS,
    compile_layers: bool = O.COMPILE,
    eval_interval: int = O.EVAL_INTERVAL,
    eval_iters: int = O.option(1, "--eval-iters", help="Global batches per validation.", rule=V.POSITIVE),
    save: Optional[Path] = typer.Option(None, "--save", help="Where to save the finetuned model."),
    save_format: str = typer.Option("hf", "--save-format", help="hf (a from_pretrained folder) or megatron (at the "
                                    "run's layout)."),
    megatron_format: str = O.MEGATRON_FORMAT, save_interval: int = O.SAVE_INTERVAL, log_json: Optional[Path] = O.LOG_JSON,
    as_json: bool = typer.Option(False, "--json", help="Print the layout, losses and validation losses as JSON."),
    force: bool = O.FORCE, trust_pickle: bool = O.TRUST_PICKLE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Let --save replace what the folder holds."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Train low-rank adapters of this rank only "
                                            "(the base stays frozen); --save writes a peft adapter."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA scaling numerator (scaling = alpha / rank)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the adapters' input."),
    lora_targets: str = typer.Option("qkv,proj,fc1,fc2", "--lora-targets", help="Linears that get adapters: "
                                     "qkv, proj, fc1, fc2 (one adapter per Hugging Face projection)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A peft LoRA adapter to continue training "
                                           "(its rank, alpha and targets)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, print one rank's parameters and memory "
                                 "estimate (adapters included), start nothing."),
    dry_run_rank: int = O.option(0, "--dry-run-rank", help="The global rank --dry-run reports on.", rule=V.NON_NEGATIVE),
) -> None:
    """Finetune a checkpoint on prompt/completion, chat or plain-text JSONL; the loss covers only the
    completion (assistant) tokens, examples are packed with attention kept inside each.

    Example: mzoo finetune ./llama-hf --data chat.jsonl --format chat --steps 200 --save ./llama-sft

    LoRA: mzoo finetune ./llama-hf --data chat.jsonl --format chat --lora-rank 16 --tp 2 --save ./adapter
    """
    from mzoo.cli.running import execute
    from mzoo.jobs import finetune as job
    from mzoo.jobs.train import Engine, Hyper, Launch, LayoutFlags, Outputs
    from mzoo.parallel.lora import LoRAConfig, parse_targets
    from mzoo.train.run import in_launcher

    lora = None
    if lora_rank is not None:
        lora = LoRAConfig(lora_rank, lora_alpha, lora_dropout, parse_targets(lora_targets))

    request = job.FinetuneRequest(
        ckpt=ckpt, examples=job.Examples(data, fmt, valid_data, valid_fraction, packing), tokenizer=tokenizer,
        layout=LayoutFlags(tp, pp, vpp, dp, ep, None, None, sequence_parallel, cp),
        launch=Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port, watchdog),
        engine=Engine(device, precision, recompute, recompute_modules, recompute_num_layers, distributed_optimizer,
                      force, overlap_grad_reduce, overlap_param_gather, ddp_bucket_size,
                      compile=compile_layers),
        hyper=Hyper(seq_len, micro_batch, global_batch, steps, lr, min_lr, warmup, schedule, weight_decay,
                    clip_grad, seed),
        outputs=Outputs(save, save_interval, megatron_format, log_json, None, eval_interval, eval_iters, overwrite),
        save_format=save_format, trust_pickle=trust_pickle, lora=lora, adapter=adapter, dry_run=dry_run)
    prepared = job.prepare_finetune(request)
    if dry_run:  # everything above is what finetune checks before launch
        from mzoo.cli.running import print_dry_run
        from mzoo.jobs.plan import dry_run as report

        rc = prepared.run
        print_dry_run(report(rc.model, rc.layout, rc.train, dry_run_rank, prepared.device, prepared.lora), as_json)
        return
    stats = prepared.data_stats
    if not as_json and not in_launcher():
        console.print(f"data: {stats['examples']} examples -> {stats['samples']} sequences of {seq_len} tokens, "
                      f"{stats['trained_tokens']} trained tokens; {stats['valid_samples']} validation sequences",
                      highlight=False)
    execute(prepared, as_json)
