"""Tests for eval.py: cloze scores against hand-computed sums and a naive forward pass, the
three normalisations, validation loss and bits per byte by hand, Wilson intervals by their
defining property, answer extraction, task files, the built-in tasks and their held-out text,
the pipeline checks (and that each of them can fail), determinism, the report card, the CLI;
pass@k against an enumeration of every k-subset, sampled evaluation (greedy at temperature 0,
seeded, counted per problem), paired differences by hand."""

import itertools
import json
import math
import os
import re
import statistics
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import arithmetic
import data
import eval
import model as M

BYTES = data.ByteTokenizer()
EOS = BYTES.special_tokens["<|eos|>"]
Z95 = statistics.NormalDist().inv_cdf(0.975)     # independent of eval.Z95
Z99 = statistics.NormalDist().inv_cdf(0.995)


def tiny_model(seed=0, max_seq_len=256):
    torch.manual_seed(seed)
    return M.Model(M.preset("tiny", vocab_size=257, n_layer=2, nope_layers=(1,), dim=64, n_head=2, n_kv_head=1,
                            mlp_dim=128, max_seq_len=max_seq_len)).eval()


class Bigram:
    """A fake model: log p(next | current) from a fixed (V, V) log-softmax table. Records the
    input_ids it is given; has a config (for truncation) only when given max_seq_len."""

    def __init__(self, V=257, seed=0, max_seq_len=None):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g).log_softmax(-1)
        self.inputs = []
        if max_seq_len:
            self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def log_probs(self, input_ids, labels, position_ids=None):
        self.inputs.append(input_ids.clone())
        return self.table[input_ids, labels.clamp(min=0)].masked_fill(labels == -100, 0.0)


def bigram_sum(table, ids, n_cont):
    """Hand reference: sum over the last n_cont tokens of log p(ids[t] | ids[t - 1]), a Python loop."""
    return sum(table[ids[t - 1], ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


class ByteCost:
    """A fake model: each labelled byte costs a fixed number of nats, whatever came before."""

    def __init__(self, cost, default=1.0):
        self.cost, self.default = cost, default

    def log_probs(self, input_ids, labels, position_ids=None):
        lp = torch.tensor([[-self.cost.get(int(y), self.default) for y in row] for row in labels])
        return lp.masked_fill(labels == -100, 0.0)


# -----------------------------------------------------------------------------
# Scoring

PAIRS = [("The cat", " sat"), ("A", " much longer continuation, with commas"), ("", "start"),
         ("x", " é 東"), ("Question: 2+2?\nAnswer:", " 4"), ("short", " s"), ("mid length", " here")]


def test_score_equals_hand_bigram_sums_in_input_order_for_any_batch_size():
    """score() gives each pair's hand-computed sum (empty context: after <|eos|>), in input order, at any batch size."""
    model = Bigram()
    want = []
    for ctx, cont in PAIRS:
        ids = ([EOS] if not ctx else []) + list((ctx + cont).encode())
        want.append(bigram_sum(model.table, ids, len(cont.encode())))
    got = {}
    for bs in (1, 3, 16):
        logps, ntoks, truncated = eval.score(model, BYTES, PAIRS, batch_size=bs)
        assert logps == pytest.approx(want, rel=1e-5)
        assert ntoks == [len(c.encode()) for _, c in PAIRS]
        assert truncated == 0
        got[bs] = logps
    # not bit-identical: float32 row sums over different padded widths round differently
    assert got[1] == pytest.approx(got[3], rel=1e-6) and got[3] == pytest.approx(got[16], rel=1e-6)


def test_empty_context_is_the_eos_token():
    """An empty context scores the continuation after <|eos|>: the byte tokenizer's 256, the BPE's own <|eos|> id."""
    model = Bigram()
    (lp,), _, _ = eval.score(model, BYTES, [("", "a")])
    assert lp == pytest.approx(model.table[EOS, ord("a")].item(), rel=1e-6)

    class NoSpecials:
        def encode(self, text):
            return list(text.encode())
    with pytest.raises(ValueError, match="eos"):
        eval.score(model, NoSpecials(), [("", "a")])


def test_empty_context_with_bpe_starts_with_its_eos(small_tokenizer):
    """With tokenizer.py's BPE the row the model sees for an empty context starts with that tokenizer's <|eos|>."""
    model = Bigram(V=eval.vocab_size(small_tokenizer))
    eval.score(model, small_tokenizer, [("", "hello")])
    assert model.inputs[0][0, 0].item() == small_tokenizer.special_tokens["<|eos|>"]


def test_empty_context_is_the_eos_that_ends_documents_in_training():
    """An empty context is a lone end-of-document token at position 0, the one data.py appends
    to every document (<|eos|> before <|endoftext|>, whatever order the tokenizer lists them
    in), and every token of the continuation is scored after it."""
    class Both(data.ByteTokenizer):
        vocab_size, special_tokens = 258, {"<|endoftext|>": 257, "<|eos|>": 256}

    seen = []

    class Recorder:
        def log_probs(self, input_ids, labels, position_ids=None):
            seen.append((input_ids.tolist(), labels.tolist(), position_ids.tolist()))
            return torch.zeros(labels.shape)

    eos = data._encoder(Both())[2]
    eval.score(Recorder(), Both(), [("", "ab")])
    assert seen == [([[eos, ord("a")]], [[ord("a"), ord("b")]], [[0, 1]])] and eos == 256


def test_trailing_whitespace_moves_to_the_continuation(small_tokenizer):
    """("Answer: ", "the") is scored as encode("Answer:") + encode(" the"), as the text is read whole."""
    tok = small_tokenizer
    ids = tok.encode("Answer:") + tok.encode(" the")
    assert ids == tok.encode("Answer: the")
    assert tok.encode("Answer: ") + tok.encode("the") != ids      # otherwise this test could not fail
    model = Bigram(V=eval.vocab_size(tok))
    logps, ntoks, _ = eval.score(model, tok, [("Answer: ", "the"), ("Answer:", " the")])
    want = bigram_sum(model.table, ids, len(tok.encode(" the")))
    assert logps == pytest.approx([want, want], rel=1e-6)
    assert ntoks == [len(tok.encode(" the"))] * 2


def test_pairs_longer_than_the_model_lose_tokens_from_the_left():
    """Pairs over max_seq_len are cut on the left (the model never sees more), scored on what is left, and counted."""
    model = Bigram(max_seq_len=8)
    pairs = [("ab", "cdefghijklm"), ("abcdefghij", "xyz"), ("ab", "cd")]
    logps, ntoks, truncated = eval.score(model, BYTES, pairs)
    t = model.table
    # 13 tokens each: the last 9 are kept, 8 of them labelled; the short pair is whole
    assert logps == pytest.approx([bigram_sum(t, list(b"efghijklm"), 8), bigram_sum(t, list(b"efghijxyz"), 3),
                                   bigram_sum(t, list(b"abcd"), 2)], rel=1e-6)
    assert ntoks == [8, 3, 2] and truncated == 2
    assert max(x.shape[1] for x in model.inputs) <= 8
    metrics, _ = eval.cloze(model, BYTES, [{"context": "ab", "choices": ["cdefghijklm", "cd"], "answer": 1}])
    assert metrics["truncated"]["value"] == 1 and metrics["truncated"]["n"] == 2
    metrics, _ = eval.cloze(model, BYTES, [{"context": "ab", "choices": ["cd", "ce"], "answer": 1}])
    assert "truncated" not in metrics


def test_an_empty_continuation_is_refused():
    """An empty continuation (nothing to score) is a ValueError that shows the context, not a tensor-size crash."""
    with pytest.raises(ValueError, match="empty continuation after 'abc'"):
        eval.score(Bigram(), BYTES, [("abc", ""), ("abc", " d")])


def test_score_equals_naive_unpadded_forward_of_a_real_model():
    """With a real tiny model, batched padded scoring equals one unpadded forward per pair (1e-5)."""
    net = tiny_model()
    pairs = [p for p in PAIRS if p[0]]
    logps, _, _ = eval.score(net, BYTES, pairs, batch_size=3)
    for (ctx, cont), got in zip(pairs, logps):
        ids = torch.tensor(list((ctx + cont).encode()))
        with torch.no_grad():
            logits, _, _ = net(ids[None])
        lp = logits[0].float().log_softmax(-1)
        n = len(cont.encode())
        want = sum(lp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        assert got == pytest.approx(want, rel=1e-5)


def test_normalisations_can_disagree():
    """acc / acc_token / acc_char on hand-costed choices: a long right answer wins per char and token but not raw."""
    # ' ' costs 3, 'a' 1, 'b' 3: " aaaaaaaa" = 11 nats over 9 bytes, " b" = 6 over 2.
    model = ByteCost({ord(" "): 3.0, ord("a"): 1.0, ord("b"): 3.0, 0xC3: 0.9, 0xA9: 0.9})
    examples = [{"context": "Q:", "choices": [" aaaaaaaa", " b"], "answer": 0}]
    # second model: ' ' and 'a' 1, the two bytes of 'é' 0.9: " aa" = 3 nats, 3 tokens, 3 chars;
    # " é" = 2.8 nats, 3 tokens, 2 chars. Per token " é" wins, per char " aa".
    model2 = ByteCost({ord(" "): 1.0, ord("a"): 1.0, 0xC3: 0.9, 0xA9: 0.9})
    pair = [{"context": "Q:", "choices": [" aa", " é"], "answer": a} for a in (0, 1)]
    metrics, details = eval.cloze(model, BYTES, examples)
    assert details[0]["correct"] == {"acc": False, "acc_token": True, "acc_char": True}
    assert metrics["acc"]["value"] == 0 and metrics["acc_char"]["value"] == 1
    assert details[0]["scores"]["acc"] == pytest.approx([-11, -6])
    assert details[0]["scores"]["acc_char"] == pytest.approx([-11 / 9, -3])
    metrics2, details2 = eval.cloze(model2, BYTES, pair)
    assert details2[0]["correct"] == {"acc": False, "acc_token": False, "acc_char": True}
    assert details2[1]["correct"] == {"acc": True, "acc_token": True, "acc_char": False}
    assert details2[0]["scores"]["acc_token"] == pytest.approx([-1, -2.8 / 3])
    assert details2[0]["scores"]["acc_char"] == pytest.approx([-1, -1.4])
    assert metrics2["acc"]["value"] == 0.5 and metrics2["chance"]["value"] == 0.5


def test_a_tie_is_wrong_whatever_the_order():
    """Two identical best choices: wrong on every norm whichever is the answer; a control without the tie is right."""
    model = ByteCost({ord("n"): 5.0, ord("o"): 5.0})
    for a in (0, 1):
        _, details = eval.cloze(model, BYTES, [{"context": "Q:", "choices": [" yes", " yes", " no"], "answer": a}])
        assert details[0]["correct"] == dict.fromkeys(eval.NORMS, False)
    _, details = eval.cloze(model, BYTES, [{"context": "Q:", "choices": [" yes", " no"], "answer": 0}])
    assert details[0]["correct"] == dict.fromkeys(eval.NORMS, True)


# -----------------------------------------------------------------------------
# Validation loss and bits per byte

class RowModel:
    """A fake model in the project's contract: each row's mean cross-entropy is row_ce(input_ids)."""

    def __init__(self, row_ce):
        self.row_ce = row_ce

    def __call__(self, input_ids, labels=None, position_ids=None):
        return None, None, {"row_ce": self.row_ce(input_ids)}


def make_batch(texts, T=40, eos=True, source=None):
    """Rows of the project's contract from texts (bytes, then an <|eos|> when eos), right-padded."""
    B = len(texts)
    b = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": torch.full((B, T), -100, dtype=torch.long),
         "position_ids": torch.arange(T).expand(B, T).clone()}
    for r, text in enumerate(texts):
        ids = list(text.encode()) + ([EOS] if eos else [])
        b["input_ids"][r, :len(ids) - 1] = torch.tensor(ids[:-1])
        b["labels"][r, :len(ids) - 1] = torch.tensor(ids[1:])
    if source is not None:
        b["source"] = torch.tensor(source)
    return b


TEXTS = ["hello world", "Été 東京 🙂 naïve", "def f(x):\n    return x", "12 + 30 = 42"]


def test_uniform_model_loss_is_log_v_and_bpb_is_by_hand():
    """A uniform model: val_loss = ln V; bpb = tokens ln V / (ln 2 bytes), exactly 8 for 256 choices over bytes."""
    uniform = lambda V: RowModel(lambda x: torch.full((len(x),), math.log(V), dtype=torch.float64))
    got = eval.validation(uniform(256), [make_batch(TEXTS, eos=False)], eval.token_bytes(BYTES, 384))
    assert got["val_loss"]["value"] == pytest.approx(math.log(256), rel=1e-12)
    assert got["val_bpb"]["value"] == pytest.approx(8.0, rel=1e-12)
    # with the <|eos|> labels: they count as tokens, at zero bytes
    got = eval.validation(uniform(257), [make_batch(TEXTS[:2]), make_batch(TEXTS[2:])], eval.token_bytes(BYTES, 384))
    tokens = sum(len(t.encode()) for t in TEXTS)
    nbytes = sum(len(t.encode()) - 1 for t in TEXTS)
    assert got["val_loss"]["value"] == pytest.approx(math.log(257), rel=1e-12)
    assert got["val_bpb"]["value"] == pytest.approx(tokens * math.log(257) / (math.log(2) * nbytes), rel=1e-12)
    assert got["val_loss"]["n"] == 4


def test_validation_per_source():
    """Per-source keys hold the token-weighted loss of that source's rows only; a source without rows has none."""
    model = RowModel(lambda x: x[:, 0].double() / 10)         # each row's loss: its first byte / 10
    batches = [make_batch(TEXTS[:2], source=[0, 1]), make_batch(TEXTS[2:], source=[1, 0])]
    got = eval.validation(model, batches, eval.token_bytes(BYTES, 384), names=("code", "math", "prose"))
    for s, name in enumerate(("code", "math")):
        rows = [t for t, src in zip(TEXTS, [0, 1, 1, 0]) if src == s]
        nats = sum(t.encode()[0] / 10 * len(t.encode()) for t in rows)
        tokens = sum(len(t.encode()) for t in rows)
        nbytes = sum(len(t.encode()) - 1 for t in rows)
        assert got[f"val_loss/{name}"]["value"] == pytest.approx(nats / tokens, rel=1e-12)
        assert got[f"val_bpb/{name}"]["value"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-12)
    assert "val_loss/prose" not in got and "val_bpb/prose" not in got


def test_token_bytes_of_the_byte_tokenizer():
    """Byte ids stand for 1 byte; <|eos|> and padding ids past the vocabulary for 0."""
    assert eval.token_bytes(BYTES, 384).tolist() == [1] * 256 + [0] * 128


def test_token_bytes_of_tiktoken_sum_to_utf8_length(small_tokenizer):
    """Over a tiktoken encoding of non-ASCII text, token bytes sum to len(text.encode()); special tokens are 0."""
    enc = small_tokenizer.enc
    tb = eval.token_bytes(enc)
    for text in ("Été 東京 🙂 naïve", "def f(x):\n    return x  # ok", "<|eos|> is plain text here"):
        assert tb[eval.encode(enc, text)].sum().item() == len(text.encode())
    assert all(tb[i].item() == 0 for i in small_tokenizer.special_tokens.values())
    assert eval.token_bytes(enc, 640)[enc.n_vocab:].sum().item() == 0          # a model's padding rows


def test_token_bytes_of_tokenizer_py_object_sum_to_utf8_length(small_tokenizer):
    """The same with tokenizer.py's Tokenizer itself, which eval.py's docstring says it accepts."""
    text = "Été 東京 🙂 naïve"
    assert eval.token_bytes(small_tokenizer)[eval.encode(small_tokenizer, text)].sum().item() == len(text.encode())


def test_validation_of_a_real_model_equals_its_cross_entropy():
    """val_loss is F.cross_entropy over every labelled token (and the model's own loss); bpb those nats over bytes."""
    net = tiny_model()
    assert net.config.z_loss == 0                # else the model's loss holds more than cross-entropy
    b1 = make_batch(TEXTS[:2])
    b1["labels"][0, :3] = -100                   # a masked prompt, as in the project's batches
    b2 = make_batch(TEXTS[2:], T=32)
    got = eval.validation(net, [b1, b2], eval.token_bytes(BYTES, net.config.padded_vocab))
    nats = tokens = nbytes = 0
    with torch.no_grad():
        for b in (b1, b2):
            logits, _, _ = net(b["input_ids"], position_ids=b["position_ids"])
            nats += F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100,
                                    reduction="sum").item()
            tokens += (b["labels"] != -100).sum().item()
            nbytes += ((b["labels"] >= 0) & (b["labels"] < 256)).sum().item()
        _, loss, _ = net(b1["input_ids"], labels=b1["labels"], position_ids=b1["position_ids"])
    assert got["val_loss"]["value"] == pytest.approx(nats / tokens, rel=1e-5)
    assert got["val_bpb"]["value"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert eval.validation(net, [b1], eval.token_bytes(BYTES, 384))["val_loss"]["value"] == pytest.approx(
        loss.item(), rel=1e-5)


def test_ratio_interval_with_equal_denominators_is_the_standard_error_of_the_mean():
    """With equal denominators, ratio()'s half-width is z * stdev(num_i / den_i) / sqrt(k) (statistics module)."""
    g = torch.Generator().manual_seed(1)
    num = (torch.rand(20, generator=g, dtype=torch.float64) * 50).tolist()
    m = eval.ratio(num, [10.0] * 20)
    per_row = [x / 10 for x in num]
    assert m["value"] == pytest.approx(statistics.fmean(per_row), rel=1e-12)
    assert (m["high"] - m["low"]) / 2 == pytest.approx(Z95 * statistics.stdev(per_row) / math.sqrt(20), rel=1e-9)
    assert eval.ratio([1.0, 2.0], [1.0, 3.0])["value"] == pytest.approx(0.75)
    assert eval.ratio([3.0], [2.0])["n"] == 1


# -----------------------------------------------------------------------------
# Wilson intervals

@pytest.mark.parametrize("k,n", [(1, 10), (8, 10), (37, 100), (99, 100), (5, 7), (0, 24), (30, 30)])
def test_wilson_bounds_are_exactly_z_standard_errors_away(k, n):
    """At a Wilson bound p, |k/n - p| = z sqrt(p (1 - p) / n) (for 95% and 99%); 0 and n pin 0 and 1."""
    for z in (Z95, Z99):
        low, high = eval.wilson(k, n, z)
        for bound in ((low,) if k else ()) + ((high,) if k < n else ()):
            assert abs(k / n - bound) / math.sqrt(bound * (1 - bound) / n) == pytest.approx(z, rel=1e-9)
        assert low <= k / n <= high
    low, high = eval.wilson(k, n)
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)


def test_wilson_published_value_and_empty():
    """Wilson 95% for 8/10 is (0.490, 0.943); n = 0 gives (0, 1)."""
    assert eval.wilson(8, 10) == pytest.approx((0.490, 0.943), abs=1e-3)
    assert eval.wilson(0, 0) == (0.0, 1.0)


# -----------------------------------------------------------------------------
# Answer extraction

@pytest.mark.parametrize("text,want", [
    ("so she has 72 left.\n#### 72", "72"), ("#### 1,234", "1,234"), ("#### -5", "-5"),
    ("The answer is 3.5.", "3.5"), ("3 apples and 4 pears", "4"), ("so \\boxed{17} and 9 more", "17"),
    ("no numbers here", None), ("#### ", None), ("#### 5\nQuestion: what is 6?", "5"),
    ("#### 3 remainder 1", "3 remainder 1"), ("it costs $1,234, then", "1,234"),
    ("\\boxed{} and 7", "7")])
def test_extract_answer(text, want):
    """extract_answer: #### on its own line first, then \\boxed, then the last number; None when there is none."""
    assert eval.extract_answer(text) == want


@pytest.mark.parametrize("pred,ref,same", [
    ("1,234", "1234", True), ("3.0", "3", True), ("$5", "5", True), ("42.", "42", True), ("-0", "0", True),
    ("3 remainder 1", "3 remainder 1", True), ("3 remainder 1", "3 remainder 2", False), ("3", "3 remainder 1", False),
    ("4", "5", False), (None, "", False), ("", "", False), (None, None, False), (" ", " ", False),
    ("1e3", "1000", False), ("1_0", "10", False), ("nan", "nan", True)])
def test_same_answer(pred, ref, same):
    """same_answer: numbers compare as numbers, normalisation drops $ . and thousands commas; nothing never matches."""
    assert eval.same_answer(pred, ref) is same


def test_normalize_answer():
    """normalize_answer lowercases, collapses spaces, drops $, a final "." and thousands separators only."""
    assert eval.normalize_answer("  The  Answer $1,234,567. ") == "the answer 1234567"
    assert eval.normalize_answer("1,23") == "1,23" and eval.normalize_answer("1,2345") == "1,2345"


def test_generative_cuts_at_the_next_question_and_truncates_prompts():
    """generative(): the prompt rstripped and cut on the left to leave room; the completion cut at "\\nQuestion:"."""
    seen = []

    class Scripted:
        config = SimpleNamespace(max_seq_len=40)

        def generate(self, prompts, max_new_tokens, temperature, stop_ids=()):
            seen.extend(prompts)
            assert temperature == 0 and EOS in stop_ids
            return [list(b" 3 apples\nQuestion: What is 9?\nAnswer: 9") + [EOS] for _ in prompts]

    examples = [{"prompt": "Question: 1+2?\nAnswer: ", "answer": "3"}, {"prompt": "Q" * 50, "answer": "9"}]
    metrics, details = eval.generative(Scripted(), BYTES, examples, max_new_tokens=16)
    assert seen[0] == list(b"Question: 1+2?\nAnswer:") and seen[1] == list(b"Q" * 24)
    assert [d["predicted"] for d in details] == ["3", "3"] and [d["correct"] for d in details] == [True, False]
    assert metrics["exact_match"]["value"] == 0.5 and metrics["truncated"]["value"] == 1


def test_generative_reads_no_answer_from_an_unfinished_thought():
    """A completion whose thinking block never closes (it ran out of tokens mid-thought) has no
    answer, though its working holds the right number; one that closes is read after the last
    </think> (tests/test_rl.py checks rl.py's reward reads the same answers)."""
    class Scripted:
        config = SimpleNamespace(max_seq_len=64)

        def generate(self, prompts, max_new_tokens, temperature, stop_ids=()):
            return [list(text.encode()) for text in outs[:len(prompts)]]

    outs = ["<think>\n2 + 3 = 5", "<think>\n5\n</think>\n<think>\nso 5", "<think>\n4\n</think>\nIt is 5."]
    _, details = eval.generative(Scripted(), BYTES, [{"prompt": "2 + 3?", "answer": "5"}] * 3)
    assert [d["predicted"] for d in details] == [None, None, "5"]


# -----------------------------------------------------------------------------
# Sampled evaluation: pass@k, paired differences

@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 5, 2), (6, 2, 3), (7, 3, 1), (8, 1, 8),
                                   (8, 7, 2), (10, 4, 4), (10, 3, 7), (9, 6, 5)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_sample(n, c, k):
    """pass_at_k(n, c, k) == the fraction of all k-subsets of n samples (the first c right) with a right one."""
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert eval.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_is_stable_for_many_samples_and_refuses_k_above_n():
    """n = 1000 (binomials of ~300 digits) matches the exact rational; k > n, k < 1 and c > n are errors."""
    for n, c, k in [(1000, 1, 500), (1000, 3, 10), (400, 200, 100)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert eval.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    for n, c, k in [(4, 2, 5), (4, 2, 0), (4, 5, 2)]:
        with pytest.raises(ValueError):
            eval.pass_at_k(n, c, k)


class Scripted:
    """A fake sampler: each prompt's completions in turn, from a script keyed by the prompt's
    text; checks that sampling gets the temperature and a seeded generator."""
    config = SimpleNamespace(max_seq_len=64)

    def __init__(self, script, temperature):
        self.script, self.temperature, self.batches = {q: list(outs) for q, outs in script.items()}, temperature, []

    def generate(self, prompts, max_new_tokens, temperature, stop_ids=(), generator=None):
        assert temperature == self.temperature and isinstance(generator, torch.Generator)
        self.batches.append(len(prompts))
        return [list(self.script[bytes(p).decode()].pop(0).encode()) + [EOS] for p in prompts]


def test_sampled_counts_each_problems_samples_and_intervals_over_problems():
    """Four samples of four problems in batches of 3 (which straddle problems): c_i, the answers
    in order, pass@1 = mean c_i / n, pass@2 by hand, pass@4 = share of problems with a right one,
    each with the normal interval over problems clipped to [0, 1]; pass_at_k_curve agrees."""
    script = {"Q0": ["1", "1", "so 1", "1"], "Q1": ["2", "x", "5", "2\nQuestion: 7"], "Q2": ["no", "9", "9", "9"],
              "Q3": ["4", "0", "0", "0"]}
    examples = [{"prompt": f"Q{i}", "answer": str(i + 1)} for i in range(4)]
    model = Scripted(script, 0.7)
    metrics, details = eval.sampled(model, BYTES, examples, samples=4, temperature=0.7, max_new_tokens=16,
                                     batch_size=3, ks=[2])
    assert model.batches == [3, 3, 3, 3, 3, 1]
    assert details == [{"correct": 4, "samples": 4, "answers": ["1", "1", "1", "1"]},
                       {"correct": 2, "samples": 4, "answers": ["2", None, "5", "2"]},
                       {"correct": 0, "samples": 4, "answers": [None, "9", "9", "9"]},
                       {"correct": 1, "samples": 4, "answers": ["4", "0", "0", "0"]}]
    per_problem = {1: [1, 0.5, 0, 0.25], 2: [1, 1 - 1 / 6, 0, 1 - 3 / 6], 4: [1, 1, 0, 1]}
    assert set(metrics) == {"pass@1", "pass@2", "pass@4"}
    for k, values in per_problem.items():
        mean, half = statistics.mean(values), Z95 * statistics.stdev(values) / 2
        want = {"value": mean, "low": max(0, mean - half), "high": min(1, mean + half), "n": 4}
        assert metrics[f"pass@{k}"] == pytest.approx(want), k
    assert metrics["pass@4"]["high"] == 1.0          # 0.75 + 0.49: clipped
    assert eval.pass_at_k_curve(details, [1, 2, 4]) == pytest.approx({k: statistics.mean(v)
                                                                      for k, v in per_problem.items()})
    with pytest.raises(ValueError, match="pass@8"):
        eval.sampled(model, BYTES, examples, samples=4, temperature=0.7, ks=[8])


def loud_model(seed=2):
    """A tiny model with its weights scaled 30-fold: its greedy completions vary with the prompt
    and hold a number now and then (a freshly initialised one repeats one byte)."""
    net = tiny_model(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(30)
    return net


def test_sampled_at_temperature_0_is_greedy_generative(small_tasks):
    """At temperature 0 every sample is generative's greedy completion (a real tiny model): the
    same answer n times, c_i = n or 0, and pass@1 == pass@n == exact match."""
    net = loud_model()
    examples = small_tasks["arithmetic"][1][:12]
    _, greedy = eval.generative(net, BYTES, examples, max_new_tokens=24)
    # half the answers the model gives made the references: else a random model's 0 == 0 == 0 proves little
    agree = [i for i, g in enumerate(greedy) if g["predicted"]][::2]
    examples = [{**ex, "answer": greedy[i]["predicted"] if i in agree else ex["answer"]}
                for i, ex in enumerate(examples)]
    exact, greedy = eval.generative(net, BYTES, examples, max_new_tokens=24)
    assert 0 < exact["exact_match"]["value"] < 1
    metrics, details = eval.sampled(net, BYTES, examples, samples=3, temperature=0, max_new_tokens=24, batch_size=7)
    assert [d["answers"] for d in details] == [[g["predicted"]] * 3 for g in greedy]
    assert [d["correct"] for d in details] == [3 * g["correct"] for g in greedy]
    assert metrics["pass@1"]["value"] == metrics["pass@3"]["value"] == exact["exact_match"]["value"]


def test_sampled_is_reproducible_with_its_seed(small_tasks):
    """The same seed gives the same samples whatever the global RNG did in between; another seed others."""
    net = tiny_model()
    examples = small_tasks["arithmetic"][1][:6]

    def run(seed):
        return eval.sampled(net, BYTES, examples, samples=4, max_new_tokens=24, seed=seed)
    first = run(0)
    torch.manual_seed(1234)
    assert run(0) == first
    assert run(1)[1] != first[1]
    assert len({a for d in first[1] for a in d["answers"]}) > 3         # really sampled: the answers vary


def test_paired_difference_by_hand():
    """paired(): the mean difference and mean +- 1.96 sd(d) / sqrt(n); bools count 0/1; unequal
    lengths and scores outside [0, 1] are errors; on problems of shared difficulty its interval
    is far narrower than the two models' own."""
    new, old = [1, 1, 0, 1, 0.5], [0, 1, 0, 0, 0.25]
    d = [1, 0, 0, 1, 0.25]
    half = Z95 * statistics.stdev(d) / math.sqrt(5)
    assert eval.paired(new, old) == pytest.approx({"value": 0.45, "low": 0.45 - half, "high": 0.45 + half, "n": 5})
    assert eval.paired([True, True, False], [False, True, False])["value"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not the same problems"):
        eval.paired([True, False], [True])
    with pytest.raises(ValueError):
        eval.paired([3], [1])                              # a count, not a per-problem score
    old = [i / 40 for i in range(40)]                      # problems from hopeless to easy
    new = [min(1.0, x + (0.1 if i % 3 else 0.0)) for i, x in enumerate(old)]
    width = {name: m["high"] - m["low"] for name, m in
             [("paired", eval.paired(new, old)), ("new", eval.average(new, 0, 1)), ("old", eval.average(old, 0, 1))]}
    assert width["paired"] < 0.5 * math.hypot(width["new"], width["old"])


# -----------------------------------------------------------------------------
# Task files

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_task_common_shapes(tmp_path):
    """HellaSwag, ARC (letters and numbers), MMLU, PIQA and GSM8K rows parse to the exact examples."""
    row = lambda **kw: json.dumps(kw)
    cases = [
        (row(ctx="A man is", endings=["sitting.", "running.", "x", "y"], label="2"),
         ("cloze", {"context": "A man is", "choices": [" sitting.", " running.", " x", " y"], "answer": 2})),
        (row(question="Q?", choices={"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, answerKey="C"),
         ("cloze", {"context": "Question: Q?\nAnswer:", "choices": [" a", " b", " c", " d"], "answer": 2})),
        (row(question="Q?", choices={"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, answerKey="1"),
         ("cloze", {"context": "Question: Q?\nAnswer:", "choices": [" a", " b", " c", " d"], "answer": 0})),
        (row(question="Which?", subject="x", choices=["w", "x", "y", "z"], answer=3),
         ("cloze", {"context": "Question: Which?\nAnswer:", "choices": [" w", " x", " y", " z"], "answer": 3})),
        (row(goal="Open a jar", sol1="twist the lid", sol2="eat the lid", label=1),
         ("cloze", {"context": "Question: Open a jar\nAnswer:", "choices": [" twist the lid", " eat the lid"],
                    "answer": 1})),
        (row(question="Tom has 70 and gets 2. How many?", answer="70 + 2 = 72\n#### 72"),
         ("generative", {"prompt": "Question: Tom has 70 and gets 2. How many?\nAnswer:", "answer": "72"})),
    ]
    for i, (line, want) in enumerate(cases):
        assert eval.read_task(write_lines(tmp_path / f"t{i}.jsonl", [line])) == (want[0], [want[1]])


@pytest.mark.parametrize("lines,line", [
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": oops}'], 2),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], 1),
    (['{"question": "q", "choices": ["a", "b"], "answer": "-1"}'], 1),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '', '{"text": "neither"}'], 3),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": "q", "answer": "4"}'], 2),
    (['[1, 2]'], 1)])
def test_read_task_errors_name_file_and_line(tmp_path, lines, line):
    """Bad JSON, an answer out of range, a shapeless row, mixed kinds: ValueError naming path:LINE (blanks count)."""
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}") + r"\b"):
        eval.read_task(path)


def test_read_task_empty_file_and_blank_lines(tmp_path):
    """An empty file is a ValueError naming it; blank lines between rows are skipped."""
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(path)):
        eval.read_task(path)
    rows = ['{"question": "a", "answer": 1}', "", '{"question": "b", "answer": 2}']
    path = write_lines(tmp_path / "gaps.jsonl", rows)
    assert eval.read_task(path) == ("generative", [{"prompt": "Question: a\nAnswer:", "answer": "1"},
                                                   {"prompt": "Question: b\nAnswer:", "answer": "2"}])


# -----------------------------------------------------------------------------
# Built-in tasks

SOURCES = ['''
def area(width, height):
    """Return the area of a width by height rectangle."""
    return width * height


def greet(name):
    """Build a friendly greeting for the given name.

    More text that is not asked about.
    """
    return "hello " + name


class Stack:
    def push(self, item):
        """Put one item on top of the stack."""
        self.items.append(item)

    def pop(self):
        """Take the top item off the stack and return it."""
        return self.items.pop()


def short():
    """Too short."""


def oneliner(): """One-line functions are not asked about."""


def nodoc(x):
    return x
''', """
async def fetch(url):
    '''Download the page at url and return its text.'''
    return await get(url)


def combine(first,
            second):
    '''Join two strings with a single space between them.'''
    return first + " " + second
"""]
DOCSTRINGS = {"area": "Return the area of a width by height rectangle.",
              "greet": "Build a friendly greeting for the given name.",
              "push": "Put one item on top of the stack.", "pop": "Take the top item off the stack and return it.",
              "fetch": "Download the page at url and return its text.",
              "combine": "Join two strings with a single space between them."}


def test_docstring_examples():
    """One example per eligible function; four distinct choices, exactly one (the answer) its true docstring line,
    as the source has it right after the quotes (no added space)."""
    examples = eval.docstring_examples(SOURCES)
    names = [re.search(r"def (\w+)", ex["context"]).group(1) for ex in examples]
    assert sorted(names) == sorted(DOCSTRINGS)
    for name, ex in zip(names, examples):
        true = DOCSTRINGS[name]
        assert ex["context"].endswith(('"""', "'''")) and len(set(ex["choices"])) == len(ex["choices"]) == 4
        assert ex["choices"].count(true) == 1 and ex["choices"][ex["answer"]] == true
        assert set(ex["choices"]) <= set(DOCSTRINGS.values())
    assert eval.docstring_examples(SOURCES) == examples                  # the same seed, the same examples
    other = eval.docstring_examples(SOURCES, seed=1)
    assert other != examples and sorted(e["context"] for e in other) == sorted(e["context"] for e in examples)


NEXT_LINE_SOURCE = "\n".join(
    ["import os"] + [f"{'    ' * (i % 3)}value_{i:02d} = compute({i}, scale={i * 3})" for i in range(1, 30)]
    + ["    x = 1", "", "print(value_29)  # the end"])


def test_next_line_examples():
    """Every line of 8+ characters after the twelfth is asked; the answer is the line that follows the context."""
    examples = eval.next_line_examples([NEXT_LINE_SOURCE])
    lines = NEXT_LINE_SOURCE.split("\n")
    assert len(examples) == sum(len(x.strip()) >= 8 for x in lines[12:])
    for ex in examples:
        assert NEXT_LINE_SOURCE.count(ex["context"]) == 1 and ex["context"].count("\n") == 12
        true = NEXT_LINE_SOURCE[NEXT_LINE_SOURCE.index(ex["context"]) + len(ex["context"]):].split("\n")[0]
        assert ex["choices"][ex["answer"]] == true and ex["choices"].count(true) == 1
        assert len(set(ex["choices"])) == 4 and set(ex["choices"]) <= set(lines)
    assert eval.next_line_examples([NEXT_LINE_SOURCE]) == examples
    other = eval.next_line_examples([NEXT_LINE_SOURCE], seed=1)
    assert other != examples and sorted(e["context"] for e in other) == sorted(e["context"] for e in examples)


def test_next_line_examples_survive_a_short_file():
    """A file with too few distinct lines for four choices gives no bad examples rather than an exception."""
    short = "\n".join(f"x{i} = {i}" for i in range(12)) + "\nresult = compute_everything()\nprint(result)\n"
    examples = eval.next_line_examples([NEXT_LINE_SOURCE, short])
    assert examples and all(len(set(ex["choices"])) == 4 for ex in examples)


def test_arithmetic_examples():
    """Math documents become prompts up to "Answer:" with the number after "####" as the answer; others are skipped."""
    docs = [arithmetic.document(i) for i in range(30)]
    examples = eval.arithmetic_examples(docs + ["not a math document"])
    assert len(examples) == 30
    for doc, ex in zip(docs, examples):
        assert ex["prompt"] == doc.split("\nAnswer:")[0] + "\nAnswer:"
        assert ex["answer"] == doc.split("#### ")[1].strip() and "####" not in ex["prompt"]


def test_heldout_text_is_held_out():
    """Held-out math problems are never the corpus's problems; held-out code files all hash into the val split."""
    numbers = lambda doc: doc.split("\nAnswer:")[0].split("\n")[-1]     # the problem, without its words
    train_questions = {numbers(arithmetic.document(i)) for i in range(data.MATH_DOCUMENTS)}
    held = arithmetic.heldout_documents(50)
    assert len(held) == 50 and not {numbers(d) for d in held} & train_questions
    code = data.heldout_code()
    assert code and all(data._is_val(t.encode("utf-8", errors="replace"), data.VAL_FRACTION) for t in code)


# -----------------------------------------------------------------------------
# Validating the pipeline

@pytest.fixture(scope="module")
def small_tasks():
    return eval.subset(eval.builtin_tasks(data.heldout_code(), arithmetic.heldout_documents(60)), 24)


def cloze_only(tasks):
    return {k: v for k, v in tasks.items() if v[0] == "cloze"}


def statuses(results):
    return {check: status for status, check, _ in results}


def test_a_sound_pipeline_passes_and_the_oracle_scores_100(small_tasks):
    """A random tiny model on the built-in tasks: no FAIL; the Oracle alone gets 1.0 on every norm and exact match."""
    results = eval.validate_pipeline(tiny_model(), BYTES, small_tasks, max_new_tokens=24)   # room for the oracle
    assert len(results) == 8 and not [r for r in results if r[0] == "FAIL"], results
    oracle = eval.Oracle(BYTES, small_tasks)
    for name, (kind, examples) in small_tasks.items():
        if kind == "cloze":
            metrics, _ = eval.cloze(oracle, BYTES, examples)
            assert all(metrics[n]["value"] == 1.0 for n in eval.NORMS), name
        else:
            metrics, _ = eval.generative(oracle, BYTES, examples, max_new_tokens=24)
            assert metrics["exact_match"]["value"] == 1.0


def test_oracle_check_fails_when_scores_lose_their_choices(small_tasks, monkeypatch):
    """score() returning its results rotated by one (a pipeline bug) makes every cloze oracle check FAIL."""
    score = eval.score

    def rotated(*args, **kw):
        logps, ntoks, truncated = score(*args, **kw)
        return logps[1:] + logps[:1], ntoks[1:] + ntoks[:1], truncated
    monkeypatch.setattr(eval, "score", rotated)
    got = statuses(eval.validate_pipeline(Bigram(), BYTES, cloze_only(small_tasks)))
    assert got["docstring: oracle"] == got["next_line: oracle"] == "FAIL"


def test_oracle_check_fails_when_extraction_is_wrong(monkeypatch):
    """A generative answer extraction that keeps only the last number FAILs the oracle on "q remainder r" answers."""
    tasks = {"div": ("generative", [{"prompt": "Question: What is 7 divided by 2, with remainder?\nAnswer:",
                                     "answer": "3 remainder 1"},
                                    {"prompt": "Question: What is 1 + 1?\nAnswer:", "answer": "2"}])}
    silent = SimpleNamespace(generate=lambda prompts, **kw: [[] for _ in prompts])    # knows nothing, says nothing
    assert statuses(eval.validate_pipeline(silent, BYTES, tasks, max_new_tokens=32))["div: oracle"] == "PASS"
    monkeypatch.setattr(eval, "extract_answer", lambda text: (re.findall(r"-?\d+", text) or [None])[-1])
    assert statuses(eval.validate_pipeline(silent, BYTES, tasks, max_new_tokens=32))["div: oracle"] == "FAIL"


def test_chance_check_warns_on_a_task_that_leaks_its_answer():
    """The right choice always the shortest: a near-uniform model beats chance unnormalised; the check WARNs."""
    distractors = [" a much longer wrong choice, number one", " another long and wrong choice, number two",
                   " the third long wrong choice of the lot"]
    examples = []
    for i in range(30):
        choices = list(distractors)
        choices.insert(i % 4, " ok")
        examples.append({"context": f"Item {i}:", "choices": choices, "answer": i % 4})
    results = eval.validate_pipeline(tiny_model(), BYTES, {"leaky": ("cloze", examples)})
    got = statuses(results)
    assert got["leaky: chance"] == "WARN" and got["leaky: oracle"] == got["leaky: shuffle"] == "PASS"
    assert "'acc'" in next(d for s, c, d in results if c == "leaky: chance")


class FirstRowBonus(Bigram):
    """A broken scorer: the first row of every batch gets +50 nats per labelled token."""

    def log_probs(self, input_ids, labels, position_ids=None):
        lp = super().log_probs(input_ids, labels, position_ids).clone()
        lp[0] += 50.0 * (labels[0] != -100)
        return lp


def test_shuffle_check_fails_for_a_position_dependent_scorer():
    """One example per batch of equal-length rows: a first-row bonus FAILs the shuffle check; a plain bigram PASSes."""
    examples = [{"context": f"Q{i}:", "choices": [" a", " b", " c", " d"], "answer": i % 4} for i in range(8)]
    tasks = {"pos": ("cloze", examples)}
    assert statuses(eval.validate_pipeline(Bigram(), BYTES, tasks, batch_size=4))["pos: shuffle"] == "PASS"
    got = statuses(eval.validate_pipeline(FirstRowBonus(), BYTES, tasks, batch_size=4))
    assert got["pos: shuffle"] == "FAIL" and got["pos: oracle"] == "PASS"


def test_generative_chance_check_warns_for_a_model_that_copies_the_answer(small_tasks):
    """A "random" model that outputs the answer (the Oracle itself) WARNs the generative chance check."""
    tasks = {"arithmetic": small_tasks["arithmetic"]}
    got = statuses(eval.validate_pipeline(eval.Oracle(BYTES, tasks), BYTES, tasks, max_new_tokens=32))
    assert got == {"arithmetic: chance": "WARN", "arithmetic: oracle": "PASS"}


# -----------------------------------------------------------------------------
# Determinism

def test_run_tasks_twice_gives_identical_numbers(small_tasks):
    """The same model and tasks evaluated twice (and a rebuilt model of the same seed) give == metrics and scores."""
    tasks = eval.subset(small_tasks, 12)
    net = tiny_model()
    first = eval.run_tasks(net, BYTES, tasks, max_new_tokens=16)
    assert eval.run_tasks(net, BYTES, tasks, max_new_tokens=16) == first
    assert eval.run_tasks(tiny_model(), BYTES, tasks, max_new_tokens=16) == first
    assert set(first) >= {"docstring/acc_char", "next_line/acc", "arithmetic/exact_match"}
    examples = tasks["docstring"][1]                 # the scores themselves, not only the accuracies
    assert eval.cloze(net, BYTES, examples)[1] == eval.cloze(net, BYTES, examples)[1]


def test_subset_is_seeded():
    """subset() gives the same examples on two calls, others with another seed, and everything for n = 0."""
    tasks = eval.builtin_tasks(data.heldout_code(), arithmetic.heldout_documents(60))
    a, b = eval.subset(tasks, 10, seed=3), eval.subset(tasks, 10, seed=3)
    assert a == b and all(len(ex) == 10 for _, ex in a.values())
    assert eval.subset(tasks, 10, seed=4) != a and eval.subset(tasks, 0) == tasks


# -----------------------------------------------------------------------------
# Report card

def test_metric_table():
    """One line per metric with value, interval (none for an exact count) and n."""
    table = eval.metric_table({"a/acc": eval.metric(0.5, 0.25, 0.75, 10), "a/chance": eval.metric(0.25, 0, 0, 10)})
    assert table.split("\n")[2:] == ["| a/acc | 0.5000 | 0.2500 - 0.7500 | 10 |", "| a/chance | 0.2500 |  | 10 |"]


def test_add_to_card_inherits_appends_and_replaces(tmp_path):
    """add_to_card starts from the inherited card, appends, replaces the same (stage, step, run), writes json and md."""
    old, new = tmp_path / "pretrain", tmp_path / "midtrain"
    old.mkdir(), new.mkdir()
    row = lambda stage, step, v, run=None: {"stage": stage, "step": step, "run": run,
                                            "metrics": {"t/acc": eval.metric(v, v - 0.1, v + 0.1, 9),
                                                        "t/chance": eval.metric(0.25, 0, 0, 9)}}
    eval.add_to_card(str(old), row("pretrain", 10, 0.3))
    eval.add_to_card(str(old), row("pretrain", 20, 0.4))
    rows = eval.add_to_card(str(new), row("mid", 5, 0.5), inherit=str(old))
    assert [(r["stage"], r["step"]) for r in rows] == [("pretrain", 10), ("pretrain", 20), ("mid", 5)]
    rows = eval.add_to_card(str(new), row("mid", 5, 0.6), inherit=str(old))        # a resume redoes step 5
    rows = eval.add_to_card(str(new), row("mid", 5, 0.7, run="other"))             # another run's step 5 stays apart
    assert [(r["step"], r["metrics"]["t/acc"]["value"]) for r in rows] == [(10, 0.3), (20, 0.4), (5, 0.6), (5, 0.7)]
    assert json.loads((new / "report_card.json").read_text()) == rows
    md = (new / "report_card.md").read_text()
    assert md == eval.card_table(rows) + "\n"
    assert "| mid | 5 | 0.6 (0.5-0.7) |" in md and "chance" not in md
    assert len(json.loads((old / "report_card.json").read_text())) == 2
    assert sorted(os.listdir(new)) == ["report_card.json", "report_card.md"]   # write_json left no temporary file


def test_write_json_replaces_without_leftovers(tmp_path):
    """write_json writes the object and leaves no temporary sibling, when overwriting and when it fails half-way."""
    path = tmp_path / "x.json"
    eval.write_json(str(path), {"a": 1})
    eval.write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(TypeError):                     # a crash half-way: the old file stays, no temporary one
        eval.write_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and os.listdir(tmp_path) == ["x.json"]


# -----------------------------------------------------------------------------
# The command line

@pytest.fixture
def checkpoint(tmp_path):
    import train
    path = tmp_path / "ckpt" / "step_000000"
    train.save_checkpoint(str(path), tiny_model(), None,
                          {"step": 0, "config": {"tokenizer": "bytes", "data_dir": str(tmp_path / "none")}})
    return str(path)


def test_cli_on_a_checkpoint(checkpoint, capsys):
    """--ckpt --tasks docstring writes eval.json and prints the table, with the numbers of the saved model itself."""
    eval.main(["--ckpt", checkpoint, "--tasks", "docstring", "--examples", "8"])
    out = capsys.readouterr().out
    with open(os.path.join(checkpoint, "eval.json")) as f:
        metrics = json.load(f)["metrics"]
    assert "docstring/acc_char" in metrics and "docstring/acc_char" in out
    tasks = eval.subset({"docstring": eval.builtin()["docstring"]}, 8)
    assert metrics == eval.run_tasks(tiny_model(), BYTES, tasks)          # the weights were really loaded


def test_neutral_arithmetic_rows_are_asked_as_the_model_was_taught(tmp_path, small_tokenizer):
    """Rows {"a", "op", "b"} become problems; with a chat tokenizer each is asked exactly as
    the pipeline's held-out levels are (sft.problem_example), else as a math document's
    question; the answer is the integer result."""
    import sft
    path = write_lines(tmp_path / "problems.jsonl", ['{"a": 123, "op": "+", "b": 45}', '{"a": 9, "op": "-", "b": 9}'])
    kind, examples = eval.read_task(path)
    assert kind == "generative" and [ex["answer"] for ex in examples] == ["168", "0"]
    chat = eval.render_problems({"problems": (kind, examples)}, small_tokenizer, "lsd")["problems"][1]
    assert chat == [sft.problem_example((123, "+", 45), small_tokenizer, "lsd"),
                    sft.problem_example((9, "-", 9), small_tokenizer, "lsd")]
    assert "321000 + 540000<|im_end|>" in chat[0]["prompt"]
    plain = eval.render_problems({"problems": (kind, examples)}, BYTES, "msd")["problems"][1]
    assert plain[0] == {"prompt": "Question: 000123 + 000045\nAnswer:", "answer": "168"}


@pytest.mark.parametrize("row,message", [
    ('{"a": 1.5, "op": "+", "b": 2}', "integers >= 0"),
    ('{"a": 3, "op": "*", "b": 2}', "op '\\*'"),
    ('{"a": 3, "op": "-", "b": 5}', "a >= b"),
    ('{"a": 123456, "op": "+", "b": 5}', "at most 5 digits"),
])
def test_neutral_arithmetic_rows_out_of_reach_name_the_line(tmp_path, row, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1, "op": "+", "b": 2}', row])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2") + ".*" + message):
        eval.read_task(path)


def test_cli_scores_neutral_problems_into_eval_json(checkpoint, tmp_path):
    """--tasks problems.jsonl on a checkpoint: exact match with its interval in eval.json under
    the file's name, the same numbers as eval.generative on the rendered examples."""
    path = write_lines(tmp_path / "sums.jsonl", ['{"a": 12, "op": "+", "b": 7}', '{"a": 40, "op": "-", "b": 2}'])
    eval.main(["--ckpt", checkpoint, "--tasks", path])
    with open(os.path.join(checkpoint, "eval.json")) as f:
        metrics = json.load(f)["metrics"]
    rendered = eval.render_problems({"sums": eval.read_task(path)}, BYTES)
    assert metrics == eval.run_tasks(tiny_model(), BYTES, rendered)
    assert set(metrics["sums/exact_match"]) == {"value", "low", "high", "n"} and metrics["sums/exact_match"]["n"] == 2


def test_cli_samples_write_pass_at_k_into_eval_json(checkpoint, tmp_path, capsys, monkeypatch):
    """--samples 2 --temperature 0.5: eval.json gains <task>/pass@1 and /pass@2 next to exact
    match, printed in the table, the numbers run_tasks gives the saved model with those settings."""
    path = write_lines(tmp_path / "sums.jsonl", ['{"a": 12, "op": "+", "b": 7}', '{"a": 40, "op": "-", "b": 2}'])
    calls, sampled = [], eval.sampled
    monkeypatch.setattr(eval, "sampled", lambda *args, **kw: calls.append(args[3:5]) or sampled(*args, **kw))
    eval.main(["--ckpt", checkpoint, "--tasks", path, "--samples", "2", "--temperature", "0.5"])
    assert calls == [(2, 0.5)]                 # a random model scores 0 at any temperature: check what it was asked
    monkeypatch.undo()
    with open(os.path.join(checkpoint, "eval.json")) as f:
        metrics = json.load(f)["metrics"]
    assert {"sums/exact_match", "sums/pass@1", "sums/pass@2"} <= set(metrics) and metrics["sums/pass@2"]["n"] == 2
    assert "sums/pass@2" in capsys.readouterr().out
    rendered = eval.render_problems({"sums": eval.read_task(path)}, BYTES)
    assert metrics == eval.run_tasks(tiny_model(), BYTES, rendered, samples=2, temperature=0.5)


def test_cli_rejects_an_unknown_task(checkpoint):
    """--tasks nonsense exits naming it."""
    with pytest.raises(SystemExit, match="nonsense"):
        eval.main(["--ckpt", checkpoint, "--tasks", "nonsense"])


def test_cli_needs_a_checkpoint_and_one_that_matches(checkpoint, capsys):
    """Flags without --ckpt are an error (not the demo); weights that do not match trainer.json's model are named."""
    with pytest.raises(SystemExit):
        eval.main(["--tasks", "docstring"])
    assert "--ckpt DIR" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    weights.pop("norm.weight")
    save_file(weights, os.path.join(checkpoint, "model.safetensors"))
    with pytest.raises(SystemExit, match=r"does not match .* missing \['norm.weight'\]"):
        eval.main(["--ckpt", checkpoint, "--tasks", "docstring"])



@pytest.mark.slow
def test_demo_runs(capsys):
    """python eval.py (the demo: built-in tasks, a random model, the checks; ~12 s) runs to the end with no FAIL."""
    eval.main([])
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and "docstring/acc_char" in out


def test_cloze_scores_of_a_transformers_model_with_the_same_weights():
    """eval.py takes any model: transformers' LlamaForCausalLM holding our tiny model's weights (through
    save_pretrained) gives the same cloze scores (its forward's .logits) as ours (its chunked log_probs)."""
    transformers = pytest.importorskip("transformers")
    import tempfile
    net = M.Model(M.preset("tiny", vocab_size=257, n_layer=2, nope_layers=(), dim=64, n_head=2, n_kv_head=1,
                           mlp_dim=128, max_seq_len=256)).eval()
    with tempfile.TemporaryDirectory() as d:
        net.save_pretrained(d)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    examples = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
                {"context": "Question: What is 2 + 2?\nAnswer:", "choices": [" 4", " 5"], "answer": 0}]
    _, ours = eval.cloze(net, BYTES, examples, batch_size=2)
    _, hf = eval.cloze(theirs, BYTES, examples, batch_size=2)
    for a, b in zip(ours, hf):
        for norm in eval.NORMS:
            assert a["scores"][norm] == pytest.approx(b["scores"][norm], rel=1e-4, abs=1e-5)
