"""Peak RSS of `mzoo data prepare` on one long JSONL line (issue 17, case 10).

Builds the small BPE tokenizer the data tests train (Whitespace pre-tokenizer, 300 ids), writes one
JSONL record whose text is `--mb` MB of words, and runs `mzoo data prepare` on it in a child
process; peak RSS is that child's ru_maxrss from os.wait4. A second row runs the same corpus split
into 1 KB records (the same bytes, ordinary documents) for the runtime baseline.

    .venv/bin/python benchmarks/long_line.py [--mb 50] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while seven tiny models learn to predict "
         "tokens from megatron style indexed datasets and every sample is contiguous").split()
RUN = "import sys; from mzoo.cli.main import app; sys.argv[0] = 'mzoo'; app()"


def tokenizer(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20)) for i in range(200)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(root / "tokenizer.json"))
    return root / "tokenizer.json"


def long_text(mb: int) -> str:
    """`mb` MB of words separated by single spaces, deterministic."""
    unit = " ".join(WORDS[(i * 5) % len(WORDS)] for i in range(1000)) + " "
    return (unit * (mb * 10**6 // len(unit) + 1))[: mb * 10**6]


def measure(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one `mzoo` command in a child process."""
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode()[-300:] if p.stderr else ""
    if p.returncode:
        print(err, file=sys.stderr)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    root = a.work or Path(tempfile.mkdtemp(prefix="mzoo-longline-"))
    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(root)
    text = long_text(a.mb)
    (root / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (root / "short.jsonl").write_text("".join(json.dumps({"text": text[i:i + 1000]}) + "\n"
                                              for i in range(0, len(text), 1000)))
    print(f"| input ({a.mb} MB of text) | seconds | peak RSS (MB) | exit |")
    print("| --- | --- | --- | --- |")
    for name in ("long", "short"):
        s, rss, code = measure(["data", "prepare", str(root / f"{name}.jsonl"), "--tokenizer", str(tok),
                                "--out", str(root / name), "--overwrite", "-q"])
        label = "one line" if name == "long" else "1 KB lines"
        print(f"| {label} | {s:.1f} | {rss:.0f} | {code} |", flush=True)


if __name__ == "__main__":
    main()
