"""The model card (README.md) that `mzoo push` uploads: Hub metadata plus what mzoo knows.

The YAML front matter is what the Hub indexes (license, base_model, tags, library, pipeline); the
body states facts read from the checkpoint itself (config, exact parameter counts, where it came
from, how long it trained) so that nobody has to guess them from config.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import mzoo
from mzoo.ckpt.megatron.tracker import find_iteration_dir
from mzoo.ckpt.sidecar import read_sidecar
from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.params import count_params, human
from mzoo.train.run import TRAIN_STATE_FILE  # written by mzoo train next to each saved iteration

# https://huggingface.co/docs/hub/repositories-licenses (identifiers the Hub's metadata accepts)
LICENSES = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl",
    "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "unknown",
    "other",
)
DEFAULT_LICENSE = "unknown"  # mzoo cannot know the weights' license; "unknown" says so without claiming one
_REPO_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*")


def validate_license(license: str) -> None:
    if license not in LICENSES:
        close = [x for x in LICENSES if x.startswith(license.lower()[:4])][:4]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"--license '{license}' is not a Hub license identifier{hint}; see "
                        "https://huggingface.co/docs/hub/repositories-licenses, or use 'other'.")


@dataclass(frozen=True)
class Training:
    """What the checkpoint records about its training; every field optional."""

    steps: Optional[int] = None
    consumed_samples: Optional[int] = None
    tokens: Optional[int] = None
    data: tuple[str, ...] = ()

    def known(self) -> bool:
        return any(v not in (None, ()) for v in (self.steps, self.consumed_samples, self.tokens, self.data))


@dataclass(frozen=True)
class CardFacts:
    repo_id: str
    cfg: ModelConfig
    dtype: str
    source_format: str  # hf, torch, torch_dist, zarr
    layout: dict[str, Any] = field(default_factory=dict)  # tp/pp/vpp/ep/spec of a Megatron source
    iteration: Optional[int | str] = None
    license: str = DEFAULT_LICENSE
    base_model: Optional[str] = None
    training: Training = Training()
    has_tokenizer: bool = False
    revision: str = "main"

    @property
    def params(self):
        return count_params(self.cfg)


# ---- facts from the checkpoint ----------------------------------------------------------------------
def checkpoint_root(path: Path, fmt: str) -> tuple[Path, Optional[Path]]:
    """(folder holding mzoo.yaml, iteration folder or None) of a checkpoint path."""
    path = Path(path)
    if fmt == "hf":
        return path, None
    folder, _ = find_iteration_dir(path)
    return (folder.parent if folder != path else path), folder


def _as_int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def training_facts(path: Path, fmt: str, iteration: Any = None) -> Training:
    """Steps, samples, tokens and data from mzoo_train_state.json and mzoo.yaml's optional
    `training:` mapping (keys: steps, consumed_samples, tokens, seq_length, data)."""
    root, folder = checkpoint_root(path, fmt)
    side = (read_sidecar(root) or {}).get("training") or {}
    side = side if isinstance(side, dict) else {}
    state: dict[str, Any] = {}
    if folder is not None and (folder / TRAIN_STATE_FILE).is_file():
        try:
            state = json.loads((folder / TRAIN_STATE_FILE).read_text())
        except ValueError:
            state = {}
    steps = _as_int(state.get("step")) or _as_int(side.get("steps"))
    if steps is None and state and isinstance(iteration, int) and iteration > 0:
        steps = iteration
    samples = _as_int(state.get("consumed_samples")) or _as_int(side.get("consumed_samples"))
    tokens = _as_int(side.get("tokens"))
    seq = _as_int(side.get("seq_length"))
    if tokens is None and samples and seq:
        tokens = samples * seq
    data = side.get("data") or ()
    data = (data,) if isinstance(data, str) else tuple(str(d) for d in data if d)
    return Training(steps, samples, tokens, data)


def known_base_model(path: Path, fmt: str, given: Optional[str]) -> Optional[str]:
    """--base-model, else mzoo.yaml's `base_model`, else an HF config's `_name_or_path` when it is a
    Hub id (a local path says nothing). A zoo preset's `source` is not a base model: random-init
    weights of a published architecture are not derived from the published weights."""
    if given:
        return given
    root, _ = checkpoint_root(path, fmt)
    side = read_sidecar(root) or {}
    if isinstance(side.get("base_model"), str) and _REPO_ID.fullmatch(side["base_model"]):
        return side["base_model"]
    config = Path(path) / "config.json"
    if fmt == "hf" and config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except ValueError:
            name = None
        if isinstance(name, str) and _REPO_ID.fullmatch(name) and not Path(name).exists():
            return name
    return None


# ---- rendering --------------------------------------------------------------------------------------
def tags(f: CardFacts) -> list[str]:
    kinds = f.cfg.block_kinds
    out = ["mzoo", f.cfg.family]
    out += ["moe"] if "moe" in kinds else []
    out += ["mla"] if f.cfg.mla else []
    out += ["mamba"] if "mamba" in kinds else []
    out += ["megatron"] if f.source_format != "hf" else []
    return list(dict.fromkeys(out))


def front_matter(f: CardFacts) -> dict[str, Any]:
    meta: dict[str, Any] = {"license": f.license}
    if f.base_model:
        meta["base_model"] = f.base_model
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags(f)})
    return meta


def _n(x: int) -> str:
    return f"{x:,} ({human(x)})" if x >= 1000 else str(x)


def architecture_rows(cfg: ModelConfig) -> list[tuple[str, str]]:
    rows = [("family", cfg.family), ("layers", str(cfg.num_layers)), ("hidden size", str(cfg.hidden_size))]
    if "attention" in cfg.block_kinds:
        rows += [("attention heads", str(cfg.num_attention_heads)),
                 ("query groups (KV heads)", str(cfg.groups)), ("head dim", str(cfg.kv_channels))]
    if cfg.mla:
        m = cfg.mla
        rows.append(("MLA", f"q_lora_rank {m.q_lora_rank}, kv_lora_rank {m.kv_lora_rank}, "
                            f"rope/nope head dim {m.qk_rope_head_dim}/{m.qk_nope_head_dim}, v head dim {m.v_head_dim}"))
    if cfg.ssm:
        s = cfg.ssm
        rows.append(("SSM", f"Mamba-{s.version}, d_state {s.d_state}, expand {s.expand}"
                            + (f", pattern {s.hybrid_pattern}" if s.hybrid_pattern else "")))
    rows.append(("FFN hidden size", f"{cfg.ffn_hidden_size} ({cfg.activation})"))
    if cfg.moe:
        m = cfg.moe
        rows.append(("experts", f"{m.num_experts} routed, top-{m.top_k}, expert FFN {m.ffn_hidden_size}"
                                + (f", {m.num_shared_experts} shared" if m.num_shared_experts else "")
                                + (f", first {m.first_k_dense} layers dense" if m.first_k_dense else "")
                                + (f", layers {m.dense_layers} dense" if m.dense_layers else "")))
    rows += [("vocabulary", str(cfg.vocab_size)), ("context length", str(cfg.max_position_embeddings)),
             ("positions", cfg.position_embedding + (f" (theta {cfg.rope.theta:g})" if cfg.position_embedding == "rope"
                                                    else "")),
             ("normalization", cfg.normalization), ("tied embeddings", "yes" if cfg.tie_embeddings else "no")]
    return rows


def _source_sentence(f: CardFacts) -> str:
    if f.source_format == "hf":
        return "Uploaded as is from a Hugging Face (safetensors) checkpoint"
    lay = f.layout
    where = ", ".join(f"{k.upper()} {lay[k]}" for k in ("tp", "pp", "vpp", "ep") if k in lay)
    spec = f", {lay['spec']} parameter spelling" if lay.get("spec") else ""
    it = f", iteration {f.iteration}" if f.iteration not in (None, 0, "release") else ""
    return f"Converted from a Megatron `{f.source_format}` checkpoint ({where}{spec}{it})"


def usage(f: CardFacts) -> str:
    rev = f', revision="{f.revision}"' if f.revision != "main" else ""
    if f.has_tokenizer:
        return (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{f.repo_id}"{rev})\n'
                f'model = AutoModelForCausalLM.from_pretrained("{f.repo_id}"{rev})\n'
                f'inputs = tokenizer("The quick brown fox", return_tensors="pt")\n'
                f'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n')
    return (f'import torch\nfrom transformers import AutoModelForCausalLM\n\n'
            f'model = AutoModelForCausalLM.from_pretrained("{f.repo_id}"{rev})\n'
            f'logits = model(torch.tensor([[1, 2, 3]])).logits  # no tokenizer was published with this model\n')


def render_card(f: CardFacts) -> str:
    count = f.params
    name = f.repo_id.split("/")[1]
    moe = f", {_n(count.active)} active per token" if count.active != count.total else ""
    lines = ["---", yaml.safe_dump(front_matter(f), sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"A {f.cfg.family} causal language model with {_n(count.total)} parameters{moe}, stored as "
             f"{f.dtype} safetensors. {_source_sentence(f)} by mzoo {mzoo.__version__}.", "",
             "## Architecture", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in architecture_rows(f.cfg)]
    lines += ["", "## Parameters", "", "| | |", "| --- | --- |", f"| total | {count.total:,} |",
              f"| active per token | {count.active:,} |", "",
              "Counted from the configuration as Megatron-Core lays the model out, on the true vocabulary, tied "
              "embeddings once.", ""]
    t = f.training
    if t.known():
        lines += ["## Training", ""]
        lines += [f"- steps: {t.steps:,}"] if t.steps is not None else []
        lines += [f"- consumed samples: {t.consumed_samples:,}"] if t.consumed_samples is not None else []
        lines += [f"- tokens: {_n(t.tokens)}"] if t.tokens is not None else []
        lines += [f"- data: {', '.join(f'`{d}`' for d in t.data)}"] if t.data else []
        lines += [""]
    lines += ["## Source", "", f"- {_source_sentence(f)}.", f"- dtype: {f.dtype}",
              f"- written by mzoo {mzoo.__version__} (`mzoo push`); `mzoo.yaml` holds the resolved configuration.",
              "", "## Usage", "", "```python", usage(f).rstrip(), "```", ""]
    return "\n".join(lines)
