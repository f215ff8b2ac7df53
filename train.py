"""
train.py: the composition root and the playbook's "training marathon".

The concept. A training run is a loop (batch, forward, backward, clip, step, schedule) wrapped
in everything that keeps a long run alive and honest:
- a preflight checklist before the first step: does the initial loss equal ln(vocab), does a
  batch decode to text, are there NaNs, does a checkpoint reload to the same weights, does
  evaluation run, how fast will it go (MFU), will it fit in memory and on disk, and under
  torchrun: the layout, do all ranks hold the same (whole) weights, do TP's shards differ
  where they must, does each data-parallel rank read its own data. A FAIL stops the run.
- monitoring: one console line and one metrics.jsonl line per step (loss, lr, grad norm,
  tokens/s, MFU, memory, loss per data source), and detectors that raise alerts: loss and
  grad-norm spikes, NaN/Inf, throughput drops, a stalled loss, and under torchrun a straggler rank.
- checkpoints, constantly and atomically, with exact resume: a run killed with `kill -9` and
  resumed ends with the same weights, bit for bit, as one that never stopped. SIGTERM (a
  preempted job) saves a checkpoint before exiting. NaN/Inf steps are skipped; several in a
  row reload the last checkpoint and skip the offending batches (PaLM's remedy).
- stages: pretraining on a mixture with a curriculum (SmolLM3's three stages), mid-training
  from a checkpoint with a new mixture and a longer context (ABF: a new rope_theta; YaRN), and
  supervised fine-tuning (sft.py: chat conversations, the loss on the assistant's turns, SFT's
  own learning rate and schedule, its held-out chat questions evaluated before and after).
  Preference optimisation (dpo.py: DPO and its variants against a frozen or cached
  reference, held-out preference accuracy and the win rate over the starting model) runs in
  the same loop, and so does on-policy training (rl.py: GRPO on verifiable rewards or a reward
  model's, on-policy distillation from a teacher; its batches are rollouts of the current
  policy, sampled when the last one is spent) and a reward model's own stage (a stage gives
  the next batch, the loss on a batch, and its held-out batches and tasks).

The playbook's lessons: do your preflight checklist or die; monitor like your GPUs depend on
it; checkpoint constantly because something will crash; mid-training is not autopilot. AdamW
(beta2 0.95, weight decay 0.1, none on embeddings, norms and biases), gradient clipping at
1.0, warmup then WSD (warmup-stable-decay: a constant learning rate, then a decay over the
last 10-20% to zero) as SmolLM3 did; WSD lets you branch a decay from any stable checkpoint.

Papers: Loshchilov & Hutter 2019 (AdamW); Hu et al. 2024 (MiniCPM: WSD); Hagele et al. 2024
(scaling laws and compute-optimal training beyond fixed durations: WSD vs cosine);
Chowdhery et al. 2022 (PaLM: skipping spiking batches, MFU); Hugging Face 2025 (SmolLM3).

Run:
    python train.py                                   # the pipeline: every stage below in turn, REPORT.md (~15 CPU minutes)
    python train.py --pipeline --out_dir runs/p --sft.max_steps 120   # --key for every stage, --STAGE.key for one
    python train.py --ablate n_kv_head=1,2,4 --max_steps 60   # every variant of one config, ABLATION.md compares them
    python train.py --max_steps 30 --out_dir runs/x   # any config field as --key value (model fields too: --n_layer 4)
    python train.py --config run.toml --lr 1e-3       # a TOML file, then flags on top
    python train.py --resume --out_dir runs/x         # continue from the latest checkpoint
    python train.py --stage midtrain --init runs/x/ckpt/step_000200 --seq_len 512 --rope_theta 100000
    python train.py --stage sft --init runs/x/ckpt/step_000200 --out_dir runs/sft   # sft.py's stage
    python train.py --stage dpo --init runs/sft/ckpt/step_000080 --out_dir runs/dpo  # dpo.py's (APO-zero)
    python train.py --stage rl --init runs/sft/ckpt/step_000080 --out_dir runs/rl    # rl.py's (GRPO / DAPO)
    python train.py --stage rm --init runs/sft/ckpt/step_000080 --out_dir runs/rm    # a reward model (rl.py)
    torchrun --nproc_per_node=8 train.py --preset smollm2-135m --data_dir data/fineweb --tokenizer tok.json
    torchrun --nproc_per_node=8 train.py --tp 2 --fsdp ...    # parallel.py: 4 data-parallel x 2 tensor-parallel, ZeRO-3
    torchrun --nproc_per_node=2 train.py --pp 2 ...           # two pipeline stages; --parallel_impl torch: FSDP2/DTensor
    python train.py --plot runs/x                     # loss / lr / grad-norm / throughput curves as PNG
    python train.py --plan --preset smollm3-3b --tokens 11T --gpus 384   # memory per GPU per layout, time, disk
"""

import contextlib
import copy
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import deque
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

import arithmetic
import data
import dpo
import eval
import model as M
import moe
import parallel
import rl
import sft


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class TrainConfig:
    preset: str = "tiny"                # the model preset; model fields override it (--n_layer 4)
    stage: str = "pretrain"             # pretrain | midtrain | sft | dpo | rl | rm (a reward model)
    init: str = ""                      # start from: a checkpoint directory of this script, or a HF directory
    out_dir: str = "runs/tiny"
    resume: bool = False                # continue from the latest checkpoint in out_dir
    seed: int = 1337
    # data
    data_dir: str = "data/builtin"      # shards from data.py; the built-in corpus is prepared here if missing
    tokenizer: str = ""                 # tokenizer.py's tok.json; "" = <data_dir>/tok.json (trained if missing); "bytes"
    vocab_size: int = 4096              # of a tokenizer trained here
    mixture: str = ""                   # "" = the stage's default; "smollm3", "natural", or "code=0.5,prose=0.5"
    seq_len: int = 256
    # the built-in arithmetic (arithmetic.py), shared by every stage's built-in data and its evaluation
    math_format: str = arithmetic.FORMAT  # lsd | msd | words: where the digits sit (README: the format ablation)
    math_digits: int = arithmetic.DIGITS  # pretraining, SFT and the pairs demonstrate 1 to this many digits
    # supervised fine-tuning (--stage sft, sft.py)
    chat_data: str = "builtin"          # .jsonl / .parquet of {"messages": [...]}, or the built-in conversations
    packing: bool = True                # several conversations per row (false: one per row, padded)
    train_on: str = "assistant"         # assistant (the loss on the assistant's turns) | all
    overlong: str = "truncate"          # a conversation (or preference pair) over seq_len: truncate | skip (counted)
    # preference optimisation (--stage dpo, dpo.py)
    pref_data: str = "builtin"          # .jsonl / .parquet in TRL's shapes (prompt, chosen, rejected; or prompt,
                                        # completion, label for kto), or the built-in pairs
    loss: str = "apo_zero"              # sigmoid (DPO) | ipo | apo_zero | apo_down | orpo | simpo | kto
    beta: float = 0.1                   # the leash to the reference (orpo: the odds-ratio weight; simpo: ~2)
    label_smoothing: float = 0.0        # sigmoid (cDPO) and simpo: the chance a preference label is wrong
    simpo_gamma: float = 0.5            # simpo's target margin
    ref: str = "copy"                   # the reference (--init): copy (a frozen copy) | cache (its log-probs, once)
    desirable_weight: float = 1.0       # kto: weights of the desirable and undesirable completions
    undesirable_weight: float = 1.0
    # on-policy training (--stage rl, rl.py); --beta (default 0 here) leashes it to the --init model
    rl_data: str = "builtin"            # .jsonl / .parquet of GSM8K's {"question", "answer": "... #### n"}, or built-in
    reward: str = "math"                # math (the verified answer) | rm:CHECKPOINT (a --stage rm run's model)
    teacher: str = ""                   # a checkpoint with the same tokenizer: on-policy distillation
    distill: str = "reverse_kl"         # with --teacher: reverse_kl (per-token advantage) | gjsd (GKD's loss)
    jsd_beta: float = 0.5               # gjsd: 0 = forward KL(teacher || student), 1 = reverse KL
    rl_rehearse: int = 0                # built-in prompts: also the top N demonstrated levels, in turn with the one above
    group_size: int = 8                 # completions per prompt (GRPO's group)
    max_new_tokens: int = 64            # of a completion (the overlong penalty's max_length)
    rl_temperature: float = 1.0         # sampling (and the log-probabilities' temperature)
    loss_type: str = "dapo"             # grpo | bnpo | dr_grpo | dapo (TRL's aggregations)
    scale: str = "group"                # advantages / the group's std (GRPO) | batch | none (Dr. GRPO)
    eps_low: float = 0.2                # the clip range [1 - eps_low, 1 + eps_high]: DAPO's clip-higher
    eps_high: float = 0.28
    iterations: int = 1                 # optimisation steps per rollout (TRL's num_iterations)
    format_weight: float = 0.1          # the format reward's weight (the thinking block, the ended turn)
    overlong_cache: int = 0             # DAPO's soft overlong penalty over the last N of max_new_tokens (0: off)
    resample: int = 2                   # extra rounds of prompts to replace zero-variance groups (dynamic sampling)
    rm_center: float = 0.01             # --stage rm: the (r_chosen + r_rejected)^2 penalty that centres rewards
    batch_size: int = 8                 # sequences per micro-batch and process
    total_batch_tokens: int = 4096      # the global batch; gradient accumulation reaches it
    # optimisation
    max_steps: int = 120                # the default run: about 4 minutes on 2 CPU cores
    lr: float = 3e-3
    min_lr_ratio: float = 0.0           # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "wsd"               # wsd | cosine
    decay_frac: float = 0.2             # WSD: the share of steps spent decaying
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False      # the playbook: no weight decay on embeddings
    grad_clip: float = 1.0
    compile: bool = False
    device: str = "auto"                # auto | cpu | cuda
    precision: str = "auto"             # auto (bf16 autocast on CUDA, float32 on CPU) | bf16 | fp32 (weights stay fp32)
    # parallelism under torchrun (parallel.py): the data-parallel degree is what tp x pp leave
    parallel_impl: str = "scratch"      # scratch (parallel.py's own, from the collectives) | torch (FSDP2, DTensor)
    tp: int = 1                         # tensor-parallel degree (ranks that split every matmul)
    pp: int = 1                         # pipeline-parallel degree (ranks that split the layers; scratch only)
    fsdp: bool = False                  # shard weights, gradients and optimizer state over the data-parallel ranks
    zero_stage: int = 3                 # with --fsdp, scratch: 1 optimizer state, 2 + gradients, 3 + weights (FSDP)
    straggler: float = 1.5              # alert when a rank's compute time is this many times the others' median
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 4               # validation batches (loss and bits per byte per source)
    eval_tasks: str = "builtin"         # eval.py's tasks: builtin (arithmetic, docstring, next_line), a comma
                                        # list of those and .jsonl files, or "" for none
    eval_examples: int = 48             # examples per task (the report card shows the interval this buys)
    ckpt_every: int = 100
    keep_last: int = 2                  # checkpoints kept (0 = all)
    sample_tokens: int = 48             # a sample at the end of the run
    # preflight, monitoring, alerts
    preflight: bool = True
    ignore_preflight: bool = False      # run despite FAILs
    peak_flops: float = 0.0             # the device's peak FLOP/s for MFU; 0 = known GPUs only
    alert_cmd: str = ""                 # a shell command that receives each alert as JSON on stdin
    nan_patience: int = 3               # non-finite steps in a row before reloading the last checkpoint
    spike_sigma: float = 6.0            # spike = this many robust standard deviations over the recent median
    stall_steps: int = 200              # loss not improving for this many steps raises an alert


STAGES = ("pretrain", "midtrain", "sft", "dpo", "rl", "rm")
# What a stage changes when not given: SFT continues a trained model on far less data, at a
# lower peak learning rate (a third of pretraining's here: from the default pretrained tiny
# model, 80 steps reach a held-out arithmetic loss of 1.02 at 1e-3 against 1.49 at 3e-4; large
# models fine-tune nearer a tenth or less), warmed up briefly and decayed by a cosine to a
# tenth, with a few evaluations (its held-out chat questions answered before and after)
# DPO: a tenth of SFT's learning rate (the policy must stay near its reference), batch_size
# counting pairs; the held-out preference accuracy and the chat questions before and after.
# RL: batch_size counts completions (16 x 4 micro-batches = 8 prompts x 8 per step), no KL
# leash (beta 0, as DAPO), a constant learning rate after a short warmup (3e-4), the held-out
# problems of every level answered before and after (the CPU pipeline's models cannot do the
# arithmetic, so nothing here is tuned on a gain: README, RL notes). A reward model: DPO's
# pairs and rate.
STAGE_DEFAULTS = {"sft": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1,
                          "max_steps": 80, "eval_every": 40, "eval_tasks": "builtin,chat", "ckpt_every": 40},
                  "dpo": {"lr": 1e-4, "schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1,
                          "max_steps": 60, "eval_every": 30, "eval_tasks": "builtin,chat", "ckpt_every": 30},
                  "rl": {"lr": 3e-4, "schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 1.0, "max_steps": 60,
                         "eval_every": 30, "eval_tasks": "chat", "ckpt_every": 30, "beta": 0.0, "batch_size": 16,
                         "total_batch_tokens": 16384},
                  "rm": {"lr": 1e-4, "schedule": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1, "max_steps": 60,
                         "eval_every": 30, "eval_tasks": "", "ckpt_every": 30}}
# the stage metrics on the progress line (all of them go to metrics.jsonl): the margin, how often
# it is right, and whether the chosen answers themselves get likelier
SHOWN = ("train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen", "train/kl", "train/reward",
         "train/accuracy", "train/length", "train/entropy", "train/zero_std", "train/clip_ratio/region_mean",
         "train/reverse_kl")
MODEL_FIELDS = {f.name for f in fields(M.ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
BOOL_DEFAULTS = {f.name: f.default for f in fields(M.ModelConfig) + fields(TrainConfig) if isinstance(f.default, bool)}


def _parse_value(key, text, default):
    """A command-line string as the type of the field's default."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return json.loads(text)            # model fields: numbers, null, lists, {"rope_type": ...}
    except (ValueError, json.JSONDecodeError) as e:
        if default is None or not isinstance(default, (bool, int, float, str)):
            return text                   # a model field given as a plain string
        raise SystemExit(f"--{key} {text!r}: {e}")


def parse_config(argv):
    """[--config FILE.toml] [--key value ...] -> (TrainConfig, model overrides dict). Keys are
    TrainConfig fields or ModelConfig fields; a bare boolean flag means true."""
    values, i = {}, 0
    pairs = []
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: options are --key value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")              # --max-steps == --max_steps; the value stays as given
        if eq:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val, i = argv[i + 1], i + 2
        else:
            _check_key(key)
            if not isinstance(BOOL_DEFAULTS.get(key), bool):
                raise SystemExit(f"--{key} needs a value")
            val, i = "true", i + 1               # a bare boolean flag: --resume, --qk_norm
        pairs.append((key, val))
    for key, val in pairs:
        if key == "config":
            with open(val, "rb") as f:
                try:
                    table = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise SystemExit(f"{val}: {e}")
            table = {**{k: v for k, v in table.items() if k != "model"}, **table.get("model", {})}
            for k, v in table.items():
                _check_key(k, where=val)
                default = getattr(TrainConfig, k, None) if k in TRAIN_FIELDS else None
                if default is not None and not (isinstance(v, type(default)) or
                                                (isinstance(default, float) and type(v) is int)):
                    raise SystemExit(f"{val}: {k} = {v!r} should be a {type(default).__name__}")
            values.update(table)
    for key, val in pairs:
        if key == "config":
            continue
        _check_key(key)
        default = getattr(TrainConfig, key, None) if key in TRAIN_FIELDS else None
        values[key] = _parse_value(key, val, default)
    stage = values.get("stage", TrainConfig.stage)
    values = {**STAGE_DEFAULTS.get(stage, {}), **values}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    overrides = {k: v for k, v in values.items() if k in MODEL_FIELDS and k not in TRAIN_FIELDS}
    if cfg.stage not in STAGES:
        raise SystemExit(f"--stage {cfg.stage!r}: must be one of {', '.join(STAGES)}")
    if cfg.math_format not in arithmetic.FORMATS:
        raise SystemExit(f"--math_format {cfg.math_format!r}: one of {', '.join(arithmetic.FORMATS)}")
    if not 1 <= cfg.math_digits < max(arithmetic.LEVELS):
        raise SystemExit(f"--math_digits {cfg.math_digits}: 1 to {max(arithmetic.LEVELS) - 1} (the levels above are "
                         "RL's and the held-out evaluation's)")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--precision {cfg.precision!r}: auto, bf16 or fp32")
    if cfg.schedule not in ("wsd", "cosine"):
        raise SystemExit(f"--schedule {cfg.schedule!r}: must be wsd or cosine")
    if cfg.train_on not in ("assistant", "all") or cfg.overlong not in ("truncate", "skip"):
        raise SystemExit(f"--train_on {cfg.train_on!r} / --overlong {cfg.overlong!r}: assistant or all / "
                         "truncate or skip")
    return cfg, overrides


def _check_key(key, where="the command line"):
    if key not in TRAIN_FIELDS and key not in MODEL_FIELDS:
        raise SystemExit(f"unknown key {key!r} in {where}. Training keys: {', '.join(TRAIN_FIELDS)}. "
                         f"Model keys: {', '.join(sorted(MODEL_FIELDS))}")


# -----------------------------------------------------------------------------
# Optimizer and schedule

def param_groups(model, weight_decay, decay_embeddings=False):
    """AdamW groups: weight decay on the matrices of the blocks (and the head), none on norms
    and biases (decay pulls a norm's gain toward 0, which is not a simpler model), and none on
    embeddings unless asked (the playbook: decaying rare tokens' rows toward 0 hurts them).
    A tied head is the embedding, so it follows the embedding's rule."""
    groups = {True: ([], []), False: ([], [])}     # decay? -> (params, names)
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # (a pipeline's last stage holds the tied matrix as its head: the embedding's rule still)
        is_embedding = name.startswith("embed_") or (name == "lm_head.weight" and model.config.tie_embeddings)
        decay = not (p.dim() < 2 or "norm" in name or (is_embedding and not decay_embeddings))
        groups[decay][0].append(p)
        groups[decay][1].append(name)
    # param_names: a sharded run matches its optimizer state with the whole model's by name
    return [{"params": groups[True][0], "param_names": groups[True][1], "weight_decay": weight_decay},
            {"params": groups[False][0], "param_names": groups[False][1], "weight_decay": 0.0}]


def lr_at(step, cfg):
    """Linear warmup, then WSD (constant, then a linear decay over the last decay_frac of the
    run, at least one step) or cosine, both heading for lr * min_lr_ratio at max_steps (the
    last update runs one decay step above it)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - math.ceil(cfg.decay_frac * cfg.max_steps)   # at least one step decays
        if step < decay_start:
            return cfg.lr
        return floor + (cfg.lr - floor) * (cfg.max_steps - step) / max(cfg.max_steps - decay_start, 1)
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# Monitoring: detectors and alerts

class Monitor:
    """Detectors over the recent history of a run. Each returns alerts as (kind, message).
    Spikes compare with the median and a robust spread (1.4826 x the median absolute
    deviation, floored at 2% of the median) of the last `window` steps, so one outlier does
    not hide the next; a throughput drop is under half the recent median; a stall is no new
    best (by 1%) of the smoothed loss for stall_steps steps."""

    def __init__(self, sigma=6.0, window=50, min_history=10, stall_steps=200):
        self.sigma, self.window, self.min_history, self.stall_steps = sigma, window, min_history, stall_steps
        self.history = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window),
                        "tokens_per_s": deque(maxlen=window)}
        self.ema, self.best, self.best_step = None, float("inf"), 0

    def _spike(self, key, value):
        h = self.history[key]
        if len(h) < self.min_history:
            return None
        med = statistics.median(h)
        spread = max(1.4826 * statistics.median(abs(x - med) for x in h), 0.02 * abs(med))
        if value > med + self.sigma * spread:
            return f"{key} {value:.4g} is {(value - med) / spread:.1f} sigma above the recent median {med:.4g}"
        return None

    def update(self, step, loss, grad_norm, tokens_per_s):
        alerts = []
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return [("nonfinite", f"loss {loss}, grad norm {grad_norm}: update skipped")]
        for kind, key, value in (("loss_spike", "loss", loss), ("grad_norm_spike", "grad_norm", grad_norm)):
            message = self._spike(key, value)
            if message:
                alerts.append((kind, message))
        h = self.history["tokens_per_s"]
        if tokens_per_s is not None and len(h) >= self.min_history and tokens_per_s < 0.5 * statistics.median(h):
            alerts.append(("throughput_drop", f"{tokens_per_s:,.0f} tokens/s, under half the recent median "
                                              f"{statistics.median(h):,.0f}"))
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.ema < 0.99 * self.best:
            self.best, self.best_step = self.ema, step
        elif step - self.best_step >= self.stall_steps:
            alerts.append(("loss_stalled", f"smoothed loss {self.ema:.4f} has not improved on {self.best:.4f} "
                                           f"since step {self.best_step}"))
            self.best_step = step        # alert again only after another stall_steps
        for key, value in (("loss", loss), ("grad_norm", grad_norm), ("tokens_per_s", tokens_per_s)):
            if value is not None:
                self.history[key].append(value)
        return alerts

    def state_dict(self):
        return {"history": {k: list(v) for k, v in self.history.items()}, "ema": self.ema, "best": self.best,
                "best_step": self.best_step}

    def load_state_dict(self, state):
        for k, v in state["history"].items():
            self.history[k].clear()
            self.history[k].extend(v)
        self.ema, self.best, self.best_step = state["ema"], state["best"], state["best_step"]


def alert(run_dir, cmd, step, kind, message):
    """An alert goes to stderr, to alerts.jsonl, and as JSON on stdin to the user's command."""
    record = {"time": time.time(), "step": step, "kind": kind, "message": message}
    print(f"ALERT step {step} {kind}: {message}", file=sys.stderr, flush=True)
    with open(os.path.join(run_dir, "alerts.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if cmd:
        try:
            subprocess.run(cmd, shell=True, input=json.dumps(record), text=True, timeout=30, check=True)
        except (subprocess.SubprocessError, OSError) as e:
            print(f"alert_cmd failed: {e}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Checkpoints: a directory per step, written under a temporary name and renamed

def save_checkpoint(path, model, optimizer, trainer_state):
    """path/{model.safetensors, optimizer.safetensors, trainer.json}: weights, AdamW moments and
    step counts, and everything else as JSON (config, loader and monitor state, RNG states).
    No pickle anywhere. Written to path's temporary sibling, then renamed."""
    from safetensors.torch import save_file
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        save_file(model.weights(), os.path.join(tmp, "model.safetensors"))
        opt_tensors, opt_meta = {}, {"groups": [], "param_count": 0}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    opt_tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            opt_meta["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
            opt_meta["param_count"] = sum(len(g["params"]) for g in sd["param_groups"])
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        state = {**trainer_state, "optimizer": opt_meta, "python_random": _jsonable(random.getstate()),
                 "model_config": asdict(model.config)}
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(state, f, indent=1)
        for fname in os.listdir(tmp):          # durable before the rename makes it visible
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        # Overwriting (a step redone after a rollback): directories cannot be swapped in one
        # rename, so the complete old copy steps aside under a name recover_checkpoints()
        # knows, and comes back if we die before the new one is in place.
        old = os.path.join(parent, f".{name}.old")
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            _fsync_dir(parent)
        os.replace(tmp, path)
        _fsync_dir(parent)             # the rename itself durable: a power cut cannot undo it
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_checkpoints(run_dir):
    """Tidy run_dir/ckpt after a save that died: a step's old copy set aside for an overwrite
    (.step_N.old) goes back in place when the new one never arrived, and is deleted when it
    did; half-written temporaries (.step_N.XXXX) are deleted. Never deletes the only complete
    copy of a step. Rank 0 only (the others read the result)."""
    d = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(d):
        return
    for n in sorted(os.listdir(d)):
        if n.startswith(".step_") and n.endswith(".old"):
            step = os.path.join(d, n[1:-len(".old")])
            if os.path.exists(step):
                shutil.rmtree(os.path.join(d, n), ignore_errors=True)
            else:
                os.replace(os.path.join(d, n), step)
                _fsync_dir(d)
                print(f"{step}: restored the complete copy a save had set aside (the save died before the new one "
                      "was in place)", flush=True)
    for n in os.listdir(d):
        if n.startswith(".step_") and not n.endswith(".old"):
            shutil.rmtree(os.path.join(d, n), ignore_errors=True)


def drop_records_after(path, step):
    """Rewrite a metrics.jsonl without the records past `step` (a resumed run logs those steps
    again; kept, each would be there twice), nor a last line a kill cut short. Written aside
    and renamed, like a checkpoint."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:
            if not line.endswith("\n"):      # the torn last line
                continue
        kept.append(line)
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def load_checkpoint(path, model, optimizer=None):
    """Load weights (and optimizer state, RNG states) saved by save_checkpoint; returns trainer.json."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "trainer.json")) as f:
        state = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    expected = set(model.weights())
    if set(weights) != expected:
        raise ValueError(f"{path}: weights do not match the model: missing {sorted(expected - set(weights))[:10]}, "
                         f"unexpected {sorted(set(weights) - expected)[:10]}")
    model.load_state_dict(weights, strict=False)
    if optimizer is not None:
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        sd = optimizer.state_dict()
        if state["optimizer"]["param_count"] != sum(len(g["params"]) for g in sd["param_groups"]):
            raise ValueError(f"{path}: optimizer state is for a different set of parameters")
        per_param = {}
        for key, v in tensors.items():
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = v
        sd["state"] = per_param
        for g, saved in zip(sd["param_groups"], state["optimizer"]["groups"]):
            g.update(saved)
        optimizer.load_state_dict(sd)
        rng = load_file(os.path.join(path, "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(_as_tuple(state["python_random"]))
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


def init_config(path):
    """The train config of the run that wrote checkpoint `path` ({} for a Hugging Face one)."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            return json.load(f).get("config", {})
    except FileNotFoundError:
        return {}


def init_tokenizer(path):
    """The tokenizer file the run that wrote checkpoint `path` used ("" when unknown)."""
    parent = init_config(path)
    return parent.get("tokenizer") or (os.path.join(parent["data_dir"], "tok.json") if parent.get("data_dir") else "")


def checkpoints(run_dir):
    """The step directories in run_dir/ckpt, oldest first."""
    d = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(d):
        return []
    names = [n for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()]
    return [os.path.join(d, n) for n in sorted(names, key=lambda n: int(n[5:]))]


# -----------------------------------------------------------------------------
# The pretraining / mid-training stage

class PretrainStage:
    """The stage contract: next_batch(), loss(model, batch) -> (loss, aux), val_batches(device,
    n) with `names` (the held-out batches eval.py's validation reads, "source" indexing names),
    `batches` (read so far), state_dict() / load_state_dict(); sft.py's stage adds its chat
    tasks. Pretraining and mid-training differ only in the mixture, the context length and
    where the weights start."""

    mask_warn = 0.5        # preflight: over half the labels masked is suspicious in plain text
    token_mean = True      # the loss is a mean over trained tokens: the step's is one over all of them

    def __init__(self, cfg, rank=0, world_size=1, total_tokens=0):
        self.cfg = cfg
        weights = self.mixture(cfg, total_tokens)
        self.loader = data.Loader(cfg.data_dir, cfg.batch_size, cfg.seq_len, weights=weights, seed=cfg.seed,
                                  rank=rank, world_size=world_size)
        self.names = self.loader.names
        self.rank, self.world_size = rank, world_size

    def mixture(self, cfg, total_tokens):
        with open(os.path.join(cfg.data_dir, "manifest.json")) as f:
            names = list(json.load(f)["sources"])
        spec = cfg.mixture or ("smollm3" if cfg.stage == "pretrain" else "prose=0.4,code=0.3,math=0.3")
        if spec == "natural":
            return None
        if spec == "smollm3":
            if not {"prose", "code", "math"} <= set(names):
                return None       # not the built-in corpus: in proportion to size
            return data.schedule(data.SMOLLM3_SCHEDULE, total_tokens, web="prose")
        weights = {}
        for part in spec.split(","):
            name, _, w = part.partition("=")
            try:
                weights[name.strip()] = float(w)
            except ValueError:
                raise SystemExit(f"--mixture {spec!r}: expected smollm3, natural or name=weight,... ({part!r})")
        return {n: weights.get(n, 0.0) for n in names} if set(weights) <= set(names) else weights

    def next_batch(self):
        return next(self.loader)

    def loss(self, model, batch):
        """The mean cross-entropy over the batch's trained tokens (Trainer.loss_weights makes
        the step's loss one mean over every token of the global batch)."""
        _, loss, aux = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
        return loss, aux

    @property
    def batches(self):
        return self.loader.batches

    def val_batches(self, device, n_batches):
        """The same n_batches every time (a fresh loader on the val split), each data-parallel
        rank its own rows."""
        loader = data.Loader(self.cfg.data_dir, self.cfg.batch_size, self.cfg.seq_len, seed=self.cfg.seed,
                             rank=self.rank, world_size=self.world_size, split="val")
        return ({k: v.to(device) for k, v in next(loader).items()} for _ in range(n_batches))

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


# -----------------------------------------------------------------------------
# Set-up: devices, tokenizer, data, model

def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1:
        return parallel.init("nccl" if want_cuda else "gloo")
    return 0, 1, torch.device("cuda" if want_cuda else "cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Layout:
    """Who holds what under torchrun (parallel.py): a mesh of pp x dp x tp ranks, this rank's
    place in it, how the model is wrapped, and how a sharded model and optimizer go back to
    one process's view. Checkpoints are always that view (the same files whatever the
    layout, so a run saved on 8 GPUs resumes on 2, or on a laptop): every rank gathers its
    shards, rank 0 writes them through a full copy on the CPU, and a resume slices them
    again. At a scale where one full copy does not fit in a host's memory, torch's
    distributed checkpoint (torch.distributed.checkpoint) writes the shards in parallel."""

    def __init__(self, cfg, world, device):
        self.cfg, self.world, self.device = cfg, world, device
        self.tp, self.pp, self.impl = cfg.tp, cfg.pp, cfg.parallel_impl
        if self.impl not in ("scratch", "torch"):
            raise SystemExit(f"--parallel_impl {self.impl!r}: scratch (parallel.py's own) or torch (FSDP2, DTensor)")
        if cfg.zero_stage not in (1, 2, 3):
            raise SystemExit(f"--zero_stage {cfg.zero_stage}: 1 (optimizer state), 2 (+ gradients) or 3 (+ weights)")
        if self.tp < 1 or self.pp < 1 or world % (self.tp * self.pp):
            raise SystemExit(f"--tp {self.tp} x --pp {self.pp} must divide the {world} processes (the data-parallel "
                             "degree is what remains): " + ("run under torchrun --nproc_per_node=N" if world == 1
                                                            else f"use a world size that is a multiple of {self.tp * self.pp}"))
        if self.pp > 1 and self.impl == "torch":
            raise SystemExit("--pp: pipeline parallelism is parallel.py's own (--parallel_impl scratch)")
        if self.pp > 1 and cfg.fsdp:
            raise SystemExit("--pp with --fsdp: not combined here (a stage's weights would be gathered and freed "
                             "once per micro-batch); use --pp with plain data parallelism")
        self.dp = world // (self.tp * self.pp)
        self.mesh = parallel.make_mesh(self.tp, self.pp, device.type) if world > 1 else None
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.zero = cfg.fsdp and self.impl == "scratch"
        # plain data parallelism keeps whole replicas: nothing to gather for a checkpoint
        self.sharded = world > 1 and (self.tp > 1 or self.pp > 1 or cfg.fsdp)

    def group(self, dim):
        return self.mesh[dim].get_group()

    def describe(self):
        kind = {"scratch": "parallel.py", "torch": "torch FSDP2/DTensor"}[self.impl]
        shard = f", ZeRO-{self.cfg.zero_stage} over dp" if self.zero else ", FSDP over dp" if self.cfg.fsdp else ""
        return f"{self.world} processes = dp {self.dp} x tp {self.tp} x pp {self.pp} ({kind}{shard})"

    def wrap(self, model):
        """Split the (full, identical on every rank) model in place; returns what the loop calls."""
        cfg = self.cfg
        if self.mesh is None:
            return model
        if self.impl == "torch":
            if self.tp > 1 or cfg.fsdp:
                try:
                    parallel.torch_parallelize(model, self.mesh, fsdp=cfg.fsdp)
                except ValueError as e:
                    raise SystemExit(f"--tp {self.tp}: {e}")
            if self.dp > 1 and not cfg.fsdp:
                if self.tp > 1:
                    raise SystemExit("--parallel_impl torch with --tp and data parallelism needs --fsdp "
                                     "(DDP does not take DTensor parameters)")
                return torch.nn.parallel.DistributedDataParallel(model, process_group=self.group("dp"))
            return model
        if self.tp > 1:
            try:
                parallel.tensor_parallel(model, self.group("tp"))
            except ValueError as e:
                raise SystemExit(f"--tp {self.tp}: {e}")
        # by every name (a tied matrix is the last pipeline stage's lm_head.weight)
        self.tp_params = dict(model.named_parameters(remove_duplicate=False))
        net = model
        if self.pp > 1:
            try:
                net = self.pp_stage = parallel.PipelineStage(model, self.group("pp"))
            except ValueError as e:
                raise SystemExit(f"--pp {self.pp}: {e}")
        if self.zero:
            return parallel.ZeRO(net, stage=cfg.zero_stage, group=self.group("dp"))
        if self.dp > 1:
            return parallel.DataParallel(net, group=self.group("dp"))
        return net

    # -- one process's view of the sharded state (checkpoints) --------------------------

    def to_full(self, name, t):
        """The whole tensor of parameter `name` (or of anything shaped like it: its AdamW
        moments) from this rank's piece t, on every rank of its groups."""
        if self.impl == "torch":               # a DTensor knows its own layout; the rest is replicated
            return t.full_tensor() if hasattr(t, "full_tensor") else t
        if self.zero:                          # ZeRO: rows over the data-parallel ranks
            t = parallel.zero_full(t, self.tp_params[name].shape[0], self.group("dp"))
        if self.tp > 1:                        # TP: blocks over the tensor-parallel ranks
            t = parallel.tp_full(t, self.tp_params[name], self.group("tp"))
        return t

    def to_local(self, name, full, like):
        """to_full's inverse: this rank's piece of a whole tensor, in the layout of `like`."""
        if hasattr(like, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
        if self.impl == "torch":
            return full.to(like.device, like.dtype)
        if self.tp > 1:
            full = parallel.tp_local(full, self.tp_params[name], self.group("tp"))
        if self.zero:
            full = parallel.zero_local(full, self.group("dp"))
        return full.to(like.device, like.dtype)

    def full_state(self, raw, optimizer):
        """({name: whole weight}, {name: {AdamW state}}) on every rank (a pipeline stage's
        pieces are exchanged with the other stages)."""
        weights = {n: self.to_full(n, p.detach()) for n, p in raw.named_parameters()}
        moments = {}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for g in sd["param_groups"]:
                for pid, name in zip(g["params"], g["param_names"]):
                    moments[name] = {k: self.to_full(name, v) if torch.is_tensor(v) and v.dim() else v
                                     for k, v in sd["state"].get(pid, {}).items()}
        if self.pp > 1:
            parts = [None] * self.pp
            dist.all_gather_object(parts, ({k: v.cpu() for k, v in weights.items()},
                                           {k: {a: b.cpu() if torch.is_tensor(b) else b for a, b in st.items()}
                                            for k, st in moments.items()}), group=self.group("pp"))
            weights, moments = {}, {}
            for w, m in parts:
                weights.update(w)
                moments.update(m)
        return weights, moments

    def load_full(self, raw, optimizer, weights, moments):
        """Put a whole state (from full_state or a checkpoint) into this rank's pieces."""
        with torch.no_grad():
            for n, p in raw.named_parameters():
                p.copy_(self.to_local(n, weights[n], p))
        if optimizer is None:
            return
        sd = optimizer.state_dict()
        params = dict(raw.named_parameters())
        for g in sd["param_groups"]:
            for pid, name in zip(g["params"], g["param_names"]):
                if moments.get(name):
                    sd["state"][pid] = {k: self.to_local(name, v, params[name]) if torch.is_tensor(v) and v.dim()
                                        else v for k, v in moments[name].items()}
        optimizer.load_state_dict(sd)

    def clip_grad_norm_(self, raw, max_norm):
        """The whole model's gradient norm, clipped to max_norm on every rank alike. Each rank
        adds its gradients' squares divided by how many ranks hold the same piece (the DP
        replicas; the TP ranks of a replicated norm or K/V head), and one all-reduce over the
        world sums the pieces. Clipping by a rank's own norm would scale the shards of one
        matrix differently."""
        names, params = zip(*raw.named_parameters())
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.impl == "torch":      # DTensors: each knows its own layout
            norm = parallel.grad_norm(params)
            coef = min(1.0, (max_norm / (norm + 1e-6)).item())
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
            return norm
        return parallel.clip_grad_norm_(params, max_norm, None, [self.copies(n) for n in names])

    def copies(self, name):
        """How many ranks of the world hold this parameter's piece of gradient identically."""
        n = 1 if self.zero else self.dp
        if self.tp > 1:
            n *= self.tp // getattr(self.tp_params[name], "tp_slots", 1)
        if self.pp > 1 and name in ("embed_tokens.weight", "lm_head.weight"):
            n *= parallel.pp_copies(self.pp_stage, self.tp_params[name])   # a tied matrix on both end stages
        return n


def get_tokenizer(cfg, rank):
    """The tokenizer (an object with encode/decode and n_vocab or vocab_size): `bytes`, a
    tokenizer.py file, or one trained here on the built-in corpus when missing."""
    if cfg.tokenizer == "bytes":
        return data.ByteTokenizer()
    path = cfg.tokenizer or os.path.join(cfg.data_dir, "tok.json")
    if not os.path.exists(path) and not cfg.tokenizer:
        if rank == 0:
            import tokenizer as tokenizer_py
            print(f"training a {cfg.vocab_size}-token tokenizer on the built-in corpus -> {path}", flush=True)
            texts = [tokenizer_py._read_text(p) for p in data.stdlib_files()[::4]]
            texts += [arithmetic.document(i, 0, cfg.math_format, cfg.math_digits) for i in range(2000)]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tokenizer_py.Tokenizer.train(texts, cfg.vocab_size, verbose=False).save(path.removesuffix(".json"))
        barrier()
    return data.load_tokenizer(path)


def prepare_data(cfg, tok, rank):
    """Prepare the built-in corpus into data_dir when it holds no manifest yet (the default
    run); real data is prepared beforehand with `python data.py prepare`."""
    manifest = os.path.join(cfg.data_dir, "manifest.json")
    if not os.path.exists(manifest):
        if rank == 0:
            print(f"preparing the built-in corpus (code, prose, math) into {cfg.data_dir}", flush=True)
            data.prepare(data.BUILTIN_SOURCES, cfg.data_dir, tok, math=arithmetic.corpus(cfg.math_format,
                                                                                        cfg.math_digits), verbose=False)
        barrier()
    with open(manifest) as f:
        math = json.load(f).get("math")
    want = arithmetic.corpus(cfg.math_format, cfg.math_digits)[1]
    if math and math != want:
        raise SystemExit(f"{manifest}: its math was prepared as {math}, this run writes {want} (--math_format, "
                         f"--math_digits, or an older version of arithmetic.py): give another --data_dir (it is "
                         f"prepared there) or delete {cfg.data_dir}")


def is_reward_model(path):
    """Whether checkpoint `path` holds a reward model (rl.py's score head: "score.weight")."""
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return "score.weight" in f.keys()


def load_frozen(path, device, what):
    """A checkpoint of this script (a reward model's with its score head) as a frozen model in
    eval mode on `device`: rl.py's reward model and teacher."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            mc = json.load(f)["model_config"]
    except FileNotFoundError:
        raise ValueError(f"{what}{path}: no trainer.json (a checkpoint directory of this script is expected)") from None
    model = M.Model(M.ModelConfig(**mc))
    if is_reward_model(path):
        rl.add_score_head(model)
    load_checkpoint(path, model)
    return model.to(device).eval().requires_grad_(False)


def build_model(cfg, overrides, vocab_size):
    """A fresh model from the preset and overrides, or the --init weights. From a checkpoint
    only position fields may change: mid-training extends the context with a new rope_theta
    (ABF), rope_scaling (YaRN) and max_seq_len."""
    if not cfg.init:
        try:
            return M.Model(M.preset(cfg.preset, **{"vocab_size": vocab_size, **overrides}))
        except (ValueError, TypeError) as e:      # a bad --preset or model field: say which
            raise SystemExit(str(e))
    if os.path.exists(os.path.join(cfg.init, "trainer.json")):
        with open(os.path.join(cfg.init, "trainer.json")) as f:
            mc = json.load(f)["model_config"]
        model = M.Model(M.ModelConfig(**mc))
        if is_reward_model(cfg.init):     # a reward model continues as one (--stage rm), never as a policy
            if cfg.stage != "rm":
                raise SystemExit(f"--init {cfg.init} is a reward model (it has a score head): it scores "
                                 f"completions (--stage rl --reward rm:{cfg.init}), it does not generate them")
            rl.add_score_head(model)
        load_checkpoint(cfg.init, model)
    else:
        model = M.Model.from_pretrained(cfg.init)
    allowed = {"rope_theta", "rope_scaling", "max_seq_len", "z_loss", "attn_impl"}
    if set(overrides) - allowed:
        raise SystemExit(f"--init {cfg.init}: cannot change {sorted(set(overrides) - allowed)} of a trained model "
                         f"(allowed: {', '.join(sorted(allowed))})")
    if overrides:
        c = M.ModelConfig(**{**asdict(model.config), **overrides})
        new = M.Model(c)
        new.load_state_dict(model.state_dict())
        model = new
    return model


# -----------------------------------------------------------------------------
# Preflight

# NAME -> (memory GiB, dense bf16 peak FLOP/s): the datasheets' numbers without sparsity. MFU
# finds the device's by its name (in this order: L40S before L4, A100 before A10); --plan --gpu NAME.
GPUS = {"h100": (80, 989e12), "h200": (141, 989e12), "a100": (80, 312e12), "a100-40gb": (40, 312e12),
        "l40s": (48, 362e12), "l4": (24, 121e12), "a10": (24, 125e12)}


def peak_flops(cfg, device):
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for k, (_, peak) in GPUS.items() if k.split("-")[0].upper() in name.upper()), 0.0)
    return 0.0


def available_memory(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def random_model(vocab_size):
    """A small freshly initialised model on the CPU, the same every time: the "knows nothing"
    model of eval.validate_pipeline (whose verdict is about the tasks, not this run's model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return M.Model(M.preset("tiny", vocab_size=vocab_size, n_layer=1, dim=64, n_head=2, n_kv_head=1,
                                mlp_dim=128, nope_layers=())).eval()


def preflight(t):
    """The checklist. Returns the list of (status, item, detail); prints it as it goes."""
    cfg, model, device = t.cfg, t.raw_model, t.device
    results = []

    def report(status, item, detail):
        results.append((status, item, detail))
        if t.rank == 0:
            print(f"  [{len(results):2d}] {status:4s} {item}: {detail}", flush=True)

    if t.rank == 0:
        print("preflight checklist:")
    loader_state = t.stage.state_dict()
    batch = t.next_batch()
    t.stage.load_state_dict(loader_state)        # the run itself starts from this same batch
    V = model.config.padded_vocab    # the softmax runs over the padded rows too
    # 1. the initial loss of a fresh model is ln(vocab): it knows nothing and claims nothing
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    _, losses, _, _, _ = t.forward_backward(lambda: batch, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_time = time.perf_counter() - t0
    lv = losses[0].item()
    if cfg.init or t.start_step:
        report("PASS", "initial loss", f"{lv:.3f} (a trained model: ln(vocab) = {math.log(V):.3f} not expected)")
    else:
        off = abs(lv - math.log(V))
        report("PASS" if off < 0.5 else "WARN" if off < 1.5 else "FAIL", "initial loss",
               f"{lv:.3f}, ln(vocab {V}) = {math.log(V):.3f}" + ("" if off < 0.5 else
               ": far from it; check the init scale (init_std), the labels and the vocabulary size"))
    # 2. the batch is text, and its masked share is what the stage expects
    masked = (batch["labels"] == -100).float().mean().item()
    text = t.decode(batch["input_ids"][0, :160].tolist())
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text) / max(len(text), 1)
    status = ("FAIL" if masked == 1.0 or printable < 0.5 else
              "WARN" if masked > t.stage.mask_warn or printable < 0.9 else "PASS")
    report(status, "batch", f"{masked:.1%} of labels masked, {printable:.0%} printable; row 0 reads: "
           f"{text[:100]!r}" + (" -- every label is -100: nothing to learn" if masked == 1.0 else ""))
    # 3. no NaN or Inf in the loss or any gradient
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    report("PASS" if math.isfinite(lv) and not bad else "FAIL", "forward/backward finite",
           "loss and every gradient finite" if math.isfinite(lv) and not bad else f"loss {lv}, non-finite grads {bad[:5]}")
    model.zero_grad(set_to_none=True)
    # 4. a checkpoint saves and reloads to identical weights (a sharded run's: the whole model)
    whole = t.layout.full_state(model, None)[0] if t.layout.sharded else model.state_dict()
    if t.rank == 0:
        with tempfile.TemporaryDirectory(dir=cfg.out_dir) as d:
            save_checkpoint(os.path.join(d, "step"), t.host_copy(whole)[0] if t.layout.sharded else model, None,
                            {"step": 0})
            reloaded = t.host_copy()[0]
            load_checkpoint(os.path.join(d, "step"), reloaded)
            back = reloaded.state_dict()
            same = all(torch.equal(v.cpu(), back[k]) for k, v in whole.items())
            size = sum(os.path.getsize(os.path.join(d, "step", f)) for f in os.listdir(os.path.join(d, "step")))
        report("PASS" if same else "FAIL", "checkpoint round trip",
               f"weights identical after save and load ({size / 1e6:.1f} MB without optimizer state)" if same
               else "weights differ after reload")
    # 5. evaluation runs: validation loss, and two examples of each task on this model
    try:
        ev = t.evaluate(1, eval.subset(t.tasks, 2))
        report("PASS", "evaluation", ", ".join(f"{k} {v['value']:.3f}" for k, v in ev.items()
                                               if not k.endswith(("/chance", "/truncated"))))
    except Exception as e:   # noqa: BLE001 (any failure here is the finding)
        report("FAIL", "evaluation", f"{type(e).__name__}: {e}")
    # 6. the evaluation itself can be trusted: a model that knows nothing scores chance, an
    # oracle 100%, and reordering the choices changes nothing (eval.validate_pipeline)
    if t.tasks:
        checks = eval.validate_pipeline(random_model(V), t.tok, t.tasks)
        status = "FAIL" if any(c[0] == "FAIL" for c in checks) else "WARN" if any(c[0] == "WARN" for c in checks) \
            else "PASS"
        report(status, "evaluation pipeline", "; ".join(f"{c}: {d}" for s, c, d in checks if s != "PASS") or
               f"{len(checks)} checks on {', '.join(t.tasks)}: a random model at chance, an oracle at 100%, "
               "the same answers with the choices shuffled")
    # 7. throughput and MFU, from the step above
    tokens, flops = t.step_work([batch])
    tps = tokens / step_time
    peak = peak_flops(cfg, device)
    mfu = flops / step_time / peak if peak else None
    total = cfg.max_steps * t.accum * tokens * t.dp
    report("PASS", "throughput", f"~{tps * t.dp:,.0f} tokens/s (first step, cold), "
           f"{'MFU ~%.0f%%' % (100 * mfu / (t.world_size // t.dp)) if mfu else 'MFU n/a (set --peak_flops for this device)'}; "
           f"{total / 1e6:.2f}M tokens would take ~{total / (tps * t.dp) / 60:.1f} min")
    # 8. memory: weights, gradients and AdamW's two moments in fp32, plus activations (an estimate)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())    # this rank's share
    act = cfg.batch_size * cfg.seq_len * c.n_layer * (14 * c.dim + 3 * c.mlp_dim) * 4
    need, have = 16 * n_params + act, available_memory(device)
    status = "WARN" if have is None else "FAIL" if need > have else "WARN" if need > 0.8 * have else "PASS"
    report(status, "memory", f"~{need / 2 ** 30:.2f} GiB needed (16 B/param + activations), "
           f"{'unknown' if have is None else '%.1f GiB' % (have / 2 ** 30)} available")
    # 9. disk for keep_last + 1 checkpoints (weights + two AdamW moments)
    need = (cfg.keep_last + 1) * 12 * n_params
    free = shutil.disk_usage(cfg.out_dir).free
    report("FAIL" if need > free else "PASS", "disk", f"{need / 2 ** 30:.2f} GiB for {cfg.keep_last + 1} "
           f"checkpoints, {free / 2 ** 30:.1f} GiB free in {cfg.out_dir}")
    # 10. under torchrun: the layout, the same (whole) weights everywhere, different data on
    # each data-parallel rank and the same data within its TP / PP group
    if t.world_size > 1:
        report("PASS", "layout", t.layout.describe())
        checksum = torch.stack([v.detach().double().sum() for v in whole.values()]).to(device)
        sums = [torch.zeros_like(checksum) for _ in range(t.world_size)]
        dist.all_gather(sums, checksum)
        same = all(torch.equal(s, sums[0]) for s in sums)
        report("PASS" if same else "FAIL", "identical initial weights",
               f"{t.world_size} ranks agree" if same else "ranks hold different weights: seed every rank alike")
        if t.layout.tp > 1 and t.layout.impl == "scratch":
            # sharded blocks must differ between TP ranks, replicated ones agree (SmolLM3's bug)
            bad = parallel.check_replicas(model, t.layout.group("tp"))
            report("FAIL" if bad else "PASS", "tensor-parallel shards",
                   "; ".join(f"{n}: {why}" for n, why in bad[:3]) if bad else
                   "sharded weights differ between TP ranks, replicated ones agree")
        h = torch.tensor([hash(tuple(batch["input_ids"].flatten().tolist())) % (2 ** 61), t.dp_rank], device=device)
        hashes = [torch.zeros_like(h) for _ in range(t.world_size)]
        dist.all_gather(hashes, h)
        by_dp = {}
        for x in hashes:
            by_dp.setdefault(int(x[1]), set()).add(int(x[0]))
        distinct = all(len(v) == 1 for v in by_dp.values()) and len({min(v) for v in by_dp.values()}) == t.dp
        report("PASS" if distinct else "FAIL", "different data per rank",
               f"each of the {t.dp} data-parallel ranks reads its own batch" + (
                   ", shared by its TP/PP ranks" if t.world_size > t.dp else "") if distinct else
               "ranks read the wrong batches (data-parallel ranks alike, or a TP/PP group split): check the sharding")
    else:
        report("PASS", "ranks", "one process (no cross-rank checks)")
    return results


# -----------------------------------------------------------------------------
# The trainer

class Trainer:
    def __init__(self, cfg, overrides):
        self.cfg = cfg
        self.rank, self.world_size, self.device = setup_distributed(cfg)
        self.layout = Layout(cfg, self.world_size, self.device)
        self.dp, self.dp_rank = self.layout.dp, self.layout.dp_rank
        if self.rank == 0:
            recover_checkpoints(cfg.out_dir)      # before anyone lists the checkpoints
        barrier()
        torch.manual_seed(cfg.seed)           # the same init on every rank (TP slices it: no seed bug)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if checkpoints(cfg.out_dir) and not cfg.resume:
            raise SystemExit(f"{cfg.out_dir} already holds checkpoints: --resume to continue that run, or a new --out_dir")
        if cfg.stage in ("midtrain", "sft") and not cfg.init and not cfg.resume:
            raise SystemExit(f"--stage {cfg.stage} continues a trained model: give --init CHECKPOINT")
        if cfg.stage == "dpo" and not cfg.init:
            raise SystemExit("--stage dpo starts from an SFT model and keeps it as the reference: give --init "
                             "CHECKPOINT (on --resume too)")
        if cfg.stage == "dpo" and cfg.pp > 1:
            raise SystemExit("--stage dpo with --pp: not written here (the pipeline schedule takes the "
                             "cross-entropy loss only)")
        if cfg.stage in ("rl", "rm") and not cfg.init:
            raise SystemExit(f"--stage {cfg.stage} starts from a trained (SFT) model: give --init CHECKPOINT "
                             "(on --resume too)")
        if cfg.stage in ("rl", "rm") and (cfg.pp > 1 or cfg.tp > 1 or cfg.fsdp):
            raise SystemExit(f"--stage {cfg.stage}: data parallelism only here (rollouts sample from, and the "
                             "reward head reads, a whole model on every rank); drop --pp, --tp and --fsdp")
        if not cfg.init and cfg.preset not in M.PRESETS:
            raise SystemExit(f"--preset {cfg.preset!r}: presets are {', '.join(M.PRESETS)}")
        per_step = cfg.batch_size * cfg.seq_len * self.dp      # TP and PP ranks share their batch
        if cfg.total_batch_tokens % per_step:
            raise SystemExit(f"--total_batch_tokens {cfg.total_batch_tokens} is not a multiple of batch_size x "
                             f"seq_len x data-parallel ranks = {per_step}")
        self.accum = cfg.total_batch_tokens // per_step
        # (the checks above are cheap; the tokenizer and data below may take a while the first time)
        os.makedirs(cfg.out_dir, exist_ok=True)
        if cfg.init and not cfg.tokenizer:     # the model's own tokenizer, from the run that trained it
            cfg.tokenizer = init_tokenizer(cfg.init)
        self.tok = get_tokenizer(cfg, self.rank)
        if cfg.stage in ("pretrain", "midtrain"):
            prepare_data(cfg, self.tok, self.rank)
        self.raw_model = build_model(cfg, overrides, eval.vocab_size(self.tok)).to(self.device)
        if eval.vocab_size(self.tok) > self.raw_model.config.padded_vocab:
            raise SystemExit(f"the tokenizer has {eval.vocab_size(self.tok)} tokens but the model's embedding only "
                             f"{self.raw_model.config.padded_vocab} rows (--init {cfg.init}): use its tokenizer")
        if cfg.seq_len > self.raw_model.config.max_seq_len:
            raise SystemExit(f"--seq_len {cfg.seq_len} exceeds the model's max_seq_len "
                             f"{self.raw_model.config.max_seq_len}; raise --max_seq_len (with --rope_theta or "
                             "--rope_scaling to extend a trained model's context)")
        if cfg.stage == "rm" and not hasattr(self.raw_model, "score"):
            rl.add_score_head(self.raw_model)     # (before the optimizer and the wrapper see the parameters)
        self.stage = self.make_stage()
        # every forward of the run (training, evaluation, the reference's) runs under this: bf16
        # matmuls where the hardware has them, weights and optimizer in float32 (mixed precision)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
        resuming = cfg.resume and checkpoints(cfg.out_dir)
        if getattr(self.stage, "ref_mode", None) == "cache" and not resuming:   # (resumed: in the checkpoint)
            # under the policy's autocast: scored in another precision, every log-ratio would be
            # off zero at step 0 (bf16 rounding), and DPO's start would not tie
            with self.autocast:
                self.stage.cache_reference(self.raw_model, self.device, log=self.log)
        self.tok_bytes = eval.token_bytes(self.tok, self.raw_model.config.padded_vocab)
        names = [n.strip() for n in cfg.eval_tasks.split(",") if n.strip() not in ("", "none")]
        # the same examples at every evaluation; "chat" is the stage's own held-out questions
        self.tasks = eval.resolve_tasks([n for n in names if n != "chat"], cfg.eval_examples,
                                        math_format=cfg.math_format)
        if "chat" in names:
            if not hasattr(self.stage, "chat_tasks"):
                raise SystemExit(f"--eval_tasks chat: held-out chat questions come with --stage sft, dpo or rl, "
                                 f"not {cfg.stage}")
            self.tasks.update(eval.subset(self.stage.chat_tasks(), cfg.eval_examples))
        self.last_eval, self.said_no_tasks = {}, False
        # each task example's outcome before this stage (the win rate's baseline), and at the last evaluation
        self.start_correct = self.last_correct = self.start_outcomes = self.last_outcomes = None
        self.full_config = self.raw_model.config
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)   # of the whole model, before it is split
        with torch.random.fork_rng(devices=[]), torch.device("meta"):    # any context length: a weightless copy
            self.flops_at = M.Model(self.full_config).flops_per_token
        self.n_params = self.raw_model.num_params()
        self.model = self.layout.wrap(self.raw_model)     # the raw model now holds this rank's pieces
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, cfg.weight_decay, cfg.decay_embeddings),
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.monitor = Monitor(cfg.spike_sigma, stall_steps=cfg.stall_steps)
        self.start_step, self.nan_streak, self.rollbacks, self.stop_signal = 0, 0, 0, None
        self.slow_streak = {}
        if cfg.resume and checkpoints(cfg.out_dir):
            self.restore(checkpoints(cfg.out_dir)[-1], loader=True)
            if self.rank == 0:        # the steps after it run again: their first record goes
                drop_records_after(os.path.join(cfg.out_dir, "metrics.jsonl"), self.start_step)
        elif cfg.resume:
            self.log(f"--resume: no checkpoint in {cfg.out_dir}/ckpt yet, starting fresh")

    def make_stage(self):
        cfg = self.cfg
        group = self.layout.group("dp") if self.world_size > 1 else None
        if cfg.stage == "rl":
            try:
                return self.rl_stage(group)
            except (OSError, ValueError) as e:
                raise SystemExit(f"--stage rl: {e}")
        if cfg.stage == "rm":
            try:
                return rl.RewardModelStage(self.tok, cfg.seq_len, cfg.batch_size, self.raw_model, cfg.pref_data,
                                           cfg.rm_center, cfg.overlong, cfg.seed, self.dp_rank, self.dp, group,
                                           cfg.math_format, cfg.math_digits, log=self.log)
            except (OSError, ValueError) as e:
                raise SystemExit(f"--stage rm: {e}")
        if cfg.stage == "dpo":
            try:      # (before the model is wrapped: a frozen reference copy is a whole, plain model)
                return dpo.DPOStage(self.tok, cfg.seq_len, cfg.batch_size, self.raw_model, cfg.pref_data, cfg.loss,
                                    cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.ref, cfg.desirable_weight,
                                    cfg.undesirable_weight, cfg.overlong, cfg.seed, self.dp_rank, self.dp, group,
                                    cfg.math_format, cfg.math_digits, log=self.log)
            except (OSError, ValueError) as e:
                raise SystemExit(f"--stage dpo: {e}")
        if cfg.stage != "sft":
            return PretrainStage(cfg, self.dp_rank, self.dp, cfg.max_steps * cfg.total_batch_tokens)
        try:
            return sft.SFTStage(self.tok, cfg.seq_len, cfg.batch_size, cfg.chat_data, cfg.packing, cfg.train_on,
                                cfg.overlong, cfg.seed, self.dp_rank, self.dp, cfg.math_format, cfg.math_digits,
                                log=self.log)
        except (OSError, ValueError) as e:     # a bad file, a tokenizer without the chat tokens
            raise SystemExit(f"--stage sft: {e}")

    def rl_stage(self, group):
        """rl.py's stage with its frozen models: the reference (a copy of --init, when beta > 0),
        a reward model (--reward rm:DIR), a teacher (--teacher DIR, whose tokenizer must be
        this model's), each in eval mode without gradients, on this device."""
        cfg = self.cfg
        ref = reward_model = teacher = None
        if cfg.beta > 0:
            ref = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
        if cfg.reward.startswith("rm:"):
            reward_model = load_frozen(cfg.reward[3:], self.device, "--reward rm:")
            if not hasattr(reward_model, "score"):
                raise ValueError(f"--reward {cfg.reward}: that checkpoint has no score head (train one with --stage rm)")
        elif cfg.reward != "math":
            raise ValueError(f"--reward {cfg.reward!r}: math, or rm:CHECKPOINT")
        if cfg.teacher:
            theirs = init_tokenizer(cfg.teacher)
            if not theirs:
                raise ValueError(f"--teacher {cfg.teacher}: its tokenizer is unknown (not a checkpoint of this "
                                 "script's); distillation needs the student's own")
            why = rl.same_tokenizer(self.tok, data.ByteTokenizer() if theirs == "bytes" else data.load_tokenizer(theirs))
            if why:
                raise ValueError(f"--teacher {cfg.teacher} uses another tokenizer ({theirs}: {why}); on-policy "
                                 "distillation compares the two models token by token, so they must share one")
            teacher = load_frozen(cfg.teacher, self.device, "--teacher")
        return rl.RLStage(self.tok, cfg.seq_len, cfg.batch_size, self.accum, cfg.rl_data, cfg.group_size,
                          cfg.max_new_tokens, cfg.rl_temperature, cfg.loss_type, cfg.scale, cfg.beta, cfg.eps_low,
                          cfg.eps_high, cfg.iterations, cfg.format_weight, cfg.overlong_cache, cfg.resample, ref,
                          reward_model, teacher, cfg.distill, cfg.jsd_beta, cfg.seed, self.dp_rank, self.dp, group,
                          cfg.math_format, cfg.math_digits, cfg.rl_rehearse, log=self.log)

    def next_batch(self):
        """The stage's next micro-batch on this device; an on-policy stage first samples a new
        rollout from the whole current policy when its last one is spent (every rank at once)."""
        if getattr(self.stage, "wants_rollout", lambda: False)():
            with torch.no_grad(), self.whole_model() as m, self.autocast:
                self.stage.rollout(m, self.device)
        return {k: v.to(self.device) for k, v in self.stage.next_batch().items()}

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i < eval.vocab_size(self.tok)])

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def restore(self, path, loader):
        """Model, optimizer, RNG and step from a checkpoint; the loader too unless we are
        skipping past bad batches."""
        if self.layout.sharded:    # every rank reads the whole checkpoint, then keeps its pieces
            host, host_opt = self.host_copy()
            state = load_checkpoint(path, host, host_opt)
            self.layout.load_full(self.raw_model, self.optimizer, *self.host_state(host, host_opt))
        else:
            state = load_checkpoint(path, self.raw_model, self.optimizer)
        self.start_step = state["step"]
        self.monitor.load_state_dict(state["monitor"])
        self.start_correct = state.get("start_correct")
        self.start_outcomes = state.get("start_outcomes")
        if loader:
            self.stage.load_state_dict(state["stage"])
        self.log(f"restored {path} (step {self.start_step})")
        return state

    def host_copy(self, weights=None, moments=None):
        """A whole model and its AdamW on the CPU, to read or write a checkpoint of a sharded run
        (built without touching the run's random state), holding `weights` and `moments` (by
        parameter name, as Layout.full_state gives them) when given."""
        with torch.random.fork_rng(devices=[]):
            host = M.Model(self.full_config)
            if hasattr(self.raw_model, "score"):    # a reward model's head
                rl.add_score_head(host)
        host_opt = torch.optim.AdamW(param_groups(host, self.cfg.weight_decay, self.cfg.decay_embeddings))
        if weights is not None:
            host.load_state_dict({k: v.cpu() for k, v in weights.items()}, strict=False)
        if moments is not None:
            sd = host_opt.state_dict()
            for g, mine in zip(sd["param_groups"], self.optimizer.state_dict()["param_groups"]):
                g.update({k: v for k, v in mine.items() if k not in ("params", "param_names")})
                for pid, name in zip(g["params"], g["param_names"]):
                    if moments.get(name):
                        sd["state"][pid] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in moments[name].items()}
            host_opt.load_state_dict(sd)
        return host, host_opt

    def host_state(self, host, host_opt):
        """(weights, moments) by parameter name, from the host copy: what Layout.load_full takes."""
        weights = dict(host.named_parameters(remove_duplicate=False))   # a tied matrix under both names
        sd = host_opt.state_dict()
        by_name = {name: sd["state"][pid] for g in sd["param_groups"]
                   for pid, name in zip(g["params"], g["param_names"]) if pid in sd["state"]}
        first = {}
        for name, p in weights.items():
            first.setdefault(id(p), name)
        return weights, {name: by_name[first[id(p)]] for name, p in weights.items() if first[id(p)] in by_name}

    def save(self, step):
        model, optimizer = self.raw_model, self.optimizer
        if self.layout.sharded:    # every rank gathers, rank 0 writes one process's view
            weights, moments = self.layout.full_state(self.raw_model, self.optimizer)
            if self.rank == 0:
                model, optimizer = self.host_copy(weights, moments)
        if self.rank == 0:
            path = os.path.join(self.cfg.out_dir, "ckpt", f"step_{step:06d}")
            save_checkpoint(path, model, optimizer,
                            {"step": step, "config": asdict(self.cfg), "stage": self.stage.state_dict(),
                             "monitor": self.monitor.state_dict(), "start_correct": self.start_correct,
                             "start_outcomes": self.start_outcomes})
            recover_checkpoints(self.cfg.out_dir)     # what a save killed half-way left behind
            if self.cfg.keep_last > 0:     # 0 keeps every checkpoint
                for old in checkpoints(self.cfg.out_dir)[:-self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def alert(self, step, kind, message):
        if self.rank == 0:
            alert(self.cfg.out_dir, self.cfg.alert_cmd, step, kind, message)

    def forward_backward(self, fetch, n):
        """Forward and backward of one step's n micro-batches (fetch() gives the next): gradients
        accumulate, each loss scaled by its weight (loss_weights), and are averaged over the
        data-parallel ranks once, with the last backward. Returns (batches, losses, weights,
        aux dicts, this rank's forward seconds)."""
        model = self.model
        batches = [fetch() for _ in range(n)]     # all of them first: a token mean counts them before any backward
        weights = self.loss_weights(batches)
        if self.layout.pp > 1:   # the pipeline runs every micro-batch's forward and backward itself
            t0 = time.perf_counter()
            with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext(), self.autocast:
                losses, auxes = parallel.pipeline_step(self.layout.pp_stage, batches, weights=weights)
            if hasattr(model, "reduce_now"):
                model.reduce_now()    # the pipeline's many backwards ran inside no_sync: average once
            return batches, losses, weights, auxes or [{}] * n, time.perf_counter() - t0
        losses, auxes, fwd = [], [], 0.0
        for i, (batch, w) in enumerate(zip(batches, weights)):
            # DDP all-reduces gradients in backward: only on the last micro-batch (wrappers
            # without no_sync, FSDP2 and TP alone, communicate on every micro-batch)
            sync = i == n - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                t0 = time.perf_counter()
                with self.autocast:
                    loss, aux = self.stage.loss(model, batch)
                if self.world_size > 1 and self.device.type == "cuda":
                    torch.cuda.synchronize()       # the forward's own time, for the straggler check
                fwd += time.perf_counter() - t0
                (loss * w).backward()
            losses.append(loss.detach())
            auxes.append(aux)
        return batches, losses, weights, auxes, fwd

    def loss_weights(self, batches):
        """What each micro-batch's loss is multiplied by before its backward, so that the step's
        gradient is that of the stage's loss over the whole global batch, however it is split
        into micro-batches, accumulation steps and data-parallel ranks.

        A token mean (pretraining, SFT: stage.token_mean) is one mean over every trained token
        (labels != -100) of the global step: micro-batch i's mean times n_i / N, with N counted
        over all data-parallel ranks before any backward, times dp because the data-parallel
        reduction then averages the ranks. (Each micro-batch's own mean divided by the number
        of micro-batches would weigh an SFT row of 10 assistant tokens as much as one of 1,000,
        and change the objective with the split: the bug transformers fixed with
        num_items_in_batch.) A loss defined per pair or per sequence (the DPO family, the
        reward model) or normalised by the stage itself (rl.py's aggregations) is a mean over
        equal-sized micro-batches: 1/n each."""
        n = len(batches)
        if not getattr(self.stage, "token_mean", False):
            return [1.0 / n] * n
        counts = torch.stack([(b["labels"] != -100).sum() for b in batches]).double()
        total = counts.sum()
        if self.dp > 1:
            dist.all_reduce(total, group=self.layout.group("dp"))
        return (counts * self.dp / total.clamp(min=1)).tolist()

    def step_work(self, batches):
        """(tokens, FLOPs) of this rank's micro-batches. The tokens are the real ones, each row's
        "lengths" before its padding (pretraining's rows have none), not batch_size x seq_len:
        DPO's rows are padded to their longest pair, RL's to the longest rollout. The FLOPs are
        those spent, padding included: stage.forward_passes forward passes' worth over every
        position (3, a forward and a backward; DPO's frozen reference adds its forward), at
        the batch's own width. An on-policy stage's rollout adds its own (Trainer._loop)."""
        tokens = flops = 0.0
        passes = getattr(self.stage, "forward_passes", 3)
        for b in batches:
            B, T = b["input_ids"].shape
            tokens += b["lengths"].sum().item() if "lengths" in b else B * T
            flops += passes * self.flops_at(T) / 3 * B * T
        return tokens, flops

    @contextlib.contextmanager
    def whole_model(self):
        """The model with every weight in place, for generation and scoring outside the training
        step: FSDP2 unshards (generate calls hidden_states, not forward), ZeRO-3 keeps its
        gathered weights. Sharded layouts need every rank in here, doing the same thing."""
        m = self.raw_model
        if hasattr(m, "unshard"):
            m.unshard()
        whole = self.model.summon_full_params() if hasattr(self.model, "summon_full_params") else contextlib.nullcontext()
        try:
            with whole:
                yield m
        finally:
            if hasattr(m, "reshard"):
                m.reshard()

    def evaluate(self, n_batches, tasks):
        """Validation loss and bits per byte per source, then the tasks (eval.py), on every rank
        alike. Under --pp only validation (generation across stages is not written here)."""
        group = self.layout.group("dp") if self.world_size > 1 else None
        with torch.no_grad():
            out = eval.validation(self.eval_model(), self.stage.val_batches(self.device, n_batches), self.tok_bytes,
                                  self.stage.names, group)
        if tasks and self.layout.pp > 1 and not self.said_no_tasks:
            self.log("tasks: not evaluated under --pp (scoring and generation across pipeline stages are not "
                     "written here); validation loss and bits per byte are")
            self.said_no_tasks = True
        elif tasks and self.layout.pp == 1:
            correct = {}
            with self.whole_model() as m, self.autocast:
                out.update(eval.run_tasks(m, self.tok, tasks, correct=correct))
            if self.start_correct is None:
                self.last_correct = correct
            else:     # each example against the model this stage started from (0.5: no better, no worse)
                # (the same examples: preflight's two-example subsets are not compared)
                both = [t for t in correct if len(correct[t]) == len(self.start_correct.get(t, ()))]
                out.update({f"win_rate/{t}": eval.win_rate(correct[t], self.start_correct[t]) for t in both})
                if both:
                    out["win_rate"] = eval.win_rate(sum((correct[t] for t in both), []),
                                                    sum((self.start_correct[t] for t in both), []))
        if hasattr(self.stage, "evaluate") and self.layout.pp == 1:
            # the stage's own held-out outcomes (DPO: preference accuracy): [bool] -> accuracy,
            # [float] -> a mean, each with its interval
            with torch.no_grad(), self.whole_model() as m, self.autocast:
                outcomes = self.stage.evaluate(m, self.device)
            for k, v in outcomes.items():
                if v:
                    out[k] = eval.accuracy(v) if isinstance(v[0], bool) else eval.ratio(v, [1.0] * len(v))
            # the same held-out pairs against the model this stage started from: a paired difference
            start = self.start_outcomes or {}
            if len(start.get("pref/accuracy", ())) == len(outcomes.get("pref/accuracy", ())) > 0:
                out["pref/accuracy gain"] = eval.paired(outcomes["pref/accuracy"], start["pref/accuracy"])
            self.last_outcomes = outcomes
        return out

    def start_evaluation(self):
        """The model as it came, on this stage's evaluation: its chat questions and held-out
        pairs (every later evaluation's win rate is against these outcomes); for mid-training,
        the model as it was trained (its own rope_theta, before this stage's ABF or YaRN) on
        this stage's validation batches at the new context length: what mid-training must beat."""
        cfg = self.cfg
        if cfg.stage != "midtrain":
            out = self.evaluate(cfg.eval_batches, self.tasks)
            self.start_correct = self.last_correct
            self.start_outcomes = self.last_outcomes
            return out
        # read from the --init checkpoint itself: the same whole model on every rank, whatever the layout
        if os.path.exists(os.path.join(cfg.init, "trainer.json")):
            trained = load_frozen(cfg.init, "cpu", "--init ")
        else:
            trained = M.Model.from_pretrained(cfg.init)
        if trained.config.max_seq_len < cfg.seq_len:   # a longer position table; nothing else changes
            longer = M.Model(M.ModelConfig(**{**asdict(trained.config), "max_seq_len": cfg.seq_len}))
            longer.load_state_dict(trained.state_dict())
            trained = longer
        group = self.layout.group("dp") if self.world_size > 1 else None
        with torch.no_grad(), self.autocast:
            return eval.validation(trained.to(self.device).eval(), self.stage.val_batches(self.device, cfg.eval_batches),
                                   self.tok_bytes, self.stage.names, group)

    def eval_model(self):
        """What evaluation calls as model(input_ids, labels=..., position_ids=...): the model, or
        under pipeline parallelism a forward through the stages whose per-row losses the last
        stage sends to the others (every rank then adds the same numbers)."""
        if self.layout.pp == 1:
            return self.raw_model
        stage = self.layout.pp_stage

        def run(input_ids, labels, position_ids):
            out = parallel.pipeline_forward(stage, {"input_ids": input_ids, "labels": labels,
                                                    "position_ids": position_ids})
            row_ce = out[2]["row_ce"] if out is not None else torch.zeros(len(input_ids), device=self.device)
            dist.broadcast(row_ce, stage.ranks[-1], group=stage.group)
            return None, None, {"row_ce": row_ce}
        return run

    def report_card(self, step, stage=None):
        """The stage's row of the report card (eval.py), from the last evaluation:
        run_dir/report_card.json and .md (started from the --init run's card, so it grows a row
        per stage), and eval.json in that step's checkpoint."""
        cfg = self.cfg
        path = os.path.join(cfg.out_dir, "ckpt", f"step_{step:06d}")
        row = {"stage": stage or cfg.stage, "step": step, "run": os.path.abspath(cfg.out_dir), "ckpt": path,
               "metrics": self.last_eval}
        parent = None
        if cfg.init and os.path.exists(os.path.join(cfg.init, "trainer.json")):
            parent = os.path.dirname(os.path.dirname(os.path.abspath(cfg.init)))   # RUN/ckpt/step_N -> RUN
        rows = eval.add_to_card(cfg.out_dir, row, inherit=parent)
        if os.path.isdir(path):
            eval.write_json(os.path.join(path, "eval.json"), row)
        self.log(f"report card ({os.path.join(cfg.out_dir, 'report_card.md')}):\n" + eval.card_table(rows, eval.HEADLINE))

    def check_stragglers(self, step, fwd_time, record):
        """Every rank's forward time this step, gathered (one tiny all-gather). Data-parallel
        ranks wait for each other at every gradient all-reduce, so one throttled GPU sets the
        whole run's pace; its forward, which waits on nothing under plain DP, shows it. (Under
        FSDP and TP the forward holds collectives too, which dilutes the signal.) Three slow
        steps in a row raise an alert naming the rank."""
        times = parallel.gather_times(fwd_time, self.device)
        slow = parallel.slow_ranks(times, self.cfg.straggler)
        record["forward_s_max_over_median"] = max(times) / statistics.median(times)
        self.slow_streak = {r: self.slow_streak.get(r, 0) + 1 for r in slow}
        for r, n in self.slow_streak.items():
            if n == 3:
                self.alert(step, "straggler", f"rank {r}'s forward took {times[r] * 1e3:.1f} ms, "
                                              f"{times[r] / statistics.median(times[:r] + times[r + 1:]):.1f}x the "
                                              "other ranks' median, 3 steps in a row: check that GPU (clocks, "
                                              "temperature, ECC errors) or run `torchrun ... parallel.py health`")

    def train(self):
        """Preflight, then the loop; returns the last step done."""
        cfg, c = self.cfg, self.raw_model.config
        total, non_emb = self.n_params
        if self.rank == 0:
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump({"train": asdict(cfg), "model": asdict(c)}, f, indent=1)
            print(f"config: {json.dumps(asdict(cfg))}\nmodel: {json.dumps(asdict(c))}")
            print(f"model: {total:,} parameters ({non_emb:,} non-embedding), {self.flops_per_token / 1e6:.1f} "
                  f"MFLOPs/token; batch: {cfg.batch_size} x {cfg.seq_len} x {self.dp} data-parallel ranks x "
                  f"{self.accum} accumulation = {cfg.total_batch_tokens:,} tokens/step; {cfg.max_steps} steps = "
                  f"{cfg.max_steps * cfg.total_batch_tokens / 1e6:.2f}M tokens; device {self.device}")
        if cfg.preflight:
            # The checks build a model (a fresh init draws random numbers): keep the run's RNG
            # where it was, so that a resumed run and an uninterrupted one stay identical.
            py_state = random.getstate()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                results = preflight(self)
            random.setstate(py_state)
            moe.end_step(self.raw_model)   # the checks' forwards are not training steps: forget their routing
            failed = [item for status, item, _ in results if status == "FAIL"]
            if failed and not cfg.ignore_preflight:
                raise SystemExit(f"preflight FAILED: {', '.join(failed)} (fix it, or --ignore_preflight to run anyway)")
        if not checkpoints(cfg.out_dir):
            before = cfg.stage in ("midtrain", "sft", "dpo", "rl") and cfg.init
            if before:
                self.last_eval = self.start_evaluation()
            self.save(0)      # something to return to if the first steps go non-finite
            if before and self.rank == 0:
                self.report_card(0, stage=f"{cfg.stage} (start)")
        previous = {sig: signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self):
        cfg = self.cfg
        peak = peak_flops(cfg, self.device)
        metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if self.rank == 0 else None
        step = self.start_step
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            # per-source (loss sum, tokens), then (weighted loss sum, weights), then (stop, -),
            # then the stage's own metrics (sum, micro-batches; DPO: rewards, margins), then the
            # work (tokens, FLOPs): one all-reduce carries them all, so every rank agrees on the
            # loss and on stopping
            S, extra = len(self.stage.names), getattr(self.stage, "metric_names", ())
            W = S + 2 + len(extra)
            stats = torch.zeros(W + 1, 2, device=self.device)
            one = torch.ones((), device=self.device)
            rollouts = getattr(self.stage, "rollouts", 0)
            batches, losses, weights, auxes, fwd_time = self.forward_backward(self.next_batch, self.accum)
            for batch, loss, w, aux in zip(batches, losses, weights, auxes):
                stats[S] += torch.stack([loss.float() * w, one * w])     # the loss the step's gradient is of
                n_tok = (batch["labels"] != -100).sum(1).float()
                if "source" in batch and "row_ce" in aux:   # (a pipeline's last stage has the rows)
                    stats[:S, 0].index_add_(0, batch["source"], aux["row_ce"].float() * n_tok)
                    stats[:S, 1].index_add_(0, batch["source"], n_tok)
                for j, name in enumerate(extra):
                    if name in aux.get("metrics", {}):
                        stats[S + 2 + j] += torch.stack([aux["metrics"][name].float(), one])
            stats[S + 1, 0] = float(self.stop_signal is not None)
            stats[W] = torch.tensor(self.step_work(batches))
            if getattr(self.stage, "rollouts", 0) > rollouts:    # sampled this step: its work too
                stats[W, 1] += self.stage.rollout_flops
            grad_norm = self.layout.clip_grad_norm_(self.raw_model, cfg.grad_clip)
            if dist.is_initialized():
                dist.all_reduce(stats)
            loss_value = (stats[S, 0] / stats[S, 1]).item()
            stop = stats[S + 1, 0].item() > 0
            gn = grad_norm.item()
            stepped = math.isfinite(loss_value) and math.isfinite(gn)
            if stepped:
                self.optimizer.step()
                self.nan_streak = 0
            else:
                self.nan_streak += 1   # skip the update; the gradients are discarded below
            self.optimizer.zero_grad(set_to_none=True)
            # MoE: DeepSeek-V3's bias update from this step's expert load, then fresh counts
            moe.end_step(self.raw_model, self.raw_model.config.bias_update_rate if stepped else 0.0)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            # every data-parallel rank's work (tensor and pipeline ranks share theirs): the real
            # tokens per second, and the FLOPs spent against every GPU's peak
            shared = self.world_size // self.dp
            tps, flops = stats[W, 0].item() / shared / dt, stats[W, 1].item() / shared
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": gn, "tokens_per_s": tps,
                      "mfu": flops / (dt * peak * self.world_size) if peak else None,
                      "peak_memory_gb": peak_memory(self.device) / 2 ** 30, "tokens": step * cfg.total_batch_tokens}
            for s, name in enumerate(self.stage.names):
                if stats[s, 1] > 0:
                    record[f"loss/{name}"] = (stats[s, 0] / stats[s, 1]).item()
            for j, name in enumerate(extra):
                if stats[S + 2 + j, 1] > 0:
                    record[f"train/{name}"] = (stats[S + 2 + j, 0] / stats[S + 2 + j, 1]).item()
            if getattr(self.stage, "rollouts", 0) > rollouts:
                # on-policy: sampling and training are separate speeds (every rank samples its own
                # share at once); the step's tokens/s above counts both, over the nominal batch
                rollout_s, trained = self.stage.rollout_seconds, sum(b["lengths"].sum().item() for b in batches)
                record["rollout_tokens_per_s"] = self.stage.generated * self.dp / rollout_s
                record["train_tokens_per_s"] = trained * self.dp / max(dt - rollout_s, 1e-9)
            if "moe" in aux:   # each MoE layer's load over the whole step (every rank's tokens)
                record["moe_loss"] = aux["moe_loss"].item()
                for layer, layer_stats in aux["moe"].items():
                    record.update({f"moe/{layer}/{k}": v.item() for k, v in layer_stats.items()})
            # (the throughput watch reads the step's pace: real tokens vary with the padding)
            for kind, message in self.monitor.update(step, loss_value, gn, cfg.total_batch_tokens / dt):
                self.alert(step, kind, message)
            if self.world_size > 1:
                self.check_stragglers(step, fwd_time, record)
            if self.nan_streak >= cfg.nan_patience:
                self.rollbacks += 1
                if self.rollbacks > 3:   # not the data: the model or the learning rate
                    raise SystemExit(f"step {step}: non-finite again after 3 rollbacks; lower --lr or check the model")
                path = checkpoints(cfg.out_dir)[-1]
                skipped = self.stage.batches
                self.alert(step, "rollback", f"{self.nan_streak} non-finite steps in a row: reloading {path} and "
                                             f"skipping the batches read since it")
                state = self.restore(path, loader=False)   # the loader stays put: those batches are skipped
                self.log(f"  skipped {skipped - state['stage']['batches']} loader batches")
                step, self.nan_streak = self.start_step, 0
                continue
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                self.last_eval = self.evaluate(cfg.eval_batches, self.tasks)
                record.update({k: m["value"] for k, m in self.last_eval.items()})
            if self.rank == 0:
                metrics_file.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                               for k, v in record.items()}) + "\n")   # NaN is not JSON
                metrics_file.flush()
                mfu = f" mfu {100 * record['mfu']:.1f}%" if record["mfu"] else ""
                sources = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss/"))
                val = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val_loss") or
                               k.endswith(eval.HEADLINE))
                shown = " ".join(f"{k.split('/')[-1]} {record[k]:.3f}" for k in SHOWN if k in record)
                sources = " ".join(part for part in (sources, shown) if part)
                if "rollout_tokens_per_s" in record:
                    sources += (f" | rollout {record['rollout_tokens_per_s']:,.0f} tok/s, train "
                                f"{record['train_tokens_per_s']:,.0f} tok/s")
                if "moe_loss" in record:   # the worst layer: a collapsing router shows here first
                    sources += f" | moe max load {max(v for k, v in record.items() if k.endswith('max_load')):.2f}"
                print(f"step {step:5d}/{cfg.max_steps} loss {loss_value:.4f} lr {lr:.2e} gnorm {gn:.3f} "
                      f"{tps:,.0f} tok/s{mfu} mem {record['peak_memory_gb']:.2f}GB"
                      + "".join(f" | {part}" for part in (sources, val) if part), flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop:
                self.save(step)
            if step == cfg.max_steps and self.rank == 0:
                self.report_card(step)
            if stop:
                self.log(f"stop signal: saved step {step}, exiting (resume with --resume)")
                break
        if metrics_file:
            metrics_file.close()
        return step


def sample(t, prompt="def ", n_tokens=48):
    """A continuation of prompt (SFT: the answer to a held-out question, in the chat
    template, up to its <|im_end|>). Sharded weights take every rank of the model: all of
    them generate together (the same seed, so the same tokens), and rank 0 prints."""
    ids, stop = eval.encode(t.tok, prompt), ()
    if hasattr(t.stage, "chat_tasks"):
        ids = next(iter(t.stage.chat_tasks().values()))[1][0]["prompt_ids"]   # the first task's first question
        stop, n_tokens = [eval.special_ids(t.tok)["<|im_end|>"]], max(n_tokens, 96)
    with t.whole_model() as m:
        out = m.generate([ids], max_new_tokens=n_tokens, temperature=0.8, top_k=50, stop_ids=stop,
                         generator=torch.Generator(device=t.device).manual_seed(0))[0]
    return t.decode(ids + out) if stop else prompt + t.decode(out)


# -----------------------------------------------------------------------------
# Plots

def plot(run_dir):
    """metrics.jsonl -> run_dir/curves.png (loss, lr, grad norm, throughput)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        by_step = {}
        for line in f:               # a resumed run redoes steps: the last record of a step wins
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    rows = [by_step[k] for k in sorted(by_step)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key in zip(axes.flat, ("loss", "lr", "grad_norm", "tokens_per_s")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o-", ms=3, label="val")
                ax.legend()
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return out


def run(cfg, overrides):
    """One run of one stage: the trainer, preflight and the loop, then a sample and the curves.
    Returns the last step done (short of max_steps: stopped by a signal, resumable)."""
    t = Trainer(cfg, overrides)
    step = t.train()
    if step >= cfg.max_steps and cfg.sample_tokens:
        if cfg.pp > 1:
            t.log("sample: skipped (generation across pipeline stages is not written here)")
        elif t.rank == 0 or t.layout.sharded:
            text = sample(t, n_tokens=cfg.sample_tokens)
            t.log(f"sample: {text!r}")
    if t.rank == 0 and step >= cfg.max_steps:
        plot(cfg.out_dir)
    # every rank leaves together: a rank that tears its process group down while another is still
    # writing the card or the plot can abort in gloo's teardown ("terminate called without an
    # active exception"), which torchrun reports as a failed run
    barrier()
    return step


# -----------------------------------------------------------------------------
# The default pipeline: `python train.py`

# The playbook's recap run end to end: each stage starts from the previous one's last
# checkpoint, in OUT/<n>-<stage>/, and is evaluated at its start and its end. What the pipeline
# sets beyond each stage's STAGE_DEFAULTS, and why:
PIPELINE = (
    # a 1.5M-parameter shape (4 layers of dim 128), not the tiny preset's 5.8M: on 2 CPU cores it
    # pretrains at about 3x the tokens per second to the same validation bits per byte, and it
    # learns the arithmetic in the minutes SFT has, where the tiny preset does not start to (README:
    # the walkthrough's card);
    # evaluations at steps 40, 80 and 120: the validation bits per byte must fall at each
    ("pretrain", ["--n_layer", "4", "--dim", "128", "--mlp_dim", "512", "--n_head", "4", "--n_kv_head", "2",
                  "--eval_every", "40", "--ckpt_every", "40"]),
    # (pipeline() adds twice pretraining's context and 10x its rope_theta: ABF, as SmolLM3 raised
    # rope_theta for long context) a new warmup and a short WSD run at a third of pretraining's
    # peak, on the mid-training mixture
    ("midtrain", ["--max_steps", "30", "--lr", "1e-3", "--warmup_steps", "5", "--eval_every", "30",
                  "--ckpt_every", "30", "--eval_tasks", ""]),
    # SFT learns the sums in a sudden drop of the loss after some hundreds of steps: many small
    # steps (1,300 of 2,048 tokens, about 45 conversations each; a tenth of them numbers read back,
    # which delay the drop) at pretraining's peak rate, which a 1.5M model takes; one evaluation at
    # the end of each post-training stage (and the one at its start), the held-out evaluation after
    # the last stage does the rest
    ("sft", ["--max_steps", "1300", "--total_batch_tokens", "2048", "--lr", "3e-3", "--eval_every", "1300",
             "--ckpt_every", "650"]),
    # APO-zero (dpo.py's default loss) at half its usual rate: at 2e-4 it undid SFT (one digit 96%
    # -> 70% held out), at 5e-5 it keeps it (README: the walkthrough's card)
    ("dpo", ["--max_steps", "30", "--lr", "5e-5", "--eval_every", "30"]),
    # GRPO (DAPO's loss) on the level above SFT's, its prompts in turn with the top demonstrated
    # level's (--rl_rehearse 1), at a third of the stage's default rate: at 3e-4, or on the new
    # level alone, the demonstrated levels fell below SFT's (README: RL notes; chosen on RL's own
    # split of problems, never on the held-out ones)
    ("rl", ["--max_steps", "180", "--lr", "1e-4", "--rl_rehearse", "1", "--eval_every", "180", "--ckpt_every", "90"]),
)


def _split_pipeline_args(argv):
    """The pipeline's command line -> (out_dir, [args for every stage], {stage: [its args]}):
    --key value goes to every stage, --STAGE.key value to that stage only (--sft.max_steps 40)."""
    out, common, own, i = "runs/playbook", [], {name: [] for name, _ in PIPELINE}, 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--"):
            raise SystemExit(f"unexpected argument {flag!r}: options are --key value or --STAGE.key value")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        group, key = argv[i:j], flag[2:].partition("=")[0]
        if key == "out_dir":
            out = flag.partition("=")[2] or (argv[i + 1] if j > i + 1 else "")
        elif "." in key:
            stage = key.partition(".")[0]
            if stage not in own:
                raise SystemExit(f"--{key}: no stage {stage!r} in the pipeline ({', '.join(own)})")
            own[stage] += ["--" + flag[2:].partition(".")[2]] + group[1:]
        elif key in ("stage", "init", "resume"):
            raise SystemExit(f"--{key}: the pipeline sets it for each stage (run one stage with --stage)")
        else:
            common += group
        i = j
    return out, common, own


def run_unless_done(what, name, cfg, overrides, times, times_path):
    """One run of a pipeline or an ablation: skipped when its directory holds the final
    checkpoint, resumed from the latest one when it holds some, its wall time added to
    times[name] (saved to times_path). A run a signal stopped ends the process: the same
    command again resumes it."""
    done = checkpoints(cfg.out_dir)
    if done and int(os.path.basename(done[-1])[5:]) >= cfg.max_steps:
        print(f"{what}: {name} is done ({done[-1]})", flush=True)
        return
    print(f"\n=== {what}: {name}{' (resumed)' if done else ''} -> {cfg.out_dir}", flush=True)
    cfg.resume = bool(done)
    t0 = time.time()
    step = run(cfg, overrides)
    times[name] = times.get(name, 0.0) + time.time() - t0
    if int(os.environ.get("RANK", 0)) == 0:
        eval.write_json(times_path, times)
    if step < cfg.max_steps:
        raise SystemExit(f"{what}: {name} stopped at step {step}; run the same command again to resume")


def pipeline(argv):
    """Every stage of PIPELINE in turn (the tokenizer and the built-in corpus are prepared by
    the first), skipping those already finished and resuming the one a crash or a signal
    interrupted, then OUT/REPORT.md: the report card, one row per stage, each with the check
    that says whether the stage did its job on held-out data."""
    out, common, own = _split_pipeline_args(argv)
    times_path = os.path.join(out, "pipeline.json")
    os.makedirs(out, exist_ok=True)
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    dirs, init = {}, ""
    try:
        for n, (name, args) in enumerate(PIPELINE, 1):
            run_dir = dirs[name] = os.path.join(out, f"{n}-{name}")
            if name == "midtrain":      # (flags given for the stage still win)
                with open(os.path.join(init, "trainer.json")) as f:
                    trained = json.load(f)
                context = 2 * trained["config"]["seq_len"]
                args = args + ["--seq_len", str(context), "--rope_theta", str(10 * trained["model_config"]["rope_theta"]),
                               "--max_seq_len", str(max(context, trained["model_config"]["max_seq_len"]))]
            cfg, overrides = parse_config(["--stage", name, *args, *common, *own[name], "--out_dir", run_dir,
                                           *(["--init", init] if init else [])])
            run_unless_done("pipeline", name, cfg, overrides, times, times_path)
            init = checkpoints(run_dir)[-1]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        t0 = time.time()
        heldout = heldout_evaluation(out, dirs)
        times["heldout"] = time.time() - t0
        report = pipeline_report(out, dirs, times, heldout)
        print(report)
        with open(os.path.join(out, "REPORT.md"), "w") as f:
            f.write(report)


def _machine():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _card(run_dir):
    """{stage: {metric: {value, low, high, n}}} of the rows this run wrote on its report card."""
    with open(os.path.join(run_dir, "report_card.json")) as f:
        rows = json.load(f)
    return {r["stage"]: r["metrics"] for r in rows if r.get("run") == os.path.abspath(run_dir)}


POST_TRAINING = ("sft", "dpo", "rl")


def heldout_evaluation(out, dirs, per_level=300, samples=16, curve=64):
    """The pipeline's own held-out evaluation, through the code anyone can run on their own
    problems (`python eval.py --ckpt CKPT --tasks OUT/heldout/d3.jsonl --examples 0 --samples 16`): the
    held-out problems of every demonstrated level and of RL's, written as neutral rows
    {"a", "op", "b"}, asked to each post-training stage's final checkpoint greedily (exact match,
    template adherence) and sampled at temperature 1 (pass@1 over `samples` draws, pass@8; on
    RL's level `curve` draws for SFT and GRPO, whose pass@k against k is plotted). Problems are
    the units of every interval; two models on the same problems are compared pairwise. Writes
    OUT/heldout.json: {"levels", "rl_level", "commonest": {level: share}, stage: {level: {metric:
    metric}, "outcomes": {level: {"greedy": [bool], "pass@1": [float]}}}, "curve": {stage: {k: pass@k}}}."""
    with open(os.path.join(dirs["sft"], "config.json")) as f:
        train_cfg = json.load(f)["train"]
    fmt, digits = train_cfg["math_format"], train_cfg["math_digits"]
    levels, top = [f"d{d}" for d in range(1, digits + 2)], f"d{digits + 1}"
    os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
    paths, result = [], {"levels": levels, "rl_level": top, "commonest": {}, "curve": {}}
    for d in range(1, digits + 2):
        problems = arithmetic.heldout(d, per_level)
        paths.append(os.path.join(out, "heldout", f"d{d}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps({"a": a, "op": op, "b": b}) + "\n" for a, op, b in problems)
        result["commonest"][f"d{d}"] = rl.commonest_answer_share([{"answer": str(arithmetic.result(*p))}
                                                                  for p in problems])
    for stage in POST_TRAINING:
        t0 = time.time()
        net, tok, _ = eval.open_checkpoint(checkpoints(dirs[stage])[-1], "")
        net.eval()
        tasks = eval.render_problems(eval.resolve_tasks(paths, 0, math_format=fmt), tok, fmt)
        mine = result[stage] = {"outcomes": {}}
        for level, (_, examples) in tasks.items():
            # (a worked answer is about 22 tokens: 32 leave room, and cap the rows that ramble)
            greedy, details = eval.generative(net, tok, examples, max_new_tokens=32, batch_size=256)
            plotted = level == top and stage in ("sft", "rl")
            n = curve if plotted else samples
            sampled, drawn = eval.sampled(net, tok, examples, n, 1.0, max_new_tokens=32, batch_size=512, ks=(8,))
            mine[level] = {"greedy": greedy["exact_match"], "template": greedy.get("template"),   # (None: no chat)
                           "pass@1": sampled["pass@1"], "pass@8": sampled["pass@8"]}
            mine["outcomes"][level] = {"greedy": [d["correct"] for d in details],
                                       "pass@1": [d["correct"] / d["samples"] for d in drawn]}
            if plotted:
                result["curve"][stage] = eval.pass_at_k_curve(drawn, range(1, curve + 1))
        print(f"held-out evaluation of {stage}: " + ", ".join(
            f"{lv} {mine[lv]['greedy']['value']:.3f} (pass@1 {mine[lv]['pass@1']['value']:.3f}, pass@8 "
            f"{mine[lv]['pass@8']['value']:.3f})" for lv in levels) + f" ({time.time() - t0:.0f} s)", flush=True)
    for stage in ("dpo", "rl"):           # paired: the same problems, against the SFT model
        for level in levels:
            for m in ("greedy", "pass@1"):
                result[stage][level][f"{m} gain"] = eval.paired(result[stage]["outcomes"][level][m],
                                                               result["sft"]["outcomes"][level][m])
    eval.write_json(os.path.join(out, "heldout.json"), result)
    plot_pass_at_k(result["curve"], top, os.path.join(dirs["rl"], "pass_at_k.png"))
    return result


def plot_pass_at_k(curves, level, path):
    """pass@k against k on RL's level, the SFT model against GRPO's: where the SFT curve rises
    above 0 at large k, the model sometimes samples a right answer; that is the seed RL grows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pass@k plot: skipped (pip install matplotlib); the numbers are in heldout.json")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage, label in (("sft", "SFT"), ("rl", "GRPO")):
        ks = sorted(curves[stage], key=int)
        ax.plot([int(k) for k in ks], [curves[stage][k] for k in ks], label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel(f"pass@k, held-out {level}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pipeline_checks(dirs, heldout):
    """[(stage, what it must show, the evidence, passed)]: every stage did its job on held-out data."""
    checks = []
    # pretraining: validation bits per byte at each evaluation, falling every time
    by_step = {}
    with open(os.path.join(dirs["pretrain"], "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("val_bpb") is not None:
                by_step[r["step"]] = r["val_bpb"]
    bpb = [by_step[k] for k in sorted(by_step)]
    checks.append(("pretrain", "validation bits per byte falls at every evaluation",
                   " -> ".join(f"{v:.3f}" for v in bpb) + f" (steps {', '.join(map(str, sorted(by_step)))})",
                   len(bpb) >= 2 and all(b < a for a, b in zip(bpb, bpb[1:]))))
    card = _card(dirs["midtrain"])
    before, after = card["midtrain (start)"]["val_loss"]["value"], card["midtrain"]["val_loss"]["value"]
    checks.append(("midtrain", "validation loss at twice the pretraining context, below the pretrained model's",
                   f"{before:.3f} -> {after:.3f}", after < before))
    # post-training, judged on arithmetic.py's held-out problems (heldout_evaluation): the levels
    # SFT demonstrated and the one above, RL's, which only a verifier covers
    top = heldout["rl_level"]
    shown = [lv for lv in heldout["levels"] if lv != top]
    sft_ = heldout["sft"]
    template = min((sft_[lv]["template"] or {"value": 0.0})["value"] for lv in shown)
    checks.append(("sft", f"template adherence at least 95% and greedy accuracy at least 80% on every demonstrated "
                   f"level ({', '.join(shown)})", f"template min {template:.3f}; " +
                   ", ".join(f"{lv} {sft_[lv]['greedy']['value']:.3f}" for lv in shown),
                   template >= 0.95 and all(sft_[lv]["greedy"]["value"] >= 0.80 for lv in shown)))

    def fell(stage):       # the levels whose greedy accuracy fell below the SFT model's 95% interval
        return [lv for lv in shown if heldout[stage][lv]["greedy"]["value"] < sft_[lv]["greedy"]["low"]]

    def gain(m):
        return f"{100 * m['value']:+.1f} points ({100 * m['low']:+.1f} to {100 * m['high']:+.1f})"

    dpo_card = _card(dirs["dpo"])
    before, after = dpo_card["dpo (start)"]["pref/accuracy"]["value"], dpo_card["dpo"]["pref/accuracy"]["value"]
    diff, lost = dpo_card["dpo"].get("pref/accuracy gain"), fell("dpo")
    checks.append(("dpo", "held-out preference accuracy above the SFT model's (the paired 95% interval of the "
                   "difference above 0); greedy accuracy on no level below the SFT model's interval",
                   f"{before:.3f} -> {after:.3f}" + (f", {gain(diff)}" if diff else "") +
                   (f"; fell: {', '.join(lost)}" if lost else ""),
                   bool(diff) and diff["low"] > 0 and not lost))
    rl_, lost = heldout["rl"], fell("rl")
    constant = heldout["commonest"][top]
    ok = not lost and rl_[top]["greedy"]["value"] > constant
    evidence = []
    for m in ("greedy", "pass@1"):
        d = rl_[top][f"{m} gain"]
        ok = ok and d["value"] >= 0.30 - 1e-9 and d["low"] > 0
        evidence.append(f"{m} {sft_[top][m]['value']:.3f} -> {rl_[top][m]['value']:.3f} ({gain(d)})")
    checks.append(("rl", f"on {top} (RL's level) greedy accuracy and pass@1 at least 30 points above the SFT model's "
                   "(paired 95% intervals above 0) and above the commonest answer's share; no demonstrated level "
                   "below the SFT model's interval", "; ".join(evidence) + f"; the commonest answer {constant:.3f}"
                   + (f"; fell: {', '.join(lost)}" if lost else ""), ok))
    return checks


def heldout_table(heldout):
    """The held-out card: each post-training model on each level, greedy and sampled."""
    lines = ["| model | level | greedy | pass@1 (T=1) | pass@8 | template | the commonest answer |",
             "|---|---|---|---|---|---|---|"]
    for stage in POST_TRAINING:
        for lv in heldout["levels"]:
            m = heldout[stage][lv]
            lines.append(f"| {stage} | {lv}{' (RL)' if lv == heldout['rl_level'] else ''} | " +
                         " | ".join(eval.fmt(m[k]) if m[k] else "" for k in ("greedy", "pass@1", "pass@8", "template")) +
                         f" | {heldout['commonest'][lv]:.3f} |")
    return "\n".join(lines)


def pipeline_report(out, dirs, times, heldout):
    """OUT/REPORT.md: the checks, the held-out card, then every stage's evaluations."""
    lines = [f"# Report card: `python train.py` into {out}", "",
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {_machine()}; "
             f"{sum(times.values()) / 60:.1f} minutes in all.", "",
             "| stage | minutes | must show, on held-out data | measured | verdict |", "|---|---|---|---|---|"]
    for stage, what, evidence, ok in pipeline_checks(dirs, heldout):
        lines.append(f"| {stage} | {times.get(stage, 0) / 60:.1f} | {what} | {evidence} | {'PASS' if ok else 'FAIL'} |")
    lines += ["", f"Held-out arithmetic ({times.get('heldout', 0) / 60:.1f} minutes; problems no stage trained on, "
              "in OUT/heldout/*.jsonl; 95% intervals over problems; pass@k against k on "
              f"{heldout['rl_level']} in {os.path.join(dirs['rl'], 'pass_at_k.png')}). Final checkpoints: " +
              ", ".join(f"{s} `{checkpoints(dirs[s])[-1]}`" for s in POST_TRAINING) + ":", "",
              heldout_table(heldout)]
    with open(os.path.join(dirs["rl"], "report_card.json")) as f:
        rows = json.load(f)
    lines += ["", "Every evaluation, each stage's start and end (value and 95% interval; every metric in each "
              "run's report_card.md, every step in its metrics.jsonl, curves in its curves.png):", "",
              eval.card_table(rows, eval.HEADLINE), ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The plan: what a run needs, before renting the GPUs

def plan(argv):
    """`python train.py --plan --preset NAME --tokens N [--gpus 1] [--gpu h100] [--mfu 0.2]` and
    any config key: the playbook's "spec what you need, choose the right GPUs" as numbers,
    without training or even allocating a weight (the model is built on the "meta" device:
    shapes only). Prints the parameters and FLOPs, the wall time at a stated MFU, the
    checkpoint size, and the memory per GPU of every layout of the GPUs (parallel.memory_plan)."""
    opts, rest, args, i = {"tokens": None, "gpus": "1", "gpu": "h100", "mfu": ""}, [], argv, 0
    while i < len(args):
        key, eq, val = args[i][2:].partition("=")
        key = key.replace("-", "_") if args[i].startswith("--") else None
        if key == "plan":
            i += 1
        elif key in opts:
            if not eq:
                val = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            if val is None:
                raise SystemExit(f"--{key} needs a value")
            opts[key], i = val, i + (1 if eq else 2)
        else:
            rest.append(args[i])
            i += 1
    text = opts["tokens"]
    if text is None:
        raise SystemExit("--plan needs --tokens N: the tokens to train on (2e9, 500M, 2B, 11T)")
    unit = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:].upper())
    try:
        tokens = float((text[:-1] if unit else text).replace("_", "").replace(",", "")) * (unit or 1)
    except ValueError:
        tokens = -1.0
    if not (math.isfinite(tokens) and tokens >= 1):
        raise SystemExit(f"--tokens {text!r}: a positive count of tokens, such as 2e9, 500M, 2B or 11T")
    if not opts["gpus"].isdigit() or int(opts["gpus"]) < 1:
        raise SystemExit(f"--gpus {opts['gpus']!r}: a whole number of GPUs, at least 1")
    gpus, gpu = int(opts["gpus"]), opts["gpu"].lower()
    if gpu not in GPUS:
        raise SystemExit(f"--gpu {opts['gpu']!r}: known GPUs are {', '.join(GPUS)}")
    # the default MFU is the one measured here: smollm2-135m on one H100, bf16 autocast, the
    # Triton kernels on, no torch.compile, 16 x 2048 tokens (BENCHMARKS.md, 2026-11-24)
    source = "given" if opts["mfu"] else "measured: smollm2-135m on one H100, BENCHMARKS.md; the preflight measures yours"
    try:
        mfu = float(opts["mfu"] or 0.20)
    except ValueError:
        mfu = -1.0
    if not 0 < mfu <= 1:
        raise SystemExit(f"--mfu {opts['mfu']!r}: the share of the peak a run reaches, in (0, 1] (0.2: 20%)")
    cfg, overrides = parse_config(rest)
    given = {a[2:].partition("=")[0].replace("-", "_") for a in rest if a.startswith("--")}
    if cfg.init:
        raise SystemExit("--plan plans a fresh model from --preset and model fields; --init is not read")
    if cfg.preset not in M.PRESETS:
        raise SystemExit(f"--preset {cfg.preset!r}: presets are {', '.join(M.PRESETS)}")
    # the vocabulary: the preset's (a real run takes its tokenizer's), or --vocab_size when given
    vocab = {"vocab_size": cfg.vocab_size} if "vocab_size" in given else {}
    try:
        with torch.device("meta"):
            model = M.Model(M.preset(cfg.preset, **{**vocab, **overrides}))
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e))
    c = model.config
    if cfg.seq_len > c.max_seq_len:
        raise SystemExit(f"--seq_len {cfg.seq_len} exceeds the model's max_seq_len {c.max_seq_len}")
    mem, peak = GPUS[gpu][0] * 2 ** 30, cfg.peak_flops or GPUS[gpu][1]
    total, non_emb = model.num_params()
    fpt = model.flops_per_token(cfg.seq_len)
    seconds = tokens * fpt / (gpus * peak * mfu)
    n_tensors = len(list(model.parameters()))
    ckpt_w, ckpt_o = 4 * total, 8 * total + 4 * n_tensors    # save_checkpoint: fp32 weights, AdamW's moments
    G = 2 ** 30
    count = next((f"{tokens / v:.4g}{u}" for u, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)) if tokens >= v),
                 f"{tokens:.0f}")
    print(f"plan: {cfg.preset} (vocab {c.padded_vocab:,}) on {gpus} x {gpu} ({GPUS[gpu][0]} GiB, "
          f"{peak / 1e12:,.0f} TFLOP/s dense bf16 each), {count} tokens at seq_len {cfg.seq_len}")
    print(f"model: {total:,} parameters ({non_emb:,} non-embedding); {tokens / total:,.0f} tokens per "
          "parameter (Chinchilla-optimal: ~20)")
    print(f"compute: {fpt / 1e6:,.1f} MFLOPs/token (6 per matmul weight + attention) x {count} tokens = "
          f"{tokens * fpt:.3g} FLOPs")
    print(f"time: at {100 * mfu:.0f}% MFU ({source}), {seconds / 3600:,.1f} hours = "
          f"{seconds / 86400:,.1f} days on {gpus} GPU{'s' if gpus > 1 else ''}; {peak * mfu / fpt:,.0f} tokens/s per GPU, "
          f"{gpus * peak * mfu / fpt:,.0f} in all")
    print(f"checkpoint: {(ckpt_w + ckpt_o) / G:,.2f} GiB per save (fp32 weights {ckpt_w / G:,.2f} + AdamW's fp32 "
          f"moments {ckpt_o / G:,.2f}); {cfg.keep_last + 1} on disk at once (--keep_last {cfg.keep_last} + the one "
          f"being written): {(cfg.keep_last + 1) * (ckpt_w + ckpt_o) / G:,.1f} GiB")
    # Every layout of the GPUs: tp up to 8 (a node's NVLink domain: TP all-reduces inside every
    # layer), pp 1, 2, 4 or 8, the data-parallel degree what remains; ZeRO only where dp > 1 and
    # not with pp (train.py refuses --pp with --fsdp). --tp, --pp or --fsdp on the command line
    # pin them (any --pp that divides the GPUs).
    if ("tp" in given or "pp" in given) and gpus % (cfg.tp * cfg.pp):
        raise SystemExit(f"--gpus {gpus} is not divisible by --tp {cfg.tp} x --pp {cfg.pp} (the data-parallel "
                         "degree is what remains)")
    tps = [cfg.tp] if "tp" in given else [t for t in range(1, min(gpus, 8) + 1) if gpus % t == 0]
    stages = ([cfg.zero_stage] if cfg.fsdp else [0]) if "fsdp" in given else [0, 1, 2, 3]
    rows, skipped = [], []
    for tp in tps:
        pps = [cfg.pp] if "pp" in given else [p for p in (1, 2, 4, 8) if gpus // tp % p == 0]
        for pp in pps:
            dp = gpus // (tp * pp)
            per_step = cfg.batch_size * cfg.seq_len * dp
            accum = cfg.total_batch_tokens // per_step if cfg.total_batch_tokens % per_step == 0 else 0
            for zero in (stages if dp > 1 and pp == 1 else [0]):
                try:   # a pipeline with too few micro-batches keeps fewer in flight; unknown: assume full
                    m = parallel.memory_plan(model, cfg.seq_len, cfg.batch_size, tp, pp, dp, zero, accum or pp)
                except ValueError as e:   # a split this code refuses (the reason, once)
                    skipped += [str(e)] if str(e) not in skipped else []
                    break
                rows.append((dp, tp, pp, zero, accum, m))
    print(f"memory per GPU (GiB; weights fp32 under bf16 autocast, AdamW), micro-batch {cfg.batch_size} x "
          f"{cfg.seq_len} tokens (--batch_size x --seq_len):")
    print(f"| dp x tp x pp | sharding | accum | weights | grads | optimizer | activations | total | "
          f"fits in 90% of {GPUS[gpu][0]} GiB |\n|---|---|---|---|---|---|---|---|---|")
    for dp, tp, pp, zero, accum, m in rows:
        shard = f"ZeRO-{zero}" if zero else "DDP" if dp > 1 else "-"
        print(f"| {dp} x {tp} x {pp} | {shard} | {accum or '-'} | " +
              " | ".join(f"{m[k] / G:,.2f}" for k in ("weights", "grads", "optimizer", "activations", "total")) +
              f" | {'yes' if m['total'] < 0.9 * mem else 'NO'} |")
    print("activations: what the backward keeps, with autocast's bf16 weight copies (an estimate, "
          "parallel.memory_plan says which terms); accum: micro-batches per step, --total_batch_tokens "
          f"{cfg.total_batch_tokens:,} / (batch_size x seq_len x dp), '-' where not a whole number (a run refuses it)")
    for line in skipped:
        print(f"skipped: {line}")
    # the simplest layout that fits: the fewest GPUs splitting the model (TP and PP cost
    # communication inside every step), then the lowest ZeRO stage (3 all-gathers the weights twice)
    fits = sorted((r for r in rows if r[5]["total"] < 0.9 * mem), key=lambda r: (r[1] * r[2], r[3], r[1]))
    if fits:
        dp, tp, pp, zero, _, m = fits[0]
        print(f"pick: dp {dp} x tp {tp} x pp {pp}{f', ZeRO-{zero}' if zero else ''} ({m['total'] / G:,.1f} GiB per "
              "GPU): the fewest GPUs splitting the model, then the lowest ZeRO stage, that fits")
    else:
        print(f"pick: nothing fits in 90% of {GPUS[gpu][0]} GiB: a smaller --batch_size (more accumulation), "
              "more GPUs, or a larger --gpu")


# -----------------------------------------------------------------------------
# Ablations: `python train.py --ablate KEY=V1,V2,... [--ablate KEY2=...] [--key value ...]`
#
# The playbook's method: change one thing, keep everything else (seed, data, budget), and
# compare on the evaluations you trust, with their noise. Every variant is a full run of the
# same base config in OUT/<key=value,...>/, skipped when done and resumed when interrupted;
# OUT/ABLATION.md compares them.

def _values(text):
    """"1,2,4" -> ["1", "2", "4"]; commas inside brackets stay ("[3],[]" -> ["[3]", "[]"])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in out + [cur]]


def _split_ablate_args(argv):
    """-> (out_dir, [(key, [values])], the base config's args)."""
    out, grid, base, i = "runs/ablate", [], [], 0
    while i < len(argv):
        if argv[i] == "--ablate":
            if i + 1 == len(argv) or "=" not in argv[i + 1]:
                raise SystemExit("--ablate KEY=V1,V2,...: a config key and the values to compare")
            key, _, vals = argv[i + 1].partition("=")
            key = key.strip().lstrip("-").replace("-", "_")
            _check_key(key, where="--ablate")
            if key in ("out_dir", "resume", "init", "stage") or key in (k for k, _ in grid):
                raise SystemExit(f"--ablate {key}: not a variable to compare (or given twice)")
            grid.append((key, _values(vals)))
            i += 2
        elif argv[i] == "--out_dir" and i + 1 < len(argv):
            out, i = argv[i + 1], i + 2
        else:
            base.append(argv[i])
            i += 1
    if not grid or len(list(itertools.product(*(v for _, v in grid)))) < 2:
        raise SystemExit("--ablate KEY=V1,V2,...: at least two variants to compare")
    return out, grid, base


def ablate(argv):
    """Every combination of the --ablate values on the base config, one after the other (the
    first is the baseline the others are compared with), then OUT/ABLATION.md."""
    out, grid, base = _split_ablate_args(argv)
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "ablation.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    variants = []
    try:
        for combo in itertools.product(*(values for _, values in grid)):
            name = ",".join(f"{k}={v}" for (k, _), v in zip(grid, combo))
            run_dir = os.path.join(out, name.replace("/", "_").replace(" ", ""))
            cfg, overrides = parse_config(base + [a for (k, _), v in zip(grid, combo) for a in (f"--{k}", v)]
                                          + ["--out_dir", run_dir])
            if {"math_format", "math_digits"} & {k for k, _ in grid} and _builtin_data(cfg.data_dir):
                # the built-in math is written into the shards: each layout its own corpus (and tokenizer)
                cfg.data_dir = f"{cfg.data_dir.rstrip('/')}-{cfg.math_format}{cfg.math_digits}"
            variants.append((name, run_dir, cfg))
            run_unless_done("ablation", name, cfg, overrides, times, times_path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        report = ablation_report(out, grid, variants, times, base)
        print(report)
        with open(os.path.join(out, "ABLATION.md"), "w") as f:
            f.write(report)


def _builtin_data(data_dir):
    """Whether data_dir holds (or will hold, being empty) the built-in corpus, whose math layout
    its manifest records."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        return "math" in json.load(f)


def ablation_report(out, grid, variants, times, base):
    """The comparison: per variant its parameters, the final evaluation (value and 95%
    interval), its median tokens/s and wall time; then each variant against the baseline,
    metric by metric, saying whether the intervals even separate."""
    rows = []
    for name, run_dir, cfg in variants:
        with open(os.path.join(run_dir, "report_card.json")) as f:
            card = [r for r in json.load(f) if r.get("run") == os.path.abspath(run_dir) and r["step"] == cfg.max_steps]
        with open(os.path.join(run_dir, "config.json")) as f:
            mc = json.load(f)["model"]
        with torch.device("meta"):    # a count, no memory
            n_params = M.Model(M.ModelConfig(**mc)).num_params()[0]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            speeds = [json.loads(line)["tokens_per_s"] for line in f if line.strip()]
        rows.append((name, n_params, card[-1]["metrics"] if card else {}, statistics.median(speeds[len(speeds) // 5:])))
    names = [k for k in rows[0][2] if k.endswith(eval.HEADLINE)]
    title = "; ".join(f"{k} = {' / '.join(v)}" for k, v in grid)
    lines = [f"# Ablation: {title}", "",
             f"Base config: `python train.py {' '.join(base)}` (seed, data and steps shared). Final evaluation, "
             f"value (95% interval); tokens/s is the median step's. {time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}, {_machine()}.",
             "", "| variant | params | " + " | ".join(names) + " | tokens/s | minutes |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for name, n_params, metrics, speed in rows:
        cells = [eval.fmt(metrics[n]) if n in metrics else "" for n in names]
        lines.append(f"| {name} | {n_params / 1e6:.2f}M | " + " | ".join(cells) + f" | {speed:,.0f} | "
                     f"{times.get(name, 0) / 60:.1f} |")
    lines += ["", f"Against the baseline ({rows[0][0]}):", ""]
    first = rows[0]
    for name, n_params, metrics, speed in rows[1:]:
        parts = []
        for n in names:
            if n in metrics and n in first[2]:
                a, b = first[2][n], metrics[n]
                apart = b["low"] > a["high"] or b["high"] < a["low"]
                parts.append(f"{n} {b['value'] - a['value']:+.4g} ({'the intervals separate' if apart else 'within the noise'})")
        parts.append(f"tokens/s x{speed / first[3]:.2f}")
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        # the commands, then every key with its default (--key value; --STAGE.key value in the pipeline)
        print(__doc__.strip() + "\n\nconfig keys (--key value), with their defaults:")
        for f in list(fields(TrainConfig)) + [f for f in fields(M.ModelConfig) if f.name not in TRAIN_FIELDS]:
            print(f"  --{f.name} {f.default if f.default is not MISSING else ''}")
        return
    if argv[:1] == ["--plot"]:
        if len(argv) != 2:
            raise SystemExit("usage: python train.py --plot RUN_DIR")
        plot(argv[1])
        return
    if "--plan" in argv:
        plan(argv)
        return
    if "--ablate" in argv:
        ablate(argv)
        return
    if not argv or argv[0] == "--pipeline":
        pipeline(argv[1:])
        return
    cfg, overrides = parse_config(argv)
    try:
        run(cfg, overrides)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
