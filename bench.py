"""
bench.py: performance, measured side by side with a baseline in the same process.

The playbook's infra lesson is to measure before believing: every speed claim in this
project comes from here, as a ratio against a baseline run in the same process on the
same data, and is written with its date and machine into BENCHMARKS.md.

Benchmarks (more arrive with the files they measure):
    python bench.py tokenizer   # BPE training time and compression vs rustbpe and HF tokenizers,
                                # and encoding throughput: tiktoken path vs the pure-Python reference
    python bench.py data        # prepare throughput (MB/s of text) vs bare tiktoken; Loader
                                # throughput (tokens/s) vs a nanoGPT-style loader and vs training
    python bench.py model       # forward+backward time of model.Model vs transformers'
                                # LlamaForCausalLM, same config, weights and batch
    python bench.py train       # training tokens/s and MFU of a preset (the tiny one by default),
                                # against this device's measured matmul peak (CPU) or its spec (GPU)

The baselines are benchmark-only tools, not dependencies of the project:
    pip install rustbpe tokenizers
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import data
import model
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


# -----------------------------------------------------------------------------
# Data

def bench_data(args):
    import shutil
    import tempfile

    import numpy as np
    import torch

    tmp = tempfile.mkdtemp(prefix="bench-data-")
    try:
        texts = [tokenizer._read_text(p) for p in data.stdlib_files()]
        tok = tokenizer.Tokenizer.train(texts[::4], args.vocab_size, verbose=False)
        tok.save(os.path.join(tmp, "tok"))
        enc = data.load_tokenizer(os.path.join(tmp, "tok.json"))
        # Real-data path: the standard library as 24 jsonl files, one document per line.
        os.makedirs(os.path.join(tmp, "web"))
        for i in range(24):
            with open(os.path.join(tmp, "web", f"{i:02d}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i::24])
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"{len(texts)} documents, {mb:.1f} MB as 24 jsonl files; tokenizer: {tok}; {os.cpu_count()} cores")

        def prep(sources, workers):
            out = os.path.join(tmp, "out")
            shutil.rmtree(out, ignore_errors=True)
            return data.prepare(sources, out, os.path.join(tmp, "tok.json"), workers=workers, verbose=False)

        times = {"bare tiktoken encode_ordinary_batch": [], "prepare, 1 process": [],
                 f"prepare, {os.cpu_count()} processes": []}
        for r in range(args.rounds):
            times["bare tiktoken encode_ordinary_batch"].append(timed(lambda: enc.encode_ordinary_batch(texts))[0])
            times["prepare, 1 process"].append(timed(lambda: prep([os.path.join(tmp, "web")], 1))[0])
            times[f"prepare, {os.cpu_count()} processes"].append(timed(lambda: prep([os.path.join(tmp, "web")], None))[0])
        base = statistics.median(times["bare tiktoken encode_ordinary_batch"])
        print(f"\n| prepare {mb:.1f} MB of jsonl | median (s) | MB/s | time vs bare tiktoken |\n|---|---|---|---|")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.2f} | {mb / statistics.median(ts):.1f} | "
                  f"{statistics.median(ts) / base:.2f}x |")
        t_builtin, m = timed(lambda: prep(list(data.BUILTIN_SOURCES), None))
        text_mb = sum(u["counts"]["bytes"] for s in m["sources"].values() for u in s["units"]) / 1e6
        n_tokens = sum(s["train"]["tokens"] for s in m["sources"].values())
        print(f"\nbuilt-in corpus (code, prose, math): {text_mb:.1f} MB of text, {n_tokens / 1e6:.2f}M train tokens, "
              f"{t_builtin:.1f}s, {text_mb / t_builtin:.1f} MB/s ({os.cpu_count()} processes; prose parses every module)")

        # Loader: ours (packing masks, positions, mixture, permutation) against the simplest
        # loader there is, nanoGPT's: random offsets into one memmap, x and y, nothing else.
        out = os.path.join(tmp, "out")
        stream = np.concatenate([np.fromfile(os.path.join(out, name, f"{u['unit']}-train.bin"), dtype=np.uint16)
                                 for name, s in m["sources"].items() for u in s["units"]])
        flat = os.path.join(tmp, "flat.bin")
        stream.tofile(flat)
        mm = np.memmap(flat, dtype=np.uint16, mode="r")
        print(f"\n| loader, batch x seq_len | nanoGPT-style (tokens/s) | data.Loader (tokens/s) | ratio |\n|---|---|---|---|")
        for B, T in [(8, 1024), (32, 2048), (4, 4096)]:
            rng = np.random.default_rng(0)

            def nanogpt():
                ix = rng.integers(0, len(mm) - T - 1, B)
                x = torch.from_numpy(np.stack([mm[i:i + T].astype(np.int64) for i in ix]))
                y = torch.from_numpy(np.stack([mm[i + 1:i + 1 + T].astype(np.int64) for i in ix]))
                return x, y

            loader = data.Loader(out, B, T, weights={"code": 0.5, "prose": 0.3, "math": 0.2})
            rates = {"nanogpt": [], "ours": []}
            for r in range(args.rounds):
                rates["nanogpt"].append(B * T * args.batches / timed(lambda: [nanogpt() for _ in range(args.batches)])[0])
                rates["ours"].append(B * T * args.batches / timed(lambda: [next(loader) for _ in range(args.batches)])[0])
            a, b = statistics.median(rates["nanogpt"]), statistics.median(rates["ours"])
            print(f"| {B} x {T} | {a / 1e6:.1f}M | {b / 1e6:.1f}M | {b / a:.2f}x |")

        # What training consumes. train.py has not landed yet: a stand-in on this machine is a
        # plain torch transformer about the size of the CPU demo model, trained in float32.
        d, L, T, B = 256, 6, 256, 8
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        net = torch.nn.Sequential(torch.nn.Embedding(args.vocab_size, d),
                                  torch.nn.TransformerEncoder(layer, L, enable_nested_tensor=False),
                                  torch.nn.Linear(d, args.vocab_size))
        opt = torch.optim.AdamW(net.parameters())
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
        loader = data.Loader(out, B, T)

        def step():
            batch = next(loader)
            h = net[1](net[0](batch["input_ids"]), mask=mask, is_causal=True)
            loss = torch.nn.functional.cross_entropy(net[2](h).flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()

        step()
        t_steps, _ = timed(lambda: [step() for _ in range(5)])
        n_params = sum(p.numel() for p in net.parameters())
        print(f"\ntraining stand-in on this CPU ({n_params / 1e6:.1f}M params, float32, {B} x {T}): "
              f"{5 * B * T / t_steps:,.0f} tokens/s")
        for n, mfu in [(135e6, 0.4), (1.7e9, 0.4)]:
            need = mfu * 989e12 / (6 * n)  # H100 SXM dense bf16 peak; 6N FLOPs per token
            print(f"an H100 at {mfu:.0%} MFU training a {n / 1e6:,.0f}M model consumes about {need:,.0f} tokens/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmachine: {machine()}")


# -----------------------------------------------------------------------------
# Model

def bench_model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 on CPU (bf16 matmuls there are hundreds of times slower); bf16 autocast on GPU
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"| config | batch x seq | transformers LlamaForCausalLM (ms) | model.Model (ms) | ratio | "
          f"peak memory ratio |\n|---|---|---|---|---|---|")
    for name in args.presets:
        # No NoPE layers: with them the matching transformers class would be SmolLM3, not Llama.
        c = model.preset(name, max_seq_len=max(args.seq_len, 1024), nope_layers=())
        ours = model.Model(c).to(device)
        hf_config = transformers.AutoConfig.for_model(**model.config_to_hf(c))
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
        theirs.load_state_dict({model.hf_name(k): v for k, v in ours.state_dict().items()})
        B, T = args.batch_size, args.seq_len
        x = torch.randint(0, c.vocab_size, (B, T), device=device)
        labels = torch.cat([x[:, 1:], torch.full((B, 1), -100, device=device)], dim=1)   # ours come shifted

        def step_ours():
            with autocast:
                _, loss, _ = ours(x, labels=labels)
            loss.backward()
            return loss.item()

        def step_theirs():
            with autocast:
                loss = theirs(input_ids=x, labels=x).loss   # transformers shifts inside
            loss.backward()
            return loss.item()

        a, b = step_theirs(), step_ours()   # warm-up, and the two losses must agree
        assert type(theirs).__name__ == "LlamaForCausalLM"
        assert abs(a - b) < (1e-4 if device == "cpu" else 2e-2) * abs(a), (a, b)
        times, peaks = {"theirs": [], "ours": []}, {"theirs": 0, "ours": 0}
        for r in range(args.rounds):   # interleaved, so that drift on a shared machine hits both
            for key, fn in (("theirs", step_theirs), ("ours", step_ours)):
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t, _ = timed(fn)
                times[key].append(t)
                if device == "cuda":
                    peaks[key] = torch.cuda.max_memory_allocated()
        t_theirs, t_ours = statistics.median(times["theirs"]), statistics.median(times["ours"])
        mem = f"{peaks['ours'] / peaks['theirs']:.2f}x" if device == "cuda" else "n/a (CPU)"
        print(f"| {name} | {B} x {T} | {t_theirs * 1e3:.0f} | {t_ours * 1e3:.0f} | {t_ours / t_theirs:.2f}x | {mem} |")
    print(f"\nmachine: {machine()}, transformers {transformers.__version__}, {device}, "
          f"{'bf16 autocast' if device == 'cuda' else 'float32'}, median of {args.rounds} interleaved rounds")


# -----------------------------------------------------------------------------
# Training throughput and MFU

def bench_train(args):
    import torch

    import train

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The denominator of MFU. On a GPU: the datasheet's dense bf16 peak. A CPU has no such
    # number here, so measure one: the best of a few large float32 matmuls in this process.
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = min(timed(lambda: (a @ b).sum().item())[0] for _ in range(5))
    measured = 2 * n ** 3 / best
    cfg = train.TrainConfig(compile=args.compile)
    peak = train.peak_flops(cfg, device) or measured
    print(f"matmul {n}x{n} float32: {measured / 1e9:,.0f} GFLOP/s measured; MFU denominator "
          f"{peak / 1e12:.1f} TFLOP/s ({'datasheet' if peak != measured else 'measured'})")
    for name in args.presets:
        m = model.Model(model.preset(name, max_seq_len=max(args.seq_len, 1024))).to(device)
        opt = torch.optim.AdamW(train.param_groups(m, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        net = torch.compile(m) if args.compile else m
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        x = torch.randint(0, m.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

        def step():
            with autocast:
                _, loss, _ = net(x[:, :-1], labels=x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(args.warmup):
            step()
        times = [timed(step)[0] for _ in range(args.steps)]
        tps = args.batch_size * args.seq_len / statistics.median(times)
        mfu = m.flops_per_token(args.seq_len) * tps / peak
        print(f"| {name} | {args.batch_size} x {args.seq_len} | {m.num_params()[0] / 1e6:.1f}M | "
              f"{m.flops_per_token(args.seq_len) / 1e6:.1f} MFLOPs | {tps:,.0f} tokens/s | MFU {100 * mfu:.1f}% |")
    print(f"\nmachine: {machine()}, {device}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}"
          f"{', torch.compile' if args.compile else ''}, median of {args.steps} steps after {args.warmup} warm-up")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="BPE training and encoding")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--pattern", default="default", choices=sorted(tokenizer.PATTERNS))
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--held-out-chars", type=int, default=2_000_000)
    t.add_argument("--python-encode-chars", type=int, default=200_000)
    d = sub.add_parser("data", help="prepare and Loader throughput")
    d.add_argument("--vocab-size", type=int, default=8192)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--batches", type=int, default=50)
    m = sub.add_parser("model", help="forward+backward vs transformers' LlamaForCausalLM")
    m.add_argument("--presets", nargs="+", default=["tiny", "smollm2-135m"], choices=sorted(model.PRESETS))
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--rounds", type=int, default=5)
    tr = sub.add_parser("train", help="training tokens/s and MFU")
    tr.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(model.PRESETS))
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--warmup", type=int, default=3)
    tr.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    {"tokenizer": bench_tokenizer, "data": bench_data, "model": bench_model, "train": bench_train}[args.cmd](args)


if __name__ == "__main__":
    main()
