"""Planning for many GPUs: the dp x cp x tp split and its defaults, sizes and FLOPs at the
per-rank shapes, ring attention's workspace, FSDP2's headroom, what `show` prints, and every
bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import ROOT
from memoplan.errors import InfeasibleError
from memoplan.hardware import get_hardware
from memoplan.ir import Profile, SizeLaw
from memoplan.solve import SolveConfig, solve_plan
from memoplan.solve.levels import level1_requests
from memoplan.solve.parallel import ring_workspace
from memoplan.solve.plan import check_pinned
from memoplan.solve.swap import decide_swaps, layer_bytes, layer_times
from memoplan.units import fmt_bytes

PROFILES = ROOT / "examples" / "profiles"
TINY = PROFILES / "llama_tiny.json"  # examples/llama/model.py, float32, attention output 256 B/token


def _load(name: str) -> Profile:
    return Profile.from_json(json.loads((PROFILES / f"{name}.json").read_text()))


@pytest.fixture(scope="module")
def tiny() -> Profile:
    return _load("llama_tiny")


def _cfg(seq: int, **kw) -> SolveConfig:
    return SolveConfig(seq=seq, hardware=kw.pop("hw", get_hardware("h200")),
                       time_limit=kw.pop("time_limit", 2.0), **kw)


# ---- the split and its defaults --------------------------------------------------------------

@pytest.mark.parametrize("given, expect", [
    (dict(gpus=8), (8, 1, 1)),                        # one node: context parallel over all 8
    (dict(gpus=16), (8, 2, 1)),                       # two nodes: cp within a node, dp across
    (dict(gpus=16, gpus_per_node=4), (4, 4, 1)),
    (dict(gpus=8, cp=2), (2, 4, 1)),
    (dict(gpus=8, dp=2), (4, 2, 1)),
    (dict(gpus=8, dp=2, cp=4), (4, 2, 1)),
    (dict(gpus=2, tp=1, cp=1), (1, 2, 1)),            # plain FSDP2 on 2 ranks
    (dict(gpus=8, tp=2), (4, 1, 2)),                  # 4 ranks of 2 per node
    (dict(gpus=6), (6, 1, 1)),
    (dict(gpus=12), (6, 2, 1)),                       # the largest cp that divides and fits a node
    (dict(gpus=1), (1, 1, 1)),
])
def test_degrees_and_their_defaults(given, expect):
    seq = 3 << 20  # splits evenly for every case
    cfg = _cfg(seq, **given)
    assert (cfg.cp, cfg.dp, cfg.tp) == expect
    assert cfg.dp * cfg.cp * cfg.tp == cfg.gpus
    assert cfg.tokens_per_gpu == seq // (cfg.cp * cfg.tp)
    assert cfg.local_seq == seq // cfg.cp
    assert cfg.rotate_method == (None if cfg.cp == 1 else "alltoall")
    assert cfg.to_json()["tp_runtime_supported"] == (cfg.tp == 1)
    assert dataclasses.replace(cfg, keep_last=3).cp == cfg.cp  # resolved values carry over


# ---- per-rank shapes -------------------------------------------------------------------------

def _with_quadratic(p: Profile, name: str, c2: float) -> Profile:
    """``p`` with a quadratic term added to the size law of the saved tensor ``name`` and of its
    storage in the request trace (as eager attention's scores would have)."""
    def more(law: SizeLaw) -> SizeLaw:
        return SizeLaw(coeffs=(*law.coeffs[:2], c2))

    saved = tuple(dataclasses.replace(t, law=more(t.law)) if t.name == name else t
                  for t in p.layer.saved)
    tensors = tuple(dataclasses.replace(t, law=more(t.law)) if t.name == name else t
                    for t in p.layer.tensors)
    return dataclasses.replace(p, layer=dataclasses.replace(p.layer, saved=saved, tensors=tensors))


def test_sizes_are_the_laws_at_the_local_length_not_the_full_length_split(tiny):
    seq, cp = 64 * 1024, 8
    quad = _with_quadratic(tiny, "mul_8", 4.0)   # a token-wise saved tensor, now c S^2 too
    law = next(t.law for t in quad.layer.saved if t.name == "mul_8")
    right, wrong = law.at(seq // cp), law.at(seq) / cp
    assert wrong > 7 * right                     # cp times the quadratic term apart
    cfg = _cfg(seq, gpus=cp, align=1)
    split = next(s for s in layer_bytes(quad, cfg).splits if s.name == "mul_8")
    assert split.nbytes == math.ceil(right) and split.tokens == seq // cp
    assert split.row == pytest.approx(right / (seq // cp))
    # the level-1 request of its storage (skeletal, so not in level 1): a transient instead
    t = next(t for t in tiny.layer.tensors if t.role == "transient" and t.law.degree == 1)
    quad_t = _with_quadratic(tiny, t.name, 4.0)
    sizes = {i: b for op, i, b in level1_requests(quad_t, cfg, "forward") if op == "malloc"}
    law_t = next(x.law for x in quad_t.layer.tensors if x.id == t.id)
    assert sizes[t.id] == math.ceil(law_t.at(seq // cp)) != math.ceil(law_t.at(seq) / cp)
    # tensor parallelism divides what the local length gives
    tp = _cfg(seq, gpus=2 * cp, tp=2, cp=cp, align=1)
    assert next(s for s in layer_bytes(quad, tp).splits if s.name == "mul_8").nbytes \
        == math.ceil(right / 2)


def test_flops_token_wise_at_the_local_length_attention_full_over_cp(tiny):
    seq, cp = 256 * 1024, 8
    f, b = tiny.layer.flops_forward, tiny.layer.flops_backward
    assert f.mixing_law.degree == 2
    hw = get_hardware("h200")
    matmul, attention = hw.matmul_tflops * 1e12, hw.attn_fwd_tflops * 1e12
    balanced = layer_times(tiny, _cfg(seq, gpus=cp))
    tw = f.token_wise_law.at(seq // cp)
    assert balanced.flops_forward == pytest.approx(tw + f.mixing_law.at(seq) / cp)
    # the cost model's classes: matmuls at the local length, attention at the full length / cp
    fwd = balanced.parts["forward"]
    assert fwd["matmul"] == pytest.approx(tw / matmul)
    assert fwd["attention"] == pytest.approx(f.mixing_law.at(seq) / cp / attention)
    assert balanced.forward == pytest.approx(sum(fwd.values()))
    assert balanced.token_wise_forward == pytest.approx(fwd["matmul"] + fwd["memory"])
    # not the mixing law at the local length: a rank's queries meet all keys
    assert balanced.flops_forward > 7 * (tw + f.mixing_law.at(seq // cp)) / 8
    assert balanced.flops_backward == pytest.approx(b.token_wise_law.at(seq // cp)
                                                    + b.mixing_law.at(seq) / cp)
    # without load balancing the last causal rank does (2cp - 1)/cp^2 of the attention, and the
    # layer waits for it; MFU still counts the average
    slow = layer_times(tiny, _cfg(seq, gpus=cp, load_balance=False))
    assert slow.parts["forward"]["attention"] * attention == pytest.approx(
        f.mixing_law.at(seq) * 15 / 64)
    assert slow.forward - balanced.forward == pytest.approx(
        f.mixing_law.at(seq) * (15 / 64 - 1 / 8) / attention)
    assert slow.flops_forward == pytest.approx(balanced.flops_forward)
    # one GPU: what it always was
    one = layer_times(tiny, _cfg(seq))
    assert one.flops_forward == pytest.approx(f.total_at(seq))


# ---- ring attention's workspace and FSDP2's headroom -----------------------------------------

def _align(n: int) -> int:
    return -(-n // 512) * 512


def _expected_ring(seq: int, cp: int, method: str) -> dict:
    """The workspace formulas of solve.parallel, from the tiny layer's attention output (fp32,
    4 heads of 16: 256 bytes and 64 elements per token; 4 rows of logsumexp per token)."""
    tokens = seq // cp
    o, f, r = 256 * tokens, 4 * 64 * tokens, 4 * 4 * tokens
    blocks = {"alltoall": (2, 2) if cp == 2 else (3, 3), "allgather": (cp, cp + 1)}[method]
    return {"forward": {"kv": _align(2 * o * blocks[0]), "merge": _align(4 * (f + r) + o)},
            "backward": {"kv": _align(2 * o * blocks[1]), "dkv": _align(6 * f),
                         "dq": _align(2 * f + 6 * o)}}


@pytest.mark.parametrize("seq, cp, method", [(64 * 1024, 8, "alltoall"), (64 * 1024, 8, "allgather"),
                                              (8192, 2, "alltoall"), (8192, 4, "allgather")])
def test_ring_workspace_is_the_formula_and_sits_in_level_1(tiny, seq, cp, method):
    cfg = _cfg(seq, gpus=cp, rotate_method=method)
    expect = _expected_ring(seq, cp, method)
    assert ring_workspace(tiny, cfg) == expect
    for phase, parts in expect.items():
        reqs = level1_requests(tiny, cfg, phase)
        ring = [(op, i, b) for op, i, b in reqs if isinstance(i, str)]
        assert ring == ([("malloc", f"ring:{k}", v) for k, v in parts.items()]
                        + [("free", f"ring:{k}", v) for k, v in parts.items()])
        # around the attention op: allocated before its outputs (forward) or its gradients
        # (backward), freed right after them
        first = reqs.index(ring[0])
        last = reqs.index(ring[-1])
        assert all(op == "malloc" for op, _, _ in reqs[first:last - len(parts) + 1])


def _ring_peaks(cp: int, method: str, shape: tuple[int, ...], tmp_path) -> tuple[int, int]:
    """Peak bytes PyTorch's ring attention holds, forward and backward, on rank 1 of ``cp``
    (a fake process group in this process), with attention ops that only allocate their
    outputs: the ring's own buffers plus its steps' outputs, from the profiler's memory
    events."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._context_parallel import _attention as ring
    from torch.profiler import ProfilerActivity, profile
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def fwd_op(q, k, v, is_causal, **kw):
        return torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32)

    def bwd_op(grad_out, query, key, value, out, logsumexp, is_causal, **kw):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def peak(run) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        path = tmp_path / "trace.json"
        prof.export_chrome_trace(str(path))
        events = sorted((e for e in json.loads(path.read_text())["traceEvents"]
                         if e.get("name") == "[memory]"), key=lambda e: e["ts"])
        base = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
        return max(e["args"]["Total Allocated"] for e in events) - base

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    options = dataclasses.replace(ring._cp_options)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=cp)
    try:
        ring._cp_options.enable_load_balance = True
        ring._cp_options.rotate_method = {"alltoall": ring._RotateMethod.ALL_TO_ALL,
                                          "allgather": ring._RotateMethod.ALL_GATHER}[method]
        q, k, v = (torch.zeros(shape, dtype=torch.bfloat16) for _ in range(3))
        group, made = dist.group.WORLD, {}
        fwd = peak(lambda: made.update(out=ring._templated_ring_attention(
            group, 2, fwd_op, q, k, v, is_causal=True)))
        out, lse = made["out"][:2]
        bwd = peak(lambda: ring._templated_ring_attention_backward(
            group, 2, bwd_op, torch.zeros_like(out), "grad_out", q, k, v, out, lse,
            is_causal=True))
    finally:
        dist.destroy_process_group()
        for f in dataclasses.fields(options):
            setattr(ring._cp_options, f.name, getattr(options, f.name))
    return fwd, bwd


@pytest.mark.parametrize("cp, method", [(2, "alltoall"), (8, "alltoall"), (8, "allgather")])
def test_ring_workspace_covers_what_pytorchs_ring_holds(cp, method, tmp_path):
    p = _load("llama7b")  # attention output (1, 32, S, 128) in bf16
    local = 256
    ws = ring_workspace(p, _cfg(local * cp, gpus=cp, rotate_method=method))
    o = local * 32 * 128 * 2
    fwd, bwd = _ring_peaks(cp, method, (1, 32, local, 128), tmp_path)
    # alltoall's send copy of K/V is held by the collective while a step runs on a GPU; the
    # fake process group lets go of it at once
    fwd += 2 * o if method == "alltoall" and cp > 2 else 0
    planned_fwd = sum(ws["forward"].values())
    planned_bwd = sum(ws["backward"].values())  # its final dq, dk, dv included
    assert fwd <= planned_fwd <= 1.2 * fwd, (fwd / o, planned_fwd / o)
    assert bwd <= planned_bwd <= 1.1 * bwd, (bwd / o, planned_bwd / o)


def test_the_plan_records_and_budgets_the_ring_and_fsdp(tiny):
    seq, gpus = 64 * 1024, 8
    plan = solve_plan(tiny, _cfg(seq, gpus=gpus))
    c = plan.config
    assert (c["tp"], c["cp"], c["dp"], c["tokens_per_gpu"]) == (1, 8, 1, seq // 8)
    assert c["rotate_method"] == "alltoall" and c["load_balance"] is True
    assert c["ring_workspace"] == _expected_ring(seq, 8, "alltoall")
    for phase in ("forward", "backward"):
        lp = plan.levels[phase]
        ring = {k: v for k, v in lp.sizes.items() if k.startswith("ring:")}
        assert ring == {f"ring:{k}": v for k, v in c["ring_workspace"][phase].items()}
        assert {lp.kinds[k] for k in ring} == {"ring"}
        assert lp.peak >= sum(ring.values())
    # model states sharded over all 8; FSDP2's unsharded layers and reduce-scatter buffers
    params = tiny.model.param_bytes_total / 4
    assert plan.state_bytes == int(params * 16 / gpus)
    parts = plan.solver["pool_parts"]
    layer = tiny.model.param_bytes_per_layer
    assert parts["fsdp_unsharded_params"] == _align(2 * layer)
    assert parts["fsdp_reduce_scatter"] == _align(layer)  # fp32 grads of a float32 layer
    assert plan.pool_bytes == sum(parts.values())
    # one GPU: no ring, no FSDP2
    one = solve_plan(tiny, _cfg(8192))
    assert one.config["ring_workspace"] == {} and one.config["rotate_method"] is None
    assert not any(k.startswith("fsdp_") for k in one.solver["pool_parts"])
    assert not any(k.startswith("ring:") for k in one.levels["forward"].sizes)


def test_llama7b_at_1m_on_an_8_gpu_h200_node():
    """Issue 12's done-when, with the head the example really holds (its loss in chunks: at
    131072 tokens per GPU the logits and their gradient, ~20 GiB). A node with 512 GiB of host
    memory offloads every layer but the last ones at alpha ~0; with 110 GiB (the measured
    single-GPU box's) host memory runs out, most layers are checkpointed instead, the plan says
    so, and it is slower and fuller."""
    p = _load("llama7b")
    cfg = _cfg(1 << 20, gpus=8, keep_last=None, hw=get_hardware("h200", host_mem_gb=512))
    plan = solve_plan(p, cfg)
    c = plan.config
    assert (c["tp"], c["cp"], c["dp"], c["tokens_per_gpu"]) == (1, 8, 1, 131072)
    ws = c["ring_workspace"]
    assert sum(ws["forward"].values()) == 6 * 2**30 + 4 * (2 * 2**30 + 2**24) + 2**30
    assert sum(ws["backward"].values()) == 28 * 2**30
    assert set(plan.solver["pool_parts"]) >= {"fsdp_unsharded_params", "fsdp_reduce_scatter"}
    assert plan.predicted.gpu_bytes["plan"] <= 139 * 2**30
    assert {l.mode for l in plan.layers} == {"offload", "keep"}
    small = solve_plan(p, dataclasses.replace(cfg, hardware=get_hardware("h200", host_mem_gb=110)))
    modes = [l.mode for l in small.layers]
    assert modes.count("recompute") > len(modes) // 2
    assert small.solver["host_fallback"] and any("host memory" in n for n in small.notes)
    assert small.predicted.mfu["plan"] < plan.predicted.mfu["plan"]
    assert plan.predicted.gpu_bytes["plan"] < small.predicted.gpu_bytes["plan"] <= 139 * 2**30


def test_a_plan_that_does_not_fit_because_of_the_head_says_how_to_shrink_it():
    """gpt7b's file has no loss_fn: the default float32 surrogate loss holds ~88 GiB at 131072
    tokens per GPU, and the refusal says that a chunked loss would not."""
    cfg = _cfg(1 << 20, gpus=8, keep_last=None)
    with pytest.raises(InfeasibleError, match="does not fit") as e:
        solve_plan(_load("gpt7b"), cfg)
    assert "a loss computed a chunk of tokens at a time" in str(e.value)
    assert e.value.exit_code == 3


def test_pinned_host_memory_above_the_node_is_infeasible(tiny):
    cfg = _cfg(64 * 1024, gpus=8, alpha=1.0)
    d = decide_swaps(tiny, cfg)
    pinned = sum(l.host_bytes for l in d.layers) * 8
    check_pinned(d, cfg)
    small = dataclasses.replace(cfg, hardware=get_hardware("h200", host_mem_gb=pinned / 2**30 / 2))
    with pytest.raises(InfeasibleError, match="more than its") as e:
        check_pinned(d, small)
    assert e.value.exit_code == 3


# ---- the CLI: solve, show, bad input ---------------------------------------------------------

def test_cli_two_gpus_two_context_ranks_and_show(cli, tmp_path):
    out = tmp_path / "plan.json"
    r = cli("solve", TINY, "--seq", "256", "--gpus", "2", "--cp", "2", "--time-limit", "2",
            "-o", out, "-q")
    assert r.exit_code == 0, r.output
    c = json.loads(out.read_text())["config"]
    assert (c["gpus"], c["cp"], c["dp"], c["tp"], c["tokens_per_gpu"]) == (2, 2, 1, 1, 128)
    r = cli("show", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "dp 1 x cp 2 x tp 1: 128 tokens per GPU" in text
    assert "rotate alltoall, load balancing on" in text
    for phase, parts in c["ring_workspace"].items():
        assert f"{phase} {fmt_bytes(sum(parts.values()))} (" + ", ".join(
            f"{k} {fmt_bytes(v)}" for k, v in parts.items()) + ")" in text
    assert "FSDP2 states sharded over 2 ranks" in text
    facts = json.loads(cli("show", out, "--json").output)
    assert (facts["dp"], facts["cp"], facts["rotate_method"]) == (1, 2, "alltoall")
    assert facts["ring_workspace"] == c["ring_workspace"]


def test_cli_tp_is_planned_only_and_says_so(cli, tmp_path):
    out = tmp_path / "plan.json"
    r = cli("solve", TINY, "--seq", "8K", "--gpus", "8", "--tp", "2", "--no-load-balance",
            "--rotate-method", "allgather", "--time-limit", "2", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    c = json.loads(out.read_text())["config"]
    assert (c["tp"], c["cp"], c["dp"], c["tp_runtime_supported"]) == (2, 4, 1, False)
    assert (c["load_balance"], c["rotate_method"]) == (False, "allgather")
    text = " ".join(cli("show", out).output.split())
    assert "tp 2 planned only: the runtime refuses it" in text
    assert "rotate allgather, load balancing off" in text


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "--cp", "3"], "--cp 3 does not divide --gpus 8."),
    (["--gpus", "8", "--dp", "3"], "--dp 3 does not divide --gpus 8."),
    (["--gpus", "8", "--tp", "2", "--cp", "3"], "--cp 3 does not divide --gpus 8 / --tp 2 = 4."),
    (["--gpus", "8", "--dp", "2", "--cp", "2"], "--dp 2 x --cp 2 = 4 does not match --gpus 8"),
    (["--gpus", "8", "--tp", "3"], "--tp 3 does not divide --gpus 8."),
    (["--seq", "8200", "--gpus", "8"], "--seq 8200 does not split evenly under load balancing"),
    (["--seq", "8200", "--gpus", "8"], "2 x --cp 8 = 16 chunks"),
    (["--seq", "8196", "--gpus", "8"], "does not divide across 8 GPUs"),
    (["--gpus", "8", "--rotate-method", "ring"], "--rotate-method must be"),
    (["--gpus", "8", "--dp", "0"], "at least 1"),
])
def test_bad_parallel_options_exit_2(cli, tmp_path, args, message):
    out = tmp_path / "plan.json"
    r = cli("solve", TINY, *args, "--time-limit", "1", "-o", out)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists()


def test_cli_without_load_balancing_needs_only_cp_chunks(cli, tmp_path):
    out = tmp_path / "plan.json"
    r = cli("solve", TINY, "--seq", "8200", "--gpus", "8", "--no-load-balance",
            "--time-limit", "1", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["config"]["tokens_per_gpu"] == 1025


def test_cli_pinned_beyond_the_node_exits_3(cli, tmp_path):
    # 0.2 GiB per node holds the always-copied part of 3 layers on each of 8 GPUs, not alpha 1
    r = cli("solve", TINY, "--seq", "64K", "--gpus", "8", "--alpha", "1", "--keep-last", "1",
            "--host-mem-gb", "0.2", "--time-limit", "1", "-o", tmp_path / "plan.json")
    assert r.exit_code == 3, r.output
    assert "host memory" in r.output
