"""bench.py parallel at a tiny size: two gloo processes, one counted step after one warm-up.

The benchmark's claim about communication rests on counting the bytes at the collectives, so
the counting itself is pinned here: data parallelism and ZeRO-1 and -2 send 2(W-1)/W P per rank per step, ZeRO-3
and FSDP2 (W-1)/W (3P - P_root), and the wrappers leave torch.distributed as they found it."""

import torch.distributed as dist

import bench
import parallel

# Widths that split evenly over 2 ranks: no padding rows, so the count is exact up to the
# clipping norm's 4-byte all-reduce (ours) and float rounding.
SMALL = dict(vocab_size=256, n_layer=2, dim=32, n_head=4, n_kv_head=2, mlp_dim=64)


def test_counted_bytes_match_the_analysis():
    every = bench.parallel_results(world=2, impls=("dp", "zero1", "zero2", "zero3", "fsdp2"), preset="tiny", overrides=SMALL,
                                   rows=2, seq_len=16, steps=1, warmup=1)
    res = every[0]
    P, P_root, W = res["P"], res["P_root"], res["world"]
    assert W == 2 and 0 < P_root < P
    for impl in ("dp", "zero1", "zero2", "zero3", "fsdp2"):
        got = {rank: sum(r["impls"][impl]["counted"].values()) for rank, r in enumerate(every)}
        want, _ = bench.analytical_bytes(impl, P, P_root, W)
        assert got[0] == got[1], (impl, got)    # a ring sends the same from every rank
        assert abs(got[0] - want) <= 16, (impl, got[0], want)
    assert set(res["impls"]["dp"]["counted"]) == {"all_reduce"}
    # stage 3: two gathers of the blocks, one of the root, one reduce-scatter of everything
    zero3 = res["impls"]["zero3"]["counted"]
    assert abs(zero3["all_gather"] - (2 * P - P_root) / 2) <= 1 and abs(zero3["reduce_scatter"] - P / 2) <= 1


def test_the_counters_restore_the_collectives():
    names = [(parallel, "all_gather_flat"), (parallel, "reduce_scatter_flat"), (dist, "all_reduce"),
             (dist, "broadcast")]
    before = [getattr(m, n) for m, n in names]
    counts = {}
    try:
        with bench.counted_collectives(2, counts):
            assert all(getattr(m, n) is not f for (m, n), f in zip(names, before))
            raise RuntimeError("a step that fails")
    except RuntimeError:
        pass
    assert [getattr(m, n) for m, n in names] == before
