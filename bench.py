"""
bench.py: performance, measured side by side with a baseline in the same process.

The playbook's infra lesson is to measure before believing: every speed claim in this
project comes from here, as a ratio against a baseline run in the same process on the
same data, and is written with its date and machine into BENCHMARKS.md.

Benchmarks (more arrive with the files they measure):
    python bench.py tokenizer   # BPE training time and compression vs rustbpe and HF tokenizers,
                                # and encoding throughput: tiktoken path vs the pure-Python reference

The baselines are benchmark-only tools, not dependencies of the project:
    pip install rustbpe tokenizers
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import tokenizer


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# -----------------------------------------------------------------------------
# Tokenizer

def bench_tokenizer(args):
    import tiktoken

    try:
        import rustbpe
        import tokenizers
    except ImportError as e:
        sys.exit(f"bench.py tokenizer compares against rustbpe and HF tokenizers: pip install rustbpe tokenizers ({e})")

    paths = tokenizer.stdlib_sources()
    texts = [tokenizer._read_text(p) for p in paths]
    n_bytes = sum(len(t.encode()) for t in texts)
    # Held out: the standard library's own tests, which training never sees.
    import sysconfig

    test_dir = os.path.join(sysconfig.get_paths()["stdlib"], "test")
    held_out_docs, size = [], 0
    for f in sorted(os.listdir(test_dir)):
        if f.endswith(".py") and size < args.held_out_chars:
            held_out_docs.append(tokenizer._read_text(os.path.join(test_dir, f)))
            size += len(held_out_docs[-1])
    held_out = "".join(held_out_docs)
    pattern = tokenizer.PATTERNS[args.pattern]
    V = args.vocab_size
    print(f"corpus: {len(texts)} standard-library .py files, {n_bytes / 1e6:.1f} MB; vocab {V}; "
          f"pattern {args.pattern}; held out: {len(held_out.encode()) / 1e6:.1f} MB of Lib/test")

    def ours():  # no special tokens, so it learns exactly V - 256 merges, as rustbpe does
        return tokenizer.Tokenizer.train(texts, V, pattern=pattern, special_tokens=(), verbose=False)

    def rust():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), V, pattern=pattern)
        return tok

    def hf():
        from tokenizers import Regex, models, pre_tokenizers, trainers

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=V, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return tok

    times = {"nanoplaybook": [], "rustbpe": [], "HF tokenizers": []}
    built = {}
    for r in range(args.rounds):  # interleaved, so a noisy neighbour hurts all three alike
        for name, fn in (("nanoplaybook", ours), ("rustbpe", rust), ("HF tokenizers", hf)):
            dt, built[name] = timed(fn)
            times[name].append(dt)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))

    # Compression on held-out text, all encoded by tiktoken/HF from the learned vocabularies.
    rust_enc = tiktoken.Encoding("rustbpe", pat_str=pattern, mergeable_ranks=dict(built["rustbpe"].get_mergeable_ranks()),
                                 special_tokens={})
    n_held = len(held_out.encode())
    bpt = {"nanoplaybook": n_held / len(built["nanoplaybook"].encode(held_out)),
           "rustbpe": n_held / len(rust_enc.encode_ordinary(held_out)),
           "HF tokenizers": n_held / len(built["HF tokenizers"].encode(held_out).ids)}

    base = statistics.median(times["rustbpe"])
    print(f"\n| trainer | median time (s) | min (s) | vs rustbpe | bytes/token (held out) | vs rustbpe |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {med / base:.2f}x | {bpt[name]:.3f} | "
              f"{100 * (bpt[name] / bpt['rustbpe'] - 1):+.2f}% |")

    # Where our time goes: pre-tokenization (two processes) and the merges (one).
    t_count, counts = timed(lambda: tokenizer.count_chunks(texts, pattern))
    t_merge, _ = timed(lambda: tokenizer.learn_merges(counts, V - 256))
    # rustbpe's split, the same way: a vocabulary of 257 is one merge, so nearly all pre-tokenization.
    t_rust_split, _ = timed(lambda: rustbpe.Tokenizer().train_from_iterator(iter(texts), 257, pattern=pattern))
    print(f"\nnanoplaybook split: count_chunks {t_count:.2f}s ({len(counts):,} distinct chunks), "
          f"learn_merges {t_merge:.2f}s; rustbpe: pre-tokenization {t_rust_split:.2f}s, "
          f"merges {statistics.median(times['rustbpe']) - t_rust_split:.2f}s")

    # Encoding throughput: the tiktoken path against the pure-Python reference, same ids.
    tok = built["nanoplaybook"]
    sample = held_out[: args.python_encode_chars]
    t_py, ids_py = timed(lambda: tok.encode_python(sample))
    t_tk, ids_tk = timed(lambda: tok.encode(sample))
    assert ids_py == ids_tk, "the two encoders disagree"
    t_all, _ = timed(lambda: tok.encode(held_out))
    t_batch, _ = timed(lambda: tok.encode_batch(held_out_docs))
    mb = len(sample.encode()) / 1e6
    print(f"encode {mb:.2f} MB: encode_python {mb / t_py:.2f} MB/s, tiktoken {mb / t_tk:.1f} MB/s "
          f"({t_py / t_tk:.0f}x); tiktoken on {n_held / 1e6:.1f} MB: {n_held / 1e6 / t_all:.1f} MB/s, "
          f"encode_batch over its {len(held_out_docs)} files {n_held / 1e6 / t_batch:.1f} MB/s")
    print(f"\nmachine: {machine()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="BPE training and encoding")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--pattern", default="default", choices=sorted(tokenizer.PATTERNS))
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--held-out-chars", type=int, default=2_000_000)
    t.add_argument("--python-encode-chars", type=int, default=200_000)
    args = ap.parse_args()
    {"tokenizer": bench_tokenizer}[args.cmd](args)


if __name__ == "__main__":
    main()
