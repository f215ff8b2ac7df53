"""Tests for parallel.py's pipeline parallelism, with gloo processes on this CPU (torch.multiprocessing): GPipe and 1F1B
against one process doing gradient accumulation over the same micro-batches (losses and the
weights after 3 AdamW steps, tied and untied embeddings, document-packed rows), the peak number
of micro-batches alive per stage, the parameters each stage keeps, the refusals; and, without
processes, that neither schedule can deadlock even if every send waits for its receive."""

import pytest
import torch
import torch.distributed as dist

from conftest import spawn
import parallel as pp
from model import Model, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

SMALL = dict(vocab_size=256, n_layer=4, dim=32, n_head=4, n_kv_head=2, mlp_dim=64, max_seq_len=64)
STEPS, MICRO = 3, 4


def _join(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _micro_batches(steps=STEPS, micro=MICRO, rows=2, T=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        mbs = []
        for i in range(micro):
            x = torch.randint(0, 256, (rows, T + 1), generator=g)
            b = {"input_ids": x[:, :-1], "labels": x[:, 1:].clone(),
                 "position_ids": torch.arange(T).expand(rows, T).clone()}
            if step == 0 and i == 1:
                # Packed documents: row 0 holds two (positions restart at 0 mid-row), so the
                # attention mask is a real document mask on every stage; a label is ignored.
                b["position_ids"][0, 6:] = torch.arange(T - 6)
                b["labels"][1, :3] = -100
            mbs.append(b)
        out.append(mbs)
    return out


def _reference(state, tied, steps):
    """One process, the whole model, gradient accumulation over each step's micro-batches."""
    model = Model(ModelConfig(**SMALL, tie_embeddings=tied))
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for mbs in steps:
        for b in mbs:
            _, loss, _ = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
            (loss / len(mbs)).backward()
            losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses), model.state_dict()


CONFIGS = [(2, "gpipe", True), (2, "gpipe", False), (2, "1f1b", True), (2, "1f1b", False), (3, "1f1b", True)]


def _pp_worker(rank, store, runs, out):
    """Every configuration in one spawn of 3 processes (spawning costs seconds): the 2-stage
    pipelines run in a group of global ranks 1 and 2, so stage numbers differ from global ranks."""
    torch.set_num_threads(1)
    _join(rank, 3, store)
    pair = dist.new_group([1, 2])
    results = {}
    for (world, schedule, tied), (state, steps) in runs.items():
        if world == 2 and rank == 0:
            continue
        model = Model(ModelConfig(**SMALL, tie_embeddings=tied))
        model.load_state_dict(state)
        if rank > 3 - world:        # not stage 0: other values here, the stage must take stage 0's
            with torch.no_grad():
                model.embed_tokens.weight.normal_()
        stage = pp.PipelineStage(model, group=pair if world == 2 else None)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-2, weight_decay=0.1)
        losses, peaks, has_aux = [], [], []
        for mbs in steps:
            step_losses, aux = pp.pipeline_step(stage, mbs, schedule)
            losses += step_losses
            peaks.append(stage.peak_in_flight)
            has_aux.append(aux is not None and len(aux) == len(mbs) and all("ce" in a for a in aux))
            opt.step()
            opt.zero_grad(set_to_none=True)
        ev = pp.pipeline_forward(stage, steps[0][1])      # evaluation: forward only, the packed batch
        results[(world, schedule, tied)] = {
            "eval": None if ev is None else ev[1], "losses": torch.stack(losses), "weights": stage.model.state_dict(), "peaks": peaks,
            "has_aux": has_aux, "n_params": sum(p.numel() for p in stage.parameters()), "layers": (stage.lo, stage.hi)}
    if rank > 0:                    # two calls of 2 micro-batches before one optimizer step: the
        state, steps = runs[(2, "1f1b", True)]      # gradients (the tied one's too) add up
        model = Model(ModelConfig(**SMALL))
        model.load_state_dict(state)
        stage = pp.PipelineStage(model, group=pair)
        pp.pipeline_step(stage, steps[0][:2])
        pp.pipeline_step(stage, steps[0][2:])
        params = list(stage.parameters())
        results["norm"] = pp.clip_grad_norm_(params, 0.1, pair, [pp.pp_copies(stage, p) for p in params])
        results["two_calls"] = {k: p.grad for k, p in stage.model.named_parameters()}
    try:                            # more stages than layers
        pp.PipelineStage(Model(ModelConfig(**{**SMALL, "n_layer": 2})))
    except ValueError as e:
        results["error"] = str(e)
    torch.save(results, f"{out}.{rank}")
    # every rank done before any tears down: a rank that exits while another's last gloo
    # exchange is in flight can abort it ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config: (state, want_losses, want_weights, [each stage's results])}. 3 stages: 1F1B with a
    middle stage that both receives activations and sends gradients, 1 step."""
    todo, ref = {}, {}
    for world, schedule, tied in CONFIGS:
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in Model(ModelConfig(**SMALL, tie_embeddings=tied)).state_dict().items()}
        steps = _micro_batches(STEPS if world == 2 else 1)
        todo[(world, schedule, tied)] = (state, steps)
        ref[(world, schedule, tied)] = _reference(state, tied, steps)
    tmp = tmp_path_factory.mktemp("pp")
    spawn(_pp_worker, args=(str(tmp / "store"), todo, str(tmp / "out")), nprocs=3)
    got = [torch.load(tmp / f"out.{r}") for r in range(3)]
    out = {key: (state, *ref[key], [g[key] for g in got[3 - key[0]:]]) for key, (state, _) in todo.items()}
    out["error"] = got[0]["error"]
    out["two_calls"] = [got[1]["two_calls"], got[2]["two_calls"]]
    out["norms"] = [got[1]["norm"], got[2]["norm"]]
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_pipeline_equals_gradient_accumulation(runs, config):
    """3 AdamW steps of 4 micro-batches through the pipeline end with one process's losses and
    weights, on every stage; the last stage alone returns the aux dicts."""
    world = config[0]
    _, want_losses, want, got = runs[config]
    # Same operations on the same numbers as one process, except the tied matrix's gradient,
    # whose two halves (embedding, head) are summed in another order: 1e-5 is far below one
    # AdamW step (lr 1e-2), which a lost or doubled gradient would be off by.
    seen = set()
    for r, g in enumerate(got):
        torch.testing.assert_close(g["losses"], want_losses, rtol=1e-5, atol=1e-5, msg=lambda s: f"rank {r} losses: {s}")
        for k, v in g["weights"].items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5, msg=lambda s: f"rank {r} {k}: {s}")
        seen |= set(g["weights"])
        assert g["has_aux"] == [r == world - 1] * len(g["peaks"])    # aux dicts on the last stage only
    assert seen == set(want)                                          # every weight lives on some stage
    # pipeline_forward (evaluation) gives the trained model's loss, on the last stage only
    model = Model(ModelConfig(**SMALL, tie_embeddings=config[2]))
    model.load_state_dict(want)
    b = _micro_batches(1)[0][1]                                       # steps[0][1], as the workers used
    _, loss, _ = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
    assert [g["eval"] is None for g in got] == [True] * (world - 1) + [False]
    torch.testing.assert_close(got[-1]["eval"], loss, rtol=1e-5, atol=1e-5)
    assert "embed_tokens.weight" in got[0]["weights"] and "norm.weight" in got[-1]["weights"]
    assert "lm_head.weight" in got[-1]["weights"] and "lm_head.weight" not in got[0]["weights"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_peak_micro_batches_in_flight(runs, config):
    """GPipe keeps the activations of all M micro-batches on stage 0; 1F1B at most n - s on stage s."""
    world, schedule, _ = config
    for s, g in enumerate(runs[config][3]):
        if schedule == "gpipe":
            assert g["peaks"] == [MICRO] * STEPS if s == 0 else max(g["peaks"]) <= MICRO
        else:
            assert g["peaks"] == [min(world - s, MICRO)] * len(g["peaks"]) and max(g["peaks"]) <= world


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_parameters_per_stage(runs, config):
    """Each stage holds its near-even slice of the layers and nothing else of them; the stages'
    parameters add up to the model's, the tied matrix once on each end stage."""
    world, _, tied = config
    state, _, _, got = runs[config]
    split = pp.split_layers(SMALL["n_layer"], world)
    assert [g["layers"] for g in got] == split
    embed = state["embed_tokens.weight"].numel()
    total = sum(v.numel() for k, v in state.items() if k != "lm_head.weight" or not tied)
    assert sum(g["n_params"] for g in got) == total + (embed if tied else 0)
    per_layer = sum(v.numel() for k, v in state.items() if k.startswith("layers.0."))
    for s, (g, (lo, hi)) in enumerate(zip(got, split)):
        assert {int(k.split(".")[1]) for k in g["weights"] if k.startswith("layers.")} == set(range(lo, hi))
        ends = (embed if s == 0 else 0) + (SMALL["dim"] + embed if s == world - 1 else 0)
        assert g["n_params"] == (hi - lo) * per_layer + ends            # + embedding / + norm and head
    assert runs["error"] == "PipelineStage: 3 stages need at least as many layers (the model has 2)"


def test_gradients_add_up_across_calls_and_clip_as_one_model(runs):
    """pipeline_step twice (2 micro-batches each, each loss / 2) before one optimizer step, then
    clip_grad_norm_: the norm and the clipped gradients are those of one process running the 4
    micro-batches with loss / 2 each, the tied matrix's on both end stages."""
    state, steps = runs[(2, "1f1b", True)][0], _micro_batches(1)
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(state)
    for b in steps[0]:
        (model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])[1] / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert norm > 0.1                   # so that clipping really scales
    for got in runs["norms"]:
        torch.testing.assert_close(got, norm)
    want = dict(model.named_parameters())
    want["lm_head.weight"] = model.lm_head.weight
    for got in runs["two_calls"]:
        for k, g in got.items():
            torch.testing.assert_close(g, want[k].grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{k}: {s}")


def test_one_stage_is_gradient_accumulation_and_refusals():
    """Without a process group, a stage is the whole model: pipeline_step is plain gradient
    accumulation. MoE models, models missing an attribute, unknown schedules are refused."""
    torch.manual_seed(0)
    state = Model(ModelConfig(**SMALL)).state_dict()
    steps = _micro_batches(1)
    want_losses, want = _reference(state, True, steps)
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(state)
    stage = pp.PipelineStage(model)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2, weight_decay=0.1)
    losses, aux = pp.pipeline_step(stage, steps[0], "1f1b")
    opt.step()
    torch.testing.assert_close(torch.stack(losses), want_losses)
    for k, v in stage.model.state_dict().items():
        torch.testing.assert_close(v, want[k])
    assert len(aux) == MICRO and stage.peak_in_flight == 1

    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        pp.pipeline_step(stage, steps[0], "zigzag")
    moe = Model(ModelConfig(**{**SMALL, "n_layer": 2}, n_experts=4, top_k=2))
    with pytest.raises(ValueError, match="MoE layers are not supported"):
        pp.PipelineStage(moe)
    with pytest.raises(ValueError, match="the model has no embed, block_inputs"):
        pp.PipelineStage(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="3 stages need at least as many layers"):
        pp.split_layers(2, 3)
    assert pp.split_layers(5, 2) == [(0, 3), (3, 5)] and pp.split_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


# -----------------------------------------------------------------------------
# Deadlock freedom, simulated: every send waits for its receive (rendezvous, as NCCL)

_PARTNER = {"send_act": (1, "recv_act"), "recv_act": (-1, "send_act"),
            "send_grad": (-1, "recv_grad"), "recv_grad": (1, "send_grad")}


def _runs_to_the_end(plans):
    """Each rank walks its plan; a batch of sends/receives completes once every op's partner on
    the neighbouring rank has been posted (that rank stands at or past the partner's batch)."""
    n, where = len(plans), {}
    for s, plan in enumerate(plans):
        for k, (op, arg) in enumerate(plan):
            for kind, i in arg if op == "comm" else ():
                where[(s, kind, i)] = k
    for (s, kind, i) in where:                  # every send has exactly its receive
        d, other = _PARTNER[kind]
        assert (s + d, other, i) in where
    pos, moved = [0] * n, True
    while moved:
        moved = False
        for s in range(n):
            while pos[s] < len(plans[s]):
                op, arg = plans[s][pos[s]]
                if op == "comm" and any(pos[s + _PARTNER[kind][0]] < where[(s + _PARTNER[kind][0], _PARTNER[kind][1], i)]
                                        for kind, i in arg):
                    break
                pos[s] += 1
                moved = True
    return all(pos[s] == len(plans[s]) for s in range(n))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_schedules_never_deadlock(schedule):
    for n in range(1, 9):
        for m in range(1, 13):
            plans = [pp.p2p_plan(schedule, n, s, m) for s in range(n)]
            assert _runs_to_the_end(plans), (schedule, n, m)
            for s in range(n):                  # each micro-batch forwarded and backwarded once, F before B
                ops = [x for x in plans[s] if x[0] != "comm"]
                assert sorted(ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(m))
    # Why the batches: 1F1B with each send and receive on its own deadlocks at once.
    unbatched = [[(op, [c]) if op == "comm" else (op, arg) for op, arg in plan
                  for c in (arg if op == "comm" else [None])] for plan in plans]
    assert _runs_to_the_end(unbatched) == (schedule == "gpipe")


def test_bubble_fraction_and_timeline():
    assert pp.bubble_fraction(4, 8) == pytest.approx(3 / 11) and pp.bubble_fraction(1, 5) == 0
    for schedule in ("gpipe", "1f1b"):
        rows = pp.timeline(schedule, 4, 8)
        idle = sum(r.count(".") for r in rows) / sum(len(r) for r in rows)
        assert idle == pytest.approx(pp.bubble_fraction(4, 8))
