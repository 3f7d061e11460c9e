"""AdamSPD with FSDP2: sharded params, one all-reduce of SPD's sums per step, a DCP checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2.py          # CPU processes, gloo
    torchrun --nproc_per_node=8 examples/fsdp2.py --cuda   # one GPU per process, NCCL
    ... --ckpt-dir DIR                                      # keep the checkpoint (else it is removed)

A small MLP stands in for a pre-trained model (its "pre-trained" weights come
from a fixed seed, the same on every rank); a fresh head is added and trained
without SPD (``fine_tuning_param_groups``). The optimizer is built after
``fully_shard``, so its anchors are snapshots of the sharded params.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from spd_kernels import AdamSPD, fine_tuning_param_groups


class Regressor(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(x))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per process")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-dir", default=None,
                        help="folder to keep the DCP checkpoint in (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the "pre-trained" weights: the same on every rank
    model = Regressor().to(device)
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=init_device_mesh(device.type, (world,)))
    fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    opt = AdamSPD(fine_tuning_param_groups(model, new=("head.",)), lr=3e-3, weight_decay=1.0)

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    teacher = torch.randn(32, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = torch.tanh(x @ teacher).unsqueeze(1)
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()  # Adam on the local shards, one all-reduce of [n, 3] sums, then the projections
        losses.append(loss.detach())
    fired = sum(int(s["projections"]) for s in opt.spd_stats().values())

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)  # states and anchors stay sharded DTensors
    ckpt = [(args.ckpt_dir or tempfile.mkdtemp(prefix="spd_fsdp2_")) if rank == 0 else None]
    dist.broadcast_object_list(ckpt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt[0])

    first = float(sum(losses[:10]) / 10)
    last = float(sum(losses[-10:]) / 10)
    if rank == 0:
        kept = f"saved with DCP to {ckpt[0]}" if args.ckpt_dir else "saved with DCP (temporary folder, removed)"
        print(f"{world} ranks: loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10); "
              f"projections fired {fired}; checkpoint {kept}")
    # Every rank must be done with the group before any rank tears it down: a rank that
    # destroys it while a peer's gloo thread still talks to it aborts at exit.
    dist.barrier()
    if rank == 0 and not args.ckpt_dir:
        shutil.rmtree(ckpt[0], ignore_errors=True)
    dist.destroy_process_group()
    return last / first


if __name__ == "__main__":
    main()
