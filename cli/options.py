"""Options several commands share, each defined once (Typer options are plain defaults, so a shared
one is a module constant used in every signature that takes it)."""

from __future__ import annotations

import typer

# ---- checkpoint reading ----------------------------------------------------------------------------------
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Unpickle objects outside mzoo's allowlist (trusted files "
                                                          "only).")
VOCAB_SIZE = typer.Option(None, "--vocab-size", help="True vocabulary size when the source records only a padded one.")

# ---- output -------------------------------------------------------------------------------------------------
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.")

# ---- the layout of a checkpoint (convert, reshard) --------------------------------------------------------
OUT_TP = typer.Option(1, "--tp", help="Tensor-parallel size of the output.")
OUT_PP = typer.Option(1, "--pp", help="Pipeline-parallel size of the output.")
OUT_VPP = typer.Option(1, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B).")
OUT_EP = typer.Option(1, "--ep", help="Expert-parallel size of the output (MoE models; must divide the experts).")
FIRST = typer.Option(None, "--first-stage-layers", help="Layers on the first pipeline stage (uneven split).")
LAST = typer.Option(None, "--last-stage-layers", help="Layers on the last pipeline stage (uneven split).")

# ---- the layout of a run (train, finetune) -----------------------------------------------------------------
TP = typer.Option(None, "--tp", help="Tensor-parallel size (default 1, or the planner's with --gpus).")
PP = typer.Option(None, "--pp", help="Pipeline-parallel size (1F1B schedule).")
VPP = typer.Option(None, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B).")
DP = typer.Option(None, "--dp", help="Data-parallel size (default: processes / (tp*pp)).")
EP = typer.Option(None, "--ep", help="Expert-parallel size (MoE models); divides dp: EP groups are carved out of DP "
                                     "ranks.")
SEQUENCE_PARALLEL = typer.Option(False, "--sequence-parallel", help="Split norms/dropout along the sequence over TP.")

# ---- where the processes run --------------------------------------------------------------------------------
NPROC_PER_NODE = typer.Option(None, "--nproc-per-node", help="Processes per node (default tp*pp*dp / nnodes).")
NNODES = typer.Option(1, "--nnodes", help="Nodes (run the same command on each, with --node-rank).")
NODE_RANK = typer.Option(0, "--node-rank", help="This node's index (multi-node).")
MASTER_ADDR = typer.Option(None, "--master-addr", help="Address of node 0 (multi-node).")
MASTER_PORT = typer.Option(29500, "--master-port", help="Port on node 0 (multi-node).")
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
RECOMPUTE_NUM_LAYERS = typer.Option(None, "--recompute-num-layers", help="With --recompute full: recompute the first "
                                                                         "N layers of each pipeline chunk (default "
                                                                         "all).")
DISTRIBUTED_OPTIMIZER = typer.Option(False, "--distributed-optimizer", help="Shard fp32 master weights and Adam "
                                                                            "states over DP (on when the planner "
                                                                            "picks the layout).")
FORCE = typer.Option(False, "--force", help="Start even when the memory estimate exceeds the device's.")
CLIP_GRAD = typer.Option(1.0, "--clip-grad", help="Global gradient-norm clipping (0 disables).")
SEED = typer.Option(1234, "--seed", help="Seed for initialisation and data order.")

# ---- saving and logging a run ---------------------------------------------------------------------------------
SAVE_INTERVAL = typer.Option(0, "--save-interval", help="Also save every N steps (0: only at the end).")
MEGATRON_FORMAT = typer.Option("torch_dist", "--megatron-format", help="torch_dist or torch.")
LOG_JSON = typer.Option(None, "--log-json", help="One JSON object per step (step, loss, lr, grad_norm, tokens_per_s).")
EVAL_INTERVAL = typer.Option(0, "--eval-interval", help="Validation loss every N steps (0: never; finetune with "
                                                        "validation data: at the end).")
