"""Multi-rank failure paths that only hang on GPUs, and the context-parallel reference of
``examples/train_dist.py``, on 2 gloo processes (1 thread each).

Host memory: each rank makes (on a GPU: pins) its own host slab, in ``prepare()``/``apply()`` or
at the first offloaded layer call. A rank that cannot (``ulimit -l``, host memory) must not raise
alone while the others walk into the next collective (under NCCL: a hang until the timeout):
every rank raises a MemoplanError naming the failing rank. The stand-in for a failed
``cudaHostRegister`` is a ``_Slab`` that raises on chosen ranks.

Reference attention: ``train_dist.py --compare`` runs the model without memoplan through
``memoplan.testing.ring_sdpa`` on every device (``context_parallel(mesh)`` without buffers fails
on entry in torch 2.11-2.13). Its CUDA kernels (flash for bf16/fp16, memory-efficient for fp32)
are driven here through CPU implementations registered for those aten ops, so the arguments and
extra outputs the ring passes between forward and backward are checked against their schemas.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import socket
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "llama" / "model.py"
TRAIN_DIST = ROOT / "examples" / "train_dist.py"
WORLD = 2
HANG = 240  # seconds: a run of 2 ranks that takes longer is taken for a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, port, *args)`` on 2 processes; fail (never wait forever) on a hang."""
    ctx = mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + HANG
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(10)
            pytest.fail(f"the ranks did not finish within {HANG} s (a rank waits in a collective)")


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _offloading(plan, alpha: float = 0.5):
    n = len(plan.layers)
    return dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(l, mode="offload" if l.index < n - 1 else "keep", alpha=alpha)
        for l in plan.layers))


@pytest.fixture(scope="module")
def plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    return _offloading(solve_plan(prof, SolveConfig(seq=8192, gpus=WORLD, tp=1, cp=1,
                                                    hardware=get_hardware("h200"),
                                                    time_limit=2.0)))


# --- host memory: all ranks agree that each made its slab -----------------------------------

def _pin_worker(rank: int, port: int, plan, cases, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    import memoplan.runtime as runtime
    from memoplan.runtime import streams

    _init(rank, port)
    made = streams._Slab.__init__
    results = []
    try:
        mf = load_model_file(MODEL)
        for where, failing in cases:
            model = mf.build_model()
            runtime.apply(model, plan)
            if where == "forward":  # the slab is sized at the first offloaded layer call
                for layer in model.layers:
                    fully_shard(layer)
                fully_shard(model)
            if rank in failing:
                def fail(self, nbytes, device):
                    raise RuntimeError("cudaHostRegister failed (stand-in: 'ulimit -l' too low)")
                streams._Slab.__init__ = fail
            try:
                if where == "prepare":
                    runtime.prepare(model, device="cpu")
                else:
                    g = torch.Generator().manual_seed(rank)
                    tokens = torch.randint(mf.module.config().vocab_size, (1, 96), generator=g)
                    model(tokens).float().pow(2).mean().backward()
                results.append(["ok", runtime.stats(model)["host_slab_bytes"]])
            except Exception as e:  # noqa: BLE001
                results.append([type(e).__name__, str(e)])
            finally:
                streams._Slab.__init__ = made
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # both ranks done before the group goes (gloo aborts on pending work)
    except BaseException:
        dist.destroy_process_group()
        raise
    # A forward that raised left FSDP2's prefetch work abandoned; destroying the group (or the
    # interpreter's teardown) with it pending makes gloo abort the process now and then
    # ('terminate called without an active exception': 1 run in 8 under load). The results
    # are written and both ranks are past the barrier: leave without C++ teardown.
    os._exit(0)


def test_a_pinning_failure_on_one_rank_raises_on_every_rank(plan, tmp_path):
    """prepare() (what apply() runs for a model on a GPU), then the first forward under FSDP2
    (a model not on its GPU at apply time): a rank whose slab fails makes every rank raise."""
    cases = [("prepare", ()), ("prepare", (1,)), ("prepare", (0, 1)), ("forward", (1,)),
             ("forward", ())]
    _spawn(_pin_worker, plan, cases, str(tmp_path))
    got = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)}
    for r in range(WORLD):
        (ok, slab), one, both, fwd, (ok2, slab2) = got[r]
        assert ok == ok2 == "ok" and slab > 0 and slab2 > 0, got[r]
        for kind, message in (one, fwd):
            assert kind == "MemoplanError", (r, kind, message)  # today: 'ok' on rank 0
            assert f"rank {r}: " in message and "failed on rank 1 of 2" in message, message
            assert "ulimit -l" in message and "--host-mem-gb" in message, message
            assert "timeout" in message, message
            if r == 1:
                assert "This rank's error: RuntimeError: cudaHostRegister failed" in message
            else:
                assert "See rank 1's error" in message, message
        assert both[0] == "MemoplanError" and "failed on ranks 0, 1 of 2" in both[1], both


def test_a_failed_slab_raises_its_own_error_without_torch_distributed(monkeypatch):
    from memoplan.runtime import streams

    def fail(self, nbytes, device):
        raise RuntimeError("no host memory")

    monkeypatch.setattr(streams._Slab, "__init__", fail)
    copier = streams.Copier([0.5])
    with pytest.raises(RuntimeError, match="no host memory"):
        copier.reserve_bytes(1 << 20, torch.device("cpu"))
    assert not copier.sized and copier.slab_bytes == 0


def test_the_agreement_runs_where_the_process_group_can_reduce(monkeypatch):
    """gloo (also a mixed cpu:gloo,cuda:nccl group) reduces a CPU tensor; NCCL one on the current
    GPU. apply() pins a model not yet on its GPU at once under NCCL (on the bound device)."""
    from memoplan.runtime import streams

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    group = types.SimpleNamespace(bound_device_id=None)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: group)
    for backend, where, pin in (("gloo", "cpu", None), ("cpu:gloo,cuda:nccl", "cpu", "cuda:3"),
                                ("nccl", "cuda:3", "cuda:3")):
        monkeypatch.setattr(dist, "get_backend", lambda *a, b=backend: b)
        assert str(streams._agreement_device()) == where, backend
        assert str(streams.nccl_device()) == str(pin), backend
    group.bound_device_id = torch.device("cuda", 1)
    assert str(streams.nccl_device()) == "cuda:1"
    # NCCL reduces on this rank's GPU: the slab's, else the bound one, never cuda:0 by default
    assert str(streams._agreement_device()) == "cuda:1"
    assert str(streams._agreement_device(torch.device("cuda", 2))) == "cuda:2"
    assert str(streams._agreement_device(torch.device("cpu"))) == "cuda:1"


# --- the context-parallel reference of train_dist.py ----------------------------------------

def _train_dist():
    spec = importlib.util.spec_from_file_location("train_dist", TRAIN_DIST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _register_cuda_kernels_on_cpu(seen: dict) -> torch.library.Library:
    """CPU implementations of CUDA's flash and memory-efficient attention ops (over the CPU
    flash kernel), returning what the CUDA kernels return: flash's undefined cum_seq_q/k,
    max_q/k and a uint64 rng_state [2] and offset; efficient's int64 seed and offset. The
    backwards check that they get those back."""
    aten = torch.ops.aten
    cpu, cpu_bwd = (aten._scaled_dot_product_flash_attention_for_cpu.default,
                    aten._scaled_dot_product_flash_attention_for_cpu_backward.default)

    def flash(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        out, lse = cpu(q, k, v, dropout_p, is_causal, scale=scale)
        return (out, lse, None, None, q.size(2), k.size(2),
                torch.tensor([7, 9], dtype=torch.uint64), torch.zeros((), dtype=torch.uint64),
                torch.empty(0, dtype=q.dtype))

    def flash_bwd(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                  max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
        assert cum_seq_q is None and cum_seq_k is None and isinstance(max_q, int)
        assert philox_seed.dtype == torch.uint64 and philox_seed.tolist() == [7, 9]
        assert philox_offset.dtype == torch.uint64 and philox_offset.dim() == 0
        seen["flash"] = seen.get("flash", 0) + 1
        return cpu_bwd(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                       scale=scale)

    def efficient(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                  scale=None):
        assert attn_bias is None and compute_log_sumexp
        out, lse = cpu(q, k, v, dropout_p, is_causal, scale=scale)
        return out, lse, torch.tensor(11), torch.tensor(13)

    def efficient_bwd(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed,
                      philox_offset, dropout_p, grad_input_mask, is_causal=False, *, scale=None):
        assert attn_bias is None and list(grad_input_mask) == [True, True, True, False]
        assert (int(philox_seed), int(philox_offset)) == (11, 13)
        seen["efficient"] = seen.get("efficient", 0) + 1
        dq, dk, dv = cpu_bwd(grad_out_, query, key, value, out, logsumexp, dropout_p, is_causal,
                             scale=scale)
        return dq, dk, dv, torch.empty(0)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_scaled_dot_product_flash_attention", flash, "CPU")
    lib.impl("_scaled_dot_product_flash_attention_backward", flash_bwd, "CPU")
    lib.impl("_scaled_dot_product_efficient_attention", efficient, "CPU")
    lib.impl("_scaled_dot_product_efficient_attention_backward", efficient_bwd, "CPU")
    return lib


def _reference_worker(rank: int, port: int) -> None:
    from unittest import mock

    from torch.distributed.device_mesh import init_device_mesh

    import memoplan.testing as testing

    _init(rank, port)
    try:
        train_dist = _train_dist()
        F = torch.nn.functional
        native = F.scaled_dot_product_attention
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "cp"))
        # no cp: nothing to patch; "cuda" asked for: no CUDA call, no context_parallel
        with train_dist.reference_attention("cuda", None):
            assert F.scaled_dot_product_attention is native
        g = torch.Generator().manual_seed(0)
        seq = 128  # 64 tokens per rank: efficient attention's padded logsumexp is exact there
        q, k, v = (torch.randn(1, 2, seq, 8, generator=g) for _ in range(3))
        w = torch.randn(1, 2, seq, 8, generator=g)  # the output's gradient
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        (native(*full, is_causal=True) * w).sum().backward()
        seen: dict = {}
        lib = _register_cuda_kernels_on_cpu(seen)
        grads = {}
        for device in ("cuda", "cpu"):
            for balanced in (True, False):
                mine = train_dist.local_positions(seq, WORLD, rank, balanced)
                for kernel in ("cpu", "flash", "efficient"):
                    local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
                    with mock.patch.object(testing, "_ring_kernel", lambda t, kk=kernel: kk), \
                            train_dist.reference_attention(device, mesh["cp"], balanced):
                        assert F.scaled_dot_product_attention is not native
                        out = F.scaled_dot_product_attention(*local, is_causal=True)
                    assert F.scaled_dot_product_attention is native
                    (out * w[:, :, mine]).sum().backward()
                    got = [out.detach()] + [x.grad for x in local]
                    grads[device, balanced, kernel] = got
                    want = [native(q, k, v, is_causal=True)[:, :, mine]] + \
                        [x.grad[:, :, mine] for x in full]
                    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                        torch.testing.assert_close(
                            a, b, rtol=1e-5, atol=1e-6,
                            msg=lambda m: f"rank {rank} {device} {balanced} {kernel} {name}: {m}")
                for kernel in ("flash", "efficient"):  # the same kernel calls as the CPU path
                    for a, b in zip(grads[device, balanced, kernel],
                                    grads[device, balanced, "cpu"]):
                        assert torch.equal(a, b), (device, balanced, kernel)
        assert set(seen) == {"flash", "efficient"}, seen
        del lib
        dist.barrier()  # both ranks done before the group goes (gloo aborts on pending work)
    finally:
        dist.destroy_process_group()


def test_the_reference_of_train_dist_runs_on_every_device():
    """reference_attention("cuda", mesh) enters without CUDA and without context_parallel (whose
    entry without buffers raises IndexError), and gives causal attention over the whole
    sequence, load-balanced or not, with the CPU kernel and with CUDA's flash and efficient
    kernel signatures."""
    _spawn(_reference_worker)


def test_the_reference_picks_the_kernel_sdpa_would():
    from memoplan.testing import _ring_forward, _ring_kernel

    def fake(kind, dtype):
        return types.SimpleNamespace(device=torch.device(kind), dtype=dtype)

    assert _ring_kernel(torch.zeros(1)) == "cpu"
    assert _ring_kernel(fake("cuda", torch.bfloat16)) == "flash"
    assert _ring_kernel(fake("cuda", torch.float16)) == "flash"
    assert _ring_kernel(fake("cuda", torch.float32)) == "efficient"
    with pytest.raises(RuntimeError, match="no ring attention kernel for meta"):
        _ring_kernel(torch.zeros(1, device="meta"))
    # efficient attention pads its logsumexp to 32 tokens: refused before any collective
    q = torch.zeros(1, 2, 96, 8)
    with pytest.raises(RuntimeError, match="needs a multiple of 64 tokens per rank, this rank holds 96"):
        _ring_forward("efficient", None, q, q, q, None)
