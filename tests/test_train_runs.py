"""End-to-end runs of train.py as subprocesses: exact resume after `kill -9`, SIGTERM
(preemption) saving a checkpoint, torchrun with 2 processes matching 1 process on the same
global batch, mid-training from a checkpoint and from a Hugging Face directory, the command
line (unknown keys, TOML configs), --plot, and KTO under ZeRO-3 matching 1 process.

Every run is tiny (byte tokenizer, 2 layers, 512 tokens per step, a few steps) and uses
OMP_NUM_THREADS=1 so that two runs of the same flags compute the same floats."""

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LN_V = math.log(384)          # the byte vocabulary (257) padded to a multiple of 128

# the model: 2 layers (the tiny preset's NoPE layer 3 does not exist then)
MODEL = ["--seq_len", "64", "--n_layer", "2", "--nope_layers", "[1]"]


def common(d):
    """Flags for a fast run on the prepared bytes data in d (no model fields: --init refuses those)."""
    return ["--data_dir", str(d), "--tokenizer", "bytes", "--batch_size", "4", "--total_batch_tokens", "512",
            "--warmup_steps", "2", "--eval_every", "100", "--sample_tokens", "0", "--eval_tasks", ""]


def run_train(args, cwd, timeout=90):
    """Run train.py to completion; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run([sys.executable, TRAIN] + [str(a) for a in args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def check(proc):
    assert proc.returncode == 0, (f"train.py exited {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr (tail)\n{proc.stderr[-3000:]}")
    return proc


def start_train(args, cwd, log):
    """Start train.py in the background, stdout and stderr to the file `log` (a pipe nobody
    reads could fill up and block the run)."""
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, TRAIN] + [str(a) for a in args], cwd=cwd, env=ENV, stdout=f,
                            stderr=subprocess.STDOUT)
    f.close()          # the child holds its own descriptor
    return proc


def read_metrics(out):
    """Complete lines of out/metrics.jsonl (a line being written is ignored)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def by_step(rows):
    """step -> row, the last occurrence winning (a resumed run appends the steps it redoes)."""
    return {r["step"]: r for r in rows}


def wait_for_step(proc, out, step, log, timeout=60):
    """Poll metrics.jsonl until it shows a step >= `step`; returns that step. Fails clearly if
    the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_metrics(out)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            with open(log) as f:
                tail = f.read()[-3000:]
            pytest.fail(f"train.py exited ({proc.returncode}) before metrics.jsonl showed step {step} "
                        f"(last step seen: {rows[-1]['step'] if rows else None}); output:\n{tail}")
        time.sleep(0.005)
    pytest.fail(f"metrics.jsonl did not reach step {step} within {timeout} s")   # the caller ends the process


def ckpt_steps(out):
    d = os.path.join(out, "ckpt")
    return sorted(int(n[len("step_"):]) for n in os.listdir(d) if n.startswith("step_")) if os.path.isdir(d) else []


def ckpt(out, step):
    return os.path.join(out, "ckpt", f"step_{step:06d}")


def trainer_json(path):
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def config_json(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def assert_bitwise(a, b, what):
    assert set(a) == set(b), f"{what}: different tensors: {sorted(set(a) ^ set(b))[:10]}"
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args, cwd, nproc=2, timeout=120):
    """torchrun --nproc_per_node=nproc train.py args; returns (returncode, output). On a timeout
    the workers are ended by pid before torchrun (a killed torchrun leaves them running)."""
    log = os.path.join(cwd, "torchrun.log")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(free_port()), TRAIN] + [str(a) for a in args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_torchrun(proc)
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{open(log).read()[-3000:]}")
    with open(log) as f:
        return proc.returncode, f.read()


def end_torchrun(proc, workers=()):
    """SIGKILL torchrun's workers (they run in sessions of their own and outlive a killed
    torchrun), then torchrun itself; everything by pid."""
    if proc.poll() is not None:
        return
    for pid in list(workers) or list(_children(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _children(pid):
    """Processes whose parent is pid (Linux /proc), as {pid: environ dict}."""
    kids = {}
    if not os.path.isdir("/proc"):
        return kids
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = dict(x.split("=", 1) for x in f.read().decode(errors="replace").split("\0") if "=" in x)
                kids[int(name)] = env
        except (OSError, ValueError, IndexError):
            continue
    return kids


def preflight_lines(stdout):
    """The preflight checklist's lines: [(status, item, detail)]."""
    return re.findall(r"^\s+\[\s*\d+\] (PASS|WARN|FAIL) ([^:]+): (.*)$", stdout, re.M)


def reap(proc):
    """Kill a run that is still going (a failed assertion must not leave it behind) and wait."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# -----------------------------------------------------------------------------
# Fixtures: the data, and the kill -9 / resume pair (its uninterrupted run is reused by the torchrun
# and mid-training tests)

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import arithmetic
    import data
    d = tmp_path_factory.mktemp("train_runs_data")
    data.prepare(out=str(d), tokenizer=data.ByteTokenizer(), max_docs=60, math=arithmetic.corpus(), verbose=False)
    return d


RESUME_ARGS = ["--max_steps", "12", "--ckpt_every", "4"]


@pytest.fixture(scope="module")
def resume_runs(data_dir, tmp_path_factory):
    """Two runs of the same flags, side by side (one core each): an uninterrupted run of 12 steps
    with a checkpoint every 4 (keep_last 2: steps 8 and 12 remain), and one killed with SIGKILL
    at step 6 (after the step-4 checkpoint, before the step-8 one), then continued with --resume."""
    base_cwd, cwd = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("killed")
    args = common(data_dir) + MODEL + RESUME_ARGS + ["--out_dir", "out"]
    base_log = os.path.join(base_cwd, "run.log")
    base = start_train(args, base_cwd, base_log)
    try:
        out = os.path.join(cwd, "out")
        log = os.path.join(cwd, "killed.log")
        proc = start_train(args, cwd, log)
        try:
            seen = wait_for_step(proc, out, 6, log)
        finally:
            proc.kill()            # SIGKILL: no handler runs, nothing is saved
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run had already ended (exit {proc.returncode}) before the kill"
        steps_at_kill = ckpt_steps(out)
        assert steps_at_kill and steps_at_kill[-1] == 4, (
            f"the kill (seen step {seen}) did not land between the step-4 and step-8 checkpoints: checkpoints "
            f"{steps_at_kill}; the machine was too slow for the poll, rerun")
        lost = [r["step"] for r in read_metrics(out) if r["step"] > 4]
        assert lost, "no steps after the step-4 checkpoint were logged before the kill"
        resumed = check(run_train(args + ["--resume"], cwd))
        base.wait(timeout=90)
    finally:
        reap(base)
    with open(base_log) as f:
        base_stdout = f.read()
    assert base.returncode == 0, f"the uninterrupted run exited {base.returncode}:\n{base_stdout[-3000:]}"
    base_out = os.path.join(base_cwd, "out")
    assert ckpt_steps(base_out) == [8, 12]
    assert [r["step"] for r in read_metrics(base_out)] == list(range(1, 13))
    return {"base": {"cwd": base_cwd, "out": base_out, "stdout": base_stdout},
            "killed": {"out": out, "stdout": resumed.stdout, "lost": lost, "ckpts_at_kill": steps_at_kill}}


@pytest.fixture(scope="module")
def base_run(resume_runs):
    return resume_runs["base"]


@pytest.fixture(scope="module")
def killed_and_resumed(resume_runs):
    return resume_runs["killed"]


# -----------------------------------------------------------------------------
# 1. kill -9 and --resume end bit for bit where an uninterrupted run ends

@pytest.mark.slow
def test_resume_after_kill9_is_bitwise_exact(base_run, killed_and_resumed):
    a, b = base_run["out"], killed_and_resumed["out"]
    assert re.search(r"restored \S*step_000004 \(step 4\)", killed_and_resumed["stdout"]), \
        "the resumed run did not say it restored step 4:\n" + killed_and_resumed["stdout"][-2000:]
    assert ckpt_steps(b) == [8, 12]
    # the weights and AdamW's state after step 12, bit for bit
    assert_bitwise(load_file(os.path.join(ckpt(a, 12), "model.safetensors")),
                   load_file(os.path.join(ckpt(b, 12), "model.safetensors")), "model.safetensors at step 12")
    assert_bitwise(load_file(os.path.join(ckpt(a, 12), "optimizer.safetensors")),
                   load_file(os.path.join(ckpt(b, 12), "optimizer.safetensors")), "optimizer.safetensors at step 12")
    # the step-8 checkpoint too (written by the resumed run after redoing steps 5..8)
    assert_bitwise(load_file(os.path.join(ckpt(a, 8), "model.safetensors")),
                   load_file(os.path.join(ckpt(b, 8), "model.safetensors")), "model.safetensors at step 8")
    # the data loader is where an uninterrupted one would be, and the monitor's history agrees
    ta, tb = trainer_json(ckpt(a, 12)), trainer_json(ckpt(b, 12))
    assert ta["step"] == tb["step"] == 12
    assert ta["stage"] == tb["stage"]
    assert ta["monitor"]["history"]["loss"] == tb["monitor"]["history"]["loss"]
    # the redone steps 5..12 log the same losses (last occurrence of each step in the appended file)
    ma, mb = by_step(read_metrics(a)), by_step(read_metrics(b))
    assert sorted(mb) == list(range(1, 13))
    for s in range(1, 13):
        assert mb[s]["loss"] == ma[s]["loss"], f"step {s}: loss {mb[s]['loss']} (resumed) != {ma[s]['loss']}"
        assert mb[s]["grad_norm"] == ma[s]["grad_norm"], f"step {s}: grad norm differs"
        assert mb[s]["lr"] == ma[s]["lr"]
    # the steps lost with the kill (logged by the killed run past its last checkpoint) were
    # dropped from metrics.jsonl on resume and logged once more when redone: each step once
    rows = read_metrics(b)
    assert killed_and_resumed["lost"], "the kill came right after a checkpoint: nothing was redone"
    assert [r["step"] for r in rows] == list(range(1, 13))


@pytest.mark.slow
def test_resume_after_kill9_restores_rng_state_exactly(base_run, killed_and_resumed):
    # The preflight builds a model (a fresh init draws from the global RNG) after the resumed run
    # restored the checkpoint's RNG: unless it runs under fork_rng, the RNG saved at step 12 differs
    # (harmless without dropout, but any sampling in the loop would diverge after a resume).
    a, b = base_run["out"], killed_and_resumed["out"]
    assert trainer_json(ckpt(a, 12))["python_random"] == trainer_json(ckpt(b, 12))["python_random"]
    assert_bitwise(load_file(os.path.join(ckpt(a, 12), "rng.safetensors")),
                   load_file(os.path.join(ckpt(b, 12), "rng.safetensors")), "rng.safetensors at step 12")


# -----------------------------------------------------------------------------
# 2. SIGTERM (a preempted job) saves the step it finished, and --resume continues from it

def test_sigterm_saves_last_step_and_resume_continues(data_dir, tmp_path):
    out = str(tmp_path / "out")
    args = common(data_dir) + MODEL + ["--ckpt_every", "1000", "--out_dir", "out"]
    log = str(tmp_path / "run.log")
    proc = start_train(args + ["--max_steps", "200"], tmp_path, log)
    try:
        wait_for_step(proc, out, 3, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        reap(proc)
    with open(log) as f:
        text = f.read()
    assert rc == 0, f"exit {rc} after SIGTERM:\n{text[-2000:]}"
    last = read_metrics(out)[-1]["step"]
    assert 3 <= last < 200, f"the run went on to step {last} after SIGTERM"
    assert re.search(rf"saved step {last}\b", text), text[-2000:]
    assert ckpt_steps(out)[-1] == last, f"checkpoints {ckpt_steps(out)}, last logged step {last}"
    state = trainer_json(ckpt(out, last))
    assert state["step"] == last
    assert state["stage"]["batches"] == 2 * last        # 2 micro-batches (accumulation) per step
    assert not [n for n in os.listdir(os.path.join(out, "ckpt")) if not n.startswith("step_")], \
        "a temporary checkpoint directory was left behind"
    # continue to a few steps further
    k = last + 2
    resumed = check(run_train(args + ["--max_steps", k, "--resume"], tmp_path))
    assert f"(step {last})" in resumed.stdout
    steps = [r["step"] for r in read_metrics(out)]
    # nothing was lost or redone: the first new line is last + 1
    assert steps == list(range(1, k + 1)), steps
    assert trainer_json(ckpt(out, k))["step"] == k


# -----------------------------------------------------------------------------
# 3. torchrun with 2 processes = 1 process with 2 accumulation steps (the same global batch)

@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(data_dir, base_run, tmp_path):
    # base_run is one process: 4 x 64 x 2 accumulation = 512 tokens a step; here 4 x 64 x 2 processes
    assert "4 x 64 x 1 data-parallel ranks x 2 accumulation" in base_run["stdout"]
    rc, two_stdout = run_torchrun(common(data_dir) + MODEL + RESUME_ARGS + ["--out_dir", "two"], tmp_path)
    assert rc == 0, f"torchrun exited {rc}:\n{two_stdout[-3000:]}"
    assert "4 x 64 x 2 data-parallel ranks x 1 accumulation" in two_stdout
    checks = {item: status for status, item, _ in preflight_lines(two_stdout)}
    assert checks.get("identical initial weights") == "PASS", two_stdout[-3000:]
    assert checks.get("different data per rank") == "PASS", two_stdout[-3000:]
    assert "FAIL" not in checks.values()
    assert "ranks" not in checks        # the one-process line is not printed under torchrun

    one, two = base_run["out"], str(tmp_path / "two")
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 13))
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5), f"step {r1['step']}"
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4), f"step {r1['step']}"
    assert m1[-1]["loss"] < m1[0]["loss"] - 1.0          # it trained: a real comparison, not two flat lines
    assert ckpt_steps(two) == [8, 12]
    w1 = load_file(os.path.join(ckpt(one, 12), "model.safetensors"))
    w2 = load_file(os.path.join(ckpt(two, 12), "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    # both read the same windows: the same count per source (the 2-process loader makes half the batches)
    s1, s2 = trainer_json(ckpt(one, 12))["stage"], trainer_json(ckpt(two, 12))["stage"]
    assert s1["consumed"] == s2["consumed"]
    assert (s1["batches"], s2["batches"]) == (24, 12)


def _same_run(one, two, loss_rel=1e-5):
    """Two runs of the same 12 steps: the same losses and grad norms every step, and the same
    weights and AdamW moments in the last checkpoint (one process's view, whatever the layout)."""
    m1, m2 = (list(by_step(read_metrics(out)).values()) for out in (one, two))   # a resumed run redoes steps
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 13))
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=loss_rel), f"step {r1['step']}"
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-3), f"step {r1['step']}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        w1, w2 = load_file(os.path.join(ckpt(one, 12), name)), load_file(os.path.join(ckpt(two, 12), name))
        assert set(w1) == set(w2), name
        for k in w1:
            # Sums in another order (TP's partial matmuls, ZeRO's reduce-scatter) round
            # differently, and Adam's first steps amplify that where a gradient is near zero
            # (lr g / (|g| + eps)): an element can move by 1e-5 over 12 steps. A lost or doubled
            # gradient is off by whole steps (lr 3e-3).
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name} {k}: {m}")


# Each layout of 2 processes (4 for the mesh) trains the same 12 steps on the same global batch
# as one process. ZeRO and FSDP2 split the batch over 2 data-parallel ranks; TP and PP ranks
# read the same rows. A pipeline sums the tied matrix's two gradients in another order, and
# Adam amplifies that rounding a little: its losses agree to 1e-4.
LAYOUTS = {
    "zero3": (2, ["--fsdp"], 1e-5),
    "zero1": (2, ["--fsdp", "--zero_stage", "1"], 1e-5),
    "tp2": (2, ["--tp", "2"], 1e-5),
    "pp2": (2, ["--pp", "2"], 1e-4),
    "torch-fsdp2": (2, ["--fsdp", "--parallel_impl", "torch"], 1e-5),
    "torch-tp2": (2, ["--tp", "2", "--parallel_impl", "torch"], 1e-5),
    "tp2-zero3-4procs": (4, ["--tp", "2", "--fsdp"], 1e-5),
}


TASKS = ["--eval_tasks", "builtin", "--eval_examples", "4"]
# the layouts whose runs also evaluate eval.py's tasks (at the preflight and after step 12)
TASK_LAYOUTS = ["zero3", "tp2", "torch-fsdp2", "pp2"]


@pytest.fixture(scope="module")
def layout_runs(data_dir, tmp_path_factory):
    """layout -> (directory, torchrun's output): the 12 steps of RESUME_ARGS under that layout, in
    directory/out, run the first time a test asks. A torchrun start costs more than the run
    itself, so one run serves every test that reads it: the comparison with one process, the
    tasks (TASK_LAYOUTS), the resume in another layout (TP x ZeRO-3)."""
    runs = {}

    def run(layout):
        if layout not in runs:
            nproc, flags, _ = LAYOUTS[layout]
            cwd = tmp_path_factory.mktemp(layout)
            tasks = TASKS if layout in TASK_LAYOUTS else []
            rc, stdout = run_torchrun(common(data_dir) + MODEL + RESUME_ARGS + flags + tasks + ["--out_dir", "out"],
                                      cwd, nproc=nproc, timeout=240)
            assert rc == 0, f"torchrun exited {rc}:\n{stdout[-3000:]}"
            runs[layout] = (cwd, stdout)
        return runs[layout]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torchrun_layouts_match_one_process(layout, base_run, layout_runs):
    _, flags, loss_rel = LAYOUTS[layout]
    cwd, stdout = layout_runs(layout)
    checks = {item: status for status, item, _ in preflight_lines(stdout)}
    assert "FAIL" not in checks.values(), stdout[-3000:]
    assert checks.get("layout") == "PASS" and checks.get("identical initial weights") == "PASS"
    if "--tp" in flags and "torch" not in flags:
        assert checks.get("tensor-parallel shards") == "PASS"
    # (evaluating the tasks, where a run does, changes nothing of its training)
    _same_run(base_run["out"], str(cwd / "out"), loss_rel)


@pytest.fixture(scope="module")
def tasks_one_process(data_dir, tmp_path_factory):
    """One process's metrics after the layouts' 12 steps, with the tasks."""
    d = tmp_path_factory.mktemp("tasks_one")
    check(run_train(common(data_dir) + MODEL + RESUME_ARGS + TASKS + ["--out_dir", "out"], d))
    return read_metrics(str(d / "out"))[-1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", TASK_LAYOUTS)
def test_torchrun_evaluates_tasks_on_sharded_models(layout, tasks_one_process, layout_runs):
    """eval.py's tasks on a split model (every rank scores and generates with the whole model:
    ZeRO-3 summons its weights, FSDP2 unshards, TP's ranks work together) give one process's
    numbers; where every rank reads the same rows (TP, PP) so does the validation loss. Under
    --pp the tasks are skipped, and the run says so."""
    cwd, stdout = layout_runs(layout)
    checks = {item: status for status, item, _ in preflight_lines(stdout)}
    assert checks["evaluation"] == "PASS" and checks["evaluation pipeline"] == "PASS", stdout[-3000:]
    one, row = tasks_one_process, read_metrics(str(cwd / "out"))[-1]
    assert row["step"] == one["step"] == 12
    tasks = [k for k in one if k.startswith(("arithmetic/", "docstring/", "next_line/"))]
    assert len(tasks) == 9
    if layout == "pp2":
        assert not set(tasks) & set(row) and "tasks: not evaluated under --pp" in stdout
    else:
        assert {k: row[k] for k in tasks} == {k: one[k] for k in tasks}
    if layout in ("tp2", "pp2"):
        val = [k for k in one if k.startswith(("val_loss", "val_bpb"))]
        assert "val_bpb" in val and {k: row[k] for k in val} == pytest.approx({k: one[k] for k in val}, rel=1e-4)


@pytest.mark.slow
def test_torchrun_sharded_checkpoint_resumes_in_another_layout(data_dir, base_run, layout_runs, tmp_path):
    """Checkpoints are one process's view: 8 steps under TP x ZeRO-3 on 4 processes, resumed on
    2 pipeline stages, end where one process does."""
    args = common(data_dir) + MODEL + RESUME_ARGS + ["--out_dir", "out"]
    # a copy of the layout test's 4-process run, without its step-12 checkpoint: step 8's is
    # then the latest
    shutil.copytree(layout_runs("tp2-zero3-4procs")[0] / "out", tmp_path / "out")
    shutil.rmtree(ckpt(str(tmp_path / "out"), 12))
    rc, stdout = run_torchrun(args + ["--resume", "--pp", "2"], tmp_path, timeout=240)
    assert rc == 0, stdout[-3000:]
    assert re.search(r"restored \S*step_000008 \(step 8\)", stdout), stdout[-2000:]
    _same_run(base_run["out"], str(tmp_path / "out"), 1e-4)


def test_layout_errors_name_the_flag(tmp_path):
    for flags, message in ((["--tp", "2"], "--tp 2 x --pp 1 must divide the 1 processes"),
                           (["--parallel_impl", "mpi"], "--parallel_impl 'mpi'"),
                           (["--fsdp", "--zero_stage", "4"], "--zero_stage 4")):
        proc = run_train(["--tokenizer", "bytes", "--max_steps", "1"] + flags, tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_torchrun_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(data_dir, tmp_path):
    # Preemption notices do not reach every rank at the same step. If each rank decided alone, the
    # signalled one would save (barrier) and leave while the others block in the next step's gradient
    # all-reduce: no checkpoint, and a hang until the process-group timeout (30 min on gloo).
    out = str(tmp_path / "out")
    log = str(tmp_path / "run.log")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           TRAIN] + common(data_dir) + MODEL + ["--max_steps", "200", "--ckpt_every", "1000", "--out_dir", "out"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    workers = []
    try:
        wait_for_step(proc, out, 3, log)
        ranks = {int(env["RANK"]): pid for pid, env in _children(proc.pid).items() if "RANK" in env}
        workers = list(ranks.values())
        assert sorted(ranks) == [0, 1], f"torchrun's workers not found: {ranks}"
        os.kill(ranks[1], signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running 10 s after SIGTERM to rank 1 (last step logged "
                        f"{read_metrics(out)[-1]['step']}, checkpoints {ckpt_steps(out)}): the ranks deadlocked")
    finally:
        end_torchrun(proc, workers)
    assert rc == 0
    last = read_metrics(out)[-1]["step"]
    assert ckpt_steps(out)[-1] == last and trainer_json(ckpt(out, last))["step"] == last


# -----------------------------------------------------------------------------
# 4. Mid-training: from this script's checkpoint (longer context, new rope_theta) and from HF

@pytest.mark.slow
def test_midtrain_from_checkpoint_extends_context(data_dir, base_run, tmp_path):
    init = ckpt(base_run["out"], 12)          # 12 pretraining steps at seq_len 64
    proc = check(run_train(common(data_dir) + [
        "--stage", "midtrain", "--init", init, "--seq_len", "128", "--rope_theta", "100000",
        "--max_seq_len", "256", "--max_steps", "3", "--out_dir", "mid"], tmp_path))
    out = str(tmp_path / "mid")
    cfg = config_json(out)
    assert cfg["model"]["rope_theta"] == 100000.0
    assert cfg["model"]["max_seq_len"] == 256
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["nope_layers"] == [1]   # from the checkpoint, not the preset
    assert cfg["train"]["stage"] == "midtrain" and cfg["train"]["seq_len"] == 128
    # the weights it started from are the checkpoint's, bit for bit (step 0 is saved before training)
    assert_bitwise(load_file(os.path.join(init, "model.safetensors")),
                   load_file(os.path.join(ckpt(out, 0), "model.safetensors")), "--init weights")
    # a trained model: the first loss is far below ln(vocab), where a fresh model starts
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] < LN_V - 1.5, f"first mid-training loss {rows[0]['loss']:.3f}, ln(V) = {LN_V:.3f}"
    items = preflight_lines(proc.stdout)
    assert items, proc.stdout[-2000:]
    assert not [i for i in items if i[0] == "FAIL"], items
    status, item, detail = items[0]
    assert (status, item) == ("PASS", "initial loss") and "trained model" in detail
    # the preflight's loss is on the run's first batch: the same as step 1's loss
    assert float(detail.split()[0]) == pytest.approx(rows[0]["loss"], abs=1e-3)


def test_midtrain_refuses_architecture_change(data_dir, tmp_path):
    import model as M
    import train
    init = str(tmp_path / "ckpt" / "step_000000")     # a checkpoint as train.py writes it (no optimizer state)
    train.save_checkpoint(init, M.Model(M.ModelConfig(vocab_size=257, n_layer=2, dim=64, n_head=4, n_kv_head=2,
                                                      mlp_dim=96)), None, {"step": 0})
    proc = run_train(common(data_dir) + ["--stage", "midtrain", "--init", init, "--seq_len", "64", "--n_layer", "3",
                                         "--max_steps", "2", "--out_dir", "bad"], tmp_path)
    assert proc.returncode != 0
    assert "n_layer" in proc.stderr and "cannot change" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, "a clear message, not a traceback:\n" + proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")


def test_midtrain_from_hugging_face_directory(data_dir, tmp_path):
    import model as M
    hf = tmp_path / "hf"
    src = M.Model(M.ModelConfig(vocab_size=257, n_layer=2, dim=64, n_head=4, n_kv_head=2, mlp_dim=96, max_seq_len=256))
    src.save_pretrained(str(hf))
    proc = check(run_train(common(data_dir) + ["--stage", "midtrain", "--init", str(hf), "--seq_len", "64",
                                               "--max_steps", "2", "--out_dir", "out"], tmp_path))
    out = str(tmp_path / "out")
    mc = config_json(out)["model"]
    assert (mc["n_layer"], mc["dim"], mc["mlp_dim"], mc["max_seq_len"]) == (2, 64, 96, 256)
    assert mc["vocab_size"] >= 257
    # the HF weights were loaded, not a fresh init: step 0's checkpoint holds them exactly
    hf_weights = {k.removeprefix("model."): v for k, v in load_file(str(hf / "model.safetensors")).items()}
    assert_bitwise(hf_weights, load_file(os.path.join(ckpt(out, 0), "model.safetensors")), "--init HF weights")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert not [i for i in preflight_lines(proc.stdout) if i[0] == "FAIL"]


# -----------------------------------------------------------------------------
# 5. The command line

def test_unknown_key_lists_valid_keys(tmp_path):
    import train
    proc = run_train(["--lrr", "3"], tmp_path)
    assert proc.returncode != 0
    assert "unknown key 'lrr'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    train_part, model_part = proc.stderr.split("Training keys:")[1].split("Model keys:")
    for f in fields(train.TrainConfig):
        assert f.name in re.findall(r"\w+", train_part), f"training key {f.name} not listed"
    for f in fields(train.M.ModelConfig):
        assert f.name in re.findall(r"\w+", model_part), f"model key {f.name} not listed"
    assert not os.listdir(tmp_path), "nothing is written for a bad command line"


def test_key_equals_value_form_keeps_the_value(tmp_path):
    # --key=value keeps the value as given (dashes turn into underscores in the key only):
    # --lr=-1e-3 is the number, and --max-steps is --max_steps. The unknown key at the end then
    # stops the run before any work, so reaching it means everything before it parsed.
    proc = run_train(["--lr=-1e-3", "--max-steps", "3", "--lrr", "1"], tmp_path)
    assert proc.returncode != 0
    assert "unknown key 'lrr'" in proc.stderr, proc.stderr[-1000:]


@pytest.fixture(scope="module")
def toml_run(data_dir, tmp_path_factory):
    """A 2-step run from a TOML file with a [model] table, and --lr on top of it."""
    cwd = tmp_path_factory.mktemp("toml")
    (cwd / "run.toml").write_text(f"""
data_dir = {json.dumps(str(data_dir))}
tokenizer = "bytes"
seq_len = 64
batch_size = 4
total_batch_tokens = 512
max_steps = 2
warmup_steps = 1
eval_every = 100
sample_tokens = 0
lr = 1e-3
out_dir = "from_toml"

[model]
n_layer = 1
dim = 64
n_head = 4
n_kv_head = 2
mlp_dim = 96
nope_layers = []
""")
    proc = check(run_train(["--config", "run.toml", "--lr", "2e-3"], cwd))
    return {"out": str(cwd / "from_toml"), "stdout": proc.stdout}


def test_toml_config_with_model_table_and_flag_override(toml_run):
    cfg = config_json(toml_run["out"])
    assert cfg["train"]["max_steps"] == 2 and cfg["train"]["seq_len"] == 64 and cfg["train"]["tokenizer"] == "bytes"
    assert cfg["train"]["lr"] == 2e-3                    # the flag wins over the file
    m = cfg["model"]
    assert (m["n_layer"], m["dim"], m["n_head"], m["n_kv_head"], m["mlp_dim"]) == (1, 64, 4, 2, 96)
    assert m["nope_layers"] == []
    rows = read_metrics(toml_run["out"])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(2e-3)           # warmup of 1 step: step 1 runs at the full lr


# -----------------------------------------------------------------------------
# 6. --plot on a finished run

def test_plot_finished_run(toml_run, tmp_path):
    run_dir = toml_run["out"]
    png = os.path.join(run_dir, "curves.png")
    if os.path.exists(png):
        os.remove(png)            # the run itself plots at its end when matplotlib is there
    proc = run_train(["--plot", run_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(png) > 1000
        assert f"wrote {png}" in proc.stdout
    else:
        assert "pip install matplotlib" in proc.stderr
        assert not os.path.exists(png)


# -----------------------------------------------------------------------------
# 5. MoE under torchrun: the routing counts are all-reduced inside every MoE forward, and the
# aux-loss-free bias moves on the load of the whole global batch, so 2 processes = 1 process
# with 2 accumulation steps here too (no auxiliary loss: its global statistics are a running
# estimate over micro-batches in one process but exact across ranks, and differ by design).

MOE_ARGS = ["--n_experts", "4", "--top_k", "2", "--d_expert", "32", "--router", "sigmoid",
            "--bias_update_rate", "0.01", "--max_steps", "6", "--ckpt_every", "6"]


@pytest.mark.slow
def test_torchrun_moe_matches_one_process(data_dir, tmp_path):
    check(run_train(common(data_dir) + MODEL + MOE_ARGS + ["--out_dir", "one"], tmp_path))
    rc, stdout = run_torchrun(common(data_dir) + MODEL + MOE_ARGS + ["--out_dir", "two"], tmp_path)
    assert rc == 0, f"torchrun exited {rc}:\n{stdout[-3000:]}"
    m1, m2 = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 7))
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5), f"step {r1['step']}"
        # the load the bias update sees; step 1's would include preflight's forwards if they counted
        assert r2["moe/1/max_load"] == pytest.approx(r1["moe/1/max_load"], rel=1e-6), f"step {r1['step']}"
    w1 = load_file(os.path.join(ckpt(str(tmp_path / "one"), 6), "model.safetensors"))
    w2 = load_file(os.path.join(ckpt(str(tmp_path / "two"), 6), "model.safetensors"))
    bias = [k for k in w1 if k.endswith("e_score_correction_bias")]
    assert bias and any(w1[k].abs().max() > 0 for k in bias)      # the bias moved
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")


# -----------------------------------------------------------------------------
# 7. KTO under ZeRO-3: its KL baseline's forward runs under no_grad between the policy's forward
# and backward, which must leave the backward the weights it needs

@pytest.mark.slow
def test_torchrun_kto_under_zero3_matches_one_process(tmp_path):
    import dpo
    import model as M
    import tokenizer
    import train
    # the chat template's special tokens over plain bytes (no merges: trained in no time), and a
    # random model that uses it
    tokenizer.Tokenizer.train(["x"], 261, verbose=False).save(str(tmp_path / "tok"))
    torch.manual_seed(0)
    net = M.Model(M.ModelConfig(vocab_size=261, n_layer=2, dim=64, n_head=4, n_kv_head=2, mlp_dim=96, max_seq_len=256))
    train.save_checkpoint(str(tmp_path / "init"), net, None, {"step": 0, "config": {"tokenizer": str(tmp_path / "tok.json")}})
    # paired records: KTO unpairs them; 160 (of 1 to 3 digits) hold out 2 pairs, 4 examples, enough for 2 ranks
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(rec) + "\n"
                                                  for _, rec in dpo.builtin_pairs(n=80, seed=2, digits=3)["train"][:160]))
    args = ["--stage", "dpo", "--loss", "kto", "--init", "init", "--pref_data", "pairs.jsonl", "--seq_len", "128",
            "--total_batch_tokens", "512", "--max_steps", "2", "--ckpt_every", "2", "--lr", "1e-3",
            "--warmup_steps", "1", "--eval_tasks", "", "--eval_batches", "1", "--sample_tokens", "0",
            "--preflight", "false"]
    # the same 4 examples a step: one process takes them in one micro-batch (KTO's baseline is a
    # mean over the global batch, all-reduced across ranks, so accumulation would change it)
    check(run_train(args + ["--batch_size", "4", "--out_dir", "one"], tmp_path))
    rc, stdout = run_torchrun(args + ["--batch_size", "2", "--fsdp", "--out_dir", "two"], tmp_path)
    assert rc == 0, f"torchrun exited {rc}:\n{stdout[-3000:]}"
    m1, m2 = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2]
    assert m1[-1]["train/kl"] > 0.1          # the baseline forward's output reached the loss
    for r1, r2 in zip(m1, m2):
        for k in ("loss", "grad_norm", "train/kl"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), f"step {r1['step']} {k}"
    w0 = load_file(str(tmp_path / "init" / "model.safetensors"))
    w1, w2 = (load_file(os.path.join(ckpt(str(tmp_path / out), 2), "model.safetensors")) for out in ("one", "two"))
    assert set(w1) == set(w2)
    for k in w1:
        assert (w1[k] - w0[k]).abs().max() > 1e-3, f"{k} did not train"
        # (AdamW divides by |g|: an element whose gradient is float noise, summed in another order
        # over two ranks, moves by a noise-sized fraction of lr; 1e-5 is 1% of one step's lr)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
