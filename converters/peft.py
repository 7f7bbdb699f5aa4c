"""LoRA adapters in peft's format: adapter_config.json + adapter_model.safetensors, keyed by the
Hugging Face module names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

mzoo's adapters are per projection (mzoo/parallel/lora.py), so every peft lora_A / lora_B is one
canonical adapter tensor, unchanged, in both directions; the names come from each family's mapping
table (the HF tensor a canonical weight's role is made of), so nothing here lists a family's
modules. Merging adds scaling * B A per projection and fuses the deltas with the same table
(QKV grouped per query group, [gate; up]), so a merged base equals peft's merge_and_unload().
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mzoo.ckpt.atomic import atomic_dir
from mzoo.ckpt.hf import write_json
from mzoo.config import ModelConfig
from mzoo.converters import adapter as adapters
from mzoo.errors import UserError
from mzoo.models.canonical import canonical_tensors
from mzoo.models.lora import check_lora
from mzoo.parallel.lora import LoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# the base linears an adapter can sit on, and the part name of an unfused one
_BASES = {"self_attention.linear_qkv.weight": None, "self_attention.linear_proj.weight": "proj",
          "mlp.linear_fc1.weight": "fc1", "mlp.linear_fc2.weight": "fc2"}


@dataclass(frozen=True)
class Site:
    """One adapted projection: the canonical base weight, the part, its HF module name."""

    base: str  # canonical base weight, e.g. decoder.layers.0.self_attention.linear_qkv.weight
    part: str  # q, k, v, gate, up, proj, fc1, fc2
    role: str  # the family table's role (x for an unfused projection)
    module: str  # HF module, e.g. model.layers.0.self_attn.q_proj

    def canonical(self, which: str) -> str:
        """The canonical adapter tensor: `which` is linear_in (A) or linear_out (B)."""
        return f"{self.base[: -len('weight')]}lora.{self.part}.{which}.weight"

    def peft(self, which: str) -> str:
        return f"{PREFIX}{self.module}.{'lora_A' if which == 'linear_in' else 'lora_B'}.weight"


def sites(cfg: ModelConfig, parts: Optional[tuple[str, ...]] = None) -> list[Site]:
    """Every projection of the model that can carry an adapter (of `parts`, when given), in model
    order; dense MLPs only (experts are not supported yet)."""
    table = adapters.for_family(cfg.family).table
    out = []
    for t in canonical_tensors(cfg):
        single = next((part for suffix, part in _BASES.items() if t.name.endswith("." + suffix)), "")
        if single == "" or ".experts." in t.name or ".shared_experts." in t.name:
            continue
        resolved = table.resolve(t.name)
        if resolved is None:
            continue
        _, names = resolved
        for role, hf in names.items():
            part = single if role == "x" else role
            if parts is None or part in parts:
                out.append(Site(t.name, part, role, hf[: -len(".weight")]))
    return out


def save_adapter(cfg: ModelConfig, lora: LoRAConfig, tensors: dict[str, torch.Tensor], out: Path,
                 base_model: str = "", overwrite: bool = False,
                 extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write canonical adapter tensors as a peft folder that PeftModel.from_pretrained loads; `extra`
    adds files to it before it is switched in (a training run's optimizer state, which peft ignores)."""
    from safetensors.torch import save_file

    chosen = sites(cfg, lora.parts)
    weights = {}
    for site in chosen:
        for which in ("linear_in", "linear_out"):
            weights[site.peft(which)] = tensors[site.canonical(which)].contiguous()
    with atomic_dir(Path(out), overwrite) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, adapter_config(lora, sorted({s.module.rsplit(".", 1)[-1] for s in chosen}),
                                                     base_model))
        if extra is not None:
            extra(tmp)
    return Path(out)


def adapter_config(lora: LoRAConfig, modules: list[str], base_model: str) -> dict:
    """peft's LoraConfig fields for a plain LoRA adapter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none", "use_rslora": lora.rslora,
            "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": base_model, "revision": None}


def read_adapter(path: Path, cfg: ModelConfig) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A peft LoRA folder as (its LoRAConfig, canonical adapter tensors) for the model `cfg`."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.exists() or not weights_file.exists():
        raise UserError(f"{path} is not a peft adapter (it needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        conf = json.loads(config_file.read_text())
    except ValueError:
        raise UserError(f"{config_file} is not valid JSON.") from None
    if conf.get("peft_type") != "LORA":
        raise UserError(f"{path} is a {conf.get('peft_type')} adapter; mzoo loads LoRA adapters (peft_type LORA).")
    for key, wrong in (("use_dora", True), ("fan_in_fan_out", True)):
        if conf.get(key) == wrong:
            raise UserError(f"{config_file} sets {key}; mzoo loads plain LoRA adapters, so save it without {key}.")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if conf.get(key):
            raise UserError(f"{config_file} sets {key}, which mzoo does not support; use one rank and alpha for "
                            "every module of every layer.")
    if conf.get("lora_bias"):
        raise UserError(f"{config_file} sets lora_bias; mzoo loads adapters whose lora_B has no bias.")
    if conf.get("bias", "none") != "none":
        raise UserError(f"{config_file} trains biases (bias={conf['bias']}); mzoo loads adapters with bias 'none'.")
    weights = load_file(str(weights_file))
    by_key = {}
    for site in sites(cfg):
        for which in ("linear_in", "linear_out"):
            by_key[site.peft(which)] = (site, which)
    unknown = sorted(k for k in weights if k not in by_key)
    if unknown:
        raise UserError(f"{weights_file} holds {unknown[0]}, which is no projection of this "
                        f"{cfg.name or cfg.family} model mzoo can adapt; is it the adapter of another model?")
    parts = tuple(sorted({by_key[k][0].part for k in weights}))
    lora = LoRAConfig(rank=int(conf["r"]), alpha=float(conf.get("lora_alpha", conf["r"])),
                      dropout=float(conf.get("lora_dropout", 0.0)), parts=parts, rslora=bool(conf.get("use_rslora")))
    check_lora(cfg, lora)
    expected = {k for k, (site, _) in by_key.items() if site.part in parts}
    missing = sorted(expected - set(weights))
    if missing:
        raise UserError(f"{weights_file} lacks {missing[0]}: mzoo needs every layer adapted the same way.")
    tensors = {}
    for key, value in weights.items():
        site, which = by_key[key]
        tensors[site.canonical(which)] = value
    return lora, tensors


def merged_getter(cfg: ModelConfig, lora: LoRAConfig, adapter: dict[str, torch.Tensor],
                  get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`get` with the adapter merged in: W + scaling * B A per projection, fused by the family table
    (in fp32, then back to the base's dtype), as peft's merge_and_unload."""
    table = adapters.for_family(cfg.family).table
    by_base: dict[str, list[Site]] = {}
    for site in sites(cfg, lora.parts):
        by_base.setdefault(site.base, []).append(site)

    def merged(name: str) -> torch.Tensor:
        base = get(name)
        if name not in by_base:
            return base
        mapping, _ = table.resolve(name)
        zero = torch.zeros(base.shape, dtype=torch.float32)
        parts = dict(mapping.to_hf(zero, cfg))
        for site in by_base[name]:
            a = adapter[site.canonical("linear_in")].float()
            b = adapter[site.canonical("linear_out")].float()
            parts[site.role] = (b @ a) * lora.scaling
        return (base.float() + mapping.to_canonical(parts, cfg)).to(base.dtype)

    return merged
