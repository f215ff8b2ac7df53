"""
dpo.py: preference optimisation. DPO and its variants (IPO, APO-zero, APO-down, ORPO,
SimPO, KTO) as short loss functions, preference pairs (yours, or built-in ones with a held-out
split), the stage train.py drives, and model merging.

The concept. SFT teaches a model to imitate good answers; it never sees a bad one. Preference
optimisation shows it pairs, the same prompt with a chosen and a rejected answer, and moves
probability from the rejected one to the chosen one. RLHF did this with a reward model and
PPO; DPO (Rafailov et al. 2023) showed that the optimal policy of the KL-regularised reward
objective gives the reward in closed form, r(x, y) = beta log pi(y|x) / pi_ref(y|x) (up to a
term that cancels in a pair), so a Bradley-Terry loss on two completions trains the policy
directly:

    loss = -log sigmoid(beta [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))])

Everything is computed from the summed log-probability of each completion given its prompt,
under the policy and under a frozen reference (the SFT model). The variants change the
function of those four numbers:
- IPO (Azar et al. 2023): a squared loss pulling the (length-averaged) margin to 1/(2 beta),
  so it cannot be pushed to infinity on data that is always right;
- APO (D'Oosterlinck et al. 2024, "anchored"): each completion's own log-ratio anchored;
  APO-zero pushes the chosen up and the rejected down, for when the chosen answers are better
  than the model's own; APO-down pushes both down (the rejected more), for when they are not;
- ORPO (Hong et al. 2024): no reference; the SFT loss on the chosen plus an odds-ratio term;
- SimPO (Meng et al. 2024): no reference; the length-averaged log-probability is the reward,
  with a target margin gamma;
- KTO (Ethayarajh et al. 2024): unpaired thumbs up / down, each completion judged against a
  batch estimate of KL(policy || reference), after prospect theory.

The playbook's lessons: after SFT, "optimize for user preferences: DPO, or its variants (KTO,
ORPO, APO)"; SmolLM3 compared DPO, IPO, APO-zero and APO-down and kept APO-zero; preference
tuning wants a learning rate about ten times below SFT's (the policy must stay near its
reference: beta is that leash); and a model merged after APO (a linear average with an
earlier checkpoint) recovered what APO cost on long context. Watch the chosen log-probability
as well as the margin: DPO can widen the margin while both answers lose probability.

Papers: Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Mitchell 2023 (cDPO, label
smoothing); D'Oosterlinck et al. 2024 (APO); Hong et al. 2024 (ORPO); Meng et al. 2024 (SimPO);
Ethayarajh et al. 2024 (KTO); Wortsman et al. 2022 (model soups: averaging weights).
Hugging Face TRL's DPOTrainer, CPOTrainer, ORPOTrainer and KTOTrainer define the same losses:
tests/test_dpo.py checks these against the numbers they give.

This file takes the model and tokenizer as arguments. It imports sft.py and arithmetic.py (and
nothing else of the project), because a preference pair must be written in exactly the chat
template and the arithmetic layout the SFT model learned: copy the three files together. The
built-in arithmetic pairs differ only where a careless hand would: a carry forgotten or a
digit off by one (arithmetic.slipped), in the same layout.

Run:
    python dpo.py                                              # demo: a built-in pair, its rows, every loss on it
    python train.py --stage dpo --init runs/sft/ckpt/step_000080 --out_dir runs/dpo   # APO-zero
    python train.py --stage dpo --loss sigmoid --beta 0.1 --pref_data ultrafeedback.jsonl --init CKPT
    python dpo.py merge runs/merged runs/dpo/ckpt/step_000060:0.9 runs/sft/ckpt/step_000080:0.1
"""

import argparse
import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import arithmetic
import sft

LOSSES = ("sigmoid", "ipo", "apo_zero", "apo_down", "orpo", "simpo", "kto")
REFERENCE_FREE = ("orpo", "simpo")
AVERAGED = ("ipo", "orpo", "simpo")     # these read the mean log-probability per completion token


# -----------------------------------------------------------------------------
# The losses: one value per example, from summed completion log-probabilities (B,)

def dpo_loss(logits, beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), "sigmoid": -log sigmoid(beta h), with h the policy's
    log-ratio margin minus the reference's, h = (pi_c - pi_r) - (ref_c - ref_r). With
    label_smoothing eps (cDPO, Mitchell 2023) the preference is taken to be wrong with
    probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def ipo_loss(logits, beta=0.1):
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2 with h as DPO's but on log-probabilities
    averaged over each completion's tokens. A regression to a finite margin: the loss rises
    again past it, where DPO's keeps rewarding an ever larger margin."""
    return (logits - 1 / (2 * beta)) ** 2


def apo_zero_loss(chosen_logratios, rejected_logratios, beta=0.1):
    """APO-zero (D'Oosterlinck et al. 2024): (1 - sigmoid(beta rho_c)) + sigmoid(beta rho_r),
    rho = log pi(y) - log pi_ref(y) of each completion. Anchored at zero: the chosen
    likelihood goes up and the rejected down, each on its own, not only their difference.
    For chosen answers better than the model's own (SmolLM3's choice)."""
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios, rejected_logratios, beta=0.1):
    """APO-down: sigmoid(beta rho_c) + (1 - sigmoid(beta (rho_c - rho_r))): both likelihoods
    go down, the rejected more. For chosen answers worse than what the model already writes."""
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def _log1mexp(a):
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012): log(-expm1(a)) near
    0, where 1 - exp(a) cancels, and log1p(-exp(a)) further out."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, beta=0.1):
    """ORPO (Hong et al. 2024), reference-free: -avg_c - beta log sigmoid(log odds_c - log
    odds_r), with odds(y) = p / (1 - p) of the mean per-token probability p = exp(avg). The
    first term is the SFT loss on the chosen completion (its mean token NLL), so ORPO replaces
    SFT and preference tuning with one stage. beta is the paper's lambda. (TRL takes the NLL
    as one token mean over the batch; per example it is each completion's mean, equal when
    lengths are equal.)"""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (_log1mexp(chosen_avg_logps) - _log1mexp(rejected_avg_logps))
    return -chosen_avg_logps - beta * F.logsigmoid(log_odds)


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta (avg_c - avg_r) - gamma).
    The mean log-probability is the reward (what generation ranks by, and no bias to longer
    answers); gamma is a target margin. The paper's beta is near 2, far above DPO's."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def preference_loss(loss_type, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, beta=0.1,
                    label_smoothing=0.0, gamma=0.5):
    """One loss per pair (B,), from the completions' summed log-probabilities under the policy
    and the reference (None for orpo and simpo) and their token counts (for ipo, orpo and
    simpo, which average). Equal to TRL's definitions for the same inputs."""
    if loss_type not in LOSSES or loss_type == "kto":
        raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(x for x in LOSSES if x != 'kto')} "
                         "(kto is kto_loss, on unpaired completions)")
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type not in REFERENCE_FREE and (rc is None or rr is None):
        raise ValueError(f"{loss_type} compares against a reference: give ref_chosen_logps and ref_rejected_logps")
    if loss_type in AVERAGED:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"{loss_type} averages over completion tokens: give chosen_lengths and rejected_lengths")
        pc, pr = pc / chosen_lengths, pr / rejected_lengths
        if loss_type == "ipo":
            rc, rr = rc / chosen_lengths, rr / rejected_lengths
    if loss_type == "orpo":
        return orpo_loss(pc, pr, beta)
    if loss_type == "simpo":
        return simpo_loss(pc, pr, beta, gamma, label_smoothing)
    if loss_type == "apo_zero":
        return apo_zero_loss(pc - rc, pr - rr, beta)
    if loss_type == "apo_down":
        return apo_down_loss(pc - rc, pr - rr, beta)
    logits = (pc - pr) - (rc - rr)
    return ipo_loss(logits, beta) if loss_type == "ipo" else dpo_loss(logits, beta, label_smoothing)


def implicit_rewards(loss_type, policy_logps, ref_logps=None, lengths=None, beta=0.1):
    """Each completion's reward as TRL logs it (rewards/chosen, /rejected): beta (log pi -
    log pi_ref) of the summed log-probabilities (ipo's too, as TRL 1.x); beta times the mean
    log-probability per token for the reference-free orpo and simpo."""
    if loss_type in REFERENCE_FREE:
        return beta * (policy_logps / lengths).detach()
    return beta * (policy_logps - ref_logps).detach()


def kto_kl(policy_kl_logps, ref_kl_logps, group=None):
    """KTO's reference point z0: KL(policy || reference) estimated on the batch's mismatched
    pairs (each prompt with another example's completion), mean(log pi - log pi_ref), averaged
    over the data-parallel group, clamped at 0 and detached: a baseline, not a target."""
    kl = (policy_kl_logps - ref_kl_logps).detach().mean()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(kl, group=group)
        kl = kl / dist.get_world_size(group)
    return kl.clamp(min=0)


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024), one loss per unpaired completion: with rho = log pi -
    log pi_ref and z0 = kl (kto_kl), a desirable one costs w_d (1 - sigmoid(beta (rho - z0))),
    an undesirable one w_u (1 - sigmoid(beta (z0 - rho))). Gains and losses are measured from
    the reference point z0 (prospect theory); the weights rebalance unequal counts (the paper:
    keep w_d n_d / (w_u n_u) within [1, 4/3])."""
    rho = policy_logps - ref_logps
    desirable = desirable.bool()
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (rho - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - rho))))


# -----------------------------------------------------------------------------
# Preference data: TRL's shapes in files, or the built-in pairs

def _as_messages(x, role, where, key):
    """A string is one message of `role`; a list of messages is taken as it is."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list) and all(isinstance(m, dict) for m in x):
        return x
    raise ValueError(f"{where}: '{key}' is neither a string nor a list of messages")


def preference_record(row, where="a row"):
    """A row in one of TRL's shapes -> {"prompt": messages, "chosen": messages, "rejected":
    messages} or, unpaired (KTO), {"prompt", "completion": messages, "label": bool}:
    - prompt, chosen, rejected as message lists (conversational), or as strings, read here as
      one user turn and one assistant reply: by this stage the model is a chat model;
    - chosen and rejected whole conversations with no prompt (the implicit prompt: the
      messages they share);
    - prompt, completion and a boolean label (unpaired).
    Raises ValueError naming `where` and the key."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row is a JSON object")
    if "completion" in row or "label" in row:
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise ValueError(f"{where}: an unpaired row has prompt, completion and label; no {', '.join(missing)}")
        if not isinstance(row["label"], bool):
            raise ValueError(f"{where}: 'label' is true (desirable) or false, not {row['label']!r}")
        rec = {"prompt": _as_messages(row["prompt"], "user", where, "prompt"),
               "completion": _as_messages(row["completion"], "assistant", where, "completion"), "label": row["label"]}
        parts = ("completion",)
    else:
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"{where}: no {' or '.join(missing)} (a pair has prompt, chosen and rejected; "
                             "an unpaired row prompt, completion and label)")
        chosen = _as_messages(row["chosen"], "assistant", where, "chosen")
        rejected = _as_messages(row["rejected"], "assistant", where, "rejected")
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "user", where, "prompt")
        else:                    # the implicit prompt: what both conversations share
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        rec, parts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ("chosen", "rejected")
    try:
        sft.check_conversation(rec["prompt"], need_assistant=False)
        for part in parts:
            if not rec[part] or rec[part][0]["role"] != "assistant":
                raise ValueError(f"'{part}' must start with an assistant message")
            sft.check_conversation(rec["prompt"] + rec[part])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return rec


def read_preferences(path):
    """Records (preference_record) of a .jsonl or .parquet file; a bad row raises ValueError
    naming the file and line (or row)."""
    records = [preference_record(row, where) for where, row in sft.read_rows(path)]
    if len({"chosen" in r for r in records}) > 1:
        raise ValueError(f"{path}: mixes pairs (chosen, rejected) and unpaired rows (completion, label)")
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def arithmetic_pair(problem, fmt, rng):
    """(kind, record): a problem answered right (chosen) and with a slip carried through the
    working to the answer (rejected: a carry forgotten or a digit off by one, arithmetic.slipped),
    in the same format: the difference is the arithmetic, nothing else."""
    a, op, b = problem
    prompt, turn = sft.arithmetic_messages(problem, fmt, rng)
    wrong = arithmetic.slipped(a, op, b, rng)
    return "arithmetic", {"prompt": prompt, "chosen": [turn],
                          "rejected": [sft.math_turn(arithmetic.working(a, op, b, fmt, wrong), arithmetic.answer(wrong, fmt))]}


def faithful_pair(problem, fmt, rng):
    """(kind, record): the right working and answer (chosen) against the same working with an
    answer it does not support (rejected). A slip takes arithmetic to catch; this takes reading
    one's own working back (an answer should follow from its reasoning)."""
    a, op, b = problem
    prompt, turn = sft.arithmetic_messages(problem, fmt, rng)
    wrong = arithmetic.slipped(a, op, b, rng)
    return "faithful", {"prompt": prompt, "chosen": [turn],
                        "rejected": [sft.math_turn(turn["reasoning"], arithmetic.answer(wrong, fmt))]}


def complete_pair(problem, fmt, rng):
    """(kind, record): the whole answer (chosen) against the working cut off halfway, with no
    answer (rejected: what a model that stops early says). The rejected reply is shorter, so a
    model fresh from SFT finds it the more likely one (summed log-probabilities): the preference
    a small model learns first, finishing what it starts, as real preference data teaches format
    and completeness long before correctness."""
    prompt, turn = sft.arithmetic_messages(problem, fmt, rng)
    cut = turn["reasoning"][:max(1, len(turn["reasoning"]) // 2)]
    return "complete", {"prompt": prompt, "chosen": [turn],
                        "rejected": [{"role": "assistant", "content": "", "reasoning": cut}]}


def docstring_pair(rng, fn, functions):
    """(kind, key, record): "what does X do" answered by X's docstring (chosen) and by another
    function's, from the same module when it has one (rejected: fluent, and wrong)."""
    name, doc, _ = fn
    mod = name.rsplit(".", 1)[0]
    same = [f for f in functions if f[0].rsplit(".", 1)[0] == mod and f[1] != doc]
    other = rng.choice(same or [f for f in functions if f[1] != doc])
    q = rng.choice(["What does `{}` do?", "Explain `{}` in one sentence.", "What is `{}` for?"]).format(name)
    return "docstring", name, {"prompt": sft.opening(rng, q, think=False),
                               "chosen": [{"role": "assistant", "content": doc}],
                               "rejected": [{"role": "assistant", "content": other[1]}]}


KINDS = ("arithmetic", "faithful", "complete", "docstring")
ARITHMETIC_PAIRS = (arithmetic_pair, faithful_pair, complete_pair)


def builtin_pairs(n=2000, seed=0, fmt=sft.MATH_FORMAT, digits=sft.MATH_DIGITS, heldout_per_level=32):
    """{"train": [(kind, record)], "val": [...]}: n arithmetic pairs (the three kinds in turn) on
    arithmetic.py's training problems of the demonstrated levels, in its format, and two pairs
    per standard-library function, deterministic from the seed. Held out: pairs on arithmetic.py's
    held-out problems (heldout_per_level of each demonstrated level, every kind) and the
    functions sft.py holds out (a hash of the name), so a held-out prompt was held out of the
    built-in SFT data too."""
    rng = random.Random(seed)
    problems = arithmetic.problems("train", range(1, digits + 1), seed)
    out = {"train": [ARITHMETIC_PAIRS[i % 3](next(problems), fmt, rng) for i in range(n)], "val": []}
    for d in range(1, digits + 1):
        for i, p in enumerate(arithmetic.heldout(d, heldout_per_level)):
            out["val"].append(ARITHMETIC_PAIRS[i % 3](p, fmt, random.Random(f"{p}")))
    functions = sft.stdlib_functions()
    for kind, key, rec in (docstring_pair(rng, fn, functions) for fn in functions for _ in range(2)):
        out["val" if sft.is_heldout(key) else "train"].append((kind, rec))
    return out


def unpair(records):
    """Paired records -> unpaired ones (KTO): the chosen desirable, the rejected not."""
    return [(kind, {"prompt": r["prompt"], "completion": r[part], "label": part == "chosen"})
            for kind, r in records for part in ("chosen", "rejected")]


# -----------------------------------------------------------------------------
# Tokens and rows

def tokenize(records, tokenizer, max_len, overlong="truncate"):
    """[(kind, record)] -> ([example], counts). An example is (prompt_ids, [(completion_ids,
    mask)], kind, label): the prompt rendered with the generation prompt, each completion the
    tokens that follow it in the whole conversation (the template makes the prompt an exact
    prefix), mask the assistant's tokens; label is None for a pair. Over max_len, the prompt
    keeps its last tokens (at least half the row, or what the longest completion leaves) and
    completions are cut, or the example is skipped (overlong="skip"); counted either way. A
    pair whose two completions the cut makes identical (they differed only further on) is
    skipped and counted ("identical"): nothing tells its sides apart any more."""
    if overlong not in ("truncate", "skip"):
        raise ValueError(f"overlong={overlong!r}: truncate or skip")
    out, counts = [], {"examples": len(records), "truncated": 0, "skipped": 0, "identical": 0}
    for kind, rec in records:
        prompt, _ = sft.render_chat(rec["prompt"], tokenizer, add_generation_prompt=True)
        parts = []
        for part in ("chosen", "rejected") if "chosen" in rec else ("completion",):
            ids, mask = sft.render_chat(rec["prompt"] + rec[part], tokenizer)
            parts.append((ids[len(prompt):], mask[len(prompt):]))
        longest = max(len(ids) for ids, _ in parts)
        if len(prompt) + longest > max_len:
            if overlong == "skip":
                counts["skipped"] += 1
                continue
            keep = min(len(prompt), max(max_len // 2, max_len - longest))
            prompt = prompt[len(prompt) - keep:]
            parts = [(ids[:max_len - keep], mask[:max_len - keep]) for ids, mask in parts]
            if not all(any(m) for _, m in parts):
                counts["skipped"] += 1
                continue
            if len(parts) == 2 and parts[0][0] == parts[1][0]:
                counts["skipped"] += 1
                counts["identical"] += 1
                continue
            counts["truncated"] += 1
        out.append((prompt, parts, kind, rec.get("label")))
    if out and out[0][3] is not None:
        # unpaired: each example also carries the previous example's completion (cut to fit),
        # the mismatched pair KTO estimates its KL baseline on; fixed per example, so a cached
        # reference value stays valid whatever batch the example lands in
        out = [(p, [parts[0], tuple(x[:max_len - len(p)] for x in out[i - 1][1][0])], kind, label)
               for i, (p, parts, kind, label) in enumerate(out)]
    return out, counts


def rows(sequences, pad_id):
    """[(prompt_ids, completion_ids, mask)] -> a batch (input_ids, labels, position_ids),
    padded to the longest: labels are the completion's trained tokens (so a row's summed
    log-probability is log pi(completion | prompt)), -100 elsewhere; lengths, each row's
    tokens before the padding."""
    made = [(p + c, [False] * len(p) + list(m), None) for p, c, m in sequences]
    width = max(len(ids) for ids, _, _ in made)
    return sft.collate([sft.make_row([ex], width, pad_id) for ex in made], lengths=[len(ids) for ids, _, _ in made])


def pair_batch(examples, pad_id):
    """Examples -> one batch of 2B rows: the B chosen, then the B rejected (one forward for
    both, as TRL's concatenated forward). Unpaired examples: their B completions, then the B
    mismatched ones (KTO's KL rows), and "desirable" (B,)."""
    batch = rows([(p, *parts[0]) for p, parts, _, _ in examples] + [(p, *parts[1]) for p, parts, _, _ in examples],
                 pad_id)
    if examples[0][3] is not None:
        batch["desirable"] = torch.tensor([label for *_, label in examples], dtype=torch.bool)
    return batch


def sequence_logps(model, batch, grad=True):
    """Summed log-probability of each row's labels (2B,) and the forward's aux. Through the
    model's forward (log_probs=True), so data-parallel and sharded wrappers see a forward."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        _, _, aux = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                          log_probs=True)
    return aux["log_probs"].float().sum(1), aux


# -----------------------------------------------------------------------------
# The stage train.py drives

class DPOStage:
    """The stage contract (train.py): next_batch(), loss(model, batch) -> (loss, aux with
    "metrics"), val_batches(device, n) and names (held-out loss on the chosen answers),
    evaluate(model, device) (held-out preference accuracy), state_dict() / load_state_dict().

    batch_size counts pairs (2 rows each). The reference is the model as it was given, either
    a frozen copy (ref="copy") or its log-probabilities, computed once over every example by
    cache_reference() and kept in the stage's state (ref="cache": one model in memory). Every
    epoch the examples are shuffled from (seed, epoch); data-parallel rank r takes examples r,
    r + world_size, ..."""

    mask_warn = 0.98       # preflight: prompts are masked, and padding to the longest row
    # what loss() reports per step (train.py averages them over micro-batches and ranks)
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "kl")

    def __init__(self, tokenizer, seq_len, batch_size, model=None, data="builtin", loss_type="apo_zero", beta=0.1,
                 label_smoothing=0.0, gamma=0.5, ref="copy", desirable_weight=1.0, undesirable_weight=1.0,
                 overlong="truncate", seed=0, rank=0, world_size=1, group=None, math_format=sft.MATH_FORMAT,
                 math_digits=sft.MATH_DIGITS, log=print):
        if loss_type not in LOSSES:
            raise ValueError(f"loss {loss_type!r}: one of {', '.join(LOSSES)}")
        if ref not in ("copy", "cache"):
            raise ValueError(f"ref {ref!r}: copy (a frozen copy of the model) or cache (its log-probabilities)")
        self.loss_type, self.beta, self.label_smoothing, self.gamma = loss_type, beta, label_smoothing, gamma
        self.weights = (desirable_weight, undesirable_weight)
        self.batch_size, self.seed, self.rank, self.world_size, self.group = batch_size, seed, rank, world_size, group
        self.tokenizer, self.seq_len, self.math_format = tokenizer, seq_len, math_format
        self.pad_id = next((sft.special_id(tokenizer, s) for s in ("<|pad|>", "<|eos|>", "<|im_end|>")
                            if sft.has_special(tokenizer, s)), 0)
        if data == "builtin":     # (the held-out split does not move with --seed)
            split, self.names = builtin_pairs(seed=0, fmt=math_format, digits=math_digits), KINDS
        else:
            split, self.names = {"train": [], "val": []}, ("pref",)
            for rec in read_preferences(data):
                split["val" if sft.is_heldout(json.dumps(rec), 0.02) else "train"].append(("pref", rec))
        self.paired = "chosen" in split["train"][0][1] if split["train"] else True
        if loss_type == "kto" and self.paired:
            split = {k: unpair(v) for k, v in split.items()}
        elif loss_type != "kto" and not self.paired:
            raise ValueError(f"{data}: unpaired rows (prompt, completion, label) train with loss kto only, "
                             f"not {loss_type}")
        self.train, counts = tokenize(split["train"], tokenizer, seq_len, overlong)
        self.val, val_counts = tokenize(split["val"], tokenizer, seq_len, overlong)
        # round robin over the kinds: evaluation reads the first examples, and each kind is among them
        by_kind = [[ex for ex in self.val if ex[2] == k] for k in self.names]
        self.val = [ex for group in itertools.zip_longest(*by_kind) for ex in group if ex is not None]
        if len(self.train) < batch_size * world_size:
            raise ValueError(f"{data}: {len(self.train)} training examples, fewer than one batch of {batch_size} "
                             f"on each of {world_size} ranks")
        if len(self.val) < world_size:      # (evaluation gives every rank a share)
            raise ValueError(f"{data}: {len(self.val)} held-out examples (2% of the rows, by a hash of each), "
                             f"fewer than the {world_size} rank(s) that evaluate them: a file with more rows")
        self.needs_ref = loss_type not in REFERENCE_FREE
        self.ref_mode = ref if self.needs_ref else "none"
        self.ref_model = None
        if self.needs_ref and ref == "copy":
            if model is None:
                raise ValueError("ref='copy' needs the model to copy")
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ref_cache = None      # {"train": (N, 2), "val": (M, 2)} summed log-probs, when cached
        # the work a batch costs, in forward passes over it (train.py's FLOPs and MFU): the
        # policy's forward and backward (a backward is two forwards' worth), the frozen copy's
        # forward; KTO's mismatched half is scored without a backward
        self.forward_passes = (2 if loss_type == "kto" else 3) + (self.ref_mode == "copy")
        self.epoch, self.cursor, self.batches = 0, 0, 0
        self.order = self.shuffled(0)
        what = "pairs" if self.paired else "completions"
        same = f", {counts['identical']} of them made identical by the cut" if counts["identical"] else ""
        log(f"dpo data ({data}): {counts['examples']} {what}{' (unpaired for kto)' if loss_type == 'kto' else ''}, "
            f"{counts['truncated']} truncated and {counts['skipped']} skipped (over {seq_len} tokens, --overlong "
            f"{overlong}{same}); held out {len(self.val)} ({val_counts['truncated']} truncated, {val_counts['skipped']} "
            f"skipped); loss {loss_type}, beta {beta}, reference: "
            + {"copy": "a frozen copy", "cache": "cached log-probabilities", "none": "none (reference-free)"}[self.ref_mode])

    # -- the reference

    @torch.no_grad()
    def cache_reference(self, model, device, log=print):
        """Every example's reference log-probabilities (train and held-out), from `model` before
        any update: each rank computes its share, then all ranks exchange them. Call it under
        the autocast the policy trains under (train.py does).

        The rows are scored in the very batches that read them first: the first epoch's
        training batches, then the examples no full batch of that epoch holds, and the held-out
        ones as evaluate() groups them. A row's log-probability depends, in its last bits, on
        the length its batch is padded to (bf16 most of all), and scored in another batch the
        policy and its cached reference would not tie at 0 before the first update, as a
        frozen copy does."""
        self.ref_cache = {}
        was_training = model.training
        model.eval()
        bs, first = self.batch_size, self.shuffled(0)
        full = len(first) // bs * bs                # (every rank's first epoch is as long)
        train = [first[s:s + bs] for s in range(0, full, bs)]      # as next_batch will read them
        read = {i for r in range(self.world_size) for i in self.shuffled(0, r)[:full]}
        rest = [i for i in range(len(self.train)) if i not in read][self.rank::self.world_size]
        train += [rest[s:s + bs] for s in range(0, len(rest), bs)]
        val = list(range(self.rank, len(self.val), self.world_size))
        for split, batches in (("train", train), ("val", [val[s:s + bs] for s in range(0, len(val), bs)])):
            examples = getattr(self, split)
            values = torch.zeros(len(examples), 2, device=device)
            for n, idx in enumerate(batches):
                batch = {k: v.to(device) for k, v in pair_batch([examples[i] for i in idx], self.pad_id).items()}
                logps, _ = sequence_logps(model, batch, grad=False)
                values[idx] = logps.view(2, len(idx)).t()
                if n % 50 == 49:
                    log(f"  reference log-probs ({split}): batch {n + 1}/{len(batches)}")
            if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(values, group=self.group)      # each rank filled its own rows, zeros elsewhere
            self.ref_cache[split] = values.cpu()
        model.train(was_training)
        log(f"reference log-probabilities cached: {len(self.train)} training and {len(self.val)} held-out examples")

    def reference_logps(self, batch):
        """(2B,) reference log-probabilities of the batch's rows, or None (reference-free)."""
        if not self.needs_ref:
            return None
        if self.ref_mode == "cache":
            if "ref_logps" not in batch:
                raise RuntimeError("ref='cache': call cache_reference(model) before training")
            return batch["ref_logps"].float()
        return sequence_logps(self.ref_model, batch, grad=False)[0]

    def _attach_ref(self, batch, split, idx):
        if self.ref_mode == "cache" and self.ref_cache is not None:
            batch["ref_logps"] = self.ref_cache[split][idx].t().reshape(-1)    # chosen rows, then rejected
        return batch

    # -- batches and the loss

    def shuffled(self, epoch, rank=None):
        """This rank's (or `rank`'s) examples of an epoch (indices into self.train), as many on
        every rank."""
        order = list(range(len(self.train)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        order = order[:len(order) // self.world_size * self.world_size]
        return order[self.rank if rank is None else rank::self.world_size]

    def next_batch(self):
        if self.cursor + self.batch_size > len(self.order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self.shuffled(self.epoch)
        idx = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        self.batches += 1
        return self._attach_ref(pair_batch([self.train[i] for i in idx], self.pad_id), "train", idx)

    def losses(self, model, batch):
        """(per-example losses (B,), metrics {name: scalar}, the forward's aux)."""
        if self.loss_type == "kto":
            return self._kto_losses(model, batch)
        logps, aux = sequence_logps(model, batch)
        ref = self.reference_logps(batch)
        B = len(logps) // 2
        lengths = (batch["labels"] != -100).sum(1).float()
        rc, rr = (ref[:B], ref[B:]) if ref is not None else (None, None)
        losses = preference_loss(self.loss_type, logps[:B], logps[B:], rc, rr, lengths[:B], lengths[B:], self.beta,
                                 self.label_smoothing, self.gamma)
        chosen = implicit_rewards(self.loss_type, logps[:B], rc, lengths[:B], self.beta)
        rejected = implicit_rewards(self.loss_type, logps[B:], rr, lengths[B:], self.beta)
        metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/accuracies": (chosen > rejected).float().mean(),
                   "rewards/margins": (chosen - rejected).mean(),
                   "logps/chosen": logps[:B].detach().mean(), "logps/rejected": logps[B:].detach().mean()}
        return losses, metrics, aux

    def _kto_losses(self, model, batch):
        B = len(batch["desirable"])
        real = {k: v[:B] for k, v in batch.items() if k != "desirable"}
        mismatched = {k: v[B:] for k, v in batch.items() if k != "desirable"}
        logps, aux = sequence_logps(model, real)
        kl_logps, _ = sequence_logps(model, mismatched, grad=False)
        ref = self.reference_logps(batch)
        kl = kto_kl(kl_logps, ref[B:], self.group)
        d = batch["desirable"]
        losses = kto_loss(logps, ref[:B], d, kl, self.beta, *self.weights)
        rewards = self.beta * (logps - ref[:B]).detach()
        n_d, n_u = d.sum().clamp(min=1), (~d).sum().clamp(min=1)
        metrics = {"kl": kl, "rewards/chosen": (rewards * d).sum() / n_d, "rewards/rejected": (rewards * ~d).sum() / n_u,
                   "logps/chosen": (logps.detach() * d).sum() / n_d, "logps/rejected": (logps.detach() * ~d).sum() / n_u}
        return losses, metrics, aux

    def loss(self, model, batch):
        """The mean over the batch's pairs (or KTO's examples): a loss per pair, not per token,
        as TRL's; every micro-batch holds batch_size of them, so train.py weighs micro-batches
        equally. (ORPO's NLL term is a mean per chosen completion, as in the paper.)"""
        losses, metrics, aux = self.losses(model, batch)
        loss = losses.mean()
        if "moe_loss" in aux:               # an MoE model's balancing terms, as in pretraining
            loss = loss + aux["moe_loss"]
            aux = {**aux, "moe_loss": aux["moe_loss"].detach()}
        return loss, {**{k: v for k, v in aux.items() if k != "log_probs"},
                      "metrics": {k: v.detach().float() for k, v in metrics.items()}}

    # -- evaluation

    def val_batches(self, device, n_batches):
        """The held-out chosen (desirable) answers, one per row, `source` their kind: the loss
        on them shows whether preference tuning keeps the good answers likely."""
        good = [(p, *parts[0], kind) for p, parts, kind, label in self.val if label in (None, True)]
        count = min(n_batches * self.batch_size, len(good) // self.world_size)
        mine = good[self.rank::self.world_size][:count]
        for s in range(0, count, self.batch_size):
            part = mine[s:s + self.batch_size]
            batch = rows([(p, c, m) for p, c, m, _ in part], self.pad_id)
            batch["source"] = torch.tensor([self.names.index(kind) for *_, kind in part])
            yield {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self, model, device, n=256):
        """Held-out preference outcomes, one per example of the first n held-out ones (every
        rank its share, gathered), for train.py to turn into metrics with intervals:
        "pref/accuracy" [bool], whether the model finds the chosen answer more likely than the
        rejected one (summed log-probabilities: which it would rather say), overall and per
        kind; "pref/reward_accuracy" [bool] and "pref/margin" [float], the implicit rewards as
        training sees them (with a reference: ties at 0 before any update). Unpaired data:
        "pref/reward_desirable" and "pref/reward_undesirable" [float]."""
        count = min(n, len(self.val)) // self.world_size       # as many on every rank: sharded
        idx = list(range(self.rank, count * self.world_size, self.world_size))   # forwards run in step
        was_training = model.training
        model.eval()
        table = [torch.zeros(0, 5, device=device)]
        for s in range(0, len(idx), self.batch_size):
            part = idx[s:s + self.batch_size]
            batch = self._attach_ref(pair_batch([self.val[i] for i in part], self.pad_id), "val", part)
            batch = {k: v.to(device) for k, v in batch.items()}
            logps, _ = sequence_logps(model, batch, grad=False)
            ref = self.reference_logps(batch)
            lengths = (batch["labels"] != -100).sum(1).float()
            B = len(part)
            r = implicit_rewards(self.loss_type, logps, ref, lengths, self.beta)
            kind = torch.tensor([float(self.names.index(self.val[i][2])) for i in part], device=device)
            second = batch["desirable"].float() if not self.paired else logps[B:]
            table.append(torch.stack([logps[:B], second, r[:B], r[B:], kind], 1))
        model.train(was_training)
        table = torch.cat(table)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            parts = [torch.empty_like(table) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, table, group=self.group)
            table = torch.cat(parts)
        table = table.double().cpu()
        if not self.paired:
            good = table[:, 1] > 0
            return {"pref/reward_desirable": table[good, 2].tolist(), "pref/reward_undesirable": table[~good, 2].tolist()}
        out = {"pref/accuracy": (table[:, 0] > table[:, 1]).tolist()}
        for k, name in enumerate(self.names if len(self.names) > 1 else ()):
            sel = table[:, 4] == k
            out[f"pref/accuracy/{name}"] = (table[sel, 0] > table[sel, 1]).tolist()
        out["pref/reward_accuracy"] = (table[:, 2] > table[:, 3]).tolist()
        out["pref/margin"] = (table[:, 2] - table[:, 3]).tolist()
        return out

    def chat_tasks(self):
        """The held-out built-in math questions in the chat template (sft.chat_tasks): what
        the arithmetic pairs should improve, judged before and after."""
        return sft.chat_tasks(self.tokenizer, self.math_format)

    # -- state

    def state_dict(self):
        state = {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches}
        if self.ref_cache is not None:     # the reference is gone once training starts: keep its numbers
            state["ref_cache"] = {k: v.tolist() for k, v in self.ref_cache.items()}
        return state

    def load_state_dict(self, state):
        self.epoch, self.cursor, self.batches = state["epoch"], state["cursor"], state["batches"]
        self.order = self.shuffled(self.epoch)
        if "ref_cache" in state:
            self.ref_cache = {k: torch.tensor(v) for k, v in state["ref_cache"].items()}


# -----------------------------------------------------------------------------
# Model merging

def merge_checkpoints(out, sources):
    """A linear merge (Wortsman et al. 2022's "soup"; SmolLM3 merged its APO model with a
    mid-training checkpoint, 0.9 and 0.1, to win back long context): out = sum_i w_i theta_i,
    over [(checkpoint dir, weight)]. Every checkpoint must hold the same tensors. Writes out/
    (model.safetensors, and the first checkpoint's trainer.json or config.json with the
    recipe) through a temporary directory renamed at the end: no half-written merge."""
    from safetensors.torch import load_file, save_file
    if not sources:
        raise ValueError("merge: no checkpoints")
    total = sum(w for _, w in sources)
    if abs(total - 1) > 1e-6:
        print(f"merge: the weights sum to {total:g}, not 1 (an extrapolation or a shrink, as asked)", file=sys.stderr)
    merged, first = None, sources[0][0]
    for path, w in sources:
        f = os.path.join(path, "model.safetensors")
        if not os.path.exists(f):
            raise ValueError(f"merge: {f} does not exist (a train.py checkpoint or a Hugging Face directory)")
        weights = load_file(f)
        if merged is None:
            merged = {k: w * v.double() for k, v in weights.items()}
            continue
        if set(weights) != set(merged):
            raise ValueError(f"merge: {path} holds other tensors than {first}: missing "
                             f"{sorted(set(merged) - set(weights))[:5]}, unexpected {sorted(set(weights) - set(merged))[:5]}")
        for k, v in weights.items():
            if v.shape != merged[k].shape:
                raise ValueError(f"merge: {path}: {k} is {tuple(v.shape)}, {first} has {tuple(merged[k].shape)}")
            merged[k] += w * v.double()
    dtypes = {k: v.dtype for k, v in load_file(os.path.join(first, "model.safetensors")).items()}
    parent, name = os.path.split(os.path.abspath(out))
    if os.path.exists(out):
        raise ValueError(f"merge: {out} exists; choose a new directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        save_file({k: v.to(dtypes[k]).contiguous() for k, v in merged.items()}, os.path.join(tmp, "model.safetensors"))
        recipe = [{"checkpoint": os.path.abspath(p), "weight": w} for p, w in sources]
        if os.path.exists(os.path.join(first, "trainer.json")):
            with open(os.path.join(first, "trainer.json")) as f:
                state = json.load(f)
            keep = {k: state[k] for k in ("model_config", "config") if k in state}
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump({**keep, "step": 0, "merged_from": recipe}, f, indent=1)
        else:
            shutil.copy(os.path.join(first, "config.json"), tmp)
            with open(os.path.join(tmp, "merge.json"), "w") as f:
                json.dump(recipe, f, indent=1)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -----------------------------------------------------------------------------
# Demo and command line

def _demo():
    import model as M
    import tokenizer as T
    print("A built-in preference pair (a training problem; arithmetic.py's split holds others out):")
    kind, rec = builtin_pairs(n=50)["train"][0]
    for part in ("prompt", "chosen", "rejected"):
        print(f"  {part}: {json.dumps(rec[part])}")
    tok = T.Tokenizer.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "builtin", "tok.json"))
    (example,), _ = tokenize([(kind, rec)], tok, 256)
    batch = pair_batch([example], 0)
    print(f"\nrows: {tuple(batch['input_ids'].shape)} (chosen, rejected); trained tokens "
          f"{(batch['labels'] != -100).sum(1).tolist()}; the rejected row as the model reads it, "
          "trained tokens between ⟦ and ⟧:")
    print(sft.show_mask(tok, batch["input_ids"][1].tolist(), [False] + (batch["labels"][1] != -100).tolist()[:-1]))
    torch.manual_seed(0)
    policy = M.Model(M.preset("tiny", vocab_size=tok.vocab_size))
    logps, _ = sequence_logps(policy, batch, grad=False)
    lengths = (batch["labels"] != -100).sum(1).float()
    ref = logps + torch.tensor([-1.0, 1.0])     # pretend the reference liked the chosen less, the rejected more
    print(f"\nlog pi (chosen, rejected) = {logps.tolist()}; a made-up reference {ref.tolist()}")
    for lt in LOSSES[:-1]:
        loss = preference_loss(lt, logps[:1], logps[1:], ref[:1], ref[1:], lengths[:1], lengths[1:])
        print(f"  {lt:9s} loss {loss.item():.4f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _demo()
    p = argparse.ArgumentParser(prog="dpo.py", description="merge checkpoints: a weighted average of their weights")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="python dpo.py merge OUT CKPT:WEIGHT CKPT:WEIGHT ...")
    m.add_argument("out")
    m.add_argument("sources", nargs="+", help="checkpoint directories, each with :weight (default: equal weights)")
    args = p.parse_args(argv)
    sources = []
    for s in args.sources:
        path, _, w = s.rpartition(":") if ":" in s else (s, "", "")
        try:
            sources.append((path, float(w) if w else 1 / len(args.sources)))
        except ValueError:
            raise SystemExit(f"merge: {s!r}: a checkpoint directory, optionally with :weight (a number)") from None
    try:
        out = merge_checkpoints(args.out, sources)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"merged {len(sources)} checkpoints -> {out} ({', '.join(f'{w:g} x {p}' for p, w in sources)})")


if __name__ == "__main__":
    main()
