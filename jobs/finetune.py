"""`mzoo finetune`: supervised finetuning of any checkpoint on JSONL examples (text, prompt-completion
or chat), packed with attention kept inside each example, on the training engine; the loss covers
only completion (assistant) tokens."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

from mzoo.ckpt.assets import tokenizer_assets
from mzoo.converters.peft import read_adapter, save_adapter
from mzoo.data import sft as sft_data
from mzoo.data.tokenizer import load_transformers_tokenizer
from mzoo.errors import UserError
from mzoo.jobs.sources import open_source
from mzoo.jobs.saves import check_save, check_save_space, first_save
from mzoo.jobs.train import (Engine, Hyper, Launch, LayoutFlags, Outputs, Prepared, check_megatron_format, check_memory,
                             hooks, loaded_from, recompute_options, resolve_layout)
from mzoo.models.lora import add_lora, check_lora, load_adapters
from mzoo.parallel.lora import LoRAConfig
from mzoo.parallel.state import ParallelState
from mzoo.train.device import default_precision, resolve_device
from mzoo.train.run import Hooks, RunConfig
from mzoo.train.trainer import TrainConfig


@dataclass(frozen=True)
class Examples:
    """The finetuning data: JSONL files in one format, packed or one example per sequence."""

    data: Path
    format: str = "text"  # text, prompt-completion or chat
    valid_data: Optional[Path] = None
    valid_fraction: float = 0.0
    packing: bool = True


# finetuning's own defaults for what the request leaves None: short packed sequences, a small learning
# rate, no weight decay
DEFAULTS = Hyper(seq_len=256, micro_batch=2, global_batch=8, steps=100, lr=1e-5, min_lr=1e-6, warmup=5,
                 schedule="cosine", weight_decay=0.0)


@dataclass(frozen=True)
class FinetuneRequest:
    ckpt: Path
    examples: Examples
    tokenizer: Optional[Path] = None  # default: the checkpoint's
    layout: LayoutFlags = LayoutFlags()
    launch: Launch = Launch()
    engine: Engine = Engine()
    hyper: Hyper = Hyper()  # None: finetuning's DEFAULTS
    outputs: Outputs = Outputs(eval_iters=1)
    save_format: str = "hf"  # or megatron
    trust_pickle: bool = False
    lora: Optional[LoRAConfig] = None  # train low-rank adapters only; --save writes a peft adapter
    adapter: Optional[Path] = None  # a peft LoRA adapter to continue training (its rank, alpha, targets)
    dry_run: bool = False  # check everything, then report one rank's parameters and memory (the CLI prints it)


def adapter_position(folder: Path) -> Optional[dict]:
    """The loop's position an mzoo LoRA run saved beside its adapter ({step, consumed_samples,
    optimizer_step}), or None for an adapter without optimizer state (one peft made)."""
    import json

    from mzoo.train.run import OPTIMIZER_FILE, TRAIN_STATE_FILE

    folder = Path(folder)
    if not (folder / OPTIMIZER_FILE).exists() or not (folder / TRAIN_STATE_FILE).exists():
        return None
    return json.loads((folder / TRAIN_STATE_FILE).read_text())


def lora_hooks(base: Hooks, lora: LoRAConfig, start: Optional[dict], seed: int, base_model: str) -> Hooks:
    """The engine's hooks for a LoRA run: the model is built frozen with adapters (initialised as peft
    does, or from `start`, a peft adapter's canonical tensors, once the base weights are in), and a
    save writes the adapter in peft's format."""
    def build(cfg, state):
        model = base.build_model(cfg, state)
        add_lora(model, cfg, lora, seed)
        return model

    def load(model, path):
        base.load_weights(model, path)
        if start is not None:
            load_adapters(model, start)

    def save(cfg, tensors, root, iteration, extra):
        save_adapter(cfg, lora, tensors, root, base_model, overwrite=True, extra=extra)  # root: checked by check_save

    return Hooks(build, load, save, base.make_samplers)


def prepare_finetune(req: FinetuneRequest) -> Prepared:
    """Everything `mzoo finetune` checks before launch: choices, every data line, the checkpoint, its
    tokenizer, the layout, the packed data, memory."""
    eng, out, ex = req.engine, req.outputs, req.examples
    h = replace(req.hyper, **{f.name: getattr(DEFAULTS, f.name) for f in fields(Hyper)
                              if getattr(req.hyper, f.name) is None})
    precision = eng.precision or default_precision(resolve_device(eng.device))
    if req.save_format not in ("hf", "megatron"):
        raise UserError(f"unknown --save-format '{req.save_format}'; use hf or megatron.")
    lora = req.lora
    if lora is not None:
        lora.validate()  # the flags themselves, before any file is read
    if (lora is not None or req.adapter is not None) and req.save_format != "hf":
        raise UserError("a LoRA finetune saves a peft adapter (with its optimizer state, to continue with "
                        "--adapter); drop --save-format megatron.")
    check_megatron_format(out.megatron_format)
    modules, num_layers = recompute_options(eng.recompute, eng.recompute_modules, eng.recompute_num_layers)
    tcfg = TrainConfig(seq_len=h.seq_len, micro_batch=h.micro_batch, global_batch=h.global_batch, steps=h.steps,
                       lr=h.lr, min_lr=h.min_lr, warmup=h.warmup, schedule=h.schedule, weight_decay=h.weight_decay,
                       clip_grad=h.clip_grad, seed=h.seed, distributed_optimizer=eng.distributed_optimizer,
                       overlap_grad_reduce=eng.overlap_grad_reduce, overlap_param_gather=eng.overlap_param_gather,
                       bucket_elements=eng.bucket_elements,
                       precision=precision, recompute=eng.recompute, eval_iters=out.eval_iters,
                       recompute_modules=modules, recompute_num_layers=num_layers, compile=eng.compile)
    tcfg.validate_choices()
    check_save(out.save, out.overwrite, req.save_format == "hf", h.steps, out.save_interval)
    sft_data.read_jsonl(ex.data, ex.format)  # a bad line fails first, naming file and line
    if ex.valid_data is not None:
        sft_data.read_jsonl(ex.valid_data, ex.format)
    src = open_source(req.ckpt, req.trust_pickle)
    cfg = src.cfg
    start, position = None, None
    if req.adapter is not None:
        saved_lora, start = read_adapter(req.adapter, cfg)
        if lora is not None and (lora.rank, set(lora.parts), lora.alpha) != \
                (saved_lora.rank, set(saved_lora.parts), saved_lora.alpha):
            raise UserError(f"{req.adapter} has rank {saved_lora.rank} and alpha {saved_lora.alpha:g} on "
                            f"{','.join(saved_lora.parts)}; drop --lora-rank / --lora-alpha / --lora-targets to "
                            "continue it as it is.")
        lora = saved_lora
        position = adapter_position(req.adapter)
        if position is not None and position["step"] >= h.steps:
            raise UserError(f"{req.adapter} was saved at step {position['step']}; give --steps above it to "
                            "continue training it.")
    if lora is not None:
        check_lora(cfg, lora)
    if "mamba" in cfg.block_kinds and ex.packing:
        raise UserError("packed sequences need attention masks that Mamba layers do not have; add --no-pack.")
    assets = src.assets.with_tokenizer(tokenizer_assets(req.tokenizer)) if req.tokenizer else src.assets
    tokenizer_dir = req.tokenizer or assets.tokenizer_dir
    if tokenizer_dir is None:
        raise UserError(f"{req.ckpt} carries no tokenizer; pass --tokenizer DIR.")
    layout, world = resolve_layout(cfg, req.layout, req.launch, h.seq_len)
    if lora is None:  # (an adapter is a rank-r sliver of the weights: nothing worth checking)
        check_save_space(out.save, cfg, precision, req.save_format == "hf", first_save(0, h.steps, out.save_interval))
    tcfg.validate(ParallelState.single(layout))  # before the data is tokenized
    tcfg.validate_compile(cfg)
    notes = []
    if not req.dry_run:
        warning = check_memory(cfg, layout, tcfg, eng.device, world // req.launch.nnodes, eng.force, lora=lora)
        notes += [warning] if warning else []  # before the data too
    sft = sft_data.SFTConfig(ex.data, ex.format, ex.valid_data, ex.valid_fraction, ex.packing)
    tokenizer = load_transformers_tokenizer(tokenizer_dir)
    train, valid, stats = sft_data.build(sft, tokenizer, h.seq_len, cfg.vocab_size, h.seed)  # bad data fails here
    tcfg = replace(tcfg, eval_interval=(out.eval_interval or h.steps) if valid is not None else 0)
    rc = RunConfig(cfg, layout, tcfg, str(req.ckpt), str(out.save) if out.save else None, out.save_interval, False,
                   str(out.log_json) if out.log_json else None, save_format=req.save_format, device=eng.device,
                   adapter_only=lora is not None, resume_from=str(req.adapter) if position else None)

    def samplers(cfg, tcfg, state):
        train, valid, _ = sft_data.build(sft, load_transformers_tokenizer(tokenizer_dir), tcfg.seq_len,
                                         cfg.vocab_size, tcfg.seed)
        return sft_data.sampler(train, tcfg.seed), (sft_data.sampler(valid, tcfg.seed) if valid else None)

    run_hooks = hooks(layout, precision, samplers, out.megatron_format, assets, hf=req.save_format == "hf",
                      trust_pickle=req.trust_pickle)
    if lora is not None:
        run_hooks = lora_hooks(run_hooks, lora, start, h.seed, str(req.ckpt))
    if position is not None:
        notes.append(f"continuing the adapter {req.adapter} at step {position['step']} (its optimizer state and "
                     "position restored)")
    saved = f"saved the finetuned model ({req.save_format}) to {out.save}" if out.save else None
    if lora is not None and out.save:
        saved = f"saved the LoRA adapter (peft) to {out.save}"
    return Prepared("finetune", rc, run_hooks, world, req.launch, saved=saved, notes=notes,
                    device=resolve_device(eng.device).type, data_stats=stats,
                    loaded=loaded_from(src, req.ckpt, None), lora=lora)  # weights only: a new schedule
