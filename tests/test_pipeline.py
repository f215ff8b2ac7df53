"""The default pipeline (`python train.py`): every stage from the previous one's checkpoint,
skipped when done, resumed when interrupted, and the report card's checks."""
from dataclasses import asdict
import json
import os
import re

import pytest
import torch

import arithmetic
import data
import eval
import model as M
import rl
import train

pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# The command line

def test_pipeline_arguments_go_to_every_stage_or_one():
    out, common, own = train._split_pipeline_args(
        ["--out_dir", "runs/p", "--eval_examples", "4", "--sft.max_steps", "7", "--rl.group_size=2", "--compile",
         "--pretrain.nope_layers", "[0]"])
    assert out == "runs/p"
    assert common == ["--eval_examples", "4", "--compile"]
    assert own["sft"] == ["--max_steps", "7"] and own["rl"] == ["--group_size=2"]
    assert own["pretrain"] == ["--nope_layers", "[0]"] and own["dpo"] == [] and own["midtrain"] == []
    assert train._split_pipeline_args([])[0] == "runs/playbook"
    with pytest.raises(SystemExit, match="no stage 'ppo'"):
        train._split_pipeline_args(["--ppo.lr", "1"])
    for key in ("stage", "init", "resume"):
        with pytest.raises(SystemExit, match=f"--{key}: the pipeline sets it"):
            train._split_pipeline_args([f"--{key}", "x"])
    with pytest.raises(SystemExit, match="unexpected argument"):
        train._split_pipeline_args(["sft"])


# -----------------------------------------------------------------------------
# The checks, on run directories written by hand

def _metric(v, half=0.0):
    return {"value": v, "low": v - half, "high": v + half, "n": 300}


SFT_LEVELS = {"chat_d1": 1.0, "chat_d2": 0.95, "chat_d3": 0.85, "chat_d4": 0.05, "chat_d5": 0.0}


def _write_runs(root, bpb=(3.0, 2.8, 2.6), mid=(4.0, 3.5), template=(1.0, 0.97), sft=None, pref=(0.55, 0.6), dpo=None,
                rl=None):
    """Run directories as the pipeline leaves them, with the metrics the checks read: SFT
    demonstrated 1 to 3 digits (SFT_LEVELS, each with an interval of +-0.05), DPO keeps them,
    RL takes 4 digits from 0.05 to 0.5."""
    sft = {**SFT_LEVELS, **(sft or {})}
    dpo, rl = {**sft, **(dpo or {})}, {**sft, "chat_d4": 0.5, **(rl or {})}
    dirs = {}
    for name in ("pretrain", "midtrain", "sft", "dpo", "rl"):
        d = dirs[name] = os.path.join(root, name)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"train": {"math_digits": 3}}, f)
    with open(os.path.join(dirs["pretrain"], "metrics.jsonl"), "w") as f:
        for i, v in enumerate(bpb):
            f.write(json.dumps({"step": 40 * i + 39, "loss": 1.0}) + "\n")    # a step without an evaluation
            f.write(json.dumps({"step": 40 * (i + 1), "val_bpb": v}) + "\n")

    def card(name, start, end):
        rows = [{"stage": "pretrain", "step": 120, "run": "/elsewhere", "metrics": {}}]
        if start is not None:
            rows.append({"stage": f"{name} (start)", "step": 0, "run": os.path.abspath(dirs[name]), "metrics": start})
        rows.append({"stage": name, "step": 30, "run": os.path.abspath(dirs[name]), "metrics": end})
        with open(os.path.join(dirs[name], "report_card.json"), "w") as f:
            json.dump(rows, f)

    def levels(values):
        return {f"{t}/exact_match": _metric(v, 0.05) for t, v in values.items()}
    card("midtrain", {"val_loss": _metric(mid[0])}, {"val_loss": _metric(mid[1])})
    card("sft", None, {"chat_d1/template": _metric(template[0]), "chat_d2/template": _metric(template[1]),
                       **levels(sft)})
    card("dpo", {"pref/accuracy": _metric(pref[0])}, {"pref/accuracy": _metric(pref[1]), **levels(dpo)})
    card("rl", levels(dpo), levels(rl))
    return dirs


def _verdicts(dirs):
    return {stage: ok for stage, _, _, ok in train.pipeline_checks(dirs)}


def test_pipeline_checks_pass_when_every_stage_did_its_job(tmp_path):
    checks = train.pipeline_checks(_write_runs(str(tmp_path)))
    assert [c[0] for c in checks] == ["pretrain", "midtrain", "sft", "dpo", "rl"]
    assert all(ok for *_, ok in checks)
    evidence = {stage: text for stage, _, text, _ in checks}
    assert evidence["pretrain"] == "3.000 -> 2.800 -> 2.600 (steps 40, 80, 120)"
    assert evidence["sft"] == "template min 0.970; chat_d1 1.000, chat_d2 0.950, chat_d3 0.850"
    constant = rl.commonest_answer_share(rl.heldout_problems(levels=(4,)))
    assert 0 < constant < 0.05
    assert evidence["rl"] == f"0.050 -> 0.500 (+45.0 points; the commonest answer: {constant:.3f})"


@pytest.mark.parametrize("stage, change", [
    ("pretrain", {"bpb": (3.0, 2.6, 2.7)}),          # rose at the last evaluation
    ("pretrain", {"bpb": (3.0,)}),                   # one evaluation shows no trend
    ("midtrain", {"mid": (3.5, 3.5)}),
    ("sft", {"template": (1.0, 0.94)}),              # one task's adherence under 95%
    ("sft", {"sft": {"chat_d3": 0.79}}),             # a demonstrated level under 80%
    ("dpo", {"pref": (0.6, 0.6)}),
    ("dpo", {"dpo": {"chat_d2": 0.85}}),             # forgot: under SFT's interval (0.90-1.00)
    ("rl", {"rl": {"chat_d4": 0.30}}),               # +25 points: short of 30
    ("rl", {"rl": {"chat_d1": 0.90}}),               # forgot one digit: under SFT's 0.95-1.05
])
def test_pipeline_checks_fail_each_stage_that_did_not(tmp_path, stage, change):
    verdicts = _verdicts(_write_runs(str(tmp_path), **change))
    assert verdicts.pop(stage) is False
    assert all(verdicts.values())


# -----------------------------------------------------------------------------
# The arithmetic's three splits across every stage's data

def problems_in(texts, fmt="lsd"):
    """Every problem `a op b` written in the texts (numbers as the layout writes them)."""
    read = (lambda t: int(t[::-1])) if fmt == "lsd" else int
    return {(read(a), op, read(b)) for t in texts for a, op, b in re.findall(r"(?<!\d)(\d+) ([-+]) (\d+)(?!\d)", t)}


def test_no_stage_trains_on_a_held_out_problem_nor_demonstrates_an_rl_prompt():
    """The held-out problems of every level occur in no stage's training data (pretraining's
    math, SFT's conversations, the preference pairs, RL's prompts), and RL's prompts in no
    demonstration: the split is by arithmetic.py's hash, so this holds whatever the order."""
    import dpo
    import sft
    heldout = {p for d in arithmetic.LEVELS for p in arithmetic.heldout(d, 300)}
    assert len(heldout) > 1200
    pretrain = problems_in(arithmetic.document(i) for i in range(data.MATH_DOCUMENTS))
    chats = problems_in(json.dumps(m) for _, m in sft.builtin_conversations()["train"])
    pairs = problems_in(json.dumps(r) for _, r in dpo.builtin_pairs()["train"])
    stream = rl.builtin_stream(0, (sft.MATH_DIGITS + 1,))
    prompts = problems_in(json.dumps(next(stream)["messages"]) for _ in range(3000))
    for name, seen in [("pretraining", pretrain), ("sft", chats), ("dpo", pairs), ("rl", prompts)]:
        assert len(seen) > 500, name
        assert not seen & heldout, f"{name} trains on held-out problems: {sorted(seen & heldout)[:5]}"
    demonstrated = pretrain | chats | pairs
    assert not demonstrated & prompts
    assert max(arithmetic.level(a, b) for a, _, b in demonstrated) == sft.MATH_DIGITS
    assert {arithmetic.level(a, b) for a, _, b in prompts} == {sft.MATH_DIGITS + 1}


# -----------------------------------------------------------------------------
# A whole pipeline, small

@pytest.fixture(scope="module")
def chat_data_dir(tmp_path_factory, small_tokenizer):
    """The built-in corpus (a slice) under the 512-token tokenizer, which has the chat tokens."""
    d = tmp_path_factory.mktemp("pipeline_data")
    small_tokenizer.save(str(d / "tok"))
    data.prepare(out=str(d), tokenizer=small_tokenizer, max_docs=60, math=arithmetic.corpus(), verbose=False)
    return str(d)


SMALL = ["--pretrain.n_layer", "1", "--pretrain.dim", "64", "--pretrain.n_head", "2", "--pretrain.n_kv_head", "1",
         "--pretrain.mlp_dim", "128", "--pretrain.nope_layers", "[]", "--pretrain.max_seq_len", "256",
         "--pretrain.seq_len", "64", "--pretrain.eval_every", "1",
         "--sft.seq_len", "128", "--dpo.seq_len", "128", "--rl.seq_len", "128", "--rl.group_size", "4",
         "--rl.max_new_tokens", "8", "--rl.batch_size", "8", "--max_steps", "2", "--warmup_steps", "1",
         "--batch_size", "8", "--total_batch_tokens", "1024", "--eval_examples", "2", "--eval_batches", "1",
         "--sample_tokens", "0", "--preflight", "false"]


def test_pipeline_runs_every_stage_then_skips_then_resumes(chat_data_dir, tmp_path, capsys):
    out = str(tmp_path / "p")
    args = ["--pipeline", "--out_dir", out, "--data_dir", chat_data_dir, *SMALL]
    train.main(args)
    names = ["1-pretrain", "2-midtrain", "3-sft", "4-dpo", "5-rl"]
    for n in names:        # every stage ran its 2 steps, from the stage before
        assert os.path.basename(train.checkpoints(os.path.join(out, n))[-1]) == "step_000002"
    inits = [train.init_config(train.checkpoints(os.path.join(out, n))[-1])["init"] for n in names]
    assert inits[0] == "" and all(inits[i] == train.checkpoints(os.path.join(out, names[i - 1]))[-1]
                                  for i in range(1, 5))
    # mid-training: twice pretraining's context, 10x its rope_theta (ABF)
    mid = train.init_config(train.checkpoints(os.path.join(out, "2-midtrain"))[-1])
    assert mid["seq_len"] == 128 and mid["stage"] == "midtrain"
    with open(os.path.join(train.checkpoints(os.path.join(out, "2-midtrain"))[-1], "trainer.json")) as f:
        assert json.load(f)["model_config"]["rope_theta"] == 100000.0
    report = open(os.path.join(out, "REPORT.md")).read()
    for stage in ("pretrain", "midtrain", "sft", "dpo", "rl"):   # a verdict per stage (2 steps decide nothing)
        assert any(line.startswith(f"| {stage} |") and line.rstrip().endswith(("| PASS |", "| FAIL |"))
                   for line in report.splitlines()), report
    assert "| rl (start) | 0 |" in report and "| midtrain (start) | 0 |" in report
    times = json.load(open(os.path.join(out, "pipeline.json")))
    assert set(times) == {"pretrain", "midtrain", "sft", "dpo", "rl"}

    # mid-training's "before" is the pretrained model as it was (rope_theta 10000), on the
    # mid-training validation batches at 128 tokens: not the model with the new rope_theta
    card = train._card(os.path.join(out, "2-midtrain"))
    pre = train.load_frozen(train.checkpoints(os.path.join(out, "1-pretrain"))[-1], "cpu", "")
    assert pre.config.rope_theta == 10000.0
    cfg, _ = train.parse_config(["--stage", "midtrain", "--data_dir", chat_data_dir, "--seq_len", "128",
                                 "--batch_size", "8", "--max_steps", "2"])
    stage = train.PretrainStage(cfg)
    tok_bytes = eval.token_bytes(data.load_tokenizer(os.path.join(chat_data_dir, "tok.json")), pre.config.padded_vocab)
    with torch.no_grad():
        want = eval.validation(pre, stage.val_batches("cpu", 1), tok_bytes, stage.names)["val_loss"]["value"]
        abf = M.Model(M.ModelConfig(**{**asdict(pre.config), "rope_theta": 100000.0}))
        abf.load_state_dict(pre.state_dict())
        moved = eval.validation(abf.eval(), stage.val_batches("cpu", 1), tok_bytes, stage.names)["val_loss"]["value"]
    got = card["midtrain (start)"]["val_loss"]["value"]
    # an untrained 1-layer model hardly uses positions, so ABF moves its loss by ~1e-5: the
    # card must sit ten times closer to the model as trained than to the rope_theta-moved one
    assert moved != want and abs(got - want) < abs(got - moved) / 10

    # again: everything is done, nothing runs
    capsys.readouterr()
    train.main(args)
    said = capsys.readouterr().out
    assert said.count("is done") == 5 and "=== pipeline" not in said
    # an interrupted last stage (its final checkpoint lost) resumes from the one before
    import shutil
    shutil.rmtree(train.checkpoints(os.path.join(out, "5-rl"))[-1])
    train.main(args)
    said = capsys.readouterr().out
    assert said.count("is done") == 4 and "=== pipeline: rl (resumed)" in said
    assert os.path.basename(train.checkpoints(os.path.join(out, "5-rl"))[-1]) == "step_000002"


# -----------------------------------------------------------------------------
# Ablations

def test_ablate_arguments():
    assert train._values("1,2,4") == ["1", "2", "4"]
    assert train._values("[3],[],[1, 2]") == ["[3]", "[]", "[1, 2]"]
    out, grid, base = train._split_ablate_args(["--ablate", "n_kv_head=1,4", "--max_steps", "5", "--ablate",
                                                "lr=1e-3,3e-3", "--out_dir", "runs/a"])
    assert out == "runs/a" and grid == [("n_kv_head", ["1", "4"]), ("lr", ["1e-3", "3e-3"])]
    assert base == ["--max_steps", "5"]
    with pytest.raises(SystemExit, match="unknown key 'heads'"):
        train._split_ablate_args(["--ablate", "heads=1,2"])
    with pytest.raises(SystemExit, match="at least two variants"):
        train._split_ablate_args(["--ablate", "lr=1e-3"])
    with pytest.raises(SystemExit, match="a config key and the values"):
        train._split_ablate_args(["--ablate", "lr"])
    with pytest.raises(SystemExit, match="not a variable to compare"):
        train._split_ablate_args(["--ablate", "out_dir=a,b"])


def test_ablation_runs_each_variant_on_the_same_base_and_compares(chat_data_dir, tmp_path, capsys):
    out = str(tmp_path / "a")
    args = ["--ablate", "n_kv_head=1,2", "--out_dir", out, "--data_dir", chat_data_dir, "--n_layer", "1",
            "--dim", "64", "--n_head", "2", "--mlp_dim", "128", "--nope_layers", "[]", "--seq_len", "64",
            "--max_steps", "3", "--batch_size", "4", "--total_batch_tokens", "256", "--eval_examples", "2",
            "--eval_batches", "1", "--sample_tokens", "0", "--preflight", "false"]
    train.main(args)
    dirs = [os.path.join(out, "n_kv_head=1"), os.path.join(out, "n_kv_head=2")]
    configs = [json.load(open(os.path.join(d, "config.json"))) for d in dirs]
    assert [c["model"]["n_kv_head"] for c in configs] == [1, 2]
    # everything else the same: the seed, the data, the budget
    for key in ("seed", "data_dir", "max_steps", "total_batch_tokens", "lr"):
        assert configs[0]["train"][key] == configs[1]["train"][key]
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl"))] for d in dirs]
    assert len(losses[0]) == len(losses[1]) == 3 and losses[0] != losses[1]
    report = open(os.path.join(out, "ABLATION.md")).read()
    kv = 64 // 2     # one K/V head fewer: K and V lose dim / n_head columns each
    params = [M.Model(M.ModelConfig(**c["model"])).num_params()[0] for c in configs]
    assert params[1] - params[0] == 2 * 64 * kv
    assert f"| n_kv_head=1 | {params[0] / 1e6:.2f}M |" in report and f"| n_kv_head=2 | {params[1] / 1e6:.2f}M |" in report
    assert "- n_kv_head=2: val_loss " in report and "tokens/s x" in report
    capsys.readouterr()
    train.main(args)          # again: both are done
    assert capsys.readouterr().out.count("is done") == 2


def test_a_math_layout_ablation_gives_each_variant_its_own_corpus(chat_data_dir, tmp_path, monkeypatch):
    """--ablate math_format=...: the built-in math is written into the shards, so each layout
    reads (and prepares) its own data_dir; an ablation of anything else shares the base's, and
    so does one on real data (a manifest without a math layout)."""
    seen = []
    monkeypatch.setattr(train, "run_unless_done", lambda what, name, cfg, *a: seen.append((name, cfg.data_dir)))
    monkeypatch.setattr(train, "ablation_report", lambda *a: "")
    base = ["--out_dir", str(tmp_path / "a"), "--max_steps", "1"]
    train.main(["--ablate", "math_format=msd,lsd", "--data_dir", chat_data_dir, *base])
    assert seen == [("math_format=msd", f"{chat_data_dir}-msd3"), ("math_format=lsd", f"{chat_data_dir}-lsd3")]
    seen.clear()
    train.main(["--ablate", "lr=1e-3,2e-3", "--data_dir", chat_data_dir, *base])
    assert [d for _, d in seen] == [chat_data_dir] * 2
    real = tmp_path / "real"
    real.mkdir()
    (real / "manifest.json").write_text(json.dumps({"sources": {}}))
    seen.clear()
    train.main(["--ablate", "math_digits=2,3", "--data_dir", str(real), *base])
    assert [d for _, d in seen] == [str(real)] * 2


# -----------------------------------------------------------------------------
# The README's table of concepts points at code that exists

def test_every_concept_row_points_at_code_that_exists():
    import importlib
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    table = text.split("## The playbook's concepts, and where each one lives")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| chapter", "|---"))]
    assert len(rows) >= 50
    checked = 0
    for row in rows:
        where = row.split(" | ")[2]
        # "`file.py`: `name`, `Class.method`; `other.py`: `name(arg=...)`"
        for part in where.split(";"):
            m = re.match(r"\s*`(\w+)\.py`(?::(.*))?", part)
            assert m, f"README concept row names no file: {row}"
            module = importlib.import_module(m.group(1))
            for name in re.findall(r"`([^`]+)`", m.group(2) or ""):
                if name.startswith("python ") or " " in name or "=" in name and "(" not in name:
                    continue            # a metric or a command, not a name
                obj = module
                for attr in name.split("(")[0].split("."):
                    assert hasattr(obj, attr), f"README: {m.group(1)}.py has no {name!r} ({row[:80]}...)"
                    obj = getattr(obj, attr)
                checked += 1
    assert checked >= 100
