"""Megatron-Bridge checkpoints: `run_config.yaml` (Bridge's ConfigContainer) instead of Megatron-LM args.

Bridge saves torch_dist weights with the model provider's fields under `model:` (TransformerConfig
names: num_moe_experts, layernorm_epsilon, share_embeddings_and_output_weights, gated_linear_unit
with activation_func as a `_target_`) and its tokenizer in the iteration's tokenizer/ folder; the
vocabulary is the true one (should_pad_vocab false). This maps the provider onto the Megatron-LM
argument names args.py reads, so one reader serves both. yaml.safe_load only: `_target_` entries
stay plain dicts, nothing is imported or called.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import yaml

from mzoo.ckpt.hf import CheckpointError

RUN_CONFIG = "run_config.yaml"
# activation_func targets -> mzoo's activation, by whether the MLP is gated
_ACTIVATIONS = {
    ("silu", True): "swiglu", ("gelu", True): "geglu", ("squared_relu", False): "squared_relu",
    ("gelu", False): "gelu", ("fast_gelu", False): "gelu_tanh", ("openai_gelu", False): "gelu_tanh",
    ("relu", False): "relu", ("silu", False): "silu",
}


def read_run_config(folder: Path) -> Optional[dict[str, Any]]:
    """The run_config.yaml of an iteration folder (or of the root beside it), if Bridge wrote one."""
    for where in (Path(folder), Path(folder).parent):
        path = where / RUN_CONFIG
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise CheckpointError(f"{path} is not readable YAML ({e.__class__.__name__}); the checkpoint is "
                                      "damaged.") from None
            if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
                raise CheckpointError(f"{path} has no `model:` section; it is not a Megatron-Bridge run config.")
            return data
    return None


def _activation(model: dict[str, Any]) -> str:
    target = str((model.get("activation_func") or {}).get("_target_", "torch.nn.functional.gelu"))
    name, gated = target.rsplit(".", 1)[-1], bool(model.get("gated_linear_unit"))
    found = _ACTIVATIONS.get((name, gated))
    if found is None:
        raise CheckpointError(f"the run config's activation_func {target} (gated={gated}) is not one mzoo models.")
    if found == "gelu" and model.get("bias_activation_fusion") and model.get("add_bias_linear", True):
        return "gelu_tanh"  # megatron-core's fused bias_gelu is the tanh form
    return found


def run_config_to_args(run: dict[str, Any]) -> argparse.Namespace:
    """Megatron-LM-named args from a Bridge run config's model provider."""
    model = run["model"]
    a = {k: v for k, v in model.items() if not isinstance(v, dict)}  # `_target_` objects are not fields here
    heads, groups = model.get("num_attention_heads"), model.get("num_query_groups")
    pattern = model.get("hybrid_layer_pattern") or model.get("hybrid_override_pattern")
    activation = _activation(model)
    a.update(
        mzoo_activation=activation,
        swiglu=activation == "swiglu",
        squared_relu=activation == "squared_relu",
        group_query_attention=groups is not None and groups != heads,
        norm_epsilon=model.get("layernorm_epsilon", 1e-5),
        untie_embeddings_and_output_weights=not model.get("share_embeddings_and_output_weights", True),
        use_rope_scaling=bool(model.get("rope_scaling")),
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        # a hybrid stack holds experts only where its pattern has E layers
        num_experts=model.get("num_moe_experts") if not pattern or "E" in pattern else None,
        hybrid_override_pattern=pattern,
        is_hybrid_model=bool(model.get("is_hybrid_model") or pattern),
        padded_vocab_size=model.get("vocab_size"),
    )
    if model.get("position_embedding_type") == "yarn":  # non-MLA YaRN: yarn_* fields
        a.update(position_embedding_type="rope", rope_type="yarn",
                 rotary_scaling_factor=model.get("yarn_rotary_scaling_factor"),
                 mscale=model.get("yarn_mscale"), mscale_all_dim=model.get("yarn_mscale_all_dim"),
                 beta_fast=model.get("yarn_beta_fast"), beta_slow=model.get("yarn_beta_slow"),
                 original_max_position_embeddings=model.get("yarn_original_max_position_embeddings"))
    return argparse.Namespace(**a)
