"""
eval.py: evaluation you can trust. Validation loss and bits per byte, cloze multiple choice,
generative exact match and sampled pass@k, each with its confidence interval; a check that the
pipeline itself is sound; and a report card that grows a row per training stage.

The concept. A model is judged three ways here:
- language modelling: the mean cross-entropy on held-out text, per source. A loss is in nats
  per *token*, so two tokenizers give incomparable numbers (a tokenizer with longer tokens has
  fewer, harder predictions). Bits per byte divides the same total by the text's UTF-8 bytes
  instead: bpb = sum(nats) / (ln 2 * bytes), which any two models of the same text share.
- cloze multiple choice (the "cloze formulation"): for a context and its choices, score each
  choice by the log-probability the model gives it as a continuation, and pick the best. Raw
  sums favour short choices, so the score is normalised: by the choice's characters (the
  playbook's choice, lighteval's "char norm", lm-eval's acc_norm), by its tokens, or not at
  all; all three are reported. No letters "A/B/C/D": small models score at chance on that
  multiple-choice formulation long after they score above it in cloze form.
- generative exact match: greedy generation, an extracted answer (GSM8K's `#### n`, a
  \\boxed{n}, or the last number), compared with the reference after normalisation. A chat
  question (sft.py's) comes already rendered in the chat template and is also scored for
  template adherence: does the reply end its turn with <|im_end|>, and nothing else special.
- sampled (pass@k): n completions of each problem at a temperature, c_i of them right. pass@1
  = mean c_i / n is one sample's accuracy measured n times over; pass@k is the chance that one
  of k tries is right, by Chen et al.'s unbiased estimator 1 - C(n - c, k) / C(n, k). Two
  models on the same problems are compared by their paired per-problem difference.
Every accuracy comes with a 95% Wilson interval, every loss with a delta-method interval over
rows, and every pass@k or paired difference with a normal one over problems: with 100
questions, 0.31 means "somewhere from 0.23 to 0.41", which is the difference between two
ablations more often than not.

The playbook's lessons: "validate your evaluation pipelines before the run": an evaluation that
cannot tell a random model from a trained one, or gives the answer away through the choices'
lengths or order, ranks ablations by noise. `validate_pipeline` runs three checks (train.py's
preflight calls it): a model that knows nothing scores chance within its interval, an oracle
that knows every answer scores 100%, and shuffling the order of the choices changes nothing
for a deterministic model. Ablations are judged on small, early-signal benchmarks in cloze
form with per-character normalisation (SmolLM3's choice); and losses are not comparable across
tokenizers (hence bits per byte).

Built-in tasks, held out from the built-in corpus (the caller hands over the held-out text:
train.py takes it from data.py's validation split), so every stage has something real to be
judged on without a download: `arithmetic` (generative: the corpus's math problems that were
never trained on), `docstring` (cloze: which docstring opens this function) and `next_line`
(cloze: which line of code comes next). Task files in the common jsonl shapes (HellaSwag's
ctx/endings/label, ARC's question/choices{text,label}/answerKey, MMLU's question/choices/answer,
PIQA's goal/sol1/sol2/label, GSM8K's question/answer "... #### 72") are read as they are.

This file takes a model and a tokenizer as arguments and imports nothing from the project. A
model is anything with `log_probs(input_ids, labels, position_ids)` (or a forward that returns
logits first) and, for generative tasks, `generate(prompts, max_new_tokens, temperature,
stop_ids=...)`; for validation loss, the project's model contract: `model(input_ids,
labels=, position_ids=)` -> (logits, loss, aux with "row_ce"). A tokenizer is anything with
encode/decode (a tiktoken Encoding, tokenizer.py's, data.py's ByteTokenizer). Only the command
line below opens the project's own checkpoints (with model.py and data.py).

Papers and tools: Gao et al. 2021 (lm-evaluation-harness: cloze scoring, acc_norm);
Hugging Face lighteval and "FineWeb" (Penedo et al. 2024: early-signal tasks in cloze form);
Gu et al. 2024, "OLMES" (cloze vs multiple-choice formulations, normalisations); Cobbe et al.
2021 (GSM8K); Chen et al. 2021, "Evaluating Large Language Models Trained on Code"
(pass@k); Wilson 1927 (the score interval); Miller 2024, "Adding Error Bars to Evals".

Run:
    python eval.py                                    # demo: the built-in tasks, a random model and an oracle, seconds
    python eval.py --ckpt runs/tiny/ckpt/step_000120  # the report card of a checkpoint (writes eval.json into it)
    python eval.py --ckpt DIR --tasks docstring hellaswag.jsonl --examples 500
    python eval.py --ckpt DIR --tasks arithmetic --samples 16 --temperature 1.0   # + pass@1, pass@16
"""

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import tempfile
import time

import torch
import torch.distributed as dist

Z95 = 1.959963984540054      # the normal quantile of a two-sided 95% interval
Z99 = 2.5758293035489004     # 99%: the pipeline checks use the wider one, so chance rarely trips them
STOP_TOKENS = ("<|eos|>", "<|endoftext|>", "<|im_end|>")
BUILTIN = ("arithmetic", "docstring", "next_line")
# the report card's columns on a console
HEADLINE = ("val_loss", "val_bpb", "/acc_char", "/exact_match", "/template", "pref/accuracy", "rm/accuracy", "win_rate")


# -----------------------------------------------------------------------------
# Tokenizers and models, by duck typing

def encode(tok, text):
    """Token ids of text, special-token strings in it staying plain text (a task must not be
    able to inject an <|eos|>)."""
    if hasattr(tok, "encode_ordinary"):       # tiktoken's default encode refuses special strings
        return tok.encode_ordinary(text)
    return list(tok.encode(text))


def special_ids(tok):
    """{special token string: id}."""
    specials = getattr(tok, "special_tokens", None)
    if isinstance(specials, dict):
        return dict(specials)
    if hasattr(tok, "special_tokens_set"):    # tiktoken
        return {s: tok.encode_single_token(s) for s in tok.special_tokens_set}
    return {}


def vocab_size(tok):
    return getattr(tok, "n_vocab", None) or tok.vocab_size


def token_bytes(tok, size=None):
    """(size,) int64: the UTF-8 bytes each token id stands for; 0 for special tokens and for
    ids past the vocabulary (a model's padding rows). Byte-level BPE tokens concatenate to the
    text, so summing this over a sequence's tokens gives the text's length in bytes."""
    n = vocab_size(tok)
    out = torch.zeros(size or n, dtype=torch.long)
    specials = set(special_ids(tok).values())
    for i in range(min(n, len(out))):
        if i in specials:
            continue
        try:     # exact, even for a token that holds half of a UTF-8 character
            if hasattr(tok, "decode_single_token_bytes"):     # tiktoken, data.ByteTokenizer
                out[i] = len(tok.decode_single_token_bytes(i))
            elif hasattr(tok, "decode_bytes"):                # tokenizer.py's Tokenizer
                out[i] = len(tok.decode_bytes([i]))
            else:                                             # text only: a lone byte would count as U+FFFD's 3
                out[i] = len(tok.decode([i]).encode("utf-8"))
        except KeyError:                                      # an unused id
            pass
    return out


def _device(model):
    params = getattr(model, "parameters", None)
    if params is None:
        return torch.device("cpu")
    p = next(iter(params()), None)
    return p.device if p is not None else torch.device("cpu")


def _max_len(model):
    return getattr(getattr(model, "config", None), "max_seq_len", None) or 1 << 30


def token_log_probs(model, input_ids, labels, position_ids=None):
    """(B, T) log p(labels[t] | input_ids[:t+1]), 0 where labels == -100: the model's own
    log_probs when it has one (the project's chunked one never holds (B, T, V) logits), else
    from the logits its forward returns first (a transformers model's .logits too)."""
    if hasattr(model, "log_probs"):
        return model.log_probs(input_ids, labels, position_ids).float()
    out = model(input_ids, position_ids=position_ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return lp.masked_fill(labels == -100, 0.0)


# -----------------------------------------------------------------------------
# Intervals: how far a number on n examples can be from the truth

def metric(value, low, high, n):
    """One reported number: its value, its 95% interval [low, high], and how many rows it is
    measured on. Everything this file reports is a dict of these."""
    return {"value": float(value), "low": float(low), "high": float(high), "n": int(n)}


def wilson(k, n, z=Z95):
    """The Wilson score interval of a proportion k/n: the set of p for which |k/n - p| is at
    most z standard errors sqrt(p (1 - p) / n) of p itself. Unlike k/n +- z sqrt(p(1-p)/n)
    it never leaves [0, 1] and does not collapse to a point at 0% or 100%."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def accuracy(correct, z=Z95):
    k, n = sum(map(bool, correct)), len(correct)
    return metric(k / max(n, 1), *wilson(k, n, z), n)


def ratio(num, den, z=Z95):
    """R = sum(num) / sum(den) over rows (a loss: nats over tokens), with the delta-method
    (linearisation) interval: rows are the independent units, so
    se(R) = sqrt(sum((num_i - R den_i)^2) / (k (k - 1))) / mean(den)."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    k, total = len(num), den.sum()
    r = (num.sum() / total).item() if total > 0 else float("nan")
    if k < 2 or total <= 0:
        return metric(r, float("-inf"), float("inf"), k)
    se = math.sqrt(((num - r * den) ** 2).sum().item() / (k * (k - 1))) / (total.item() / k)
    return metric(r, r - z * se, r + z * se, k)



def average(values, low=float("-inf"), high=float("inf"), z=Z95):
    """The mean of per-problem values (a score in [0, 1] each, or a difference of two) with
    the normal interval mean +- z sd / sqrt(n), sd the values' sample standard deviation (ratio
    with every denominator 1), clipped to [low, high], the range the mean can take. With fewer
    than two values the interval is all of that range. Unlike Wilson's it collapses to a point
    when every value is the same (all 0, all 1): no spread among the problems asked is not
    certainty about the ones that were not."""
    m = ratio(values, [1.0] * len(values), z)
    return metric(m["value"], max(low, m["low"]), min(high, m["high"]), m["n"])

# -----------------------------------------------------------------------------
# Validation loss and bits per byte

@torch.no_grad()
def validation(model, batches, tok_bytes, names=(), group=None):
    """Validation loss (nats per token) and bits per byte, overall and per source, from
    batches in the project's contract (input_ids, labels, position_ids, and "source" indices
    into `names`). tok_bytes: token_bytes(tokenizer, ...). Every labelled token counts in both,
    the <|eos|> that ends a document too (it says where the text stops) at zero bytes. Rows are
    all-gathered over `group` (the data-parallel ranks, each of which read its own rows).
    Returns {"val_loss": metric, "val_bpb": ..., "val_loss/<source>": ..., ...}."""
    rows = []
    for b in batches:
        mask = b["labels"] != -100
        n_tok = mask.sum(1).double()
        _, _, aux = model(b["input_ids"], labels=b["labels"], position_ids=b.get("position_ids"))
        nats = aux["row_ce"].double() * n_tok
        nbytes = (tok_bytes.to(mask.device)[b["labels"].clamp(min=0)] * mask).sum(1).double()
        source = b["source"].double() if "source" in b else torch.zeros_like(n_tok)
        rows.append(torch.stack([nats, n_tok, nbytes, source], 1))
    rows = torch.cat(rows)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows, group=group)
        rows = torch.cat(parts)
    rows = rows.cpu()
    out = {}
    for name, sel in [("", slice(None))] + [(f"/{n}", rows[:, 3] == s) for s, n in enumerate(names)]:
        r = rows[sel]
        if r[:, 1].sum() > 0:
            out[f"val_loss{name}"] = ratio(r[:, 0], r[:, 1])
            if r[:, 2].sum() > 0:
                out[f"val_bpb{name}"] = ratio(r[:, 0] / math.log(2), r[:, 2])
    return out


# -----------------------------------------------------------------------------
# Cloze multiple choice

def _pair_ids(tok, context, continuation, max_len):
    """(token ids of context + continuation, how many are continuation, truncated?). Trailing
    whitespace moves from the context to the continuation ("Answer:" + " 42", "...\\n" +
    "    x = 1"), the way the text is tokenized when it is read as a whole. An empty context
    becomes a lone end-of-document token (<|eos|>, else <|endoftext|>: the one data.py ends
    every document with), as in lm-evaluation-harness: the continuation's first token needs
    something to be predicted from, and training never asks for a document's first token
    (the label after each closing <|eos|> is masked). A pair longer than the model's context
    loses tokens from its left."""
    stripped = context.rstrip()
    ctx = encode(tok, stripped)
    cont = encode(tok, context[len(stripped):] + continuation)
    if not cont:
        raise ValueError(f"an empty continuation after {context[-40:]!r}: nothing to score")
    if not ctx:
        specials = special_ids(tok)
        eos = [specials[s] for s in STOP_TOKENS[:2] if s in specials]   # data.py's order
        if not eos:
            raise ValueError("an empty context needs an <|eos|> or <|endoftext|> token to stand for the start")
        ctx = eos[:1]
    ids = ctx + cont
    if len(ids) - 1 > max_len:          # the last token is only a label
        ids = ids[-(max_len + 1):]
        return ids, min(len(cont), len(ids) - 1), True
    return ids, len(cont), False


@torch.no_grad()
def score(model, tok, pairs, batch_size=16):
    """Sum of log-probabilities of each continuation after its context, for pairs
    [(context, continuation)]. Returns (logps, token counts, how many pairs were truncated).
    Rows are sorted by length so that a batch pads little, and come back in the given order."""
    device, max_len = _device(model), _max_len(model)
    encoded = [_pair_ids(tok, c, x, max_len) for c, x in pairs]
    logps, ntoks = [0.0] * len(pairs), [0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(encoded[i][0]) for i in idx) - 1
        input_ids = torch.zeros(len(idx), T, dtype=torch.long)
        labels = torch.full((len(idx), T), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            ids, n_cont, _ = encoded[i]
            L = len(ids) - 1
            input_ids[row, :L] = torch.tensor(ids[:-1])
            labels[row, L - n_cont:L] = torch.tensor(ids[-n_cont:])
        # right padding: causal attention means no real token ever sees a pad
        position_ids = torch.arange(T).expand(len(idx), T)
        lp = token_log_probs(model, input_ids.to(device), labels.to(device), position_ids.to(device))
        for row, i in enumerate(idx):
            logps[i] = lp[row].sum().item()
            ntoks[i] = encoded[i][1]
    return logps, ntoks, sum(e[2] for e in encoded)


NORMS = ("acc_char", "acc_token", "acc")   # score / characters, / tokens, unnormalised


def cloze(model, tok, examples, batch_size=16):
    """Accuracy on examples [{"context", "choices", "answer"}] (choices are continuations,
    joined to the context as they are, with whatever leading space they carry) under the three
    normalisations. An example counts as right only when its answer scores strictly above
    every other choice: a tie is wrong whatever the order of the choices. Returns
    (metrics, details): details[i] = {"scores": {norm: [per choice]}, "correct": {norm: bool}}."""
    pairs = [(ex["context"], c) for ex in examples for c in ex["choices"]]
    logps, ntoks, truncated = score(model, tok, pairs, batch_size)
    details, k = [], 0
    for ex in examples:
        n = len(ex["choices"])
        lp, nt = logps[k:k + n], ntoks[k:k + n]
        k += n
        scores = {"acc": lp, "acc_token": [s / max(t, 1) for s, t in zip(lp, nt)],
                  "acc_char": [s / max(len(c), 1) for s, c in zip(lp, ex["choices"])]}
        a = ex["answer"]
        correct = {norm: all(s[a] > x for j, x in enumerate(s) if j != a) for norm, s in scores.items()}
        details.append({"scores": scores, "correct": correct})
    metrics = {norm: accuracy([d["correct"][norm] for d in details]) for norm in NORMS}
    chance = sum(1 / len(ex["choices"]) for ex in examples) / max(len(examples), 1)
    metrics["chance"] = metric(chance, chance, chance, len(examples))       # exact: no interval
    if truncated:
        metrics["truncated"] = metric(truncated, truncated, truncated, len(pairs))
    return metrics, details


# -----------------------------------------------------------------------------
# Generative exact match

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?")     # what compares as a number (not "1e3", "nan" or "1_0")


def extract_answer(text):
    """The final answer in a completion: what follows GSM8K's `####` on its line, else the
    last \\boxed{...}, else the last number; None when there is none."""
    if "####" in text:
        answer = text.split("####", 1)[1].split("\n", 1)[0].strip()
        return answer or None
    boxed = [b.strip() for b in re.findall(r"\\boxed\{([^{}]*)\}", text) if b.strip()]
    if boxed:
        return boxed[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def completion_answer(text):
    """The answer a reasoning model's completion gives: extract_answer of what follows its last
    </think> (the whole text when there is none: no block, or one the prompt opened), None when
    a <think> opened there never closes. A completion cut off mid-thought answers nothing,
    though its working may hold the right number. rl.py's reward reads answers with this too."""
    after = text.rsplit("</think>", 1)[-1]
    return None if "<think>" in after else extract_answer(after)


def normalize_answer(s):
    """Lowercase, spaces collapsed, a "$", a trailing "." and thousands separators gone."""
    s = " ".join(str(s).strip().lower().replace("$", "").split()).rstrip(".")
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)


def same_answer(predicted, reference):
    """Exact match after normalisation; two numbers compare as numbers (3.0 == 3, -0 == 0).
    Nothing predicted is never right (an empty answer must not match an empty reference)."""
    if predicted is None or reference is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if not p:
        return False
    if _PLAIN.fullmatch(p) and _PLAIN.fullmatch(r):
        return float(p) == float(r)
    return p == r


def _completions(model, tok, examples, max_new_tokens, batch_size, temperature=0.0, repeat=1, generator=None):
    """What generative and sampled read: each example's prompt ("prompt_ids" as they are, else
    "prompt" rstripped) cut on the left to leave room for the completion, then `repeat`
    completions of it until an end token or max_new_tokens, the rows (example 0 x repeat,
    example 1 x repeat, ...) in batches of batch_size, as rl.sample_groups does. Returns
    (outs, stop ids, how many prompts were cut): outs[i] holds example i's completions, each
    with its stop token."""
    specials = special_ids(tok)
    stop = [specials[s] for s in STOP_TOKENS if s in specials]
    max_len = _max_len(model)
    room = max(1, max_len - max_new_tokens)
    prompts, truncated = [], 0
    for ex in examples:
        ids = list(ex["prompt_ids"]) if "prompt_ids" in ex else encode(tok, ex["prompt"].rstrip())
        truncated += len(ids) > room
        prompts.append(ids[-room:])
    rows = [p for p in prompts for _ in range(repeat)]
    rng = {} if generator is None else {"generator": generator}     # a greedy model need not take one
    outs = []
    for start in range(0, len(rows), batch_size):
        outs += model.generate(rows[start:start + batch_size], max_new_tokens=min(max_new_tokens, max_len - 1),
                               temperature=temperature, stop_ids=stop, **rng)
    return [outs[i * repeat:(i + 1) * repeat] for i in range(len(examples))], stop, truncated


def read_completion(tok, out, stop, answer):
    """(text, predicted, correct) of one completion's tokens: the text without its end tokens,
    cut where a new "Question:" starts (a base model goes on to ask itself another), its answer
    read after any thinking (completion_answer) and compared with the reference."""
    text = tok.decode([t for t in out if t not in stop]).split("\nQuestion:")[0]
    predicted = completion_answer(text)
    return text, predicted, same_answer(predicted, answer)


@torch.no_grad()
def generative(model, tok, examples, max_new_tokens=192, batch_size=64):
    """Exact match on examples [{"prompt", "answer"}]: greedy generation until an end token
    (or max_new_tokens), the completion cut where a new "Question:" starts, its answer read
    after a reasoning model's thinking (completion_answer: none from an unfinished thought)
    and compared. A chat example carries
    its prompt already rendered in a chat template, "prompt_ids" (sft.py's), and is also
    scored for template adherence: the turn ends with <|im_end|> and holds no other special
    token (no forged turn, no <|eos|> in place of the end of turn). Returns (metrics,
    details): details[i] = {"completion", "predicted", "correct"} (+ "template")."""
    specials = special_ids(tok)
    every_special = set(specials.values())
    outs, stop, truncated = _completions(model, tok, examples, max_new_tokens, batch_size)
    details = []
    for ex, (out,) in zip(examples, outs):
        text, pred, correct = read_completion(tok, out, stop, ex["answer"])
        details.append({"completion": text, "predicted": pred, "correct": correct})
        if "prompt_ids" in ex:
            details[-1]["template"] = (bool(out) and out[-1] == specials.get("<|im_end|>")
                                       and not every_special & set(out[:-1]))
    metrics = {"exact_match": accuracy([d["correct"] for d in details])}
    if any("template" in d for d in details):
        metrics["template"] = accuracy([d["template"] for d in details if "template" in d])
    if truncated:
        metrics["truncated"] = metric(truncated, truncated, truncated, len(examples))
    return metrics, details


# -----------------------------------------------------------------------------
# Sampled evaluation: pass@k

def pass_at_k(n, c, k):
    """The chance that at least one of k samples, drawn without replacement from n of which c
    are right, is right: 1 - C(n - c, k) / C(n, k), the unbiased estimator of pass@k (Chen et
    al. 2021). The ratio of binomials is the product over i = n - c + 1 .. n of (1 - k / i):
    every factor in [0, 1], so no huge numbers and no overflow at n = 1000."""
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k = {k} of n = {n} samples: k must be 1 to n")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c = {c} right of n = {n} samples")
    if n - c < k:             # fewer wrong samples than k: any k of them hold a right one
        return 1.0
    p_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


@torch.no_grad()
def sampled(model, tok, examples, samples=16, temperature=1.0, max_new_tokens=192, batch_size=64, seed=0, ks=None):
    """pass@k on examples [{"prompt" or "prompt_ids", "answer"}]: `samples` completions of each
    prompt at `temperature` (0: greedy, `samples` copies of generative's one), read exactly as
    generative reads them. Greedy exact match is one draw of a model that is used sampled; with
    n samples, pass@1 = mean c_i / n is the accuracy of one sample, measured n times over, and
    pass@k (k <= n) the chance that one of k tries is right (what best-of-k with a verifier, or
    RL's group of k rollouts, can hope to find). Sampling uses a torch.Generator seeded with
    `seed`: the same seed, batch_size and device give the same numbers.
    Each metric's 95% interval is a normal one over problems (average: mean +- 1.96 sd /
    sqrt(problems), clipped to [0, 1]): problems are the independent units, not samples (a
    hard problem fails all n of its samples together), so more samples narrow the interval
    only as far as the problems themselves vary.
    Returns (metrics, details): metrics {"pass@1", "pass@<samples>", "pass@<k>" for k in ks}
    (+ "truncated" prompts, as generative's); details[i] = {"correct": c_i, "samples": n,
    "answers": [each sample's answer, None where it gave none]}."""
    ks = sorted({1, samples, *(ks or ())})
    if samples < 1 or ks[-1] > samples:
        raise ValueError(f"sampled: pass@{ks[-1]} needs at least {ks[-1]} samples of each problem, got {samples}")
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    outs, stop, truncated = _completions(model, tok, examples, max_new_tokens, batch_size, temperature, samples,
                                         generator)
    details = []
    for ex, completions in zip(examples, outs):
        read = [read_completion(tok, out, stop, ex["answer"]) for out in completions]
        details.append({"correct": sum(r[2] for r in read), "samples": samples, "answers": [r[1] for r in read]})
    metrics = {f"pass@{k}": average([pass_at_k(d["samples"], d["correct"], k) for d in details], 0.0, 1.0)
               for k in ks}
    if truncated:
        metrics["truncated"] = metric(truncated, truncated, truncated, len(examples))
    return metrics, details


def pass_at_k_curve(details, ks):
    """{k: pass@k} from sampled's details, each the mean over problems of pass_at_k(n_i, c_i,
    k): pass@k against k, to plot. It rises with k for a model that sometimes gets a problem
    right; a flat curve says its samples agree with each other, right or wrong."""
    return {k: sum(pass_at_k(d["samples"], d["correct"], k) for d in details) / max(len(details), 1) for k in ks}


# -----------------------------------------------------------------------------
# Tasks: the common jsonl shapes, and the built-in ones

def task_example(row, where):
    """(kind, example) of one jsonl row: "cloze" {context, choices, answer index} when the row
    has choices, else "generative" {prompt, answer}. Raises ValueError naming `where`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if {"a", "op", "b"} <= set(row):       # a neutral arithmetic problem: rendered later, in the model's layout
        a, op, b = row["a"], row["op"], row["b"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (a, b)):
            raise ValueError(f"{where}: a and b must be integers >= 0, got {a!r} and {b!r}")
        if op not in ("+", "-"):
            raise ValueError(f"{where}: op {op!r}: the built-in arithmetic is + and -")
        if op == "-" and b > a or max(a, b) >= 10 ** 5:
            raise ValueError(f"{where}: {a} {op} {b}: the built-in arithmetic has a >= b and at most 5 digits")
        return "generative", {"problem": (a, op, b), "answer": str(a + b if op == "+" else a - b)}
    labels = None
    if isinstance(row.get("choices"), dict):                 # ARC: {"text": [...], "label": ["A", ...]}
        choices, labels = row["choices"].get("text"), row["choices"].get("label")
    elif "choices" in row:                                    # MMLU, and the generic shape
        choices = row["choices"]
    elif "endings" in row:                                    # HellaSwag
        choices = row["endings"]
    elif "sol1" in row and "sol2" in row:                     # PIQA
        choices = [row["sol1"], row["sol2"]]
    else:
        choices = None
    question = row.get("question", row.get("goal"))
    if choices is None:
        prompt = row.get("prompt") or (f"Question: {question}\nAnswer:" if question is not None else None)
        if prompt is None or "answer" not in row:
            raise ValueError(f"{where}: a row needs choices (choices / endings / sol1+sol2) and an answer index, "
                             f"or a question (or prompt) and an answer; it has {sorted(row)}")
        answer = str(row["answer"])
        gold = extract_answer(answer) if "####" in answer or "\\boxed" in answer else answer.strip()
        if not gold:
            raise ValueError(f"{where}: empty answer")
        return "generative", {"prompt": str(prompt), "answer": gold}
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least two strings, got {choices!r}")
    if question is not None:
        context = f"Question: {question}\nAnswer:"
    else:
        context = row.get("ctx", row.get("context", row.get("query")))
        if not isinstance(context, str):
            raise ValueError(f"{where}: a multiple-choice row needs a question, goal, ctx, context or query; "
                             f"it has {sorted(row)}")
    key = next((k for k in ("answer", "label", "gold", "answerKey") if k in row), None)
    if key is None:
        raise ValueError(f"{where}: no answer (answer / label / gold / answerKey)")
    a = row[key]
    if isinstance(a, str):             # "2", "B", or ARC's labels (which are sometimes "1".."4")
        s = a.strip()
        a = (labels.index(s) if labels and s in labels else int(s) if s.lstrip("-").isdigit()
             else ord(s.upper()) - ord("A") if len(s) == 1 and s.isalpha() else None)
    if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(choices):
        raise ValueError(f"{where}: answer {row[key]!r} is not one of the {len(choices)} choices")
    choices = [c if c[:1].isspace() else " " + c for c in choices]
    return "cloze", {"context": context, "choices": choices, "answer": a}


def read_task(path):
    """(kind, examples) from a jsonl file of one kind of row (see task_example). A line that is
    not JSON, or a row of the wrong shape, stops with its file and line."""
    kinds, examples = set(), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            kind, ex = task_example(row, where)
            kinds.add(kind)
            if len(kinds) > 1:
                raise ValueError(f"{where}: a {kind} row in a file of {kinds - {kind}} rows; one kind per file")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return kinds.pop(), examples


def arithmetic_examples(documents):
    """Generative examples from math documents "Question: q\\nAnswer: steps\\n#### answer"."""
    out = []
    for doc in documents:
        head, _, rest = doc.partition("\nAnswer:")
        if head.startswith("Question: ") and "####" in rest:
            out.append({"prompt": head + "\nAnswer:", "answer": extract_answer(rest)})
    return out


def _functions(source):
    """(header lines, docstring first line) of every function in a module's text whose docstring
    opens with text on the line of its quotes (the common style)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines, out = source.split("\n"), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        first = lines[doc.lineno - 1]
        quote = first.lstrip()[:3]
        if quote not in ('"""', "'''") or doc.lineno <= node.lineno:
            continue
        text = first.lstrip()[3:].split(quote)[0].strip()
        if len(text) >= 12:
            header = "\n".join(lines[node.lineno - 1:doc.lineno - 1])
            indent = first[:len(first) - len(first.lstrip())]
            out.append((f"{header}\n{indent}{quote}", text))
    return out


def docstring_examples(sources, n_choices=4, seed=0):
    """Cloze: a function's header and the opening quotes, then its docstring's first line (as
    the source has it, right after the quotes) or that of another held-out function. The distractors come from the same pool as the answer,
    so neither length nor style gives it away (a model that knows nothing scores chance)."""
    funcs = [f for s in sources for f in _functions(s)]
    headers = [h for h, _ in funcs]
    funcs = [(h, t) for h, t in funcs if headers.count(h) == 1]   # two __init__(self) could not be told apart
    pool = sorted({text for _, text in funcs})
    rng = random.Random(f"docstring/{seed}")
    out = []
    for context, text in funcs:
        others = rng.sample([t for t in pool if t != text], min(n_choices - 1, len(pool) - 1))
        if len(others) < n_choices - 1:
            continue
        choices = others + [text]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "answer": choices.index(text)})
    rng.shuffle(out)
    return out


def next_line_examples(sources, n_choices=4, context_lines=12, per_file=60, seed=0):
    """Cloze: twelve lines of a held-out file, then its next line or another line of the same
    file (with its own indentation). Lines under 8 characters are not asked about."""
    rng = random.Random(f"next_line/{seed}")
    out, seen = [], set()
    for source in sources:
        lines = source.split("\n")
        good = [i for i in range(context_lines, len(lines)) if len(lines[i].strip()) >= 8]
        candidates = sorted({lines[i] for i in good})
        for i in rng.sample(good, min(per_file, len(good))):
            pool = [c for c in candidates if c.strip() != lines[i].strip()]
            if len({c.strip() for c in pool}) < len(pool) or len(pool) < n_choices - 1:
                pool = list({c.strip(): c for c in pool}.values())   # one line per text: no two equal choices
                if len(pool) < n_choices - 1:
                    continue                # a short file: too few other lines to choose from
            others = rng.sample(pool, n_choices - 1)
            choices = others + [lines[i]]
            rng.shuffle(choices)
            context = "\n".join(lines[i - context_lines:i]) + "\n"
            if context in seen:      # the same lines followed by two different ones: unanswerable
                continue
            seen.add(context)
            out.append({"context": context, "choices": choices, "answer": choices.index(lines[i])})
    rng.shuffle(out)
    return out


def builtin_tasks(code_sources, math_documents, seed=0):
    """{"arithmetic": ("generative", examples), "docstring": ("cloze", ...), "next_line": (...)}
    from held-out text: source files and math documents the model never trained on."""
    return {"arithmetic": ("generative", arithmetic_examples(math_documents)),
            "docstring": ("cloze", docstring_examples(code_sources, seed=seed)),
            "next_line": ("cloze", next_line_examples(code_sources, seed=seed))}


def subset(tasks, n, seed=0):
    """At most n examples of each task: a seeded sample, the same on every call."""
    if not n:
        return tasks
    return {name: (kind, ex if len(ex) <= n else random.Random(f"{name}/{seed}").sample(ex, n))
            for name, (kind, ex) in tasks.items()}


def run_tasks(model, tok, tasks, batch_size=16, max_new_tokens=192, correct=None, samples=0, temperature=1.0):
    """Every task's metrics, as {"<task>/<metric>": metric}. With a dict `correct`, also each
    example's outcome: correct[task] = [bool] (cloze: by acc_char, the playbook's choice).
    samples > 0: each generative task is also sampled that many times per problem at
    `temperature` (seed 0), adding "<task>/pass@1" and "<task>/pass@<samples>"."""
    out = {}
    for name, (kind, examples) in tasks.items():
        if kind == "cloze":
            metrics, details = cloze(model, tok, examples, batch_size)
            outcomes = [d["correct"]["acc_char"] for d in details]
        else:
            metrics, details = generative(model, tok, examples, max_new_tokens, 4 * batch_size)
            outcomes = [d["correct"] for d in details]
            if samples > 0:
                passes, _ = sampled(model, tok, examples, samples, temperature, max_new_tokens, 4 * batch_size)
                metrics.update({k: v for k, v in passes.items() if k.startswith("pass@")})
        out.update({f"{name}/{k}": v for k, v in metrics.items()})
        if correct is not None:
            correct[name] = outcomes
    return out


def win_rate(new, old):
    """How often a model beats another on the same examples ([bool] each, in the same order):
    a win (right where the other is wrong) counts 1, a tie 1/2, a loss 0; the mean, with the
    delta-method interval over examples. 0.5 is no better and no worse."""
    if len(new) != len(old):
        raise ValueError(f"win_rate: {len(new)} outcomes against {len(old)}: not the same examples")
    scores = [0.5 + (bool(a) - bool(b)) / 2 for a, b in zip(new, old)]
    return ratio(scores, [1.0] * len(scores))


def paired(new, old):
    """The paired difference of two models' per-problem scores on the same problems, in the
    same order (bools, or floats in [0, 1] such as sampled's c_i / n): mean(new - old), with
    the normal interval of that mean, mean +- 1.96 sd(new_i - old_i) / sqrt(n). Why paired: a
    problem's difficulty is shared by both models and cancels in new_i - old_i, so the
    differences vary far less than either model's scores do, and the interval is much narrower
    than the two models' separate intervals (or than the difference of two independent means).
    It is the right interval for "is the new checkpoint better on this benchmark?"."""
    if len(new) != len(old):
        raise ValueError(f"paired: {len(new)} scores against {len(old)}: not the same problems")
    diffs = [float(a) - float(b) for a, b in zip(new, old)]
    if not all(0 <= float(x) <= 1 for x in list(new) + list(old)):
        raise ValueError("paired: per-problem scores must lie in [0, 1] (a right/wrong, or a c_i / n)")
    return average(diffs, -1.0, 1.0)


# -----------------------------------------------------------------------------
# Validating the pipeline

class Oracle:
    """A "model" that knows every answer of some tasks: log-probability 0 for each token of a
    context followed by its right choice, log(1/2) per token of anything else; and for a known
    generative prompt, the completion " #### <answer>". Scored through the same pipeline as a
    real model, it must get 100%; anything less means the pipeline loses track of which score
    belongs to which choice, reads the wrong answer index, or extracts answers wrongly."""

    def __init__(self, tok, tasks):
        self.tok = tok
        self.skip = set(special_ids(tok).values())
        self.right = {ex["context"] + ex["choices"][ex["answer"]]
                      for kind, exs in tasks.values() if kind == "cloze" for ex in exs}
        self.answers = {ex["prompt"].rstrip(): ex["answer"]
                        for kind, exs in tasks.values() if kind == "generative" for ex in exs}
        self.chat_answers = {tuple(ex["prompt_ids"]): ex["answer"]     # a chat prompt is known by its ids
                             for kind, exs in tasks.values() if kind == "generative" for ex in exs
                             if "prompt_ids" in ex}

    def _text(self, ids):
        return self.tok.decode([i for i in ids if i not in self.skip])

    def log_probs(self, input_ids, labels, position_ids=None):
        out = torch.zeros(labels.shape)
        for row in range(len(labels)):
            where = (labels[row] != -100).nonzero().squeeze(1)
            last = where[-1].item()
            text = self._text(input_ids[row, :last + 1].tolist() + [labels[row, last].item()])
            known = text in self.right or any(r.endswith(text) for r in self.right if len(text) < len(r))
            out[row, where] = 0.0 if known else math.log(0.5)
        return out

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop_ids=(), **kw):
        outs = []
        for p in prompts:
            text = self._text(p)
            answer = self.chat_answers.get(tuple(p)) or self.answers.get(text) or next(
                (a for q, a in self.answers.items() if q.endswith(text)), None)
            outs.append(encode(self.tok, f" #### {answer}")[:max_new_tokens] if answer is not None else [])
        return outs


def _interval(m, z):
    """An accuracy's Wilson interval at another z (the reported one is at 95%)."""
    return wilson(round(m["value"] * m["n"]), m["n"], z)


def _shuffled(examples, seed):
    rng = random.Random(seed)
    out = []
    for ex in examples:
        order = list(range(len(ex["choices"])))
        rng.shuffle(order)
        out.append({**ex, "choices": [ex["choices"][j] for j in order], "answer": order.index(ex["answer"])})
    return out


def validate_pipeline(model, tok, tasks, seed=0, batch_size=16, max_new_tokens=64):
    """Three checks of the evaluation itself, on `tasks` and `model`, a model that knows
    nothing (freshly initialised), deterministic:
    - chance: its accuracy's 99% interval holds the task's chance level (1/choices; 1% for
      an open answer). Above it, the task leaks the answer (the right choice is the
      shortest, the first...). WARN: it may also be a 1-in-100 draw.
    - oracle: the Oracle scores 100% on every metric. FAIL otherwise.
    - shuffle: the same model on the choices in another order gets the same examples right
      (only near-ties, score gaps under 1e-4, may move). FAIL otherwise.
    Returns [(status, check, detail)] with status PASS, WARN or FAIL."""
    results = []
    oracle = Oracle(tok, tasks)
    for name, (kind, examples) in tasks.items():
        if kind == "cloze":
            got, details = cloze(model, tok, examples, batch_size)
            chance = got["chance"]["value"]
            off = [n for n in NORMS if not _interval(got[n], Z99)[0] <= chance <= _interval(got[n], Z99)[1]]
            results.append(("WARN" if off else "PASS", f"{name}: chance",
                            "a model that knows nothing: " + ", ".join(f"{n} {got[n]['value']:.2f}" for n in NORMS)
                            + f" (chance {chance:.2f})" + (f"; outside the 99% interval: {off}: does the length or "
                                                           "position of the right choice give it away?" if off else "")))
            perfect, _ = cloze(oracle, tok, examples, batch_size)
            bad = [n for n in NORMS if perfect[n]["value"] < 1]
            rights = {}
            for ex in examples:
                rights.setdefault(ex["context"], set()).add(ex["choices"][ex["answer"]])
            twice = sum(len(r) > 1 for r in rights.values())
            results.append(("FAIL" if bad else "PASS", f"{name}: oracle",
                            ", ".join(f"{n} {perfect[n]['value']:.3f}" for n in bad) + (
                                f": {twice} contexts have two different right answers (the task is ambiguous)"
                                if twice else ": the pipeline loses the answer (choice order, answer index, "
                                              "normalisation)") if bad else "100% on every metric"))
            again, details2 = cloze(model, tok, _shuffled(examples, seed), batch_size)
            moved = 0
            for d, d2 in zip(details, details2):
                for n in NORMS:
                    top = sorted(d["scores"][n], reverse=True)
                    if d["correct"][n] != d2["correct"][n] and (len(top) < 2 or top[0] - top[1] > 1e-4):
                        moved += 1
            results.append(("FAIL" if moved else "PASS", f"{name}: shuffle",
                            f"{moved} answers changed when the choices were reordered: scores depend on position"
                            if moved else "the same answers right with the choices reordered"))
        else:
            got, _ = generative(model, tok, examples, max_new_tokens, 4 * batch_size)
            em = got["exact_match"]
            low, _ = _interval(em, Z99)
            results.append(("WARN" if low > 0.01 else "PASS", f"{name}: chance",
                            f"a model that knows nothing: exact_match {em['value']:.2f}" +
                            (": above 1%; is the answer in the prompt, or does extraction accept anything?"
                             if low > 0.01 else "")))
            perfect, _ = generative(oracle, tok, examples, max_new_tokens, 4 * batch_size)
            ok = perfect["exact_match"]["value"] == 1
            results.append(("PASS" if ok else "FAIL", f"{name}: oracle", "100% exact match" if ok else
                            f"exact_match {perfect['exact_match']['value']:.3f}: answer extraction or comparison is "
                            "broken"))
    return results


# -----------------------------------------------------------------------------
# The report card

def fmt(m):
    return f"{m['value']:.4g}" if m["low"] == m["high"] else f"{m['value']:.4g} ({m['low']:.4g}-{m['high']:.4g})"


def metric_table(metrics):
    """A markdown table: one metric per line, its value, 95% interval and row count."""
    lines = ["| metric | value | 95% interval | n |", "|---|---|---|---|"]
    for name, m in metrics.items():
        interval = "" if m["low"] == m["high"] else f"{m['low']:.4f} - {m['high']:.4f}"
        lines.append(f"| {name} | {m['value']:.4f} | {interval} | {m['n']} |")
    return "\n".join(lines)


def card_table(rows, columns=None):
    """The report card: one row per stage (or checkpoint), one column per metric (those whose
    names end with one of `columns`, when given), each cell "value (low-high)".
    rows: [{"stage", "step", "metrics"}]."""
    names = []
    for r in rows:
        names += [n for n in r["metrics"] if n not in names and not n.endswith(("/chance", "/truncated"))
                  and (columns is None or n.endswith(tuple(columns)))]
    lines = ["| stage | step | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [fmt(r["metrics"][n]) if n in r["metrics"] else "" for n in names]
        lines.append(f"| {r['stage']} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    """Written to a temporary sibling and renamed: a crash leaves the old file or the new one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_to_card(run_dir, row, inherit=None):
    """Append (or replace: the same stage and step again, after a resume) a row of the run's
    report card, run_dir/report_card.json and .md. A new run started from another's checkpoint
    (`inherit`: that run's directory) starts from its card, so the card follows the model
    through pretraining, mid-training and post-training. Returns the rows."""
    path = os.path.join(run_dir, "report_card.json")
    rows = []
    for source in (path, os.path.join(inherit, "report_card.json") if inherit else None):
        if source and os.path.exists(source):
            with open(source) as f:
                rows = json.load(f)
            break
    rows = [r for r in rows if (r["stage"], r["step"], r.get("run")) != (row["stage"], row["step"], row.get("run"))]
    rows.append(row)
    write_json(path, rows)
    with open(os.path.join(run_dir, "report_card.md"), "w") as f:
        f.write(card_table(rows) + "\n")
    return rows


# -----------------------------------------------------------------------------
# The command line: the one place that opens the project's own checkpoints

def open_checkpoint(ckpt, tokenizer):
    """(model, tokenizer, the run's train config) of a train.py checkpoint, or of a Hugging
    Face directory (then give --tokenizer)."""
    import data
    import model as M
    from safetensors.torch import load_file

    trainer_json = os.path.join(ckpt, "trainer.json")
    if os.path.exists(trainer_json):
        with open(trainer_json) as f:
            state = json.load(f)
        net = M.Model(M.ModelConfig(**state["model_config"]))
        weights = load_file(os.path.join(ckpt, "model.safetensors"))
        if set(weights) != set(net.weights()):    # a tied head is stored once, under the embedding's name
            raise SystemExit(f"--ckpt {ckpt}: model.safetensors does not match its trainer.json's model: missing "
                             f"{sorted(set(net.weights()) - set(weights))[:5]}, unexpected "
                             f"{sorted(set(weights) - set(net.weights()))[:5]}")
        net.load_state_dict(weights, strict=False)
        cfg = state.get("config", {})
    elif os.path.exists(os.path.join(ckpt, "config.json")):
        net, cfg = M.Model.from_pretrained(ckpt), {}
    else:
        raise SystemExit(f"--ckpt {ckpt}: neither a train.py checkpoint (trainer.json) nor a Hugging Face "
                         "directory (config.json)")
    tokenizer = tokenizer or cfg.get("tokenizer") or (os.path.join(cfg["data_dir"], "tok.json") if "data_dir" in cfg
                                                      else None)
    if not tokenizer:
        raise SystemExit(f"--ckpt {ckpt}: which tokenizer? give --tokenizer tok.json (or bytes)")
    tok = data.ByteTokenizer() if tokenizer == "bytes" else data.load_tokenizer(tokenizer)
    return net, tok, cfg


def builtin(n_math=400, math_format=None):
    """The built-in tasks, from data.py's held-out text (its math in `math_format`: the layout
    the model trained on; None is data.py's default)."""
    import arithmetic
    import data
    return builtin_tasks(data.heldout_code(), arithmetic.heldout_documents(n_math, math_format or arithmetic.FORMAT))


def resolve_tasks(names, examples, seed=0, math_format=None):
    """Task names (arithmetic, docstring, next_line, or builtin for the three) and jsonl paths
    -> tasks, at most `examples` of each ("val" is not a task: it is skipped here)."""
    names = [x for n in names for x in (BUILTIN if n == "builtin" else (n,))]
    tasks = {}
    if set(names) & set(BUILTIN):
        built = builtin(math_format=math_format)
        tasks.update({n: built[n] for n in names if n in BUILTIN})
    for n in names:
        if n.endswith(".jsonl"):
            try:
                tasks[os.path.basename(n)[:-6]] = read_task(n)
            except (OSError, ValueError) as e:
                raise SystemExit(f"task {n}: {e}")
        elif n not in BUILTIN and n != "val":
            raise SystemExit(f"task {n!r}: builtin, {', '.join(BUILTIN)}, val, or a .jsonl file")
    return subset(tasks, examples, seed)


def render_problems(tasks, tok, math_format=None):
    """Neutral arithmetic rows ({"a", "op", "b"}: task_example's "problem") asked as the model
    was taught: in the chat template when the tokenizer has one (sft.problem_example, the
    pipeline's own held-out evaluation), else as a pretraining document's question
    (arithmetic.document_text), in the layout the checkpoint trained on (its config's math_format)."""
    out = {}
    for name, (kind, examples) in tasks.items():
        if examples and "problem" in examples[0]:
            import arithmetic
            import sft
            fmt = math_format or arithmetic.FORMAT
            if sft.has_special(tok, "<|im_start|>"):
                examples = [sft.problem_example(ex["problem"], tok, fmt) for ex in examples]
            else:
                examples = [{"prompt": arithmetic.document_text(ex["problem"], fmt).split("\nAnswer:")[0] + "\nAnswer:",
                             "answer": ex["answer"]} for ex in examples]
        out[name] = (kind, examples)
    return out


def _demo():
    import data
    import model as M

    t0 = time.time()
    tok = data.ByteTokenizer()
    tasks = subset(builtin(), 40)
    for name, (kind, ex) in tasks.items():
        e = ex[0]
        shown = (e["context"][-120:] + " ...?\n  choices: " + " | ".join(c.strip()[:40] for c in e["choices"])
                 + f"\n  answer: {e['answer']}") if kind == "cloze" else f"{e['prompt']}\n  answer: {e['answer']}"
        print(f"--- {name} ({kind}, {len(ex)} examples shown to models below), e.g.:\n{shown}\n")
    torch.manual_seed(0)
    net = M.Model(M.preset("tiny", vocab_size=data.ByteTokenizer.vocab_size, n_layer=2, nope_layers=(1,),
                           max_seq_len=512)).eval()
    print("validating the pipeline (a random tiny model, an oracle, shuffled choices):")
    for status, check, detail in validate_pipeline(net, tok, tasks):
        print(f"  {status:4s} {check}: {detail}")
    print("\nthe random model's report card (95% intervals: chance is inside them):")
    print(metric_table(run_tasks(net, tok, tasks, max_new_tokens=64)))
    print(f"\n({time.time() - t0:.1f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint: validation loss / bits per byte and tasks, "
                                            "with 95% intervals (python eval.py alone runs the demo).")
    p.add_argument("--ckpt", help="a train.py checkpoint directory (or a Hugging Face one, with --tokenizer)")
    p.add_argument("--tasks", nargs="+", default=["val", "arithmetic", "docstring", "next_line"],
                   help="val, arithmetic, docstring, next_line, or task .jsonl files")
    p.add_argument("--examples", type=int, default=200, help="at most this many examples per task (0: all)")
    p.add_argument("--tokenizer", default="", help="tok.json, or bytes; default: the checkpoint run's")
    p.add_argument("--data_dir", default="", help="prepared data for val (default: the checkpoint run's)")
    p.add_argument("--val_batches", type=int, default=8)
    p.add_argument("--samples", type=int, default=0,
                   help="K > 0: also sample K completions of each generative problem (seed 0) and report "
                        "<task>/pass@1 and <task>/pass@K; 0: greedy exact match only")
    p.add_argument("--temperature", type=float, default=1.0, help="the sampling temperature of --samples")
    p.add_argument("--validate", action="store_true", help="also validate the pipeline (random model, oracle, shuffle)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _demo()
    args = p.parse_args(argv)
    if not args.ckpt:
        p.error("--ckpt DIR: which checkpoint? (python eval.py alone runs the demo)")
    if args.samples < 0 or args.temperature < 0:
        p.error("--samples and --temperature must be >= 0")
    net, tok, cfg = open_checkpoint(args.ckpt, args.tokenizer)
    device = torch.device(args.device)
    net = net.to(device).eval()
    metrics, t0 = {}, time.time()
    if "val" in args.tasks:
        import data
        d = args.data_dir or cfg.get("data_dir", "")
        if d and os.path.exists(os.path.join(d, "manifest.json")):
            loader = data.Loader(d, cfg.get("batch_size", 8), min(cfg.get("seq_len", 256), net.config.max_seq_len),
                                 seed=cfg.get("seed", 0), split="val")
            batches = ({k: v.to(device) for k, v in next(loader).items()} for _ in range(args.val_batches))
            metrics.update(validation(net, batches, token_bytes(tok, net.config.padded_vocab), loader.names))
        else:
            print(f"val: skipped, no prepared data at {d!r} (--data_dir)", file=sys.stderr)
    tasks = render_problems(resolve_tasks(args.tasks, args.examples, math_format=cfg.get("math_format")), tok,
                            cfg.get("math_format"))
    if args.validate:
        torch.manual_seed(0)
        fresh = type(net)(net.config).to(device).eval()
        for status, check, detail in validate_pipeline(fresh, tok, tasks):
            print(f"  {status:4s} {check}: {detail}")
    metrics.update(run_tasks(net, tok, tasks, samples=args.samples, temperature=args.temperature))
    print(metric_table(metrics))
    print(f"({time.time() - t0:.1f} s)")
    out = os.path.join(args.ckpt, "eval.json")
    write_json(out, {"ckpt": args.ckpt, "tasks": args.tasks, "examples": args.examples, "metrics": metrics})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
