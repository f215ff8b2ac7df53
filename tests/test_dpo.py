"""Tests for dpo.py: every loss against values computed by hand from its paper's formula
(scalar Python math, nothing shared with dpo.py) and against the numbers Hugging Face TRL's
own loss functions give for the same inputs; gradients that push the chosen completion up and
the rejected down (APO-down: both down, the rejected more); the data shapes TRL reads and their
errors; the built-in pairs (deterministic, held out as sft.py holds out, rejected answers
wrong); rows and masks (a row's summed log-probability is log pi(completion | prompt)); the
stage (the cached reference equals the frozen copy, resuming, ranks, KTO's mismatched rows);
that a few APO-zero steps raise held-out preference accuracy; and merging checkpoints."""

import json
import math
import os
import random

import pytest
import torch

from conftest import spawn
import arithmetic
import dpo
import model as M
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# Four pairs: summed log-probabilities (policy, reference) and completion lengths
PC, PR = [-10.0, -20.5, -3.2, -7.0], [-12.0, -19.0, -8.1, -7.5]
RC, RR = [-11.0, -20.0, -4.0, -6.5], [-11.5, -19.5, -7.0, -9.0]
LC, LR = [5, 9, 2, 4], [6, 8, 4, 3]


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def ours(loss_type, **kw):
    return dpo.preference_loss(loss_type, T(PC), T(PR), T(RC), T(RR), T(LC), T(LR), **kw).tolist()


def test_each_loss_equals_its_formula_by_hand():
    """sigmoid (with and without label smoothing), ipo (on length-averaged log-probs), apo_zero,
    apo_down, orpo (mean-token NLL plus beta times the log-odds term), simpo (averaged, margin
    gamma): each example's loss, in float64, to 1e-12."""
    beta, eps, gamma = 0.1, 0.1, 0.5
    for i in range(4):
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        hand = {
            "sigmoid": -logsig(beta * h),
            "cdpo": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
            "ipo": ((PC[i] / LC[i] - PR[i] / LR[i]) - (RC[i] / LC[i] - RR[i] / LR[i]) - 1 / (2 * beta)) ** 2,
            "apo_zero": 1 - sig(beta * (PC[i] - RC[i])) + sig(beta * (PR[i] - RR[i])),
            "apo_down": sig(beta * (PC[i] - RC[i])) + 1 - sig(beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))),
        }
        ac, ar = PC[i] / LC[i], PR[i] / LR[i]
        odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
        hand["orpo"] = -ac - beta * logsig(math.log(odds(ac)) - math.log(odds(ar)))
        hand["simpo"] = -logsig(2.0 * (ac - ar) - gamma)
        got = {"sigmoid": ours("sigmoid")[i], "cdpo": ours("sigmoid", label_smoothing=eps)[i], "ipo": ours("ipo")[i],
               "apo_zero": ours("apo_zero")[i], "apo_down": ours("apo_down")[i], "orpo": ours("orpo")[i],
               "simpo": ours("simpo", beta=2.0, gamma=gamma)[i]}
        for k in hand:
            assert got[k] == pytest.approx(hand[k], rel=1e-12, abs=1e-12), (k, i)


def test_reference_free_losses_ignore_the_reference_and_others_need_one():
    """orpo and simpo give the same numbers with any reference or none; the others refuse to
    run without one, the averaging ones without lengths, and unknown names are refused."""
    for lt in dpo.REFERENCE_FREE:
        a = dpo.preference_loss(lt, T(PC), T(PR), None, None, T(LC), T(LR))
        b = dpo.preference_loss(lt, T(PC), T(PR), T(RR), T(RC), T(LC), T(LR))
        assert torch.equal(a, b)
    for lt in ("sigmoid", "ipo", "apo_zero", "apo_down"):
        with pytest.raises(ValueError, match="reference"):
            dpo.preference_loss(lt, T(PC), T(PR), None, None, T(LC), T(LR))
    for lt in dpo.AVERAGED:
        with pytest.raises(ValueError, match="lengths"):
            dpo.preference_loss(lt, T(PC), T(PR), T(RC), T(RR))
    for bad in ("dpo", "kto"):
        with pytest.raises(ValueError, match="loss_type"):
            dpo.preference_loss(bad, T(PC), T(PR), T(RC), T(RR))


def test_orpo_is_finite_near_certainty():
    """ORPO's log(1 - p) at a mean log-probability near 0 (a model sure of the chosen answer):
    finite and equal to the exact value, where log1p(-exp(a)) loses the digits."""
    a = T([-1e-9, -1e-4, -30.0])
    exact = [math.log(-math.expm1(x)) for x in a.tolist()]
    assert dpo._log1mexp(a).tolist() == pytest.approx(exact, rel=1e-12)
    assert torch.isfinite(dpo.orpo_loss(T([-1e-9]), T([-2.0]))).all()


def test_kto_loss_and_kl_by_hand():
    """KTO per completion: w_d (1 - sig(beta (rho - z0))) for desirable ones, w_u (1 - sig(beta
    (z0 - rho))) for undesirable; z0 = the mean log-ratio on mismatched pairs, clamped at 0,
    detached."""
    p, r = T([-10.0, -20.5, -3.2, -7.7]), T([-11.0, -20.0, -4.0, -7.0])
    d = torch.tensor([True, False, True, False])
    kl_p = T([-15.0, -14.0, -16.0, -13.0]).requires_grad_()
    kl_r = T([-15.5, -14.2, -15.0, -13.9])
    z0 = dpo.kto_kl(kl_p, kl_r)
    assert z0.item() == pytest.approx(((0.5 + 0.2 - 1.0 + 0.9) / 4)) and not z0.requires_grad
    assert dpo.kto_kl(kl_r, kl_p).item() == 0.0                     # clamped at 0
    got = dpo.kto_loss(p, r, d, z0, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5).tolist()
    for i in range(4):
        rho = p[i].item() - r[i].item()
        want = 1.5 * (1 - sig(0.1 * (rho - z0.item()))) if d[i] else 0.5 * (1 - sig(0.1 * (z0.item() - rho)))
        assert got[i] == pytest.approx(want, rel=1e-12)


# What TRL's own functions return for the inputs above (PC, PR, RC, RR, LC, LR; beta 0.1),
# computed with TRL's DPOTrainer.dpo_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss
# and KTOTrainer.kto_loss; see test_losses_equal_trl_when_installed for the live check.
TRL_FILE = os.path.join(os.path.dirname(__file__), "trl_losses.json")


def test_losses_equal_trls_numbers():
    """Every loss, per example, equals what TRL's trainers compute for the same inputs
    (stored numbers, from the TRL version named in the file)."""
    with open(TRL_FILE) as f:
        TRL = json.load(f)
    inp = TRL["inputs"]
    for case in TRL["cases"]:
        lt, kw = case["loss_type"], case.get("kwargs", {})
        if lt == "kto":
            k = inp["kto"]
            kl = dpo.kto_kl(T(k["kl_policy"]), T(k["kl_ref"]))
            assert kl.item() == pytest.approx(case["kl"], rel=1e-9)
            got = dpo.kto_loss(T(k["policy"]), T(k["ref"]), torch.tensor(k["desirable"]), kl, **kw)
        else:
            got = dpo.preference_loss(lt, T(inp["pc"]), T(inp["pr"]), T(inp["rc"]), T(inp["rr"]), T(inp["lc"]),
                                      T(inp["lr"]), **kw)
        rel = case.get("rel", 1e-9)         # (TRL's ORPO computes in float32)
        assert got.tolist() == pytest.approx(case["losses"], rel=rel, abs=1e-12), (lt, kw)
        if "chosen_rewards" in case:
            ch = dpo.implicit_rewards(lt, T(inp["pc"]), T(inp["rc"]), T(inp["lc"]), kw.get("beta", 0.1))
            rj = dpo.implicit_rewards(lt, T(inp["pr"]), T(inp["rr"]), T(inp["lr"]), kw.get("beta", 0.1))
            assert ch.tolist() == pytest.approx(case["chosen_rewards"], rel=rel)
            assert rj.tolist() == pytest.approx(case["rejected_rewards"], rel=rel)


def _grads(loss_type, pc, pr, rc, rr, lc=5.0, lr=5.0, **kw):
    pc, pr = T([pc]).requires_grad_(), T([pr]).requires_grad_()
    dpo.preference_loss(loss_type, pc, pr, T([rc]), T([rr]), T([lc]), T([lr]), **kw).sum().backward()
    return pc.grad.item(), pr.grad.item()


def test_gradients_push_chosen_up_and_rejected_down():
    """Gradient descent on each loss raises log pi(chosen) and lowers log pi(rejected) (IPO
    below its target margin); APO-down lowers the rejected and, from the reference, leaves
    the chosen where it is at first, then lowers it too once the rejected has fallen."""
    for lt in ("sigmoid", "ipo", "apo_zero", "orpo", "simpo"):
        for point in [(-10.0, -10.0, -10.0, -10.0), (-5.0, -9.0, -6.0, -8.0), (-12.0, -4.0, -10.0, -6.0)]:
            gc, gr = _grads(lt, *point)
            assert gc < 0 < gr, (lt, point, gc, gr)
    gc, gr = _grads("apo_down", -10.0, -10.0, -10.0, -10.0)
    assert gc == pytest.approx(0.0, abs=1e-15) and gr > 0
    gc, gr = _grads("apo_down", -10.0, -30.0, -10.0, -10.0)      # the rejected far below: both go down now
    assert gc > 0 and gr > 0


def test_kto_gradients_raise_desirable_and_lower_undesirable():
    p = T([-5.0, -5.0]).requires_grad_()
    dpo.kto_loss(p, T([-5.0, -5.0]), torch.tensor([True, False]), T(0.3)).sum().backward()
    assert p.grad[0] < 0 < p.grad[1]


# -----------------------------------------------------------------------------
# Data

U = {"role": "user", "content": "Is 2 + 2 = 4?"}
A = {"role": "assistant", "content": "Yes."}
N = {"role": "assistant", "content": "No."}


def test_preference_record_reads_trls_shapes():
    """Conversational (message lists), strings (a user turn and an assistant reply), the
    implicit prompt (two whole conversations sharing their start), unpaired rows."""
    conv = dpo.preference_record({"prompt": [U], "chosen": [A], "rejected": [N]})
    assert conv == {"prompt": [U], "chosen": [A], "rejected": [N]}
    assert dpo.preference_record({"prompt": U["content"], "chosen": "Yes.", "rejected": "No."}) == conv
    sys_msg = {"role": "system", "content": "Be brief."}
    implicit = dpo.preference_record({"chosen": [sys_msg, U, A], "rejected": [sys_msg, U, N]})
    assert implicit == {"prompt": [sys_msg, U], "chosen": [A], "rejected": [N]}
    assert dpo.preference_record({"prompt": "Is 2 + 2 = 4?", "completion": "No.", "label": False}) == \
        {"prompt": [U], "completion": [N], "label": False}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "no rejected"),
    ({"prompt": "q", "completion": "a"}, "no label"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "'label' is true"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is neither"),
    ({"prompt": [U], "chosen": [U], "rejected": [A]}, "'chosen' must start with an assistant"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role"),
    ([1, 2], "a JSON object"),
])
def test_preference_record_errors_name_the_row(row, message):
    with pytest.raises(ValueError, match=message) as e:
        dpo.preference_record(row, "f.jsonl:7")
    assert "f.jsonl:7" in str(e.value)


def test_read_preferences_files(tmp_path):
    """jsonl and parquet read back; a bad line is named by its line number; pairs and
    unpaired rows in one file are refused; an empty file too."""
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"}, {"prompt": [U], "chosen": [A], "rejected": [N]}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r["chosen"] for r in dpo.read_preferences(str(path))] == [[{"role": "assistant", "content": "a"}], [A]]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: no rejected"):
        dpo.read_preferences(str(path))
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    with pytest.raises(ValueError, match="mixes pairs"):
        dpo.read_preferences(str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        dpo.read_preferences(str(path))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}]), str(tmp_path / "p.parquet"))
    assert dpo.read_preferences(str(tmp_path / "p.parquet"))[0]["rejected"] == [{"role": "assistant", "content": "b"}]


def problem_of(question):
    """(a, op, b) read back from the numbers that end a built-in question (reversed in lsd)."""
    x, op, y = question.split("\n")[-1].split(" ")
    read = (lambda t: int(t[::-1])) if sft.MATH_FORMAT == "lsd" else int
    return read(x), op, read(y)


def test_builtin_pairs_are_deterministic_held_out_as_sft_and_rejected_answers_are_wrong():
    """Same seed, same pairs; the chosen answer is the problem's result after its working; the
    rejected one: for "arithmetic" a slip (off by a power of ten: a carry forgotten or a digit
    off by one) carried from the working to the answer, for "faithful" the same working and
    another answer, for "complete" half the working and no answer. Arithmetic pairs are on
    arithmetic.py's training problems of the demonstrated levels, held-out pairs on its held-out
    ones; functions held out as sft.py holds them out; every kind in both splits."""
    a = dpo.builtin_pairs(n=300, seed=3)
    assert a == dpo.builtin_pairs(n=300, seed=3) and a != dpo.builtin_pairs(n=300, seed=4)
    for split, items in a.items():
        for kind, rec in items:
            question = [m for m in rec["prompt"] if m["role"] == "user"][0]["content"]
            if kind == "docstring":
                assert rec["chosen"] != rec["rejected"]
                assert sft.is_heldout(question.split("`")[1]) == (split == "val")
                continue
            p = problem_of(question)
            assert arithmetic.split(*p) == ("heldout" if split == "val" else "train")
            assert arithmetic.level(p[0], p[2]) <= sft.MATH_DIGITS
            c = arithmetic.result(*p)
            chosen, rejected = rec["chosen"][0], rec["rejected"][0]
            assert chosen["content"] == f"The answer is {chosen['reasoning'][::-1]}." and int(chosen["reasoning"][::-1]) == c
            if kind == "complete":
                assert rejected["content"] == "" and chosen["reasoning"].startswith(rejected["reasoning"])
                assert 0 < len(rejected["reasoning"]) < len(chosen["reasoning"])
                continue
            wrong = int(rejected["content"].split()[-1].rstrip("."))
            d = abs(wrong - c)
            assert d > 0 and 10 ** (len(str(d)) - 1) == d, rec
            if kind == "faithful":
                assert rejected["reasoning"] == chosen["reasoning"]
            else:
                assert int(rejected["reasoning"][::-1]) == wrong
    assert {k for k, _ in a["train"]} == set(dpo.KINDS) == {k for k, _ in a["val"]}


# -----------------------------------------------------------------------------
# Rows, the stage, merging (a tiny random model and the 512-token tokenizer of conftest)

def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return M.Model(M.preset("tiny", vocab_size=tok.vocab_size, n_layer=2, dim=64, n_head=2, n_kv_head=1,
                            mlp_dim=128, nope_layers=(), max_seq_len=256))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """60 built-in pairs (40 arithmetic, 20 docstring; 2 of the arithmetic held out by the file
    split's hash, so that two ranks each evaluate one) as a jsonl in TRL's conversational shape."""
    items = dpo.builtin_pairs(n=600, seed=1)["train"]
    held = lambda rec: sft.is_heldout(json.dumps(rec), 0.02)
    arith = [x for x in items if x[0] == "arithmetic"]
    items = ([x for x in arith if held(x[1])][:2] + [x for x in arith if not held(x[1])][:38]
             + [x for x in items if x[0] == "docstring" and not held(x[1])][:20])
    assert len(items) == 60
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for _, rec in items))
    return str(path)


def stage(tok, path, model=None, **kw):
    return dpo.DPOStage(tok, 256, 4, model, path, log=lambda *a: None, **kw)


def test_a_rows_summed_log_prob_is_the_completions_given_the_prompt(small_tokenizer, pairs_file):
    """For each row of a pair batch: the summed log-probability the stage takes equals
    sum over the completion's tokens of log softmax(logits of the whole unpadded text), read
    naively from the model's logits; the chosen half first, then the rejected half."""
    tok, net = small_tokenizer, tiny(small_tokenizer)
    examples, _ = dpo.tokenize([("x", r) for r in dpo.read_preferences(pairs_file)[:3]], tok, 256)
    batch = dpo.pair_batch(examples, 0)
    logps, _ = dpo.sequence_logps(net, batch, grad=False)
    for row, (prompt, parts, _, _) in enumerate(examples * 2):
        ids, mask = parts[row // len(examples)]
        full = torch.tensor([prompt + ids])
        logits, _, _ = net(full)
        lp = logits[0, :-1].float().log_softmax(-1)
        want = sum(lp[len(prompt) + j - 1, t].item() for j, (t, m) in enumerate(zip(ids, mask)) if m)
        assert logps[row].item() == pytest.approx(want, rel=1e-5)
        assert sum(mask) == (batch["labels"][row] != -100).sum().item()


def test_a_cut_that_makes_a_pair_identical_skips_and_counts_it(small_tokenizer):
    """Over max_len the completions are cut; a pair whose two sides differ only past the cut
    would become two identical rows (a reward model scores their last token alike, and no
    preference loss can tell them apart): it is skipped and counted. A pair that still
    differs is kept, truncated; with overlong="skip" both are skipped as too long."""
    shared = "The working goes step by step. " * 12
    same_after_cut = {"prompt": [{"role": "user", "content": "q1"}],
                      "chosen": [{"role": "assistant", "content": shared + "So 41."}],
                      "rejected": [{"role": "assistant", "content": shared + "So 14."}]}
    differs_early = {"prompt": [{"role": "user", "content": "q2"}],
                     "chosen": [{"role": "assistant", "content": "41. " + shared}],
                     "rejected": [{"role": "assistant", "content": "14. " + shared}]}
    records = [("x", same_after_cut), ("x", differs_early)]
    out, counts = dpo.tokenize(records, small_tokenizer, 64)
    assert counts == {"examples": 2, "truncated": 1, "skipped": 1, "identical": 1}
    assert len(out) == 1 and out[0][1][0][0] != out[0][1][1][0]
    assert all(len(p) + len(c) <= 64 for p, parts, _, _ in out for c, _ in parts)
    out, counts = dpo.tokenize(records, small_tokenizer, 64, overlong="skip")
    assert (len(out), counts["skipped"], counts["identical"]) == (0, 2, 0)
    out, counts = dpo.tokenize(records, small_tokenizer, 512)     # room for both: nothing cut
    assert (len(out), counts["truncated"], counts["skipped"]) == (2, 0, 0)


def test_a_file_with_no_held_out_pair_is_refused_by_name(small_tokenizer, tmp_path):
    """Evaluation needs held-out pairs (2% of a file's rows, by hash): a file that leaves none
    is refused at the start, naming the file, not with an empty batch in the first evaluation."""
    items = [(k, r) for k, r in dpo.builtin_pairs(n=120, seed=2)["train"] if not sft.is_heldout(json.dumps(r), 0.02)]
    items = items[:80]      # (none of these is held out)
    assert len(items) == 80
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for _, r in items))
    with pytest.raises(ValueError, match=r"few.jsonl: 0 held-out examples"):
        stage(small_tokenizer, str(path))


def test_cached_reference_equals_the_frozen_copy(small_tokenizer, pairs_file):
    """ref="cache" (log-probabilities computed once, kept in the state) and ref="copy" (a frozen
    copy) give the same loss and gradients, before and after the policy has moved; the cache
    survives a JSON round trip of the state (a checkpoint)."""
    tok = small_tokenizer
    net = tiny(tok)
    a, b = stage(tok, pairs_file, net, ref="copy"), stage(tok, pairs_file, net, ref="cache")
    b.cache_reference(net, torch.device("cpu"), log=lambda *x: None)
    b.load_state_dict(json.loads(json.dumps(b.state_dict())))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(2):
        ba, bb = a.next_batch(), b.next_batch()
        assert torch.equal(ba["input_ids"], bb["input_ids"]) and "ref_logps" in bb and "ref_logps" not in ba
        grads = []
        for st, batch in ((a, ba), (b, bb)):
            net.zero_grad()
            loss, aux = st.loss(net, batch)
            loss.backward()
            grads.append((loss.item(), [p.grad.clone() for p in net.parameters()], aux["metrics"]))
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
        assert step == 0 or grads[0][0] != pytest.approx(1.0)       # the policy moved from its reference
        for ga, gb in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
        for k in grads[0][2]:
            if step == 0 and k == "accuracies":     # margins are 0 up to rounding: ties either way
                continue
            assert grads[0][2][k].item() == pytest.approx(grads[1][2][k].item(), rel=1e-5, abs=1e-6)
        opt.step()


def test_stage_resumes_splits_ranks_and_evaluates(small_tokenizer, pairs_file):
    """A restored state gives the batches an uninterrupted stage gives; two ranks read
    disjoint examples, as many each; reference-free losses keep no reference; evaluate gives
    one outcome per held-out pair (the accuracy is whether the chosen scores higher)."""
    tok, net = small_tokenizer, tiny(small_tokenizer)
    s = stage(tok, pairs_file, net)
    for _ in range(3):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    want = [s.next_batch()["input_ids"] for _ in range(20)]    # across an epoch's end
    r = stage(tok, pairs_file, net)
    r.load_state_dict(state)
    assert all(torch.equal(x, r.next_batch()["input_ids"]) for x in want)
    ranks = [stage(tok, pairs_file, net, rank=k, world_size=2) for k in (0, 1)]
    assert len(ranks[0].order) == len(ranks[1].order) and not set(ranks[0].order) & set(ranks[1].order)
    free = stage(tok, pairs_file, None, loss_type="simpo")
    assert free.ref_model is None and free.reference_logps(free.next_batch()) is None
    s.val = s.train[:6]
    out = s.evaluate(net, torch.device("cpu"))
    logps, _ = dpo.sequence_logps(net, dpo.pair_batch(s.val, 0), grad=False)
    assert out["pref/accuracy"] == (logps[:6] > logps[6:]).tolist()
    assert out["pref/reward_accuracy"] == [False] * 6 and out["pref/margin"] == [0.0] * 6   # policy == reference


def test_kto_stage_rows_and_loss(small_tokenizer, pairs_file, tmp_path):
    """Unpaired rows (or pairs unpaired for kto): a batch holds the B completions, then the
    same prompts with the previous example's completion (the KL rows); the loss is KTO's on
    the first half with the KL from the second; other losses refuse unpaired data."""
    tok, net = small_tokenizer, tiny(small_tokenizer)
    rows = [{"prompt": f"Say {w}.", "completion": w, "label": i % 3 != 0} for i, w in enumerate(
        ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="kto only"):
        stage(tok, str(path), net)
    s = stage(tok, str(path), net, loss_type="kto")
    batch = s.next_batch()
    B = len(batch["desirable"])
    assert batch["input_ids"].shape[0] == 2 * B
    for i, idx in enumerate(s.order[:B]):
        prompt, parts, _, label = s.train[idx]
        assert parts[1][0] == s.train[idx - 1][1][0][0] and label == batch["desirable"][i].item()
    loss, aux = s.loss(net, batch)
    logps, _ = dpo.sequence_logps(net, batch, grad=False)
    kl = dpo.kto_kl(logps[B:], logps[B:])      # policy == reference: the KL baseline is 0
    assert aux["metrics"]["kl"].item() == pytest.approx(kl.item(), abs=1e-6) == 0
    assert loss.item() == pytest.approx(0.5, rel=1e-6)       # 1 - sigmoid(0) for every completion
    assert stage(tok, pairs_file, net, loss_type="kto").paired     # pairs are unpaired for kto


def test_apo_zero_steps_raise_heldout_preference_accuracy(small_tokenizer, tmp_path):
    """A preference a tiny model can learn in a few steps and carry to prompts it never saw
    (answers that end kindly over curt ones of as many tokens, on held-out questions):
    APO-zero raises the held-out preference accuracy (the chosen answer more likely than the
    rejected one) to nearly every pair. (The built-in pairs need arithmetic and docstrings a
    model learns in pretraining; train.py's run on them is in the README.)"""
    tok, net = small_tokenizer, tiny(small_tokenizer)
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "candle", "rocket", "forest"]

    def pair():
        a, b = rng.sample(words, 2)
        return {"prompt": f"Tell me about the {a} and the {b}.",
                "chosen": f"The {a} and the {b}. Happy to help.", "rejected": f"The {a} and the {b}. Go away now."}
    path = tmp_path / "style.jsonl"
    path.write_text("".join(json.dumps(pair()) + "\n" for _ in range(200)))
    held, _ = dpo.tokenize([("x", dpo.preference_record(pair())) for _ in range(40)], tok, 256)

    def accuracy():
        logps, _ = dpo.sequence_logps(net, dpo.pair_batch(held, 0), grad=False)
        return (logps[:40] > logps[40:]).float().mean().item()
    s = stage(tok, str(path), net, loss_type="apo_zero", beta=0.5)
    before = accuracy()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = s.loss(net, s.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    print(f"held-out preference accuracy {before:.2f} -> {after:.2f}")
    assert after >= max(0.9, before + 0.3), (before, after)


def test_merge_is_the_weighted_average_and_refuses_mismatches(small_tokenizer, tmp_path):
    """merge writes sum w_i theta_i (a train.py checkpoint stays loadable: trainer.json kept,
    with the recipe); other shapes or names, and an existing output, are refused; the command
    line parses CKPT:WEIGHT."""
    from safetensors.torch import load_file
    import train
    tok = small_tokenizer
    a, b = tiny(tok, 1), tiny(tok, 2)
    train.save_checkpoint(str(tmp_path / "a"), a, None, {"step": 5, "config": {"tokenizer": "t.json"}})
    train.save_checkpoint(str(tmp_path / "b"), b, None, {"step": 9, "config": {}})
    out = str(tmp_path / "m")
    dpo.main(["merge", out, f"{tmp_path / 'a'}:0.25", f"{tmp_path / 'b'}:0.75"])
    merged, wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (out, tmp_path / "a", tmp_path / "b"))
    for k in merged:
        torch.testing.assert_close(merged[k], 0.25 * wa[k] + 0.75 * wb[k])
    c = M.Model(a.config)
    state = train.load_checkpoint(out, c)
    assert state["config"]["tokenizer"] == "t.json" and [x["weight"] for x in state["merged_from"]] == [0.25, 0.75]
    with pytest.raises(ValueError, match="exists"):
        dpo.merge_checkpoints(out, [(str(tmp_path / "a"), 1.0)])
    other = M.Model(M.preset("tiny", vocab_size=tok.vocab_size, n_layer=3, dim=64, n_head=2, n_kv_head=1,
                             mlp_dim=128, nope_layers=(), max_seq_len=256))
    train.save_checkpoint(str(tmp_path / "c"), other, None, {"step": 1})
    with pytest.raises(ValueError, match="other tensors"):
        dpo.merge_checkpoints(str(tmp_path / "m2"), [(str(tmp_path / "a"), 0.5), (str(tmp_path / "c"), 0.5)])
    assert not os.path.exists(tmp_path / "m2")
    with pytest.raises(SystemExit, match="weight"):
        dpo.main(["merge", str(tmp_path / "m3"), f"{tmp_path / 'a'}:x"])


def _two_rank_worker(rank, store, tok, pairs, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    s = dpo.DPOStage(tok, 256, 4, None, pairs, loss_type="kto", ref="cache", rank=rank, world_size=2,
                     group=dist.group.WORLD, log=lambda *a: None)
    net = tiny(tok)
    s.cache_reference(net, torch.device("cpu"), log=lambda *a: None)
    s.val, s.ref_cache["val"] = s.train[:8], s.ref_cache["train"][:8]
    torch.save({"cache": s.ref_cache["train"], "outcomes": s.evaluate(net, torch.device("cpu"))}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_share_the_reference_cache_and_the_heldout_outcomes(small_tokenizer, pairs_file, tmp_path):
    """Under two gloo ranks: each computes its share of the reference log-probabilities and
    the all-reduce gives both ranks the whole cache one process computes; evaluate gathers
    every held-out example's outcome (the same multiset as one process)."""
    tok = small_tokenizer
    one = dpo.DPOStage(tok, 256, 4, None, pairs_file, loss_type="kto", ref="cache", log=lambda *a: None)
    net = tiny(tok)
    one.cache_reference(net, torch.device("cpu"), log=lambda *a: None)
    one.val, one.ref_cache["val"] = one.train[:8], one.ref_cache["train"][:8]
    want = one.evaluate(net, torch.device("cpu"))
    spawn(_two_rank_worker, args=(str(tmp_path / "store"), tok, pairs_file, str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["cache"], one.ref_cache["train"], rtol=1e-5, atol=1e-5)
        assert set(got["outcomes"]) == set(want)
        for k in want:
            assert sorted(got["outcomes"][k]) == pytest.approx(sorted(want[k]), abs=1e-4), k
