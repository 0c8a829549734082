"""Train with a plan under FSDP2 and context parallelism, one process per GPU (torchrun).

    memoplan profile examples/llama/model.py -o out/profile.json
    memoplan solve out/profile.json --seq 256 --gpus 2 --cp 2 --keep-last 1 -o out/plan2.json
    torchrun --standalone --nproc-per-node 2 examples/train_dist.py examples/llama/model.py \\
        out/plan2.json --seq 256 --cp 2 --device cpu --steps 2 --compare

Every rank builds the model, applies the plan (three lines), shards it with ``fully_shard``
(every repeated layer, then the root) over all ranks, and trains on one sequence of ``--seq``
tokens per ``dp`` group, split over the ``--cp`` ranks of its context-parallel group in the
load-balanced order (rank r of cp holds chunks r and 2cp-1-r of 2cp). The model's forward
must take the tokens' positions as its second argument under cp > 1 (``examples/llama`` does).
With ``--compare`` it also trains the same FSDP2(+CP) setup without memoplan and prints the
largest gradient difference. On a CPU, attention over the ring runs through torch's own ring
engine (``memoplan.testing.ring_sdpa``; ``context_parallel``'s dispatcher has no CPU strategy);
on a GPU the reference uses ``context_parallel``.
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
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=120))
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

    def reference_attention() -> contextlib.AbstractContextManager:
        """How the model without memoplan runs attention over the cp ranks."""
        if args.cp == 1:
            return contextlib.nullcontext()
        if args.device == "cuda":
            from torch.distributed.tensor.experimental import context_parallel
            return context_parallel(mesh["cp"])
        from unittest import mock

        from memoplan.testing import ring_sdpa
        return mock.patch("torch.nn.functional.scaled_dot_product_attention",
                          ring_sdpa(mesh["cp"].get_group()))

    for step in range(args.steps):
        # one sequence per dp group (the example's tokens, shifted per step and group)
        tokens = mod.example_inputs(args.seq)[0].roll(7 * step + 3 * dp_rank, dims=1)
        mine = head_tail(args.seq, args.cp, cp_rank) if args.cp > 1 else torch.arange(args.seq)
        inputs = (tokens[:, mine].to(args.device),) + ((mine.to(args.device),)
                                                         if args.cp > 1 else ())
        losses, grads = [], []
        for i, model in enumerate(models):
            model.zero_grad()
            with reference_attention() if i else contextlib.nullcontext():
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
