"""Options several commands share, each defined once (Typer options are plain defaults, so a shared
one is a module constant used in every signature that takes it)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from mzoo.validate import FINITE_NON_NEGATIVE, NON_NEGATIVE, PORT, POSITIVE, Rule


def option(default: Any, *decls: str, rule: Optional[Rule] = None, **kwargs: Any) -> Any:
    """typer.Option carrying `rule`: cli.common.user_errors checks the value before the command runs
    (before it imports torch), so a bad value is one sentence naming the option."""
    info = typer.Option(default, *decls, **kwargs)
    info.mzoo_rule = rule  # type: ignore[attr-defined]
    return info

# ---- checkpoint reading ----------------------------------------------------------------------------------
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Unpickle objects outside mzoo's allowlist (trusted files "
                                                          "only).")
VOCAB_SIZE = option(None, "--vocab-size", help="True vocabulary size when the source records only a padded one.",
                    rule=POSITIVE)

# ---- output -------------------------------------------------------------------------------------------------
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.")

# ---- the layout of a checkpoint (convert, reshard) --------------------------------------------------------
OUT_TP = option(1, "--tp", help="Tensor-parallel size of the output.", rule=POSITIVE)
OUT_PP = option(1, "--pp", help="Pipeline-parallel size of the output.", rule=POSITIVE)
OUT_VPP = option(1, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B).", rule=POSITIVE)
OUT_EP = option(1, "--ep", help="Expert-parallel size of the output (MoE models; must divide the experts).",
                rule=POSITIVE)
FIRST = typer.Option(None, "--first-stage-layers", help="Layers on the first pipeline stage (uneven split).")
LAST = typer.Option(None, "--last-stage-layers", help="Layers on the last pipeline stage (uneven split).")

# ---- the layout of a run (train, finetune) -----------------------------------------------------------------
TP = option(None, "--tp", help="Tensor-parallel size (default 1, or the planner's with --gpus).", rule=POSITIVE)
PP = option(None, "--pp", help="Pipeline-parallel size (1F1B schedule).", rule=POSITIVE)
VPP = option(None, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B).", rule=POSITIVE)
DP = option(None, "--dp", help="Data-parallel size (default: processes / (tp*pp*cp)).", rule=POSITIVE)
EP = option(None, "--ep", help="Expert-parallel size (MoE models); divides dp*cp: EP groups are carved out of "
                                     "the DP x CP ranks.", rule=POSITIVE)
CP = option(None, "--cp", help="Context-parallel size: each rank holds 2 of the sequence's 2*cp chunks (Megatron's "
                                "load-balanced split); attention all-gathers keys and values.", rule=POSITIVE)
SEQUENCE_PARALLEL = typer.Option(False, "--sequence-parallel", help="Split norms/dropout along the sequence over TP.")

# ---- where the processes run --------------------------------------------------------------------------------
NPROC_PER_NODE = option(None, "--nproc-per-node", help="Processes per node (default tp*pp*cp*dp / nnodes).",
                        rule=POSITIVE)
NNODES = option(1, "--nnodes", help="Nodes (run the same command on each, with --node-rank).", rule=POSITIVE)
NODE_RANK = option(0, "--node-rank", help="This node's index (multi-node).", rule=NON_NEGATIVE)
MASTER_ADDR = typer.Option(None, "--master-addr", help="Address of node 0 (multi-node).")
MASTER_PORT = option(29500, "--master-port", help="Port on node 0 (multi-node).", rule=PORT)
WATCHDOG = typer.Option(600.0, "--watchdog", help="Seconds a rank may make no progress (a step, evaluation or "
                        "save) before the job is ended with exit code 124, naming the rank; 0 turns it off.")

# ---- the engine ----------------------------------------------------------------------------------------------
DEVICE = typer.Option("auto", "--device", help="auto (this rank's GPU when torch sees CUDA, else the CPU), cuda or "
                                               "cpu.")
PRECISION = typer.Option(None, "--precision", help="fp32, bf16 (fp32 master weights and main gradients) or fp16 "
                                                   "(+ dynamic loss scaling); default bf16 on GPUs, fp32 on CPUs.")
RECOMPUTE = typer.Option("none", "--recompute", help="Activation recomputation: none, selective "
                                                     "(--recompute-modules) or full (--recompute-num-layers).")
RECOMPUTE_MODULES = typer.Option(None, "--recompute-modules", help="With --recompute selective: comma list of "
                                                                   "core_attn (default), mlp, moe.")
RECOMPUTE_NUM_LAYERS = option(None, "--recompute-num-layers", help="With --recompute full: recompute the first "
                                                                         "N layers of each pipeline chunk (default "
                                                                         "all).", rule=POSITIVE)
COMPILE = typer.Option(False, "--compile", help="torch.compile each decoder layer (regional, as torchtitan); "
                                               "dropout stays eager, so results match eager's up to float "
                                               "reordering.")
DISTRIBUTED_OPTIMIZER = typer.Option(False, "--distributed-optimizer", help="Shard fp32 master weights and Adam "
                                                                            "states over DP (on when the planner "
                                                                            "picks the layout).")
OVERLAP_GRAD_REDUCE = typer.Option(False, "--overlap-grad-reduce", help="Start each DP gradient bucket's reduction "
                                   "inside the backward (bitwise the same result).")
OVERLAP_PARAM_GATHER = typer.Option(False, "--overlap-param-gather", help="With --distributed-optimizer: overlap "
                                    "the parameter all-gather with the next forward.")
DDP_BUCKET_SIZE = option(40_000_000, "--ddp-bucket-size", help="Elements per DP gradient bucket (Megatron's "
                         "default; smaller buckets start reducing earlier with --overlap-grad-reduce).",
                         rule=POSITIVE)
FORCE = typer.Option(False, "--force", help="Start even when the memory estimate exceeds the device's.")
CLIP_GRAD = option(1.0, "--clip-grad", help="Global gradient-norm clipping (0 disables).", rule=FINITE_NON_NEGATIVE)
SEED = option(1234, "--seed", help="Seed for initialisation and data order.", rule=NON_NEGATIVE)

# ---- saving and logging a run ---------------------------------------------------------------------------------
SAVE_INTERVAL = option(0, "--save-interval", help="Also save every N steps (0: only at the end).", rule=NON_NEGATIVE)
MEGATRON_FORMAT = typer.Option("torch_dist", "--megatron-format", help="torch_dist or torch.")
LOG_JSON = typer.Option(None, "--log-json", help="One JSON object per step (step, loss, lr, grad_norm, tokens_per_s).")
EVAL_INTERVAL = option(0, "--eval-interval", help="Validation loss every N steps (0: never; finetune with "
                                                        "validation data: at the end).", rule=NON_NEGATIVE)
