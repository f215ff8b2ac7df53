"""
rl.py: going on-policy. GRPO with verifiable rewards (and its DAPO and Dr. GRPO variants),
RLHF with a reward model, and on-policy distillation from a teacher.

The concept. SFT and DPO learn from answers someone else wrote. On-policy training learns
from the model's own: sample several completions of a prompt from the current policy, score
them, and make the better ones more likely. GRPO (Shao et al. 2024, DeepSeekMath) does it
without a learned value function: the G completions of one prompt form a group, and each
completion's advantage is its reward against the group's,

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

so the prompt itself is the baseline. The policy then climbs PPO's clipped objective, token by
token, on the sampled completions:

    ratio_t = pi(y_t | y_<t) / pi_old(y_t | y_<t)        (pi_old: the policy that sampled)
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)  [+ beta KL_t(pi || pi_ref)]

The clip stops a token's gradient once its probability has already moved far enough in the
advantage's direction, which is what makes several optimisation steps on one batch of samples
safe. The variants:
- DAPO (Yu et al. 2025): a higher upper clip (eps_high 0.28: rare good tokens may grow more),
  a token-level mean over the whole batch (long completions are not down-weighted), groups
  whose rewards are all equal dropped (their advantage is 0: they teach nothing and dilute the
  batch) and resampled, and a soft penalty for completions that run into the length limit;
- Dr. GRPO (Liu et al. 2025): no division by the group's std (it over-weights prompts that are
  nearly always right or wrong) and a constant normaliser (the batch size times the maximum
  completion length) in place of each completion's own length, which biased GRPO to long
  wrong answers.
- the k3 estimator (Schulman 2020) of KL(pi || pi_ref) per token, exp(ref - lp) - (ref - lp) - 1,
  when a reference leash is wanted (beta > 0; recent recipes, DAPO's included, set beta = 0).

Rewards here are verifiable: the final answer to an arithmetic or GSM8K problem, matched
exactly (eval.py's extraction: GSM8K's `#### n`, a \\boxed{}, or the last number, after the
thinking block), plus a small format reward (the thinking block and the answer in place, the
turn ended) and DAPO's overlong penalty. A reward model is the RLHF alternative: the backbone
with a scalar head, trained on preference pairs with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) (its own stage, `--stage rm`), whose score of a completion
is then the reward.

On-policy distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025): the student samples,
a teacher scores every sampled token, and the per-token reverse KL, log pi_student(y_t) -
log pi_teacher(y_t), is the negative advantage: a dense signal on every token, where a reward
gives one number per completion. The generalised Jensen-Shannon divergence between the two
whole next-token distributions (GKD) is the option. Teacher and student must share a tokenizer.

The playbook's lessons: "once you've got preference alignment, go on-policy: RLHF, or on-policy
distillation"; rewards that can be verified resist hacking better than learned ones; watch the
completion length (the playbook's SmolLM3 run learned to pad its /no_think answers until an
overlong penalty stopped it), the entropy (a collapse means the policy stopped exploring) and
the clip fraction (how much of a batch the leash is holding); and a group where every
completion scores the same teaches nothing.

Papers: Schulman et al. 2017 (PPO); Ouyang et al. 2022 (InstructGPT: RLHF with a reward model);
Shao et al. 2024 (GRPO); Yu et al. 2025 (DAPO); Liu et al. 2025 (Dr. GRPO); Agarwal et al. 2024
(GKD: on-policy distillation); Lu & Thinking Machines 2025 (on-policy distillation with the
per-token reverse KL). Hugging Face TRL's GRPOTrainer and GKDTrainer define the same losses:
tests/test_rl.py checks these against the numbers they give.

This file takes the model, its tokenizer, a reference, a teacher and a reward model as
arguments. It imports sft.py (the chat template the policy answers in), arithmetic.py (the
built-in problems: the level above the ones SFT demonstrates, from the split no other stage
trains on), dpo.py (preference pairs for the reward model) and eval.py (the answer extraction,
so the reward and the benchmark agree): copy them together.

SFT where you can demonstrate, RL where you can only verify: the built-in prompts are the
level above SFT's (3-digit sums when SFT showed 1 and 2 digits), with a verifier and no worked
solution. RL grows what sampling already finds sometimes, so the SFT model must solve a few of
them (pass@k above 0); the held-out evaluation covers every level, to see the gain on RL's and
that the demonstrated ones are not forgotten.

Run:
    python rl.py                                                 # demo: rewards, advantages, the clip, in numbers
    python train.py --stage rl --init runs/sft/ckpt/step_000080 --out_dir runs/rl
    python train.py --stage rl --init CKPT --rl_data gsm8k.jsonl --loss_type dr_grpo --scale none
    python train.py --stage rm --init runs/sft/ckpt/step_000080 --out_dir runs/rm   # a reward model
    python train.py --stage rl --init CKPT --reward rm:runs/rm/ckpt/step_000060
    python train.py --stage rl --init CKPT --teacher runs/big/ckpt/step_000500 # on-policy distillation
"""

import itertools
import math
import random
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import arithmetic
import dpo
import eval
import sft

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


# -----------------------------------------------------------------------------
# Rewards

def math_reward(text, answer):
    """1.0 when the completion's final answer equals the reference (as numbers: 3.0 == 3). The
    answer is read as eval.py's exact match reads it (after the thinking block; an unfinished
    block answers nothing), so that the reward and the benchmark agree."""
    return float(eval.same_answer(eval.completion_answer(text), answer))


_THOUGHT = re.compile(r"<think>\n(.*?)\n?</think>\n(.*)", re.S)


def format_reward(text, think, finished):
    """1.0 when the turn has the shape the template asks for: it ended (<|im_end|>, `finished`),
    in /think mode it opens with a non-empty thinking block and then answers, in /no_think mode
    (the template wrote the empty block) it answers with no block of its own."""
    if not finished:
        return 0.0
    if not think:
        return float("<think>" not in text and "</think>" not in text and bool(text.strip()))
    m = _THOUGHT.fullmatch(text)
    return float(bool(m) and bool(m.group(1).strip()) and bool(m.group(2).strip()) and "<think>" not in m.group(2))


def overlong_penalty(length, max_length, cache):
    """DAPO's soft overlong punishment: 0 up to max_length - cache tokens, then falling
    linearly to -1 at max_length (and -1 past it): a completion learns it is running long
    before it is cut off, rather than one truncated sample getting a wrong-answer reward."""
    if cache <= 0 or length <= max_length - cache:
        return 0.0
    return max(-1.0, (max_length - cache - length) / cache)


# -----------------------------------------------------------------------------
# Prompts: built-in arithmetic at the level above SFT's (a verifier, no solution), or GSM8K-shaped files

def builtin_problem(problem, fmt=sft.MATH_FORMAT):
    """A record {kind, key, messages, answer, solution} of arithmetic.py's problem (a, op, b):
    the question as sft.py asks it; `solution` is the turn SFT would train on (RL never does:
    it only reads the answer, and the validation loss the solution)."""
    a, op, b = problem
    prompt, turn = sft.arithmetic_messages(problem, fmt)
    return {"kind": f"d{arithmetic.level(a, b)}", "key": f"{a} {op} {b}", "messages": prompt,
            "answer": str(arithmetic.result(a, op, b)), "solution": turn}


def builtin_stream(seed, levels, fmt=sft.MATH_FORMAT):
    """An endless stream of RL's built-in prompts: arithmetic.py's "rl" problems of `levels`,
    from the seed; no stage trains on their solutions and none is held out for evaluation."""
    return (builtin_problem(p, fmt) for p in arithmetic.problems("rl", levels, seed))


def heldout_problems(per_level=300, levels=arithmetic.LEVELS, fmt=sft.MATH_FORMAT):
    """arithmetic.py's held-out problems as records, per_level of each level (every one where a
    level has fewer: one digit has 27), each problem once: a problem asked many times
    weighs its answer that much more (README: a policy that learnt the answers' distribution)."""
    return [builtin_problem(p, fmt) for d in levels for p in arithmetic.heldout(d, per_level)]


def commonest_answer_share(records):
    """The accuracy of the best constant answer on these problems: what a policy that learnt
    the answers' distribution and not the arithmetic would score."""
    answers = [r["answer"] for r in records]
    return max(answers.count(a) for a in set(answers)) / len(answers) if answers else 0.0


def read_problems(path):
    """GSM8K-shaped rows ({"question", "answer"} with the answer ending in `#### n`, in jsonl
    or parquet) as records; the text before `####` becomes the worked solution."""
    out = []
    for where, row in sft.read_rows(path, required=("question", "answer")):
        if not isinstance(row["answer"], str) or "####" not in row["answer"]:
            raise ValueError(f"{where}: the answer must end in '#### <number>' (GSM8K's shape), got "
                             f"{str(row['answer'])[-40:]!r}")
        working, final = row["answer"].rsplit("####", 1)
        if not final.strip():
            raise ValueError(f"{where}: nothing after '####'")
        out.append({"kind": "problem", "key": row["question"], "answer": final.strip(),
                    "messages": [{"role": "user", "content": row["question"]}],
                    "solution": {"role": "assistant", "content": f"The answer is {final.strip()}.",
                                 **({"reasoning": working.strip()} if working.strip() else {})}})
    return out


def prompt_ids(record, tokenizer):
    """The prompt in the chat template with the generation prompt, and its reasoning mode."""
    ids, _ = sft.render_chat(record["messages"], tokenizer, add_generation_prompt=True)
    return ids, sft.reasoning_mode(record["messages"]) == sft.THINK


# -----------------------------------------------------------------------------
# Advantages and the policy loss

def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """(advantages, zero_std) for rewards (N,) laid out group after group: each reward minus
    its group's mean, divided by the group's (unbiased) std + eps ("group", GRPO), by the
    whole batch's std + eps ("batch"), or by nothing ("none", Dr. GRPO). zero_std (N // G,)
    marks groups whose rewards are all equal (advantage 0: nothing to learn from them)."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: one of {', '.join(SCALES)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    std = grouped.std(1) if group_size > 1 else torch.zeros(len(grouped), dtype=rewards.dtype)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    if scale == "group":
        return centred / (std.repeat_interleave(group_size) + eps), zero_std
    if scale == "batch":
        return centred / (rewards.std() + eps), zero_std
    return centred, zero_std


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.2, ref_logps=None, beta=0.0,
                loss_type="grpo", max_completion_length=None, num_items_in_batch=None):
    """The clipped surrogate, per token, aggregated as TRL's loss_type. logps, old_logps,
    ref_logps, mask: (B, T) over the completion tokens; advantages (B,) per completion or
    (B, T) per token (distillation). Returns (loss, stats) with TRL's clip statistics (the
    share of tokens whose ratio left the clip range on the side the advantage pushes) and, with
    beta > 0, the mean k3 KL to the reference.

    Aggregations: grpo, each completion's token mean, then the mean over completions; bnpo,
    the token mean over this batch; dr_grpo, the token sum over B x max_completion_length;
    dapo, the token sum over num_items_in_batch (the completion tokens of the whole batch this
    one is a share of, per process; default: this batch's)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = {}
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_completion_length or per_token.shape[1]))
    else:
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / max(float(n), 1.0)
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    stats.update({"clip_ratio/low_mean": masked_mean(low, mask), "clip_ratio/high_mean": masked_mean(high, mask),
                  "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask)})
    return loss, stats


def reverse_kl_advantages(student_logps, teacher_logps, mask):
    """On-policy distillation's per-token advantages: -(log pi_student - log pi_teacher) on the
    sampled tokens, 0 off the completion. A token the teacher finds likelier than the student
    did gets pushed up; the sampled estimate of the reverse KL is the negative of their mean."""
    return -(student_logps - teacher_logps) * mask


def generalized_jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """GKD's generalised Jensen-Shannon divergence between the whole next-token distributions,
    mean over the masked positions: beta KL(teacher || M) + (1 - beta) KL(student || M) with
    M = beta teacher + (1 - beta) student; beta 0 is the forward KL(teacher || student), beta 1
    the reverse KL(student || teacher). Differentiable in the student's logits."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)     # bf16 logits: in float32
    s = F.log_softmax(student_logits.to(dtype) / temperature, -1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    if beta == 0:
        per = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
        per = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return (per * mask).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# Rollouts

def completion_rows(prompts, completions, pad_id):
    """(input_ids, labels, position_ids) of prompt + completion rows, right-padded: labels are
    the completion's tokens (-100 on the prompt and the padding)."""
    return dpo.rows([(p, c, [True] * len(c)) for p, c in zip(prompts, completions)], pad_id)


@torch.no_grad()
def token_logps(model, batch, temperature=1.0, entropy=False):
    """Per-token log-probabilities of the labels (B, T) at `temperature`, as the training loss
    computes them (0 off the labels), and with entropy=True also the entropy of each position's
    next-token distribution (B, T), from the full logits."""
    if not entropy:
        return model(batch["input_ids"], batch["labels"], batch["position_ids"], log_probs=True,
                     temperature=temperature)[2]["log_probs"], None
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])[0].float() / temperature
    logp = logits.log_softmax(-1)
    labels = batch["labels"]
    lp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(labels == -100, 0.0)
    return lp, -(logp.exp() * logp).sum(-1)


def forward_flops(model, n_tokens, context):
    """The FLOPs of one forward pass of `model` (model.py's) over n_tokens positions at that
    context length: a third of flops_per_token's forward and backward."""
    return model.flops_per_token(context) / 3 * n_tokens


def sample_groups(model, prompts, group_size, max_new_tokens, temperature, stop_ids, generator, batch_size=64):
    """G completions of each prompt from the model (rows prompt 0 x G, prompt 1 x G, ...),
    sampled with the KV cache in batches: [(tokens, finished)], finished when a stop token
    ended it (the stop token stays in the tokens: the policy learns to end its turn)."""
    rows = [p for p in prompts for _ in range(group_size)]
    out = []
    for s in range(0, len(rows), batch_size):
        for toks in model.generate(rows[s:s + batch_size], max_new_tokens, temperature=temperature,
                                   stop_ids=stop_ids, generator=generator):
            out.append((toks, bool(toks) and toks[-1] in stop_ids))
    return out


# -----------------------------------------------------------------------------
# The reward model (RLHF): the backbone plus a scalar head, Bradley-Terry on pairs

def add_score_head(model):
    """Give a model.py Model a scalar head `score` (dim -> 1, no bias), as transformers'
    sequence-classification models have: its state dict gains "score.weight", which is how a
    reward model's checkpoint is told from a policy's."""
    model.score = torch.nn.Linear(model.config.dim, 1, bias=False).to(model.embed_tokens.weight.device)
    torch.nn.init.normal_(model.score.weight, std=model.config.init_std)
    return model


def reward_scores(model, head, batch, with_aux=False):
    """The reward of each row: the head on the final hidden state of the row's last real token
    (the last label, the end of the completion). `model` may be a wrapper (its hooks run);
    `head` is the score layer itself. with_aux: (scores, the forward's aux)."""
    aux = model(batch["input_ids"], position_ids=batch["position_ids"], hidden=True)[2]
    h = aux["hidden"]
    labels = batch["labels"]
    has = labels != -100
    last = torch.where(has.any(1), (has * torch.arange(labels.shape[1], device=labels.device)).argmax(1), 0)
    r = head(h[torch.arange(len(h), device=h.device), last + 1].to(head.weight.dtype)).squeeze(-1).float()
    return (r, aux) if with_aux else r


def bradley_terry_loss(chosen, rejected, margin=None, center_coef=0.0):
    """-log sigmoid(r_chosen - r_rejected [- margin]) per pair, plus center_coef (r_c + r_r)^2
    (TRL's center_rewards_coefficient: keeps the rewards near 0, which the loss alone does not)."""
    d = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(d)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


class RewardModelStage:
    """The stage contract (train.py) for a reward model: dpo.py's preference pairs (built-in
    or a file), the Bradley-Terry loss on the head's scores, the held-out pair accuracy. The
    model must carry its head (add_score_head) before it is wrapped."""

    mask_warn = 0.98
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")

    def __init__(self, tokenizer, seq_len, batch_size, model, data="builtin", center_coef=0.01, overlong="truncate",
                 seed=0, rank=0, world_size=1, group=None, math_format=sft.MATH_FORMAT, math_digits=sft.MATH_DIGITS,
                 log=print):
        self.head = model.score
        said = []
        # the pairs, their split and their batches are DPO's (a reference-free loss: no copy is made)
        self.pairs = dpo.DPOStage(tokenizer, seq_len, batch_size, None, data, "orpo", overlong=overlong, seed=seed,
                                  rank=rank, world_size=world_size, group=group, math_format=math_format,
                                  math_digits=math_digits, log=said.append)
        log(said[0].replace("dpo data", "reward-model data").split("; loss")[0]
            + f"; Bradley-Terry loss, center_coef {center_coef}")
        if not self.pairs.paired:
            raise ValueError(f"{data}: a reward model trains on pairs (prompt, chosen, rejected), not unpaired rows")
        self.names, self.center_coef, self.group = self.pairs.names, center_coef, group
        self.tokenizer, self.seq_len = tokenizer, seq_len

    @property
    def batches(self):
        return self.pairs.batches

    def next_batch(self):
        return self.pairs.next_batch()

    def loss(self, model, batch):
        """The Bradley-Terry loss, a mean over the batch's pairs (per pair, not per token)."""
        r, aux = reward_scores(model, self.head, batch, with_aux=True)
        B = len(r) // 2
        loss = bradley_terry_loss(r[:B], r[B:], center_coef=self.center_coef).mean()
        if "moe_loss" in aux:
            loss = loss + aux["moe_loss"]
        rc, rr = r[:B].detach(), r[B:].detach()
        return loss, {"metrics": {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                                  "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean()}}

    def val_batches(self, device, n_batches):
        return self.pairs.val_batches(device, n_batches)

    @torch.no_grad()
    def evaluate(self, model, device, n=256):
        """"rm/accuracy" [bool] over the first n held-out pairs (every rank its share, gathered):
        does the chosen answer score higher; "rm/margin" [float]."""
        p = self.pairs
        count = min(n, len(p.val)) // p.world_size
        idx = list(range(p.rank, count * p.world_size, p.world_size))
        was = model.training
        model.eval()
        table = [torch.zeros(0, 2, device=device)]
        for s in range(0, len(idx), p.batch_size):
            part = idx[s:s + p.batch_size]
            batch = {k: v.to(device) for k, v in dpo.pair_batch([p.val[i] for i in part], p.pad_id).items()}
            r = reward_scores(model, self.head, batch)
            table.append(torch.stack([r[:len(part)], r[len(part):]], 1))
        model.train(was)
        table = gather_rows(torch.cat(table), self.group).double().cpu()
        return {"rm/accuracy": (table[:, 0] > table[:, 1]).tolist(), "rm/margin": (table[:, 0] - table[:, 1]).tolist()}

    def state_dict(self):
        return self.pairs.state_dict()

    def load_state_dict(self, state):
        self.pairs.load_state_dict(state)


def gather_rows(table, group):
    """Every data-parallel rank's rows, concatenated (the same number on each)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return table
    parts = [torch.empty_like(table) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, table, group=group)
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# The stage train.py drives

def same_tokenizer(a, b):
    """A reason the two tokenizers differ (None when they agree): the size, then the first
    token that decodes differently. Distillation compares log-probabilities token by token,
    which means nothing across vocabularies."""
    na, nb = eval.vocab_size(a), eval.vocab_size(b)
    if na != nb:
        return f"{na} tokens against {nb}"
    for i in range(na):
        if a.decode([i]) != b.decode([i]):
            return f"token {i} is {a.decode([i])!r} against {b.decode([i])!r}"
    return None


class RLStage:
    """The stage contract (train.py) for on-policy training. Its batches are rollouts: when
    the last one is spent, train.py calls rollout(model, device) with the whole current policy
    (no gradients), which samples `group_size` completions of each of batch_size x accum /
    group_size prompts (on each data-parallel rank), scores them, computes the advantages, and
    keeps the rows; next_batch() hands them out, one micro-batch at a time, for `iterations`
    optimisation steps (TRL's num_iterations; the ratio leaves 1 from the second on).

    reward: "math" (verifiable: the answer, format_weight x the format, DAPO's overlong
    penalty when overlong_cache > 0) or a reward model (reward_model: a model with a score
    head; the format and overlong terms still add). teacher: a model sharing the tokenizer; its
    per-token reverse KL ("reverse_kl") is then the advantage, or the GKD loss ("gjsd") the
    loss; rewards are still computed and shown. Zero-variance groups are dropped and counted,
    and up to `resample` more rounds of prompts refill the batch (DAPO's dynamic sampling);
    what is still missing is filled with dropped groups (advantage 0)."""

    mask_warn = 0.95         # preflight: the prompts are masked, and the padding
    names = ("completion",)  # validation: the held-out problems' reference solutions

    def __init__(self, tokenizer, seq_len, batch_size, accum, data="builtin", group_size=8, max_new_tokens=64,
                 temperature=1.0, loss_type="dapo", scale="group", beta=0.0, eps_low=0.2, eps_high=0.28,
                 iterations=1, format_weight=0.1, overlong_cache=0, resample=2, ref_model=None, reward_model=None,
                 teacher=None, distill="reverse_kl", jsd_beta=0.5, seed=0, rank=0, world_size=1, group=None,
                 math_format=sft.MATH_FORMAT, math_digits=sft.MATH_DIGITS, rehearse=0, log=print):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if scale not in SCALES:
            raise ValueError(f"scale {scale!r}: one of {', '.join(SCALES)}")
        if distill not in ("reverse_kl", "gjsd"):
            raise ValueError(f"distill {distill!r}: reverse_kl or gjsd")
        if group_size < 2:
            raise ValueError(f"group_size {group_size}: a group needs 2 completions or more (its mean is the baseline)")
        if (batch_size * accum) % group_size:
            raise ValueError(f"batch_size x accumulation = {batch_size * accum} completions per rank and step do "
                             f"not split into groups of {group_size}")
        if beta > 0 and ref_model is None:
            raise ValueError("beta > 0 needs a reference model")
        self.tokenizer, self.seq_len, self.batch_size, self.accum = tokenizer, seq_len, batch_size, accum
        self.G, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.loss_type, self.scale, self.beta, self.eps = loss_type, scale, beta, (eps_low, eps_high)
        self.iterations, self.format_weight, self.overlong_cache, self.resample = (iterations, format_weight,
                                                                                  overlong_cache, resample)
        self.ref_model, self.reward_model, self.teacher = ref_model, reward_model, teacher
        self.distill, self.jsd_beta = distill, jsd_beta
        self.seed, self.rank, self.world_size, self.group = seed, rank, world_size, group
        self.pad_id = next((sft.special_id(tokenizer, s) for s in ("<|pad|>", "<|eos|>", "<|im_end|>")
                            if sft.has_special(tokenizer, s)), 0)
        self.stop_ids = [i for s, i in eval.special_ids(tokenizer).items() if s in eval.STOP_TOKENS]
        if not self.stop_ids:
            raise ValueError("the tokenizer has no end-of-turn token (<|im_end|>): a completion could never end")
        if not 0 <= rehearse <= math_digits:
            raise ValueError(f"rehearse {rehearse} (--rl_rehearse): 0 to the {math_digits} demonstrated levels")
        # RL's level is the one above SFT's; rehearsed levels (the top `rehearse` of SFT's) come in
        # turn with it, their own "rl" problems: a right answer there earns the same reward, so a
        # policy that starts to forget them is pulled back where it slips
        self.math_format, self.levels = math_format, tuple(range(math_digits + 1 - rehearse, math_digits + 2))
        if data == "builtin":
            self.kinds, self.problems = tuple(f"d{d}" for d in self.levels), None
            val = heldout_problems(64, self.levels, math_format)
        else:
            problems = read_problems(data)
            self.kinds = ("problem",)
            val = [p for p in problems if sft.is_heldout(p["key"], 0.05)]
            self.problems = [p for p in problems if not sft.is_heldout(p["key"], 0.05)]
            if not self.problems:
                raise ValueError(f"{data}: no training problems (all {len(problems)} are held out)")
        self.drawn = 0
        self.stream = self.prompt_stream()
        room = min(seq_len, getattr(getattr(reward_model, "config", None), "max_seq_len", seq_len)) - max_new_tokens
        if room <= 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in seq_len {seq_len}")
        self.val = [r for r in val if len(prompt_ids(r, tokenizer)[0]) <= room]
        self.room = room
        self.metric_names = ("reward", "accuracy", "format", "length", "truncated", "entropy", "zero_std",
                             "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "approx_kl") \
            + (("kl",) if beta > 0 else ()) + (("reverse_kl",) if teacher is not None else ())
        self.rollouts, self.served, self.batches, self.buffer = 0, 0, 0, []
        self.generated, self.rollout_metrics = 0, {}
        log(f"rl data ({data}): {len(self.val)} held-out problems; {group_size} completions per prompt, "
            f"{batch_size * accum // group_size} prompts per rank and rollout, up to {max_new_tokens} new tokens at "
            f"temperature {temperature}; loss {loss_type}, advantages scaled by {scale}, clip "
            f"[{1 - eps_low:.2f}, {1 + eps_high:.2f}], beta {beta}, {iterations} step(s) per rollout; reward: "
            + ("the teacher's per-token " + ("reverse KL" if distill == "reverse_kl" else "GJSD") if teacher is not None
               else "a reward model" if reward_model is not None else "the verified answer")
            + (f" + {format_weight} x format" if format_weight else "")
            + (f" + overlong penalty (last {overlong_cache} tokens)" if overlong_cache else ""))


    # -- prompts

    def prompt_stream(self, skip=0):
        """This rank's endless stream of training problems, from the seed, `skip` of them
        already drawn: a resumed run draws the same prompts an uninterrupted one would."""
        if self.problems is None:
            stream = builtin_stream(self.seed * 1000 + self.rank, self.levels, self.math_format)
        else:
            order = random.Random(self.seed).sample(self.problems, len(self.problems))
            stream = itertools.cycle(order[self.rank::self.world_size] or order)
        return itertools.islice(stream, skip, None)

    def draw(self, n):
        self.drawn += n
        return [next(self.stream) for _ in range(n)]

    # -- rollouts

    def wants_rollout(self):
        return self.served >= len(self.buffer) * self.iterations

    def score(self, record, completion, finished, think):
        """(reward, correct, format) of one completion; a reward model's score is added later."""
        text = self.tokenizer.decode([t for t in completion if t not in self.stop_ids])
        correct = math_reward(text, record["answer"])
        fmt = format_reward(text, think, finished)
        reward = self.format_weight * fmt + overlong_penalty(len(completion), self.max_new_tokens, self.overlong_cache)
        return reward + (correct if self.reward_model is None else 0.0), correct, fmt

    @torch.no_grad()
    def rollout(self, model, device):
        """Sample, score and keep this rank's next batch_size x accum completions, and compute
        what the loss needs: the sampling policy's log-probabilities (old_logps), the
        advantages, the reference's log-probabilities, the teacher's."""
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.rollouts * 7919 + self.rank)
        need = self.batch_size * self.accum // self.G
        kept, dropped, every, n_groups, generated = [], [], [], 0, 0
        flops = 0.0      # the rollout's FLOPs (train.py's MFU): the sampling, the scoring forwards
        for _ in range(1 + self.resample):
            records = self.draw(need - len(kept))
            prompts = [prompt_ids(r, self.tokenizer) for r in records]
            prompts = [(ids[-self.room:], think) for ids, think in prompts]
            samples = sample_groups(model, [p for p, _ in prompts], self.G, self.max_new_tokens, self.temperature,
                                    self.stop_ids, gen)
            generated += sum(len(toks) for toks, _ in samples)
            # each prompt + completion through the policy once (the KV cache's work, at its final context)
            lengths = [len(prompts[i // self.G][0]) + len(toks) for i, (toks, _) in enumerate(samples)]
            flops += sum(forward_flops(model, n, n) for n in lengths)
            if self.reward_model is not None:
                flops += sum(forward_flops(self.reward_model, n, n) for n in lengths)
            scores = torch.tensor([self.score(r, *samples[i * self.G + j], prompts[i][1])
                                   for i, r in enumerate(records) for j in range(self.G)], dtype=torch.float64)
            if self.reward_model is not None:
                scores[:, 0] += self.model_rewards([p for p, _ in prompts], [t for t, _ in samples], device)
            finished = torch.tensor([f for _, f in samples], dtype=torch.float64)
            every.append(torch.cat([scores, finished[:, None]], 1))
            _, zero = group_advantages(scores[:, 0], self.G, "none")
            n_groups += len(records)
            for i in range(len(records)):
                group = (prompts[i][0], [t for t, _ in samples[i * self.G:(i + 1) * self.G]],
                         scores[i * self.G:(i + 1) * self.G, 0])
                # (distilling, the teacher's tokens carry the signal: every group is kept)
                (dropped if zero[i] and self.teacher is None else kept).append(group)
            if len(kept) >= need:
                break
        n_dropped = len(dropped)
        kept += dropped[:need - len(kept)]     # still short: groups with advantage 0 fill the batch
        rewards = torch.cat([g[2] for g in kept])
        if self.scale == "batch" and self.group is not None and dist.is_initialized():
            # the batch's std is over every rank's rewards (each rank's groups are its own)
            everyone = gather_rows(rewards.to(device)[:, None], self.group).view(-1).cpu()
            adv = group_advantages(rewards, self.G, "none")[0] / (everyone.std() + 1e-4)
        else:
            adv = group_advantages(rewards, self.G, self.scale)[0]
        prompts = [g[0] for g in kept for _ in range(self.G)]
        completions = [t for g in kept for t in g[1]]
        # shuffled once, so that a micro-batch mixes groups, then cut into accum micro-batches
        order = torch.randperm(len(completions), generator=torch.Generator().manual_seed(self.seed + self.rollouts))
        self.buffer, totals = [], torch.zeros(3, dtype=torch.float64)   # entropy, tokens, reverse KL sums
        # then the policy's, the reference's and the teacher's forward over every training row
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size].tolist()
            batch = completion_rows([prompts[i] for i in idx], [completions[i] for i in idx], self.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = (batch["labels"] != -100).float()
            batch["old_logps"], ent = token_logps(model, batch, self.temperature, entropy=True)
            batch["advantages"] = adv[idx].float().to(device)
            if self.ref_model is not None:
                batch["ref_logps"] = token_logps(self.ref_model, batch, self.temperature)[0]
            rkl = 0.0
            if self.teacher is not None:
                teacher_lp = token_logps(self.teacher, batch, self.temperature)[0]
                rkl = ((batch["old_logps"] - teacher_lp) * mask).sum().item()
                if self.distill == "reverse_kl":
                    batch["advantages"] = reverse_kl_advantages(batch["old_logps"], teacher_lp, mask)
            totals += torch.tensor([(ent * mask).sum().item(), mask.sum().item(), rkl], dtype=torch.float64)
            T = batch["input_ids"].shape[1]
            flops += sum(forward_flops(m, batch["input_ids"].numel(), T)
                         for m in (model, self.ref_model, self.teacher) if m is not None)
            self.buffer.append({k: v.cpu() for k, v in batch.items()})
        model.train(was)
        every = torch.cat(every)
        self.rollout_metrics = {
            "reward": every[:, 0].mean().item(), "accuracy": every[:, 1].mean().item(),
            "format": every[:, 2].mean().item(), "truncated": 1 - every[:, 3].mean().item(),
            "length": sum(map(len, completions)) / len(completions), "entropy": (totals[0] / totals[1]).item(),
            "zero_std": n_dropped / n_groups}
        if self.teacher is not None:
            self.rollout_metrics["reverse_kl"] = (totals[2] / totals[1]).item()
        self.dropped_groups, self.sampled_groups = n_dropped, n_groups
        self.generated, self.rollout_seconds, self.rollout_flops = generated, time.perf_counter() - t0, flops
        self.rollouts, self.served = self.rollouts + 1, 0
        # dapo's normaliser: the whole step's completion tokens (every rank's), as a share per
        # micro-batch and rank (train.py divides each micro-batch's loss by accum, and the
        # gradient averaging over ranks divides by their number)
        total = totals[1].to(device=device, dtype=torch.float32)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(total, group=self.group)
        self.tokens_per_micro_batch = total.item() / (self.accum * self.world_size)

    def model_rewards(self, prompts, completions, device):
        """The reward model's score of each prompt + completion (prompts once per group)."""
        rows = [p for p in prompts for _ in range(self.G)]
        out = []
        for s in range(0, len(rows), self.batch_size):
            batch = completion_rows(rows[s:s + self.batch_size], completions[s:s + self.batch_size], self.pad_id)
            out.append(reward_scores(self.reward_model, self.reward_model.score,
                                     {k: v.to(device) for k, v in batch.items()}).double().cpu())
        return torch.cat(out)

    def next_batch(self):
        if self.wants_rollout():
            raise RuntimeError("the rollout is spent: call rollout(model, device) first (train.py does)")
        batch = self.buffer[self.served % len(self.buffer)]
        self.served += 1
        self.batches += 1
        return batch

    # -- the loss

    def loss(self, model, batch):
        """The policy loss, aggregated as loss_type says (policy_loss): grpo per completion,
        bnpo per micro-batch token, dr_grpo per B x max_new_tokens, dapo per completion token
        of the whole step (tokens_per_micro_batch: the rollout's count over every micro-batch
        and rank). Each is already the step's normalisation, so train.py weighs micro-batches
        equally."""
        mask = (batch["labels"] != -100).float()
        if self.teacher is not None and self.distill == "gjsd":   # GKD: whole distributions, no advantages
            logits, _, aux = model(batch["input_ids"], position_ids=batch["position_ids"])
            V = eval.vocab_size(self.tokenizer)
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"], position_ids=batch["position_ids"])[0]
            loss = generalized_jsd(logits[..., :V], teacher_logits[..., :V], mask, self.jsd_beta, self.temperature)
            lp = (logits.detach().float() / self.temperature).log_softmax(-1).gather(
                -1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * mask
            stats = policy_loss(lp, batch["old_logps"], torch.zeros_like(mask), mask, *self.eps)[1]
        else:
            aux = model(batch["input_ids"], batch["labels"], batch["position_ids"], log_probs=True,
                        temperature=self.temperature)[2]
            lp = aux["log_probs"]
            loss, stats = policy_loss(lp, batch["old_logps"], batch["advantages"], mask, *self.eps,
                                      ref_logps=batch.get("ref_logps"), beta=self.beta, loss_type=self.loss_type,
                                      max_completion_length=self.max_new_tokens,
                                      num_items_in_batch=self.tokens_per_micro_batch)
        d = (batch["old_logps"] - lp).detach()
        stats["approx_kl"] = masked_mean(torch.exp(d) - d - 1, mask)   # how far the updates moved it from the sampler
        if "moe_loss" in aux:
            loss = loss + aux["moe_loss"]
            aux = {**aux, "moe_loss": aux["moe_loss"].detach()}
        metrics = {k: v.detach().float() for k, v in stats.items()}
        metrics.update({k: torch.tensor(float(v), device=mask.device) for k, v in self.rollout_metrics.items()})
        return loss, {**{k: v for k, v in aux.items() if k != "log_probs"}, "metrics": metrics}

    # -- evaluation

    def val_batches(self, device, n_batches):
        """The held-out problems' reference solutions (the turn SFT would train on), one per
        row: the loss on them shows whether RL keeps the worked answers likely."""
        count = min(len(self.val) // self.world_size, n_batches * self.batch_size)
        mine = self.val[self.rank::self.world_size][:count]
        for s in range(0, count, self.batch_size):
            encoded = [sft.render_chat(r["messages"] + [r["solution"]], self.tokenizer)
                       for r in mine[s:s + self.batch_size]]
            batch = dpo.rows([([], ids[:self.seq_len], mask[:self.seq_len]) for ids, mask in encoded], self.pad_id)
            batch["source"] = torch.zeros(len(encoded), dtype=torch.long)
            yield {k: v.to(device) for k, v in batch.items()}

    def chat_tasks(self):
        """eval.py generative tasks: with the built-in prompts sft.chat_tasks (every level's
        held-out problems, as SFT and DPO are judged: the RL level and the demonstrated ones,
        to see both the gain and any forgetting); with a file its held-out problems ("rl_problem")
        in the template, answered greedily, scored by exact match and template adherence."""
        if self.problems is None:
            return sft.chat_tasks(self.tokenizer, self.math_format)
        tasks = {}
        for kind in self.kinds:
            examples = []
            for r in self.val:
                if r["kind"] == kind:
                    ids = prompt_ids(r, self.tokenizer)[0]
                    examples.append({"prompt": self.tokenizer.decode(ids), "prompt_ids": ids, "answer": r["answer"]})
            tasks[f"rl_{kind}"] = ("generative", examples)
        return tasks

    # -- state

    def state_dict(self):
        """The counters only: a resumed run samples a fresh rollout (the same prompts an
        uninterrupted run would draw next, with the weights of the checkpoint)."""
        return {"rollouts": self.rollouts, "batches": self.batches, "drawn": self.drawn}

    def load_state_dict(self, state):
        self.rollouts, self.batches, self.drawn = state["rollouts"], state["batches"], state["drawn"]
        self.stream = self.prompt_stream(self.drawn)
        self.buffer, self.served = [], 0


# -----------------------------------------------------------------------------
# Demo

def _demo():
    import os

    import tokenizer as T
    tok = T.Tokenizer.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "builtin", "tok.json"))
    print("Built-in prompts, one per level (arithmetic.py's \"rl\" split: never demonstrated, never held out):")
    stream = builtin_stream(0, arithmetic.LEVELS)
    for _ in arithmetic.LEVELS:
        rec = next(stream)
        print(f"  {rec['kind']:3s} {rec['messages'][-1]['content']!r} -> {rec['answer']}")
    ids, think = prompt_ids(rec, tok)
    print(f"the last as the policy reads it ({len(ids)} tokens, {'/think' if think else '/no_think'} mode):\n"
          + tok.decode(ids))
    rec = {"answer": "33"}
    group = [("<think>\n7 * 3 = 21\n12 + 21 = 33\n</think>\nThe answer is 33.", True),
             ("<think>\n12 + 7 = 19\n19 * 3 = 57\n</think>\nThe answer is 57.", True),
             ("<think>\n7 * 3 = 21\n12 + 21 = 33", False),
             ("The answer is 33.", True)]
    print("\nA group of four completions of 'What is 12 + 7 * 3? /think', their rewards (answer + 0.1 x format):")
    rewards = []
    for text, finished in group:
        r = math_reward(text, rec["answer"]) + 0.1 * format_reward(text, True, finished)
        rewards.append(r)
        print(f"  {r:.1f}  {text!r}{'' if finished else '  (cut off)'}")
    for scale in SCALES:
        adv, _ = group_advantages(torch.tensor(rewards), 4, scale)
        print(f"  advantages, scale={scale:5s}: {[round(a, 3) for a in adv.tolist()]}")
    print("\nThe clip (eps 0.2 / 0.28): d loss / d log pi of one token, by its ratio pi / pi_old")
    print("  ratio   A=+1    A=-1")
    for ratio in (0.6, 0.9, 1.0, 1.2, 1.5):
        grads = []
        for a in (1.0, -1.0):
            lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
            policy_loss(lp, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1), 0.2, 0.28)[0].backward()
            grads.append(lp.grad.item())
        print(f"  {ratio:4.1f}  {grads[0]:+.2f}   {grads[1]:+.2f}" + ("   <- one side past the clip: not pushed further"
                                                                    if ratio in (0.6, 1.5) else ""))
    print(f"\nDAPO's overlong penalty, max 64 tokens, the last 16 a ramp: "
          f"{[(n, round(overlong_penalty(n, 64, 16), 2)) for n in (40, 48, 56, 64)]}")


if __name__ == "__main__":
    _demo()
