"""The training loop: global batches of micro-batches, DP-sharded by global sample index.

A global batch is `global_batch` samples starting at `consumed_samples`; DP rank r takes every
micro-batch slice Megatron's pretraining sampler gives it, so the data a run sees depends only on
the global counter, never on the layout; the CP ranks of one DP rank read the same micro-batches and
keep two chunks of each. The loss is the mean over every token of the global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mzoo.config import ConfigError, ModelConfig
from mzoo.parallel.experts import set_aux_loss_scale, update_expert_biases
from mzoo.parallel.context import split_for_rank
from mzoo.parallel.optimizer import AdamWConfig, Optimizer, lr_at
from mzoo.parallel.random import seed_everything
from mzoo.parallel.state import ParallelState
from mzoo.plan.costs import model_flops_per_token
from mzoo.plan.hardware import detect


@dataclass
class TrainConfig:
    seq_len: int = 64
    micro_batch: int = 2
    global_batch: int = 8
    steps: int = 20
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 2
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # DP reductions start inside the backward (bitwise-equal result)
    overlap_param_gather: bool = False  # with distributed_optimizer: all-gathers overlap the next forward
    bucket_elements: int = 40_000_000  # gradient bucket size (Megatron's --ddp-bucket-size)
    precision: str = "fp32"  # fp32, bf16 (fp32 master weights), fp16 (+ dynamic loss scaling)
    recompute: str = "none"  # none, selective, full
    recompute_modules: tuple[str, ...] = ()  # selective: core_attn (default), mlp, moe
    recompute_num_layers: Optional[int] = None  # full: the first N layers of each chunk (default all)
    compile: bool = False  # torch.compile each decoder layer (regional; the model's compile_layers)
    peak_tflops: Optional[float] = None  # per device, for MFU
    eval_interval: int = 0  # validation loss every N steps (0: never)
    eval_iters: int = 2  # global batches per validation

    def validate_choices(self) -> None:
        """The named choices, each one sentence (cheap: jobs call it before reading any data)."""
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown --precision '{self.precision}'; use fp32, bf16 or fp16.")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"unknown --recompute '{self.recompute}'; use none, selective or full.")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"unknown --schedule '{self.schedule}'; use cosine, wsd or constant.")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError("--overlap-param-gather overlaps the distributed optimizer's all-gather; add "
                              "--distributed-optimizer or drop it.")

    def validate(self, state: ParallelState) -> None:
        """Everything this run's layout must agree with, and the named choices."""
        self.validate_choices()
        per_step = self.micro_batch * state.dp
        if self.global_batch % per_step:
            raise ConfigError(
                f"global batch {self.global_batch} is not a multiple of micro batch {self.micro_batch} x "
                f"data parallel {state.dp}; change one of them."
            )
        vpp, pp = state.config.vpp, state.pp
        if vpp > 1 and (self.global_batch // per_step) % pp:
            raise ConfigError(
                f"interleaved pipelining needs micro-batches per step ({self.global_batch // per_step}) to be a "
                f"multiple of pp={pp}; raise --global-batch."
            )
        split = state.config.sequence_problem(self.seq_len)
        if split is not None:
            raise ConfigError(split)

    def validate_compile(self, cfg: ModelConfig) -> None:
        """What `--compile` cannot run, one sentence before any work. A mixture of experts sizes its
        expert batches from the routing (data-dependent shapes: graph breaks, and a recompile whenever
        the counts change: mixtral-tiny compiled 14 graphs in ~260 s against llama-tiny's one in
        ~25 s); multi-latent attention fails inside inductor here. Selective recomputation is traced
        inside the compiled layer as plain checkpointing, which cannot replay the TP-aware RNG
        stream that attention dropout draws from."""
        if not self.compile:
            return
        kinds = cfg.block_kinds
        blocks = [name for name, present in (("mixture-of-experts", "moe" in kinds),
                                              ("multi-latent attention", cfg.mla is not None)) if present]
        if blocks:
            raise ConfigError(f"--compile supports attention, dense MLP and Mamba layers for now, not "
                              f"{cfg.name or cfg.family}'s {' and '.join(blocks)} layers; drop --compile.")
        recomputed = set(self.recompute_modules or ("core_attn",)) if self.recompute == "selective" else set()
        if cfg.attention_dropout and "core_attn" in recomputed:
            raise ConfigError(f"--compile cannot recompute core attention with attention dropout "
                              f"({cfg.attention_dropout:g}); use --recompute full or --recompute-modules mlp, "
                              "or drop --compile.")

    def microbatches(self, state: ParallelState) -> int:
        return self.global_batch // (self.micro_batch * state.dp)


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    consumed_samples: int
    tflops_per_device: float = 0.0
    mfu: Optional[float] = None
    loss_scale: float = 1.0
    skipped: bool = False
    val_loss: Optional[float] = None


class LossScaler:
    """Dynamic loss scaling for fp16: halve on overflow (the step is skipped), double after
    `window` clean steps."""

    def __init__(self, enabled: bool, initial: float = 2.0**16, window: int = 1000):
        self.scale = initial if enabled else 1.0
        self.enabled, self.window, self.clean = enabled, window, 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.clean = max(self.scale / 2, 1.0), 0
        else:
            self.clean += 1
            if self.clean % self.window == 0:
                self.scale *= 2


def detect_peak_tflops() -> Optional[float]:
    """The device's dense bf16 peak for MFU, from the planner's GPU table, or None (CPUs, unknown
    devices: give --peak-tflops)."""
    found = detect()
    return found.peak_tflops if found else None


Sampler = Callable[[int], dict[str, torch.Tensor]]  # global sample index -> {"tokens", "labels"}
PACKED_KEYS = ("position_ids", "segments")  # packed finetuning samples: every pipeline stage needs these


def dataset_samplers(data_cfg, num_train: int, num_valid: Optional[int], state: ParallelState
                     ) -> tuple[Sampler, Optional[Sampler]]:
    """(train, valid) samplers by global index over Megatron-style GPT datasets (or mock data).
    Rank 0 builds the cached index files first so that ranks never race on them."""
    import torch.distributed as dist

    from mzoo.data.gpt import build_gpt_datasets

    def build():
        return build_gpt_datasets(data_cfg, (num_train, num_valid, None), (True, num_valid is not None, False))

    if dist.is_initialized() and dist.get_world_size() > 1:
        splits = build() if dist.get_rank() == 0 else None
        dist.barrier()
        splits = splits if splits is not None else build()
    else:
        splits = build()
    train, valid = splits[0], splits[1]
    return (lambda i: train[i]), (None if valid is None else (lambda i: valid[i]))


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, state: ParallelState, tcfg: TrainConfig,
                 sampler: Sampler, valid_sampler: Optional[Sampler] = None):
        tcfg.validate(state)
        self.model, self.cfg, self.state, self.tcfg, self.sampler = model, cfg, state, tcfg, sampler
        self.valid_sampler = valid_sampler
        self.optimizer = Optimizer(model, state, AdamWConfig(
            lr=tcfg.lr, weight_decay=tcfg.weight_decay, clip_grad=tcfg.clip_grad,
            distributed=tcfg.distributed_optimizer, overlap_grad_reduce=tcfg.overlap_grad_reduce,
            overlap_param_gather=tcfg.overlap_param_gather, bucket_elements=tcfg.bucket_elements))
        self.device = next(model.parameters()).device
        self.data_keys = set(sampler(0))  # which keys the data has (packed finetuning data: positions too)
        self.step = 0
        self.consumed_samples = 0
        self.scaler = LossScaler(tcfg.precision == "fp16")
        seed_everything(state.rng, tcfg.seed, state.tp_rank, state.pp_rank)
        if hasattr(model, "set_recompute"):
            model.set_recompute(tcfg.recompute, tcfg.recompute_modules, tcfg.recompute_num_layers)
        if tcfg.compile:  # after set_recompute: full recomputation wraps the compiled layers
            tcfg.validate_compile(cfg)
            if not hasattr(model, "compile_layers"):
                raise ConfigError("--compile needs a model with decoder layers to compile (mzoo's own); drop it.")
            model.compile_layers()
        self.flops_per_token = model_flops_per_token(cfg, tcfg.seq_len)
        self.peak_tflops = tcfg.peak_tflops or detect_peak_tflops()

    def _batch(self, sampler: Sampler, indices: list[int], chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
        """One micro-batch of the keys this chunk uses, on the model's device (Megatron's rule: the
        first stage reads tokens, the last labels; middle stages read nothing unless the data is
        packed, whose positions and segments every stage needs)."""
        keys = set(PACKED_KEYS) & self.data_keys
        if chunk.pre_process:
            keys.add("tokens")
        if chunk.post_process:
            keys |= {"labels", "loss_mask"} & self.data_keys
        if not keys:
            return {}
        samples = [sampler(i) for i in indices]
        batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
        if self.device.type == "cpu":
            return batch
        return {key: t.pin_memory().to(self.device, non_blocking=True) for key, t in batch.items()}

    def _chunks(self) -> list[torch.nn.Module]:
        return list(self.model) if isinstance(self.model, torch.nn.ModuleList) else [self.model]

    def _global_batch_loss(self, sampler: Sampler, consumed: int, scale: float, forward_only: bool) -> torch.Tensor:
        """Run one global batch through the pipeline schedule; the mean token loss on every rank."""
        from mzoo.parallel.schedules import pick_schedule

        tcfg, state = self.tcfg, self.state
        n_micro = tcfg.microbatches(state)
        chunks = self._chunks()

        from mzoo.data.samplers import global_sample_indices

        batches = global_sample_indices(consumed, tcfg.global_batch, state.dp_rank, state.dp, tcfg.micro_batch)

        cp = state.config.cp

        def forward_step(m: int, chunk: torch.nn.Module, hidden: Optional[torch.Tensor]) -> torch.Tensor:
            whole = self._batch(sampler, batches[m], chunk)
            batch = split_for_rank(whole, state)  # context parallelism: this rank's two chunks
            packed = {key: batch[key] for key in PACKED_KEYS if key in batch}  # finetuning data
            if not chunk.post_process:
                return chunk(batch.get("tokens"), hidden=hidden, **packed)
            loss = chunk(batch.get("tokens"), hidden=hidden, labels=batch["labels"], **packed).float()
            # cp times this rank's share of the micro-batch loss (gradients are averaged over dp x cp)
            if "loss_mask" in batch:  # mean over the trained tokens of the whole micro-batch
                trained = whole["loss_mask"].float().sum().clamp(min=1.0)
                return (loss * batch["loss_mask"].float()).sum() * cp / trained / n_micro * scale
            return loss.mean() / n_micro * scale

        set_aux_loss_scale(scale / n_micro)  # MoE load-balancing loss: scaled like the LM loss
        seq = tcfg.seq_len // cp // (state.tp if state.config.sequence_parallel else 1)
        dtype = next(chunks[0].parameters()).dtype
        losses = pick_schedule(state)(forward_step, chunks if len(chunks) > 1 else chunks[0], n_micro, state,
                                      (seq, tcfg.micro_batch, self.cfg.hidden_size), dtype, forward_only=forward_only)
        total = torch.stack(losses).sum() / scale if losses else torch.zeros((), device=self.device)
        for group in (state.pp_group, state.dp_cp_group):  # the global-batch loss on every rank
            if group is not None:
                torch.distributed.all_reduce(total, group=group)
        return total / state.dp_cp

    @torch.no_grad()
    def evaluate(self, sampler: Sampler, iters: int) -> float:
        """Mean loss over the first `iters` global batches of the validation data."""
        for chunk in self._chunks():
            chunk.eval()
        losses = [self._global_batch_loss(sampler, i * self.tcfg.global_batch, 1.0, forward_only=True).item()
                  for i in range(iters)]
        for chunk in self._chunks():
            chunk.train()
        return sum(losses) / len(losses)

    def train_step(self) -> StepLog:
        start = time.perf_counter()
        tcfg, state = self.tcfg, self.state
        for chunk in self._chunks():
            chunk.train()
        self.optimizer.zero_grad(tcfg.microbatches(state))
        scale, consumed = self.scaler.scale, self.consumed_samples

        total = self._global_batch_loss(self.sampler, consumed, scale, forward_only=False)
        self.step += 1
        lr = lr_at(self.step, tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.steps, tcfg.schedule)
        norm = self.optimizer.step(lr, loss_scale=scale)
        skipped = not math.isfinite(norm)
        if not skipped and self.cfg.moe is not None and self.cfg.moe.expert_bias:
            routers = [m for m in self.model.modules() if getattr(m, "tokens_per_expert", None) is not None]
            update_expert_biases(routers, self.cfg.moe.bias_update_rate, state)
        self.scaler.update(skipped)
        self.consumed_samples += tcfg.global_batch
        seconds = time.perf_counter() - start
        tokens = tcfg.global_batch * tcfg.seq_len
        tflops = self.flops_per_token * tokens / seconds / state.config.world_size / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        val = None
        if self.valid_sampler is not None and tcfg.eval_interval and self.step % tcfg.eval_interval == 0:
            val = self.evaluate(self.valid_sampler, tcfg.eval_iters)
        return StepLog(self.step, total.item(), lr, norm, tokens / seconds, self.consumed_samples, tflops, mfu,
                       scale, skipped, val)

    def train(self, steps: Optional[int] = None, on_step: Callable[[StepLog], None] = lambda s: None) -> list[StepLog]:
        logs = []
        for _ in range((steps or self.tcfg.steps) - self.step):
            log = self.train_step()
            on_step(log)
            logs.append(log)
        self.optimizer.finish_param_gather()  # the caller may read the weights next
        return logs
