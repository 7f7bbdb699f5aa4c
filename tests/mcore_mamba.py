"""megatron-core's own MambaModel on CPU for the tests (and tests/fixtures' make scripts): the
GPU kernel packages it imports are stubbed, so it is built to be saved and loaded, never run."""

from __future__ import annotations

import sys

import torch


def stub_kernels() -> None:
    """Stand-ins for the GPU-only packages megatron-core's Mamba modules import at module level
    (triton, mamba_ssm, einops): nothing here runs a forward, so none of them is ever called.
    mamba_ssm's RMSNormGated becomes a plain module owning `weight`, so megatron's own
    ExtendedRMSNorm subclass and its sharded_state_dict are what run."""
    import types

    from torch import nn

    def absent(*args, **kwargs):
        raise NotImplementedError("a GPU kernel")

    class RMSNormGated(nn.Module):
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    modules = {
        "megatron.core.inference.contexts.attention_context.triton.tensor_ops":
            dict(tensor_get_slice_after=absent, tensor_masked_update=absent, tensor_merge=absent),
        "einops": dict(rearrange=absent, repeat=absent),
        "mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.triton.selective_state_update": dict(selective_state_update=absent),
        "mamba_ssm.ops.triton.layernorm_gated": dict(RMSNorm=RMSNormGated),
        "mamba_ssm.ops.triton.ssd_combined": dict(mamba_chunk_scan_combined=absent,
                                                  mamba_split_conv1d_scan_combined=absent),
    }
    for name, attrs in modules.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module


def build_mcore_mamba(cfg, tp: int, padded: int):
    """megatron-core's MambaModel for `cfg` with its local Mamba spec as post_training/modelopt
    builds it with remap_te_layernorm (MambaLayer.norm + ColumnParallelLinear in_proj +
    RowParallelLinear out_proj; local attention/MLP/MoE TransformerLayers), torch norms where
    modelopt uses TE's (TE is not installed; MambaStack's final norm is hard-wired to TENorm)."""
    import mcore_ref as R

    R.init_parallel(tp, 1234)
    stub_kernels()
    import megatron.core.ssm.mamba_block as mamba_block
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.mamba import MambaModel
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    mamba_block.TENorm = WrappedTorchNorm
    hybrid = cfg.ssm.hybrid_pattern is not None
    kwargs = R.config_kwargs(cfg, tp) if hybrid else dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=tp, normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, add_bias_linear=False)
    ssm = cfg.ssm
    kwargs.update(mamba_state_dim=ssm.d_state, mamba_head_dim=ssm.head_dim, mamba_num_groups=ssm.num_groups,
                  mamba_num_heads=cfg.mamba_dims()["nheads"], is_hybrid_model=True)
    config = TransformerConfig(**kwargs)
    remap = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
             "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    dense = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    moe = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts if cfg.moe else None,
                                   normalization="RMSNorm").submodules
    stack = ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=dense.input_layernorm, self_attention=dense.self_attention,
            self_attn_bda=get_bias_dropout_add, sharded_state_dict_keys_map=remap)),
        mlp_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=dense.mlp, mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=remap)),
        moe_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=moe.pre_mlp_layernorm, mlp=moe.mlp, mlp_bda=get_bias_dropout_add)),
    ))
    return MambaModel(config=config, mamba_stack_spec=stack, vocab_size=padded, max_sequence_length=64,
                      hybrid_override_pattern=ssm.hybrid_pattern,
                      share_embeddings_and_output_weights=cfg.tie_embeddings, position_embedding_type="none").eval()
