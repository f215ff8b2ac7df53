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
    python bench.py kernels     # (CUDA only) each Triton kernel, forward+backward, against torch:
                                # flash attention (causal, document-masked, GQA) vs sdpa / eager /
                                # torch.compile; RMSNorm and the fused cross-entropy vs eager and
                                # compiled, with peak memory; one markdown table for BENCHMARKS.md
    python bench.py train       # training tokens/s and MFU of a preset (the tiny one by default),
                                # against this device's measured matmul peak (CPU) or its spec (GPU),
                                # with the Triton kernels on and off (--kernels on|off|both)
    python bench.py moe         # (CUDA only) the grouped GEMM vs the per-expert loop (and torch's
                                # _grouped_mm where it exists) at 8 and 64 experts; an MoE layer's
                                # tokens/s vs a dense SwiGLU of the same active parameters
    python bench.py ssm         # the SSD scan, forward+backward: Triton (CUDA) vs the chunked PyTorch
                                # scan vs the sequential recurrence at T = 2k/8k/32k; decoding one
                                # token with a Mamba-2 layer vs an attention layer against context
    python bench.py parallel    # parallel.DataParallel and ZeRO stages 1-3 against torch's DDP and FSDP2
                                # on --world gloo processes of this CPU (NCCL with --device cuda):
                                # step time, per-rank memory, and the bytes each rank sends per step,
                                # counted at the collectives, against the analytical volume
    python bench.py sft_packing # SFT on the built-in chat data, packed vs padded, from one checkpoint:
                                # wall time, conversations/s, real tokens per row, held-out loss after
                                # the same conversations (the playbook: packing 3-5x faster, worse on small data)
    python bench.py sampling    # one sampled token per row of (rows x vocab) logits: model.sample's
                                # inverse-CDF draw vs torch.multinomial, and a whole generate()
    python bench.py tune        # (CUDA only) try tile sizes, warps and stages for each Triton
                                # kernel; prints the fastest for attention.FLASH_TILES / moe.GG_TILES
                                # / ssm.SSD_TILES (--kernels flash grouped_mm ssd: some of them)

The baselines are benchmark-only tools, not dependencies of the project:
    pip install rustbpe tokenizers
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attention
import data
import model
import moe
import ssm
import tokenizer


def machine():
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
    print("\n| trainer | median time (s) | min (s) | vs rustbpe | bytes/token (held out) | vs rustbpe |")
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
        print("\n| loader, batch x seq_len | nanoGPT-style (tokens/s) | data.Loader (tokens/s) | ratio |\n|---|---|---|---|")
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
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 on CPU (bf16 matmuls there are hundreds of times slower); bf16 autocast on GPU
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    print("| config | batch x seq | transformers LlamaForCausalLM (ms) | model.Model (ms) | ratio | "
          "peak memory ratio |\n|---|---|---|---|---|---|")
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
# Kernels: each Triton kernel against what torch offers for the same function
#
# A row times one forward+backward call: inputs made once, the output and the gradients
# returned by torch.autograd.grad (so nothing accumulates in .grad between calls). Every
# implementation of a kernel gets the same inputs and the same upstream gradient, so their
# outputs can be compared with the plain PyTorch reference ("eager") as a sanity column: a
# fast kernel that computes something else is not fast.

# The default shapes: SmolLM3-3B's attention (16 query heads of 128, 4 K/V heads) at 2k
# context, its hidden size for RMSNorm, and SmolLM2-135M's head for the loss; 8 x 2048 tokens.
KERNEL_SHAPES = dict(batch_size=8, heads=16, kv_heads=4, seq_len=2048, head_dim=128, doc_min=64, doc_max=512,
                     norm_rows=8 * 2048, norm_dim=2048, vocab_size=49152, dim=576, tokens=8 * 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, rounds):
    """Median seconds of fn() over `rounds` calls. On CUDA, synchronized before and after each
    call: kernels are launched asynchronously, and without the wait we would time the launches."""
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device):
    """Bytes one call of fn() needs at its peak on top of what was already allocated (the
    inputs, shared by every implementation, and anything an earlier row still holds). None on
    CPU, where torch keeps no such counter."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(kernel, impls, device, rounds, work, unit, reference="eager", unrelated=()):
    """One row per implementation (name, fn) of a kernel, ours first; fn() runs forward and
    backward and returns the output and the gradients. work: FLOPs, bytes or tokens per call,
    for the rate in `unit`. Each row's diff is against the `reference` row, except for the
    names in `unrelated` (a different function timed for scale). A baseline that fails (out of
    memory, a backend this GPU or dtype lacks) gets a row that says why instead of ending the
    table."""
    ref = None
    for name, fn in impls:   # the reference's tensors first, for the diff column
        if name == reference:
            try:
                ref = [t.detach() for t in fn()]
            except Exception:
                pass          # its own row, below, says why
    rows = []
    for i, (name, fn) in enumerate(impls):
        print(f"  {kernel}: {name}", file=sys.stderr, flush=True)
        row = dict(kernel=kernel, impl=name, ours=i == 0, unit=unit)
        try:
            out = fn()        # warm-up: compiles, autotunes, fills the allocator's cache
            if ref is not None and name not in unrelated:
                # Relative to the reference's largest value: gradients such as RMSNorm's dw are
                # sums over thousands of rows, where an absolute bf16 difference says little.
                row["diff"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()
                                  for a, b in zip(out, ref))
            del out
            row["seconds"] = median_time(fn, device, rounds)
            row["rate"] = work / row["seconds"]
            row["peak"] = peak_memory(fn, device)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"
        rows.append(row)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()   # an OOM's leftovers must not count against the next row
    return rows


def fwd_bwd(f, inputs, grad_out):
    """fn() = the output of f(*inputs) and the gradients of <output, grad_out> for every input."""
    def fn():
        out = f(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad_out))
    return fn


def attention_rows(device, dtype, s, rounds, backend="inductor", case="causal"):
    """Flash attention against sdpa, the eager reference and (backend not None) the eager
    reference under torch.compile. case: "causal", "documents" (a packed row of documents of
    random lengths, ours given position_ids, the others the boolean mask) or "gqa" (kv_heads
    K/V heads, ours and sdpa without repeating them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = s["batch_size"], s["heads"], s["seq_len"], s["head_dim"]
    Hkv = s["kv_heads"] if case == "gqa" else H
    g = torch.Generator().manual_seed(0)

    def rand(heads):   # in the model's memory order: (B, T, heads, D) from the projections, transposed
        return torch.randn(B, T, heads, D, generator=g).to(device, dtype).transpose(1, 2)

    q, k, v, do = rand(H).requires_grad_(), rand(Hkv).requires_grad_(), rand(Hkv).requires_grad_(), rand(H)
    position_ids, mask = None, None
    # FLOPs of the work that is needed: q k^T and p v, 2 * 2 * D per (query, key) pair a query
    # may read, so half of T^2 when causal; backward 2.5x the forward (five such matmuls to two).
    pairs = B * T * T / 2
    kernel = f"attention causal, {B}x{H}x{T}x{D}"
    if case == "gqa":
        kernel = f"attention GQA {H}/{Hkv} heads, {B}x{H}x{T}x{D}"
    if case == "documents":
        # Rows packed with documents of uniform random length until full; the last one is cut.
        lengths, positions = [], []
        for _ in range(B):
            row = []
            while sum(row) < T:
                row.append(min(int(torch.randint(s["doc_min"], s["doc_max"] + 1, (), generator=g)), T - sum(row)))
            lengths += row
            positions.append(torch.cat([torch.arange(n) for n in row]))
        position_ids = torch.stack(positions).to(device)
        doc = attention.document_ids(position_ids)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]        # (B, 1, T, T), as the model builds it
        # Every implementation is credited with the same needed work, the causal half of each
        # document's own L x L block: what a dense mask computes beyond it is waste, not speed.
        pairs = sum(n * n / 2 for n in lengths)
        kernel = (f"attention documents, {B}x{H}x{T}x{D}, {len(lengths)} docs of mean length "
                  f"{sum(lengths) / len(lengths):.0f} ({s['doc_min']}-{s['doc_max']})")
    flops = 3.5 * 4 * H * D * pairs

    def eager(q, k, v):
        return attention.attend(q, k, v, mask, "eager")

    def sdpa(q, k, v):
        if mask is not None:   # no flash backend takes an arbitrary mask: torch picks (memory-efficient)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)

    def ours(q, k, v):
        return attention.flash_attention(q, k, v, position_ids)

    fns = [("ours: flash_attention" + (" + position_ids" if mask is not None else ""), ours),
           ("sdpa, boolean mask" if mask is not None else "sdpa, flash backend" + (", enable_gqa" if Hkv != H else ""),
            sdpa),
           ("eager", eager)]
    if backend:   # static shapes: each case is its own compiled graph, not a dynamic-shape one
        fns.append(("torch.compile(eager)", torch.compile(eager, backend=backend, dynamic=False)))
    impls = [(name, fwd_bwd(f, (q, k, v), do)) for name, f in fns]
    return measure(kernel, impls, device, rounds, flops, "TFLOP/s")


def rms_norm_rows(device, dtype, s, rounds, backend="inductor"):
    """model.RMSNorm (the Triton kernel) against attention.RMSNorm (eager) and its compiled
    form, on (norm_rows, norm_dim) with weights in the same dtype. GB/s counts each tensor
    read or written once: x, y, dy, dx, and the weight and its gradient."""
    N, D = s["norm_rows"], s["norm_dim"]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, D, generator=g) * 3).to(device, dtype).requires_grad_()
    dy = torch.randn(N, D, generator=g).to(device, dtype)
    ref = attention.RMSNorm(D).to(device, dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
    ours = model.RMSNorm(D, ref.eps).to(device, dtype)
    ours.weight = ref.weight
    modules = [("ours: model.RMSNorm", ours), ("eager", ref)]
    if backend:
        modules.append(("torch.compile(eager)", torch.compile(ref, backend=backend, dynamic=False)))
    # The gradients wanted are x's and the (shared) weight's; the modules take x alone.
    impls = [(name, fwd_bwd(lambda x, w, f=f: f(x), (x, ref.weight), dy)) for name, f in modules]
    nbytes = 4 * N * D * x.element_size() + 2 * D * ref.weight.element_size()
    return measure(f"RMSNorm {N}x{D}", impls, device, rounds, nbytes, "GB/s")


def ce_eager(h, w, y, z_coef):
    """The loss as autograd would compute it: the whole (tokens x vocab) logit matrix, in fp32
    for the softmax, plus the z-loss on its logsumexp."""
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits, y) + z_coef * logits.logsumexp(-1).pow(2).mean()


def ce_rows(device, dtype, s, rounds, backend="inductor", z_coef=1e-4):
    """model.ChunkedCrossEntropy (matmul chunk by chunk, the Triton kernel on each chunk's
    logits, gradient computed in the forward pass) against ce_eager and its compiled form:
    time, and peak memory, the point of the fusion. TFLOP/s counts the three matmuls, 6 N V d."""
    N, V, d = s["tokens"], s["vocab_size"], s["dim"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device, dtype).requires_grad_()
    w = (0.05 * torch.randn(V, d, generator=g)).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    one = torch.ones((), device=device)

    def ours(h, w):
        return model.ChunkedCrossEntropy.apply(h, w, y, z_coef, True)[0]

    def eager(h, w):
        return ce_eager(h, w, y, z_coef)

    fns = [("ours: ChunkedCrossEntropy", ours), ("eager", eager)]
    if backend:
        fns.append(("torch.compile(eager)", torch.compile(eager, backend=backend, dynamic=False)))
    impls = [(name, fwd_bwd(f, (h, w), one)) for name, f in fns]
    return measure(f"cross-entropy {N} tokens, vocab {V}, dim {d}", impls, device, rounds, 6 * N * V * d, "TFLOP/s")


def kernel_rows(device, dtype, shapes=KERNEL_SHAPES, rounds=10, backend="inductor"):
    """Every row of the kernel table. backend: torch.compile's backend for the compiled
    baselines, None to leave them out."""
    rows = []
    for case in ("causal", "documents", "gqa"):
        rows += attention_rows(device, dtype, shapes, rounds, backend, case)
    rows += rms_norm_rows(device, dtype, shapes, rounds, backend)
    rows += ce_rows(device, dtype, shapes, rounds, backend)
    return rows


def num(x):
    """3 significant digits without exponents for table cells: 1,234 / 56.7 / 0.0891."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_kernel_table(rows):
    """The rows as a markdown table; ratios are ours over each implementation, so below 1 means
    ours is faster (or smaller)."""
    print("| kernel | implementation | fwd+bwd (ms) | rate | time ours / this | peak memory (MiB) | "
          "memory ours / this | max diff vs eager |\n|---|---|---|---|---|---|---|---|")
    ours = None
    for r in rows:
        if r["ours"]:
            ours = r if "error" not in r else None
        if "error" in r:
            print(f"| {r['kernel']} | {r['impl']} | n/a ({r['error']}) | | | | | |")
            continue
        time_ratio = f"{ours['seconds'] / r['seconds']:.2f}x" if ours else "n/a"
        peak = f"{r['peak'] / 2 ** 20:,.0f}" if r["peak"] is not None else "n/a (CPU)"
        mem_ratio = (f"{ours['peak'] / r['peak']:.2f}x" if ours and r["peak"] and ours["peak"] is not None
                     else "n/a")
        diff = f"{r['diff']:.1e}" if "diff" in r else "n/a"
        scale = {"TFLOP/s": 1e12, "GB/s": 1e9, "Mtok/s": 1e6}[r["unit"]]
        print(f"| {r['kernel']} | {r['impl']} | {num(r['seconds'] * 1e3)} | {num(r['rate'] / scale)} {r['unit']} | "
              f"{time_ratio} | {peak} | {mem_ratio} | {diff} |")


def bench_kernels(args):
    if not torch.cuda.is_available():
        print("bench.py kernels: the kernel table needs a CUDA GPU (the Triton kernels run on a CPU only "
              "under TRITON_INTERPRET=1, far too slowly to time)", file=sys.stderr)
        raise SystemExit(2)
    if not attention.kernels_on(torch.empty(0, device="cuda")):   # else "ours" would be the fallbacks
        print("bench.py kernels: the Triton kernels are off here (Triton is not installed, or "
              "NANOPLAYBOOK_KERNELS=0)", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    rows = kernel_rows(torch.device("cuda"), dtype, {key: getattr(args, key) for key in KERNEL_SHAPES},
                       args.rounds, None if args.no_compile else "inductor")
    print()
    print_kernel_table(rows)
    print("\nrates: attention TFLOP/s count the needed work only, 4 H D per (query, key) pair a query may "
          "read (causal: half of T^2; documents: half of each document's L^2, the same for every "
          "implementation), backward 2.5x forward; RMSNorm GB/s count x, y, dy, dx, weight and its "
          "gradient once; cross-entropy TFLOP/s count the three matmuls (6 N V d). Peak memory: one call's "
          "peak above the memory already allocated. Max diff: the largest difference of the output and "
          "the gradients from eager's, relative to eager's largest value.")
    print(f"\nmachine: {machine()}, {args.dtype}, median of {args.rounds} rounds after one warm-up call")


# -----------------------------------------------------------------------------
# Training throughput and MFU

@contextlib.contextmanager
def kernels_off():
    """Inside: every Triton kernel gives way to its PyTorch path (flash attention to sdpa, even
    with attn_impl "triton"; RMSNorm and cross-entropy to their references; the grouped GEMM to
    the per-expert loop; the SSD scan to ssd_chunked). kernels_on is the one switch: attention.py,
    moe.py and ssm.py read their own, model.py the name it imported."""
    saved = attention.kernels_on, model.kernels_on, moe.kernels_on, ssm.kernels_on
    attention.kernels_on = model.kernels_on = moe.kernels_on = ssm.kernels_on = lambda t: False
    try:
        yield
    finally:
        attention.kernels_on, model.kernels_on, moe.kernels_on, ssm.kernels_on = saved


def bench_train(args):
    import train

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
    # Kernels on and off are two measurements only where the kernels can run at all.
    kernels = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.kernels]
    if not attention.kernels_on(torch.empty(0, device=device)):
        kernels = ["off"]
        print(f"the Triton kernels do not run here ({device.type}; they need CUDA, Triton and no "
              "NANOPLAYBOOK_KERNELS=0), so kernels on and off are the same step: measured once, --kernels ignored")

    def measure(name):
        torch.manual_seed(0)   # each measurement starts from the same weights and batch
        if args.compile:
            torch._dynamo.reset()   # compile afresh: the kernels switch is part of what gets traced
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
        return m.num_params()[0], m.flops_per_token(args.seq_len), tps

    print("\n| preset | kernels | batch x seq | params | FLOPs/token | tokens/s | MFU |\n|---|---|---|---|---|---|---|")
    mfu = {}
    for name in args.presets:
        for k in kernels:   # side by side in one process: same weights, batch and machine state
            with kernels_off() if k == "off" else contextlib.nullcontext():
                n_params, flops, tps = measure(name)
            mfu[name, k] = flops * tps / peak
            print(f"| {name} | {k if len(kernels) > 1 or device.type == 'cuda' else 'off (CPU: same as on)'} | "
                  f"{args.batch_size} x {args.seq_len} | {n_params / 1e6:.1f}M | {flops / 1e6:.1f}M | {tps:,.0f} | "
                  f"{100 * mfu[name, k]:.1f}% |")
    if len(kernels) == 2:
        print("\n" + "; ".join(f"{name}: MFU kernels on / off = {mfu[name, 'on'] / mfu[name, 'off']:.2f}x"
                               for name in args.presets))
    print(f"\nmachine: {machine()}, {device}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}"
          f"{', torch.compile' if args.compile else ''}, median of {args.steps} steps after {args.warmup} warm-up")


# -----------------------------------------------------------------------------
# MoE: the grouped GEMM and the layer

MOE_SHAPES = dict(tokens=16384, dim=2048, d_expert=768)   # Qwen3-30B-A3B's layer widths, 8 x 2048 tokens


def random_routing(n_tokens, n_experts, top_k, generator):
    """k distinct experts per token, uniformly at random, the assignments sorted by expert: the
    sorted token index of each, and the (E + 1,) offsets of each expert's rows."""
    chosen = torch.rand(n_tokens, n_experts, generator=generator).argsort(-1)[:, :top_k].flatten()
    order = chosen.argsort(stable=True)
    offsets = F.pad(torch.bincount(chosen, minlength=n_experts).cumsum(0), (1, 0))
    return order // top_k, offsets


def grouped_mm_rows(device, dtype, s, rounds, n_experts, top_k):
    """One expert bank's gate-and-up projection, (N k, dim) x (E, 2 d_expert, dim), forward and
    backward: ours (the Triton kernels) against the loop of one matmul per expert, the readable
    reference every MoE starts from, and torch._grouped_mm where this torch has it."""
    N, D, I = s["tokens"], s["dim"], s["d_expert"]
    g = torch.Generator().manual_seed(0)
    token, offsets = random_routing(N, n_experts, top_k, g)
    x = torch.randn(N, D, generator=g)[token].to(device, dtype).requires_grad_()
    w = (torch.randn(n_experts, 2 * I, D, generator=g) / D ** 0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(N * top_k, 2 * I, generator=g).to(device, dtype)
    offsets = offsets.to(device)
    fns = [("ours: grouped_mm (Triton)", lambda x, w: moe.GroupedMM.apply(x, w, offsets)),
           ("loop: one matmul per expert", lambda x, w: moe.grouped_mm_reference(x, w, offsets))]
    if hasattr(torch, "_grouped_mm"):   # cuBLAS/CUTLASS grouped GEMM (bf16, Hopper); its offsets are the ends
        ends = offsets[1:].to(torch.int32)
        fns.append(("torch._grouped_mm", lambda x, w: torch._grouped_mm(x, w.transpose(1, 2), offs=ends)))
    impls = [(name, fwd_bwd(f, (x, w), dy)) for name, f in fns]
    counts = offsets.diff()
    kernel = (f"grouped GEMM {n_experts} experts top-{top_k}, ({N * top_k}, {D}) x ({n_experts}, {2 * I}, {D}), "
              f"rows per expert {counts.min().item()}-{counts.max().item()}")
    return measure(kernel, impls, device, rounds, 3 * 2 * N * top_k * 2 * I * D, "TFLOP/s",
                   reference="loop: one matmul per expert")


def moe_layer_rows(device, dtype, s, rounds, n_experts, top_k):
    """An MoE layer (router, dispatch, E SwiGLU experts of d_expert, top_k per token) against a
    dense SwiGLU of hidden top_k * d_expert, the same active parameters per token, forward and
    backward with the weights' gradients, under autocast like training. The rate is tokens/s;
    the MoE also runs with its kernels off (the per-expert loop), the reference for the diff."""
    N, D, I = s["tokens"], s["dim"], s["d_expert"]
    torch.manual_seed(0)
    layer = moe.MoE(D, n_experts, top_k, I).to(device)
    dense = model.MLP(D, top_k * I).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).to(device).requires_grad_()
    dy = torch.randn(N, D, generator=g).to(device, dtype)

    def run(module, off=False):
        params = [x, *module.parameters()]

        def fn():
            with kernels_off() if off else contextlib.nullcontext(), torch.autocast(device.type, dtype):
                out = module(x)
            return (out, *torch.autograd.grad(out, params, dy))
        return fn

    dense_name = f"dense SwiGLU, hidden {top_k * I}"
    impls = [("ours: MoE, grouped GEMM", run(layer)), ("MoE, per-expert loop", run(layer, off=True)),
             (dense_name, run(dense))]
    kernel = f"layer: {n_experts} experts top-{top_k} of {I} vs dense, {N} tokens x {D}"
    return measure(kernel, impls, device, rounds, N, "Mtok/s", reference="MoE, per-expert loop",
                   unrelated=(dense_name,))


def bench_moe(args):
    if not torch.cuda.is_available() or not moe.kernels_on(torch.empty(0, device="cuda")):
        print("bench.py moe: the grouped GEMM table needs a CUDA GPU with Triton (and no "
              "NANOPLAYBOOK_KERNELS=0); on a CPU the kernels run only under the interpreter", file=sys.stderr)
        raise SystemExit(2)
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    s = {key: getattr(args, key) for key in MOE_SHAPES}
    rows = []
    for n_experts, top_k in ((8, 2), (64, 8)):
        rows += grouped_mm_rows(device, dtype, s, args.rounds, n_experts, top_k)
    for n_experts, top_k in ((8, 2), (64, 8)):
        rows += moe_layer_rows(device, dtype, s, args.rounds, n_experts, top_k)
    print()
    print_kernel_table(rows)
    print("\nrates: grouped GEMM TFLOP/s count forward and backward's three matmuls, 6 (N k) (2 d_expert) dim; "
          "layer Mtok/s are tokens through forward and backward (weights' gradients included) per second. "
          "Routing: the GEMM rows k distinct experts per token at random; the layer its own freshly "
          "initialised router. Max diff: relative to the loop's largest value.")
    print(f"\nmachine: {machine()}, {args.dtype}, median of {args.rounds} rounds after one warm-up call")


# -----------------------------------------------------------------------------
# Mamba-2: the scan and decoding

SSM_SHAPES = dict(batch=1, heads=64, head_dim=64, state=128, groups=1, chunk=64, dim=2048)   # a 2k-wide layer


def ssm_scan_rows(device, T, s, rounds, sequential_max=2048):
    """The SSD scan alone, forward and backward, for one sequence length: the Triton scan (where
    kernels run) against the chunked PyTorch scan, the reference for the diff, and the sequential
    recurrence (only up to sequential_max tokens: it is a Python loop over T)."""
    b, h, p, n, g, L = (s[k] for k in ("batch", "heads", "head_dim", "state", "groups", "chunk"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, T, h, generator=gen) - 3)             # about softplus(-3) = 0.05
    A = -torch.rand(h, generator=gen).mul(15).add(1)                      # [-16, -1], Mamba-2's init range
    B, C = torch.randn(b, T, g, n, generator=gen), torch.randn(b, T, g, n, generator=gen)
    inputs = [t.to(device).requires_grad_() for t in (x, dt, A, B, C)]
    dy = torch.randn(b, T, h, p, generator=gen).to(device)
    fns = []
    if ssm.kernels_on(inputs[0]):
        fns.append(("ours: Triton scan", lambda *a: ssm.triton_scan(*a, None, None, L)[0]))
    fns.append(("chunked PyTorch", lambda *a: ssm.ssd_chunked(*a, chunk_size=L)[0]))
    if T <= sequential_max:
        fns.append(("sequential recurrence", lambda *a: ssm.ssd_sequential(*a)[0]))
    impls = [(name, fwd_bwd(f, inputs, dy)) for name, f in fns]
    kernel = f"SSD scan, T={T}, batch {b}, {h} heads of {p}, state {n}, chunks of {L}"
    return measure(kernel, impls, device, rounds, b * T, "Mtok/s", reference="chunked PyTorch")


def ssm_decode_rows(device, contexts, s, rounds, steps=20):
    """Decoding one token (batch of s["batch"]) after `context` tokens: a Mamba-2 layer's recurrent
    step against an attention layer of the same width (GQA, 64-wide heads, a quarter as many K/V
    heads, this project's KVCache). (context, Mamba-2 s/token, attention s/token, cache bytes of each)."""
    D, b = s["dim"], s["batch"]
    torch.manual_seed(0)
    mamba = ssm.Mamba2(D, s["heads"], D * 2 // s["heads"], s["state"], s["groups"], chunk_size=s["chunk"]).to(device)
    heads = max(1, D // 64)
    kv_heads, head_dim = max(1, heads // 4), D // heads
    attn = attention.Attention(D, heads, kv_heads, head_dim, impl="sdpa").to(device)
    out = []
    with torch.no_grad():
        for C in contexts:
            cache = ssm.SSMCache(1)
            mamba(torch.randn(b, C, D, device=device), cache=cache, layer=0)
            kv = attention.KVCache(1)
            kv.update(0, *(torch.randn(b, kv_heads, C, head_dim, device=device) for _ in range(2)))
            k0, v0 = kv.k[0], kv.v[0]
            u = torch.randn(b, 1, D, device=device)

            def attn_step():
                kv.k[0], kv.v[0] = k0, v0          # the same context every call
                attn(u, cache=kv)

            t_m = median_time(lambda: [mamba(u, cache=cache, layer=0) for _ in range(steps)], device, rounds) / steps
            t_a = median_time(lambda: [attn_step() for _ in range(steps)], device, rounds) / steps
            out.append((C, t_m, t_a, cache.nbytes(), (k0.numel() + v0.numel()) * k0.element_size()))
    return out


def bench_ssm(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = {key: getattr(args, key) for key in SSM_SHAPES}
    if device.type == "cpu":
        print("bench.py ssm: no GPU, so no Triton scan row (the kernels run only under the interpreter on a "
              "CPU); the PyTorch scans and decoding still run", file=sys.stderr)
    rows = []
    for T in args.lengths:
        rows += ssm_scan_rows(device, T, s, args.rounds)
    print()
    print_kernel_table(rows)
    print("\nrates: tokens through the scan's forward and backward per second; diff relative to the chunked "
          "PyTorch scan's largest value. float32 inputs (the scans compute in float32 whatever the model's dtype).")
    print("\n| context | Mamba-2 step (tok/s) | attention step (tok/s) | Mamba-2 / attention | Mamba-2 cache | KV cache |\n"
          "|---|---|---|---|---|---|")
    for C, t_m, t_a, m_bytes, kv_bytes in ssm_decode_rows(device, args.contexts, s, args.rounds):
        print(f"| {C:,} | {num(s['batch'] / t_m)} | {num(s['batch'] / t_a)} | {t_a / t_m:.2f}x | "
              f"{m_bytes / 2**20:.2f} MiB | {kv_bytes / 2**20:.1f} MiB |")
    print(f"\ndecoding: batch {s['batch']}, one layer of width {s['dim']}, float32, no grad; {device.type}")
    print(f"\nmachine: {machine()}, median of {args.rounds} rounds after one warm-up call")


# -----------------------------------------------------------------------------
# Parallelism: parallel.py's DataParallel and ZeRO against torch's DDP and FSDP2
#
# Every implementation lives in the same W processes, on the same weights and the same batches,
# and they take turns, one step each, round after round: a noisy machine slows them all alike.
# Two measurements per implementation:
# - the step time (forward, backward, clipping, AdamW), the slowest rank's, median over steps;
# - the bytes each rank sends per step, counted by wrapping the Python collectives that the
#   implementation calls, against the volume the analysis predicts. DDP's gradient all-reduce
#   runs inside its C++ reducer, out of Python's reach, so DDP gets the analysis alone; FSDP2
#   calls torch.distributed.all_gather_single / reduce_scatter_single from Python, so its bytes
#   are counted like ours.
# Alongside, a "local" step (the same model and per-rank batch, no wrapper, no communication):
# the compute floor, so that step - floor is what parallelism costs.

# Ring accounting: the bytes one rank sends for a collective on a buffer of n bytes (the whole
# reduced or gathered buffer). A ring all-reduce is a reduce-scatter then an all-gather, each
# passing (W-1)/W of the buffer through every rank; a pipelined broadcast down a chain has every
# rank but the last forward all n bytes, (W-1)/W n per rank on average. parallel.BUS_FACTOR has
# the same factors: nccl-tests' bus bandwidth is exactly these bytes over the time.
RING = {"all_reduce": lambda w: 2 * (w - 1) / w, "all_gather": lambda w: (w - 1) / w,
        "reduce_scatter": lambda w: (w - 1) / w, "broadcast": lambda w: (w - 1) / w}

# implementation -> (the torch baseline its step time is compared with, its label in the table)
PARALLEL_IMPLS = {
    "local": (None, "local step, no communication (compute floor)"),
    "ddp": ("ddp", "torch DistributedDataParallel"),
    "dp": ("ddp", "ours: parallel.DataParallel"),
    "zero1": ("ddp", "ours: parallel.ZeRO(stage=1)"),
    "zero2": ("ddp", "ours: parallel.ZeRO(stage=2)"),
    "fsdp2": ("fsdp2", "torch FSDP2 (fully_shard per block, then the root)"),
    "zero3": ("fsdp2", "ours: parallel.ZeRO(stage=3)"),
}


def _full_buffer(kind, args, kwargs):
    """The tensor whose size a collective is accounted by: the gathered output of an
    all-gather, the input of a reduce-scatter, the tensor itself otherwise. Positional or by
    keyword, as torch's own callers (FSDP2 passes output=, input=) and parallel.py pass them."""
    if kind == "all_gather":
        return args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
    if kind == "reduce_scatter":
        return args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
    return args[0] if args else kwargs["tensor"]


@contextlib.contextmanager
def counted_collectives(world, counts):
    """Inside: every collective that parallel.py or FSDP2 calls from Python adds the bytes this
    rank sends (RING) to counts[kind]. Patched by name where the callers look them up at call
    time: parallel.all_gather_flat / reduce_scatter_flat (bound once at import, so patching
    torch.distributed would miss them) and torch.distributed's all_reduce, broadcast and flat
    gathers and scatters (parallel.dist is torch.distributed). torch's own aliases call each
    other through their module's globals, not these names, so nothing is counted twice.
    Restored on the way out, whatever happens."""
    import torch.distributed as dist

    import parallel

    def wrap(fn, kind):
        def counted(*args, **kwargs):
            t = _full_buffer(kind, args, kwargs)
            counts[kind] = counts.get(kind, 0) + t.numel() * t.element_size() * RING[kind](world)
            return fn(*args, **kwargs)
        return counted

    targets = [(parallel, "all_gather_flat", "all_gather"), (parallel, "reduce_scatter_flat", "reduce_scatter"),
               (dist, "all_reduce", "all_reduce"), (dist, "broadcast", "broadcast"),
               (dist, "all_gather_single", "all_gather"), (dist, "all_gather_into_tensor", "all_gather"),
               (dist, "reduce_scatter_single", "reduce_scatter"), (dist, "reduce_scatter_tensor", "reduce_scatter")]
    saved = []
    try:
        for module, name, kind in targets:
            fn = getattr(module, name, None)
            if fn is not None:
                saved.append((module, name, fn))
                setattr(module, name, wrap(fn, kind))
        yield counts
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def analytical_bytes(impl, P, P_root, world):
    """(bytes each rank sends per step, the formula) for parameter bytes P, of which P_root
    lie outside the blocks. DP: one all-reduce of the gradients. ZeRO-1/2 as the paper has them:
    a reduce-scatter of the gradients and an all-gather of the updated weights, the two halves of
    that all-reduce. ZeRO-3 / FSDP: an all-gather of the weights for the forward, another for the
    backward, a reduce-scatter of the gradients: 3(W-1)/W P in the textbook, less the root's
    second gather here, since both engines keep the root (embedding, final norm, tied head)
    gathered from its forward to its backward."""
    f = (world - 1) / world
    if impl == "local":
        return 0.0, "none"
    if impl in ("zero3", "fsdp2"):
        return f * (3 * P - P_root), "(W-1)/W (3P - P_root)"
    return 2 * f * P, "2(W-1)/W P"


def _tensor_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`, a DTensor counted by its local shard:
    what this rank really holds (a view and its base count once, a freed storage 0)."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def _build_parallel(impl, config, device, bucket_mb):
    """A fresh model (seed 0, so the same weights on every rank and in every implementation),
    wrapped by `impl`, its AdamW, and the clipping that fits its layout."""
    import inspect

    import torch.distributed as dist

    import parallel

    torch.manual_seed(0)
    m = model.Model(config).to(device)
    net, clip = m, torch.nn.utils.clip_grad_norm_   # replicated gradients: the local norm is the global one
    if impl == "dp":
        net = parallel.DataParallel(m, bucket_mb=bucket_mb)
    elif impl == "ddp":
        # Buffers not re-sent before every forward: the model's one buffer (RoPE's inv_freq)
        # never changes, and DataParallel does not re-send them either; like against like.
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers.)
        DDP = torch.nn.parallel.DistributedDataParallel
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        net = DDP(m, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb,
                  **{quiet: False})
    elif impl.startswith("zero"):
        net = parallel.ZeRO(m, stage=int(impl[-1]))
        clip = parallel.clip_grad_norm_          # each rank holds pieces: one all-reduce of the squares
    elif impl == "fsdp2":
        parallel.torch_parallelize(m, parallel.make_mesh(device_type=device.type), fsdp=True)
        # torch's clip_grad_norm_ takes DTensor gradients on one mesh: the norm is a DTensor
        # completed by a functional all-reduce (4 bytes, not through the names we count)
    elif impl != "local":
        raise ValueError(f"unknown implementation {impl!r}")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95))   # after wrapping: ZeRO's shards
    if dist.get_rank() == 0:
        print(f"  built {impl}", file=sys.stderr, flush=True)
    return dict(net=net, model=m, opt=opt, clip=clip)


def _memory(impl, run):
    """(params, grads, optimizer state) bytes this rank holds, read after the optimizer step and
    before zero_grad. Ours under ZeRO: ZeRO.memory, with the gradients at their peak (stage 1 holds
    full gradients until the end of the backward; stages 2 and 3 a unit's while it is reduced).
    The others: the tensors' storages, gradients as they are after the backward (for FSDP2 the
    reduced shards: its transient unsharded gradients are not seen here)."""
    m, opt = run["model"], run["opt"]
    if impl.startswith("zero"):
        mem = run["net"].memory(opt)
        return mem["params"], max(mem["peak_grads"], mem["grads"]), mem["optimizer"], mem["peak_gathered"]
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return (_tensor_bytes(m.parameters()), _tensor_bytes(p.grad for p in m.parameters()), _tensor_bytes(state), None)


def _parallel_worker(rank, world, store, spec, out):
    """One rank of `bench.py parallel`: build every implementation, then rounds of one step each
    (warm-up rounds first), the timed rounds counting their collectives. Saves its results to
    out.<rank>."""
    import torch.distributed as dist

    cuda = spec["device"] == "cuda"
    # W processes share the cores: one thread each on this 2-core machine, or they fight over them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        config = model.preset(spec["preset"], **spec["overrides"])
        g = torch.Generator().manual_seed(rank)   # each rank its own rows, as under data parallelism
        x = torch.randint(0, config.vocab_size, (spec["rows"], spec["seq_len"] + 1), generator=g).to(device)
        autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        runs = {impl: _build_parallel(impl, config, device, spec["bucket_mb"]) for impl in spec["impls"]}
        times = {impl: [] for impl in runs}
        counts = {impl: {} for impl in runs}
        memory, losses = {}, {}
        rounds = spec["warmup"] + spec["steps"]
        for r in range(rounds):
            for impl, run in runs.items():
                timed_round = r >= spec["warmup"]
                dist.barrier()                     # every rank starts the step together
                sync(device)
                t0 = time.perf_counter()
                with counted_collectives(world, counts[impl]) if timed_round else contextlib.nullcontext():
                    with autocast:
                        _, loss, _ = run["net"](x[:, :-1], labels=x[:, 1:])
                    loss.backward()
                    run["clip"](run["model"].parameters(), 1.0)
                    run["opt"].step()
                sync(device)
                dt = time.perf_counter() - t0
                if r == rounds - 1:                # after the step, before zero_grad: all three alive
                    memory[impl] = _memory(impl, run)
                    losses[impl] = loss.item()
                run["opt"].zero_grad(set_to_none=True)
                if timed_round:
                    times[impl].append(dt)
        # A step is as slow as its slowest rank: the max over ranks of each step, then the median.
        t = torch.tensor([times[impl] for impl in runs], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        plain = model.Model(config)
        P = sum(p.numel() * p.element_size() for p in plain.parameters())
        P_root = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if not n.startswith("layers."))
        result = {"world": world, "backend": dist.get_backend(), "device": str(device), "P": P, "P_root": P_root,
                  "n_params": plain.num_params()[0], "threads": torch.get_num_threads(), "impls": {}}
        for i, impl in enumerate(runs):
            result["impls"][impl] = {
                "seconds": statistics.median(t[i].tolist()), "times": t[i].tolist(), "memory": memory[impl],
                "loss": losses[impl], "counted": {k: v / spec["steps"] for k, v in counts[impl].items()}}
        torch.save(result, f"{out}.{rank}")
        # every rank done before any tears gloo down: a rank leaving while its peer's last
        # exchange was in flight aborted once in a CI run ("terminate called without an
        # active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def parallel_results(world=2, impls=tuple(PARALLEL_IMPLS), preset="tiny", overrides=None, rows=8, seq_len=256,
                     steps=5, warmup=2, device="cpu", bucket_mb=25.0):
    """Spawn `world` processes (gloo on the CPU, NCCL with device="cuda"), run the comparison,
    return each rank's results: a list of dicts, rank by rank."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    if device == "cuda" and world > torch.cuda.device_count():
        raise SystemExit(f"bench.py parallel: --device cuda --world {world} needs {world} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    if warmup < 1:
        # ZeRO stages 1-2 bring in the other ranks' updated rows at the next forward: without an
        # update before the counted steps, the first one would count no all-gather
        raise ValueError("bench.py parallel: at least one warm-up step (steady-state collectives)")
    overrides = dict(overrides or {})
    overrides.setdefault("max_seq_len", max(seq_len, model.PRESETS[preset].get("max_seq_len", 0)))
    if "n_layer" in overrides:   # fewer layers than the preset: drop the NoPE layers that no longer exist
        overrides.setdefault("nope_layers", tuple(i for i in model.PRESETS[preset].get("nope_layers", ())
                                                  if i < overrides["n_layer"]))
    spec = dict(impls=list(impls), preset=preset, overrides=overrides, rows=rows, seq_len=seq_len,
                steps=steps, warmup=warmup, device=device, bucket_mb=bucket_mb)
    tmp = tempfile.mkdtemp(prefix="bench-parallel-")
    try:
        mp.spawn(_parallel_worker, args=(world, os.path.join(tmp, "store"), spec, os.path.join(tmp, "out")),
                 nprocs=world)
        return [torch.load(os.path.join(tmp, f"out.{r}")) for r in range(world)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_parallel(args):
    overrides = {k: getattr(args, k) for k in ("vocab_size", "n_layer", "dim") if getattr(args, k) is not None}
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.py parallel: --device cuda, but there is no GPU here; running gloo on the CPU", file=sys.stderr)
        device = "cpu"
    every = parallel_results(args.world, args.impls, args.preset, overrides, args.batch_size, args.seq_len,
                             args.steps, args.warmup, device, args.bucket_mb)
    res, W = every[0], args.world
    for r, other in enumerate(every[1:], 1):       # ring accounting is symmetric: every rank sends alike
        for impl in res["impls"]:
            if other["impls"][impl]["counted"] != res["impls"][impl]["counted"]:
                print(f"note: rank {r} counted {other['impls'][impl]['counted']} for {impl}, rank 0 "
                      f"{res['impls'][impl]['counted']}", file=sys.stderr)
    P, P_root = res["P"], res["P_root"]
    mib = 2 ** 20
    cuda = device == "cuda"
    print(f"\n{W} processes, {res['backend']} on {'GPUs' if cuda else 'this CPU'} "
          f"({res['threads']} thread{'s' if res['threads'] > 1 else ''} each); preset {args.preset}"
          f"{' ' + str(overrides) if overrides else ''}: {res['n_params'] / 1e6:.1f}M parameters, "
          f"P = {P / mib:.1f} MiB of which P_root = {P_root / mib:.1f} MiB outside the blocks; "
          f"{args.batch_size} x {args.seq_len} tokens per rank per step, {'bf16 autocast' if cuda else 'float32'}\n")
    short = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "broadcast": "BC"}
    print("| implementation | step (ms): median (min-max) | vs torch baseline | per-rank memory P + G + O (MiB) | "
          "sent per rank per step, counted (MiB) | analytical (MiB) | counted / analytical |")
    print("|---|---|---|---|---|---|---|")
    for impl, r in res["impls"].items():
        base, label = PARALLEL_IMPLS[impl]
        if base is None or base not in res["impls"]:
            ratio = "n/a"
        elif base == impl:
            ratio = "1.00x (baseline)"
        else:
            ratio = f"{r['seconds'] / res['impls'][base]['seconds']:.2f}x vs {base.upper()}"
        p, g, o, _ = r["memory"]
        want, formula = analytical_bytes(impl, P, P_root, W)
        if impl == "ddp":
            counted, vs = "n/a (C++ reducer)", "n/a"
        else:
            total = sum(r["counted"].values())
            parts = ", ".join(f"{short[k]} {v / mib:.2f}" for k, v in sorted(r["counted"].items()))
            counted = f"{total / mib:.2f}" + (f" ({parts})" if parts else "")
            vs = f"{total / want:.3f}" if want else "n/a"
        spread = f"{min(r['times']) * 1e3:,.0f}-{max(r['times']) * 1e3:,.0f}"
        print(f"| {label} | {r['seconds'] * 1e3:,.0f} ({spread}) | {ratio} | {p / mib:.1f} + {g / mib:.1f} + {o / mib:.1f} = "
              f"{(p + g + o) / mib:.1f} | {counted} | {want / mib:.2f} = {formula} | {vs} |")
    print("\nstep: forward, backward, clip to norm 1, AdamW; the slowest rank's time, median of "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up. Counted: ring accounting (AR all-reduce "
          "2(W-1)/W n, AG all-gather and RS reduce-scatter (W-1)/W n of the full buffer n, BC broadcast "
          "(W-1)/W n) of the collectives called from Python; ours include the clipping norm's 4-byte "
          "all-reduce, FSDP2's norm goes through a functional collective that is not counted. Memory: after "
          "the optimizer step; ours under ZeRO with the gradients at their peak (ZeRO.memory), the others "
          "the .grad tensors after the backward; DP/DDP's bucket buffers not included.")
    if "zero3" in res["impls"]:
        print(f"ZeRO-3 held at most {res['impls']['zero3']['memory'][3] / mib:.1f} MiB of full weights at once.")
    print(f"\nmachine: {machine()}")


# -----------------------------------------------------------------------------
# Tuning the kernels' launch settings

def _settings(keys, rows):
    return [dict(zip(keys, row)) for row in rows]


# Candidates per kernel, tried one kernel at a time (each with the best found for the ones
# before it). Flash: BLOCK_M queries x BLOCK_N keys (dK/dV: BLOCK_N keys per program, BLOCK_M
# queries per step), warps, stages.
FLASH_CANDIDATES = _settings(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3),
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2),
    (64, 32, 8, 1), (32, 64, 8, 1)])
GG_FWD_CANDIDATES = _settings(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), [
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (128, 128, 32, 8, 4), (64, 256, 64, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2)])
GG_DW_CANDIDATES = _settings(("BLOCK_M", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages"), [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3),
    (64, 64, 64, 4, 3), (64, 32, 64, 4, 3), (64, 64, 32, 4, 2)])
# The SSD scan: tokens per tile inside a chunk (the chunk is 64 by default, so 16-64).
SSD_TILE_CANDIDATES = _settings(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), [
    (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 8, 1), (64, 16, 4, 2),
    (16, 64, 4, 1), (32, 16, 4, 3), (64, 32, 8, 3), (16, 16, 4, 2)])
SSD_STATES_CANDIDATES = _settings(("BLOCK_L", "num_warps", "num_stages"), [
    (16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2), (16, 8, 3), (32, 4, 1), (64, 4, 1)])
SSD_PASSING_CANDIDATES = _settings(("BLOCK", "num_warps", "num_stages"), [
    (128, 4, 1), (256, 4, 1), (512, 4, 1), (1024, 8, 1), (2048, 8, 1)])


def _best(name, candidates, set_launch, fn, check=None):
    """Time fn() (median ms, CUDA events) under each candidate; print each; return the fastest.
    A candidate this GPU cannot run (too much shared memory, say), here or in check(), is
    reported and skipped."""
    import triton.testing

    best = None
    for c in candidates:
        set_launch(c)
        try:
            if check is not None:
                check()
            fn()   # compile outside the timing
            ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        except Exception as e:   # Triton's OutOfResources, mostly
            print(f"  {name} {c}: {type(e).__name__}", flush=True)
            continue
        print(f"  {name} {c}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[0]:
            best = (ms, c)
    if best is None:
        raise SystemExit(f"bench.py tune: no candidate ran for {name}")
    set_launch(best[1])
    return best[1]


def tune_flash(size, B, H, Hkv, T, D, DV, dtype, also=None, device="cuda"):
    """attention.FLASH_TILES[size], kernel by kernel, on a causal (B, H, T, D) problem. also:
    another dtype of the same class (the "big" class holds float32) that every candidate must
    run in as well, forward and backward, on a small problem."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(device, dtype).requires_grad_()
               for h, d in ((H, D), (Hkv, D), (Hkv, DV)))
    do = torch.randn(B, H, T, DV, generator=g).to(device, dtype)
    check = None
    if also is not None:
        small = [t[:1, :, :256].detach().to(also).requires_grad_() for t in (q, k, v)]

        def check():
            torch.autograd.grad(attention.flash_attention(*small), small, torch.ones_like(small[0][..., :DV]))
    tiles = attention.FLASH_TILES[size]
    print(f"flash attention, {size} ({B}x{H}/{Hkv}x{T}x{D}/{DV}, {dtype}):", flush=True)

    def setter(kernel):
        return lambda c: tiles.__setitem__(kernel, c)

    def forward_backward():   # the forward's settings are fixed by then: differences are the kernel's
        return torch.autograd.grad(attention.flash_attention(q, k, v), (q, k, v), do)

    _best("fwd", FLASH_CANDIDATES, setter("fwd"), lambda: attention.flash_attention(q, k, v), check)
    for kernel in ("dq", "dkdv"):
        _best(kernel, FLASH_CANDIDATES, setter(kernel), forward_backward, check)
    return dict(tiles)


def tune_grouped_mm(size, n_tokens, n_experts, top_k, dim, d_expert, dtype, device="cuda"):
    """moe.GG_TILES[size] on the gate-and-up projection of random top-k routing: the forward
    kernel (which dx reuses) on the forward alone, the dW kernel on a backward that wants dW only."""
    g = torch.Generator().manual_seed(0)
    token, offsets = random_routing(n_tokens, n_experts, top_k, g)
    x = torch.randn(n_tokens, dim, generator=g)[token].to(device, dtype)
    w = (torch.randn(n_experts, 2 * d_expert, dim, generator=g) / dim ** 0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(n_tokens * top_k, 2 * d_expert, generator=g).to(device, dtype)
    offsets = offsets.to(device)
    tiles = moe.GG_TILES[size]
    print(f"grouped GEMM, {size} ({n_experts} experts top-{top_k}, ({n_tokens * top_k}, {dim}) x "
          f"({n_experts}, {2 * d_expert}, {dim}), {dtype}):", flush=True)
    _best("fwd", GG_FWD_CANDIDATES, lambda c: tiles.__setitem__("fwd", c),
          lambda: moe.GroupedMM.apply(x, w, offsets))
    y = moe.GroupedMM.apply(x, w, offsets)
    _best("dw", GG_DW_CANDIDATES, lambda c: tiles.__setitem__("dw", c),
          lambda: torch.autograd.grad(y, w, dy, retain_graph=True))
    return dict(tiles)


def tune_ssd(b, T, heads, head_dim, state, groups, chunk, device="cuda"):
    """ssm.SSD_TILES, kernel by kernel: the three forward kernels on the forward alone, the
    backward kernels on forward + backward (the forward's settings are fixed by then). The scan
    runs in float32 whatever the model's dtype, so one class of settings serves all."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, heads, head_dim, generator=g).to(device).requires_grad_()
    dt = F.softplus(torch.randn(b, T, heads, generator=g) - 3).to(device).requires_grad_()
    A = -torch.rand(heads, generator=g).mul(15).add(1).to(device).requires_grad_()
    B, C = (torch.randn(b, T, groups, state, generator=g).to(device).requires_grad_() for _ in range(2))
    dy = torch.randn(b, T, heads, head_dim, generator=g).to(device)
    ins = (x, dt, A, B, C)
    tiles = ssm.SSD_TILES
    print(f"SSD scan ({b}x{T}, {heads} heads of {head_dim}, state {state}, chunks of {chunk}):", flush=True)

    def forward():
        return ssm.triton_scan(*ins, None, None, chunk)[0]

    def forward_backward():
        return torch.autograd.grad(forward(), ins, dy)

    def setter(kernel):
        return lambda c: tiles.__setitem__(kernel, c)

    _best("states", SSD_STATES_CANDIDATES, setter("states"), forward)
    _best("passing", SSD_PASSING_CANDIDATES, setter("passing"), forward)
    _best("scan", SSD_TILE_CANDIDATES, setter("scan"), forward)
    _best("states_bwd", SSD_STATES_CANDIDATES, setter("states_bwd"), forward_backward)
    for kernel in ("scan_bwd_dc", "scan_bwd_dx"):
        _best(kernel, SSD_TILE_CANDIDATES, setter(kernel), forward_backward)
    return dict(tiles)


def bench_sft_packing(args):
    """The same conversations, once through, packed and padded, each from the same weights
    with the same optimizer and learning rate: how long, how full the rows, and the held-out
    assistant-token loss after."""
    import eval as eval_py
    import sft
    import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = data.load_tokenizer(args.tokenizer or train.init_tokenizer(args.init) or "data/builtin/tok.json")
    with open(os.path.join(args.init, "trainer.json")) as f:
        config = model.ModelConfig(**json.load(f)["model_config"])
    rows = []
    for packing in (True, False):
        stage = sft.SFTStage(tok, args.seq_len, args.batch_size, packing=packing, seed=0, log=lambda *a: None)
        stage.train = stage.train[:args.conversations]     # the same conversations in both runs
        stage.rows = stage.group(0)
        m = model.Model(config).to(device)
        train.load_checkpoint(args.init, m)
        opt = torch.optim.AdamW(train.param_groups(m, 0.1), lr=args.lr, betas=(0.9, 0.95))
        real = trained = steps = 0
        t0 = time.perf_counter()
        while stage.epoch == 0:
            batch = {k: v.to(device) for k, v in stage.next_batch().items()}
            if stage.epoch:       # next_batch started the next epoch: this one is done
                break
            _, loss, _ = m(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            real += sum(len(stage.train[i][0]) for row in stage.rows[stage.cursor - args.batch_size:stage.cursor]
                        for i in row)
            trained += (batch["labels"] != -100).sum().item()
            steps += 1
        sync(device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            val = eval_py.validation(m.eval(), stage.val_batches(device, 10 ** 6),
                                     eval_py.token_bytes(tok, config.padded_vocab), stage.names)["val_loss"]
        rows.append((("packed" if packing else "padded"), steps, seconds, len(stage.train) / seconds,
                     real / (steps * args.batch_size * args.seq_len), trained / steps, val))
        print(f"{rows[-1][0]}: {steps} steps, {seconds:.1f} s", flush=True)
    print(f"\n{len(stage.train)} conversations once through, batch {args.batch_size} x {args.seq_len}, AdamW lr "
          f"{args.lr}, from {args.init}\n")
    print("| rows | steps | seconds | conversations/s | real tokens per row | trained tokens/step | held-out loss |")
    print("|---|---|---|---|---|---|---|")
    for name, steps, seconds, cps, fill, per_step, val in rows:
        print(f"| {name} | {steps} | {seconds:.1f} | {cps:.1f} | {fill:.0%} | {per_step:,.0f} | "
              f"{val['value']:.3f} ({val['low']:.3f}-{val['high']:.3f}) |")
    print(f"\npacked / padded: {rows[0][3] / rows[1][3]:.2f}x the conversations per second")
    print(f"machine: {machine()}, {device}, float32")


def bench_tune(args):
    if not torch.cuda.is_available() or not attention.kernels_on(torch.empty(0, device="cuda")):
        print("bench.py tune: tuning needs a CUDA GPU with Triton (and no NANOPLAYBOOK_KERNELS=0)", file=sys.stderr)
        raise SystemExit(2)
    found = {}
    if "flash" in args.kernels:
        found["FLASH_TILES"] = {
            "small": tune_flash("small", 8, 16, 4, 2048, 128, 128, torch.bfloat16),
            "big": tune_flash("big", 4, 16, 16, 2048, 192, 128, torch.bfloat16, also=torch.float32)}
    if "grouped_mm" in args.kernels:
        found["GG_TILES"] = {"small": tune_grouped_mm("small", 16384, 64, 8, 2048, 768, torch.bfloat16),
                             "big": tune_grouped_mm("big", 4096, 8, 2, 1024, 512, torch.float32)}
    if "ssd" in args.kernels:
        found["SSD_TILES"] = tune_ssd(2, 8192, 64, 64, 128, 1, 64)
    print("\nthe fastest settings (attention.FLASH_TILES, moe.GG_TILES, ssm.SSD_TILES):")
    print(json.dumps(found, indent=1))
    print(f"\nmachine: {machine()}, median ms of triton.testing.do_bench")



def bench_sampling(args):
    """model.sample draws one uniform number per row and finds it in the row's cumulative
    probabilities; torch.multinomial, the usual call, draws one per vocabulary entry. Both
    exact samplers of the same distribution (the test checks the frequencies): the ratio is
    what the rollouts and the pass@k evaluation pay per generated token."""
    device = torch.device(args.device)
    print(f"# sampling, {machine()}")
    print("| rows x vocab | torch.multinomial | model.sample (inverse CDF) | speed-up |\n|---|---|---|---|")
    for rows in (64, 512):
        logits = torch.randn(rows, args.vocab, device=device) * 3
        g = torch.Generator(device=device).manual_seed(0)
        multi = median_time(lambda: torch.multinomial(logits.softmax(-1), 1, generator=g), device, 20)
        ours = median_time(lambda: model.sample(logits, 1.0, generator=g), device, 20)
        print(f"| {rows} x {args.vocab} | {multi * 1e3:.2f} ms | {ours * 1e3:.2f} ms | {multi / ours:.1f}x |")
    torch.manual_seed(0)
    net = model.Model(model.ModelConfig(vocab_size=args.vocab, n_layer=4, dim=128, n_head=4, n_kv_head=2,
                                        mlp_dim=512, max_seq_len=256)).to(device).eval()
    prompts = [[1 + (i * 7 + j) % 100 for j in range(40)] for i in range(512)]
    original = model.sample
    times = {}
    for name, fn in (("multinomial", lambda lg, t, k, p, gen: torch.multinomial(lg.float().softmax(-1), 1,
                                                                                generator=gen).squeeze(-1)),
                     ("inverse CDF", original)):
        model.sample = fn
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            times[name] = median_time(lambda: net.generate(prompts, 24, temperature=1.0, generator=g), device, 3)
    model.sample = original
    print(f"\ngenerate(): 512 prompts of 40 tokens, 24 new tokens, the 1.5M-parameter pipeline shape (4 layers, dim "
          f"128): {times['multinomial']:.2f} s with torch.multinomial, {times['inverse CDF']:.2f} s with model.sample "
          f"({times['multinomial'] / times['inverse CDF']:.1f}x)")


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
    k = sub.add_parser("kernels", help="Triton kernels vs torch, forward+backward (CUDA)")
    k.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    k.add_argument("--rounds", type=int, default=20)
    k.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    for key, value in KERNEL_SHAPES.items():
        k.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    tr = sub.add_parser("train", help="training tokens/s and MFU")
    tr.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(model.PRESETS))
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--warmup", type=int, default=3)
    tr.add_argument("--compile", action="store_true")
    tr.add_argument("--kernels", default="both", choices=["on", "off", "both"],
                    help="Triton kernels on, off (PyTorch paths), or both side by side (CUDA; one run on CPU)")
    mo = sub.add_parser("moe", help="grouped GEMM vs per-expert loop; MoE layer vs dense (CUDA)")
    mo.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    mo.add_argument("--rounds", type=int, default=20)
    for key, value in MOE_SHAPES.items():
        mo.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    ss = sub.add_parser("ssm", help="SSD scan: Triton vs chunked PyTorch vs sequential; decode vs attention")
    ss.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ss.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ss.add_argument("--rounds", type=int, default=10)
    for key, value in SSM_SHAPES.items():
        ss.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    pa = sub.add_parser("parallel", help="DataParallel / ZeRO 1-3 vs DDP / FSDP2 on W processes: step time, "
                        "memory, bytes sent per rank against the analysis")
    pa.add_argument("--world", type=int, default=2, help="processes (gloo on the CPU; NCCL with --device cuda)")
    pa.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pa.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    pa.add_argument("--vocab-size", type=int, default=None, help="override the preset's")
    pa.add_argument("--n-layer", type=int, default=None, help="override the preset's")
    pa.add_argument("--dim", type=int, default=None, help="override the preset's (keep it divisible by n_head)")
    pa.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    pa.add_argument("--seq-len", type=int, default=256)
    pa.add_argument("--steps", type=int, default=5)
    pa.add_argument("--warmup", type=int, default=2)
    pa.add_argument("--bucket-mb", type=float, default=25.0, help="DataParallel's and DDP's gradient buckets")
    pa.add_argument("--impls", nargs="+", default=list(PARALLEL_IMPLS), choices=list(PARALLEL_IMPLS))
    sp = sub.add_parser("sft_packing", help="SFT packed vs padded: speed and held-out loss on the same conversations")
    sp.add_argument("--init", required=True, help="a train.py checkpoint to fine-tune (a pretrained one)")
    sp.add_argument("--tokenizer", default="", help="default: the checkpoint run's")
    sp.add_argument("--conversations", type=int, default=1500)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--seq-len", type=int, default=256)
    sp.add_argument("--lr", type=float, default=1e-3)
    sa = sub.add_parser("sampling", help="model.sample's inverse-CDF draw vs torch.multinomial")
    sa.add_argument("--vocab", type=int, default=4096)
    sa.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    tu = sub.add_parser("tune", help="search the kernels' tile sizes, warps and stages (CUDA)")
    tu.add_argument("--kernels", nargs="+", default=["flash", "grouped_mm", "ssd"],
                    choices=["flash", "grouped_mm", "ssd"])
    args = ap.parse_args()
    {"tokenizer": bench_tokenizer, "data": bench_data, "model": bench_model, "kernels": bench_kernels,
     "train": bench_train, "moe": bench_moe, "ssm": bench_ssm, "parallel": bench_parallel,
     "tune": bench_tune, "sft_packing": bench_sft_packing,
     "sampling": bench_sampling}[args.cmd](args)


if __name__ == "__main__":
    main()
