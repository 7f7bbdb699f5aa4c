"""The REAL megatron-core (0.16.1) on CPU as a test reference for mzoo's Megatron checkpoints.

The model/checkpoint functions run inside a gloo process group (tests launch them on 1 or 2
ranks with `tests/dist.py`'s `run(fn, world, *args)`, as module-level functions of a test
module). The only thing replaced in megatron-core is the handful of `torch.cuda` calls that
`megatron_shim.install_cpu_shim()` maps to the CPU. Importing this module does NOT import
megatron or install the shim: that happens on the first call that needs megatron, so the pytest
process itself stays unpatched and can use the plain-DCP helpers (`dcp_metadata`,
`read_dcp_tensors`, `write_plain_dcp_checkpoint`, `stack_layers`).

What it offers a test:
- `transformer_config(cfg, tp)` / `build_gpt_model(cfg, tp, padded_vocab, seed)`: a megatron-core
  `GPTModel` with the LOCAL spec (`get_gpt_layer_local_spec`), fp32, CPU-initialised, eval mode,
  for mzoo's dense configs (LLaMA-style and GPT-2-style); `unsupported(cfg)` names what it can't
  express. `perturb_(model)` makes norms/biases informative.
- `save_dist_checkpoint(model, path, args, iteration)`: megatron-core writes a torch_dist
  checkpoint with the top level of Megatron-LM's `save_checkpoint` (`model` sharded, `args`,
  `iteration`, `checkpoint_version`, `content_metadata`; no optimizer, no rng state).
  `megatron_args(cfg, tp, padded_vocab)` builds the `args` Namespace (Megatron-LM names).
- `load_dist_checkpoint(model, path, strict, dist_strictness)`: megatron-core reads a torch_dist
  checkpoint into the model as Megatron-LM's `load_checkpoint` does (vocab-padding mismatches
  handled by megatron itself).
- `zarr_objects(model, mzoo_folder, save_to)`: megatron-core's zarr-backend ShardedObject save
  and load (the part of zarr that 0.16.1 still ships) on the model's `_extra_state` objects.
- `logits(model, ids)`: full padded-vocab logits [b, s, V_padded], gathered over TP.
- `sharded_keys(model)`, `local_state_dict(model)`, `global_tensors(model)`: how megatron names,
  shards and stacks the model's tensors (collective where noted).
- Without megatron (safe in the pytest process): `dcp_metadata`, `read_dcp_tensors`,
  `read_dcp_objects` read a torch_dist directory with plain DCP; `LOCAL_TO_CHECKPOINT`,
  `stack_layers`, `extra_state_entries`, `write_plain_dcp_checkpoint` build one the way mzoo
  writes it. `pack`/`unpack` carry results (tensors included) back from `dist.run` ranks.

Loading a plain-DCP checkpoint in megatron-core 0.16.1: at megatron's default strictness
("assume_ok_unexpected", Megatron-LM's default --dist-ckpt-strictness) every key megatron asks
for must exist, and it asks for the `_extra_state` ShardedObjects of the linear layers
(`decoder.layers.<module>._extra_state/shard_<i>_<L>`, value [None] in the local spec); a
checkpoint without them fails with "Missing key in checkpoint state_dict". Write them
(`extra_state_entries`), or load with dist_strictness="log_unexpected" and strict=False.

Note: megatron-core 0.16.1 wraps openai_gelu, squared_relu, ... in `jit_fuser` = torch.compile,
so GPT-2-style / squared-relu references compile with inductor on first use (needs a C++
compiler on CPU; a few seconds).

Megatron mapping of mzoo's activations (local spec, no Transformer Engine):
- swiglu: `gated_linear_unit=True, activation_func=F.silu` (Megatron-LM `--swiglu`).
- geglu: `gated_linear_unit=True, activation_func=F.gelu`.
- gelu (exact erf GELU): `activation_func=F.gelu` with `bias_activation_fusion=False`. Careful:
  Megatron-LM's default `--bias-gelu-fusion` swaps in `bias_gelu`, a TANH approximation, whenever
  fc1 has a bias; this reference keeps all fusions off so it computes what the config says.
- gelu_tanh (GPT-2's HF `gelu_new`): `activation_func=openai_gelu` from
  megatron.core.transformer.utils (Megatron-LM `--openai-gelu`):
  0.5*x*(1+tanh(0.7978845608028654*(x+0.044715*x^3))), the same formula as HF `gelu_new` and as
  `F.gelu(x, approximate="tanh")`. (megatron.core.activations.fast_gelu and the fused
  `bias_gelu` are the same curve with the constant rounded to 0.7978845608 / 0.79788456.)
- relu / squared_relu / silu: `F.relu` / `megatron.core.activations.squared_relu` / `F.silu`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_shim import install_cpu_shim
from mzoo.config import ModelConfig

CHECKPOINT_VERSION = 3.0  # what Megatron-LM's generate_state_dict writes
# content_metadata Megatron-LM (training/checkpointing.py) saves with a model-only checkpoint
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}

# Local-spec module names whose checkpoint key is the TE spelling (megatron's
# TransformerLayer.sharded_state_dict_keys_map for the local spec); everything else keeps its name.
LOCAL_TO_CHECKPOINT = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def _activation(name: str):
    """mzoo activation -> (gated_linear_unit, activation_func) in megatron-core terms."""
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer.utils import openai_gelu

    return {
        "swiglu": (True, F.silu),
        "quick_geglu": (True, quick_gelu),
        "geglu": (True, F.gelu),
        "gelu": (False, F.gelu),
        "gelu_tanh": (False, openai_gelu),
        "relu": (False, F.relu),
        "squared_relu": (False, squared_relu),
        "silu": (False, F.silu),
    }[name]


# ---- results across processes -------------------------------------------------------------------
def pack(obj: Any) -> bytes:
    """Serialise a result (tensors included) to bytes for the trip back from a `dist.run` rank.
    torch tensors put on a multiprocessing queue travel as shared-memory handles that die with
    the worker process; bytes do not."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    import io

    return torch.load(io.BytesIO(data), weights_only=False)


# ---- parallel state ------------------------------------------------------------------------------
def init_parallel(tp: int, seed: int = 1234, ep: int = 1) -> None:
    """(Re)initialise megatron's model-parallel groups for tensor parallel size `tp` (and expert
    parallel size `ep`, carved out of the data-parallel ranks) on the already-initialised default
    (gloo) group, and seed megatron's RNG tracker (model_parallel_cuda_manual_seed, which the
    shim routes to the CPU generator)."""
    install_cpu_shim()
    from megatron.core import parallel_state, tensor_parallel

    assert dist.is_initialized(), "run inside a torch.distributed (gloo) process group"
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size()) != (tp, ep):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


# ---- model ---------------------------------------------------------------------------------------
def unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why this dense megatron-core reference cannot express `cfg`, or None if it can."""
    if cfg.mla is not None:
        return "MLA needs Transformer Engine"
    if cfg.ssm is not None:
        return "Mamba needs the mamba-ssm kernels"
    if cfg.position_embedding == "rope":
        r = cfg.rope
        if r.scaling == "yarn" and cfg.family != "gpt_oss":
            return "YaRN rope is only used with MLA and GPT-OSS here"
        if r.scaling == "llama3" and (r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings) != (
            1.0,
            4.0,
            8192,
        ):
            return "megatron-core's llama3 rope scaling hard-codes low=1, high=4, original_max=8192"
    return None


def moe_config(cfg: ModelConfig, ep: int = 1) -> dict[str, Any]:
    """megatron-core's MoE TransformerConfig fields for an mzoo MoE config (none for a dense one):
    SequentialMLP experts (no grouped GEMM), the allgather token dispatcher (the alltoall one needs
    CUDA streams), no token dropping, no load-balancing loss (eval reference)."""
    moe = cfg.moe
    if moe is None:
        return {}
    freq: Any = moe.layer_freq
    if moe.first_k_dense or moe.dense_layers:
        freq = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=(
            moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size) or None),
        moe_router_score_function=moe.score_function,
        # softmax over the top-k logits == renormalised top-k of the full softmax (Mixtral)
        moe_router_pre_softmax=moe.score_function == "softmax" and not moe.norm_topk_prob,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_num_groups=moe.n_group,
        moe_router_group_topk=moe.topk_group,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_layer_freq=freq,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
    )


def transformer_config(cfg: ModelConfig, tp: int, ep: int = 1, **overrides: Any):
    """megatron-core TransformerConfig for an mzoo config: fp32, CPU init, no dropout and no
    fusions (so the reference computes exactly the configured math); MoE fields from moe_config."""
    install_cpu_shim()
    from megatron.core.transformer.transformer_config import TransformerConfig

    why = unsupported(cfg)
    if why:
        raise NotImplementedError(f"{cfg.name or 'config'}: {why}")
    return TransformerConfig(**config_kwargs(cfg, tp, ep, **overrides))


def config_kwargs(cfg: ModelConfig, tp: int, ep: int = 1, **overrides: Any) -> dict[str, Any]:
    """The TransformerConfig arguments transformer_config uses (no checks)."""
    gated, act = _activation(cfg.activation)
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=gated,
        activation_func=act,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        **moe_config(cfg, ep),
        **_gpt_oss_config(cfg),
    )
    kwargs.update(overrides)
    return kwargs


def _gpt_oss_config(cfg: ModelConfig) -> dict[str, Any]:
    """Sinks, the sliding window, the clamped GLU and yarn as Megatron-Bridge's GPT-OSS provider sets
    them (TransformerConfig fields; the yarn_* ones GPTModel and the attention read from the config)."""
    if cfg.softmax_type == "vanilla" and cfg.window_size is None and cfg.activation_func_clamp_value is None:
        return {}
    out: dict[str, Any] = dict(softmax_type=cfg.softmax_type, glu_linear_offset=cfg.glu_linear_offset,
                               activation_func_clamp_value=cfg.activation_func_clamp_value)
    if cfg.window_size is not None:
        out.update(window_size=(cfg.window_size - 1, 0), window_attn_skip_freq=cfg.window_attn_skip_freq)
    return out


def _yarn_attributes(config, cfg: ModelConfig) -> None:
    """The yarn_* attributes megatron-core's GPTModel and attention read with getattr (Megatron-Bridge's
    GPTModelProvider declares them; TransformerConfig 0.16.1 does not)."""
    r = cfg.rope
    config.yarn_rotary_scaling_factor = r.factor
    config.yarn_original_max_position_embeddings = r.original_max_position_embeddings
    config.yarn_beta_fast, config.yarn_beta_slow = r.beta_fast, r.beta_slow
    config.yarn_mscale, config.yarn_mscale_all_dim = r.mscale, r.mscale_all_dim
    config.yarn_correction_range_round_to_int = r.truncate


def gpt_model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The GPTModel constructor arguments that are not TransformerConfig fields."""
    kw: dict[str, Any] = dict(
        max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type={"learned": "learned_absolute", "rope": "rope", "none": "none"}[
            cfg.position_embedding
        ],
    )
    if cfg.position_embedding == "rope":
        kw.update(rotary_base=cfg.rope.theta, rotary_percent=cfg.rope.rotary_percent)
        if cfg.rope.scaling == "linear":
            kw["seq_len_interpolation_factor"] = cfg.rope.factor
        elif cfg.rope.scaling == "yarn":
            kw["position_embedding_type"] = "yarn"
        elif cfg.rope.scaling == "llama3":
            kw.update(rope_scaling=True, rope_scaling_factor=cfg.rope.factor)
    return kw


def build_gpt_model(cfg: ModelConfig, tp: int, padded_vocab: Optional[int] = None, seed: int = 1234, ep: int = 1):
    """A megatron-core GPTModel (local spec, fp32, CPU, eval mode) for `cfg` at tensor parallel
    size `tp` and expert parallel size `ep` (the process group's world must be a multiple of tp,
    and tp * ep must divide it; the rest is DP). Initialises megatron's parallel state and RNG.
    With CPU initialisation megatron draws the full master weights and slices them, so the same
    seed gives the same global dense model at every TP. MoE models use the decoder block spec
    (per-layer dense/MoE specs from moe_layer_freq) with SequentialMLP experts."""
    init_parallel(tp, seed, ep)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    config = transformer_config(cfg, tp, ep)
    if cfg.position_embedding == "rope" and cfg.rope.scaling == "yarn":
        _yarn_attributes(config, cfg)
    if cfg.moe is not None:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
    else:
        spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=cfg.qk_layernorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab or cfg.padded_vocab_size(tp),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        **gpt_model_kwargs(cfg),
    )
    return model.eval()


def build_mla_model_for_names(cfg: ModelConfig, tp: int, padded_vocab: int, ep: int = 1):
    """megatron-core's own GPTModel for an MLA (DeepSeek) config, local spec, built ONLY to read its
    state-dict and sharded-state-dict names and shapes; it cannot run a forward.

    megatron-core 0.16.1 cannot build MLA on CPU without Transformer Engine as shipped: its local
    DotProductAttention rejects the k_channels/v_channels MLASelfAttention passes, and
    MLASelfAttention.__init__ tests isinstance(linear_proj, TELinear) while TELinear is None (its
    `megatron.core.extensions.transformer_engine` import succeeds without TE, so HAVE_TE is True).
    Here the core attention -- a module without parameters or state -- is replaced by IdentityOp
    and multi_latent_attention.HAVE_TE is set False; every module that owns parameters or
    checkpoint state is megatron-core's own."""
    init_parallel(tp, 1234, ep)
    import megatron.core.transformer.multi_latent_attention as mla_module
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    mla_module.HAVE_TE = False
    mla, rope = cfg.mla, cfg.rope
    dense = config_kwargs(cfg, tp, ep)
    dense.update(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=mla.q_lora_rank,
                 kv_lora_rank=mla.kv_lora_rank, qk_head_dim=mla.qk_nope_head_dim,
                 qk_pos_emb_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                 rope_type="yarn" if rope.scaling == "yarn" else "rope")
    config = MLATransformerConfig(**dense)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = IdentityOp
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab, pre_process=True,
                    post_process=True, parallel_output=True, **gpt_model_kwargs(cfg)).eval()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Make norm weights and biases informative (they start at 1 and 0). Every rank draws the
    same full-size noise and adds its own contiguous TP slice, so the global model is the same at
    every TP -- except for a gated fc1 bias, whose rank slice is [gate_r; up_r], not contiguous
    (perturb at TP=1 when that matters)."""
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for _, p in sorted(model.named_parameters()):
        if p.dim() != 1:
            continue
        parallel = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) == 0
        noise = torch.randn(p.shape[0] * (tp if parallel else 1), generator=gen) * scale
        if parallel:
            noise = noise.view(tp, -1)[tp_rank]
        p.add_(noise.to(p.dtype))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V_padded] of the real megatron-core forward, gathered over
    TP. The causal mask is passed explicitly (True = masked), as Megatron-LM's
    get_ltor_masks_and_position_ids does: megatron's fallback default-mask helper allocates on
    device "cuda"."""
    b, s = ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    return model(ids, position_ids, mask, runtime_gather_output=True).float()


# ---- names and shapes ----------------------------------------------------------------------------
def sharded_state_dict(model) -> dict:
    """model.sharded_state_dict() with the metadata Megatron-LM passes for torch_dist saves
    (singleton_local_shards=False keeps gated fc1 under ONE key, [gate_all; up_all];
    True would write `..._w` / `..._v` keys instead)."""
    from megatron.core import parallel_state

    metadata = dict(CONTENT_METADATA, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return model.sharded_state_dict(metadata=metadata)


def sharded_keys(model) -> dict[str, dict[str, Any]]:
    """How each model.state_dict() name maps to the checkpoint, from megatron's own sharded
    state dict: {name: {"kind": "tensor" | "object" | "factory", "key", "global_shape",
    "local_shape", "global_offset", "axis_fragmentations", "replica_id", "prepend_axis_num",
    "allow_shape_mismatch"}} (fewer fields for objects and factories)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = {}
    for name, sh in sharded_state_dict(model).items():
        if isinstance(sh, ShardedTensor):
            out[name] = dict(
                kind="tensor",
                key=sh.key,
                global_shape=tuple(sh.global_shape),
                local_shape=tuple(sh.local_shape),
                global_offset=tuple(sh.global_offset),
                axis_fragmentations=tuple(sh.axis_fragmentations),
                replica_id=sh.replica_id,
                prepend_axis_num=sh.prepend_axis_num,
                allow_shape_mismatch=sh.allow_shape_mismatch,
            )
        elif isinstance(sh, ShardedObject):
            out[name] = dict(
                kind="object",
                key=sh.unique_key,
                global_shape=tuple(sh.global_shape),
                global_offset=tuple(sh.global_offset),
                replica_id=sh.replica_id,
            )
        elif isinstance(sh, ShardedTensorFactory):
            out[name] = dict(kind="factory", key=sh.key, local_shape=tuple(sh.data.shape))
        else:  # pragma: no cover
            out[name] = dict(kind=type(sh).__name__)
    return out


def local_state_dict(model) -> dict[str, Any]:
    """model.state_dict() (what a legacy "torch"-format rank file holds under `model`): tensors
    detached and cloned, `_extra_state` entries with their value (None in the local spec)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}


def global_tensors(model) -> dict[str, torch.Tensor]:
    """The model's global tensors under megatron's checkpoint keys, exactly as torch_dist stores
    them (stacked layers with a leading [L] axis, gated fc1 as [gate_all; up_all]), assembled
    from megatron's own ShardedTensors (factories applied) and summed over ranks: each main
    replica contributes its disjoint piece. Collective. `_extra_state` objects are left out."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    sd = sharded_state_dict(model)
    apply_factories(sd)
    pieces: list = []

    def collect(x):
        if isinstance(x, ShardedTensor):
            pieces.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(sd)
    out: dict[str, torch.Tensor] = {}
    for sh in pieces:
        full = out.get(sh.key)
        if full is None:
            full = out[sh.key] = torch.zeros(sh.global_shape, dtype=sh.data.dtype)
        if not is_main_replica(sh.replica_id):
            continue
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, shape))
        full[index] = sh.data.detach().reshape(shape)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for key in sorted(out):
            dist.all_reduce(out[key])
    return out


# ---- checkpoints written and read by megatron-core -----------------------------------------------
def megatron_args(cfg: ModelConfig, tp: int, padded_vocab: int, **extra: Any) -> argparse.Namespace:
    """An `args` Namespace with the Megatron-LM argument names that a checkpoint reader
    (Megatron-LM's load_args_from_checkpoint, or mzoo) needs to rebuild the model. A real
    Megatron-LM run stores its full argparse Namespace (hundreds of fields); these are the
    architecture/layout ones."""
    pos = {"learned": "learned_absolute", "rope": "rope", "none": "none"}[cfg.position_embedding]
    theta = cfg.rope.theta
    args = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.groups != cfg.num_attention_heads,
        num_query_groups=cfg.groups,
        kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings,
        position_embedding_type=pos,
        add_position_embedding=pos == "learned_absolute",
        use_rotary_position_embeddings=pos == "rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rotary_percent=cfg.rope.rotary_percent,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=cfg.rope.factor if cfg.rope.scaling == "linear" else None,
        use_rope_scaling=cfg.rope.scaling == "llama3",
        rope_scaling_factor=cfg.rope.factor if cfg.rope.scaling == "llama3" else 8.0,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
        norm_epsilon=cfg.norm_eps,
        apply_layernorm_1p=False,
        swiglu=cfg.activation == "swiglu",
        squared_relu=cfg.activation == "squared_relu",
        openai_gelu=cfg.activation == "gelu_tanh",
        onnx_safe=False,
        bias_gelu_fusion=False,
        bias_swiglu_fusion=False,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        num_experts=None,
        init_method_std=cfg.init_method_std,
        params_dtype=torch.float32,
        fp16=False,
        bf16=False,
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        tokenizer_type="NullTokenizer",
    )
    args.update(_moe_args(cfg))
    args.update(extra)
    return argparse.Namespace(**args)


def _moe_args(cfg: ModelConfig) -> dict[str, Any]:
    """Megatron-LM's MoE argument names (megatron/training/arguments.py), from moe_config."""
    if cfg.moe is None:
        return {}
    fields = moe_config(cfg)
    out = {("num_experts" if k == "num_moe_experts" else k): v for k, v in fields.items()}
    out.pop("expert_model_parallel_size")
    return out


def save_dist_checkpoint(model, path: str | os.PathLike, args: Optional[argparse.Namespace] = None,
                         iteration: int = 0) -> None:
    """megatron-core writes its own torch_dist checkpoint of `model` into directory `path`
    (collective: every rank calls it). Top level as Megatron-LM's save_checkpoint with
    --no-save-optim --no-save-rng: `model` (sharded), `args`, `iteration`,
    `checkpoint_version`, plus the `content_metadata` Megatron-LM passes to dist_checkpointing.

    Where things go in 0.16.1: tensors and the `_extra_state` ShardedObjects -> DCP
    (`__<rank>_<n>.distcp` + `.metadata`); everything else (args, iteration,
    checkpoint_version, content_metadata) -> `common.pt` (torch.save by rank 0);
    `metadata.json` last. The save starts writer processes (spawn)."""
    install_cpu_shim()
    from megatron.core import dist_checkpointing

    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state: dict[str, Any] = {
        "model": sharded_state_dict(model),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
    }
    if args is not None:
        state["args"] = args
    dist_checkpointing.save(state, str(path), content_metadata=dict(CONTENT_METADATA))


def load_dist_checkpoint(model, path: str | os.PathLike, strict: bool = True,
                         dist_strictness: str = "assume_ok_unexpected") -> dict[str, Any]:
    """megatron-core loads the torch_dist checkpoint at `path` into `model` (collective), as
    Megatron-LM's load_checkpoint does: dist_checkpointing.load({"model":
    model.sharded_state_dict()}, strict=dist_strictness) then
    model.load_state_dict(state["model"], strict=strict).

    `dist_strictness` is Megatron-LM's --dist-ckpt-strictness (default "assume_ok_unexpected":
    every requested key, `_extra_state` objects included, must be in the checkpoint or DCP raises
    "Missing key in checkpoint state_dict"). With "log_unexpected" megatron drops requested keys
    the checkpoint lacks; the module load then needs strict=False for the dropped `_extra_state`
    (Megatron-LM's load_model_state_dict retries with strict=False by itself).

    Vocabulary padding needs nothing extra: megatron marks the embedding and output-layer
    ShardedTensors allow_shape_mismatch=True (VocabParallelEmbedding.sharded_state_dict and
    LanguageModule.sharded_state_dict), so a checkpoint padded to another size (or not padded)
    fills the overlapping rows and leaves the model's extra rows zero.
    Returns the common state that came back (args, iteration, checkpoint_version, ...) plus
    "_incompatible_keys" (missing, unexpected) from load_state_dict."""
    install_cpu_shim()
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": sharded_state_dict(model)}, str(path), strict=dist_strictness)
    result = model.load_state_dict(state.pop("model"), strict=strict)
    state["_incompatible_keys"] = (sorted(result.missing_keys), sorted(result.unexpected_keys))
    return state


def common_in_dcp() -> bool:
    """megatron-core >= 0.17 saves the common state (args, iteration) as the DCP object
    `common_state/shard_0_1` instead of common.pt (it still reads common.pt)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("megatron-core").split(".")[:2])
    return (major, minor) >= (0, 17)


def load_common(path: str | os.PathLike) -> dict[str, Any]:
    """common.pt as megatron-core reads it (dist_checkpointing.load_common_state_dict)."""
    install_cpu_shim()
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def zarr_objects(model, mzoo_folder: str | os.PathLike, save_to: str | os.PathLike) -> dict[str, Any]:
    """The ShardedObject half of megatron-core's zarr backend, on the model's own objects (the
    linears' `_extra_state`): TorchCommonSaveStrategy writes them into `save_to` as a zarr save did
    (`<key>/shard_<offsets>_<shape>.pt`, main replicas only), and TorchCommonLoadStrategy loads them
    from `mzoo_folder` as a zarr load does, raising "Object shard ... not found" for a missing one
    (collective only in that every rank calls it). strategies/common.py is the same file in 0.16.1
    as in 0.15.3, the last release that loads zarr. Returns {unique key: data loaded}."""
    install_cpu_shim()
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.common import (TorchCommonLoadStrategy,
                                                                    TorchCommonSaveStrategy)

    objects, _ = extract_matching_values(sharded_state_dict(model), lambda x: isinstance(x, ShardedObject))
    TorchCommonSaveStrategy("torch", 1).save_sharded_objects(objects, str(save_to))
    keys = {name: obj.unique_key for name, obj in objects.items()}
    loaded = TorchCommonLoadStrategy().load_sharded_objects(objects, str(mzoo_folder))
    return {keys[name]: data for name, data in loaded.items()}


# ---- plain torch.distributed.checkpoint: no megatron needed --------------------------------------
def dcp_metadata(path: str | os.PathLike) -> dict[str, tuple]:
    """What a torch_dist directory holds, from its DCP `.metadata` only:
    {key: ("tensor", shape, dtype) or ("bytes",)}."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    out: dict[str, tuple] = {}
    for key, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out[key] = ("tensor", tuple(m.size), m.properties.dtype)
        elif isinstance(m, BytesStorageMetadata):
            out[key] = ("bytes",)
        else:  # pragma: no cover
            out[key] = (type(m).__name__,)
    return out


def read_dcp_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint as a full global tensor, read with plain
    torch.distributed.checkpoint (no megatron, no process group)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp_metadata(path)
    sd = {k: torch.empty(m[1], dtype=m[2]) for k, m in meta.items() if m[0] == "tensor"}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return sd


def read_dcp_objects(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor (bytes) entries of a torch_dist checkpoint, unpickled by plain DCP. Megatron
    writes each ShardedObject as torch.save([obj.data]) under `obj.unique_key`, e.g. the
    `_extra_state` of stacked layer i of L: `<name>._extra_state/shard_<i>_<L>` -> [None]."""
    import io

    import torch.distributed.checkpoint as dcp

    sd: dict[str, Any] = {k: io.BytesIO() for k, m in dcp_metadata(path).items() if m[0] == "bytes"}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)  # replaces values
    return sd


def stack_layers(state_dict: dict[str, Any], num_layers: int) -> dict[str, torch.Tensor]:
    """A TP=1 megatron state dict (local-spec names, `decoder.layers.{i}.…`) -> the global
    torch_dist tensors: per-layer tensors stacked on a leading [L] axis under
    `decoder.layers.<name>` with the local-spec norms renamed to the TE spelling
    (LOCAL_TO_CHECKPOINT); `_extra_state` entries dropped."""
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, list] = {}
    prefix = "decoder.layers."
    for name, value in state_dict.items():
        if name.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            rest = LOCAL_TO_CHECKPOINT.get(rest, rest)
            per_layer.setdefault(prefix + rest, [None] * num_layers)[int(index)] = value
        else:
            out[name] = value
    for key, values in per_layer.items():
        assert all(v is not None for v in values), f"{key} is missing in some layers"
        out[key] = torch.stack(values)
    return out


def extra_state_entries(num_layers: int, modules: tuple[str, ...] = (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")) -> dict[str, Any]:
    """The `_extra_state` objects megatron-core 0.16.1 (local spec, dense GPT) writes into a
    torch_dist checkpoint and, at its default strictness, requires on load: for each stacked
    layer module and layer i of L, key `decoder.layers.<module>._extra_state/shard_<i>_<L>` with
    value [None] (megatron stores a ShardedObject as torch.save of the list of its data).
    Plain `dcp.save` of the Python list [None] writes byte-for-byte the same record (DCP
    torch.saves non-tensor values); do NOT pass an io.BytesIO, DCP would pickle the buffer."""
    return {
        f"decoder.layers.{module}._extra_state/shard_{i}_{num_layers}": [None]
        for module in modules
        for i in range(num_layers)
    }


def write_plain_dcp_checkpoint(entries: dict[str, Any], path: str | os.PathLike,
                               common: Optional[dict[str, Any]] = None) -> None:
    """A torch_dist checkpoint written WITHOUT megatron-core, as mzoo writes one: full global
    tensors under megatron's keys (plus, optionally, non-tensor objects such as
    extra_state_entries(), which DCP stores as bytes) with plain torch.distributed.checkpoint.save,
    then common.pt (torch.save of `common`) and metadata.json last. One process, no group."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(
        {k: v.detach().contiguous() if isinstance(v, torch.Tensor) else v for k, v in entries.items()},
        storage_writer=dcp.FileSystemWriter(str(path)),
        no_dist=True,
    )
    torch.save(common or {}, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(METADATA_JSON))
