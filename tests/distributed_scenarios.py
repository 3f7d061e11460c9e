"""What each rank runs in the multi-process tests (tests/test_distributed.py).

Every rank builds the same model from the same seed and trains on the same
batch, so FSDP2's averaged gradients equal the single-process gradients
exactly while the params do: what remains to compare is the optimizer. (Once a
projection has fired, its all-reduced sums have rounded unlike the single
process's, and the grads differ in their last bits.) Each scenario returns
plain tensors; the parent process asserts on them.
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from spd_kernels import AdamSPD
from spd_kernels.distributed import local, local_absmax, wrap_like
from spd_kernels import formats

STEPS = 6


#: 8-bit runs: moments of tensors of at least this many elements are 8-bit (EIGHT_BIT_MODEL's 512 x 64
#: weight, its 512 bias and the 1 x 512 weight; the smaller ones stay fp32)
MIN_8BIT_SIZE = 512


def make_model(seed: int = 0, eight_bit: bool = False) -> nn.Sequential:
    """Uneven shards on 2 ranks: 5 and 1 rows split 3/2 and 1/0 (an empty shard);
    the 1000 x 40 weight is more than one CPU-kernel chunk per shard.

    ``eight_bit``: the 8-bit model, whose 8-bit tensors split on 2 ranks where a
    256-element block ends (512 x 64 and 512 into 256 rows each; 1 x 512 into 1/0
    rows, an empty shard), so each shard's own blocks are the whole tensor's and
    the sharded run must equal the single-process one."""
    torch.manual_seed(seed)
    widths = (7, 5, 64, 512, 1) if eight_bit else (7, 5, 40, 1000, 1)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 7, generator=gen), torch.randn(16, 1, generator=gen)


def pretrained_anchors(model: nn.Sequential) -> List[torch.Tensor]:
    """Full-tensor anchors for the first layer, away from its init so projections fire from step 2."""
    gen = torch.Generator().manual_seed(77)
    return [p.detach() + 0.3 * torch.randn(p.shape, generator=gen) for p in model[0].parameters()]


def param_groups(model: nn.Sequential, anchors: List[torch.Tensor]):
    """Given anchors (full tensors), snapshot anchors, and an anchor-free bias."""
    return [
        {"params": list(model[0].parameters()), "pre": anchors},
        {"params": [model[2].weight, model[2].bias, model[4].weight, model[4].bias, model[6].weight]},
        {"params": [model[6].bias], "pre": None},
    ]


#: compressed-moment settings by name (the 8-bit model's block-aligned shards take them)
MOMENTS = {
    "8bit": dict(optim_bits=8, min_8bit_size=MIN_8BIT_SIZE),
    "fp8": dict(exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16, min_8bit_size=MIN_8BIT_SIZE),
}


def make_optimizer(model, anchors, impl, eight_bit: bool = False, moments: str = ""):
    settings = MOMENTS[moments or "8bit"] if (eight_bit or moments) else {}
    return AdamSPD(param_groups(model, anchors), lr=0.05, weight_decay=1.0, impl=impl, **settings)


#: compressed runs also snapshot their first steps, grads included: until the projections'
#: all-reduced sums (rounded unlike the single process's) reach the params, the grads are
#: bitwise the single process's, and so must every code and scale be
EXACT_STEPS = 2


def train(model, opt, steps, first_step=0, count_comms=False, snapshot_steps=0) -> Dict[str, object]:
    """``steps`` steps on the batches of steps ``first_step`` on; optionally the
    collectives each ``opt.step()`` issued (CommDebugMode), and a snapshot with
    the grads after each of the first ``snapshot_steps`` steps."""
    fired = 0
    comms = []
    first = []
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if step == 3:  # a param without a grad for one step (as if unused), the same on every rank
            params = dict(model.named_parameters())
            params[next(n for n in params if n.endswith("2.bias"))].grad = None
        snap = len(first) < snapshot_steps
        grads = {f"grad/{n}": full(p.grad) for n, p in model.named_parameters() if snap and p.grad is not None}
        if count_comms:
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as mode:
                opt.step()
            comms.append({str(op): n for op, n in mode.get_comm_counts().items()})
        else:
            opt.step()
        if snap:
            first.append({**snapshot(model, opt), **grads})
        fired += sum(int(s["projected"]) for s in opt.spd_stats().values())
    return {"fired": fired, "comms": comms, "first": first}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(model, opt) -> Dict[str, torch.Tensor]:
    """Full (unsharded) params and optimizer states, by parameter name."""
    out = {}
    names = {p: n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[p]
            out[f"param/{name}"] = full(p)
            for key in ("exp_avg", "exp_avg_sq", "anchor"):
                if key in opt.state[p]:
                    t = opt.state[p][key]
                    if t.dtype == torch.float8_e4m3fn:  # gathered as bytes (gloo has no fp8)
                        t = wrap_like(p, local(t).view(torch.uint8))
                    out[f"{key}/{name}"] = full(t)
            for k, key in enumerate(("exp_avg", "exp_avg_sq")):  # compressed: the values codes stand for
                fmt = formats.held(opt.state[p], k)
                if fmt is not None and fmt.coded:
                    codes, scale = formats.state_of(opt.state[p], fmt, k)
                    scale = local_absmax(scale, p) if scale is not None else None
                    out[f"{key}_value/{name}"] = full(wrap_like(p, fmt.decode(local(codes), scale, k)))
            out[f"step/{name}"] = opt.state[p]["step"].detach().clone()
    # the last step's per-layer stats: c and the norms scale with the sums (r does not)
    stats = opt.spd_stats()
    for name, entry in stats.items():
        out[f"stats/{name}"] = torch.stack([entry[k].float() for k in ("c", "norm_p_a", "norm_q_a", "r", "scale")])
    return out


def single_process(impl: str, eight_bit: bool = False, moments: str = "") -> Dict[str, torch.Tensor]:
    model = make_model(eight_bit=eight_bit or bool(moments))
    opt = make_optimizer(model, pretrained_anchors(model), impl, eight_bit, moments)
    result = train(model, opt, STEPS, snapshot_steps=EXACT_STEPS if eight_bit or moments else 0)
    return {**snapshot(model, opt), "fired": torch.tensor(result["fired"]), "first": result["first"]}


def fsdp_model(mesh, eight_bit: bool = False, seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed, eight_bit)
    anchors = pretrained_anchors(model)  # full tensors, as every rank loads the pre-trained weights
    for i in (0, 2, 4, 6):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, anchors


def fsdp(impl: str, mesh, eight_bit: bool = False, moments: str = "") -> Dict[str, torch.Tensor]:
    model, anchors = fsdp_model(mesh, eight_bit or bool(moments))
    opt = make_optimizer(model, anchors, impl, eight_bit, moments)
    result = train(model, opt, STEPS, count_comms=True, snapshot_steps=EXACT_STEPS if eight_bit or moments else 0)
    locals_ = {f"local/{n}": p.to_local().clone() for n, p in model.named_parameters()}
    return {**snapshot(model, opt), **locals_, "fired": torch.tensor(result["fired"]), "comms": result["comms"],
            "first": result["first"]}


def ddp(impl: str) -> Dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    anchors = pretrained_anchors(model)
    wrapped = DistributedDataParallel(model)
    opt = make_optimizer(model, anchors, impl)
    result = train(wrapped, opt, STEPS, count_comms=True)
    return {**snapshot(model, opt), "fired": torch.tensor(result["fired"]), "comms": result["comms"]}


def checkpoint_resume(mesh, ckpt_dir: str, eight_bit: bool = False, moments: str = "") -> Dict[str, torch.Tensor]:
    """Save with DCP mid-run, load into a fresh model and optimizer, finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    model, anchors = fsdp_model(mesh, eight_bit or bool(moments))
    opt = make_optimizer(model, anchors, "auto", eight_bit, moments)
    train(model, opt, half)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    train(model, opt, STEPS - half, first_step=half)
    uninterrupted = snapshot(model, opt)

    # a fresh model from another seed, with other anchors: everything must come from the checkpoint
    from torch.distributed.fsdp import fully_shard

    fresh = make_model(seed=123, eight_bit=eight_bit or bool(moments))
    other_anchors = [a + 1.0 for a in pretrained_anchors(fresh)]
    for i in (0, 2, 4, 6):
        fully_shard(fresh[i], mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    fresh_opt = make_optimizer(fresh, other_anchors, "auto", eight_bit, moments)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    anchor_kinds = sorted({type(fresh_opt.state[p]["anchor"]).__name__ for p in fresh_opt.state
                           if "anchor" in fresh_opt.state[p]})
    state_kinds = sorted({f"{type(v).__name__}:{v.dtype}" for st in fresh_opt.state.values()
                          for k, v in st.items() if k != "step"})
    train(fresh, fresh_opt, STEPS - half, first_step=half)
    resumed = snapshot(fresh, fresh_opt)
    return {"uninterrupted": uninterrupted, "resumed": resumed, "anchor_kinds": anchor_kinds,
            "state_kinds": state_kinds}


def errors(mesh) -> Dict[str, str]:
    """The messages of bad sharded inputs, and whether a failed step changed anything."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    out = {}

    def message(fn):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    full = torch.randn(4, 3)
    param = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    col_sharded = distribute_tensor(full + 1.0, mesh, [Shard(1)])
    out["anchor_placement"] = message(lambda: AdamSPD([{"params": [param], "pre": [col_sharded]}]))
    out["anchor_full_shape"] = message(lambda: AdamSPD([{"params": [param], "pre": [torch.randn(3, 4)]}]))
    plain = nn.Parameter(torch.randn(4, 3))
    out["dtensor_anchor_plain_param"] = message(
        lambda: AdamSPD([{"params": [plain], "pre": [distribute_tensor(full, mesh, [Replicate()])]}])
    )
    partial = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]))
    out["partial_param"] = message(lambda: AdamSPD([partial]))

    opt = AdamSPD([{"params": [param], "pre": [full + 0.5]}], weight_decay=1.0)
    before = param.detach().to_local().clone()
    param.grad = torch.randn(4, 3)  # a plain grad for a sharded param
    out["plain_grad"] = message(opt.step)
    out["plain_grad_changed_nothing"] = str(torch.equal(param.detach().to_local(), before) and not opt.state)

    param.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)], src_data_rank=None)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = distribute_tensor(torch.ones(4, 3), mesh, [Shard(1)])
    moment = opt.state[param]["exp_avg"]
    out["load_misplaced"] = message(lambda: opt.load_state_dict(saved))
    out["load_misplaced_changed_nothing"] = str(opt.state[param]["exp_avg"] is moment)
    return out


def two_dim_sharding(mesh, impl: str) -> Dict[str, torch.Tensor]:
    """DTensor params sharded over both dims of a named 2 x 2 mesh, over one, over the other; every
    rank sets the same full grads. Returns full params and stats, sharded and single-process."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    layouts = [(Shard(0), Shard(1)), (Shard(0), Replicate()), (Replicate(), Shard(0)), (Shard(1), Shard(0))]
    shapes = [(6, 5), (5, 3), (7,), (3, 9)]
    gen = torch.Generator().manual_seed(5)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    anchors = [f + 0.3 * torch.randn(f.shape, generator=gen) for f in fulls]
    out: Dict[str, object] = {"comms": []}
    for sharded in (True, False):
        params = [nn.Parameter(distribute_tensor(f, mesh, lay) if sharded else f.clone())
                  for f, lay in zip(fulls, layouts)]
        opt = AdamSPD([{"params": params, "pre": anchors}], lr=0.05, weight_decay=1.0, impl=impl)
        grad_gen = torch.Generator().manual_seed(6)
        fired = 0
        for _ in range(STEPS):
            for p, lay in zip(params, layouts):
                g = torch.randn(p.shape, generator=grad_gen)
                p.grad = distribute_tensor(g, mesh, lay) if sharded else g
            with CommDebugMode() as mode:
                opt.step()
            if sharded:
                out["comms"].append({str(op): n for op, n in mode.get_comm_counts().items()})
            fired += sum(int(s["projected"]) for s in opt.spd_stats().values())
        tag = "sharded" if sharded else "single"
        for i, p in enumerate(params):
            out[f"{tag}/param/{i}"] = full(p)
        for name, entry in opt.spd_stats().items():
            out[f"{tag}/stats/{name}"] = torch.stack([entry[k].float() for k in ("c", "norm_p_a", "norm_q_a")])
        out[f"{tag}/fired"] = fired
    return out


def load_full_state(mesh, eight_bit: bool = False, aligned: bool = True) -> Dict[str, Dict[str, torch.Tensor]]:
    """A single-process optimizer's state_dict (full tensors) loaded into an FSDP2 one: each
    rank keeps its slice, and both runs go on alike. ``aligned=False`` with ``eight_bit``: 8-bit
    states on the first model, whose shards split blocks (re-quantized on load)."""
    from torch.distributed.tensor import distribute_tensor

    half = STEPS // 2
    plain = make_model(eight_bit=eight_bit and aligned)
    plain_opt = make_optimizer(plain, pretrained_anchors(plain), "auto", eight_bit)
    train(plain, plain_opt, half)
    saved = plain_opt.state_dict()

    model, anchors = fsdp_model(mesh, eight_bit and aligned)
    # wrong anchors: the load must replace them
    opt = make_optimizer(model, [a + 1.0 for a in anchors], "auto", eight_bit)
    with torch.no_grad():
        for (_, p), (_, full_p) in zip(model.named_parameters(), plain.named_parameters()):
            p.to_local().copy_(distribute_tensor(full_p, p.device_mesh, p.placements, src_data_rank=None).to_local())
    opt.load_state_dict(saved)
    kinds = sorted({type(v).__name__ for st in opt.state.values() for k, v in st.items() if k != "step"})
    single_fired = train(plain, plain_opt, STEPS - half, first_step=half)["fired"]
    sharded_fired = train(model, opt, STEPS - half, first_step=half)["fired"]
    return {"single": {**snapshot(plain, plain_opt), "fired": torch.tensor(single_fired)},
            "sharded": {**snapshot(model, opt), "fired": torch.tensor(sharded_fired)}, "kinds": kinds}


def run_rank(rank: int, world: int, port: int, out_dir: str, scenarios: List[str]) -> None:
    """Entry point of one spawned rank: runs ``scenarios`` and saves what they return."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        results = {}
        for name in scenarios:
            if name.startswith("fsdpfp8:"):
                results[name] = fsdp(name.split(":", 1)[1], init_device_mesh("cpu", (world,)), moments="fp8")
            elif name.startswith("singlefp8:"):
                results[name] = single_process(name.split(":", 1)[1], moments="fp8")
            elif name == "dcpfp8":
                results[name] = checkpoint_resume(init_device_mesh("cpu", (world,)), os.path.join(out_dir, "ckptfp8"),
                                                  moments="fp8")
            elif name.startswith("fsdp8:"):
                results[name] = fsdp(name.split(":", 1)[1], init_device_mesh("cpu", (world,)), eight_bit=True)
            elif name.startswith("single8:"):
                results[name] = single_process(name.split(":", 1)[1], eight_bit=True)
            elif name == "dcp8":
                results[name] = checkpoint_resume(init_device_mesh("cpu", (world,)), os.path.join(out_dir, "ckpt8"),
                                                  eight_bit=True)
            elif name == "load_full8":
                results[name] = load_full_state(init_device_mesh("cpu", (world,)), eight_bit=True)
            elif name == "load_full8_unaligned":
                results[name] = load_full_state(init_device_mesh("cpu", (world,)), eight_bit=True, aligned=False)
            elif name.startswith("fsdp:"):
                mesh = init_device_mesh("cpu", (world,))
                results[name] = fsdp(name.split(":", 1)[1], mesh)
            elif name.startswith("hsdp:"):
                mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
                results[name] = fsdp(name.split(":", 1)[1], mesh)
            elif name.startswith("2d:"):
                mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
                results[name] = two_dim_sharding(mesh, name.split(":", 1)[1])
            elif name.startswith("single:"):
                results[name] = single_process(name.split(":", 1)[1])
            elif name.startswith("ddp:"):
                results[name] = ddp(name.split(":", 1)[1])
            elif name == "load_full":
                results[name] = load_full_state(init_device_mesh("cpu", (world,)))
            elif name == "errors":
                results[name] = errors(init_device_mesh("cpu", (world,)))
            elif name == "dcp":
                results[name] = checkpoint_resume(init_device_mesh("cpu", (world,)), os.path.join(out_dir, "ckpt"))
            else:
                raise ValueError(f"unknown scenario {name!r}")
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # no rank tears the group down while a peer still uses it (that aborts at exit)
        dist.barrier()
    finally:
        dist.destroy_process_group()
