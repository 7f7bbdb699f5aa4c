"""What every Megatron format shares: the layout, Megatron-LM's `args`, name spellings, the tracker.

Megatron-LM reads the architecture of a checkpoint from `args` (an argparse.Namespace pickled in
every rank file and in common.pt); mzoo writes the fields it reads and reads them back into a
ModelConfig for checkpoints that carry no mzoo.yaml.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from mzoo.ckpt.atomic import atomic_write_bytes
from mzoo.ckpt.hf import CheckpointError
from mzoo.config import ModelConfig, ParallelConfig, RopeConfig

TRACKER = "latest_checkpointed_iteration.txt"
Spelling = Literal["te", "local"]


@dataclass
class MegatronLayout:
    """Everything about how a Megatron checkpoint is laid out, beyond the model itself."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    spec: Spelling = "te"
    make_vocab_size_divisible_by: int = 128
    iteration: int | str = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, vpp=self.vpp,
                              make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)

    def padded_vocab(self, cfg: ModelConfig) -> int:
        return cfg.padded_vocab_size(self.tp, self.make_vocab_size_divisible_by)


# ---- spellings: TE (canonical) <-> local ----------------------------------------------------------
_TE_TO_LOCAL = [
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
]


def to_spelling(name: str, spec: Spelling) -> str:
    if spec == "te":
        return name
    for te, local in _TE_TO_LOCAL:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


_LINEAR = re.compile(r"(linear_qkv|linear_proj|linear_fc1|linear_fc2|output_layer)\.weight$")


def extra_state_name(name: str) -> Optional[str]:
    """Megatron's linear modules add `<module>._extra_state` to state dicts; strict loads expect it."""
    return _LINEAR.sub(lambda m: f"{m.group(1)}._extra_state", name) if _LINEAR.search(name) else None


# ---- args <-> ModelConfig -------------------------------------------------------------------------


def config_to_args(cfg: ModelConfig, layout: MegatronLayout, dtype: torch.dtype) -> argparse.Namespace:
    """The fields of Megatron-LM's args that describe the model, layout and dtype."""
    rope = cfg.rope
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.groups != cfg.num_attention_heads,
        num_query_groups=cfg.groups,
        kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="learned_absolute" if cfg.position_embedding == "learned" else cfg.position_embedding,
        rotary_base=int(rope.theta) if float(rope.theta).is_integer() else rope.theta,
        rotary_percent=rope.rotary_percent,
        rotary_seq_len_interpolation_factor=rope.factor if rope.scaling == "linear" else None,
        use_rope_scaling=rope.scaling == "llama3",
        rope_scaling_factor=rope.factor if rope.scaling == "llama3" else 8.0,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        norm_epsilon=cfg.norm_eps,
        swiglu=cfg.activation == "swiglu",
        openai_gelu=False,
        squared_relu=cfg.activation == "squared_relu",
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=layout.padded_vocab(cfg),
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=cfg.num_layers // (layout.pp * layout.vpp) if layout.vpp > 1 else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        transformer_impl="transformer_engine" if layout.spec == "te" else "local",
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        iteration=layout.iteration if isinstance(layout.iteration, int) else 0,
        mzoo_family=cfg.family,
        mzoo_activation=cfg.activation,
    )


def args_to_config(args: argparse.Namespace) -> ModelConfig:
    """ModelConfig from Megatron-LM args (checkpoints that carry no mzoo.yaml)."""
    a = vars(args)

    def need(key: str) -> Any:
        if a.get(key) is None:
            raise CheckpointError(f"the checkpoint's args lack '{key}'; mzoo cannot tell the architecture.")
        return a[key]

    position = a.get("position_embedding_type", "learned_absolute")
    position = {"learned_absolute": "learned"}.get(position, position)
    if a.get("swiglu"):
        activation = "swiglu"
    elif a.get("squared_relu"):
        activation = "squared_relu"
    else:
        activation = a.get("mzoo_activation") or ("gelu_tanh" if a.get("openai_gelu") else "gelu")
    rope = RopeConfig(theta=float(a.get("rotary_base", 10000)), rotary_percent=float(a.get("rotary_percent", 1.0)))
    if a.get("use_rope_scaling"):
        rope.scaling, rope.factor = "llama3", float(a.get("rope_scaling_factor", 8.0))
        rope.low_freq_factor, rope.high_freq_factor = 1.0, 4.0
        rope.original_max_position_embeddings = 8192
    elif a.get("rotary_seq_len_interpolation_factor"):
        rope.scaling, rope.factor = "linear", float(a["rotary_seq_len_interpolation_factor"])
    heads = need("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    family = a.get("mzoo_family") or ("llama" if activation == "swiglu" else "gpt")
    hidden = need("hidden_size")
    cfg = ModelConfig(
        family=family,
        vocab_size=a.get("vocab_size") or need("padded_vocab_size"),
        hidden_size=hidden,
        num_layers=need("num_layers"),
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        head_dim=a.get("kv_channels") if a.get("kv_channels") not in (None, hidden // heads) else None,
        ffn_hidden_size=a.get("ffn_hidden_size") or 4 * hidden,
        activation=activation,
        normalization="rmsnorm" if a.get("normalization") == "RMSNorm" else "layernorm",
        norm_eps=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        position_embedding=position,
        rope=rope,
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 2048,
        tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        add_bias_linear=bool(a.get("add_bias_linear", True)),
        add_qkv_bias=bool(a.get("add_qkv_bias", False)) or bool(a.get("add_bias_linear", True)),
        qk_layernorm=bool(a.get("qk_layernorm", False)),
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by") or 128,
        init_method_std=float(a.get("init_method_std", 0.02)),
    )
    cfg.validate("the checkpoint's args")
    return cfg


def args_to_layout(args: argparse.Namespace, spec: Optional[Spelling] = None) -> MegatronLayout:
    a = vars(args)
    return MegatronLayout(
        tp=a.get("tensor_model_parallel_size") or 1,
        pp=a.get("pipeline_model_parallel_size") or 1,
        vpp=a.get("virtual_pipeline_model_parallel_size") or 1,
        first_stage_layers=a.get("decoder_first_pipeline_num_layers"),
        last_stage_layers=a.get("decoder_last_pipeline_num_layers"),
        spec=spec or ("local" if a.get("transformer_impl") == "local" else "te"),
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by") or 128,
        iteration=a.get("iteration", 0) or 0,
    )


# ---- tracker and iteration folders --------------------------------------------------------------
def iteration_dir(root: Path, iteration: int | str) -> Path:
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def find_iteration_dir(root: Path) -> tuple[Path, int | str]:
    """The folder the tracker points at (or `root` itself when given an iteration folder)."""
    root = Path(root)
    if (root / TRACKER).exists():
        text = (root / TRACKER).read_text().strip()
        iteration: int | str = "release" if text == "release" else int(text)
        folder = iteration_dir(root, iteration)
        if not folder.is_dir():
            raise CheckpointError(f"{root / TRACKER} points at {folder.name}, which does not exist; the copy is incomplete.")
        return folder, iteration
    match = re.fullmatch(r"iter_(\d{7})", root.name)
    if match or root.name == "release":
        return root, int(match.group(1)) if match else "release"
    raise CheckpointError(f"{root} has no {TRACKER} and is not an iter_XXXXXXX folder; it is not a Megatron checkpoint.")


def write_tracker(root: Path, iteration: int | str) -> None:
    text = f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n"
    atomic_write_bytes(root / TRACKER, text.encode())

