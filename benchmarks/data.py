"""Benchmark: `mzoo data prepare` tokens/s against the tokenizer's own batch encoding.

What it measures, in one run, on a JSONL corpus generated on the spot (default ~20 MB: documents of
5-40 sentences drawn from the small corpus mzoo ships, mzoo/train/corpus/tiny_stories.jsonl, with a
quarter of the words replaced by pseudo-words from a Zipf-distributed list of 30,000 so that the
text is not just a few hundred distinct words) and a byte-level BPE tokenizer of 8,000 ids trained
on the spot on its first ~2 MB with mzoo.train.bpe.train_bpe (as mzoo's demo and tests do; it saves a
transformers folder, which `mzoo data prepare --tokenizer DIR` loads with AutoTokenizer):

  read JSONL            json.loads of every line, nothing else                      (info: the floor)
  tokenizers (baseline) tokenizers.Tokenizer.from_file(tokenizer.json), read the JSONL, encode_batch
                        per 256 documents, append the EOD id, count; writes nothing  (the named baseline)
  transformers (info)   the same with the transformers tokenizer mzoo loads for a folder:
                        tok(texts, return_attention_mask=False)["input_ids"] per 256 documents
  mzoo 1 worker         mzoo data prepare CORPUS --tokenizer DIR --out PREFIX --append-eod --workers 1 --json
  mzoo 2 workers        the same with --workers 2

Megatron-LM's tools/preprocess_data.py would be the natural second baseline; megatron-core and
Megatron-LM are not installed here, so it is not run.

tokens/s = tokens / the in-process seconds of the work: for mzoo the `seconds` of its --json summary
(from the start of prepare(): tokenizer load, reading, tokenizing, writing .bin/.idx; not the
interpreter's start-up or the CLI's imports, but it does include importing transformers' tokenizer
classes and loading the tokenizer with AutoTokenizer, which mzoo does lazily), for the baselines the
same span measured the same way (from importing the tokenizer's library to the last token). "load s"
shows how much of that the import and load take in the baselines: 1-2 s for transformers, a few ms
for tokenizers, a fixed cost that matters on a small corpus and not on a large one (--mb). Wall s is
the whole subprocess, start-up included. Every row runs in its own subprocess with
TOKENIZERS_PARALLELISM unset, i.e. the tokenizers library's default: encode_batch spreads a batch
over all cores (Rust threads), in the baselines and in mzoo alike. Peak RSS as in
benchmarks/convert.py (the process tree, polled, and ru_maxrss); CPU s = user + system seconds of
the subprocess and the children it waited for (the worker pool).

Repeats (--repeats, default 2): the list runs R times round-robin; medians are reported; "vs
baseline" is the median of the per-round ratios to the tokenizers row; spread = (max - min) / median
of the tokens/s over the rounds.

Run:  .venv/bin/python benchmarks/data.py [--mb 20] [--repeats 2] [--workers 1,2] [--vocab 8000]
      [--workdir DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, print_markdown_table, run_measured  # noqa: E402  (benchmarks/ is not a package)

GB = 1e9
MB = 1e6
CHUNK = 256  # documents per encode_batch call: mzoo's PrepareConfig.chunk_docs


# ---------------------------------------------------------------------------------------------
# corpus and tokenizer
# ---------------------------------------------------------------------------------------------
def make_corpus(path: Path, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """A JSONL file of about target_bytes: (documents, bytes)."""
    from mzoo.train.bpe import corpus_texts

    rng = random.Random(seed)
    sentences = [s.strip() for text in corpus_texts() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "pa", "dor", "fin", "gal", "hem", "jus",
                 "kre", "lum", "mos", "nar", "pel", "qui", "ros", "sil", "tam", "ux", "wen", "yol"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(45000)})[:30000]
    cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(words))))  # Zipf
    docs = written = 0
    with open(path, "w") as fh:
        while written < target_bytes:
            out = []
            for s in rng.choices(sentences, k=rng.randint(5, 40)):
                toks = s.split()
                swap = rng.choices(words, cum_weights=cum_weights, k=len(toks))
                out.append(" ".join(w if rng.random() > 0.25 else swap[i].capitalize() if w[:1].isupper() else swap[i]
                                    for i, w in enumerate(toks)))
            line = json.dumps({"text": " ".join(out)}) + "\n"
            fh.write(line)
            written += len(line.encode())
            docs += 1
    return docs, written


def train_tokenizer(corpus: Path, out: Path, vocab: int, sample_bytes: int = 2_000_000) -> Path:
    from mzoo.train.bpe import train_bpe

    texts, n = [], 0
    with open(corpus) as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            n += len(line)
            if n >= sample_bytes:
                break
    return train_bpe(texts, vocab, out)


# The baselines, run as scripts in their own subprocess: argv = kind, tokenizer dir, corpus, result JSON.
BASELINE = r'''
import json, sys, time
kind, tok_dir, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
CHUNK = int(sys.argv[5])
start = time.perf_counter()
if kind == "read":
    encode = None
elif kind == "tokenizers":
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_dir + "/tokenizer.json")
    eod = tok.token_to_id("<|endoftext|>")
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts)]
else:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    eod = tok.eos_token_id
    encode = lambda texts: list(tok(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"])
load_seconds = time.perf_counter() - start
docs = tokens = 0
def flush(texts):
    global docs, tokens
    docs += len(texts)
    if encode is not None:
        ids = [d + [eod] for d in encode(texts) if d]
        tokens += sum(len(d) for d in ids)
texts = []
with open(corpus, "rb") as fh:
    for line in fh:
        if line.strip():
            texts.append(json.loads(line)["text"])
        if len(texts) >= CHUNK:
            flush(texts); texts = []
if texts:
    flush(texts)
seconds = time.perf_counter() - start
json.dump({"documents": docs, "tokens": tokens, "seconds": seconds, "load_seconds": load_seconds}, open(out, "w"))
'''


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    wall_s: float = 0.0
    seconds: float = 0.0  # in-process seconds of the work
    load_s: Optional[float] = None  # of which importing the library and loading the tokenizer (baselines)
    tokens: int = 0
    documents: int = 0
    cpu_s: float = 0.0
    peak_rss: int = 0
    peak_anon: int = 0
    max_procs: int = 0
    rc: int = 0
    error: str = ""

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens / self.seconds if self.tokens and self.seconds > 0 else None


@dataclass
class Row:
    step: str
    command: str
    baseline: bool = False
    runs: list = field(default_factory=list)
    tokens_per_s: Optional[float] = None
    mb_per_s: Optional[float] = None
    vs_baseline: Optional[float] = None
    spread: Optional[float] = None
    seconds: float = 0.0
    load_s: Optional[float] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0
    max_procs: int = 0
    tokens: int = 0
    documents: int = 0
    rc: int = 0
    error: str = ""


def measure(argv: list[str], env: dict, result: Path, from_stdout: bool) -> Run:
    time.sleep(0.5)
    if result.exists():
        result.unlink()
    res = run_measured(argv, env)
    run = Run(wall_s=res.wall_s, cpu_s=res.cpu_s, peak_rss=res.peak_rss, peak_anon=res.poller.peak_anon,
              max_procs=res.poller.max_procs, rc=res.rc)
    if res.rc != 0:
        run.error = res.output[-2000:] or f"exit status {res.rc}"
        return run
    try:
        if from_stdout:  # mzoo --json: the summary is the JSON object in its output
            text = res.output
            summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
        else:
            summary = json.loads(result.read_text())
        run.seconds, run.tokens, run.documents = summary["seconds"], summary["tokens"], summary["documents"]
        run.load_s = summary.get("load_seconds")
    except (OSError, ValueError, KeyError) as e:
        run.rc, run.error = 1, f"cannot read the result ({e}): {res.output[-1000:]}"
    return run


def summarise(rows: list[Row], corpus_bytes: int) -> None:
    med = statistics.median
    base = next((r for r in rows if r.baseline), None)
    for r in rows:
        ok = [x for x in r.runs if x.rc == 0]
        if len(ok) < len(r.runs):
            bad = next(x for x in r.runs if x.rc != 0)
            r.rc, r.error = bad.rc, bad.error
        if not ok:
            continue
        r.seconds, r.wall_s = med([x.seconds for x in ok]), med([x.wall_s for x in ok])
        r.cpu_s = med([x.cpu_s for x in ok])
        r.peak_rss, r.max_procs = int(med([x.peak_rss for x in ok])), max(x.max_procs for x in ok)
        loads = [x.load_s for x in ok if x.load_s is not None]
        r.load_s = med(loads) if loads else None
        r.tokens, r.documents = ok[0].tokens, ok[0].documents
        r.mb_per_s = corpus_bytes / MB / r.seconds if r.seconds > 0 else None
        tps = [x.tokens_per_s for x in ok if x.tokens_per_s]
        if tps:
            r.tokens_per_s = med(tps)
            r.spread = (max(tps) - min(tps)) / r.tokens_per_s if len(tps) > 1 else None
        if base is not None and r is not base and r.tokens_per_s:
            ratios = [a.tokens_per_s / b.tokens_per_s for a, b in zip(r.runs, base.runs)
                      if a.tokens_per_s and b.tokens_per_s]
            r.vs_baseline = med(ratios) if ratios else None


def print_table(rows: list[Row], info: dict) -> None:
    headers = ["row", "tokens/s", "MB/s", "spread", "vs baseline", "seconds", "load s", "wall s", "CPU s",
               "peak RSS GB", "processes", "tokens"]
    body = []
    for r in rows:
        if r.rc != 0 and not r.seconds:
            body.append([r.step, "FAILED", f"rc={r.rc}", *[""] * 9])
            continue
        body.append([
            r.step + (" (baseline)" if r.baseline else ""),
            "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
            "" if r.mb_per_s is None else f"{r.mb_per_s:.2f}",
            "" if r.spread is None else f"{r.spread:.0%}",
            "" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x",
            f"{r.seconds:.2f}", "" if r.load_s is None or r.step == "read JSONL" else f"{r.load_s:.2f}",
            f"{r.wall_s:.2f}", f"{r.cpu_s:.2f}", f"{r.peak_rss / GB:.2f}", str(r.max_procs),
            f"{r.tokens:,}" if r.tokens else "",
        ])
    print(f"data benchmark: {info['corpus_mb']:.1f} MB JSONL, {info['documents']:,} documents; byte-level BPE of "
          f"{info['vocab']:,} ids trained on its first {info['tokenizer_sample_mb']:.0f} MB; --append-eod; "
          f"medians of {info['repeats']} round(s)")
    print_markdown_table(headers, body)
    print("tokens/s = tokens / seconds; seconds = in-process time of the work (tokenizer load, read, tokenize, and "
          "for mzoo write), start-up excluded; load s = the part of it spent importing the tokenizer's library and "
          "loading it (baselines; mzoo's span holds the same transformers import and load); wall s = whole "
          "subprocess; MB/s = corpus MB / seconds.")
    print("vs baseline = median of per-round ratios to the tokenizers row; spread = (max - min) / median of tokens/s; "
          "CPU s = user + system of the subprocess and its waited-for children; processes = most seen at once.")
    print(f"commands ($WORK = {info['workdir']}):")
    for r in rows:
        print(f"  {r.step}: {r.command}")
    for r in rows:
        if r.rc != 0:
            print(f"\n{r.step} failed ({r.command}):\n{r.error}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default 20)")
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (default 8000)")
    ap.add_argument("--workers", default="1,2", help="mzoo --workers values, one row each (default 1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, medians reported (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus, tokenizer and outputs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers must be a comma list of integers, not '{args.workers}'")
    if not workers or min(workers) < 1:
        ap.error("--workers values must be at least 1")
    if args.mb <= 0 or args.repeats < 1 or args.vocab < 300:
        ap.error("--mb must be positive, --repeats at least 1, --vocab at least 300")

    py = sys.executable
    mzoo = shutil.which("mzoo", path=str(Path(py).parent)) or shutil.which("mzoo")
    if mzoo is None:
        print("cannot find the mzoo command next to", py, file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="mzoo-data-bench-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="mzoo-data-bench-"))
    log = sys.stderr
    try:
        free = shutil.disk_usage(work).free
        if free < 4 * args.mb * MB:
            print(f"NOTE: only {free / GB:.1f} GB free under {work}; corpus scaled down to {free / 4 / MB:.0f} MB")
            args.mb = free / 4 / MB
        corpus, tok_dir = work / "corpus.jsonl", work / "tokenizer"
        print(f"[bench] writing a {args.mb:.0f} MB corpus ...", file=log, flush=True)
        t0 = time.perf_counter()
        documents, corpus_bytes = make_corpus(corpus, int(args.mb * MB))
        print(f"[bench]   {documents:,} documents in {time.perf_counter() - t0:.1f} s; training the tokenizer ...",
              file=log, flush=True)
        t0 = time.perf_counter()
        sample = min(2_000_000, corpus_bytes)
        train_tokenizer(corpus, tok_dir, args.vocab, sample)
        print(f"[bench]   tokenizer in {time.perf_counter() - t0:.1f} s", file=log, flush=True)
        (work / "baseline.py").write_text(BASELINE)

        plan: list[tuple[str, list[str], bool, bool]] = []  # name, argv, is baseline, result on stdout
        for kind, name in (("read", "read JSONL"), ("tokenizers", "tokenizers encode_batch"),
                           ("transformers", "transformers tokenizer")):
            plan.append((name, [py, str(work / "baseline.py"), kind, str(tok_dir), str(corpus), "{result}",
                                str(CHUNK)], kind == "tokenizers", False))
        for w in workers:
            plan.append((f"mzoo data prepare, {w} worker{'s' if w > 1 else ''}",
                         [mzoo, "data", "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out",
                          str(work / f"out-w{w}"), "--append-eod", "--workers", str(w), "--overwrite", "--json"],
                         False, True))
        rows = [Row(step=name, command=" ".join(c if c != "{result}" else "$WORK/result.json" for c in cmd)
                    .replace(str(work), "$WORK"), baseline=is_base) for name, cmd, is_base, _ in plan]

        print("[bench] warm-up ...", file=log, flush=True)  # page cache: interpreter, libraries, the corpus
        subprocess.run([py, "-c", "import torch, transformers, tokenizers, mzoo.data.prepare"], env=env,
                       capture_output=True)
        subprocess.run(["cat", str(corpus)], stdout=subprocess.DEVNULL)
        load_before = os.getloadavg()
        t_start = time.perf_counter()
        for rnd in range(args.repeats):
            for i, (name, cmd, _, on_stdout) in enumerate(plan):
                result = work / f"result-{i}.json"
                argv_i = [str(result) if c == "{result}" else c for c in cmd]
                print(f"[bench] round {rnd + 1}/{args.repeats} {name} ...", file=log, flush=True)
                run = measure(argv_i, env, result, on_stdout)
                tps = f"{run.tokens_per_s:,.0f} tok/s" if run.tokens_per_s else "-"
                print(f"[bench]   {tps}, {run.seconds:.2f} s in-process, wall {run.wall_s:.2f} s, peak RSS "
                      f"{run.peak_rss / GB:.2f} GB, rc {run.rc}, load {os.getloadavg()[0]:.1f}", file=log, flush=True)
                if run.rc:
                    print(run.error, file=log, flush=True)
                rows[i].runs.append(run)
        summarise(rows, corpus_bytes)
        counts = {r.tokens for r in rows if r.tokens and r.step != "read JSONL"}
        info = {
            **machine_info(load_before[0]),
            "corpus_mb": corpus_bytes / MB,
            "documents": documents,
            "vocab": args.vocab,
            "tokenizer_sample_mb": sample / MB,
            "repeats": args.repeats,
            "workers": workers,
            "token_counts_agree": len(counts) <= 1,
            "total_s": round(time.perf_counter() - t_start, 1),
            "workdir": str(work),
        }
        if args.json:
            print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
        else:
            print(f"{info['date']}  {info['machine']}  python {info['python']}, tokenizers {info['tokenizers']}, "
                  f"transformers {info['transformers']}, mzoo {info['mzoo_commit']}; load avg (1 min) "
                  f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after; {info['total_s']:.0f} s")
            print_table(rows, info)
            if not info["token_counts_agree"]:
                print(f"WARNING: the rows counted different numbers of tokens: {sorted(counts)}")
        return 0 if all(r.rc == 0 for r in rows) else 1
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=log)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
