"""Hugging Face <-> canonical converters: one adapter module per family, registered on import."""

from mzoo.converters import deepseek, gpt2, gpt_oss, llama, mamba, mixtral, nemotron_h, qwen  # noqa: F401  (registers)
from mzoo.converters.adapter import Adapter, for_family, for_hf_config

__all__ = ["Adapter", "for_family", "for_hf_config"]
