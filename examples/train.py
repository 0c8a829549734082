"""Train a model with a memoplan plan: the training loop stays as it is.

    memoplan profile examples/llama/model.py -o out/profile.json
    memoplan solve out/profile.json --seq 128K -o out/plan.json
    python examples/train.py examples/llama/model.py out/plan.json --seq 512 --steps 3
    python examples/train.py MODEL PLAN --device cuda --planned-allocator   # on a GPU

It also trains a plain copy of the model on the same batches and prints the largest relative
difference of the gradients (0 up to rounding: the plan changes where tensors live, not what
is computed).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time

import torch
from torch.utils._pytree import tree_map_only

import memoplan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_file")
    ap.add_argument("plan")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--planned-allocator", action="store_true",
                    help="place every layer's transients at the plan's addresses (CUDA only)")
    args = ap.parse_args()
    if args.planned_allocator:       # first, before any tensor is put on the GPU
        memoplan.runtime.install_allocator()
    device = torch.device(args.device)

    spec = importlib.util.spec_from_file_location("user_model", args.model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model().to(device)
    plain = copy.deepcopy(model)

    plan = memoplan.load_plan(args.plan)                   # the two lines a user adds
    model = memoplan.runtime.apply(model, plan)

    loss_fn = getattr(mod, "loss_fn", None) or (lambda out: out.float().pow(2).mean())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    for step in range(args.steps):
        inputs = tree_map_only(torch.Tensor, lambda t: t.to(device), mod.example_inputs(args.seq))
        for m, o in ((model, opt), (plain, opt_plain)):
            began = time.perf_counter()
            o.zero_grad()
            out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
            loss = loss_fn(out)
            loss.backward()
            seconds = time.perf_counter() - began
            if m is model:
                memo_loss, memo_s = loss.item(), seconds
        diff = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(model.parameters(), plain.parameters()))
        print(f"step {step}: loss {memo_loss:.6f} (plain {loss.item():.6f}), "
              f"max rel. grad diff {diff:.2e}, {memo_s:.3f} s (plain {seconds:.3f} s)")
        opt.step()
        opt_plain.step()
    print("runtime:", memoplan.runtime.stats(model))


if __name__ == "__main__":
    main()
