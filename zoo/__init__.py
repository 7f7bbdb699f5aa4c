"""The model zoo: YAML presets with the published hyperparameters of real models.

Each preset is one file in `zoo/presets/`: ModelConfig keys, a `source` naming the public config
it reproduces, and the published parameter counts (`published_params`, and for MoE
`published_active_params`) that tests hold the exact count to, within 0.5% unless the preset
sets `published_tolerance` and says why.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

from mzoo.config import FAMILIES, ConfigError, ModelConfig
from mzoo.params import ParamCount, count_params

PRESET_DIR = Path(__file__).parent / "presets"
_PUBLISHED_KEYS = ("published_params", "published_active_params", "published_tolerance",
                   "published_active_excludes_embedding")


@dataclass(frozen=True)
class Recipe:
    """A preset's published pretraining recipe: what `mzoo train PRESET` uses unless a flag overrides
    it. `tokens` is the run's total (steps = tokens / (global_batch x seq_len)); `source` names it."""

    seq_len: int
    global_batch: int
    lr: float
    min_lr: float
    warmup: int  # steps
    schedule: str = "cosine"
    weight_decay: float = 0.1
    micro_batch: int = 1
    tokens: Optional[float] = None
    source: str = ""

    @property
    def steps(self) -> Optional[int]:
        return None if self.tokens is None else round(self.tokens / (self.global_batch * self.seq_len))


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    published_params: Optional[float]
    published_active_params: Optional[float]
    published_tolerance: float = 0.005  # relative; wider only where a preset's comment says why
    recipe: Optional[Recipe] = None
    published_active_excludes_embedding: bool = False  # GPT-OSS's model card counts the unembedding only

    @property
    def active_as_published(self) -> int:
        """The exact active count in the published number's sense (without the input embedding where
        the publisher leaves it out: a lookup, no compute)."""
        active = self.count.active
        return active - self.config.vocab_size * self.config.hidden_size if self.published_active_excludes_embedding \
            else active

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def count(self) -> ParamCount:
        return count_params(self.config)


def _load(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path.name} is not valid YAML ({e.__class__.__name__}); fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path.name} must hold a mapping of config keys.")
    published = {k: data.pop(k, None) for k in _PUBLISHED_KEYS}
    recipe = data.pop("recipe", None)
    data.setdefault("name", path.stem)
    cfg = ModelConfig.from_dict(data, where=f"preset {path.stem}")
    tolerance = published["published_tolerance"] or 0.005
    return Preset(cfg, published["published_params"], published["published_active_params"], float(tolerance),
                  _recipe(recipe, path.stem), bool(published["published_active_excludes_embedding"]))


def _recipe(data: Optional[dict], name: str) -> Optional[Recipe]:
    if data is None:
        return None
    try:
        return Recipe(**data)
    except TypeError as e:
        raise ConfigError(f"preset {name}: its recipe is malformed ({e}); use the keys of zoo.Recipe.") from None


DEFAULTS = dict(seq_len=128, micro_batch=2, global_batch=8, lr=3e-4, min_lr=3e-5, warmup=2, schedule="cosine",
                weight_decay=0.1, steps=20)  # `mzoo train`'s settings for presets without a recipe (tiny ones, YAML)


def training_settings(name_or_path: str, **flags) -> dict:
    """Each training setting in DEFAULTS from its flag (None: not given), else the preset's published
    recipe, else mzoo's small default."""
    recipe = recipe_of(name_or_path)
    out = {}
    for key, default in DEFAULTS.items():
        value = flags.get(key)
        if value is None and recipe is not None:
            value = getattr(recipe, key)
        out[key] = default if value is None else value
    return out


def recipe_of(name_or_path: str) -> Optional[Recipe]:
    """The recipe of a preset (None for YAML files and presets without one)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or (path.exists() and path.is_file()) or name_or_path not in presets():
        return None
    return presets()[name_or_path].recipe


@lru_cache(maxsize=None)
def presets() -> dict[str, Preset]:
    """All presets by name, in file-name order."""
    return {p.stem: _load(p) for p in sorted(PRESET_DIR.glob("*.yaml"))}


def names(family: Optional[str] = None) -> list[str]:
    """Preset names by family (zoo order), then size."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown family '{family}'; use one of {', '.join(FAMILIES)}.")
    chosen = [p for p in presets().values() if family is None or p.config.family == family]
    chosen.sort(key=lambda p: (FAMILIES.index(p.config.family), p.count.total, p.name))
    return [p.name for p in chosen]


def get(name: str) -> Preset:
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `mzoo zoo list` to see them."
        raise ConfigError(f"unknown preset '{name}'{hint}")
    return table[name]


def resolve(name_or_path: str) -> ModelConfig:
    """A preset name or a path to a YAML ModelConfig."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or (path.exists() and path.is_file()):
        return ModelConfig.from_yaml(path)
    return get(name_or_path).config
