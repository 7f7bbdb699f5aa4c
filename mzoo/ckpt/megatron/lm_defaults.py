"""Megatron-LM's argument defaults: the full `args` its tools and Megatron-Bridge's loader expect.

Megatron-LM saves its whole argparse Namespace (over 800 fields in 0.19) in every checkpoint and
its tools read whichever they need as attributes; Megatron-Bridge's loader of Megatron-LM
checkpoints reads dozens (`heterogeneous_layers_config_path` first). mzoo's args are therefore
these defaults with mzoo's model, layout and tokenizer fields over them (args.py).

megatron_lm_args.json holds what Megatron-LM's own `parse_args` (megatron/training/arguments.py,
shipped in the megatron-core wheel since 0.16-ish, and in every Megatron-LM checkout) returns for a
minimal command line, merged over the releases it names, the newest winning. Add a release with a
venv holding that megatron-core, or with a Megatron-LM checkout of it (git worktree of a core_v tag):

    python -m mzoo.ckpt.megatron.lm_defaults [MEGATRON_LM_CHECKOUT]

Defaults that are not JSON (attention_backend, an enum) are left out: readers use their own.
"""

from __future__ import annotations

import enum
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("megatron_lm_args.json")
# the smallest command line parse_args accepts; these model fields are mzoo's to set, not defaults
ARGV = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1"]
MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings")


@lru_cache(maxsize=1)
def lm_defaults() -> dict[str, Any]:
    """Field -> Megatron-LM's default (a fresh copy is the caller's to keep: values are JSON)."""
    return json.loads(TABLE.read_text())["args"]


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, enum.Enum)
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def parsed_defaults() -> dict[str, Any]:
    """What the installed Megatron-LM's parse_args returns for ARGV, JSON values only."""
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["mzoo", *ARGV]
    try:
        args = vars(parse_args(ignore_unknown_args=True))
    finally:
        sys.argv = saved
    return {k: v for k, v in sorted(args.items()) if k not in MODEL_FIELDS and _jsonable(v)}


def main(argv: list[str]) -> None:
    if argv:  # a Megatron-LM checkout: its megatron/ package first on the path
        sys.path.insert(0, str(Path(argv[0]).resolve()))
    from megatron.core.package_info import __version__ as release

    table = json.loads(TABLE.read_text()) if TABLE.exists() else {"releases": [], "args": {}}
    releases = sorted({*table["releases"], release}, key=lambda r: tuple(int(x) for x in r.split(".")[:3]))
    newest = releases[-1] == release
    parsed = parsed_defaults()
    merged = {**table["args"], **parsed} if newest else {**parsed, **table["args"]}
    TABLE.write_text(json.dumps({"releases": releases, "args": dict(sorted(merged.items()))}, indent=0) + "\n")
    print(f"{TABLE}: {len(merged)} fields from megatron-core {', '.join(releases)}")


if __name__ == "__main__":
    main(sys.argv[1:])
