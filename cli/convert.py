"""`mzoo convert` and `mzoo reshard`: one streaming pipeline between formats and layouts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from mzoo.cli import options as O
from mzoo.cli.common import console, print_json, user_errors
from mzoo.cli.progress import byte_progress, summary_line
from mzoo.errors import UserError
from mzoo.layout import Layout

if TYPE_CHECKING:  # the jobs import torch: only a command that runs loads them
    from mzoo.ckpt.megatron.files import FilePlan
    from mzoo.jobs.convert import ConvertRequest, Summary

DIRECTIONS = {("hf", "megatron"), ("megatron", "hf"), ("megatron", "megatron"), ("hf", "hf")}


def parse_direction(text: str) -> tuple[str, str]:
    """'hf->megatron' or 'hf:megatron' -> ('hf', 'megatron'); catches the unquoted-arrow accident."""
    t = text.strip().lower()
    if t in ("hf-", "megatron-"):
        target = "megatron" if t == "hf-" else "hf (or megatron)"
        raise UserError(
            f"DIRECTION arrived as '{text}': the shell read '>' as a redirect and created a file named "
            f"'{target.split()[0]}' in this folder; quote it, e.g. mzoo convert '{t}>{target.split()[0]}' SRC DST "
            "(and delete that stray file)."
        )
    for sep in ("->", ":", "2"):
        if sep in t:
            a, b = (x.strip() for x in t.split(sep, 1))
            if (a, b) in DIRECTIONS:
                return a, b
    raise UserError(f"unknown direction '{text}'; use 'hf->megatron', 'megatron->hf' or 'megatron->megatron'.")


def _run(request: "ConvertRequest", as_json: bool, quiet: bool) -> None:
    from mzoo.jobs.convert import run

    _print(run(request, lambda total, label: byte_progress(total, label, quiet or as_json)), as_json, quiet)


def _print(result: "Summary | FilePlan", as_json: bool, quiet: bool) -> None:
    from mzoo.ckpt.megatron.files import FilePlan

    if isinstance(result, FilePlan):
        _print_plan(result, as_json)
    elif as_json:
        print_json(result.as_dict())
    elif not quiet:
        console.print(summary_line(result), highlight=False, markup=False)


def _print_plan(plan: "FilePlan", as_json: bool, shown: int = 12) -> None:
    """What --plan prints: every file (or the first few) with its tensor count and size."""
    if as_json:
        print_json(plan.as_dict())
        return
    lay = plan.megatron.layout
    console.print(f"{plan.fmt} (tp={lay.tp} pp={lay.pp} vpp={lay.vpp} ep={lay.ep} spec={plan.megatron.spelling}): "
                  f"{len(plan.files)} files, {sum(len(f.entries) for f in plan.files)} tensors, "
                  f"{plan.nbytes / 1e9:.3f} GB; nothing written", highlight=False, markup=False)
    for f in plan.files[:shown]:
        console.print(f"  {f.path}  {len(f.entries)} tensors  {f.nbytes / 1e9:.3f} GB", highlight=False, markup=False)
    if len(plan.files) > shown:
        console.print(f"  ... {len(plan.files) - shown} more (--json lists every file and tensor)", highlight=False)


GROUPED = typer.Option(False, "--moe-grouped-gemm",
                       help="Legacy files: name experts as TEGroupedMLP does (experts.linear_fc1.weight<i>) instead "
                            "of SequentialMLP (experts.local_experts.<i>.linear_fc1.weight).")
PLAN = typer.Option(False, "--plan", help="Print the files, tensors and shapes the output would get; write nothing.")
FMT = typer.Option("torch_dist", "--megatron-format",
                   help="torch_dist (default), torch (legacy) or zarr (Megatron's legacy zarr backend: only "
                        "megatron-core <= 0.15.3 loads it; convert to torch_dist for 0.16 and newer).")
SPEC = typer.Option("te", "--spec", help="Parameter spelling: te (Transformer Engine) or local; load it in "
                    "Megatron-LM with the matching --transformer-impl (transformer_engine or local).")
DTYPE = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: keep the source's).")
SHARD = typer.Option("5GB", "--shard-size", help="Largest safetensors shard for Hugging Face output.")
OVER = typer.Option(False, "--overwrite", help="Replace DST if it exists.")
JSON = typer.Option(False, "--json", help="Print a JSON summary.")
NONFINITE = typer.Option(False, "--allow-nonfinite", help="Write NaN / Inf weights instead of refusing them.")
TOKENIZER = typer.Option(None, "--tokenizer", help="A tokenizer folder (save_pretrained) to carry with the weights; "
                         "its files replace the source's of the same name (default: the source's own).")


@user_errors
def convert(
    direction: str = typer.Argument(..., help="'hf->megatron', 'megatron->hf' or 'megatron->megatron' (quote it!)."),
    src: Path = typer.Argument(..., help="Source checkpoint folder."),
    dst: Path = typer.Argument(..., help="Folder to create."),
    tp: int = O.OUT_TP, pp: int = O.OUT_PP, vpp: int = O.OUT_VPP, ep: int = O.OUT_EP,
    first_stage_layers: Optional[int] = O.FIRST, last_stage_layers: Optional[int] = O.LAST,
    megatron_format: str = FMT, spec: str = SPEC, moe_grouped_gemm: bool = GROUPED, dtype: Optional[str] = DTYPE,
    shard_size: str = SHARD, trust_pickle: bool = O.TRUST_PICKLE, vocab_size: Optional[int] = O.VOCAB_SIZE,
    overwrite: bool = OVER, plan: bool = PLAN, tokenizer: Optional[Path] = TOKENIZER, as_json: bool = JSON,
    quiet: bool = O.QUIET, allow_nonfinite: bool = NONFINITE,
    merge: Optional[Path] = typer.Option(None, "--merge", help="A peft LoRA adapter folder to merge into the "
                                         "weights (W + scaling B A, as peft's merge_and_unload)."),
) -> None:
    """Convert a checkpoint between Hugging Face and Megatron formats, streaming one tensor at a time.

    The tokenizer, chat template, generation config and special token ids travel with the weights
    (Megatron: in iter_XXXXXXX/tokenizer/, where Megatron-Bridge keeps them).

    Example: mzoo convert 'hf->megatron' ./llama-hf ./llama-mcore --tp 2 --pp 2
             mzoo convert 'megatron->hf' ./ckpt ./llama-hf --tokenizer ./llama-tokenizer
             mzoo convert 'hf->megatron' deepseek-v3 ./out --tp 2 --pp 16 --ep 64 --first-stage-layers 2 --last-stage-layers 3 --plan
    (MoE: mzoo convert 'hf->megatron' ./mixtral-hf ./mixtral-mcore --tp 2 --ep 4 --plan)
    (LoRA: mzoo convert 'hf->hf' ./llama-hf ./llama-merged --merge ./adapter)
    """
    from mzoo.jobs.convert import ConvertRequest

    a, b = parse_direction(direction)
    _run(ConvertRequest(src=src, dst=dst, to=b, expect=a, megatron_format=megatron_format,
                        layout=Layout(tp=tp, pp=pp, vpp=vpp, ep=ep, first_stage_layers=first_stage_layers,
                                      last_stage_layers=last_stage_layers), spec=spec,
                        moe_grouped_gemm=moe_grouped_gemm, dtype=dtype, shard_size=shard_size,
                        trust_pickle=trust_pickle, vocab_size=vocab_size, overwrite=overwrite, plan=plan,
                        tokenizer=tokenizer, allow_nonfinite=allow_nonfinite, merge=merge), as_json, quiet)


KEEP_TP = typer.Option(None, "--tp", help="Tensor-parallel size of the output (default: the source's).")
KEEP_PP = typer.Option(None, "--pp", help="Pipeline-parallel size of the output (default: the source's).")
KEEP_VPP = typer.Option(None, "--vpp", help="Virtual pipeline stages per rank (default: the source's; 1 after a new "
                        "--pp).")
KEEP_EP = typer.Option(None, "--ep", help="Expert-parallel size of the output (default: the source's).")
KEEP_FMT = typer.Option(None, "--megatron-format", help="torch_dist, torch (legacy) or zarr (default: the source's).")
KEEP_SPEC = typer.Option(None, "--spec", help="Parameter spelling: te or local (default: the source's).")
KEEP_GROUPED = typer.Option(None, "--moe-grouped-gemm/--no-moe-grouped-gemm",
                            help="Legacy files: TEGroupedMLP or SequentialMLP expert names (default: the source's).")


@user_errors
def reshard(
    src: Path = typer.Argument(..., help="Megatron checkpoint (any format, any layout)."),
    dst: Path = typer.Argument(..., help="Folder to create."),
    tp: Optional[int] = KEEP_TP, pp: Optional[int] = KEEP_PP, vpp: Optional[int] = KEEP_VPP,
    ep: Optional[int] = KEEP_EP, first_stage_layers: Optional[int] = O.FIRST, last_stage_layers: Optional[int] = O.LAST,
    megatron_format: Optional[str] = KEEP_FMT, spec: Optional[str] = KEEP_SPEC,
    moe_grouped_gemm: Optional[bool] = KEEP_GROUPED, dtype: Optional[str] = DTYPE,
    trust_pickle: bool = O.TRUST_PICKLE, vocab_size: Optional[int] = O.VOCAB_SIZE, overwrite: bool = OVER,
    plan: bool = PLAN, tokenizer: Optional[Path] = TOKENIZER, as_json: bool = JSON, quiet: bool = O.QUIET,
    allow_nonfinite: bool = NONFINITE,
) -> None:
    """Change the parallel layout (and optionally the format) of a Megatron checkpoint.

    Every setting not given keeps the source's: `--ep 4` alone changes only the expert split.

    Example: mzoo reshard ./ckpt-tp2pp2 ./ckpt-tp4 --tp 4 --pp 1 --megatron-format torch
    (MoE: mzoo reshard ./mixtral-ep4 ./mixtral-ep2 --ep 2)
    """
    from mzoo.jobs.convert import Reshard, reshard as job

    request = Reshard(src=src, dst=dst, tp=tp, pp=pp, vpp=vpp, ep=ep, first_stage_layers=first_stage_layers,
                      last_stage_layers=last_stage_layers, megatron_format=megatron_format, spec=spec,
                      moe_grouped_gemm=moe_grouped_gemm, dtype=dtype, trust_pickle=trust_pickle,
                      vocab_size=vocab_size, overwrite=overwrite, plan=plan, tokenizer=tokenizer,
                      allow_nonfinite=allow_nonfinite)
    _print(job(request, lambda total, label: byte_progress(total, label, quiet or as_json)), as_json, quiet)
