"""memoplan under PyTorch's own distributed engine, on 2 gloo processes (1 thread each): FSDP2
(``fully_shard`` on every layer and on the root) with a plan applied before or after
``fully_shard``, against the same FSDP2 run without memoplan: equal losses and full gradients
(to float32's last bits, as on one process) for offloaded layers at alpha 0, 0.5 and 1, kept and checkpointed layers, and
mixed precision, over 2 steps with poisoning on. Ranks that hold different plans, or a plan for
another job size, raise on every rank (none waits in a collective)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.solve import SolveConfig, solve_plan
from memoplan.testing import ring_sdpa
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

MODEL = Path(__file__).resolve().parents[1] / "examples" / "llama" / "model.py"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _with(plan, mode: str, alpha: float):
    n = len(plan.layers)
    return dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(l, mode=mode if l.index < n - 1 else "keep", alpha=alpha)
        for l in plan.layers))


def _train_pair(rank: int, plan, when: str, mp_dtype: torch.dtype | None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import memoplan.runtime as runtime

    mf = load_model_file(MODEL)
    policy = MixedPrecisionPolicy(param_dtype=mp_dtype) if mp_dtype else MixedPrecisionPolicy()

    def build(use: bool) -> torch.nn.Module:
        m = mf.build_model()
        if use and when == "before":
            runtime.apply(m, plan, debug_poison=True)
        for layer in m.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(m, mp_policy=policy)
        if use and when == "after":
            runtime.apply(m, plan, debug_poison=True)
        return m

    model, ref = build(True), build(False)
    for step in range(2):
        results = []
        for m in (model, ref):
            m.zero_grad()
            g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
            tokens = torch.randint(mf.module.config().vocab_size, (1, 96 + 3 * step), generator=g)
            torch.manual_seed(step)
            loss = m(tokens).float().pow(2).mean()
            loss.backward()
            results.append((loss.detach(), {n: p.grad.full_tensor()
                                            for n, p in m.named_parameters()}))
        (la, ga), (lb, gb) = results
        # as on one process: recomputing a subset of tokens may round a matmul differently
        # (another blocking of the rows), so "equal" is to float32's last bits
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
        for name in gb:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"rank {rank} {when} step {step} {name}: {m}")
    runner = model._memoplan_runner
    assert runner.calls == 2 * len(plan.layers)


def _fsdp_worker(rank: int, port: int, cases) -> None:
    _init(rank, port)
    try:
        for plan, when, mp_dtype in cases:
            _train_pair(rank, plan, when, mp_dtype)
        dist.barrier()  # both ranks done before the group goes (gloo aborts on pending work)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    return solve_plan(prof, SolveConfig(seq=8192, gpus=WORLD, tp=1, cp=1,
                                        hardware=get_hardware("h200"), time_limit=2.0))


@pytest.mark.parametrize("when", ["before", "after"])
def test_fsdp2_under_a_plan_gives_the_gradients_of_fsdp2(plan, when):
    cases = [(_with(plan, "offload", a), when, None) for a in (0.0, 0.5, 1.0)]
    cases += [(_with(plan, mode, 0.5), when, None) for mode in ("keep", "recompute")]
    _spawn(_fsdp_worker, cases)


def test_fsdp2_mixed_precision_matches_the_layer_by_its_compute_dtype():
    """MixedPrecisionPolicy(param_dtype=bf16): parameters are kept in fp32 shards and unsharded
    to bf16 for compute; the plan profiled in bf16 is the one that matches."""
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128, dtype="bfloat16"))
    plan = solve_plan(prof, SolveConfig(seq=8192, gpus=WORLD, tp=1, cp=1,
                                        hardware=get_hardware("h200"), time_limit=2.0))
    _spawn(_fsdp_worker, [(_with(plan, "offload", 0.5), "after", torch.bfloat16)])


def _mismatch_worker(rank: int, port: int, plans) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import memoplan.runtime as runtime

    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
        mf = load_model_file(MODEL)
        for per_rank, message in plans:
            with pytest.raises(MemoplanError, match=message):
                runtime.apply(mf.build_model(), per_rank[rank], cp_mesh=mesh)
        dist.barrier()  # no rank was left waiting
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_plans_or_the_wrong_job_size_all_raise(plan):
    other = _with(plan, "offload", 0.25)
    one_gpu = dataclasses.replace(plan, config={**plan.config, "gpus": 1})
    cp4 = dataclasses.replace(plan, config={**plan.config, "cp": 4})
    _spawn(_mismatch_worker, [((plan, other), "ranks hold different plans"),
                              ((one_gpu, one_gpu), "solved for 1 GPUs"),
                              ((cp4, cp4), "mesh has 2 ranks, the plan was solved for cp 4")])


def test_plans_the_runtime_cannot_run_are_refused(plan):
    from memoplan.runtime import apply

    mf = load_model_file(MODEL)
    tp = dataclasses.replace(plan, config={**plan.config, "tp": 2})
    with pytest.raises(MemoplanError, match="tensor parallelism .tp 2., which memoplan plans but"):
        apply(mf.build_model(), tp)
    cp = dataclasses.replace(plan, config={**plan.config, "cp": 2})
    with pytest.raises(MemoplanError, match="pass the cp ranks' DeviceMesh"):
        apply(mf.build_model(), cp)


# --- context parallelism: FSDP2 over the 2 ranks, which also split each sequence (cp 2) ---

SEQ = 96  # global tokens; 4 chunks of 24 (load balancing: rank r holds chunks r and 3 - r)


def _head_tail(seq: int, cp: int, rank: int) -> torch.Tensor:
    """Global token indices rank ``rank`` holds under load balancing (head-tail order)."""
    chunks = torch.arange(seq).view(2 * cp, seq // (2 * cp))
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _cp_worker(rank: int, port: int, plans) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import memoplan.runtime as runtime

    _init(rank, port)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
    group = mesh.get_group()
    mf = load_model_file(MODEL)
    native = torch.nn.functional.scaled_dot_product_attention
    ring = ring_sdpa(group)  # the reference: torch's ring engine, as context_parallel runs it

    try:
        for plan, when in plans:
            def build(use: bool) -> torch.nn.Module:
                m = mf.build_model()
                if use and when == "before":
                    runtime.apply(m, plan, debug_poison=True, cp_mesh=mesh)
                for layer in m.layers:
                    fully_shard(layer)
                fully_shard(m)
                if use and when == "after":
                    runtime.apply(m, plan, debug_poison=True, cp_mesh=mesh)
                return m

            model, ref = build(True), build(False)
            for step in range(2):
                g = torch.Generator().manual_seed(step)  # one sequence, split over the ranks
                tokens = torch.randint(mf.module.config().vocab_size, (1, SEQ), generator=g)
                mine = _head_tail(SEQ, WORLD, rank)  # this rank's tokens, and their positions
                results = []
                for m in (model, ref):
                    m.zero_grad()
                    torch.nn.functional.scaled_dot_product_attention = \
                        native if m is model else ring
                    try:
                        loss = m(tokens[:, mine], mine).float().pow(2).mean()
                    finally:
                        torch.nn.functional.scaled_dot_product_attention = native
                    loss.backward()
                    results.append((loss.detach(), {n: p.grad.full_tensor()
                                                    for n, p in m.named_parameters()}))
                (la, ga), (lb, gb) = results
                torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
                for name in gb:
                    torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-8,
                                               msg=lambda t: f"rank {rank} step {step} {name}: {t}")
            assert model._memoplan_runner.calls == 2 * len(plan.layers)
        dist.barrier()  # both ranks done before the group goes (gloo aborts on pending work)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cp_plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    return solve_plan(prof, SolveConfig(seq=8192, gpus=WORLD, tp=1, cp=WORLD,
                                        hardware=get_hardware("h200"), time_limit=2.0))


def test_the_ring_engine_memoplan_uses_is_there():
    """memoplan's ring attention uses torch's private context-parallel engine: fail loudly,
    here, if a torch upgrade moves or renames it."""
    from memoplan.runtime.ring import engine

    cp = engine()
    assert callable(cp._templated_ring_attention)
    assert callable(cp._templated_ring_attention_backward)
    assert {"ALL_GATHER", "ALL_TO_ALL"} <= set(cp._RotateMethod.__members__)
    assert hasattr(cp._cp_options, "enable_load_balance")


@pytest.mark.parametrize("when", ["before", "after"])
def test_context_parallel_under_a_plan_gives_the_gradients_of_fsdp2_with_cp(cp_plan, when):
    plans = [(_with(cp_plan, "offload", 0.5), when)]
    if when == "after":
        plans += [(_with(cp_plan, "offload", a), when) for a in (0.0, 1.0)]
        plans += [(_with(cp_plan, mode, 0.5), when) for mode in ("keep", "recompute")]
    _spawn(_cp_worker, plans)


def test_the_distributed_example_under_torchrun(tmp_path, cli):
    """examples/train_dist.py, as the README runs it: torchrun, 2 CPU ranks, FSDP2 + cp 2,
    against the same run without memoplan."""
    import re
    import subprocess
    import sys

    root = MODEL.parents[2]
    assert cli("profile", MODEL, "--seq", "128", "-o", tmp_path / "p.json", "-q").exit_code == 0
    r = cli("solve", tmp_path / "p.json", "--seq", "256", "--gpus", "2", "--cp", "2",
            "--keep-last", "1", "--alpha", "0.5", "-o", tmp_path / "plan.json", "-q")
    assert r.exit_code == 0, r.output
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(root / "examples" / "train_dist.py"), str(MODEL), str(tmp_path / "plan.json"),
         "--seq", "256", "--cp", "2", "--device", "cpu", "--steps", "2", "--compare"],
        capture_output=True, text=True, timeout=240, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    diffs = [float(d) for d in re.findall(r"max grad diff ([0-9.e+-]+)", run.stdout)]
    assert len(diffs) == 2 and max(diffs) <= 1e-6, run.stdout
    recomputed = int(re.search(r"(\d+) tokens recomputed", run.stdout).group(1))
    assert recomputed > 0, run.stdout
