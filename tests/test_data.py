"""Tests for data.py: packing and masks against a naive reference, shuffling, mixtures and
curricula, rank sharding, exact resume, idempotent and crash-safe prepare, bad input."""

import gzip
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import arithmetic
import data
from data import IGNORE_INDEX, ByteTokenizer, Loader, prepare

EOS = ByteTokenizer.special_tokens["<|eos|>"]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": 0}) + "\n")
    return str(path)


def prep(out, sources, **kw):
    kw.setdefault("val_fraction", 0.0)
    return prepare(sources, str(out), ByteTokenizer(), verbose=False, **kw)


def random_docs(rng, n, letters="abcdefgh", lo=1, hi=30):
    return ["".join(rng.choice(letters) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def naive_windows(docs, T):
    """The reference: every window of the packed stream, built token by token from the
    documents (ByteTokenizer ids, an eos after each document)."""
    stream, doc_of = [], []
    for d, text in enumerate(docs):
        ids = list(text.encode()) + [EOS]
        stream += ids
        doc_of += [d] * len(ids)
    out = []
    for w in range((len(stream) - 1) // T):
        a = w * T
        x = stream[a:a + T]
        y = [stream[a + i + 1] if doc_of[a + i + 1] == doc_of[a + i] else IGNORE_INDEX for i in range(T)]
        pos = []
        for i in range(T):
            pos.append(0 if i == 0 or doc_of[a + i] != doc_of[a + i - 1] else pos[-1] + 1)
        out.append((x, y, pos))
    return out


def rows(batch):
    return [tuple(tuple(batch[k][r].tolist()) for k in ("input_ids", "labels", "position_ids"))
            for r in range(batch["input_ids"].shape[0])]


# -----------------------------------------------------------------------------
# Packing, labels, positions

def test_packing_by_hand(tmp_path):
    prep(tmp_path / "d", [write_jsonl(tmp_path / "a.jsonl", ["ab", "cde"])])
    # stream: a b E c d e E (7 tokens) -> one window of 4: the label of E (before c) is masked
    batch = next(Loader(tmp_path / "d", batch_size=1, seq_len=4))
    a, b, c, d = map(ord, "abcd")
    assert batch["input_ids"].tolist() == [[a, b, EOS, c]]
    assert batch["labels"].tolist() == [[b, EOS, IGNORE_INDEX, d]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert all(batch[k].dtype == torch.int64 for k in batch)


@pytest.mark.parametrize("T", [1, 3, 7, 32])
def test_packing_matches_naive_reference(tmp_path, T):
    docs = random_docs(random.Random(T), 60, hi=40)
    prep(tmp_path / "d", [write_jsonl(tmp_path / "a.jsonl", docs)])
    expected = naive_windows(docs, T)
    loader = Loader(tmp_path / "d", batch_size=len(expected), seq_len=T)
    got = rows(next(loader))  # one batch = one epoch: every window exactly once
    assert sorted(got) == sorted((tuple(x), tuple(y), tuple(p)) for x, y, p in expected)


def test_windows_across_shards(tmp_path, monkeypatch):
    """Units of work become separate shards; the stream runs across them seamlessly."""
    monkeypatch.setattr(data, "UNIT_BYTES", 1)  # every file its own unit
    rng = random.Random(1)
    docs = [random_docs(rng, 7, hi=50) for _ in range(4)]
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", d) for i, d in enumerate(docs)]
    m = prep(tmp_path / "d", [f"src={tmp_path}"])
    assert len(m["sources"]["src"]["units"]) == 4 and len(paths) == 4
    expected = naive_windows(sum(docs, []), 16)
    got = rows(next(Loader(tmp_path / "d", batch_size=len(expected), seq_len=16)))
    assert sorted(got) == sorted((tuple(x), tuple(y), tuple(p)) for x, y, p in expected)


# -----------------------------------------------------------------------------
# Shuffling

def window_index(loader, source=0):
    """Map a window's input ids back to its index in the document-ordered stream."""
    s, T = loader.streams[source], loader.seq_len
    return {tuple(s.read(w * T, w * T + T).tolist()): w for w in range(s.n_windows)}


def test_windows_are_shuffled_every_epoch(tmp_path):
    docs = random_docs(random.Random(0), 400, hi=60)
    prep(tmp_path / "d", [write_jsonl(tmp_path / "a.jsonl", docs)])
    loader = Loader(tmp_path / "d", batch_size=10, seq_len=8, seed=3)
    index, n = window_index(loader), loader.streams[0].n_windows
    assert len(index) == n > 500  # windows are distinguishable
    order = [index[r[0]] for _ in range(-(-2 * n // 10)) for r in rows(next(loader))]
    first, second = order[:n], order[n:2 * n]
    assert sorted(first) == sorted(second) == list(range(n))  # each epoch sees every window once
    # A document-ordered loader has rank correlation 1 with the stream order; a shuffled one ~0.
    rho = np.corrcoef(np.argsort(np.argsort(first)), np.arange(n))[0, 1]
    assert abs(rho) < 0.2, rho
    assert first != second  # a fresh permutation each epoch
    again = Loader(tmp_path / "d", batch_size=10, seq_len=8, seed=3)
    assert [index[r[0]] for _ in range(5) for r in rows(next(again))] == order[:50]  # seeded
    other = Loader(tmp_path / "d", batch_size=10, seq_len=8, seed=4)
    assert [index[r[0]] for _ in range(5) for r in rows(next(other))] != order[:50]


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_shuffle_is_a_seeded_permutation(n):
    """Every index exactly once, also where cycle walking does most of the work (4097 is one
    past a power of two: the Feistel network runs over 4**7 = 16384 indices); another key is
    another order."""
    orders = {tuple(data.shuffle(i, n, key) for i in range(n)) for key in range(8)}
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert len(orders) == min(8, math.factorial(n))  # n = 2: both orders; n >= 7: 8 different ones
    with pytest.raises(IndexError):
        data.shuffle(n, n, 0)
    if n > 100:  # no trace of the stream's order left (rank correlation ~0, as a document-ordered loader's is 1)
        for o in orders:
            assert abs(np.corrcoef(o, np.arange(n))[0, 1]) < 0.1


BIG_WINDOWS, BIG_DOCS = 10 ** 9, 10 ** 8


def test_memory_does_not_grow_with_the_data(tmp_path):
    """A source of a billion windows (a sparse 4 GB shard: no token is ever written) and a
    hundred million documents (a sparse offsets file): building the loader, reading batches
    and resuming allocate kilobytes, not the 8 GB a permutation of the windows takes nor the
    800 MB of the document starts."""
    import tracemalloc
    prep(tmp_path / "d", [write_jsonl(tmp_path / "big.jsonl", ["x"])])
    T = 4
    n = BIG_WINDOWS * T + 1
    shard = tmp_path / "d/big/00000-train"
    with open(f"{shard}.bin", "r+b") as f:
        f.truncate(2 * n)  # uint16 zeros that take no disk
    docs = np.lib.format.open_memmap(f"{shard}.docs.npy", mode="w+", dtype=np.int64, shape=(BIG_DOCS + 1,))
    docs[-3:] = [n - 4, n - 2, n]  # empty documents at 0, then two short ones at the very end
    docs.flush()
    del docs
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    manifest["sources"]["big"]["units"][0]["train"]["tokens"] = n
    (tmp_path / "d/manifest.json").write_text(json.dumps(manifest))

    tracemalloc.start()
    try:
        loader = Loader(tmp_path / "d", batch_size=8, seq_len=T, world_size=2, rank=1)
        assert loader.streams[0].n_windows == BIG_WINDOWS
        for _ in range(3):
            next(loader)
        again = Loader(tmp_path / "d", batch_size=8, seq_len=T, world_size=2, rank=1)
        again.load_state_dict(loader.state_dict())
        next(again)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 1e6:.1f} MB"
    # the last window holds both short documents: their starts are found in the memory-mapped offsets
    x, y, pos = loader._pack(loader.streams[0], n - 1 - T)
    assert pos.tolist() == [0, 0, 1, 0] and y.tolist() == [IGNORE_INDEX, 0, IGNORE_INDEX, 0]


# -----------------------------------------------------------------------------
# Mixtures and curricula

@pytest.fixture
def three_sources(tmp_path):
    """Sources a, b, c whose bytes are disjoint, so a window's first token names its source."""
    rng = random.Random(0)
    specs = [write_jsonl(tmp_path / f"{c}.jsonl", random_docs(rng, n, letters=c * 3 + c.upper()))
             for c, n in [("a", 300), ("b", 200), ("c", 50)]]
    prep(tmp_path / "d", specs)
    return tmp_path / "d"


def first_letter_sources(loader, n_batches):
    out = []
    for _ in range(n_batches):
        b = next(loader)
        # the first non-eos token of each row names its source, as does the batch's "source"
        for row, s in zip(b["input_ids"].tolist(), b["source"].tolist()):
            t = next(t for t in row if t != EOS)
            out.append(chr(t | 32))
            assert loader.names[s] == out[-1]
    return out


def test_mixture_is_tight_over_every_stretch(three_sources):
    w = {"a": 0.6, "b": 0.3, "c": 0.1}
    loader = Loader(three_sources, batch_size=10, seq_len=16, weights=w)
    seq = first_letter_sources(loader, 100)
    counts = {k: 0 for k in w}
    for k, s in enumerate(seq, 1):
        counts[s] += 1
        for name, weight in w.items():
            assert abs(counts[name] - weight * k) <= 1.0 + 1e-9, (k, counts)
    for b in range(100):  # so every batch of 10 holds exactly 6 / 3 / 1
        chunk = seq[10 * b:10 * b + 10]
        assert (chunk.count("a"), chunk.count("b"), chunk.count("c")) == (6, 3, 1)
    stats = loader.stats()
    assert stats["proportions"] == {"a": 0.6, "b": 0.3, "c": 0.1}
    # c is small: 100 windows read of its ~n_windows, reported as epochs
    assert stats["epochs"]["c"] == pytest.approx(100 / loader.streams[2].n_windows, abs=1e-4)


def test_default_mixture_is_proportional_to_size(three_sources):
    loader = Loader(three_sources, batch_size=50, seq_len=16)
    seq = first_letter_sources(loader, 20)
    sizes = np.array([s.n_windows for s in loader.streams], dtype=float)
    got = np.array([seq.count(c) for c in "abc"]) / len(seq)
    np.testing.assert_allclose(got, sizes / sizes.sum(), atol=2 / len(seq))


def test_random_weights_stay_within_one_window(three_sources):
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = dict(zip("abc", rng.dirichlet([0.5, 0.5, 0.5]).tolist()))
        loader = Loader(three_sources, batch_size=7, seq_len=4, weights=w)
        picks = loader._next_sources(500)
        counts = np.zeros(3)
        for k, s in enumerate(picks, 1):
            counts[s] += 1
            assert np.all(np.abs(counts - np.array(list(w.values())) * k) <= 1 + 1e-9)


def test_curriculum_switches_at_token_budgets(three_sources):
    T, B = 16, 4
    stages = [(5 * B * T, {"a": 1}), (8 * B * T, {"b": 1, "c": 1}), (None, {"c": 1})]
    loader = Loader(three_sources, batch_size=B, seq_len=T, weights=stages)
    seq = first_letter_sources(loader, 12)
    assert set(seq[:5 * B]) == {"a"}
    assert sorted(seq[5 * B:8 * B]) == ["b"] * 6 + ["c"] * 6
    assert set(seq[8 * B:]) == {"c"}
    assert loader.stats()["stage"] == 2


def test_smollm3_schedule_scales():
    stages = data.schedule(data.SMOLLM3_SCHEDULE, 11_100, web="prose")
    assert [u for u, _ in stages] == [8000, 10000, None]
    assert stages[0][1] == {"prose": 0.85, "code": 0.12, "math": 0.03}
    for _, w in stages:
        assert sum(w.values()) == pytest.approx(1)


def test_adaptive_mixture_moves_toward_hard_sources(three_sources):
    w = {"a": 1, "b": 1, "c": 1}
    loader = Loader(three_sources, batch_size=30, seq_len=8, weights=w)
    np.testing.assert_allclose(loader.weights(), [1 / 3] * 3)
    loader.adapt({"a": 3.0, "b": 1.0, "c": 2.0}, eta=0.5)
    mix = loader.weights()
    assert mix[0] > mix[2] > mix[1]
    seq = first_letter_sources(loader, 10)
    got = np.array([seq.count(c) for c in "abc"]) / len(seq)
    np.testing.assert_allclose(got, mix, atol=1 / 30)
    for _ in range(50):  # bounded: the easy source is never starved
        loader.adapt({"a": 3.0, "b": 1.0, "c": 2.0}, eta=0.5)
    assert loader.weights()[1] > 0.01
    with pytest.raises(ValueError, match="unknown source 'd'"):
        loader.adapt({"d": 1.0})


# -----------------------------------------------------------------------------
# Ranks and resume

def test_ranks_union_is_the_global_batch(three_sources):
    stages = [(6 * 8 * 8, {"a": 2, "b": 1}), (None, {"a": 1, "b": 1, "c": 1})]
    single = Loader(three_sources, batch_size=8, seq_len=8, weights=stages, seed=5)
    ranks = [Loader(three_sources, batch_size=4, seq_len=8, weights=stages, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(20):
        one = next(single)
        two = [next(r) for r in ranks]
        for k in one:
            assert torch.equal(one[k], torch.cat([two[0][k], two[1][k]]))


def test_accumulation_reads_what_ranks_read_across_a_stage_change(three_sources):
    """One process reading two micro-batches of 4 per step gets the windows two ranks of 4 get,
    even where a curriculum stage ends inside a step (its end falls 6 windows in)."""
    stages = [(6 * 8, {"a": 2, "b": 1}), (20 * 8, {"c": 1}), (None, {"a": 1, "b": 1, "c": 1})]
    single = Loader(three_sources, batch_size=4, seq_len=8, weights=stages, seed=5)
    ranks = [Loader(three_sources, batch_size=4, seq_len=8, weights=stages, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(12):
        one = [next(single), next(single)]
        two = [next(r) for r in ranks]
        for k in one[0]:
            assert torch.equal(torch.cat([one[0][k], one[1][k]]), torch.cat([two[0][k], two[1][k]])), k
    assert single.stage == ranks[0].stage == 2


def test_ranks_are_disjoint_over_an_epoch(tmp_path):
    prep(tmp_path / "d", [write_jsonl(tmp_path / "a.jsonl", random_docs(random.Random(0), 100, hi=60))])
    ranks = [Loader(tmp_path / "d", batch_size=5, seq_len=8, rank=r, world_size=3) for r in range(3)]
    index, n = window_index(ranks[0]), ranks[0].streams[0].n_windows
    assert len(index) == n
    seen = [[index[row[0]] for _ in range(n // 15) for row in rows(next(r))] for r in ranks]
    assert all(len(set(s)) == len(s) for s in seen)
    assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2]) and not set(seen[0]) & set(seen[2])
    assert len(set().union(*seen)) == 15 * (n // 15)


def test_exact_resume(three_sources):
    stages = [(10 * 6 * 8, {"a": 1, "c": 3}), (None, {"b": 1, "c": 1})]
    make = lambda **kw: Loader(three_sources, seq_len=8, weights=stages, seed=2, **kw)
    ref = make(batch_size=6)
    ref_batches = [next(ref) for _ in range(30)]  # crosses the stage change and epochs of c
    run, ref2 = make(batch_size=6), make(batch_size=6)
    for loader in (run, ref2):
        for _ in range(7):
            next(loader)
        loader.adapt({"a": 2.0, "c": 1.0})
    state = json.loads(json.dumps(run.state_dict()))  # it must survive a JSON checkpoint
    resumed = make(batch_size=6)
    resumed.load_state_dict(state)
    for _ in range(20):
        a, b = next(ref2), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref2.stats() == resumed.stats()
    # without adapt() the resumed run is the uninterrupted one, also on another world size
    run = make(batch_size=6)
    for _ in range(7):
        next(run)
    halves = [make(batch_size=3, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(run.state_dict())
    for i in range(7, 30):
        two = [next(h) for h in halves]
        assert all(torch.equal(ref_batches[i][k], torch.cat([two[0][k], two[1][k]])) for k in two[0])


def test_resume_refuses_another_seq_len_or_seed(three_sources):
    state = Loader(three_sources, batch_size=2, seq_len=8).state_dict()
    with pytest.raises(ValueError, match="seq_len=8.*mid-training"):
        Loader(three_sources, batch_size=2, seq_len=16).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        Loader(three_sources, batch_size=2, seq_len=8, seed=1).load_state_dict(state)


# -----------------------------------------------------------------------------
# prepare: idempotent, crash-safe, tokenizers

def many_files(tmp_path, monkeypatch, n, docs=30):
    """n jsonl files in tmp_path/in, each its own unit of work (so its own shard)."""
    monkeypatch.setattr(data, "UNIT_BYTES", 1)
    rng = random.Random(0)
    os.makedirs(tmp_path / "in")
    for i in range(n):
        write_jsonl(tmp_path / f"in/{i}.jsonl", random_docs(rng, docs))
    return str(tmp_path / "in")


def shard_files(d):
    return {os.path.relpath(os.path.join(r, f), d): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, fs in os.walk(d) for f in fs}


def test_prepare_is_idempotent_and_redoes_only_what_changed(tmp_path, monkeypatch, capsys):
    inputs = many_files(tmp_path, monkeypatch, 3)
    out = tmp_path / "d"
    m1 = prepare([inputs], str(out), ByteTokenizer())
    before = shard_files(out)
    capsys.readouterr()
    m2 = prepare([inputs], str(out), ByteTokenizer())
    assert "up to date" in capsys.readouterr().out
    assert m2 == m1 and shard_files(out) == before  # nothing touched
    write_jsonl(tmp_path / "in/1.jsonl", random_docs(random.Random(1), 25))
    prepare([inputs], str(out), ByteTokenizer())
    after = shard_files(out)
    changed = {f.split(os.sep)[-1].split("-")[0].split(".")[0] for f in after if after[f] != before.get(f)}
    assert changed == {"00001", "manifest"}


def test_prepare_crash_leaves_nothing_trusted(tmp_path, monkeypatch, capsys):
    inputs = many_files(tmp_path, monkeypatch, 4)
    clean = prep(tmp_path / "clean", [f"src={inputs}"], workers=1)

    real, calls = data._prepare_unit, []

    def dies_on_third_unit(job):
        calls.append(job)
        if len(calls) == 3:
            # die mid-unit: the .bin is half written under its temporary name
            open(os.path.join(job[0], f"{job[1]}-train.bin.tmp{os.getpid()}"), "wb").write(b"\x01\x02")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(data, "_prepare_unit", dies_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path / "d", [f"src={inputs}"], workers=1)
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*prepare"):
        Loader(tmp_path / "d", batch_size=1, seq_len=4)
    monkeypatch.setattr(data, "_prepare_unit", real)
    capsys.readouterr()
    again = prepare([f"src={inputs}"], str(tmp_path / "d"), ByteTokenizer(), val_fraction=0.0, workers=1)
    assert "2 units to tokenize (2 already done)" in capsys.readouterr().err
    assert not [f for f in shard_files(tmp_path / "d") if ".tmp" in f]  # the dead run's leftovers are gone
    for k in ("fingerprint", "sources"):
        assert again[k] == clean[k]
    for f in shard_files(tmp_path / "clean"):
        if f.endswith(".bin"):
            assert open(tmp_path / "clean" / f, "rb").read() == open(tmp_path / "d" / f, "rb").read()


def test_truncated_shard_is_detected_and_rebuilt(tmp_path):
    spec = write_jsonl(tmp_path / "a.jsonl", random_docs(random.Random(0), 50))
    prep(tmp_path / "d", [spec])
    shard = tmp_path / "d" / "a" / "00000-train.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-6])
    with pytest.raises(ValueError, match="00000-train.bin is missing or not the size"):
        Loader(tmp_path / "d", batch_size=1, seq_len=4)
    prep(tmp_path / "d", [spec])  # not "up to date": the shard fails its check and is redone
    assert shard.read_bytes() == good
    next(Loader(tmp_path / "d", batch_size=1, seq_len=4))


def test_options_change_the_fingerprint(tmp_path, capsys):
    spec = write_jsonl(tmp_path / "a.jsonl", random_docs(random.Random(0), 50))
    m1 = prep(tmp_path / "d", [spec], val_fraction=0.0)
    m2 = prep(tmp_path / "d", [spec], val_fraction=0.5)
    assert m1["fingerprint"] != m2["fingerprint"]
    assert m2["sources"]["a"]["val"]["documents"] > 10


def test_tokenizer_file_matches_tokenizer_py(tmp_path, small_tokenizer, stdlib_texts):
    """Shards made through tiktoken from a tokenizer.py file hold exactly tokenizer.py's ids."""
    small_tokenizer.save(tmp_path / "tok")
    texts = stdlib_texts[:5] + ["<|im_start|> is text here", "Été 東京 🙂"]
    spec = write_jsonl(tmp_path / "a.jsonl", texts)
    m = prepare([spec], str(tmp_path / "d"), str(tmp_path / "tok.json"), val_fraction=0.0, verbose=False)
    eos = small_tokenizer.special_tokens["<|eos|>"]
    assert m["tokenizer"]["eos_id"] == eos and m["dtype"] == "uint16"
    tokens = np.fromfile(tmp_path / "d/a/00000-train.bin", dtype=np.uint16)
    offsets = np.load(tmp_path / "d/a/00000-train.docs.npy")
    for i, text in enumerate(texts):
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == small_tokenizer.encode(text) + [eos]
    # the same tokenizer as an object: the same shards; another tokenizer in that directory
    # changes the fingerprint, so nothing made with the first one is kept
    m2 = prepare([spec], str(tmp_path / "d2"), small_tokenizer, val_fraction=0.0, verbose=False)
    assert m2["sources"]["a"]["train"] == m["sources"]["a"]["train"]
    m3 = prepare([spec], str(tmp_path / "d2"), ByteTokenizer(), val_fraction=0.0, verbose=False)
    assert m3["fingerprint"] != m2["fingerprint"]
    assert m3["sources"]["a"]["train"]["tokens"] == sum(len(t.encode()) + 1 for t in texts)


def test_large_vocabulary_uses_uint32(tmp_path):
    encode = lambda text: [65536 + b for b in text.encode()]
    spec = write_jsonl(tmp_path / "a.jsonl", ["hello world", "more text here"])
    m = prepare([spec], str(tmp_path / "d"), encode, vocab_size=70000, val_fraction=0.0, verbose=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["eos_id"] is None
    tokens = np.fromfile(tmp_path / "d/a/00000-train.bin", dtype=np.uint32).tolist()
    assert tokens == encode("hello world") + encode("more text here")
    batch = next(Loader(tmp_path / "d", batch_size=2, seq_len=8))
    assert set(batch["input_ids"].flatten().tolist()) <= set(tokens)
    with pytest.raises(ValueError, match="outside its vocabulary"):
        prepare([spec], str(tmp_path / "e"), encode, vocab_size=1000, verbose=False)


def test_parallel_prepare_equals_serial(tmp_path, monkeypatch):
    inputs = many_files(tmp_path, monkeypatch, 5)
    one = prep(tmp_path / "one", [inputs], workers=1, val_fraction=0.3)
    two = prep(tmp_path / "two", [inputs], workers=2, val_fraction=0.3)
    assert one["sources"] == two["sources"]
    for f in shard_files(tmp_path / "one"):
        if f.endswith((".bin", ".npy")):
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


# -----------------------------------------------------------------------------
# Sources and the built-in corpus

def test_file_formats(tmp_path):
    texts = ["first document", "second one", "third"]
    os.makedirs(tmp_path / "mix")
    write_jsonl(tmp_path / "mix/a.jsonl", texts[:1], field="content")
    with gzip.open(tmp_path / "mix/b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": texts[1]}) + "\n\n")  # blank lines are not documents
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": [texts[2]], "n": [1]}), tmp_path / "mix/c.parquet")
    (tmp_path / "mix/notes.md").write_text("ignored: not a data file")
    m = prep(tmp_path / "d", [f"web={tmp_path / 'mix'}"], text_field="content")
    assert m["sources"]["web"]["train"]["documents"] == 3
    tokens = np.fromfile(tmp_path / "d/web/00000-train.bin", dtype=np.uint16)
    assert ByteTokenizer().decode(tokens.tolist()) == "".join(texts)
    # .txt: one document per file; a glob names its source after the directory
    (tmp_path / "t").mkdir()
    (tmp_path / "t/x.txt").write_text("plain text file")
    m = prep(tmp_path / "e", [str(tmp_path / "t/*.txt")])
    assert m["sources"]["t"]["train"] == {"tokens": len("plain text file") + 1, "documents": 1}


def test_math_is_the_layout_on_training_problems_of_the_demonstrated_levels():
    """Seeded; each document is `Question: <problem>\nAnswer: <working>\n#### <result>` in
    arithmetic.py's layout, a problem of its training split of 1 to DIGITS digits (never an RL
    prompt nor a held-out problem), its working and answer right; the levels come evenly; the
    layout and levels given are the ones written."""
    docs = [arithmetic.document(i, seed=0) for i in range(3000)]
    assert docs == [arithmetic.document(i, seed=0) for i in range(3000)]
    assert docs[:50] != [arithmetic.document(i, seed=1) for i in range(50)]
    levels = []
    for doc in docs:
        m = re.fullmatch(r"Question: (?:.*\n)?(\d+) ([-+]) (\d+)\nAnswer: (\d+)\n#### (\d{6})\n", doc)
        assert m, doc
        x, op, y, working, answer = m.groups()
        a, b = int(x[::-1]), int(y[::-1])            # the default layout writes numbers reversed
        c = arithmetic.result(a, op, b)
        assert arithmetic.split(a, op, b) == "train" and int(working[::-1]) == c and answer == working[::-1]
        levels.append(arithmetic.level(a, b))
    assert sorted(set(levels)) == list(range(1, arithmetic.DIGITS + 1))
    assert min(levels.count(d) for d in set(levels)) > 0.8 * len(docs) / arithmetic.DIGITS
    msd = arithmetic.document(7, 0, "msd", 5)
    assert re.search(r"(^Question: |\n)\d{6} [-+] \d{6}\nAnswer: \d{6}\n", msd)
    assert any(arithmetic.level(*map(int, re.search(r"(\d+) [-+] (\d+)", arithmetic.document(i, 0, "words", 5))
                                     .groups())) == 5 for i in range(50))


def test_heldout_math_is_every_level_of_the_held_out_split():
    docs = arithmetic.heldout_documents(50)
    problems = [re.search(r"(\d+) ([-+]) (\d+)\n", d).groups() for d in docs]
    problems = [(int(a[::-1]), op, int(b[::-1])) for a, op, b in problems]
    assert all(arithmetic.split(*p) == "heldout" for p in problems)
    assert [arithmetic.level(a, b) for a, _, b in problems[:10]] == list(arithmetic.LEVELS) * 2


def test_duplicates_never_straddle_the_split(tmp_path):
    texts = ["the same document"] * 40 + random_docs(random.Random(0), 200, hi=20)
    m = prep(tmp_path / "d", [write_jsonl(tmp_path / "a.jsonl", texts)], val_fraction=0.5)
    tokens = np.fromfile(tmp_path / "d/a/00000-train.bin", dtype=np.uint16).tolist()
    copies_in_train = ByteTokenizer().decode(tokens).count("the same document")
    assert copies_in_train in (0, 40)  # all 40 on one side
    assert 50 < m["sources"]["a"]["val"]["documents"] < 200  # while the others split about evenly


def test_builtin_corpus_and_val_split(tmp_path):
    m = prep(tmp_path / "d", ["code", "prose", "math"], max_docs=400, val_fraction=0.1, math=arithmetic.corpus())
    with pytest.raises(ValueError, match=r"math=\(generate, key\)"):        # data.py stands alone: no generator, no math
        prep(tmp_path / "e", ["math"], max_docs=10)
    s = m["sources"]
    assert set(s) == {"code", "prose", "math"}
    assert s["code"]["train"]["documents"] + s["code"]["val"]["documents"] + s["code"]["counts"]["empty"] == 400
    # ~10% of documents held out, chosen by content: the same text always lands on the same side
    n_val, n = s["math"]["val"]["documents"], 400
    assert 0.05 * n < n_val < 0.15 * n
    assert sum(data._is_val(arithmetic.document(i).encode(), 0.1) for i in range(400)) == n_val
    for name in s:
        Loader(tmp_path / "d", batch_size=2, seq_len=64, split="val", weights={name: 1})
    assert not any("/test/" in p or "idlelib" in p for p in data.stdlib_files())
    doc = data.docstrings('"""Module docstring that is long enough to be kept as prose."""\n'
                          'def f():\n    """A function docstring, also long enough to be kept."""\n')
    assert doc == ("Module docstring that is long enough to be kept as prose.\n\n"
                   "A function docstring, also long enough to be kept.")


# -----------------------------------------------------------------------------
# Bad input: each gets an error a person can act on

def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'nope'.*built-in"):
        prep(tmp_path / "d", ["nope"])
    with pytest.raises(ValueError, match="unknown source.*missing.jsonl"):
        prep(tmp_path / "d", [str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt"):
        prep(tmp_path / "d", [str(tmp_path / "empty")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv: unsupported file type"):
        prep(tmp_path / "d", [str(tmp_path / "x.csv")])
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ValueError, match="two sources are named 'a'"):
        prep(tmp_path / "d", [a, f"a={a}"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prepare([a], str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        prepare([a], str(tmp_path / "d"), str(tmp_path / "nope.json"))


def test_empty_source(tmp_path):
    spec = write_jsonl(tmp_path / "a.jsonl", ["", "   ", "\n"])
    with pytest.raises(ValueError, match="source .*a.jsonl.* has no documents .*3 were empty"):
        prep(tmp_path / "d", [spec])
    assert not os.path.exists(tmp_path / "d" / "manifest.json")


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "broken\n{"body": "no text"}\n[1, 2]\n{"text": null}\n{"text": "ok"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not valid JSON.*--skip-bad-lines"):
        prep(tmp_path / "d", [str(p)])
    assert not os.path.exists(tmp_path / "d" / "manifest.json")
    m = prep(tmp_path / "d", [str(p)], skip_bad_lines=True)
    assert m["sources"]["a"]["counts"]["bad_lines"] == 4
    assert m["sources"]["a"]["train"]["documents"] == 2
    assert "4 bad lines skipped" in data.summary(m)


def test_errors_from_worker_processes_name_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "UNIT_BYTES", 1)
    os.makedirs(tmp_path / "in")
    write_jsonl(tmp_path / "in/a.jsonl", ["fine"] * 3)
    (tmp_path / "in/b.jsonl").write_text('{"text": "ok"}\n{"text": 1}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: field 'text' is int, not a string"):
        prep(tmp_path / "d", [str(tmp_path / "in")], workers=2)


def test_missing_text_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ["x"], field="content")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text' \(it has 'content', 'id'\).*--text-field"):
        prep(tmp_path / "d", [p])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet: no column 'text' \(it has content\)"):
        prep(tmp_path / "e", [str(tmp_path / "b.parquet")])


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails
    with pytest.raises(ImportError, match="b.parquet needs pyarrow: pip install pyarrow"):
        prep(tmp_path / "d", [str(tmp_path / "b.parquet")], workers=1)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "fine"}\n')
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    m = prep(tmp_path / "d", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")])
    assert m["sources"]["a"]["counts"]["invalid_utf8"] == 1
    assert m["sources"]["b"]["counts"]["invalid_utf8"] == 1
    tokens = np.fromfile(tmp_path / "d/b/00000-train.bin", dtype=np.uint16).tolist()
    assert ByteTokenizer().decode(tokens) == "bad \ufffd\ufffd bytes"
    assert "1 documents with invalid UTF-8 replaced" in data.summary(m)


def test_bad_weights(three_sources):
    with pytest.raises(ValueError, match="weight of 'a' must be a finite number >= 0"):
        Loader(three_sources, batch_size=1, seq_len=4, weights={"a": -1, "b": 1})
    with pytest.raises(ValueError, match="unknown source 'web'; the prepared sources are a, b, c"):
        Loader(three_sources, batch_size=1, seq_len=4, weights={"web": 1})
    with pytest.raises(ValueError, match="at least one weight must be positive"):
        Loader(three_sources, batch_size=1, seq_len=4, weights={"a": 0})
    with pytest.raises(ValueError, match=r"stage 1.*stage ends must increase"):
        Loader(three_sources, batch_size=1, seq_len=4, weights=[(100, {"a": 1}), (50, {"b": 1}), (None, {"c": 1})])
    with pytest.raises(ValueError, match="'c' has weight 1 but its val split holds fewer than"):
        Loader(three_sources, batch_size=1, seq_len=4, weights={"c": 1}, split="val")
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        Loader(three_sources, batch_size=1, seq_len=4, rank=2, world_size=2)


def test_cli(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")
    spec = write_jsonl(tmp_path / "a.jsonl", ["some text for the command line"] * 3)
    run = lambda *a: subprocess.run([sys.executable, os.path.join(os.path.dirname(data.__file__), "data.py"), *a],
                                    capture_output=True, text=True)
    r = run("prepare", "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "d"),
            "--sources", spec, "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "a " in r.stdout and "1 units to tokenize" in r.stderr
    r = run("show", str(tmp_path / "d"), "--tokenizer", str(tmp_path / "tok.json"), "--seq-len", "8")
    assert r.returncode == 0 and "window 0" in r.stdout, r.stderr
    r = run("prepare", "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "e"), "--sources", "webb")
    assert r.returncode == 1 and "data.py: unknown source 'webb'" in r.stderr


def test_demo(capsys):
    data.main([])
    out = capsys.readouterr().out
    assert "nothing to do" in out and "stage 2" in out and "▌" in out
