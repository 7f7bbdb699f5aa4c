"""`mzoo train`: parse, call mzoo.jobs.train, print (relaunching under torchrun when needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, user_errors


@user_errors
def train(
    model: str = typer.Argument(..., help="Zoo preset (e.g. llama-tiny, llama3-8b) or a model YAML file."),
    tp: Optional[int] = O.TP, pp: Optional[int] = O.PP, vpp: Optional[int] = O.VPP, dp: Optional[int] = O.DP,
    ep: Optional[int] = O.EP, cp: Optional[int] = O.CP,
    gpus: Optional[int] = O.option(None, "--gpus", help="GPUs in total: without --tp/--pp/--vpp/--ep/--cp/--dp the "
                                       "planner picks the layout (also inside torchrun / srun).", rule=V.POSITIVE),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="The GPU type the planner assumes (default: this machine's, "
                                      "else h100-80gb)."),
    nproc_per_node: Optional[int] = O.NPROC_PER_NODE, nnodes: int = O.NNODES, node_rank: int = O.NODE_RANK,
    master_addr: Optional[str] = O.MASTER_ADDR, master_port: int = O.MASTER_PORT, watchdog: float = O.WATCHDOG,
    first_stage_layers: Optional[int] = O.FIRST, last_stage_layers: Optional[int] = O.LAST,
    sequence_parallel: bool = O.SEQUENCE_PARALLEL, distributed_optimizer: bool = O.DISTRIBUTED_OPTIMIZER,
    overlap_grad_reduce: bool = O.OVERLAP_GRAD_REDUCE, overlap_param_gather: bool = O.OVERLAP_PARAM_GATHER,
    ddp_bucket_size: int = O.DDP_BUCKET_SIZE,
    data: list[str] = typer.Option([], "--data", help="Indexed dataset prefix (repeat; Megatron blend: --data 30 "
                                   "--data a --data 70 --data b)."),
    split: str = typer.Option("969,30,1", "--split", help="train,valid,test shares of every dataset."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Check that this tokenizer fits the model's "
                                             "vocabulary."),
    mock_data: bool = typer.Option(False, "--mock-data", help="Random tokens instead of --data."),
    seq_len: Optional[int] = O.option(None, help="Tokens per sample (default: the preset's recipe, else 128).",
                                      rule=V.POSITIVE),
    micro_batch: Optional[int] = O.option(None, help="Samples per micro-batch per DP rank (recipe, else 2).",
                                          rule=V.POSITIVE),
    global_batch: Optional[int] = O.option(None, help="Samples per optimizer step, all DP ranks together "
                                               "(recipe, else 8).", rule=V.POSITIVE),
    steps: Optional[int] = O.option(None, help="Optimizer steps (the recipe's tokens / batch, else 20).",
                                    rule=V.POSITIVE),
    lr: Optional[float] = O.option(None, help="Peak learning rate (recipe, else 3e-4).", rule=V.FINITE_NON_NEGATIVE),
    min_lr: Optional[float] = O.option(None, help="Final learning rate (recipe, else 3e-5).",
                                       rule=V.FINITE_NON_NEGATIVE),
    warmup: Optional[int] = O.option(None, help="Linear warm-up steps (recipe, else 2).", rule=V.NON_NEGATIVE),
    schedule: Optional[str] = typer.Option(None, help="cosine, wsd or constant (recipe, else cosine)."),
    weight_decay: Optional[float] = O.option(None, help="AdamW weight decay, matrices only (recipe, else 0.1).",
                                             rule=V.FINITE_NON_NEGATIVE),
    clip_grad: float = O.CLIP_GRAD, seed: int = O.SEED, device: str = O.DEVICE,
    precision: Optional[str] = O.PRECISION, recompute: str = O.RECOMPUTE,
    recompute_modules: Optional[str] = O.RECOMPUTE_MODULES, recompute_num_layers: Optional[int] = O.RECOMPUTE_NUM_LAYERS,
    compile_layers: bool = O.COMPILE,
    peak_tflops: Optional[float] = O.option(None, help="Device peak TFLOP/s for MFU (detected for known GPUs).",
                                            rule=V.FINITE_POSITIVE),
    load: Optional[str] = typer.Option(None, "--load", help="Start from this checkpoint (HF or Megatron, any layout)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Checkpoint root: iterations are added (at the run's "
                                        "layout), the tracker updated last."),
    save_interval: int = O.SAVE_INTERVAL,
    load_optim: bool = typer.Option(True, "--load-optim/--no-load-optim", help="Resume optimizer state and position "
                                    "from --load when present."),
    megatron_format: str = O.MEGATRON_FORMAT, log_json: Optional[Path] = O.LOG_JSON,
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Write TensorBoard event files here."),
    eval_interval: int = O.EVAL_INTERVAL,
    eval_iters: int = O.option(2, "--eval-iters", help="Global batches per validation.", rule=V.POSITIVE),
    override: list[str] = typer.Option([], "--override", help="Preset override key=value (repeatable; dotted keys "
                                       "reach sub-configs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved layout and final losses as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, print one rank's parameters and memory "
                                 "estimate (meta device), and exit without allocating weights or launching."),
    dry_run_rank: int = O.option(0, "--dry-run-rank", help="The global rank --dry-run reports on.",
                                 rule=V.NON_NEGATIVE),
    force: bool = O.FORCE, trust_pickle: bool = O.TRUST_PICKLE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Let --save replace another run's iterations, or "
                                   "add iterations to a folder that is no checkpoint root."),
) -> None:
    """Train a zoo model with tensor, sequence, pipeline, context, expert and data parallelism
    (relaunches itself under torchrun).

    Presets with a published recipe (`mzoo zoo show PRESET`) train with its sequence length, batch,
    learning-rate schedule and token count unless a flag says otherwise. Before anything is
    allocated, each run compares its memory estimate with the device's and stops in one sentence
    when it would not fit (--force goes ahead).

    Example: mzoo train llama-tiny --tp 2 --dp 2 --steps 30 --save ./ckpt
             mzoo train mixtral-tiny --ep 2 --dp 2 --steps 30
             mzoo train llama-tiny --cp 2 --tp 2 --seq-len 512 --mock-data --steps 30
             mzoo train llama-tiny --tp 2 --pp 2 --mock-data --dry-run --dry-run-rank 3
    """
    from mzoo.cli.running import execute
    from mzoo.jobs import train as job

    request = job.TrainRequest(
        model=model,
        layout=job.LayoutFlags(tp, pp, vpp, dp, ep, first_stage_layers, last_stage_layers, sequence_parallel, cp),
        launch=job.Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port, watchdog),
        engine=job.Engine(device, precision, recompute, recompute_modules, recompute_num_layers,
                          distributed_optimizer, force, overlap_grad_reduce, overlap_param_gather,
                          ddp_bucket_size,
                          compile=compile_layers),
        hyper=job.Hyper(seq_len, micro_batch, global_batch, steps, lr, min_lr, warmup, schedule, weight_decay,
                        clip_grad, seed),
        outputs=job.Outputs(save, save_interval, megatron_format, log_json, tensorboard, eval_interval, eval_iters,
                             overwrite),
        data=tuple(data), split=split, tokenizer=tokenizer, mock_data=mock_data, overrides=tuple(override),
        gpus=gpus, gpu=gpu, peak_tflops=peak_tflops, load=load, load_optim=load_optim, dry_run=dry_run,
        trust_pickle=trust_pickle)
    prepared = job.prepare_train(request)
    if prepared.why is not None and not as_json and int(os.environ.get("RANK", 0)) == 0:
        console.print(prepared.why, highlight=False, markup=False)
    if dry_run:  # everything above is what train checks before launch; stop before any real work
        from mzoo.cli.running import print_dry_run
        from mzoo.jobs.plan import dry_run as report

        rc = prepared.run
        print_dry_run(report(rc.model, rc.layout, rc.train, dry_run_rank, prepared.device), as_json)
        return
    execute(prepared, as_json)
