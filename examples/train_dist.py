"""Train with a plan under FSDP2 and context parallelism, one process per GPU (torchrun).

    memoplan profile examples/llama/model.py -o out/profile.json
    memoplan solve out/profile.json --seq 256 --gpus 2 --cp 2 --keep-last 1 -o out/plan2.json
    torchrun --standalone --nproc-per-node 2 examples/train_dist.py examples/llama/model.py \\
        out/plan2.json --seq 256 --cp 2 --device cpu --steps 2 --compare

Every rank builds the model, applies the plan (three lines), shards it with ``fully_shard``
(every repeated layer, then the root) over all ranks, and trains on one sequence of ``--seq``
tokens per ``dp`` group, split over the ``--cp`` ranks of its context-parallel group in the
load-balanced order (rank r of cp holds chunks r and 2cp-1-r of 2cp; chunk r of cp in order for
a plan solved without load balancing). The model's forward must take the tokens' positions as
its second argument under cp > 1 (``examples/llama`` does).
With ``--compare`` it also trains the same FSDP2(+CP) setup without memoplan and prints the
largest gradient difference. That reference runs attention over the cp ranks through torch's
own ring engine (``memoplan.testing.ring_sdpa``: CPU flash attention on a CPU, CUDA flash or
memory-efficient attention on a GPU), on the tokens each rank already holds and with the plan's
load balancing: what ``context_parallel`` runs, without its sharding of the inputs (which here
are split already) and with no CPU strategy needed (see ``reference_attention``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import os

import torch
import torch.distributed as dist

import memoplan


def head_tail(seq: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of the tokens that cp rank ``rank`` holds (load-balanced order)."""
    chunks = torch.arange(seq).view(2 * cp, seq // (2 * cp))
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def local_positions(seq: int, cp: int, rank: int, load_balance: bool = True) -> torch.Tensor:
    """Positions of the tokens that cp rank ``rank`` holds: head-tail under load balancing (the
    plan's default), else its chunk of ``cp`` in order."""
    if cp == 1:
        return torch.arange(seq)
    if load_balance:
        return head_tail(seq, cp, rank)
    return torch.arange(seq).view(cp, seq // cp)[rank]


def reference_attention(device: str, cp_mesh, load_balance: bool = True
                        ) -> contextlib.AbstractContextManager:
    """How the model without memoplan runs attention over the cp ranks (``cp_mesh``: their
    DeviceMesh, or None without context parallelism), on ``device`` ("cpu" or "cuda").

    The same on every device: ``F.scaled_dot_product_attention`` replaced by
    ``memoplan.testing.ring_sdpa`` over the cp group, which runs torch's ring engine around the
    kernel SDPA would pick for the tensors (CPU flash; CUDA flash for bf16/fp16, memory-efficient
    for fp32), with ``load_balance`` as the plan's. Not ``context_parallel(mesh)``: without
    ``buffers`` torch 2.11-2.13 fails on entry (``buffers[0]``: IndexError), and with them it
    would shard the inputs again, which each rank already holds in the plan's order."""
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device}: the reference runs on cpu or cuda")
    if cp_mesh is None or cp_mesh.size() == 1:
        return contextlib.nullcontext()
    from unittest import mock

    from memoplan.testing import ring_sdpa
    return mock.patch("torch.nn.functional.scaled_dot_product_attention",
                      ring_sdpa(cp_mesh.get_group(), load_balance=load_balance))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_file")
    ap.add_argument("plan")
    ap.add_argument("--seq", type=int, default=256, help="tokens of one sequence (all cp ranks)")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel degree")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare", action="store_true",
                    help="also train without memoplan and print the largest gradient difference")
    args = ap.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(1)
    # the ranks wait for each other's pinning of the host slab in apply() (about 0.5 s per
    # GiB: 225 GiB per GPU at 1M tokens on 8 GPUs is ~105 s): keep the timeout well above it
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} does not divide the {world} ranks")
    if args.seq % (2 * args.cp):
        raise SystemExit(f"--seq {args.seq} does not split into 2 x cp = {2 * args.cp} chunks")
    mesh = init_device_mesh(args.device, (world // args.cp, args.cp), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()
    shards = init_device_mesh(args.device, (world,))  # FSDP2 shards over dp x cp

    spec = importlib.util.spec_from_file_location("user_model", args.model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plan = memoplan.load_plan(args.plan)
    loss_fn = getattr(mod, "loss_fn", None) or (lambda out: out.float().pow(2).mean())

    def build(use_plan: bool) -> torch.nn.Module:
        model = mod.build_model().to(args.device)
        if use_plan:
            memoplan.runtime.apply(model, plan, cp_mesh=mesh["cp"] if args.cp > 1 else None)
        layers = [m for m in model.modules() if type(m).__name__ == plan.layer_class]
        for layer in layers:
            fully_shard(layer, mesh=shards)
        fully_shard(model, mesh=shards)
        return model

    models = [build(True)] + ([build(False)] if args.compare else [])
    balanced = bool(plan.config.get("load_balance", True))  # as memoplan's ring runs the plan
    cp_mesh = mesh["cp"] if args.cp > 1 else None

    for step in range(args.steps):
        # one sequence per dp group (the example's tokens, shifted per step and group)
        tokens = mod.example_inputs(args.seq)[0].roll(7 * step + 3 * dp_rank, dims=1)
        mine = local_positions(args.seq, args.cp, cp_rank, balanced)
        inputs = (tokens[:, mine].to(args.device),) + ((mine.to(args.device),)
                                                         if args.cp > 1 else ())
        losses, grads = [], []
        for i, model in enumerate(models):
            model.zero_grad()
            with reference_attention(args.device, cp_mesh, balanced) if i \
                    else contextlib.nullcontext():
                loss = loss_fn(model(*inputs))
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.full_tensor() for p in model.parameters()])
        line = f"step {step}: loss {losses[0]:.6f}"
        if args.compare:
            diff = max((a - b).abs().max().item() for a, b in zip(*grads))
            line += f" (without memoplan {losses[1]:.6f}), max grad diff {diff:.3e}"
        if rank == 0:
            print(line, flush=True)
    if rank == 0:
        s = memoplan.runtime.stats(models[0])
        print(f"memoplan: {s['layer_calls']} layer calls, {s['recomputed_tokens']} tokens "
              f"recomputed, {s['host_bytes']} bytes copied to host on rank 0")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
