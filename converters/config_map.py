"""The config.json <-> ModelConfig key table the family adapters share (Megatron-Bridge's
CONFIG_MAPPING), and the rope section both ways.

Every family reads and writes the same dozen keys (sizes, layer count, heads, norm epsilon,
positions, tied embeddings, rope); what differs is a spelling (GPT-2's n_embd), a default (each
transformers config class has its own), a transform, or a key the family lacks. So `CORE` says the
correspondence once, each family derives its table from it with `KeyTable.but`, and the sections
only some families have (MoE, MLA, Mamba) are tables of the same kind in their adapters.

A key whose spelling changed in transformers 5 (rope: `rope_parameters`, before it top-level
`rope_theta` + `rope_scaling`) also writes the old spelling (`Key.legacy`), so that transformers 4.5x
loads the same model instead of silently dropping the rope scaling; 5 reads both to the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional


from mzoo.config import ConfigError, MoEConfig, ModelConfig, RopeConfig, check_types

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a Key default: config.json must have the key


@dataclass(frozen=True)
class Reading:
    """What a key's read transform may look at besides its own value."""

    hf: dict[str, Any]  # the whole config.json
    fields: dict[str, Any] = field(default_factory=dict)  # the fields read so far, in table order


Read = Callable[[Any, Reading], Any]  # (config.json value, the reading) -> field value
Write = Callable[[Any], Any]  # (the object written: a ModelConfig or one of its sections) -> config.json value
Need = Callable[[dict[str, Any], str], Any]  # how a family fetches a REQUIRED key (default: hf[key])


def same(value: Any, reading: Reading) -> Any:
    return value


def boolean(value: Any, reading: Reading) -> bool:
    return bool(value)


def number(value: Any, reading: Reading) -> float:
    return float(value)


@dataclass(frozen=True)
class Key:
    """One field <-> one config.json key, with the transform each way."""

    field: str  # on the ModelConfig (or the section the table is for)
    hf: str  # the config.json key
    default: Any = REQUIRED  # transformers' default where config.json leaves the key out
    read: Read = same
    write: Optional[Write] = None  # None: the field's value as it is
    written: bool = True  # False: read only (transformers writes it, mzoo does not)
    legacy: Optional[Callable[[Any], dict[str, Any]]] = None  # the value in transformers 4's keys, written too

    def get(self, hf: dict[str, Any], reading: Optional[Reading] = None, need: Optional[Need] = None) -> Any:
        """The field's value from config.json (a missing REQUIRED key: KeyError, or what `need` raises);
        a value the transform cannot read is one sentence naming the key."""
        if self.default is REQUIRED:
            value = need(hf, self.hf) if need else hf[self.hf]
        else:
            value = hf.get(self.hf, self.default)
        try:
            return self.read(value, reading or Reading(hf))
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"config.json: {self.hf} has a value mzoo cannot read ({value!r}); fix config.json.") \
                from None

    @property
    def plain(self) -> bool:
        """The field takes config.json's value as it is (or only as a number / flag): its type is checked raw."""
        return self.read in (same, number, boolean)

    def put(self, obj: Any) -> Any:
        return self.write(obj) if self.write else getattr(obj, self.field)


@dataclass(frozen=True)
class KeyTable:
    """Keys applied in order both ways: config.json -> fields, and an object -> config.json keys."""

    keys: tuple[Key, ...]
    section: type = ModelConfig  # the dataclass whose fields these are (MoEConfig, MLAConfig, SSMConfig)

    def check(self, hf: dict[str, Any]) -> None:
        """Refuse a config.json value of the wrong type for its field (`num_experts_per_tok: "2"`,
        `n_routed_experts: true`), naming the key, before any transform or arithmetic sees it."""
        plain = {k.field: k.hf for k in self.keys if k.plain and k.hf in hf}
        check_types(self.section, {f: hf[key] for f, key in plain.items()}, plain, "config.json")

    def read(self, hf: dict[str, Any], need: Optional[Need] = None) -> dict[str, Any]:
        """field -> value for every key (a key's read sees the fields before it)."""
        self.check(hf)
        reading = Reading(hf)
        for key in self.keys:
            reading.fields[key.field] = key.get(hf, reading, need)
        read = {k.field: k.hf for k in self.keys if not k.plain and k.field in reading.fields}  # after transforms
        check_types(self.section, {f: reading.fields[f] for f in read}, read, "config.json")
        return reading.fields

    def write(self, obj: Any) -> dict[str, Any]:
        """config.json key -> value for every written key (and its transformers 4 spelling, if any)."""
        out: dict[str, Any] = {}
        for key in self.keys:
            if key.written:
                out[key.hf] = key.put(obj)
                out.update(key.legacy(obj) if key.legacy else {})
        return out

    def __getitem__(self, name: str) -> Key:
        for key in self.keys:
            if key.field == name:
                return key
        raise KeyError(name)

    def but(self, *drop: str, **changes: dict[str, Any]) -> "KeyTable":
        """This table without the fields in `drop`, and with `changes[field]` replacing attributes
        of that field's key (e.g. `norm_eps=dict(hf="layer_norm_epsilon", default=1e-5)`)."""
        unknown = (set(drop) | set(changes)) - {key.field for key in self.keys}
        if unknown:
            raise KeyError(f"no keys for {sorted(unknown)}")
        return KeyTable(tuple(replace(key, **changes.get(key.field, {})) for key in self.keys
                              if key.field not in drop), self.section)

    def __add__(self, other: "KeyTable") -> "KeyTable":
        return KeyTable(self.keys + other.keys, self.section)


# ---- rope ------------------------------------------------------------------------------------------
def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """The rope transformers 5 reads: a non-null `rope_scaling` (the 4.x spelling) over `rope_parameters`,
    theta from that section or else the top-level `rope_theta` (4.x reads the same where rope_scaling is
    set)."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"rope type '{kind}' in config.json is not supported; mzoo handles default, linear, "
                          "llama3, yarn.")
    rope = RopeConfig(theta=float(theta), scaling=None if kind == "default" else kind)
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            setattr(rope, key, float(params[key]))
    if params.get("original_max_position_embeddings"):
        rope.original_max_position_embeddings = int(params["original_max_position_embeddings"])
    if params.get("truncate") is not None:
        rope.truncate = bool(params["truncate"])
    rope.rotary_percent = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return rope


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling or "default"}
    if rope.scaling in ("linear", "llama3", "yarn"):
        out["factor"] = rope.factor
    if rope.scaling == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.scaling == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if not rope.truncate:
            out["truncate"] = False
        if rope.mscale is not None:
            out.update(mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim)
    if rope.scaling in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rotary_percent != 1.0:
        out["partial_rotary_factor"] = rope.rotary_percent
    return out


def rope_to_hf4(rope: RopeConfig) -> dict[str, Any]:
    """The same rope as transformers 4.5x spells it: top-level rope_theta (and partial_rotary_factor),
    and rope_scaling (null for plain rope) without them, whose keys 4.x's rope validation accepts.
    transformers 5 prefers a non-null rope_scaling to rope_parameters and adds rope_theta and
    partial_rotary_factor from the top level, so it reads exactly `rope_to_hf(rope)` back."""
    params = rope_to_hf(rope)
    out: dict[str, Any] = {"rope_theta": params.pop("rope_theta")}
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    out["rope_scaling"] = params if rope.scaling else None
    return out


# ---- the shared table ------------------------------------------------------------------------------
def _name(value: Any, reading: Reading) -> str:
    return value or ""


def _groups(value: Optional[int], reading: Reading) -> int:
    """num_key_value_heads absent or null: multi-head attention, one group per head."""
    return value or reading.fields["num_attention_heads"]


# LLaMA's spelling and transformers' LlamaConfig defaults; the other families start from it.
CORE = KeyTable((
    Key("name", "_name_or_path", "", read=_name, written=False),
    Key("vocab_size", "vocab_size"),
    Key("hidden_size", "hidden_size"),
    Key("num_layers", "num_hidden_layers"),
    Key("num_attention_heads", "num_attention_heads"),
    Key("num_query_groups", "num_key_value_heads", None, read=_groups, write=lambda cfg: cfg.groups),
    Key("head_dim", "head_dim", None, read=lambda v, r: v or None, write=lambda cfg: cfg.kv_channels),
    Key("ffn_hidden_size", "intermediate_size"),
    Key("norm_eps", "rms_norm_eps", 1e-6),
    Key("rope", "rope_parameters", None, read=lambda v, r: rope_from_hf(r.hf),
        write=lambda cfg: rope_to_hf(cfg.rope), legacy=lambda cfg: rope_to_hf4(cfg.rope)),
    Key("max_position_embeddings", "max_position_embeddings", 2048),
    Key("tie_embeddings", "tie_word_embeddings", False, read=boolean),
))

# MoEConfig fields in the DeepSeek spelling (DeepSeek-V2/V3, NemotronH); Mixtral has its own
MOE = KeyTable((
    Key("num_experts", "n_routed_experts"),
    Key("top_k", "num_experts_per_tok"),
    Key("ffn_hidden_size", "moe_intermediate_size"),
    Key("routed_scaling_factor", "routed_scaling_factor", 1.0, read=number),
    Key("norm_topk_prob", "norm_topk_prob", True, read=boolean),
), MoEConfig)
