"""Tests for train.py's pieces, in process: the command line and TOML config, AdamW's
parameter groups, the learning-rate schedules, the monitor's detectors, alerts, checkpoints
(exact optimizer and RNG state, no pickle, atomic), a short run's metrics and checkpoints,
preflight failures, the NaN skip and rollback path, set-up errors, and plot().

End-to-end subprocess runs (kill -9 and resume, SIGTERM, torchrun) live in test_train_runs.py."""

import builtins
import copy
import json
import math
import os
import random
import re
import signal
import socket
from dataclasses import asdict

import pytest
import torch

import arithmetic
import data
import dpo
import eval as eval_py
import model as M
import train

SMALL = dict(vocab_size=100, n_layer=2, dim=32, n_head=2, n_kv_head=1, mlp_dim=64, max_seq_len=32)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return M.Model(M.ModelConfig(**{**SMALL, **kw}))


def cfg_of(*argv):
    return train.parse_config(list(argv))[0]


# -----------------------------------------------------------------------------
# 1. parse_config

def test_parse_config_flags_types_and_model_fields():
    """--key value, --key=value, dashes in keys, bare booleans, int/float/bool/str types, and
    model fields (JSON values: numbers, lists, dicts, booleans, plain strings) as overrides."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    cfg, ov = train.parse_config([
        "--max_steps", "7", "--lr=0.01", "--resume", "--out_dir", "runs/x", "--compile", "false",
        "--warmup-steps", "5", "--decay_embeddings", "yes", "--n_layer", "3", "--nope_layers", "[1, 2]",
        "--rope_scaling", json.dumps(yarn), "--qk_norm", "true", "--attn_impl", "eager", "--rope_theta", "1e5"])
    assert cfg.max_steps == 7 and type(cfg.max_steps) is int
    assert cfg.lr == 0.01 and type(cfg.lr) is float
    assert cfg.resume is True and cfg.compile is False and cfg.decay_embeddings is True
    assert cfg.out_dir == "runs/x" and cfg.warmup_steps == 5
    assert cfg.seq_len == train.TrainConfig.seq_len          # untouched defaults stay
    assert ov == {"n_layer": 3, "nope_layers": [1, 2], "rope_scaling": yarn, "qk_norm": True,
                  "attn_impl": "eager", "rope_theta": 1e5}
    assert train.parse_config(["--resume", "no"])[0].resume is False
    assert train.parse_config([]) == (train.TrainConfig(), {})


def test_parse_config_equals_form_keeps_dashes_in_the_value():
    """--out_dir=runs/my-run keeps the value as given; --lr=-1e-3 is a negative number."""
    assert cfg_of("--out_dir=runs/my-run").out_dir == "runs/my-run"
    assert cfg_of("--lr=-1e-3").lr == -1e-3


def test_parse_config_toml_file_with_model_table_and_flags_on_top(tmp_path):
    """--config FILE.toml: top-level train keys and a [model] table; flags override the file,
    whether they come before or after --config."""
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 11\nlr = 0.002\nout_dir = "from_toml"\nschedule = "cosine"\n'
                    '[model]\nn_layer = 3\ndim = 128\nnope_layers = [1]\n')
    cfg, ov = train.parse_config(["--config", str(path), "--lr", "0.005", "--dim", "64"])
    assert (cfg.max_steps, cfg.lr, cfg.out_dir, cfg.schedule) == (11, 0.005, "from_toml", "cosine")
    assert ov == {"n_layer": 3, "dim": 64, "nope_layers": [1]}
    cfg, ov = train.parse_config(["--lr", "0.005", "--config", str(path)])
    assert cfg.lr == 0.005 and ov["dim"] == 128
    # an unknown key in the file names the file; a broken file is a clean exit
    path.write_text("max_step = 3\n")
    with pytest.raises(SystemExit, match="max_step.*run.toml"):
        train.parse_config(["--config", str(path)])
    path.write_text("max_steps = = 3\n")
    with pytest.raises(SystemExit, match="run.toml"):
        train.parse_config(["--config", str(path)])


def test_parse_config_errors_are_clean_exits():
    """An unknown key lists the valid keys; a bad value, --stage, --schedule or a positional
    argument exits with a message naming it."""
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--learning_rate", "1e-3"])
    msg = str(e.value)
    assert "learning_rate" in msg and "lr" in msg.split("Training keys:")[1] and "n_layer" in msg.split("Model keys:")[1]
    with pytest.raises(SystemExit, match="--max_steps 'abc'"):
        train.parse_config(["--max_steps", "abc"])
    with pytest.raises(SystemExit, match="--lr"):
        train.parse_config(["--lr", "fast"])
    with pytest.raises(SystemExit, match="--resume 'maybe'"):
        train.parse_config(["--resume", "maybe"])
    with pytest.raises(SystemExit, match="--stage 'finetune'.*pretrain"):
        train.parse_config(["--stage", "finetune"])
    with pytest.raises(SystemExit, match="--schedule 'linear'.*wsd or cosine"):
        train.parse_config(["--schedule", "linear"])
    with pytest.raises(SystemExit, match="unexpected argument 'runs/x'"):
        train.parse_config(["runs/x"])


def test_parse_config_bare_model_boolean_flag():
    """A bare boolean model field means true, like a bare training flag."""
    cfg, ov = train.parse_config(["--qk_norm", "--attn_bias", "--resume"])
    assert ov == {"qk_norm": True, "attn_bias": True} and cfg.resume is True


def test_parse_config_bare_flag_only_for_booleans():
    """`--init` or `--out_dir` with no value is an error, not the path 'true'."""
    with pytest.raises(SystemExit, match="--init"):
        train.parse_config(["--init", "--resume"])


def test_parse_config_toml_values_are_type_checked(tmp_path):
    """max_steps = "ten" in the TOML file is a clean exit naming the key, as on the command line."""
    path = tmp_path / "run.toml"
    path.write_text('max_steps = "ten"\n')
    with pytest.raises(SystemExit, match="max_steps"):
        train.parse_config(["--config", str(path)])


# -----------------------------------------------------------------------------
# 2. param_groups

@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, qk_norm=True, attn_bias=True),
                                dict(positions="learned")], ids=["tied", "untied-qknorm-bias", "learned-pos"])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_param_groups_decay_only_matrices(kw, decay_embeddings):
    """Decay: exactly the 2-D block matrices (+ an untied head; + the embeddings when asked);
    no decay: norms, biases, embeddings. Every parameter appears exactly once."""
    m = small_model(**kw)
    groups = train.param_groups(m, 0.1, decay_embeddings=decay_embeddings)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    name = {id(p): n for n, p in m.named_parameters()}
    decay = {name[id(p)] for p in groups[0]["params"]}
    no_decay = {name[id(p)] for p in groups[1]["params"]}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    embeddings = {"embed_tokens.weight"} | ({"embed_positions.weight"} if kw.get("positions") == "learned" else set())
    expect = {n for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert len(expect) == 2 * 7
    if not kw.get("tie_embeddings", True):
        expect.add("lm_head.weight")
    if decay_embeddings:
        expect |= embeddings
    assert decay == expect
    assert no_decay == {n for n, _ in m.named_parameters()} - expect
    assert {"norm.weight", "layers.1.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"} <= no_decay
    if kw.get("attn_bias"):
        assert {"layers.0.self_attn.q_proj.bias", "layers.1.self_attn.v_proj.bias",
                "layers.0.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"} <= no_decay
    assert embeddings <= (decay if decay_embeddings else no_decay)


# -----------------------------------------------------------------------------
# 3. lr_at

def test_lr_warmup_then_wsd():
    """Warmup rises linearly from lr/warmup to lr; WSD stays at lr until max_steps - decay_frac *
    max_steps, then falls linearly; the last step's lr is small but above the floor."""
    cfg = cfg_of("--lr", "1e-3", "--warmup_steps", "10", "--max_steps", "100", "--decay_frac", "0.2",
                 "--min_lr_ratio", "0.1")
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10:81] == [1e-3] * 71                     # stable (step 80 opens the decay at lr)
    floor = 1e-4
    assert lrs[80:] == pytest.approx([floor + (1e-3 - floor) * (100 - s) / 20 for s in range(80, 100)])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # strictly falling, linearly
    assert floor < lrs[-1] < floor + 0.1 * (1e-3 - floor)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    cfg.min_lr_ratio = 0.0
    assert 0 < train.lr_at(99, cfg) == pytest.approx(1e-3 / 20)


def test_lr_cosine():
    """Cosine starts at lr right after warmup, falls monotonically, halves at mid-way and ends
    near lr * min_lr_ratio, never below it."""
    for ratio in (0.0, 0.1):
        cfg = cfg_of("--lr", "2e-3", "--warmup_steps", "10", "--max_steps", "110", "--schedule", "cosine",
                     "--min_lr_ratio", str(ratio))
        lrs = [train.lr_at(s, cfg) for s in range(110)]
        floor = 2e-3 * ratio
        assert lrs[9] == lrs[10] == pytest.approx(2e-3)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[60] == pytest.approx(floor + (2e-3 - floor) / 2)
        assert floor <= lrs[-1] < floor + 0.001 * 2e-3
        assert min(lrs) >= floor


# -----------------------------------------------------------------------------
# 4. Monitor

def run_monitor(mon, series, start=1):
    """Feed (loss, grad_norm, tokens_per_s) rows; returns [(step, kind)] of the alerts."""
    out = []
    for i, (loss, gn, tps) in enumerate(series):
        out += [(start + i, kind) for kind, _ in mon.update(start + i, loss, gn, tps)]
    return out


def smooth(n=300, seed=0):
    rng = random.Random(seed)
    return [(1 + 4 * math.exp(-i / 80) + rng.gauss(0, 0.02), 1 + rng.gauss(0, 0.03), 1000 + rng.gauss(0, 20))
            for i in range(n)]


def test_monitor_quiet_on_a_healthy_run():
    """A smooth, noisy, decreasing loss with steady grad norm and throughput raises nothing."""
    assert run_monitor(train.Monitor(stall_steps=10_000), smooth()) == []


def test_monitor_detects_spikes_and_throughput_drops():
    """A single 3x loss spike, a 10x grad-norm spike and throughput at 30% each raise exactly
    one alert of their kind at their step."""
    s = smooth()
    s[150] = (3 * s[150][0], s[150][1], s[150][2])
    s[200] = (s[200][0], 10 * s[200][1], s[200][2])
    s[250] = (s[250][0], s[250][1], 0.3 * s[250][2])
    assert run_monitor(train.Monitor(stall_steps=10_000), s) == [
        (151, "loss_spike"), (201, "grad_norm_spike"), (251, "throughput_drop")]


def test_monitor_stall_alerts_once_per_stall_steps():
    """A flat loss raises loss_stalled every stall_steps steps, no more."""
    alerts = run_monitor(train.Monitor(stall_steps=50), [(3.0, 1.0, 1000.0)] * 300)
    assert alerts == [(51, "loss_stalled"), (101, "loss_stalled"), (151, "loss_stalled"), (201, "loss_stalled"),
                      (251, "loss_stalled")]


def test_monitor_nonfinite_and_history_untouched():
    """NaN or Inf returns only 'nonfinite' and leaves the history as it was."""
    mon = train.Monitor()
    run_monitor(mon, smooth(20))
    before = mon.state_dict()
    assert [k for k, _ in mon.update(21, float("nan"), 1.0, 1000.0)] == ["nonfinite"]
    assert [k for k, _ in mon.update(22, 2.0, float("inf"), 1000.0)] == ["nonfinite"]
    assert mon.state_dict() == before


def future():
    s = smooth(200, seed=1)
    s[40] = (5 * s[40][0], s[40][1], s[40][2])
    s[90] = (s[90][0], 8 * s[90][1], 0.2 * s[90][2])
    return s + [(s[-1][0], 1.0, 1000.0)] * 150          # then a stall


def test_monitor_state_round_trip():
    """state_dict -> JSON -> load_state_dict into a fresh Monitor gives the same future alerts."""
    a = train.Monitor(stall_steps=60)
    run_monitor(a, smooth(100))
    b = train.Monitor(stall_steps=60)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    got_a, got_b = run_monitor(a, future(), start=101), run_monitor(b, future(), start=101)
    assert got_a == got_b
    assert {k for _, k in got_a} == {"loss_spike", "grad_norm_spike", "throughput_drop", "loss_stalled"}


def test_monitor_load_state_replaces_history():
    """Loading a state into a Monitor that already has history gives exactly that state."""
    a = train.Monitor()
    run_monitor(a, smooth(30))
    saved = json.loads(json.dumps(a.state_dict()))
    run_monitor(a, [(9.0, 9.0, 9.0)] * 5, start=31)      # the run goes on, then rolls back
    a.load_state_dict(saved)
    assert a.state_dict() == saved


# -----------------------------------------------------------------------------
# 5. alert()

def test_alert_writes_jsonl_and_pipes_json_to_the_command(tmp_path, capsys):
    """Each alert appends a JSON line (kind, step, message, time) and feeds the same JSON to
    alert_cmd on stdin; it is printed to stderr too."""
    got = tmp_path / "got.json"
    train.alert(str(tmp_path), f"cat > {got}", 7, "loss_spike", "loss 9 is 12 sigma above")
    train.alert(str(tmp_path), "", 8, "nonfinite", "loss nan")
    lines = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"], r["message"]) for r in lines] == [
        (7, "loss_spike", "loss 9 is 12 sigma above"), (8, "nonfinite", "loss nan")]
    assert all(isinstance(r["time"], float) for r in lines)
    assert json.loads(got.read_text()) == lines[0]
    assert "ALERT step 7 loss_spike" in capsys.readouterr().err


def test_alert_command_failure_does_not_raise(tmp_path, capsys):
    """A failing or missing alert_cmd is reported on stderr; the alert is still written."""
    train.alert(str(tmp_path), "exit 3", 1, "x", "a")
    train.alert(str(tmp_path), "/nonexistent/command/xyz", 2, "y", "b")
    assert len((tmp_path / "alerts.jsonl").read_text().splitlines()) == 2
    assert capsys.readouterr().err.count("alert_cmd failed") == 2


# -----------------------------------------------------------------------------
# 6. Checkpoints

def adamw(m):
    return torch.optim.AdamW(train.param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def steps(m, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=g)
        _, loss, _ = m(x, labels=x.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def as_tuples(group):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k != "params"}


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip_is_exact(tmp_path, tie):
    """Weights, AdamW moments and step counts, group hyperparameters and RNG states come back
    exactly, so the next step matches; only .safetensors and .json files, no temporary left."""
    m = small_model(0, tie_embeddings=tie)
    opt = adamw(m)
    steps(m, opt, 3, seed=1)
    opt.param_groups[0]["lr"] = 7e-4                     # a scheduled lr is saved too
    path = tmp_path / "ckpt" / "step_000003"
    train.save_checkpoint(str(path), m, opt, {"step": 3, "note": "hi"})

    m2 = small_model(1, tie_embeddings=tie)
    opt2 = adamw(m2)
    assert not torch.equal(m2.layers[0].mlp.up_proj.weight, m.layers[0].mlp.up_proj.weight)
    state = train.load_checkpoint(str(path), m2, opt2)
    assert state["step"] == 3 and state["note"] == "hi" and M.ModelConfig(**state["model_config"]) == m.config
    for (n1, a), (n2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert (m2.lm_head.weight is m2.embed_tokens.weight) == tie
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert set(s1) == set(s2) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [as_tuples(g) for g in opt2.param_groups] == [as_tuples(g) for g in opt.param_groups]
    assert opt2.param_groups[0]["lr"] == 7e-4
    # the next steps agree bit for bit
    steps(m, opt, 2, seed=9)
    steps(m2, opt2, 2, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    # no pickle, no temporary directory; saving over the same path works
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                        "trainer.json"]
    train.save_checkpoint(str(path), m, opt, {"step": 5})
    assert os.listdir(tmp_path / "ckpt") == ["step_000003"]
    assert train.load_checkpoint(str(path), m2)["step"] == 5


def test_failed_save_leaves_the_old_checkpoint_and_no_temporary(tmp_path):
    """A save that fails while writing (here: trainer state JSON cannot encode) raises, removes
    its temporary directory and leaves the checkpoint already at that path untouched."""
    m = small_model()
    path = tmp_path / "ckpt" / "step_000001"
    train.save_checkpoint(str(path), m, None, {"step": 1})
    with pytest.raises(TypeError):
        train.save_checkpoint(str(path), m, None, {"step": 2, "bad": object()})
    assert os.listdir(tmp_path / "ckpt") == ["step_000001"]
    assert train.load_checkpoint(str(path), small_model(1))["step"] == 1


def test_a_crash_between_the_overwrites_renames_loses_no_checkpoint(tmp_path, monkeypatch):
    """Overwriting step_N (a step redone after a rollback) dies between setting the old copy
    aside and renaming the new one in (os.replace raises on its second call): the next start
    (recover_checkpoints, which Trainer runs first, and every save) puts the complete old copy
    back; half-written temporaries go; nothing is left hidden. (The old code's next save
    deleted every hidden directory, both copies of step_N among them.)"""
    m = small_model()
    path = tmp_path / "ckpt" / "step_000004"
    train.save_checkpoint(str(path), m, None, {"step": 4, "which": "old"})
    calls, replace = [], os.replace

    def dies_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("killed")
        return replace(a, b)
    monkeypatch.setattr(os, "replace", dies_second)
    with pytest.raises(OSError, match="killed"):
        train.save_checkpoint(str(path), small_model(1), None, {"step": 4, "which": "new"})
    monkeypatch.setattr(os, "replace", replace)
    assert train.checkpoints(str(tmp_path)) == []          # the gap the crash left
    (tmp_path / "ckpt" / ".step_000003.abc").mkdir()        # a save killed earlier, half-written
    train.recover_checkpoints(str(tmp_path))
    assert os.listdir(tmp_path / "ckpt") == ["step_000004"]
    m2 = small_model(2)
    assert train.load_checkpoint(str(path), m2)["which"] == "old"
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_drops_the_records_past_its_checkpoint(tmp_path):
    """A run resumed from step 2 logs steps 3.. again: metrics.jsonl keeps steps 1-2 once,
    and a last line a kill cut in half goes."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo')
    train.drop_records_after(str(path), 2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_checkpoint_restores_rng_states(tmp_path):
    """load_checkpoint with an optimizer puts torch's and Python's RNGs back where they were."""
    m = small_model()
    opt = adamw(m)
    torch.manual_seed(3)
    random.seed(3)
    train.save_checkpoint(str(tmp_path / "c"), m, opt, {"step": 0})
    expect = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    train.load_checkpoint(str(tmp_path / "c"), m, opt)
    got = (torch.rand(5), random.random())
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1]


def test_checkpoint_mismatch_raises(tmp_path):
    """Weights for another shape of model raise ValueError naming the keys; optimizer state
    for another set of parameters too."""
    m = small_model()
    opt = adamw(m)
    steps(m, opt, 1, seed=0)
    train.save_checkpoint(str(tmp_path / "c"), m, opt, {"step": 1})
    with pytest.raises(ValueError, match=r"missing \['layers\.2\."):
        train.load_checkpoint(str(tmp_path / "c"), small_model(n_layer=3))
    with pytest.raises(ValueError, match=r"missing \['lm_head\.weight'\]"):
        train.load_checkpoint(str(tmp_path / "c"), small_model(tie_embeddings=False))
    m2 = small_model()
    with pytest.raises(ValueError, match="different set of parameters"):
        train.load_checkpoint(str(tmp_path / "c"), m2, torch.optim.AdamW(list(m2.parameters())[:3]))


def test_checkpoints_lists_steps_oldest_first(tmp_path):
    """checkpoints(run_dir): step_* directories in step order, temporaries ('.step_...') left out."""
    assert train.checkpoints(str(tmp_path)) == []
    for n in ("step_000010", "step_000002", ".step_000011.abc", "step_000001", "notes"):
        os.makedirs(tmp_path / "ckpt" / n)
    assert [os.path.basename(p) for p in train.checkpoints(str(tmp_path))] == [
        "step_000001", "step_000002", "step_000010"]


def test_checkpoints_order_past_a_million_steps(tmp_path):
    """Step 1,000,000 comes after step 999,999."""
    for n in ("step_999999", "step_1000000"):
        os.makedirs(tmp_path / "ckpt" / n)
    assert os.path.basename(train.checkpoints(str(tmp_path))[-1]) == "step_1000000"


# -----------------------------------------------------------------------------
# In-process Trainer runs

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare(out=str(d), tokenizer=data.ByteTokenizer(), max_docs=60, math=arithmetic.corpus(), verbose=False)
    return str(d)


@pytest.fixture(autouse=True)
def _restore_signals():
    """Trainer.train() installs SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def trainer(data_dir, out_dir, *extra):
    cfg, ov = train.parse_config([
        "--data_dir", data_dir, "--tokenizer", "bytes", "--out_dir", str(out_dir), "--max_steps", "6",
        "--seq_len", "64", "--batch_size", "4", "--total_batch_tokens", "512", "--n_layer", "2",
        "--nope_layers", "[1]", "--warmup_steps", "2", "--eval_every", "100", "--sample_tokens", "0", "--eval_tasks", "", *extra])
    return train.Trainer(cfg, ov)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_run_writes_metrics_config_and_checkpoints(data_dir, tmp_path, capsys):
    """A 6-step run: one metrics line per step with the documented keys and per-source losses,
    the scheduled lr, a falling loss, config.json, the printed config, and only keep_last
    checkpoints (the last one holds step 6 and the loader's position)."""
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--ckpt_every", "2", "--keep_last", "2")
    assert t.accum == 2
    assert t.train() == 6
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb", "mfu", "tokens"} <= set(r)
        assert r["lr"] == train.lr_at(r["step"] - 1, t.cfg) and r["tokens"] == 512 * r["step"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss", "grad_norm", "tokens_per_s", "peak_memory_gb"))
        per_source = {k[5:] for k in r if k.startswith("loss/")}
        assert per_source and per_source <= set(t.stage.names)
    assert set().union(*({k[5:] for k in r if k.startswith("loss/")} for r in rows)) == {"code", "prose", "math"}
    assert "val_loss" in rows[-1] and "val_loss" not in rows[0]      # evaluated at the last step
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"] == asdict(t.cfg) and saved["model"]["n_layer"] == 2
    assert [os.path.basename(p) for p in train.checkpoints(str(out))] == ["step_000004", "step_000006"]
    state = json.loads((out / "ckpt" / "step_000006" / "trainer.json").read_text())
    assert state["step"] == 6 and state["stage"]["batches"] == 12 and state["config"]["max_steps"] == 6
    assert not [n for n in os.listdir(out / "ckpt") if n.startswith(".")]
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("config: "))
    assert json.loads(line[len("config: "):]) == asdict(t.cfg)
    assert "preflight checklist:" in printed and "step     6/6 loss" in printed


def test_preflight_passes_on_a_healthy_setup_and_leaves_no_trace(data_dir, tmp_path):
    """preflight() on a fresh run: every item present, none FAIL, the loader still at its first
    batch, no gradients left, no temporary checkpoint left in out_dir."""
    t = trainer(data_dir, tmp_path / "run")
    results = train.preflight(t)
    assert [item for _, item, _ in results] == ["initial loss", "batch", "forward/backward finite",
                                                "checkpoint round trip", "evaluation", "throughput", "memory",
                                                "disk", "ranks"]
    assert [s for s, _, _ in results[:6]] == ["PASS"] * 6 and "FAIL" not in {s for s, _, _ in results}
    assert t.stage.loader.batches == 0
    assert all(p.grad is None for p in t.raw_model.parameters())
    assert os.listdir(tmp_path / "run") == []


def test_preflight_fails_when_every_label_is_masked(data_dir, tmp_path, monkeypatch, capsys):
    """Batches whose labels are all -100 stop the run before the first step: the batch check
    (and the initial loss) FAIL."""
    real = train.PretrainStage.next_batch

    def masked(self):
        b = real(self)
        return {**b, "labels": torch.full_like(b["labels"], -100)}

    monkeypatch.setattr(train.PretrainStage, "next_batch", masked)
    t = trainer(data_dir, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        t.train()
    assert str(e.value).startswith("preflight FAILED:") and "batch" in str(e.value)
    assert "every label is -100" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and train.checkpoints(str(tmp_path / "run")) == []


def test_preflight_fails_on_a_wrong_initial_loss(data_dir, tmp_path, capsys):
    """--init_std 1.0 gives an initial loss far from ln(padded vocab): FAIL on 'initial loss' only."""
    t = trainer(data_dir, tmp_path / "run", "--init_std", "1.0")
    with pytest.raises(SystemExit, match=r"^preflight FAILED: initial loss \("):
        t.train()
    loss = float(re.search(r"FAIL initial loss: ([\d.]+)", capsys.readouterr().out).group(1))
    assert abs(loss - math.log(t.raw_model.config.padded_vocab)) > 1.5 and t.raw_model.config.padded_vocab == 384


TASKS = ("--eval_tasks", "builtin", "--eval_examples", "4")


def test_preflight_validates_the_evaluation_pipeline(data_dir, tmp_path):
    """With tasks, the preflight runs eval.validate_pipeline on them: PASS on the built-in tasks."""
    t = trainer(data_dir, tmp_path / "run", *TASKS)
    assert set(t.tasks) == {"arithmetic", "docstring", "next_line"}
    assert all(len(ex) == 4 for _, ex in t.tasks.values())
    results = {item: (status, detail) for status, item, detail in train.preflight(t)}
    assert results["evaluation pipeline"][0] == "PASS", results["evaluation pipeline"]
    assert "docstring/acc_char" in results["evaluation"][1] and "val_bpb" in results["evaluation"][1]


def test_preflight_fails_when_the_evaluation_loses_the_answers(data_dir, tmp_path, monkeypatch, capsys):
    """A scorer that hands back each example's scores in the wrong order (a classic batching
    bug) fails the oracle check, and the preflight stops the run before its first step."""
    real = eval_py.score

    def rotated(model, tok, pairs, batch_size=16):
        logps, ntoks, truncated = real(model, tok, pairs, batch_size)
        return logps[1:] + logps[:1], ntoks[1:] + ntoks[:1], truncated

    monkeypatch.setattr(eval_py, "score", rotated)
    t = trainer(data_dir, tmp_path / "run", *TASKS)
    with pytest.raises(SystemExit, match=r"^preflight FAILED: evaluation pipeline"):
        t.train()
    assert "oracle" in capsys.readouterr().out


def test_report_card_grows_a_row_per_stage(data_dir, tmp_path, capsys):
    """Pretraining writes its row (val loss, bits per byte and task metrics with intervals) to
    run/report_card.json and .md, and eval.json into its last checkpoint; a mid-training run
    from that checkpoint starts from the card and adds its "(start)" row (the model as
    pretrained, at the new sequence length) and its own. Task metrics reach
    metrics.jsonl at each evaluation."""
    first = tmp_path / "pre"
    assert trainer(data_dir, first, *TASKS, "--preflight", "false").train() == 6
    rows = read_jsonl(first / "metrics.jsonl")
    assert {"val_bpb", "docstring/acc_char", "arithmetic/exact_match", "next_line/acc"} <= set(rows[-1])
    card = json.loads((first / "report_card.json").read_text())
    assert [(r["stage"], r["step"]) for r in card] == [("pretrain", 6)]
    m = card[0]["metrics"]["docstring/acc_char"]
    assert m["n"] == 4 and m["low"] <= m["value"] <= m["high"]
    assert m["value"] == rows[-1]["docstring/acc_char"]
    ckpt = train.checkpoints(str(first))[-1]
    assert json.loads(open(os.path.join(ckpt, "eval.json")).read())["metrics"] == card[0]["metrics"]
    assert "| pretrain | 6 |" in (first / "report_card.md").read_text()
    cfg, ov = train.parse_config(["--stage", "midtrain", "--init", ckpt, "--data_dir", data_dir, "--tokenizer", "bytes",
                                  "--out_dir", str(tmp_path / "mid"), "--max_steps", "2", "--seq_len", "64",
                                  "--batch_size", "4", "--total_batch_tokens", "256", "--warmup_steps", "1",
                                  "--sample_tokens", "0", "--preflight", "false", *TASKS])
    assert train.Trainer(cfg, ov).train() == 2
    card = json.loads((tmp_path / "mid" / "report_card.json").read_text())
    assert [(r["stage"], r["step"]) for r in card] == [("pretrain", 6), ("midtrain (start)", 0), ("midtrain", 2)]
    out = capsys.readouterr().out
    assert "| midtrain | 2 |" in out and "| pretrain | 6 |" in out


def test_ignore_preflight_runs_anyway(data_dir, tmp_path, capsys):
    """--ignore_preflight: the same FAIL is printed but the run goes on."""
    t = trainer(data_dir, tmp_path / "run", "--init_std", "1.0", "--ignore_preflight", "--max_steps", "2")
    assert t.train() == 2
    assert "FAIL initial loss" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_train_restores_signal_handlers(data_dir, tmp_path):
    """After train() returns, SIGINT and SIGTERM are handled as before it started."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t = trainer(data_dir, tmp_path / "run", "--preflight", "false", "--max_steps", "1")
    assert t.train() == 1
    assert {s: signal.getsignal(s) for s in before} == before


def test_preflight_leaves_the_rng_where_it_was(data_dir, tmp_path):
    """The loop starts with the same torch and Python RNG states with or without preflight
    (preflight builds a model, which draws random numbers): a resumed run stays exact."""
    states = {}
    for pf in ("true", "false"):
        t = trainer(data_dir, tmp_path / pf, "--preflight", pf, "--max_steps", "1")
        next_batch = t.stage.next_batch

        def record(pf=pf, next_batch=next_batch):
            states[pf] = (torch.get_rng_state(), random.getstate())   # the last call is the loop's
            return next_batch()

        t.stage.next_batch = record
        t.train()
    assert torch.equal(states["true"][0], states["false"][0]) and states["true"][1] == states["false"][1]


def test_stop_flag_saves_and_returns(data_dir, tmp_path):
    """A stop signal noticed during step 3 (what the SIGTERM handler sets) ends the run after
    that step with a checkpoint of it."""
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--preflight", "false")
    next_batch = t.stage.next_batch

    def signalled():
        b = next_batch()
        if t.stage.loader.batches == 5:
            t.stop_signal = signal.SIGTERM
        return b

    t.stage.next_batch = signalled
    assert t.train() == 3
    assert [os.path.basename(p) for p in train.checkpoints(str(out))] == ["step_000000", "step_000003"]
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


def instrument(t, nan_batches, snap_at):
    """Make the loss NaN on the batches the loader numbered in nan_batches (a step fetches all
    its micro-batches before the first forward, so a batch is known by what the loader's
    counter read when it was fetched); record the counter after every training batch and the
    weights when it reaches a batch in snap_at."""
    seen, snaps, number = [], {}, {}
    next_batch, loss = t.stage.next_batch, t.stage.loss

    def patched_next():
        b = next_batch()
        n = t.stage.loader.batches
        seen.append(n)
        number[id(b["input_ids"])] = n       # the same tensor reaches the loss (.to(cpu) is a no-op)
        if len(seen) > 60:                   # a rollback that replays the bad batches would loop forever
            raise RuntimeError(f"runaway run: batches read {seen}")
        if n in snap_at:
            snaps[n] = {k: v.detach().clone() for k, v in t.raw_model.state_dict().items()}
        return b

    def patched_loss(model, batch):
        value, aux = loss(model, batch)
        return (value * float("nan") if number[id(batch["input_ids"])] in nan_batches else value), aux

    t.stage.next_batch, t.stage.loss = patched_next, patched_loss
    return seen, snaps


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_is_skipped(data_dir, tmp_path):
    """A NaN loss on step 3 leaves the weights and AdamW untouched and writes a 'nonfinite'
    alert; the run finishes."""
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--preflight", "false")
    seen, snaps = instrument(t, nan_batches={5}, snap_at={3, 5, 7})   # step k reads batches 2k-1, 2k
    assert t.train() == 6
    assert not same(snaps[3], snaps[5])          # step 2 did change the weights
    assert same(snaps[5], snaps[7])              # step 3 did not
    assert seen == list(range(1, 13))
    assert all(int(s["step"]) == 5 for s in t.optimizer.state.values())   # 6 steps, one skipped
    alerts = read_jsonl(out / "alerts.jsonl")
    assert [(a["step"], a["kind"]) for a in alerts] == [(3, "nonfinite")]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[2]["loss"] is None   # NaN is written as null


def test_nan_patience_rolls_back_and_skips_the_batches(data_dir, tmp_path):
    """nan_patience=2 and NaN on steps 5 and 6: a 'rollback' alert, the weights go back to the
    step-3 checkpoint, the loader does not rewind (batches 9-12 are skipped, not replayed), and
    the run still ends at max_steps."""
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--preflight", "false", "--nan_patience", "2", "--ckpt_every", "3",
                "--keep_last", "10")
    seen, snaps = instrument(t, nan_batches={9, 10, 11, 12}, snap_at={9, 13})
    assert t.train() == 6
    ref = M.Model(t.raw_model.config)
    state = train.load_checkpoint(str(out / "ckpt" / "step_000003"), ref)
    assert state["step"] == 3 and state["stage"]["batches"] == 6
    assert same(snaps[13], ref.state_dict())     # right after the rollback: the checkpoint's weights
    assert not same(snaps[9], snaps[13])         # which differ from where the run was (after step 4)
    assert seen == list(range(1, 19))            # never rewound: 6 + 2 NaN + 3 more steps, 2 batches each
    assert all(int(s["step"]) == 6 for s in t.optimizer.state.values())  # 3 restored + 3 after the rollback
    alerts = [(a["step"], a["kind"]) for a in read_jsonl(out / "alerts.jsonl")]
    assert alerts == [(5, "nonfinite"), (6, "nonfinite"), (6, "rollback")]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 4, 5, 6]
    last = json.loads((out / "ckpt" / "step_000006" / "trainer.json").read_text())
    assert last["step"] == 6 and last["stage"]["batches"] == 18


@pytest.mark.parametrize("extra,message", [
    (["--stage", "rl"], "--stage rl starts from a trained (SFT) model: give --init"),
    (["--stage", "midtrain"], "--stage midtrain continues a trained model: give --init"),
    (["--stage", "sft"], "--stage sft continues a trained model: give --init"),
    (["--eval_tasks", "chat"], "--eval_tasks chat: held-out chat questions come with --stage sft"),
    (["--max_seq_len", "32"], "--seq_len 64 exceeds the model's max_seq_len 32"),
    (["--total_batch_tokens", "500"], "--total_batch_tokens 500 is not a multiple of batch_size x seq_len"),
])
def test_setup_errors_are_clean_exits(data_dir, tmp_path, extra, message):
    """RL, mid-training and SFT without --init, chat tasks without a chat stage, a too long
    seq_len and a global batch that is not a multiple of the micro-batch exit with a message
    saying so."""
    with pytest.raises(SystemExit) as e:
        trainer(data_dir, tmp_path / "run", *extra)
    assert message in str(e.value)


# -----------------------------------------------------------------------------
# 10b. The SFT stage (sft.py driven by train.py)

@pytest.fixture(scope="module")
def sft_init(tmp_path_factory, small_tokenizer):
    """(checkpoint, tokenizer file): a small random model saved as train.py saves one, by a
    run whose config names the 512-token tokenizer (it has the chat template's tokens)."""
    d = tmp_path_factory.mktemp("sft_init")
    small_tokenizer.save(str(d / "tok"))
    torch.manual_seed(0)
    net = M.Model(M.preset("tiny", vocab_size=small_tokenizer.vocab_size, n_layer=2, dim=64, n_head=2, n_kv_head=1,
                           mlp_dim=128, nope_layers=(), max_seq_len=256))
    train.save_checkpoint(str(d / "ckpt"), net, None, {"step": 0, "config": {"tokenizer": str(d / "tok.json")}})
    return str(d / "ckpt"), str(d / "tok.json")


def sft_trainer(init, out, *extra):
    cfg, ov = train.parse_config([
        "--stage", "sft", "--init", init, "--out_dir", str(out), "--seq_len", "256", "--batch_size", "4",
        "--total_batch_tokens", "1024", "--max_steps", "8", "--lr", "3e-3", "--warmup_steps", "2",
        "--eval_tasks", "", "--eval_batches", "2", "--sample_tokens", "0", *extra])
    return train.Trainer(cfg, ov)


def test_sft_stage_defaults_and_flags():
    """--stage sft brings SFT's schedule (a lower lr than pretraining's, cosine, short warmup,
    its chat questions evaluated); anything given on the command line wins; bad values of its
    own flags are clean exits."""
    cfg = cfg_of("--stage", "sft")
    assert (cfg.lr, cfg.schedule, cfg.eval_tasks) == (1e-3, "cosine", "builtin,chat")
    assert cfg.lr < train.TrainConfig.lr
    assert cfg_of("--stage", "sft", "--lr", "2e-3", "--eval_tasks", "").lr == 2e-3
    assert cfg_of("--stage", "sft", "--eval_tasks", "").eval_tasks == ""
    assert cfg_of("--stage", "midtrain").lr == train.TrainConfig.lr
    for bad in (["--train_on", "user"], ["--overlong", "drop"]):
        with pytest.raises(SystemExit, match="--train_on"):
            cfg_of("--stage", "sft", *bad)


def test_sft_lowers_the_heldout_assistant_loss(sft_init, tmp_path, capsys):
    """Eight SFT steps on the built-in chat data, from a checkpoint whose run names its
    tokenizer: the held-out assistant-token loss (per kind) falls, measured at the start and at
    the end; the report card holds both rows with the chat questions' exact match and template
    adherence; the batch passes preflight although most labels are masked."""
    ckpt, tok_file = sft_init
    t = sft_trainer(ckpt, tmp_path / "sft", "--eval_tasks", "chat", "--eval_examples", "4")
    assert t.cfg.tokenizer == tok_file                      # the model's own tokenizer, from its run
    assert t.train() == 8
    card = json.loads((tmp_path / "sft" / "report_card.json").read_text())
    assert [(r["stage"], r["step"]) for r in card] == [("sft (start)", 0), ("sft", 8)]
    before, after = card[0]["metrics"], card[1]["metrics"]
    # (a docstring conversation per function among 12,000 short sums: docstrings are a few
    # percent of the trained tokens, and their loss falls the least)
    for k, by in (("val_loss", 0.5), ("val_loss/arithmetic", 0.5), ("val_loss/docstring", 0.05)):
        assert after[k]["value"] < before[k]["value"] - by, k
    assert after["val_loss"]["high"] < before["val_loss"]["low"]
    assert {f"chat_d{d}/{m}" for d in arithmetic.LEVELS for m in ("exact_match", "template")} <= set(after)
    assert after["chat_d3/template"]["n"] == 4
    out = capsys.readouterr().out
    assert re.search(r"PASS batch: \d+\.\d% of labels masked", out)
    assert "sft data (builtin):" in out and "packed into rows" in out


@pytest.fixture(scope="module")
def uneven_chats(tmp_path_factory):
    """24 conversations whose assistant answers run from one word to a few hundred random
    characters (truncated at 128 tokens): rows with very different numbers of trained tokens."""
    path = tmp_path_factory.mktemp("uneven") / "chats.jsonl"
    rng = random.Random(0)
    lines = []
    for i in range(24):
        answer = "ok" if i % 3 == 0 else "".join(rng.choice("abcdefghij0123456789 ")
                                                 for _ in range(rng.choice([20, 80, 300])))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def step_gradients(t):
    """One step's forward and backward through the trainer: (the micro-batches it read, its
    gradients by name), then the optimizer step."""
    batches, *_ = t.forward_backward(t.next_batch, t.accum)
    grads = {n: p.grad.clone() for n, p in t.raw_model.named_parameters()}
    t.optimizer.step()
    return batches, grads


def token_mean_gradients(net, batches):
    """The independent reference: one cross-entropy summed over every trained token of all the
    rows, divided by their count, on a fresh copy of the model."""
    net.zero_grad(set_to_none=True)
    loss, count = 0.0, 0
    for b in batches:
        logits = net(b["input_ids"], position_ids=b["position_ids"])[0].float()
        loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
        count += (b["labels"] != -100).sum()
    (loss / count).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def rows_of(batches):
    return sorted(tuple(r.tolist()) for b in batches for r in b["input_ids"])


def assert_same_grads(got, want, what):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{what} {k}: {m}")


SPLITS = [(8, 1), (2, 4), (1, 8)]       # batch_size x accumulation: the same 8 rows a step


def test_sft_step_is_one_token_mean_whatever_the_split(sft_init, uneven_chats, tmp_path):
    """One global batch of 8 SFT rows (one conversation each) holding from 3 to ~100 trained
    tokens, split as 8 x 1, 2 x 4 and 1 x 8: every split reads the same rows and gives the
    gradients of one mean over all their trained tokens (a plain model and F.cross_entropy),
    and the same weights after the step. Each micro-batch's own mean / accumulation weighed a
    3-token row as much as a 100-token one."""
    ckpt, _ = sft_init
    weights = {}
    for b, a in SPLITS:
        t = sft_trainer(ckpt, tmp_path / f"s{b}", "--chat_data", uneven_chats, "--packing", "false", "--seq_len", "128",
                        "--batch_size", str(b), "--total_batch_tokens", str(8 * 128), "--preflight", "false")
        assert t.accum == a
        fresh = copy.deepcopy(t.raw_model)
        batches, grads = step_gradients(t)
        counts = [(r != -100).sum().item() for bt in batches for r in bt["labels"]]
        assert max(counts) > 4 * min(counts)                   # really uneven rows
        if b == 8:
            rows = rows_of(batches)
        assert rows_of(batches) == rows
        assert_same_grads(grads, token_mean_gradients(fresh, batches), f"{b} x {a}")
        weights[b] = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    for b in (2, 1):
        for k in weights[8]:
            # Adam's first step is lr g / (|g| + eps): where g is near 0 a rounding moves an
            # element by up to ~1e-6; a step the wrong way moves it by 2 lr (2e-3)
            torch.testing.assert_close(weights[b][k], weights[8][k], rtol=1e-5, atol=1e-5)


def test_pretrain_step_is_one_token_mean_whatever_the_split(data_dir, tmp_path):
    """The same for pretraining (rows of the built-in corpus, 8 x 64 tokens a step)."""
    for b, a in SPLITS:
        t = trainer(data_dir, tmp_path / f"p{b}", "--batch_size", str(b), "--preflight", "false")
        assert t.accum == a
        fresh = copy.deepcopy(t.raw_model)
        batches, grads = step_gradients(t)
        assert_same_grads(grads, token_mean_gradients(fresh, batches), f"{b} x {a}")


def _two_rank_gradients(rank, port, init, chats, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    found = {}
    for b in (4, 1):              # 4 x 1 and 1 x 4 per rank: 8 rows a step over the two
        t = sft_trainer(init, os.path.join(out, f"r{b}"), "--chat_data", chats, "--packing", "false", "--seq_len",
                        "128", "--batch_size", str(b), "--total_batch_tokens", str(8 * 128), "--preflight", "false")
        batches, *_ = t.forward_backward(t.next_batch, t.accum)
        found[b] = ({n: p.grad.clone() for n, p in t.raw_model.named_parameters()}, rows_of(batches))
    if rank == 0:
        torch.save(found, result)
    torch.distributed.destroy_process_group()


def test_sft_step_over_two_ranks_is_the_one_process_token_mean(sft_init, uneven_chats, tmp_path):
    """Data parallelism over 2 ranks (4 x 1 and 1 x 4 rows each) gives the gradients of the
    one-process step on the same 8 rows: the token count is all-reduced before the backward,
    and the ranks' average is undone (x dp)."""
    from conftest import spawn
    ckpt, _ = sft_init
    t = sft_trainer(ckpt, tmp_path / "one", "--chat_data", uneven_chats, "--packing", "false", "--seq_len", "128",
                    "--batch_size", "8", "--total_batch_tokens", str(8 * 128), "--preflight", "false")
    batches, want = step_gradients(t)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_two_rank_gradients, (port, ckpt, uneven_chats, str(tmp_path), str(tmp_path / "grads.pt")), nprocs=2)
    for b, (grads, rank0_rows) in torch.load(tmp_path / "grads.pt").items():
        assert set(rank0_rows) < set(rows_of(batches))        # rank 0's half of the same rows
        assert_same_grads(grads, want, f"2 ranks x {b}")


def stop_after(t, batches):
    """Trainer t gets a SIGTERM (a preempted job) once its stage has handed out `batches`
    micro-batches: it finishes that step, saves, and stops."""
    next_batch = t.stage.next_batch

    def signalled():
        b = next_batch()
        if t.stage.batches == batches:
            t.stop_signal = signal.SIGTERM
        return b

    t.stage.next_batch = signalled


def test_sft_resume_is_exact(sft_init, tmp_path):
    """An SFT run stopped after step 2 and resumed ends with the same weights as one that ran
    straight through: the stage's position (epoch, row) is in the checkpoint."""
    ckpt, _ = sft_init
    straight = sft_trainer(ckpt, tmp_path / "a", "--max_steps", "4", "--preflight", "false")
    straight.train()
    t = sft_trainer(ckpt, tmp_path / "b", "--max_steps", "4", "--preflight", "false")
    stop_after(t, 2)        # after the second step (one micro-batch a step)
    assert t.train() == 2
    resumed = sft_trainer(ckpt, tmp_path / "b", "--max_steps", "4", "--preflight", "false", "--resume")
    assert resumed.stage.state_dict()["batches"] == 2
    assert resumed.train() == 4
    for (k, a), b in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_sft_bad_data_is_a_clean_exit(sft_init, tmp_path):
    """A chat file with an unknown role names the file and line; a tokenizer without the chat
    tokens says which token is missing."""
    ckpt, _ = sft_init
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"chat.jsonl:2: message 0: unknown role 'bot'"):
        sft_trainer(ckpt, tmp_path / "r1", "--chat_data", str(bad))
    with pytest.raises(SystemExit, match="no <\\|im_start\\|> token"):
        sft_trainer(ckpt, tmp_path / "r2", "--tokenizer", "bytes")


@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory):
    """160 built-in preference pairs as a jsonl (TRL's conversational shape): 2 of them held out."""
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for _, rec in dpo.builtin_pairs(n=80, seed=2)["train"][:160]))
    return str(path)


def dpo_trainer(init, out, pairs, *extra):
    cfg, ov = train.parse_config([
        "--stage", "dpo", "--init", init, "--out_dir", str(out), "--pref_data", pairs, "--seq_len", "256",
        "--batch_size", "4", "--total_batch_tokens", "1024", "--max_steps", "4", "--lr", "1e-3", "--warmup_steps", "1",
        "--eval_tasks", "", "--eval_batches", "1", "--sample_tokens", "0", "--preflight", "false", *extra])
    return train.Trainer(cfg, ov)


def test_dpo_stage_defaults_and_refusals(sft_init, dpo_pairs, tmp_path):
    """--stage dpo: a tenth of SFT's learning rate, APO-zero; it needs --init (the reference);
    a bad loss name, a bad pairs file (file and line) and unpaired data with a paired loss
    are clean exits."""
    cfg = cfg_of("--stage", "dpo")
    assert (cfg.lr, cfg.loss, cfg.ref) == (train.STAGE_DEFAULTS["sft"]["lr"] / 10, "apo_zero", "copy")
    with pytest.raises(SystemExit, match="--init"):
        train.Trainer(*train.parse_config(["--stage", "dpo", "--out_dir", str(tmp_path / "x")]))
    ckpt, _ = sft_init
    with pytest.raises(SystemExit, match="loss 'dpo'"):
        dpo_trainer(ckpt, tmp_path / "r1", dpo_pairs, "--loss", "dpo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: no rejected"):
        dpo_trainer(ckpt, tmp_path / "r2", str(bad))
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0}) + "\n"
                                for i in range(20)))
    with pytest.raises(SystemExit, match="kto only"):
        dpo_trainer(ckpt, tmp_path / "r3", str(unpaired))


def test_dpo_run_with_a_cached_reference_resumes_exactly(sft_init, dpo_pairs, tmp_path):
    """A DPO run with ref=cache stopped after step 2 and resumed (the cache comes back from
    the checkpoint, not recomputed from the moved model) ends with the weights of one that
    ran straight through; the step metrics (rewards, margins) reach metrics.jsonl; the start
    row and the end row of the report card hold the held-out preference accuracy."""
    ckpt, _ = sft_init
    straight = dpo_trainer(ckpt, tmp_path / "a", dpo_pairs, "--ref", "cache")
    straight.train()
    t = dpo_trainer(ckpt, tmp_path / "b", dpo_pairs, "--ref", "cache")
    stop_after(t, 2)
    assert t.train() == 2
    resumed = dpo_trainer(ckpt, tmp_path / "b", dpo_pairs, "--ref", "cache", "--resume")
    assert torch.equal(resumed.stage.ref_cache["train"], straight.stage.ref_cache["train"])
    assert resumed.train() == 4
    for (k, a), b in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), k
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"} <= set(records[-1])
    card = json.load(open(tmp_path / "a" / "report_card.json"))
    rows = card["rows"] if isinstance(card, dict) else card
    assert [r["stage"] for r in rows][-2:] == ["dpo (start)", "dpo"]
    assert all("pref/accuracy" in r["metrics"] for r in rows[-2:])
    # the end row pairs each held-out pair with the start: the mean difference is the difference
    # of the accuracies, on as many pairs; the resumed run kept its start outcomes
    start, end = rows[-2]["metrics"], rows[-1]["metrics"]
    gain = end["pref/accuracy gain"]
    assert "pref/accuracy gain" not in start and gain["n"] == end["pref/accuracy"]["n"]
    assert gain["value"] == pytest.approx(end["pref/accuracy"]["value"] - start["pref/accuracy"]["value"])
    assert gain["low"] <= gain["value"] <= gain["high"]
    resumed_rows = json.load(open(tmp_path / "b" / "report_card.json"))
    resumed_rows = resumed_rows["rows"] if isinstance(resumed_rows, dict) else resumed_rows
    assert resumed_rows[-1]["metrics"]["pref/accuracy gain"] == gain


@pytest.mark.parametrize("ref", ["cache", "copy"])
def test_dpo_reference_ties_the_policy_at_step_0_under_bf16_autocast(sft_init, dpo_pairs, tmp_path, ref):
    """Under bf16 autocast (--precision bf16, on the CPU here) every policy-minus-reference
    log-ratio is exactly 0 before the first update, on training batches and on the held-out
    pairs, with a frozen copy and with cached log-probabilities alike: the cache is computed
    under the policy's autocast, in the batches that read it. (Computed in float32, the cache
    was off by up to 1e-2 nats a row.)"""
    ckpt, _ = sft_init
    t = dpo_trainer(ckpt, tmp_path / ref, dpo_pairs, "--ref", ref, "--precision", "bf16")
    assert isinstance(t.autocast, torch.autocast)
    for _ in range(3):
        batch = t.next_batch()
        with torch.no_grad(), t.autocast:
            policy, _ = dpo.sequence_logps(t.model, batch)
            reference = t.stage.reference_logps(batch)
        assert torch.equal(policy - reference, torch.zeros_like(policy)), (policy - reference).abs().max()
    with torch.no_grad(), t.autocast:
        margins = t.stage.evaluate(t.model, t.device)["pref/margin"]
    assert margins and all(m == 0.0 for m in margins)


def test_step_work_counts_real_tokens_and_the_flops_spent(data_dir, tmp_path):
    """On hand-made micro-batches: the tokens are each row's length before its padding (a row
    without "lengths", pretraining's, is all real), the FLOPs the stage's forward passes over
    every position, padding included, at each batch's own width (flops_per_token of a real
    copy of the model)."""
    t = trainer(data_dir, tmp_path / "w", "--preflight", "false")
    padded = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "lengths": torch.tensor([5, 8])}
    full = {"input_ids": torch.zeros(3, 4, dtype=torch.long)}
    fpt = M.Model(t.full_config).flops_per_token
    tokens, flops = t.step_work([padded, full])
    assert tokens == 5 + 8 + 12
    assert flops == pytest.approx(fpt(8) * 16 + fpt(4) * 12, rel=1e-12)
    t.stage.forward_passes = 4          # a frozen reference's forward on top
    assert t.step_work([full])[1] == pytest.approx(4 / 3 * fpt(4) * 12, rel=1e-12)


@pytest.mark.parametrize("extra", [["--ref", "copy"], ["--ref", "cache"], ["--loss", "kto"], ["--loss", "orpo"]])
def test_dpo_forward_passes_are_the_forwards_it_runs(sft_init, dpo_pairs, tmp_path, monkeypatch, extra):
    """What a DPO step costs (stage.forward_passes, train.py's FLOPs) against the forwards it
    really runs, counted at Model.forward: a forward with gradients counts 3 (its backward is
    two forwards' worth), one without 1. The frozen copy adds one; the cache and the
    reference-free losses none; KTO scores its mismatched half without gradients."""
    ckpt, _ = sft_init
    pairs = dpo_pairs
    if "kto" in extra:
        pairs = tmp_path / "kto.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
                                 + "\n" for r in dpo.read_preferences(dpo_pairs) for side in ("chosen", "rejected")))
    t = dpo_trainer(ckpt, tmp_path / "w", str(pairs), *extra)
    seen = []
    forward = M.Model.forward

    def counted(self, input_ids, *a, **k):
        seen.append(input_ids.numel() * (3 if torch.is_grad_enabled() else 1))
        return forward(self, input_ids, *a, **k)
    monkeypatch.setattr(M.Model, "forward", counted)
    batches, *_ = t.forward_backward(t.next_batch, t.accum)
    positions = sum(b["input_ids"].numel() for b in batches)
    assert sum(seen) / positions == t.stage.forward_passes == {"copy": 4, "cache": 3, "kto": 3, "orpo": 3}[extra[1]]


# -----------------------------------------------------------------------------
# 10c. On-policy training and the reward model (rl.py driven by train.py)

def rl_trainer(init, out, *extra):
    cfg, ov = train.parse_config([
        "--stage", "rl", "--init", init, "--out_dir", str(out), "--seq_len", "128", "--batch_size", "8",
        "--total_batch_tokens", "2048", "--group_size", "4", "--max_new_tokens", "16", "--max_steps", "4",
        "--eval_tasks", "", "--eval_batches", "1", "--sample_tokens", "0", "--preflight", "false", *extra])
    return train.Trainer(cfg, ov)


def test_rl_stage_defaults_and_refusals(sft_init, tmp_path, small_tokenizer):
    """--stage rl: no KL leash, DAPO's aggregation and clip, a constant learning rate; it needs
    --init; sharded layouts, an unknown reward, a reward model as the policy and a teacher
    with another tokenizer are clean exits that say why."""
    cfg = cfg_of("--stage", "rl")
    assert (cfg.beta, cfg.loss_type, cfg.eps_high, cfg.min_lr_ratio, cfg.eval_tasks) == (0.0, "dapo", 0.28, 1.0, "chat")
    assert cfg_of("--stage", "dpo").beta == 0.1
    with pytest.raises(SystemExit, match="--init"):
        train.Trainer(*train.parse_config(["--stage", "rl", "--out_dir", str(tmp_path / "x")]))
    ckpt, _ = sft_init
    with pytest.raises(SystemExit, match="data parallelism only"):
        rl_trainer(ckpt, tmp_path / "r0", "--fsdp", "true")
    with pytest.raises(SystemExit, match="--reward 'judge'"):
        rl_trainer(ckpt, tmp_path / "r1", "--reward", "judge")
    other = tmp_path / "teacher"
    torch.manual_seed(1)
    net = M.Model(M.preset("tiny", vocab_size=data.ByteTokenizer().vocab_size, n_layer=1, dim=32, n_head=2,
                           n_kv_head=1, mlp_dim=64, max_seq_len=256, nope_layers=()))
    train.save_checkpoint(str(other), net, None, {"step": 0, "config": {"tokenizer": "bytes"}})
    with pytest.raises(SystemExit, match="uses another tokenizer"):
        rl_trainer(ckpt, tmp_path / "r2", "--teacher", str(other))


def test_rl_run_resumes_exactly_and_logs_its_metrics(sft_init, tmp_path):
    """An RL run stopped after step 2 and resumed samples the same rollouts (the prompt stream
    and the sampling seed follow the rollout count) and ends with the weights of one that ran
    straight through; the step metrics and both speeds reach metrics.jsonl."""
    ckpt, _ = sft_init
    straight = rl_trainer(ckpt, tmp_path / "a")
    straight.train()
    t = rl_trainer(ckpt, tmp_path / "b")
    stop_after(t, 4)        # after the second step (two micro-batches a step)
    assert t.train() == 2
    resumed = rl_trainer(ckpt, tmp_path / "b", "--resume")
    assert resumed.train() == 4
    for (k, a), b in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), k
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"train/reward", "train/accuracy", "train/entropy", "train/length", "train/zero_std",
            "train/clip_ratio/region_mean", "rollout_tokens_per_s", "train_tokens_per_s"} <= set(records[-1])


def test_rl_rollout_flops_are_the_sampling_and_the_scoring(sft_init, tmp_path):
    """An RL step's work beyond the training micro-batches (train.py adds it to the step's
    FLOPs): every completion sampled (its prompt and completion through the policy once), then
    the policy's forward over every padded training row for the old log-probabilities.
    Without resampling every sampled completion is in the buffer, so both sums are read back
    from it."""
    ckpt, _ = sft_init
    t = rl_trainer(ckpt, tmp_path / "rl", "--resample", "0")
    t.next_batch()
    fpt = M.Model(t.full_config).flops_per_token
    want = sum(fpt(b["input_ids"].shape[1]) / 3 * b["input_ids"].numel()
               + sum(fpt(n) / 3 * n for n in b["lengths"].tolist()) for b in t.stage.buffer)
    assert t.stage.rollout_flops == pytest.approx(want, rel=1e-9)


def test_reward_model_stage_takes_overlong(sft_init, dpo_pairs, tmp_path):
    """--stage rm --overlong skip drops the pairs over seq_len (a truncated completion would put
    the score head on a token mid-answer) and says so; truncate keeps them, cut."""
    ckpt, tok_file = sft_init
    tok = data.load_tokenizer(tok_file)
    records = [("pref", r) for r in dpo.read_preferences(dpo_pairs)]
    kept = {}
    for overlong in ("skip", "truncate"):
        t = train.Trainer(*train.parse_config([
            "--stage", "rm", "--init", ckpt, "--out_dir", str(tmp_path / overlong), "--pref_data", dpo_pairs,
            "--seq_len", "96", "--batch_size", "4", "--total_batch_tokens", "384", "--overlong", overlong,
            "--preflight", "false", "--eval_tasks", ""]))
        kept[overlong] = len(t.stage.pairs.train) + len(t.stage.pairs.val)
        assert kept[overlong] == len(dpo.tokenize(records, tok, 96, overlong)[0])
    assert kept["skip"] < kept["truncate"]


def test_reward_model_stage_then_rl_on_its_reward_and_distillation(sft_init, tmp_path, dpo_pairs, capsys):
    """--stage rm trains a score head on pairs and saves it; --reward rm:DIR makes it the
    reward of an RL run (and it is refused as a policy); --teacher with the student's own
    checkpoint distils with a reverse KL of 0 at the first rollout."""
    ckpt, _ = sft_init
    cfg, ov = train.parse_config([
        "--stage", "rm", "--init", ckpt, "--out_dir", str(tmp_path / "rm"), "--pref_data", dpo_pairs,
        "--seq_len", "256", "--batch_size", "4", "--total_batch_tokens", "1024", "--max_steps", "2",
        "--eval_batches", "1", "--sample_tokens", "0"])
    rm = train.Trainer(cfg, ov)
    assert rm.train() == 2
    assert "PASS checkpoint round trip" in capsys.readouterr().out
    rm_ckpt = str(tmp_path / "rm" / "ckpt" / "step_000002")
    record = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")][-1]
    assert {"train/rewards/accuracies", "rm/accuracy"} <= set(record)
    with pytest.raises(SystemExit, match="is a reward model"):
        rl_trainer(rm_ckpt, tmp_path / "p")
    t = rl_trainer(ckpt, tmp_path / "rl", "--reward", f"rm:{rm_ckpt}", "--max_steps", "1")
    assert t.train() == 1
    d = rl_trainer(ckpt, tmp_path / "d", "--teacher", ckpt, "--max_steps", "1")
    assert d.train() == 1
    record = [json.loads(line) for line in open(tmp_path / "d" / "metrics.jsonl")][-1]
    assert abs(record["train/reverse_kl"]) < 1e-5


# -----------------------------------------------------------------------------
# 11. plot()

def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    """No matplotlib: plot() prints how to install it and returns None."""
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert train.plot(str(tmp_path)) is None
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_plot_writes_curves(tmp_path):
    """With matplotlib: metrics.jsonl -> curves.png."""
    pytest.importorskip("matplotlib")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5 - s / 2, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3,
                                **({"val_loss": 4.0} if s == 5 else {})}) + "\n")
    assert train.plot(str(tmp_path)) == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_main_plot_usage():
    """`train.py --plot` without a run directory is a usage error."""
    with pytest.raises(SystemExit, match="usage"):
        train.main(["--plot"])


def test_moe_run_logs_load_and_moves_the_bias(data_dir, tmp_path):
    """An MoE run with DeepSeek-V3's bias: every step logs each MoE layer's load, the bias moves
    (end_step runs after each update), and the checkpoint holds it."""
    out = tmp_path / "moe"
    t = trainer(data_dir, out, "--n_experts", "4", "--top_k", "2", "--d_expert", "32", "--router", "sigmoid",
                "--bias_update_rate", "0.01", "--moe_aux_loss", "0.01")
    assert t.train() == 6
    rows = read_jsonl(out / "metrics.jsonl")
    for r in rows:
        assert r["moe_loss"] > 0 and {"moe/0/max_load", "moe/1/min_load", "moe/1/load_entropy", "moe/0/dropped"} <= set(r)
        assert r["moe/0/max_load"] >= 1.0 >= r["moe/0/min_load"]
    bias = t.raw_model.moe_layers[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0 and t.raw_model.moe_layers[0].counts.sum() == 0
    m = train.M.Model(t.raw_model.config)
    train.load_checkpoint(train.checkpoints(str(out))[-1], m)             # the last one is step 6
    assert torch.equal(m.moe_layers[0].gate.e_score_correction_bias, bias.cpu())


def test_straggler_alert_names_the_rank_after_three_slow_steps(monkeypatch):
    """Each step's forward times from every rank: a rank at 1.5x the others' median three steps
    in a row raises one alert naming it; a step back at normal speed resets its count."""
    import types
    import parallel
    alerts = []
    t = types.SimpleNamespace(cfg=types.SimpleNamespace(straggler=1.5), device=torch.device("cpu"), slow_streak={},
                              alert=lambda step, kind, message: alerts.append((step, kind, message)))
    times = {1: [0.1, 0.1, 0.4, 0.1], 2: [0.1, 0.1, 0.4, 0.1], 3: [0.1, 0.1, 0.1, 0.1],      # rank 2 recovers
             4: [0.1, 0.1, 0.4, 0.1], 5: [0.1, 0.1, 0.4, 0.1], 6: [0.1, 0.1, 0.4, 0.1], 7: [0.1, 0.1, 0.4, 0.1]}
    record = {}
    for step in sorted(times):
        monkeypatch.setattr(parallel, "gather_times", lambda seconds, device, step=step: times[step])
        record = {}
        train.Trainer.check_stragglers(t, step, 0.1, record)
    assert [(s, kind) for s, kind, _ in alerts] == [(6, "straggler")]
    assert "rank 2" in alerts[0][2] and "4.0x" in alerts[0][2]
    assert record["forward_s_max_over_median"] == pytest.approx(4.0)
    assert parallel.slow_ranks([1.0, 1.6]) == [1] and parallel.slow_ranks([1.0, 1.4]) == []


def test_help_lists_the_commands_and_every_key(capsys):
    """`python train.py --help` (a newcomer's first command) prints the commands and every
    config key with its default, and exits 0 (it used to stop on "unknown key 'help'")."""
    train.main(["--help"])
    out = capsys.readouterr().out
    assert "python train.py --pipeline" in out and "config keys" in out
    for key in list(train.TRAIN_FIELDS) + ["n_layer", "dim"]:
        assert f"\n  --{key} " in out, key


def test_a_corpus_prepared_with_another_math_layout_is_refused(tmp_path):
    """The built-in math is written into the shards: a data_dir prepared with another layout (an
    earlier version's unpadded answer, another --math_format) stops the run with the manifest's
    path and both layouts, rather than pretraining on the old one; the same layout goes on."""
    cfg = train.TrainConfig(data_dir=str(tmp_path))
    manifest = tmp_path / "manifest.json"
    for old in ({"format": "lsd", "digits": 2}, {**arithmetic.corpus("msd", 2)[1]}):
        manifest.write_text(json.dumps({"math": old}))
        with pytest.raises(SystemExit, match=re.escape(str(manifest)) + ".*prepared as .*this run writes"):
            train.prepare_data(cfg, None, 0)
    manifest.write_text(json.dumps({"math": arithmetic.corpus(cfg.math_format, cfg.math_digits)[1]}))
    train.prepare_data(cfg, None, 0)
