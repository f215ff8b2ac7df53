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
import re
import subprocess
import sys

import pytest
import torch

import dpo
import model as M
import sft
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


QUESTION = re.compile(r"^(?:What is|Compute|Calculate|How much is) (.+?)(?:\?|\.|, please\.)(?: /(?:no_)?think)?$")


def test_builtin_pairs_are_deterministic_held_out_as_sft_and_rejected_answers_are_wrong():
    """Same seed, same pairs; the chosen answer is the expression's value and the rejected one
    is not (its working ends on the wrong number); held out exactly where sft.py holds the
    same question (expression or function name) out; both kinds in both splits."""
    a = dpo.builtin_pairs(n=300, seed=3)
    assert a == dpo.builtin_pairs(n=300, seed=3) and a != dpo.builtin_pairs(n=300, seed=4)
    for split, items in a.items():
        for kind, rec in items:
            question = [m for m in rec["prompt"] if m["role"] == "user"][0]["content"]
            if kind == "docstring":
                key = question.split("`")[1]
                assert rec["chosen"] != rec["rejected"]
            else:
                key = QUESTION.match(question).group(1)
                assert re.fullmatch(r"[\d ()+*-]+", key)
                chosen = int(rec["chosen"][0]["content"].split()[-1].rstrip("."))
                wrong = int(rec["rejected"][0]["content"].split()[-1].rstrip("."))
                assert chosen == eval(key) != wrong, rec       # noqa: S307 (digits and + - * only)
                if "reasoning" in rec["rejected"][0]:
                    steps = rec["rejected"][0]["reasoning"].split("\n")
                    assert steps[-1].endswith(f"= {wrong}") and steps != rec["chosen"][0]["reasoning"].split("\n")
            assert sft.is_heldout(key) == (split == "val"), (key, split)
    assert {k for k, _ in a["train"]} == set(dpo.KINDS) == {k for k, _ in a["val"]}
