"""Megatron-LM's `args` <-> ModelConfig and layout.

Megatron-LM reads the architecture of a checkpoint from `args` (an argparse.Namespace pickled in
every rank file and in common.pt); mzoo writes the fields it reads and reads them back into a
ModelConfig for checkpoints that carry no mzoo.yaml.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Optional

import torch

from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Spelling
from mzoo.ckpt.megatron.lm_defaults import lm_defaults
from mzoo.config import MLAConfig, MoEConfig, ModelConfig, RopeConfig, SSMConfig, moe_placement
from mzoo.layout import Layout


def config_to_args(cfg: ModelConfig, ckpt: MegatronCheckpoint, dtype: torch.dtype,
                   tokenizer: Optional[Path] = None) -> argparse.Namespace:
    """Megatron-LM's full args (its parser's defaults, lm_defaults.py) with the model, layout, dtype and
    tokenizer over them; `tokenizer`: the folder of the HF tokenizer saved with the checkpoint."""
    args = argparse.Namespace(**lm_defaults())
    vars(args).update(vars(_dense_args(cfg, ckpt, dtype)))
    vars(args).update(_moe_args(cfg, ckpt), **_mla_args(cfg), **_ssm_args(cfg, ckpt), **_tokenizer_args(cfg, tokenizer))
    vars(args).update(_attention_variant_args(cfg))
    return args


def _attention_variant_args(cfg: ModelConfig) -> dict[str, Any]:
    """GPT-OSS's attention sinks, sliding window and clamped GLU in Megatron-Core's TransformerConfig
    names (Megatron-Bridge's GPT-OSS provider sets the same): window_size is (w - 1, 0), the tokens
    before the query and after it."""
    out: dict[str, Any] = dict(softmax_type=cfg.softmax_type, glu_linear_offset=cfg.glu_linear_offset,
                               activation_func_clamp_value=cfg.activation_func_clamp_value,
                               quick_geglu=cfg.activation == "quick_geglu")
    out["window_size"] = (cfg.window_size - 1, 0) if cfg.window_size is not None else None
    out["window_attn_skip_freq"] = cfg.window_attn_skip_freq
    if cfg.rope.scaling == "yarn":
        out["yarn_correction_range_round_to_int"] = cfg.rope.truncate
    return out


def _attention_variant_from_args(a: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields `_attention_variant_args` wrote (Megatron's defaults where absent)."""
    window = a.get("window_size")
    if window is not None and (len(window) != 2 or window[1] != 0 or window[0] < 0):
        raise CheckpointError(f"the checkpoint's args have window_size {tuple(window)}; mzoo handles causal windows "
                              "(w - 1, 0) only.")
    clamp = a.get("activation_func_clamp_value")
    return dict(softmax_type=a.get("softmax_type") or "vanilla",
                window_size=window[0] + 1 if window is not None else None,
                window_attn_skip_freq=a.get("window_attn_skip_freq") if window is not None else None,
                activation_func_clamp_value=float(clamp) if clamp is not None else None,
                glu_linear_offset=float(a.get("glu_linear_offset") or 0.0))


def _tokenizer_args(cfg: ModelConfig, tokenizer: Optional[Path]) -> dict[str, Any]:
    """Megatron-LM's tokenizer arguments: the checkpoint's own HF tokenizer folder when one travels
    (Megatron-Bridge's load_tokenizer also finds it there), else NullTokenizer over the vocabulary."""
    if tokenizer is None:
        return dict(tokenizer_type="NullTokenizer", tokenizer_model=None)
    return dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer))


# the stack spec Megatron-LM's `--spec` names for MambaModel (Transformer Engine)
MAMBA_STACK_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


def _ssm_args(cfg: ModelConfig, ckpt: MegatronCheckpoint) -> dict[str, Any]:
    """Megatron-LM's MambaModel arguments, plus `mzoo_ssm_*` for what they cannot say (Mamba-1,
    expand without mamba_num_heads, d_conv, chunk size, biases)."""
    ssm = cfg.ssm
    if ssm is None:
        return {}
    out: dict[str, Any] = dict(
        is_hybrid_model=True,
        hybrid_override_pattern=ssm.hybrid_pattern,
        hybrid_attention_ratio=0.0,
        hybrid_mlp_ratio=0.0,
        mamba_state_dim=ssm.d_state,
        mamba_head_dim=ssm.head_dim,
        mamba_num_groups=ssm.num_groups,
        mamba_num_heads=cfg.mamba_dims()["nheads"] if ssm.version == 2 else None,
        spec=MAMBA_STACK_SPEC if ckpt.spelling == "te" else None,
    )
    out.update({f"mzoo_ssm_{k}": getattr(ssm, k) for k in ("version", "expand", "d_conv", "chunk_size", "dt_rank",
                                                           "conv_bias", "proj_bias")})
    return out


def _moe_args(cfg: ModelConfig, ckpt: MegatronCheckpoint) -> dict[str, Any]:
    """Megatron-LM's MoE arguments (names as in megatron/training/arguments.py)."""
    moe = cfg.moe
    out: dict[str, Any] = dict(num_experts=moe.num_experts if moe else None, expert_model_parallel_size=ckpt.layout.ep,
                               expert_tensor_parallel_size=ckpt.layout.tp)
    if moe is None:
        return out
    shared = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size)
    freq: int | list[int] = moe.layer_freq
    if moe.first_k_dense or moe.dense_layers:  # Megatron-LM spells dense layers as a per-layer list
        freq = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    out.update(
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_overlap=False,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.score_function == "softmax" and not moe.norm_topk_prob,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_num_groups=moe.n_group,
        moe_router_group_topk=moe.topk_group,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else None,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_layer_freq=freq,
        moe_grouped_gemm=ckpt.moe_grouped_gemm,
        moe_router_dtype="fp32",
        mzoo_moe_norm_topk_prob=moe.norm_topk_prob,
        mzoo_moe_num_shared_experts=moe.num_shared_experts,
    )
    return out


def _mla_args(cfg: ModelConfig) -> dict[str, Any]:
    """Megatron-LM's multi-latent-attention and YaRN arguments."""
    out: dict[str, Any] = {"multi_latent_attention": cfg.mla is not None}
    mla, rope = cfg.mla, cfg.rope
    if mla is not None:
        out.update(q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_head_dim=mla.qk_nope_head_dim,
                   qk_pos_emb_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                   qk_layernorm=True)  # Megatron's switch for the latent q/kv norms
    if rope.scaling == "yarn":
        out.update(rope_type="yarn", rotary_scaling_factor=rope.factor, mscale=rope.mscale,
                   mscale_all_dim=rope.mscale_all_dim, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    elif mla is not None:
        out["rope_type"] = "rope"
    return out


def _dense_args(cfg: ModelConfig, ckpt: MegatronCheckpoint, dtype: torch.dtype) -> argparse.Namespace:
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
        layernorm_epsilon=cfg.norm_eps,  # what megatron-core 0.19's config reads
        swiglu=cfg.activation == "swiglu",
        # GELU's tanh form: openai_gelu for legacy models and transformers' converter; megatron-core
        # computes it as its fused bias_gelu (F.gelu without bias fusion is the exact erf form)
        openai_gelu=cfg.activation == "gelu_tanh",
        bias_gelu_fusion=cfg.activation == "gelu_tanh" and cfg.add_bias_linear,
        bias_swiglu_fusion=cfg.activation == "swiglu",
        squared_relu=cfg.activation == "squared_relu",
        apply_query_key_layer_scaling=False,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=ckpt.padded_vocab(cfg),
        make_vocab_size_divisible_by=ckpt.make_vocab_size_divisible_by,
        tensor_model_parallel_size=ckpt.layout.tp,
        pipeline_model_parallel_size=ckpt.layout.pp,
        data_parallel_size=ckpt.layout.dp,
        context_parallel_size=ckpt.layout.cp,
        sequence_parallel=ckpt.layout.sequence_parallel,
        virtual_pipeline_model_parallel_size=ckpt.layout.vpp if ckpt.layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=cfg.num_layers // (ckpt.layout.pp * ckpt.layout.vpp) if ckpt.layout.vpp > 1 else None,
        decoder_first_pipeline_num_layers=ckpt.layout.first_stage_layers,
        decoder_last_pipeline_num_layers=ckpt.layout.last_stage_layers,
        transformer_impl="transformer_engine" if ckpt.spelling == "te" else "local",
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        no_save_optim=True,  # mzoo's Megatron files hold no Megatron optimizer or RNG state
        no_save_rng=True,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        iteration=ckpt.iteration if isinstance(ckpt.iteration, int) else 0,
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
    if a.get("quick_geglu"):
        activation = "quick_geglu"
    elif a.get("swiglu"):
        activation = "swiglu"
    elif a.get("squared_relu"):
        activation = "squared_relu"
    else:
        # megatron-core's fused bias_gelu (the default with biases) is the tanh form
        tanh = a.get("openai_gelu") or (a.get("bias_gelu_fusion") and a.get("add_bias_linear", True))
        activation = a.get("mzoo_activation") or ("gelu_tanh" if tanh else "gelu")
    rope = RopeConfig(theta=float(a.get("rotary_base", 10000)), rotary_percent=float(a.get("rotary_percent", 1.0)))
    if a.get("use_rope_scaling"):
        rope.scaling, rope.factor = "llama3", float(a.get("rope_scaling_factor", 8.0))
        rope.low_freq_factor, rope.high_freq_factor = 1.0, 4.0
        rope.original_max_position_embeddings = 8192
    elif a.get("rotary_seq_len_interpolation_factor"):
        rope.scaling, rope.factor = "linear", float(a["rotary_seq_len_interpolation_factor"])
    elif a.get("rope_type") == "yarn":
        rope.scaling, rope.factor = "yarn", float(a.get("rotary_scaling_factor") or 1.0)
        rope.beta_fast, rope.beta_slow = float(a.get("beta_fast", 32.0)), float(a.get("beta_slow", 1.0))
        rope.mscale = float(a["mscale"]) if a.get("mscale") is not None else None
        rope.mscale_all_dim = float(a["mscale_all_dim"]) if a.get("mscale_all_dim") is not None else None
        rope.original_max_position_embeddings = a.get("original_max_position_embeddings") or 4096
        # unset (absent, or null as Megatron-Bridge's run_config.yaml writes it for DeepSeek): rounded, the
        # default of transformers and of Bridge's own Hugging Face export of the same model
        rounding = a.get("yarn_correction_range_round_to_int")
        rope.truncate = True if rounding is None else bool(rounding)
    heads = need("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    mla = _mla_from_args(a)
    hidden = need("hidden_size")
    ffn = a.get("ffn_hidden_size")
    ffn = 4 * hidden if ffn is None else ffn  # 0 in a pure Mamba model
    moe = _moe_from_args(a, ffn or 4 * hidden, need("num_layers"))
    ssm = _ssm_from_args(a, hidden)
    default_family = ("mamba" if ssm else "deepseek" if mla else "mixtral" if moe else
                      "llama" if activation == "swiglu" else "gpt")
    family = a.get("mzoo_family") or default_family
    cfg = ModelConfig(
        family=family,
        vocab_size=a.get("vocab_size") or need("padded_vocab_size"),
        hidden_size=hidden,
        num_layers=need("num_layers"),
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        head_dim=a.get("kv_channels") if a.get("kv_channels") not in (None, hidden // heads) else None,
        ffn_hidden_size=ffn,
        activation=activation,
        normalization="rmsnorm" if a.get("normalization") == "RMSNorm" else "layernorm",
        norm_eps=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        position_embedding=position,
        rope=rope,
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 2048,
        tie_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        add_bias_linear=bool(a.get("add_bias_linear", True)),
        add_qkv_bias=bool(a.get("add_qkv_bias", False)) or bool(a.get("add_bias_linear", True)),
        qk_layernorm=bool(a.get("qk_layernorm", False)) and mla is None,  # MLA: the latent norms, always there
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by") or 128,
        init_method_std=float(a.get("init_method_std", 0.02)),
        moe=moe,
        mla=mla,
        ssm=ssm,
        **_attention_variant_from_args(a),
    )
    cfg.validate("the checkpoint's args")
    return cfg


def _mla_from_args(a: dict[str, Any]) -> Optional[MLAConfig]:
    if not a.get("multi_latent_attention"):
        return None
    return MLAConfig(q_lora_rank=a.get("q_lora_rank"), kv_lora_rank=a.get("kv_lora_rank") or 512,
                     qk_nope_head_dim=a.get("qk_head_dim") or 128, qk_rope_head_dim=a.get("qk_pos_emb_head_dim") or 64,
                     v_head_dim=a.get("v_head_dim") or 128)


def _is_mamba(a: dict[str, Any]) -> bool:
    spec = a.get("spec") or ()
    return bool(a.get("is_hybrid_model") or a.get("hybrid_override_pattern") or a.get("mzoo_ssm_version")
                or any("mamba" in str(part) for part in spec))


def _ssm_from_args(a: dict[str, Any], hidden: int) -> Optional[SSMConfig]:
    """SSMConfig from Megatron-LM's MambaModel arguments (megatron-core's defaults where absent)."""
    if not _is_mamba(a):
        return None
    if (a.get("hybrid_attention_ratio") or a.get("hybrid_mlp_ratio")) and not a.get("hybrid_override_pattern"):
        raise CheckpointError("the checkpoint's args place hybrid layers by hybrid_attention_ratio/hybrid_mlp_ratio "
                              "without a hybrid_override_pattern, which mzoo cannot read; add the pattern to its args.")
    head_dim, heads = a.get("mamba_head_dim") or 64, a.get("mamba_num_heads")
    expand = a.get("mzoo_ssm_expand")
    if expand is None:
        if heads and (heads * head_dim) % hidden:
            raise CheckpointError(f"the checkpoint's mamba_num_heads x mamba_head_dim ({heads * head_dim}) is not a "
                                  f"multiple of hidden_size ({hidden}), which mzoo's ssm.expand cannot express.")
        expand = heads * head_dim // hidden if heads else 2  # MambaMixer's default expand
    dt_rank = a.get("mzoo_ssm_dt_rank")
    return SSMConfig(
        version=a.get("mzoo_ssm_version") or 2,
        d_state=a.get("mamba_state_dim") or 128,
        d_conv=a.get("mzoo_ssm_d_conv") or 4,
        expand=expand,
        head_dim=head_dim,
        num_groups=a.get("mamba_num_groups") or 8,
        chunk_size=a.get("mzoo_ssm_chunk_size") or 128,
        dt_rank=dt_rank,
        conv_bias=bool(a.get("mzoo_ssm_conv_bias", True)),
        proj_bias=bool(a.get("mzoo_ssm_proj_bias", False)),
        hybrid_pattern=a.get("hybrid_override_pattern") or None,
    )


def moe_layer_pattern(freq: Any, num_layers: int) -> list[int]:
    """Megatron-LM's moe_layer_freq (an int N: every N-th layer; a list of 0/1 per layer; or the
    string form "([0]*3+[1]*58)" its argument parser evaluates) -> one 0/1 per layer."""
    if isinstance(freq, str):
        text = freq.strip().strip("()").replace(" ", "")
        if re.fullmatch(r"\d+", text):
            freq = int(text)
        elif re.fullmatch(r"\[[01](,[01])*\](\*\d+)?(\+\[[01](,[01])*\](\*\d+)?)*", text):
            freq = []
            for part in text.split("+"):
                items, _, times = part.partition("*")
                freq += [int(x) for x in items.strip("[]").split(",")] * int(times or 1)
        else:
            raise CheckpointError(f"moe_layer_freq '{freq}' in the checkpoint's args is not a form mzoo reads; "
                                  "use an int or a list of 0/1.")
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(num_layers)]
    pattern = [int(x) for x in freq]
    if len(pattern) != num_layers:
        raise CheckpointError(f"moe_layer_freq lists {len(pattern)} layers but num_layers is {num_layers}; "
                              "the checkpoint's args are inconsistent.")
    return pattern


def _moe_from_args(a: dict[str, Any], ffn: int, num_layers: int) -> Optional[MoEConfig]:
    experts = a.get("num_experts")
    if not experts:
        return None
    pattern = moe_layer_pattern(a.get("moe_layer_freq", 1), num_layers)
    placement = moe_placement(pattern) if any(pattern) else dict(first_k_dense=num_layers, layer_freq=1)
    fm = a.get("moe_ffn_hidden_size") or ffn
    shared_size = a.get("moe_shared_expert_intermediate_size") or 0
    shared = a.get("mzoo_moe_num_shared_experts")
    if shared is None:
        shared = shared_size // fm if shared_size % fm == 0 else 1
    score = a.get("moe_router_score_function") or "softmax"
    norm = a.get("mzoo_moe_norm_topk_prob")
    if norm is None:
        norm = score == "sigmoid" or not a.get("moe_router_pre_softmax", False)
    return MoEConfig(
        num_experts=experts,
        top_k=a.get("moe_router_topk") or 2,
        ffn_hidden_size=fm,
        num_shared_experts=shared if shared_size else 0,
        shared_expert_ffn_hidden_size=shared_size // shared if shared_size and shared_size != shared * fm else None,
        score_function=score,
        expert_bias=bool(a.get("moe_router_enable_expert_bias", False)),
        n_group=a.get("moe_router_num_groups"),
        topk_group=a.get("moe_router_group_topk"),
        routed_scaling_factor=float(a.get("moe_router_topk_scaling_factor") or 1.0),
        norm_topk_prob=bool(norm),
        **placement,
        aux_loss_coeff=float(a.get("moe_aux_loss_coeff") or 0.0),
        bias_update_rate=float(a.get("moe_router_bias_update_rate") or 1e-3),
    )


# The args that define the network and its layout, the same in every rank file of one save (the
# rank-specific fields, paths and counters are left out): a rank file whose values differ comes
# from another model or run.
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "max_position_embeddings", "position_embedding_type", "rotary_base",
    "rotary_percent", "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor",
    "normalization", "norm_epsilon", "swiglu", "openai_gelu", "squared_relu", "add_bias_linear", "add_qkv_bias",
    "qk_layernorm", "untie_embeddings_and_output_weights", "vocab_size", "padded_vocab_size",
    "make_vocab_size_divisible_by", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "transformer_impl", "params_dtype", "fp16", "bf16",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_grouped_gemm", "moe_router_score_function", "moe_router_enable_expert_bias", "multi_latent_attention",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "is_hybrid_model",
    "hybrid_override_pattern", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
    "softmax_type", "window_size", "window_attn_skip_freq", "activation_func_clamp_value", "glu_linear_offset",
    "quick_geglu",
)


def args_difference(args: Any, reference: Any) -> Optional[tuple[str, Any, Any]]:
    """The first model-defining arg (MODEL_ARGS) whose value differs: (name, in args, in reference)."""
    a, b = vars(args) if isinstance(args, argparse.Namespace) else {}, vars(reference)
    missing = object()
    for key in MODEL_ARGS:
        mine, theirs = a.get(key, missing), b.get(key, missing)
        if mine != theirs:
            return key, None if mine is missing else mine, None if theirs is missing else theirs
    return None


def args_to_checkpoint(args: argparse.Namespace, spelling: Optional[Spelling] = None) -> MegatronCheckpoint:
    a = vars(args)
    layout = Layout(tp=a.get("tensor_model_parallel_size") or 1, pp=a.get("pipeline_model_parallel_size") or 1,
                    vpp=a.get("virtual_pipeline_model_parallel_size") or 1,
                    first_stage_layers=a.get("decoder_first_pipeline_num_layers"),
                    last_stage_layers=a.get("decoder_last_pipeline_num_layers"),
                    ep=a.get("expert_model_parallel_size") or 1)
    spelling = spelling or ("local" if a.get("transformer_impl") == "local" else "te")
    return MegatronCheckpoint(layout=layout, spelling=spelling,
                              make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by") or 128,
                              iteration=a.get("iteration", 0) or 0,
                              moe_grouped_gemm=bool(a.get("moe_grouped_gemm", False)))


def check_expert_tp(args: argparse.Namespace) -> None:
    """mzoo splits experts over TP like dense layers (Megatron's default); say so when a checkpoint differs."""
    a = vars(args)
    etp, tp = a.get("expert_tensor_parallel_size"), a.get("tensor_model_parallel_size") or 1
    if a.get("num_experts") and etp not in (None, tp):
        raise CheckpointError(f"the checkpoint uses expert_tensor_parallel_size {etp} with TP {tp}; mzoo reads only "
                              "expert TP equal to TP.")


