"""Tests for rl.py: the advantages and each of TRL's four aggregations against values computed
by hand (scalar Python, nothing shared with rl.py) and against the numbers TRL's own
GRPOTrainer and GKD loss give for the same inputs; the clip stopping the gradient exactly
where PPO says; the distillation losses zero for a teacher equal to the student; the answer
extraction and the rewards on edge cases; rollouts reproducible from a seed, their rows and
masks, zero-variance groups dropped and counted, the stage resuming to the same prompts; the
reward model's score and loss; and a teacher with another tokenizer refused."""

import json
import math
import os

import pytest
import torch

import arithmetic
import data
import model as M
import rl
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = data.ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return M.Model(M.ModelConfig(vocab_size=vocab_size, n_layer=2, dim=32, n_head=2, n_kv_head=1, mlp_dim=64,
                                 max_seq_len=256, attn_impl="sdpa")).eval()


# -----------------------------------------------------------------------------
# Advantages

def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_advantages_by_hand():
    """group: (r - group mean) / (unbiased group std + 1e-4); batch: the whole batch's std;
    none: centred only. A group of equal rewards gets 0 and is marked zero_std."""
    r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]
    groups = [r[0:4], r[4:8], r[8:12]]
    _, batch_std = mean_std(r)
    want = {"group": [], "batch": [], "none": []}
    for g in groups:
        m, s = mean_std(g)
        want["group"] += [(x - m) / (s + 1e-4) for x in g]
        want["batch"] += [(x - m) / (batch_std + 1e-4) for x in g]
        want["none"] += [x - m for x in g]
    for scale in ("group", "batch", "none"):
        adv, zero = rl.group_advantages(T(r), 4, scale)
        assert adv.tolist() == pytest.approx(want[scale], abs=1e-12), scale
        assert zero.tolist() == [False, True, False]
    assert rl.group_advantages(T(r), 4)[0][:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    with pytest.raises(ValueError, match="groups of 5"):
        rl.group_advantages(T(r), 5)
    with pytest.raises(ValueError, match="scale"):
        rl.group_advantages(T(r), 4, "rank")


# -----------------------------------------------------------------------------
# The policy loss

# two completions, three positions; the second has two tokens
LP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]
OLD = [[-1.5, -1.9, -0.5], [-0.1, -0.8, 0.0]]
REF = [[-1.2, -2.2, -0.4], [-0.4, -1.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [0.8, -1.3]


def by_hand(eps_low, eps_high, beta, loss_type, max_len=5, n_items=None):
    per, kls, low, high, n = [[0.0] * 3 for _ in range(2)], [], [], [], 0
    for i in range(2):
        for t in range(3):
            if not MASK[i][t]:
                continue
            n += 1
            ratio = math.exp(LP[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss = -min(ratio * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LP[i][t]
            kls.append(math.exp(d) - d - 1)
            per[i][t] = loss + beta * kls[-1]
            low.append(ratio < 1 - eps_low and ADV[i] < 0)
            high.append(ratio > 1 + eps_high and ADV[i] > 0)
    sums = [sum(row) for row in per]
    lengths = [sum(m) for m in MASK]
    value = {"grpo": sum(s / n_ for s, n_ in zip(sums, lengths)) / 2, "bnpo": sum(sums) / n,
             "dr_grpo": sum(sums) / (2 * max_len), "dapo": sum(sums) / (n_items or n)}[loss_type]
    return value, sum(kls) / n, sum(low) / n, sum(high) / n, sum(a or b for a, b in zip(low, high)) / n


@pytest.mark.parametrize("loss_type", rl.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_each_aggregation_by_hand(loss_type, beta):
    value, kl, low, high, region = by_hand(0.2, 0.28, beta, loss_type, max_len=5, n_items=7)
    loss, stats = rl.policy_loss(T(LP), T(OLD), T(ADV), T(MASK), 0.2, 0.28, ref_logps=T(REF), beta=beta,
                                 loss_type=loss_type, max_completion_length=5, num_items_in_batch=7)
    assert loss.item() == pytest.approx(value, abs=1e-12)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(low)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(high)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(region)
    assert ("kl" in stats) == (beta > 0)
    if beta:
        assert stats["kl"].item() == pytest.approx(kl, abs=1e-12)
    # the example clips on both sides: token (0, 0) rose above 1 + eps_high with A > 0, (1, 1)
    # fell below 1 - eps_low with A < 0
    assert low > 0 and high > 0


def test_policy_loss_refuses_an_unknown_aggregation():
    with pytest.raises(ValueError, match="loss_type"):
        rl.policy_loss(T(LP), T(OLD), T(ADV), T(MASK), loss_type="ppo")


def test_clipping_stops_the_gradient_where_it_should():
    """d loss / d logp_t is 0 exactly where the clipped term is the smaller one (the ratio left
    [1 - eps_low, 1 + eps_high] on the side the advantage pushes), and -A ratio / n elsewhere
    (bnpo, beta 0): a token already moved far enough is not pushed further, one moved the wrong
    way still is."""
    lp = T(LP).requires_grad_()
    rl.policy_loss(lp, T(OLD), T(ADV), T(MASK), 0.2, 0.28, loss_type="bnpo")[0].backward()
    n = sum(map(sum, MASK))
    for i in range(2):
        for t in range(3):
            ratio = math.exp(LP[i][t] - OLD[i][t])
            stopped = (ratio > 1.28 and ADV[i] > 0) or (ratio < 0.8 and ADV[i] < 0)
            want = 0.0 if stopped or not MASK[i][t] else -ADV[i] * ratio / n
            assert lp.grad[i, t].item() == pytest.approx(want, abs=1e-12), (i, t)
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[1, 1].item() == 0.0   # the two clipped tokens
    # a ratio past the clip on the other side (A > 0, ratio < 1 - eps) keeps its gradient
    lp2 = T([[-3.0]]).requires_grad_()
    rl.policy_loss(lp2, T([[-1.0]]), T([1.0]), T([[1]]), 0.2, 0.2)[0].backward()
    assert lp2.grad.item() == pytest.approx(-math.exp(-2.0))


def test_per_token_advantages_broadcast_like_per_sequence_ones():
    per_seq = rl.policy_loss(T(LP), T(OLD), T(ADV), T(MASK))[0]
    per_tok = rl.policy_loss(T(LP), T(OLD), T(ADV)[:, None].expand(2, 3), T(MASK))[0]
    assert per_tok.item() == pytest.approx(per_seq.item(), abs=1e-15)


def test_policy_loss_equals_trls_numbers():
    """The cases tests/trl_grpo.json holds: TRL 1.16's GRPOTrainer._compute_loss on the same
    inputs (every aggregation, beta 0 and 0.04, symmetric and asymmetric clips, dapo with this
    batch's token count and another): the loss, the clip statistics, the KL and the gradient
    with respect to the log-probabilities. The file was made by calling TRL's own method on a
    stand-in trainer (object.__new__, the attributes the method reads, its log-probability
    function returning these inputs) with TRL installed outside this project; its "notes" say
    how, so that it can be made again for another TRL version."""
    with open(os.path.join(ROOT, "tests", "trl_grpo.json")) as f:
        ref = json.load(f)
    assert ref["grpo"]
    for case in ref["grpo"]:
        p, x = case["params"], case["inputs"]
        lp = T(x["logps"]).requires_grad_()
        loss, stats = rl.policy_loss(lp, T(x["old_logps"]), T(x["advantages"]), T(x["mask"]), p["epsilon_low"],
                                     p["epsilon_high"], ref_logps=T(x["ref_logps"]), beta=p["beta"],
                                     loss_type=p["loss_type"], max_completion_length=p["max_completion_length"],
                                     num_items_in_batch=x.get("num_items_in_batch"))
        loss.backward()
        assert loss.item() == pytest.approx(case["loss"], rel=1e-6, abs=1e-9), p
        for got, want in zip(lp.grad.flatten().tolist(), torch.tensor(case["grad_logps"]).flatten().tolist()):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-9), p
        for name in ("low_mean", "high_mean", "region_mean"):
            key = next(k for k in case["metrics"] if k.endswith(name))
            assert stats[f"clip_ratio/{name}"].item() == pytest.approx(case["metrics"][key], abs=1e-6), (p, key)
        if p["beta"]:
            assert stats["kl"].item() == pytest.approx(case["metrics"]["kl"], rel=1e-5), p


# -----------------------------------------------------------------------------
# Distillation

def test_distillation_losses_are_zero_for_the_same_model():
    """A teacher equal to the student: the reverse-KL advantages are 0 on every token and the
    GKD divergence is 0 at every beta (and positive for another teacher)."""
    torch.manual_seed(0)
    s = torch.randn(2, 3, 7, dtype=torch.float64)
    mask = T([[1, 1, 0], [1, 1, 1]])
    lp = s.log_softmax(-1)[..., 0]
    assert rl.reverse_kl_advantages(lp, lp, mask).abs().max().item() == 0.0
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert rl.generalized_jsd(s, s, mask, beta).item() == pytest.approx(0.0, abs=1e-12)
        assert rl.generalized_jsd(s, s + torch.randn_like(s), mask, beta).item() > 1e-3


def test_generalized_jsd_ends_are_the_two_kls_and_the_middle_is_symmetric():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    ps, pt = s.softmax(-1), t.softmax(-1)

    def kl(p, q):
        return ((p * (p.log() - q.log())).sum(-1) * mask).sum() / mask.sum()
    assert rl.generalized_jsd(s, t, mask, 0.0).item() == pytest.approx(kl(pt, ps).item(), abs=1e-12)
    assert rl.generalized_jsd(s, t, mask, 1.0).item() == pytest.approx(kl(ps, pt).item(), abs=1e-12)
    m = (ps + pt) / 2
    assert rl.generalized_jsd(s, t, mask, 0.5).item() == pytest.approx((kl(pt, m) + kl(ps, m)).item() / 2, abs=1e-12)
    assert rl.generalized_jsd(s, t, mask, 0.5).item() == pytest.approx(rl.generalized_jsd(t, s, mask, 0.5).item())


def test_generalized_jsd_equals_trls_numbers():
    """TRL's GKDTrainer.generalized_jsd_loss on the same logits (tests/trl_grpo.json): beta 0,
    0.5 and 1, temperatures 1 and 2, with labels masking positions, and without."""
    with open(os.path.join(ROOT, "tests", "trl_grpo.json")) as f:
        cases = json.load(f)["gkd"]
    assert cases
    for case in cases:
        x, p = case["inputs"], case["params"]
        labels = torch.tensor(x["labels"]) if x.get("labels") is not None else None
        s, t = T(x["student_logits"]), T(x["teacher_logits"])
        mask = (labels != -100).double() if labels is not None else torch.ones(s.shape[:2], dtype=torch.float64)
        got = rl.generalized_jsd(s, t, mask, p["beta"], p["temperature"]).item()
        if labels is None:     # TRL's "batchmean" without labels sums each row's positions: a row mean, not a token mean
            got *= s.shape[1]
        assert got == pytest.approx(case["loss"], rel=1e-9, abs=1e-12), p


# -----------------------------------------------------------------------------
# Answers and rewards

# The thinking-block cases: (completion, the answer it gives). eval.py's exact match and rl.py's
# reward must read the same answer from each: one rule, eval.completion_answer.
THINKING = [
    ("<think>\n2 + 3 = 5\n</think>\nThe answer is 6.", "6"),          # the answer, not the working
    ("<think>\n2 + 3 = 5\nso 5", None),                              # an unfinished thought answers nothing
    ("The answer is -12.", "-12"),                                  # no block at all
    ("<think>\n1\n</think>\n2 <think>\n3\n</think>\nThe answer is 4.", "4"),   # several blocks: after the last
    ("<think>\n1\n</think>\n2 <think>\n3 so 5", None),             # the last block never closes
    ("<think>\n2 + 3 = 5\n</think>\n", None),                        # nothing after the block
    ("2 + 3 = 5\n</think>\nThe answer is 6.", "6"),                  # the prompt opened the block
    ("2 + 3 = 5\n</think>\nI do not know.", None),
]


@pytest.mark.parametrize("text,answer", THINKING)
def test_exact_match_and_reward_read_the_same_answer(text, answer):
    """eval.generative's prediction and rl.math_reward agree on every thinking-block case: an
    opened block that never closes has no answer, whichever of the two reads it."""
    class Scripted:
        config = type("C", (), {"max_seq_len": 256})

        def generate(self, prompts, max_new_tokens, temperature, stop_ids=()):
            return [BYTES.encode(text) + [BYTES.special_tokens["<|eos|>"]] for _ in prompts]

    _, details = rl.eval.generative(Scripted(), BYTES, [{"prompt": "What is 2 + 3?", "answer": "5"}])
    assert details[0]["predicted"] == answer
    for ref in ("5", "6", "4", "-12"):
        assert rl.math_reward(text, ref) == float(answer == ref)


def test_math_reward_compares_numbers():
    assert rl.math_reward("The answer is 1,234.", "1234") == 1.0
    assert rl.math_reward("The answer is 12.0", "12") == 1.0
    assert rl.math_reward("The answer is 13.", "12") == 0.0
    assert rl.math_reward("<think>\nThe answer is 12.\n", "12") == 0.0
    assert rl.math_reward("", "0") == 0.0


def test_format_reward():
    good = "<think>\n7 * 3 = 21\n</think>\nThe answer is 21."
    assert rl.format_reward(good, think=True, finished=True) == 1.0
    assert rl.format_reward(good, think=True, finished=False) == 0.0        # never ended its turn
    assert rl.format_reward("<think>\n\n</think>\nThe answer is 21.", True, True) == 0.0   # empty thought
    assert rl.format_reward("<think>\nx\n</think>\n", True, True) == 0.0     # no answer
    assert rl.format_reward("The answer is 21.", True, True) == 0.0          # /think mode needs the block
    assert rl.format_reward("The answer is 21.", False, True) == 1.0         # /no_think: the template wrote it
    assert rl.format_reward(good, False, True) == 0.0
    assert rl.format_reward("<think>\na\n</think>\nb <think>", True, True) == 0.0


def test_overlong_penalty_is_dapos_ramp():
    assert [rl.overlong_penalty(n, 100, 20) for n in (50, 80, 85, 90, 100, 120)] == \
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert rl.overlong_penalty(120, 100, 0) == 0.0


def test_builtin_prompts_are_rls_split_and_answer_right():
    """RL's prompts are arithmetic.py's "rl" problems of the levels asked, level after level,
    asked as SFT asks them (the question's numbers read back give the problem), with the right
    answer; none of them is a held-out or a training problem."""
    train = [next(s) for s in [rl.builtin_stream(3, (3, 4))] for _ in range(300)]
    assert [r["kind"] for r in train[:4]] == ["d3", "d4"] * 2
    for r in train:
        x, op, y = r["messages"][-1]["content"].split("\n")[-1].split(" ")
        a, b = int(x[::-1]), int(y[::-1])           # (sft.MATH_FORMAT writes numbers reversed)
        assert r["key"] == f"{a} {op} {b}" and arithmetic.split(a, op, b) == "rl"
        assert r["answer"] == str(a + b if op == "+" else a - b)
        assert r["solution"]["content"] == f"The answer is {arithmetic.answer(int(r['answer']), sft.MATH_FORMAT)}."


def test_rehearsed_levels_come_in_turn_with_the_level_above(small_tokenizer):
    """rehearse=N: the stage's prompts are the top N demonstrated levels and the one above, in
    turn, every one of them an "rl" problem; more levels than SFT demonstrated is an error."""
    stage = make_stage(small_tokenizer, math_digits=2, rehearse=1, seq_len=256)
    assert stage.levels == (2, 3) and stage.kinds == ("d2", "d3")
    drawn = stage.draw(8)
    assert [r["kind"] for r in drawn] == ["d2", "d3"] * 4
    assert all(arithmetic.split(*[int(x) if x.isdigit() else x for x in r["key"].split()]) == "rl" for r in drawn)
    assert make_stage(small_tokenizer, math_digits=2, seq_len=256).levels == (3,)
    with pytest.raises(ValueError, match=r"rehearse 3 \(--rl_rehearse\): 0 to the 2 demonstrated levels"):
        make_stage(small_tokenizer, math_digits=2, rehearse=3, seq_len=256)


def test_heldout_problems_each_problem_once():
    val = rl.heldout_problems(per_level=100)
    keys = [r["key"] for r in val]
    assert len(keys) == len(set(keys))
    assert all(arithmetic.split(int(a), op, int(b)) == "heldout" for a, op, b in map(str.split, keys))
    # one digit is complete: every held-out sum or difference of two digits, enumerated here
    one = {f"{a} {op} {b}" for a in range(10) for b in range(10) for op in "+-"
           if (op == "+" or a >= b) and arithmetic.split(a, op, b) == "heldout"}
    assert {r["key"] for r in val if r["kind"] == "d1"} == one
    assert [sum(r["kind"] == f"d{d}" for r in val) for d in arithmetic.LEVELS] == [len(one), 100, 100, 100, 100]
    assert rl.commonest_answer_share([{"answer": "2"}, {"answer": "5"}, {"answer": "2"}, {"answer": "7"}]) == 0.5
    assert rl.commonest_answer_share([]) == 0.0


def test_read_problems_gsm8k_shape_and_errors(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                                "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}) + "\n"
                    + json.dumps({"question": "Q2", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm.jsonl:2: the answer must end in '#### <number>'"):
        rl.read_problems(str(path))
    path.write_text(json.dumps({"question": "Q", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    (rec,) = rl.read_problems(str(path))
    assert rec["answer"] == "2" and rec["messages"] == [{"role": "user", "content": "Q"}]
    assert rec["solution"] == {"role": "assistant", "content": "The answer is 2.", "reasoning": "1 + 1 = 2"}
    path.write_text(json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(ValueError, match="gsm.jsonl:1: no 'answer' field"):
        rl.read_problems(str(path))


# -----------------------------------------------------------------------------
# Rollouts and the stage

def make_stage(tok, **kw):
    args = dict(seq_len=128, batch_size=8, accum=2, group_size=4, max_new_tokens=12, log=lambda *a: None)
    args.update(kw)
    return rl.RLStage(tok, **args)


def test_rollouts_are_reproducible_from_a_seed(small_tokenizer):
    """Two stages with one seed sample the same prompts and tokens (every row of every
    micro-batch); another seed samples others."""
    model = tiny_model(small_tokenizer.vocab_size)
    cpu = torch.device("cpu")
    a, b, c = make_stage(small_tokenizer, seed=3), make_stage(small_tokenizer, seed=3), make_stage(small_tokenizer,
                                                                                                  seed=4)
    for s in (a, b, c):
        s.rollout(model, cpu)
    for x, y in zip(a.buffer, b.buffer):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.buffer[0]["input_ids"], c.buffer[0]["input_ids"])


def test_rollout_rows_masks_and_old_logps(small_tokenizer):
    """Each row is a prompt in the template and a sampled completion: labels on the completion
    only; old_logps are the log-probabilities the training forward gives (so the first
    step's ratio is 1: no clipping, approx_kl 0); group_size x prompts rows over accum
    micro-batches; the rollout metrics ride on every micro-batch's loss."""
    torch.manual_seed(0)
    model = tiny_model(small_tokenizer.vocab_size)
    stage = make_stage(small_tokenizer, format_weight=0.0)
    stage.rollout(model, torch.device("cpu"))
    assert len(stage.buffer) == 2 and all(len(b["input_ids"]) == 8 for b in stage.buffer)
    start = sft.special_id(small_tokenizer, "<|im_start|>")
    for batch in stage.buffer:
        for row, labels, n in zip(batch["input_ids"], batch["labels"], batch["lengths"]):
            trained = (labels != -100).nonzero().flatten()
            first, last = trained[0].item(), trained[-1].item()
            assert row[0].item() == start and last == n.item() - 2          # labels shifted: up to the last token
            assert (labels[first:last + 1] == row[first + 1:last + 2]).all()
            text = small_tokenizer.decode(row[:first + 1].tolist())
            assert text.endswith("<|im_start|>assistant\n") or text.endswith(sft.EMPTY_THINK)
    batch = stage.next_batch()
    loss, aux = stage.loss(model, batch)
    assert aux["metrics"]["clip_ratio/region_mean"].item() == 0.0
    assert aux["metrics"]["approx_kl"].item() < 1e-10
    assert set(stage.rollout_metrics) <= set(aux["metrics"]) and set(aux["metrics"]) == set(stage.metric_names)
    lp = model(batch["input_ids"], batch["labels"], batch["position_ids"], log_probs=True)[2]["log_probs"]
    assert torch.allclose(lp, batch["old_logps"], atol=1e-5)
    assert stage.rollout_metrics["zero_std"] == 1.0      # a random model: every answer wrong, every group flat
    assert batch["advantages"].abs().max().item() == 0.0


@pytest.mark.parametrize("resample,nonzero", [(3, 16), (1, 12)])
def test_zero_variance_groups_are_dropped_counted_and_refilled(small_tokenizer, monkeypatch, resample, nonzero):
    """Groups whose rewards are all equal are replaced by more prompts (up to `resample`
    rounds), counted in zero_std; what cannot be replaced fills the batch with advantage 0.
    Here every other prompt scores 0 on all its completions, the others 1 on their first: 4
    groups are needed; the rounds draw 4, 2, 1, 1 prompts (4 of 8 flat) with 3 extra rounds,
    and 4, 2 (3 of 6 flat, one of them back in the batch) with 1."""
    seen = []

    def score(self, record, completion, finished, think):
        seen.append(record["key"])
        flat = len(dict.fromkeys(seen)) % 2 == 1
        return (0.0 if flat else float(seen.count(record["key"]) == 1), 0.0, 0.0)
    monkeypatch.setattr(rl.RLStage, "score", score)
    stage = make_stage(small_tokenizer, resample=resample)
    stage.rollout(tiny_model(small_tokenizer.vocab_size), torch.device("cpu"))
    sampled, dropped = (8, 4) if resample == 3 else (6, 3)
    assert (stage.sampled_groups, stage.dropped_groups) == (sampled, dropped)
    assert stage.rollout_metrics["zero_std"] == dropped / sampled
    assert sum((b["advantages"] != 0).sum().item() for b in stage.buffer) == nonzero


def test_the_stage_resumes_to_the_same_prompts(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size)
    cpu = torch.device("cpu")
    a = make_stage(small_tokenizer, seed=1)
    a.rollout(model, cpu)
    state = a.state_dict()
    a.rollout(model, cpu)
    b = make_stage(small_tokenizer, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))     # through JSON, as checkpoints store it
    assert b.wants_rollout()
    b.rollout(model, cpu)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.buffer, b.buffer))


def test_iterations_reuse_a_rollout_and_then_sample_again(small_tokenizer):
    stage = make_stage(small_tokenizer, iterations=2)
    stage.rollout(tiny_model(small_tokenizer.vocab_size), torch.device("cpu"))
    got = [stage.next_batch() for _ in range(4)]
    assert got[0] is got[2] and got[1] is got[3] and stage.wants_rollout()
    with pytest.raises(RuntimeError, match="rollout"):
        stage.next_batch()


def test_a_few_grpo_steps_raise_the_reward_on_a_learnable_task(small_tokenizer, monkeypatch):
    """The whole loop on a task a tiny random model can learn in a few steps: the reward is the
    share of a completion's tokens that are one fixed token. Sampled reward rises."""
    target = small_tokenizer.encode("7")[0]
    monkeypatch.setattr(rl.RLStage, "score", lambda self, rec, comp, fin, think:
                        (sum(t == target for t in comp) / max(len(comp), 1), 0.0, 0.0))
    torch.manual_seed(0)
    model = tiny_model(small_tokenizer.vocab_size).train()
    stage = make_stage(small_tokenizer, group_size=8, batch_size=16, accum=1, loss_type="grpo")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    rewards = []
    for _ in range(12):
        stage.rollout(model, torch.device("cpu"))
        rewards.append(stage.rollout_metrics["reward"])
        loss, _ = stage.loss(model, stage.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


# -----------------------------------------------------------------------------
# The reward model

def test_bradley_terry_loss_by_hand():
    c, r = T([1.0, -0.5, 2.0]), T([0.0, 0.5, 2.5])
    want = [math.log1p(math.exp(-(a - b))) + 0.01 * (a + b) ** 2 for a, b in zip(c.tolist(), r.tolist())]
    assert rl.bradley_terry_loss(c, r, center_coef=0.01).tolist() == pytest.approx(want, abs=1e-12)
    assert rl.bradley_terry_loss(c, r, margin=T([1.0, 0, 0]))[0].item() == pytest.approx(math.log(2))


def test_reward_scores_read_the_last_token_of_each_row(small_tokenizer):
    """A padded batch scores each row as the row alone would: the head on the hidden state of
    its last real token (padding after it changes nothing)."""
    model = rl.add_score_head(tiny_model(small_tokenizer.vocab_size))
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11], [12, 13, 14, 15]]
    batch = rl.completion_rows(prompts, completions, 0)
    scores = rl.reward_scores(model, model.score, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        h = model.hidden_states(ids, torch.arange(len(p + c))[None])
        assert scores[i].item() == pytest.approx(model.score(h[0, -1]).item(), abs=1e-5)


def test_reward_model_stage_learns_the_builtin_pairs(small_tokenizer):
    """A few Bradley-Terry steps on the built-in pairs lower the loss on a fixed batch, and
    the stage's evaluation reports the held-out pair accuracy."""
    torch.manual_seed(0)
    model = rl.add_score_head(tiny_model(small_tokenizer.vocab_size)).train()
    logs = []
    stage = rl.RewardModelStage(small_tokenizer, 256, 8, model, log=logs.append)
    assert "reward-model data" in logs[0] and "Bradley-Terry" in logs[0]
    batch = stage.next_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)     # (3e-3 overshoots on this batch)
    first = stage.loss(model, batch)[0].item()
    for _ in range(16):
        loss, aux = stage.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.1 and set(aux["metrics"]) == set(stage.metric_names)
    out = stage.evaluate(model, torch.device("cpu"), n=16)
    assert len(out["rm/accuracy"]) == 16 and all(isinstance(x, bool) for x in out["rm/accuracy"])


# -----------------------------------------------------------------------------
# Tokenizers

def test_a_teacher_with_another_tokenizer_is_told_apart(small_tokenizer):
    assert rl.same_tokenizer(small_tokenizer, small_tokenizer) is None
    why = rl.same_tokenizer(small_tokenizer, data.ByteTokenizer())
    assert why and "tokens against" in why


def test_stage_arguments_are_checked(small_tokenizer):
    with pytest.raises(ValueError, match="groups of 3"):
        make_stage(small_tokenizer, group_size=3)
    with pytest.raises(ValueError, match="reference"):
        make_stage(small_tokenizer, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        make_stage(small_tokenizer, loss_type="ppo")
    with pytest.raises(ValueError, match="no room"):
        make_stage(small_tokenizer, max_new_tokens=128)
