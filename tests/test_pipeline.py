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


SFT_LEVELS = {"d1": 1.0, "d2": 0.95, "d3": 0.05}      # SFT demonstrated 1 and 2 digits; RL's level is 3


def _write_runs(root, bpb=(3.0, 2.8, 2.6), mid=(4.0, 3.5), template=(1.0, 0.97), sft=None, pref=(0.55, 0.6),
                pref_gain=(0.05, 0.02), dpo=None, rl=None, rl_gain=None):
    """(run directories as the pipeline leaves them, the held-out evaluation's numbers) with
    what the checks read: SFT demonstrated 1 and 2 digits (SFT_LEVELS, each greedy with an
    interval of +-0.05), DPO keeps them, RL takes 3 digits from 0.05 to 0.5 (greedy and
    pass@1, paired gains of +45 points with intervals of +-10)."""
    sft = {**SFT_LEVELS, **(sft or {})}
    dpo, rl = {**sft, **(dpo or {})}, {**sft, "d3": 0.5, **(rl or {})}
    gain = rl_gain if rl_gain is not None else (rl["d3"] - sft["d3"], 0.10)
    dirs = {}
    for name in ("pretrain", "midtrain", "sft", "dpo", "rl"):
        d = dirs[name] = os.path.join(root, name)
        os.makedirs(d)
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

    card("midtrain", {"val_loss": _metric(mid[0])}, {"val_loss": _metric(mid[1])})
    card("dpo", {"pref/accuracy": _metric(pref[0])},
         {"pref/accuracy": _metric(pref[1]), **({"pref/accuracy gain": _metric(*pref_gain)} if pref_gain else {})})

    def levels(values, templates=(1.0, 1.0, 1.0)):
        return {lv: {"greedy": _metric(v, 0.05), "pass@1": _metric(v, 0.05), "pass@8": _metric(min(1, 2 * v), 0.05),
                     "template": _metric(t)} for (lv, v), t in zip(values.items(), templates)}
    heldout = {"levels": ["d1", "d2", "d3"], "rl_level": "d3", "commonest": {"d1": 0.2, "d2": 0.02, "d3": 0.01},
               "sft": levels(sft, (*template, 0.9)), "dpo": levels(dpo), "rl": levels(rl)}
    for stage, values in (("dpo", dpo), ("rl", rl)):
        for lv, v in values.items():
            d = gain if (stage, lv) == ("rl", "d3") else (v - sft[lv], 0.02)
            heldout[stage][lv].update({"greedy gain": _metric(*d), "pass@1 gain": _metric(*d)})
    return dirs, heldout


def _verdicts(runs):
    return {stage: ok for stage, _, _, ok in train.pipeline_checks(*runs)}


def test_pipeline_checks_pass_when_every_stage_did_its_job(tmp_path):
    checks = train.pipeline_checks(*_write_runs(str(tmp_path)))
    assert [c[0] for c in checks] == ["pretrain", "midtrain", "sft", "dpo", "rl"]
    assert all(ok for *_, ok in checks)
    evidence = {stage: text for stage, _, text, _ in checks}
    assert evidence["pretrain"] == "3.000 -> 2.800 -> 2.600 (steps 40, 80, 120)"
    assert evidence["sft"] == "template min 0.970; d1 1.000, d2 0.950"     # RL's level is not SFT's to pass
    assert evidence["dpo"] == "0.550 -> 0.600, +5.0 points (+3.0 to +7.0)"
    assert evidence["rl"] == ("greedy 0.050 -> 0.500 (+45.0 points (+35.0 to +55.0)); pass@1 0.050 -> 0.500 "
                              "(+45.0 points (+35.0 to +55.0)); the commonest answer 0.010")


@pytest.mark.parametrize("stage, change", [
    ("pretrain", {"bpb": (3.0, 2.6, 2.7)}),          # rose at the last evaluation
    ("pretrain", {"bpb": (3.0,)}),                   # one evaluation shows no trend
    ("midtrain", {"mid": (3.5, 3.5)}),
    ("sft", {"template": (1.0, 0.94)}),              # one level's adherence under 95%
    ("sft", {"sft": {"d2": 0.79}}),                  # a demonstrated level under 80%
    ("dpo", {"pref_gain": (0.01, 0.02)}),            # up, but the paired interval reaches below 0
    ("dpo", {"pref_gain": None}),                    # no paired difference measured
    ("dpo", {"dpo": {"d2": 0.85}}),                  # forgot: under SFT's interval (0.90-1.00)
    ("rl", {"rl": {"d3": 0.30}}),                    # +25 points: short of 30
    ("rl", {"rl_gain": (0.35, 0.40)}),               # +35 points, but the paired interval reaches below 0
    ("rl", {"rl": {"d1": 0.90}}),                    # forgot one digit: under SFT's 0.95-1.05
    ("rl", {"sft": {"d3": 0.0}, "rl": {"d3": 0.009}, "rl_gain": (0.31, 0.05)}),   # under the commonest answer
])
def test_pipeline_checks_fail_each_stage_that_did_not(tmp_path, stage, change):
    verdicts = _verdicts(_write_runs(str(tmp_path), **change))
    assert verdicts.pop(stage) is False
    assert all(verdicts.values())


class Knows:
    """A "model" that answers a held-out document prompt right when its first number is even and
    wrong (off by one) otherwise, whatever the temperature: what heldout_evaluation reports for
    it is known exactly."""

    def __init__(self, tok):
        self.tok = tok

    def eval(self):
        return self

    def generate(self, prompts, max_new_tokens, temperature=1.0, stop_ids=(), generator=None):
        out = []
        for ids in prompts:
            a, op, b = re.search(r"(\d+) ([-+]) (\d+)\nAnswer:$", self.tok.decode(ids)).groups()
            a, b = int(a[::-1]), int(b[::-1])
            c = arithmetic.result(a, op, b) + (a % 2)
            out.append(self.tok.encode(f" {arithmetic.working(a, op, b, 'lsd', c)}\n#### {c}\n"))
        return out


def test_heldout_evaluation_scores_each_stage_on_the_problems_it_writes(tmp_path, monkeypatch):
    """The pipeline's held-out evaluation: the neutral rows it writes are arithmetic.py's
    held-out problems; each stage's greedy accuracy, pass@1 and paired gain are what its answers
    earn (a random model for SFT and DPO, one right on the even first numbers for RL)."""
    tok = data.ByteTokenizer()
    torch.manual_seed(0)
    net = M.Model(M.ModelConfig(vocab_size=eval.vocab_size(tok), n_layer=1, dim=32, n_head=2, n_kv_head=1,
                                mlp_dim=64, max_seq_len=128))
    dirs = {}
    for stage in train.POST_TRAINING:
        dirs[stage] = str(tmp_path / stage)
        os.makedirs(os.path.join(dirs[stage], "ckpt", "step_000001"))
        with open(os.path.join(dirs[stage], "config.json"), "w") as f:
            json.dump({"train": {"math_format": "lsd", "math_digits": 1}}, f)
    monkeypatch.setattr(eval, "open_checkpoint",
                        lambda ckpt, _: (Knows(tok) if "/rl/" in ckpt else net, tok, {}))
    out = train.heldout_evaluation(str(tmp_path), dirs, per_level=20, samples=8, curve=8)
    rows = [json.loads(line) for line in open(tmp_path / "heldout" / "d2.jsonl")]
    problems = arithmetic.heldout(2, 20)
    assert [(r["a"], r["op"], r["b"]) for r in rows] == problems
    assert out["levels"] == ["d1", "d2"] and out["rl_level"] == "d2"
    right = [a % 2 == 0 for a, _, _ in problems]
    assert out["rl"]["outcomes"]["d2"]["greedy"] == right and 0 < sum(right) < len(right)
    assert out["rl"]["d2"]["greedy"]["value"] == out["rl"]["d2"]["pass@1"]["value"] == sum(right) / 20
    assert out["sft"]["d2"]["greedy"]["value"] == 0             # a random model adds nothing
    assert out["rl"]["d2"]["greedy gain"]["value"] == pytest.approx(sum(right) / 20)
    assert out["curve"]["rl"][8] == pytest.approx(sum(right) / 20) and set(out["curve"]) == {"sft", "rl"}
    assert out["commonest"]["d2"] == rl.commonest_answer_share(
        [{"answer": str(arithmetic.result(*p))} for p in problems])
    assert json.load(open(tmp_path / "heldout.json"))["rl_level"] == "d2"


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
    D = arithmetic.DIGITS
    assert seen == [("math_format=msd", f"{chat_data_dir}-msd{D}"), ("math_format=lsd", f"{chat_data_dir}-lsd{D}")]
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
