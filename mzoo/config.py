"""Typed model and parallel configuration, YAML I/O and validation.

One `ModelConfig` describes every family in the zoo. Field names follow Megatron-Core's
`TransformerConfig` where one exists (num_query_groups, ffn_hidden_size, add_bias_linear, ...),
so a config reads the same to someone who knows Megatron. Sub-configs hold what only some
families need (MoE, MLA, SSM).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from mzoo.errors import UserError

FAMILIES = ("gpt", "llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek", "mamba", "gpt_oss")
Activation = Literal["gelu", "gelu_tanh", "swiglu", "geglu", "quick_geglu", "relu", "squared_relu", "silu"]
Normalization = Literal["layernorm", "rmsnorm"]
PositionEmbedding = Literal["learned", "rope", "none"]
GATED_ACTIVATIONS = ("swiglu", "geglu", "quick_geglu")  # quick_geglu: x * sigmoid(1.702 x) gate (GPT-OSS)
# Megatron hybrid layer symbols: Mamba mixer, self-attention, dense MLP, MoE.
HYBRID_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


class ConfigError(UserError):
    """A configuration a user wrote is invalid; the message is one sentence saying how to fix it."""


@dataclass
class RopeConfig:
    """Rotary embedding parameters; `scaling` mirrors transformers' `rope_type`."""

    theta: float = 10000.0
    scaling: Optional[Literal["linear", "llama3", "yarn"]] = None
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: Optional[int] = None
    # yarn (DeepSeek)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions (GPT-OSS: false)
    rotary_percent: float = 1.0


@dataclass
class MoEConfig:
    """Routed (+ shared) experts. Expert FFNs use the model's activation."""

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 0
    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: Optional[int] = None  # per shared expert; default ffn_hidden_size
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    expert_bias: bool = False  # DeepSeek-V3 aux-loss-free e_score_correction_bias
    n_group: Optional[int] = None  # group-limited routing
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense: int = 0  # leading dense layers (DeepSeek first_k_dense_replace)
    layer_freq: int = 1  # MoE on every layer_freq-th layer after the dense prefix
    dense_layers: list[int] = field(default_factory=list)  # more dense layers among those (Qwen3-MoE mlp_only_layers)
    aux_loss_coeff: float = 0.0  # load-balancing loss weight (Megatron moe_aux_loss_coeff)
    bias_update_rate: float = 1e-3  # aux-loss-free expert_bias step per optimizer step (DeepSeek-V3)


def moe_placement(pattern: list[int]) -> dict[str, Any]:
    """MoEConfig's first_k_dense, layer_freq and dense_layers for a 0/1 per-layer pattern (Megatron's
    moe_layer_freq list, or Qwen3-MoE's decoder_sparse_step + mlp_only_layers): the one spelling
    of each pattern, so configs read from different sources compare equal."""
    ones = [i for i, x in enumerate(pattern) if x]
    if not ones:
        raise ConfigError("the MoE layer pattern has no MoE layer; drop the moe section for a dense model.")
    freq = math.gcd(*(i - ones[0] for i in ones[1:])) if len(ones) > 1 else 1
    moe = set(ones)
    dense = [i for i in range(ones[0], len(pattern), freq) if i not in moe]
    return dict(first_k_dense=ones[0], layer_freq=freq or 1, dense_layers=dense)


@dataclass
class MLAConfig:
    """DeepSeek multi-latent attention dimensions."""

    q_lora_rank: Optional[int] = None  # None: direct q projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class SSMConfig:
    """Mamba mixer dimensions; `hybrid_pattern` turns the stack into a Megatron hybrid model."""

    version: Literal[1, 2] = 2
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64  # Mamba-2
    num_groups: int = 1  # Mamba-2
    chunk_size: int = 256  # Mamba-2
    dt_rank: Optional[int] = None  # Mamba-1; default ceil(hidden / 16)
    conv_bias: bool = True
    proj_bias: bool = False
    hybrid_pattern: Optional[str] = None  # e.g. "M-M*-" (Megatron hybrid_override_pattern)


@dataclass
class ModelConfig:
    """Architecture of one model; everything needed to build it and count its parameters."""

    name: str = ""
    family: str = "llama"
    source: str = ""  # the public config this preset reproduces
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: Optional[int] = None  # None: multi-head attention
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: int = 11008
    activation: Activation = "swiglu"
    normalization: Normalization = "rmsnorm"
    norm_eps: float = 1e-5
    position_embedding: PositionEmbedding = "rope"
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0  # after attention/MLP outputs and embeddings (Megatron's hidden_dropout)
    attention_dropout: float = 0.0  # on attention probabilities
    # GPT-OSS attention (Megatron-Core's names): "learnable" adds one learned logit per head to the
    # softmax's denominator (attention sinks, `core_attention.softmax_offset`)
    softmax_type: Literal["vanilla", "learnable"] = "vanilla"
    window_size: Optional[int] = None  # sliding window: keys a query sees, itself included (HF sliding_window)
    window_attn_skip_freq: Optional[int] = None  # every Nth layer (1-based) attends fully; None: all windowed
    # clamped GLU (GPT-OSS): gate clamped above, linear part to [-v, v], act(gate) * (linear + offset)
    activation_func_clamp_value: Optional[float] = None
    glu_linear_offset: float = 0.0
    moe: Optional[MoEConfig] = None
    mla: Optional[MLAConfig] = None
    ssm: Optional[SSMConfig] = None

    # ---- derived ---------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def layer_types(self) -> list[str]:
        """Kind of every layer: 'transformer' (attention + MLP/MoE) or a hybrid symbol's kind."""
        if self.ssm is not None:
            if self.ssm.hybrid_pattern:
                return [HYBRID_SYMBOLS[c] for c in self.ssm.hybrid_pattern]
            return ["mamba"] * self.num_layers
        return ["transformer"] * self.num_layers

    @property
    def block_kinds(self) -> frozenset[str]:
        """The blocks the layers hold, of "attention", "mlp", "moe", "mamba" (a transformer layer is
        attention + an MoE on `moe_layers`, else an MLP): the one answer to "has it attention?"."""
        if self.ssm is not None:  # the distinct symbols, not a list as long as the model
            types = {HYBRID_SYMBOLS[c] for c in set(self.ssm.hybrid_pattern)} if self.ssm.hybrid_pattern else {"mamba"}
        else:
            types = {"transformer"}
        kinds = types - {"transformer"}
        if "transformer" in types:
            routed = len(self.moe_layers)
            kinds |= {"attention"} | ({"moe"} if routed else set()) | ({"mlp"} if routed < self.num_layers else set())
        return frozenset(kinds)

    @property
    def moe_layers(self) -> range | tuple[int, ...]:
        """Global indices of the transformer layers with routed experts: every layer_freq-th from
        first_k_dense, less moe.dense_layers (a range when there are none: counts stay O(1))."""
        if self.moe is None:
            return range(0)
        every = range(self.moe.first_k_dense, self.num_layers, self.moe.layer_freq)
        if not self.moe.dense_layers:
            return every
        dense = set(self.moe.dense_layers)
        return tuple(i for i in every if i not in dense)

    def is_window_layer(self, index: int) -> bool:
        """Whether attention layer `index` (global, 0-based) uses the sliding window (Megatron's
        is_layer_window_attention on the 1-based layer number)."""
        if self.window_size is None:
            return False
        return self.window_attn_skip_freq is None or (index + 1) % self.window_attn_skip_freq != 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether transformer layer `index` (global, 0-based) uses routed experts."""
        return index in self.moe_layers

    def architecture_differences(self, other: "ModelConfig") -> list[str]:
        """Fields that make `other` a different network (weights of one do not fit the other);
        names, sources, dropout and init settings do not count."""
        fields_ = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "groups", "kv_channels",
                   "ffn_hidden_size", "activation", "normalization", "position_embedding", "tie_embeddings",
                   "add_bias_linear", "add_qkv_bias", "qk_layernorm", "softmax_type", "moe", "mla", "ssm")
        def arch(name: str, cfg: "ModelConfig") -> Any:
            value = getattr(cfg, name)
            if name == "moe" and value is not None:  # balancing coefficients shape training, not weights
                value = dataclasses.replace(value, aux_loss_coeff=0.0, bias_update_rate=0.0)
            return value

        return [f for f in fields_ if arch(f, self) != arch(f, other)]

    def padded_vocab_size(self, tp: int = 1, divisible_by: Optional[int] = None) -> int:
        """Megatron's padding: a multiple of make_vocab_size_divisible_by * tp."""
        multiple = (self.make_vocab_size_divisible_by if divisible_by is None else divisible_by) * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    # ---- I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ModelConfig":
        cfg = _build(cls, data, where)
        cfg.validate(where)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; pass a zoo preset name or a YAML file that exists.") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{at}; fix the syntax and retry.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}.")
        return cls.from_dict(data, where=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some top-level fields changed (dotted keys reach sub-configs)."""
        data = self.to_dict()
        for key, value in changes.items():
            _set_dotted(data, key, value)
        return ModelConfig.from_dict(data, where=self.name or "config")

    # ---- validation --------------------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        """Raise ConfigError with one sentence for the first impossible setting."""

        def fail(msg: str) -> None:
            raise ConfigError(f"{where}: {msg}")

        if self.family not in FAMILIES:
            fail(f"family '{self.family}' is unknown; use one of {', '.join(FAMILIES)}.")
        for name in ("vocab_size", "hidden_size", "num_layers", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.norm_eps <= 0:
            fail(f"norm_eps must be positive, got {self.norm_eps}.")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.ssm is not None:  # first: the pattern decides which other checks apply
            self._validate_ssm(fail)
        if self.moe is not None:  # before block_kinds, which places the MoE layers
            self._validate_moe(fail)
        kinds = self.block_kinds
        if "attention" in kinds:
            self._validate_attention(fail)
        if kinds & {"mlp", "moe"} and self.ffn_hidden_size <= 0 and self.moe is None:
            fail(f"ffn_hidden_size must be positive, got {self.ffn_hidden_size}.")
        if self.window_size is not None and self.window_size <= 0:
            fail(f"window_size must be a positive number of tokens (or null for full attention), got {self.window_size}.")
        if self.window_attn_skip_freq is not None and (self.window_size is None or self.window_attn_skip_freq <= 0):
            fail("window_attn_skip_freq needs a window_size and must be positive; set both or neither.")
        if self.activation_func_clamp_value is not None and (not self.gated or self.activation_func_clamp_value <= 0):
            fail("activation_func_clamp_value needs a gated activation and must be positive.")
        if self.glu_linear_offset and not self.gated:
            fail(f"glu_linear_offset ({self.glu_linear_offset}) needs a gated activation (swiglu, geglu, quick_geglu).")
        if self.position_embedding == "learned" and self.max_position_embeddings <= 0:
            fail("learned position embeddings need max_position_embeddings > 0.")

    def _validate_attention(self, fail) -> None:
        heads, groups = self.num_attention_heads, self.groups
        if heads <= 0:
            fail(f"num_attention_heads must be positive, got {heads}.")
        if groups <= 0 or heads % groups:
            fail(
                f"num_attention_heads ({heads}) must be divisible by num_query_groups ({groups}); "
                "pick a group count that divides the head count."
            )
        if self.head_dim is None and self.mla is None and self.hidden_size % heads:
            fail(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads ({heads}); "
                "set head_dim explicitly or change one of them."
            )
        rope = self.rope
        if self.position_embedding == "rope":
            if rope.theta <= 0:
                fail(f"rope.theta must be positive, got {rope.theta}.")
            if rope.scaling is not None and rope.factor <= 0:
                fail(f"rope.factor must be positive, got {rope.factor}.")
            if rope.scaling in ("llama3", "yarn") and not rope.original_max_position_embeddings:
                fail(f"rope.scaling '{rope.scaling}' needs rope.original_max_position_embeddings.")
            if rope.scaling == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
                fail("rope.high_freq_factor must be larger than rope.low_freq_factor for llama3 scaling.")
            rot = self.mla.qk_rope_head_dim if self.mla else self.kv_channels
            if int(rot * rope.rotary_percent) % 2:
                fail(f"the rotary dimension ({int(rot * rope.rotary_percent)}) must be even.")

    def _validate_moe(self, fail) -> None:
        moe = self.moe
        if moe.num_experts <= 0 or moe.ffn_hidden_size <= 0:
            fail("moe.num_experts and moe.ffn_hidden_size must be positive.")
        if not 0 < moe.top_k <= moe.num_experts:
            fail(f"moe.top_k ({moe.top_k}) must be between 1 and moe.num_experts ({moe.num_experts}).")
        if (moe.n_group is None) != (moe.topk_group is None):
            fail("group-limited routing needs both moe.n_group and moe.topk_group (or neither).")
        if moe.n_group is not None:
            if moe.num_experts % moe.n_group:
                fail(f"moe.num_experts ({moe.num_experts}) must be divisible by moe.n_group ({moe.n_group}).")
            if not 0 < moe.topk_group <= moe.n_group:
                fail(f"moe.topk_group ({moe.topk_group}) must be between 1 and moe.n_group ({moe.n_group}).")
        if moe.layer_freq <= 0 or moe.first_k_dense < 0:
            fail("moe.layer_freq must be positive and moe.first_k_dense non-negative.")
        if moe.first_k_dense > self.num_layers:
            fail(f"moe.first_k_dense ({moe.first_k_dense}) exceeds num_layers ({self.num_layers}).")
        dense = moe.dense_layers
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
            fail(f"moe.dense_layers must list layer indices (integers), got {dense!r}.")
        if dense != sorted(set(dense)) or (dense and not 0 <= dense[0] <= dense[-1] < self.num_layers):
            fail(f"moe.dense_layers must be increasing layer indices below num_layers ({self.num_layers}), "
                 f"got {dense}.")
        if dense and dense != [i for i in dense if i in range(moe.first_k_dense, self.num_layers, moe.layer_freq)]:
            fail("moe.dense_layers may only name layers first_k_dense and layer_freq make MoE layers; "
                 "the others are dense already, so drop them.")
        if moe.aux_loss_coeff < 0 or moe.bias_update_rate < 0:
            fail("moe.aux_loss_coeff and moe.bias_update_rate must not be negative.")
        if moe.expert_bias and moe.score_function != "sigmoid":
            fail("moe.expert_bias (aux-loss-free routing) needs moe.score_function 'sigmoid'.")

    def _validate_ssm(self, fail) -> None:
        ssm = self.ssm
        if ssm.d_state <= 0 or ssm.d_conv <= 0 or ssm.expand <= 0:
            fail("ssm.d_state, ssm.d_conv and ssm.expand must be positive.")
        d_inner = ssm.expand * self.hidden_size
        if ssm.version == 2:
            if d_inner % ssm.head_dim:
                fail(f"the Mamba-2 inner size ({d_inner}) must be divisible by ssm.head_dim ({ssm.head_dim}).")
            nheads = d_inner // ssm.head_dim
            if ssm.num_groups <= 0 or nheads % ssm.num_groups:
                fail(f"Mamba-2 heads ({nheads}) must be divisible by ssm.num_groups ({ssm.num_groups}).")
        pattern = ssm.hybrid_pattern
        if pattern:
            bad = sorted(set(pattern) - set(HYBRID_SYMBOLS))
            if bad:
                fail(f"ssm.hybrid_pattern has unknown symbols {bad}; use M (mamba), * (attention), - (mlp), E (moe).")
            if len(pattern) != self.num_layers:
                fail(
                    f"ssm.hybrid_pattern has {len(pattern)} symbols but num_layers is {self.num_layers}; "
                    "they must be equal."
                )
            if "E" in pattern and self.moe is None:
                fail("ssm.hybrid_pattern has MoE layers (E) but the config has no moe section.")

    # ---- derived sizes used by models and counting ------------------------------------------
    def mamba_dims(self) -> dict[str, int]:
        """Sizes of a Mamba mixer (d_inner, nheads, conv_dim, in_proj rows, dt_rank)."""
        ssm = self.ssm
        d_inner = ssm.expand * self.hidden_size
        if ssm.version == 1:
            dt_rank = ssm.dt_rank or math.ceil(self.hidden_size / 16)
            return {"d_inner": d_inner, "dt_rank": dt_rank, "conv_dim": d_inner, "in_proj": 2 * d_inner}
        nheads = d_inner // ssm.head_dim
        conv_dim = d_inner + 2 * ssm.num_groups * ssm.d_state
        return {
            "d_inner": d_inner,
            "nheads": nheads,
            "conv_dim": conv_dim,
            "in_proj": 2 * d_inner + 2 * ssm.num_groups * ssm.d_state + nheads,
        }


# ---- dataclass <-> dict helpers ------------------------------------------------------------------
def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def check_types(cls: type, values: dict[str, Any], spelled: dict[str, str], where: str) -> None:
    """Refuse a value of the wrong type for a field of dataclass `cls` (a bool, float, null or string
    layer count), naming the key as the user wrote it (`spelled[field]`, e.g. config.json's
    num_hidden_layers), before the dataclass is built and arithmetic on it fails in a traceback."""
    hints = get_type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not dataclasses.is_dataclass(hint):
            _coerce(hint, value, f"{where}: {spelled.get(name, name)}")


def check_value(hint: Any, value: Any, where: str) -> None:
    """Refuse `value` unless it has type `hint` (int, Optional[int], bool, ...), naming `where`."""
    _coerce(hint, value, where)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}.")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}."
            raise ConfigError(f"{where}: unknown key '{key}' in {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}: {key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Optional or (origin is not None and type(None) in args):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where.split(":")[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value
