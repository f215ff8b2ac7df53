"""
data.py: the data pipeline. Sources, tokenizing into shards, packing with document
boundaries, shuffling, mixtures and curricula, rank sharding, a resumable loader, and a
built-in corpus that needs no download.

The concept. Pretraining reads a few sources (web text, code, math...), each a pile of
documents. Offline, `prepare` tokenizes every document once into flat binary shards of
token ids, with an index of where each document starts, and a manifest that records what
was made from what. Online, the `Loader` cuts each source's token stream into fixed
windows of `seq_len` tokens (packing: no padding, documents run on across windows),
takes windows from the sources in the proportions of a mixture that may change as
training goes on (a curriculum), in a shuffled order, and hands each rank its disjoint
part of every global batch. A window often holds the end of one document and the start of
the next: the labels never ask the model to predict across that boundary, and
`position_ids` restart at 0 where a document starts, which model.py turns into
intra-document attention masking and restarted RoPE positions.

The playbook's lessons:
- "Data curation is the main driver of your model's actual quality": the mixture, not the
  architecture, decides most of what a small model can do. Mixtures are weights over
  sources, and they evolve: SmolLM3 trained in three stages, raising code and math and
  adding higher-quality data as the learning rate decayed (`SMOLLM3_SCHEDULE` below).
- From the training marathon: "noisy, spiky loss? your data shuffling is probably broken".
  SmolLM3's loader once read sequences in document order, so the model saw one kind of text
  for thousands of steps. Here windows come in a seeded global permutation, fresh each
  epoch, and the mixture is interleaved deterministically: every stretch of batches has
  the mixture's proportions, not just the average over the run.
- Repeated data: a small source is cheap to up-weight, but every extra epoch of it is worth
  less (Muennighoff et al. find up to ~4 epochs nearly as good as fresh data). The loader
  reports how many epochs of each source have been consumed.
- Restarts happen (node failures, loss spikes): `state_dict()` makes the loader resume at
  exactly the next batch, and W ranks together read exactly what one process would.

Papers: Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model
Pretraining" (mixture weights from per-domain loss); Albalak et al. 2023, "Efficient
Online Data Mixing" (adapting the mixture during training); Muennighoff et al. 2023,
"Scaling Data-Constrained Language Models" (repeating epochs); Krell et al. 2021,
"Efficient Sequence Packing without Cross-contamination" and Zhao et al. 2024, "Analysing
the Impact of Sequence Composition on Language Model Pre-Training" (intra-document masking).

Run:
    python data.py                                         # demo: a small built-in corpus, seconds
    python data.py prepare --tokenizer tok.json --out data/ [--sources code prose math DIR web=PATH ...]
    python data.py show data/ --tokenizer tok.json         # what a prepared directory holds, decoded

On disk (`prepare`): DIR/manifest.json, and per source DIR/<source>/<unit>-<split>.bin (the
token ids of one unit of work, uint16 when the vocabulary fits, else uint32, no header) and
<unit>-<split>.docs.npy (int64 offsets: document d is tokens[docs[d]:docs[d+1]]). Every file
is written under a temporary name and renamed; the manifest, written last, is the only thing
a Loader trusts.
"""

import argparse
import ast
import glob
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import zlib

import numpy as np
import torch

BUILTIN_SOURCES = ("code", "prose", "math")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
FORMAT = 1             # bumped whenever the on-disk layout changes
CORPUS_VERSION = 2     # bumped whenever the built-in corpus's text changes
IGNORE_INDEX = -100    # the label of a position where no loss is taken
UNIT_BYTES = 4 << 20   # input files are grouped into units of work of about this size
MATH_UNIT = 4000       # math documents per unit of work
MATH_DOCUMENTS = 12000 # the built-in math source's size (about 3 MB of text)
VAL_FRACTION = 0.02    # the share of documents prepare holds out (by a hash of their text)

# SmolLM3's pretraining curriculum (11.1T tokens, from the SmolLM3 blog post): web, code and
# math in three stages; code and math rise while the learning rate decays. Stage ends are
# fractions of the run; `schedule(SMOLLM3_SCHEDULE, total_tokens, web="prose")` scales it to
# any budget and renames "web" to the built-in corpus's English source.
SMOLLM3_SCHEDULE = [
    (8.0 / 11.1, {"web": 0.85, "code": 0.12, "math": 0.03}),   # stable phase, 0 -> 8T
    (10.0 / 11.1, {"web": 0.75, "code": 0.15, "math": 0.10}),  # 8T -> 10T: more code and math
    (None, {"web": 0.63, "code": 0.24, "math": 0.13}),         # 10T -> 11.1T: the decay phase
]


def schedule(stages, total_tokens, **rename):
    """Scale a schedule whose stage ends are fractions of the run to `total_tokens`, and
    rename sources (`web="prose"`). The result is what `Loader(weights=...)` takes."""
    out = []
    for until, weights in stages:
        out.append((None if until is None else int(until * total_tokens),
                    {rename.get(k, k): w for k, w in weights.items()}))
    return out


# -----------------------------------------------------------------------------
# Sources: what documents are, where they come from

class Source:
    """A named pile of documents: one of the built-in sources, or files (.txt: one document
    per file; .jsonl / .jsonl.gz: one JSON object per line; .parquet: one row per document)."""

    def __init__(self, name, kind, paths=(), spec=None):
        self.name, self.kind, self.paths, self.spec = name, kind, list(paths), spec or name

    def __repr__(self):
        return f"Source({self.name!r}, {self.kind!r}, {len(self.paths)} files)"


def resolve_sources(specs):
    """Turn command-line style specs into Sources. A spec is a built-in name (code, prose,
    math), a file, a directory (every .txt/.jsonl/.jsonl.gz/.parquet under it), or a glob,
    optionally named as `name=spec`; otherwise a file source is named after its file or
    directory."""
    sources = []
    for spec in specs:
        if isinstance(spec, Source):
            sources.append(spec)
            continue
        name, target = None, os.fspath(spec)
        if "=" in target and not os.path.exists(target):
            name, target = target.split("=", 1)
        if target in BUILTIN_SOURCES:
            sources.append(Source(name or target, target, spec=spec))
            continue
        if os.path.isdir(target):
            paths = sorted(os.path.join(d, f) for d, _, files in os.walk(target) for f in files
                           if f.endswith(SUFFIXES))
            default_name = os.path.basename(os.path.normpath(target))
        elif os.path.isfile(target):
            if not target.endswith(SUFFIXES):
                raise ValueError(f"{target}: unsupported file type; data.py reads {', '.join(SUFFIXES)}")
            paths, default_name = [target], os.path.basename(target)
        elif glob.has_magic(target):
            paths = sorted(p for p in glob.glob(target, recursive=True) if p.endswith(SUFFIXES))
            default_name = os.path.basename(os.path.dirname(target)) or "files"
        else:
            raise ValueError(f"unknown source {target!r}: not a built-in source "
                             f"({', '.join(BUILTIN_SOURCES)}) and no such file or directory")
        if not paths:
            raise ValueError(f"source {spec!r} has no {', '.join(SUFFIXES)} files")
        for suffix in SUFFIXES:
            default_name = default_name.removesuffix(suffix)
        sources.append(Source(name or default_name, "files", paths, spec=spec))
    names = [s.name for s in sources]
    for s in sources:
        if names.count(s.name) > 1:
            raise ValueError(f"two sources are named {s.name!r}; name them apart with name=PATH")
        if not s.name or not all(c.isalnum() or c in "_-." for c in s.name):
            raise ValueError(f"source name {s.name!r} (from {s.spec!r}): use letters, digits, _ - .")
    return sources


def _decode(raw, counts):
    """UTF-8 bytes to text. Invalid bytes become U+FFFD and the document is counted, so a
    corrupt file shows up in the manifest instead of crashing the run or vanishing."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8"] += 1
        return raw.decode("utf-8", errors="replace")


def _bad(counts, skip_bad_lines, where, message):
    if not skip_bad_lines:
        raise ValueError(f"{where}: {message} (pass skip_bad_lines=True / --skip-bad-lines to skip "
                         "such lines; they are counted in the manifest)")
    counts["bad_lines"] += 1


def read_file(path, counts, text_field="text", skip_bad_lines=False):
    """Yield the documents of one file. `counts` collects what was replaced or skipped."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            yield _decode(f.read(), counts)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(_decode(line, counts))
                except json.JSONDecodeError as e:
                    _bad(counts, skip_bad_lines, f"{path}:{lineno}", f"not valid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict) or text_field not in row:
                    fields = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                    _bad(counts, skip_bad_lines, f"{path}:{lineno}",
                         f"no field {text_field!r} (it has {fields}); choose the field with --text-field")
                    continue
                if not isinstance(row[text_field], str):
                    _bad(counts, skip_bad_lines, f"{path}:{lineno}",
                         f"field {text_field!r} is {type(row[text_field]).__name__}, not a string")
                    continue
                yield row[text_field]
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (it has {', '.join(pf.schema_arrow.names)}); "
                             "choose the column with --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    _bad(counts, skip_bad_lines, f"{path}: row {row}", f"column {text_field!r} is {text!r}")
                    continue
                yield text
    else:
        raise ValueError(f"{path}: unsupported file type; data.py reads {', '.join(SUFFIXES)}")


# -----------------------------------------------------------------------------
# The built-in corpus: code, prose and math from what every Python installation has

def stdlib_files():
    """The standard library's own .py files, sorted (tests, idlelib and site-packages left
    out): about 12 MB of real, well-written code."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        paths.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    return paths


def docstrings(source):
    """The docstrings of a module's text (module, classes, functions), as one document of
    English prose; "" when it has none or does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = (n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return "\n\n".join(d for d in map(ast.get_docstring, nodes) if d and len(d) > 40)


def pydoc_topics():
    """The reference topics `help()` shows (`pydoc_data`, ~0.5 MB of English): one
    document each. Some distributions leave pydoc_data out; then there are none."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k] for k in sorted(topics)]


# Math: generated documents. The built-in math is arithmetic.py's (every digit the model reads at
# a fixed offset from where it writes, the layout every post-training stage uses); data.py only
# tokenizes it, from the generator the caller passes to prepare (math=), so that this file
# stands alone.

def heldout_code(val_fraction=VAL_FRACTION):
    """The standard-library files that `prepare` puts in the code source's validation split
    (the same hash of the same text): code no model trained on the built-in corpus has seen,
    for eval.py's code tasks. Their docstrings may still sit in the prose source's train split."""
    out = []
    for path in stdlib_files():
        with open(path, "rb") as f:
            text = _decode(f.read(), {"invalid_utf8": 0})
        if _is_val(text.encode("utf-8", errors="replace"), val_fraction):
            out.append(text)
    return out


# -----------------------------------------------------------------------------
# Tokenizers: a tokenizer.py file read through tiktoken, or anything with an encode method

class ByteTokenizer:
    """The simplest tokenizer: UTF-8 bytes are the ids, 256 is <|eos|>. Used by the demo
    and the tests so that they need no trained vocabulary."""
    vocab_size = 257
    special_tokens = {"<|eos|>": 256}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, i):    # tiktoken's name: the bytes of one token
        return bytes([i]) if i < 256 else b""


def load_tokenizer(path):
    """A tokenizer saved by tokenizer.py (`tok`, `tok.json` or `tok.tiktoken`), as a
    tiktoken.Encoding. data.py reads the two files itself instead of importing
    tokenizer.py, so that it can be copied on its own."""
    import base64
    import tiktoken

    path = os.fspath(path)
    meta_file = path if path.endswith(".json") else path.removesuffix(".tiktoken") + ".json"
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"tokenizer {meta_file} not found (write one with: python tokenizer.py train ...)")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    missing = [k for k in ("ranks_file", "ranks_sha256", "pattern", "special_tokens") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: missing {', '.join(missing)}; is this a tokenizer saved by tokenizer.py?")
    ranks_file = os.path.join(os.path.dirname(meta_file), meta["ranks_file"])
    with open(ranks_file, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != meta["ranks_sha256"]:
        raise ValueError(f"{ranks_file} does not match the checksum in {meta_file}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding(os.path.basename(meta_file), pat_str=meta["pattern"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    enc.fingerprint = hashlib.sha256(json.dumps([meta["ranks_sha256"], meta["pattern"],
                                                 meta["special_tokens"]]).encode()).hexdigest()
    return enc


# Text that exercises every kind of pre-tokenization: a changed tokenizer changes its ids.
_PROBE = "Hello, World! It's 2025: 1234567 * 89 = 109876463.\n\tdef f(x):  return x  # ok\nÉté 東京 🙂 <|eos|>"


def _encoder(tokenizer, vocab_size=None, eos_id=None):
    """-> (encode: str -> np.ndarray, vocab_size, eos_id or None, fingerprint) for a
    tokenizer path, a tiktoken.Encoding, an object with .encode (and .vocab_size or
    .n_vocab), or a bare encode function (then give vocab_size)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if hasattr(tokenizer, "encode_to_numpy"):  # tiktoken: special-token strings in text stay text
        enc = tokenizer
        encode = lambda text: enc.encode_to_numpy(text, disallowed_special=())
        specials = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}
        vocab_size = vocab_size or enc.n_vocab
    else:
        encode = getattr(tokenizer, "encode", tokenizer)
        if not callable(encode):
            raise TypeError(f"tokenizer must be a path, a tiktoken.Encoding or have an encode method, not {tokenizer!r}")
        specials = getattr(tokenizer, "special_tokens", None) or {}
        vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None) or getattr(tokenizer, "n_vocab", None)
        if vocab_size is None:
            raise ValueError("give vocab_size= with a bare encode function")
    if eos_id is None:
        eos_id = specials.get("<|eos|>", specials.get("<|endoftext|>"))
    fingerprint = getattr(tokenizer, "fingerprint", None) or hashlib.sha256(
        json.dumps([np.asarray(encode(_PROBE)).tolist(), vocab_size]).encode()).hexdigest()
    return encode, int(vocab_size), eos_id, fingerprint


# -----------------------------------------------------------------------------
# prepare: documents -> token shards, in parallel, idempotent, crash-safe

def _units(source, max_docs, seed, math=None):
    """Cut a source into units of work: (kind, items, fingerprint). A unit becomes one shard
    per split; its fingerprint says when a shard on disk was made from the same inputs (the
    math generator's key among them)."""
    if source.kind == "math":
        if math is None:
            raise ValueError("the built-in math source is generated outside data.py: pass math=(generate, key), "
                             "generate(i, seed) -> text (train.py passes arithmetic.corpus()), or give math files")
        generate, key = math
        n = max_docs or MATH_DOCUMENTS
        return [("math", (start, min(MATH_UNIT, n - start), seed, generate), ["math", CORPUS_VERSION, seed, start, n, key])
                for start in range(0, n, MATH_UNIT)]
    paths = stdlib_files()[:max_docs] if source.kind in ("code", "prose") else source.paths
    stat = lambda p: [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
    units, group, size = [], [], 0
    for p in paths:
        group.append(p)
        size += os.path.getsize(p)
        if size >= UNIT_BYTES:
            units.append(group)
            group, size = [], 0
    units += [group] if group else []
    out = [(source.kind, g, [source.kind, CORPUS_VERSION] + [stat(p) for p in g]) for g in units]
    if source.kind == "prose":
        out.append(("topics", max_docs, ["topics", CORPUS_VERSION, max_docs, sys.version]))
    return out


def _documents(kind, items, counts, text_field, skip_bad_lines):
    if kind == "math":
        start, n, seed, generate = items
        yield from (generate(i, seed) for i in range(start, start + n))
    elif kind == "topics":
        yield from pydoc_topics()[:items]
    else:
        for path in items:
            if kind == "files":
                yield from read_file(path, counts, text_field, skip_bad_lines)
            else:
                with open(path, "rb") as f:
                    text = _decode(f.read(), counts)
                yield text if kind == "code" else docstrings(text)


def _is_val(text_bytes, val_fraction):
    """The split is a hash of the document's text: the same on every machine and every run,
    and exact duplicates can never sit on both sides of the train/val line."""
    h = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little")
    return h < val_fraction * 2.0 ** 64


def _write_atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_ENCODE = None  # set in the parent before the worker processes fork, so any encode function works


def _prepare_unit(job):
    """Tokenize one unit into DIR/<source>/<unit>-train.bin and -val.bin (+ .docs.npy), then
    write <unit>.done.json. The done file, written last, is what lets a re-run skip it."""
    d, unit, kind, items, fingerprint, opts = job
    done = os.path.join(d, f"{unit}.done.json")
    if os.path.exists(done):
        os.remove(done)  # whatever happens below, an old done file must not vouch for it
    counts = {"documents": 0, "empty": 0, "bad_lines": 0, "invalid_utf8": 0, "bytes": 0}
    dtype, eos = np.dtype(opts["dtype"]), opts["eos_id"]
    files = {s: open(os.path.join(d, f"{unit}-{s}.bin.tmp{os.getpid()}"), "wb") for s in ("train", "val")}
    lengths = {"train": [], "val": []}
    try:
        for text in _documents(kind, items, counts, opts["text_field"], opts["skip_bad_lines"]):
            raw = text.encode("utf-8", errors="replace")  # errors: lone surrogates from JSON escapes
            if not raw.strip():
                counts["empty"] += 1
                continue
            ids = np.asarray(_ENCODE(text), dtype=np.int64)
            if eos is not None:
                ids = np.append(ids, eos)  # the model learns where a document ends
            bad = ids[(ids < 0) | (ids >= opts["vocab_size"])]
            if bad.size:
                raise ValueError(f"the tokenizer returned id {bad[0]}, outside its vocabulary of {opts['vocab_size']}")
            split = "val" if _is_val(raw, opts["val_fraction"]) else "train"
            ids.astype(dtype).tofile(files[split])
            lengths[split].append(ids.size)
            counts["documents"] += 1
            counts["bytes"] += len(raw)
        stats = {}
        for s, f in files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(f.name, os.path.join(d, f"{unit}-{s}.bin"))
            offsets = np.concatenate([[0], np.cumsum(lengths[s], dtype=np.int64)]).astype(np.int64)
            _write_atomic(os.path.join(d, f"{unit}-{s}.docs.npy"), lambda f: np.save(f, offsets))
            stats[s] = {"tokens": int(offsets[-1]), "documents": len(lengths[s])}
    finally:
        for f in files.values():
            if not f.closed:
                f.close()
                os.remove(f.name)
    record = {"fingerprint": fingerprint, "counts": counts, **stats}
    _write_atomic(done, lambda f: f.write(json.dumps(record).encode()))
    return os.path.basename(d), int(unit), record


def _unit_is_done(d, unit, fingerprint, itemsize):
    """A shard is trusted only with a done file of the same fingerprint and files whose
    sizes match it: a run killed halfway leaves nothing that passes this."""
    try:
        with open(os.path.join(d, f"{unit}.done.json")) as f:
            record = json.load(f)
        ok = record["fingerprint"] == fingerprint and all(
            os.path.getsize(os.path.join(d, f"{unit}-{s}.bin")) == record[s]["tokens"] * itemsize
            and os.path.exists(os.path.join(d, f"{unit}-{s}.docs.npy")) for s in ("train", "val"))
        return record if ok else None
    except (OSError, ValueError, KeyError):
        return None


def prepare(sources=BUILTIN_SOURCES, out="data", tokenizer=None, vocab_size=None, eos_id=None,
            val_fraction=VAL_FRACTION, text_field="text", skip_bad_lines=False, workers=None,
            max_docs=None, seed=0, math=None, verbose=True):
    """Tokenize `sources` (specs for `resolve_sources`, or Source objects) into shards under
    `out` and write `out`/manifest.json; returns the manifest. A second call with the same
    inputs does nothing; a call after a crash redoes only the unfinished units.

    tokenizer: a tokenizer.py file, a tiktoken.Encoding, an object with .encode, or an
    encode function (with vocab_size=). Each document gets the <|eos|> (or <|endoftext|>)
    token appended when the tokenizer has one. Units of work run in `workers` processes
    (default: every core; one where fork is unavailable). max_docs caps each built-in source
    (quick runs): the first max_docs standard-library files and pydoc topics, or max_docs
    math problems. math=(generate, key) makes the built-in math source: generate(i, seed) gives
    the i-th document (picklable: it runs in the workers), key (JSON) names it in the
    fingerprint and in the manifest ("math")."""
    if tokenizer is None:
        raise ValueError("prepare needs a tokenizer (a file written by tokenizer.py, or an encode function)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    global _ENCODE
    _ENCODE, vocab_size, eos_id, tok_fingerprint = _encoder(tokenizer, vocab_size, eos_id)
    sources = resolve_sources(sources)
    dtype = "uint16" if vocab_size <= 2 ** 16 else "uint32"
    opts = {"dtype": dtype, "eos_id": eos_id, "vocab_size": vocab_size, "val_fraction": val_fraction,
            "text_field": text_field, "skip_bad_lines": skip_bad_lines}
    plan = {s.name: _units(s, max_docs, seed, math) for s in sources}
    has_math = any(s.kind == "math" for s in sources)
    fingerprint = hashlib.sha256(json.dumps(
        [FORMAT, tok_fingerprint, opts, max_docs, {k: [u[2] for u in v] for k, v in plan.items()}],
        default=str).encode()).hexdigest()
    manifest_file = os.path.join(out, "manifest.json")
    itemsize = np.dtype(dtype).itemsize

    # Idempotent: the same fingerprint and every shard intact means there is nothing to do.
    if os.path.exists(manifest_file):
        with open(manifest_file) as f:
            old = json.load(f)
        if old.get("fingerprint") == fingerprint and all(
                _unit_is_done(os.path.join(out, name), u["unit"], u["fingerprint"], itemsize)
                for name, src in old["sources"].items() for u in src["units"]):
            if verbose:
                print(f"{manifest_file} is up to date: nothing to do")
            return old

    jobs, records = [], {}
    for s in sources:
        d = os.path.join(out, s.name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):  # what a killed run was writing: never trusted, now removed
            if ".tmp" in f and f[:5].isdigit():
                os.remove(os.path.join(d, f))
        for i, (kind, items, unit_fp) in enumerate(plan[s.name]):
            unit_fp = hashlib.sha256(json.dumps([unit_fp, tok_fingerprint, opts], default=str).encode()).hexdigest()
            done = _unit_is_done(d, f"{i:05d}", unit_fp, itemsize)
            if done:
                records[s.name, i] = done
            else:
                jobs.append((d, f"{i:05d}", kind, items, unit_fp, opts))
    total_bytes = sum(os.path.getsize(p) for s in sources if s.kind == "files" for p in s.paths)
    t0, last, done_bytes = time.time(), 0.0, 0
    if verbose:
        print(f"prepare: {len(jobs)} units to tokenize ({len(records)} already done), "
              f"{len(sources)} sources -> {out}", file=sys.stderr)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    fork = "fork" in multiprocessing.get_all_start_methods()
    if workers > 1 and fork:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap_unordered(_prepare_unit, jobs)
    else:
        pool, results = None, map(_prepare_unit, jobs)
    try:
        for name, i, record in results:
            records[name, i] = record
            done_bytes += record["counts"]["bytes"]
            if verbose and (time.time() - last > 2 or len(records) == sum(map(len, plan.values()))):
                last, dt = time.time(), time.time() - t0
                print(f"  {len(records)}/{sum(map(len, plan.values()))} units, {done_bytes / 1e6:.1f} MB of text"
                      + (f" (of ~{total_bytes / 1e6:.0f} MB in files)" if total_bytes else "")
                      + f", {done_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()

    manifest = {"format": FORMAT, "fingerprint": fingerprint, "dtype": dtype,
                "tokenizer": {"fingerprint": tok_fingerprint, "vocab_size": vocab_size, "eos_id": eos_id},
                "val_fraction": val_fraction, "seconds": round(time.time() - t0, 2), "sources": {},
                **({"math": math[1]} if has_math else {})}
    for s in sources:
        units = [{"unit": f"{i:05d}", **records[s.name, i]} for i in range(len(plan[s.name]))]
        entry = {"spec": s.spec, "units": units}
        for split in ("train", "val"):
            entry[split] = {k: sum(u[split][k] for u in units) for k in ("tokens", "documents")}
        entry["counts"] = {k: sum(u["counts"][k] for u in units) for k in units[0]["counts"]}
        if entry["train"]["documents"] + entry["val"]["documents"] == 0:
            raise ValueError(f"source {s.spec!r} has no documents (all {entry['counts']['empty']} were empty)")
        manifest["sources"][s.name] = entry
    _write_atomic(manifest_file, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    if verbose:
        print(summary(manifest))
    return manifest


def summary(manifest):
    """A table of what a prepared directory holds."""
    rows = [f"{'source':12s} {'train tokens':>14s} {'docs':>9s} {'val tokens':>12s} {'docs':>7s}  notes"]
    for name, s in manifest["sources"].items():
        c = s["counts"]
        notes = ", ".join(f"{c[k]} {label}" for k, label in [("empty", "empty documents"),
                          ("bad_lines", "bad lines skipped"), ("invalid_utf8", "documents with invalid UTF-8 replaced")] if c[k])
        rows.append(f"{name:12s} {s['train']['tokens']:14,d} {s['train']['documents']:9,d} "
                    f"{s['val']['tokens']:12,d} {s['val']['documents']:7,d}  {notes}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# The loader: packed windows, shuffled, mixed, sharded over ranks, resumable

def _mix64(x):
    """A 64-bit hash (splitmix64's finalizer): flipping any input bit flips about half the
    output bits, which is what a Feistel round needs from its round function."""
    x &= (1 << 64) - 1
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & (1 << 64) - 1
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & (1 << 64) - 1
    return x ^ (x >> 31)


def shuffle(i, n, key, rounds=4):
    """The i-th element of a shuffled range(n), the shuffle chosen by the integer `key`:
    a bijection of 0..n-1 computed on the spot. Nothing is stored, whatever n; a permutation
    from numpy holds 8 bytes per index and must be rebuilt every epoch.

    A Feistel network (the construction inside DES): cut i's bits into a left and a right
    half and, a few times over, replace (left, right) by (right, left XOR hash(right)). Each
    round can be undone (the right half is still there to recompute the hash), so the whole
    is a bijection of 0..4**h - 1 whatever the hash; a good keyed hash makes it look like a
    random permutation, and four rounds suffice (Luby and Rackoff 1988). n is rarely a power
    of 4: cycle walking applies the bijection again until the result is below n. Following
    i's cycle of the big permutation to its next member below n maps 0..n-1 onto itself one
    to one, and since 4**h <= 4n it takes at most 4 steps on average."""
    if not 0 <= i < n:
        raise IndexError(f"shuffle: index {i} is not in 0..{n - 1}")
    h = max(1, ((n - 1).bit_length() + 1) // 2)   # bits per half: 4**h >= n
    mask = (1 << h) - 1
    while True:
        left, right = i >> h, i & mask
        for r in range(rounds):  # the round number enters the hash: each round is a different function
            left, right = right, left ^ (_mix64(key ^ (r << 32) ^ right) & mask)
        i = left << h | right
        if i < n:
            return i


class _Stream:
    """One source's split as a single token stream: its shards end to end and the offsets of
    their documents, both memory-mapped (at a trillion tokens the offsets alone are
    gigabytes), cut into windows of seq_len + 1 tokens (inputs and the next-token labels;
    consecutive windows share one token)."""

    def __init__(self, d, name, split, units, dtype, seq_len):
        self.name, self.shards, self.docs, starts = name, [], [], [0]
        for u in units:
            n = u[split]["tokens"]
            if n == 0:
                continue
            path = os.path.join(d, name, f"{u['unit']}-{split}.bin")
            if not os.path.exists(path) or os.path.getsize(path) != n * np.dtype(dtype).itemsize:
                raise ValueError(f"{path} is missing or not the size manifest.json says: the directory was "
                                 "changed after prepare; run prepare again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
            # The shard's document starts, relative to the shard (the last offset, its end, is
            # left out), seen as a plain array: still the file's pages, without the memmap
            # subclass's overhead on every slice.
            docs = np.load(os.path.join(d, name, f"{u['unit']}-{split}.docs.npy"), mmap_mode="r")
            self.docs.append(docs[:-1].view(np.ndarray))
            starts.append(starts[-1] + n)
        self.shard_starts = np.array(starts, dtype=np.int64)
        self.n_tokens = int(starts[-1])
        self.n_windows = max(0, (self.n_tokens - 1) // seq_len)

    def read(self, a, b):
        """Tokens a..b of the stream (across shard boundaries), as int64."""
        i = int(np.searchsorted(self.shard_starts, a, "right")) - 1
        parts = []
        while a < b:
            lo, hi = self.shard_starts[i], self.shard_starts[i + 1]
            take = min(b, hi) - a
            parts.append(self.shards[i][a - lo:a - lo + take])
            a, i = a + take, i + 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def doc_starts(self, a, b):
        """The offsets in a..b-1 where a document starts. A binary search in each shard's
        memory-mapped offsets touches a few pages of the file, not all of it. (The offsets
        are int64 and so are the keys: a key of another type would make numpy convert, so
        copy, the whole array.)"""
        i, out = int(np.searchsorted(self.shard_starts, a, "right")) - 1, []
        while i < len(self.docs) and self.shard_starts[i] < b:
            lo, docs = int(self.shard_starts[i]), self.docs[i]
            out.append(docs[docs.searchsorted(a - lo):docs.searchsorted(b - lo)] + lo)
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]


def _check_weights(weights, names, where="weights"):
    if not isinstance(weights, dict):
        raise TypeError(f"{where} must be a dict of source -> weight, got {weights!r}")
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown source {unknown[0]!r}; the prepared sources are {', '.join(names)}")
    for k, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weight of {k!r} must be a finite number >= 0, got {w!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{where}: at least one weight must be positive")
    return np.array([float(weights.get(k, 0.0)) for k in names])


class Loader:
    """Batches for pretraining, in the shared batch contract: dicts of int64 (batch_size,
    seq_len) tensors `input_ids`, `labels` (the next token, -100 where it belongs to another
    document) and `position_ids` (restarting at 0 at each document start and at the start
    of each window), plus `source` (batch_size,): each row's source, an index into `names`.

    weights: None (each source in proportion to its size), a dict source -> weight, or a
    curriculum: a list of stages (until_tokens, weights) in order, the last with None (or
    the last stage simply continues). Tokens count globally, over all ranks.

    A stage ends at the first window that starts at or after its until_tokens. Deciding it
    window by window (not batch by batch) keeps the order of windows independent of how they
    are grouped: one process accumulating two micro-batches reads what two ranks read.

    Every rank builds the same global batch of world_size * batch_size windows and keeps
    its own slice, so the union over ranks is exactly what one process would read.

    The order: each source's windows in a shuffle keyed by (seed, source name, epoch), so a
    fresh order every epoch. `shuffle` computes where the k-th window of an epoch points,
    one window at a time, and the document offsets stay memory-mapped on disk: what a rank
    holds does not grow with the data, where a stored permutation takes 8 bytes a window
    (4 GB per source at a trillion tokens and seq_len 2048), on every rank, rebuilt every
    epoch."""

    def __init__(self, data_dir, batch_size, seq_len, weights=None, seed=0, rank=0, world_size=1, split="train"):
        manifest_file = os.path.join(data_dir, "manifest.json")
        if not os.path.exists(manifest_file):
            raise FileNotFoundError(f"{manifest_file} not found: run `python data.py prepare --out {data_dir}` first "
                                    "(a prepare that did not finish leaves no manifest)")
        with open(manifest_file) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_file} has format {self.manifest.get('format')}, this data.py reads "
                             f"{FORMAT}: run prepare again")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
        self.rank, self.world_size = rank, world_size
        self.names = list(self.manifest["sources"])
        self.streams = [_Stream(data_dir, n, split, self.manifest["sources"][n]["units"], self.manifest["dtype"], seq_len)
                        for n in self.names]
        sizes = np.array([s.n_windows for s in self.streams], dtype=float)
        if weights is None:
            weights = dict(zip(self.names, sizes))
        self.stages = [(None, weights)] if isinstance(weights, dict) else list(weights)
        if not self.stages:
            raise ValueError("weights: a curriculum needs at least one stage")
        self.stage_weights = []
        for i, (until, w) in enumerate(self.stages):
            where = f"weights (stage {i})" if len(self.stages) > 1 else "weights"
            self.stage_weights.append(_check_weights(w, self.names, where))
            if i and until is not None and self.stages[i - 1][0] is not None and until <= self.stages[i - 1][0]:
                raise ValueError(f"{where}: stage ends must increase, got {self.stages[i - 1][0]} then {until}")
            for k, weight in zip(self.names, self.stage_weights[-1]):
                if weight > 0 and sizes[self.names.index(k)] == 0:
                    raise ValueError(f"source {k!r} has weight {w[k]} but its {split} split holds fewer than "
                                     f"{seq_len + 1} tokens; give it weight 0 or prepare more data")
        # The state: everything else is a function of it and the seed.
        self.batches = 0                            # global batches produced
        self.consumed = np.zeros(len(self.names), dtype=np.int64)      # windows read, per source, all epochs
        self.stage, self.stage_counts = 0, np.zeros(len(self.names), dtype=np.int64)
        self.log_weights = np.zeros(len(self.names))  # the adaptive mixture's nudges (adapt())
        self._keys = {}  # source -> (epoch, its shuffle's key)

    # -- the order: a fresh seeded shuffle of each source's windows every epoch
    def _window(self, s, k):
        """The k-th window (counting over all epochs) that source s hands out."""
        n = self.streams[s].n_windows
        epoch, i = divmod(int(k), n)
        if self._keys.get(s, (None,))[0] != epoch:
            # Keyed by the source's name, not its position, so adding a source leaves the
            # others' order unchanged. SeedSequence hashes the three numbers into one key.
            seq = np.random.SeedSequence([self.seed, zlib.crc32(self.names[s].encode()), epoch])
            self._keys[s] = (epoch, int(seq.generate_state(1, np.uint64)[0]))
        return shuffle(i, n, self._keys[s][1])

    def weights(self):
        """The mixture in force now: the curriculum stage's weights, nudged by adapt()."""
        w = self.stage_weights[self.stage] * np.exp(self.log_weights)
        return w / w.sum()

    def _next_sources(self, n):
        """Which source each of the next n windows comes from. Smooth weighted round robin:
        each window goes to the source furthest behind its share of the stage so far, so
        after any k windows every source is within one window of weight * k. Sampling iid
        would only get the proportions right on average; with 3% math and a small batch,
        whole batches would have none."""
        out, before = [], int(self.consumed.sum())
        for j in range(n):
            tokens_so_far = (before + j) * self.seq_len
            stage = next((i for i, (until, _) in enumerate(self.stages) if until is None or tokens_so_far < until),
                         len(self.stages) - 1)
            if stage != self.stage:
                self.stage, self.stage_counts[:] = stage, 0
            w, counts = self.weights(), self.stage_counts
            total = counts.sum() + 1
            s = int(np.argmax(w * total - counts))
            counts[s] += 1
            out.append(s)
        return out

    def __iter__(self):
        return self

    def __next__(self):
        B, T = self.batch_size, self.seq_len
        picks = self._next_sources(B * self.world_size)
        ks = []
        for s in picks:  # every rank advances every counter, and finds only its own slice's windows
            ks.append((s, int(self.consumed[s])))
            self.consumed[s] += 1
        self.batches += 1
        mine = ks[self.rank * B:(self.rank + 1) * B]
        x = np.empty((B, T), np.int64)
        y = np.empty((B, T), np.int64)
        pos = np.empty((B, T), np.int64)
        for row, (s, k) in enumerate(mine):
            x[row], y[row], pos[row] = self._pack(self.streams[s], self._window(s, k) * T)
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "position_ids": torch.from_numpy(pos),
                "source": torch.tensor([s for s, _ in mine], dtype=torch.int64)}   # index into .names

    def _pack(self, stream, a):
        """The window at stream offset a: inputs a..a+T-1, labels a+1..a+T, with the label
        masked where the next token starts another document and positions restarting at
        every document start."""
        T = self.seq_len
        tokens = stream.read(a, a + T + 1)
        x, y = tokens[:-1], tokens[1:].copy()
        starts = stream.doc_starts(a + 1, a + T + 1) - a  # in 1..T
        y[starts - 1] = IGNORE_INDEX             # never predict the first token of the next document
        restart = np.zeros(T, np.int64)
        inside = starts[starts < T]
        restart[inside] = inside
        pos = np.arange(T) - np.maximum.accumulate(restart)
        return x, y, pos

    # -- the adaptive mixture (optional): weights nudged toward sources the model finds hard
    def adapt(self, val_losses, eta=0.1, max_log=2.0):
        """Nudge the mixture from per-source validation losses (a dict source -> loss, the
        same on every rank: all-reduce it first). Log-weights move by eta * (loss / mean
        loss - 1): a source whose loss stays above the others gains share, one that is
        already easy loses it, bounded to a factor e**max_log either way. A cheap online
        cousin of DoReMi and Online Data Mixing, which use excess loss over a reference
        model instead of raw loss. The share bookkeeping restarts so that the round robin
        follows the new weights from here on."""
        _check_weights({k: 1.0 for k in val_losses}, self.names, "adapt")
        idx = [self.names.index(k) for k in val_losses]
        losses = np.array([float(val_losses[k]) for k in val_losses])
        self.log_weights[idx] = np.clip(self.log_weights[idx] + eta * (losses / losses.mean() - 1), -max_log, max_log)
        self.stage_counts[:] = 0

    # -- bookkeeping
    def stats(self):
        """Tokens consumed (over all ranks), the realised share of each source, how many
        epochs of each source have been read, the stage and the weights in force."""
        total = max(int(self.consumed.sum()), 1)
        return {"tokens": int(self.consumed.sum()) * self.seq_len, "batches": self.batches, "stage": self.stage,
                "weights": dict(zip(self.names, self.weights().round(4).tolist())),
                "proportions": {n: round(c / total, 4) for n, c in zip(self.names, self.consumed.tolist())},
                "epochs": {n: round(c / max(s.n_windows, 1), 4) for n, c, s in
                           zip(self.names, self.consumed.tolist(), self.streams)}}

    def state_dict(self):
        return {"format": FORMAT, "data": self.manifest["fingerprint"], "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "batches": self.batches, "stage": self.stage,
                "consumed": dict(zip(self.names, self.consumed.tolist())),
                "stage_counts": dict(zip(self.names, self.stage_counts.tolist())),
                "log_weights": dict(zip(self.names, self.log_weights.tolist()))}

    def load_state_dict(self, state):
        """Resume exactly: the next batch is the one an uninterrupted loader would give. The
        world size and batch size may change (the global order does not depend on them);
        the data, seed, split and seq_len may not."""
        for key, mine in [("data", self.manifest["fingerprint"]), ("seed", self.seed), ("split", self.split),
                          ("seq_len", self.seq_len)]:
            if state.get(key) != mine:
                hint = " (changing seq_len, as mid-training does, starts a new Loader)" if key == "seq_len" else ""
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {mine!r}{hint}")
        self.batches, self.stage = state["batches"], state["stage"]
        for arr, key in [(self.consumed, "consumed"), (self.stage_counts, "stage_counts"), (self.log_weights, "log_weights")]:
            arr[:] = [state[key].get(n, 0) for n in self.names]


# -----------------------------------------------------------------------------
# Demo and command line

def show_windows(loader, decode, n=2):
    """Print the first n windows of the next batch, marking document starts with ▌ and
    counting the positions whose label is masked."""
    batch = next(loader)
    for row in range(min(n, loader.batch_size)):
        x, y, pos = (batch[k][row].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(x)]
        pieces = ["▌" + decode(x[a:b]) for a, b in zip(starts, starts[1:])]
        print(f"--- window {row}: {len(starts) - 1} document pieces, {y.count(IGNORE_INDEX)} labels masked")
        print("".join(pieces))


def _demo():
    tok = ByteTokenizer()  # bytes as tokens: the demo needs no trained vocabulary
    with tempfile.TemporaryDirectory() as d:
        print("prepare: the first 150 standard-library files as code and as docstrings (the built-in math is "
              "arithmetic.py's: train.py adds it)")
        t0 = time.time()
        prepare(("code", "prose"), d, tok, max_docs=150, verbose=False)
        t1 = time.time()
        manifest = prepare(("code", "prose"), d, tok, max_docs=150, verbose=False)
        print(f"({t1 - t0:.1f}s; the second, identical call found nothing to do in {time.time() - t1:.2f}s)")
        print(summary(manifest))
        print("packed windows of 200 byte-tokens (▌ = a document starts: the label before it is masked "
              "and positions restart at 0):")
        show_windows(Loader(d, batch_size=3, seq_len=200, weights={"prose": 1, "code": 2}), tok.decode, n=3)

        total = 400_000
        stages = [(until, {k: v for k, v in w.items() if k != "math"})       # (no math source here)
                  for until, w in schedule(SMOLLM3_SCHEDULE, total, web="prose")]
        print(f"\nSmolLM3's three-stage curriculum scaled to {total:,} tokens, batches of 8 x 256:")
        loader = Loader(d, batch_size=8, seq_len=256, weights=stages)
        seen = np.zeros((len(stages), len(loader.names)))
        while loader.stats()["tokens"] < total:
            before = loader.consumed.copy()
            next(loader)
            seen[loader.stage] += loader.consumed - before
        for i, (until, w) in enumerate(stages):
            got = seen[i] / max(seen[i].sum(), 1)
            print(f"  stage {i} (until {until or total:>7,} tokens): " + ", ".join(
                f"{n} {got[j]:.3f} (weight {w.get(n, 0):.2f})" for j, n in enumerate(loader.names)))
        print("  epochs consumed: " + ", ".join(f"{k} {v:.2f}" for k, v in loader.stats()["epochs"].items())
              + " (a small source repeats: past ~4 epochs, extra repeats are worth little)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanoplaybook's data pipeline (no arguments: the demo)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prepare", help="tokenize sources into shards")
    p.add_argument("--tokenizer", required=True, help="a tokenizer written by tokenizer.py (tok.json)")
    p.add_argument("--out", required=True, help="the directory to write (manifest.json and one folder per source)")
    p.add_argument("--sources", nargs="+", default=["code", "prose"],
                   help="built-in names (code prose; the built-in math is arithmetic.py's, which train.py adds), "
                        "files, directories or globs; name=SPEC names one")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of documents held out (by a hash of their text)")
    p.add_argument("--text-field", default="text", help="the field (jsonl) or column (parquet) holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines, counting them")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p.add_argument("--max-docs", type=int, default=None, help="cap each built-in source (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="the math generator's seed")
    s = sub.add_parser("show", help="what a prepared directory holds, and a few decoded windows")
    s.add_argument("dir")
    s.add_argument("--tokenizer", help="decode windows with this tokenizer")
    s.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.sources, args.out, args.tokenizer, val_fraction=args.val_fraction, text_field=args.text_field,
                    skip_bad_lines=args.skip_bad_lines, workers=args.workers, max_docs=args.max_docs, seed=args.seed)
        elif args.command == "show":
            loader = Loader(args.dir, batch_size=2, seq_len=args.seq_len)
            print(summary(loader.manifest))
            if args.tokenizer:
                show_windows(loader, load_tokenizer(args.tokenizer).decode)
        else:
            _demo()
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        sys.exit(f"data.py: {e}")


if __name__ == "__main__":
    main()
