"""What each rank runs in the fine-tuning-stack tests (tests/test_stacks_distributed.py), under torchrun.

    torchrun --nproc_per_node=2 tests/stack_runs.py OUT_DIR SCENARIO [SCENARIO ...]

Every rank builds the model of tests/distributed_scenarios.py from the same seed
and trains on the same batches, so the frameworks' averaged gradients equal the
single-process ones and what is left to compare is the optimizer. Each rank
saves what it saw to OUT_DIR/<scenario>.rank<r>.pt; the assertions are in the
test module.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import distributed_scenarios as sc  # noqa: E402

STEPS = sc.STEPS
HALF = STEPS // 2


def single_process_run(eight_bit: bool = False) -> Dict[str, torch.Tensor]:
    """The run every stack must reproduce: plain AdamSPD on the whole model, in this process."""
    model = sc.make_model(eight_bit=eight_bit)
    opt = sc.make_optimizer(model, sc.pretrained_anchors(model), "auto", eight_bit)
    counts = _train_plain(model, opt, STEPS)
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "anchor"):
            if key in opt.state[p]:
                out[f"{key}/{n}"] = opt.state[p][key].detach().clone()
    out.update({f"projections/{n}": c for n, c in counts.items()})
    return out


def _train_plain(model, opt, steps, first=0):
    for step in range(first, first + steps):
        x, y = sc.batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return _projection_counts(model, opt)


def _projection_counts(model, opt) -> Dict[str, torch.Tensor]:
    names = {p: n for n, p in model.named_parameters()}
    stats = opt.spd_stats()
    return {names[p]: stats[name]["projections"].clone() for name, _, p in opt.named_params() if name in stats}


# ---------------------------------------------------------------------------- DeepSpeed

def _deepspeed_engine(stage: int, seed: int = 0, anchor_shift: float = 0.0, moments: str = ""):
    import deepspeed

    model = sc.make_model(seed, bool(moments))
    anchors = [a + anchor_shift for a in sc.pretrained_anchors(model)]
    opt = sc.make_optimizer(model, anchors, "auto", moments=moments)
    config = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": stage},
              # exact comparisons: DeepSpeed refuses an optimizer it has not tested unless told,
              # and clips gradients at 1.0 unless told not to
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return model, opt, engine


def _train_engine(engine, steps, first=0):
    for step in range(first, first + steps):
        x, y = sc.batch(step)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()


def _deepspeed_snapshot(model, opt) -> Dict[str, torch.Tensor]:
    """Full params, and each param's full optimizer state put together from every rank's fragment
    (as DeepSpeed's ``get_full_hp_param`` does; its ``safe_get_full_optimizer_state`` cannot serve
    here: DeepSpeed 0.19.8 links the state of every group right after the first group's first step,
    before an optimizer that creates state at the first step, as torch.optim.Adam does, has any for the
    others)."""
    flats = [g["params"][0] for g in opt.param_groups]
    out = {}
    for n, p in model.named_parameters():
        out[f"param/{n}"] = p.detach().clone()
        mapping = getattr(p, "_hp_mapping", None)
        for key in ("exp_avg", "exp_avg_sq", "anchor"):
            full = torch.zeros(p.numel(), dtype=torch.float64)
            if mapping is not None:
                flat = next(f for f in flats if f.untyped_storage().data_ptr() ==
                            mapping.hp_fragment.untyped_storage().data_ptr())
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                if key in opt.state[flat]:
                    full[lp.start:lp.start + lp.numel] = opt.state[flat][key][hp.start:hp.start + hp.numel].double()
            dist.all_reduce(full, group=p._dp_group)  # every rank asks for every key, in the same order
            out[f"{key}/{n}"] = full.reshape(p.shape)
    return out


def _count_collectives(opt) -> list:
    """Record the collectives each ``opt.step()`` call issues (DeepSpeed calls it once per group)."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts, step = [], opt.step

    def counted(*args, **kwargs):
        with CommDebugMode() as mode:
            out = step(*args, **kwargs)
        counts.append({str(op): n for op, n in mode.get_comm_counts().items()})
        return out

    opt.step = counted
    return counts


def deepspeed_zero(stage: int, out_dir: str) -> Dict[str, object]:
    model, opt, engine = _deepspeed_engine(stage)
    flat_before = [g["params"] for g in opt.param_groups]
    comms = _count_collectives(opt)
    _train_engine(engine, STEPS)
    result = {"single": single_process_run(), **{k: v for k, v in _deepspeed_snapshot(model, opt).items()},
              "projections": {k: v for k, v in _projection_counts(model, opt).items()},
              "state_keys": [tuple(p.shape) for p in opt.state],
              "group_params": [[tuple(p.shape) for p in ps] for ps in flat_before],
              "state_numel": sum(t.numel() for st in opt.state.values() for k, t in st.items() if k != "step"),
              "model_numel": sum(p.numel() for p in model.parameters()),
              "lambdas": [g["weight_decay"] for g in opt.param_groups], "comms": comms}
    result["state_dict_keys"] = sorted(opt.state_dict()["state"])
    return result


def deepspeed_checkpoint(stage: int, out_dir: str) -> Dict[str, object]:
    ckpt = os.path.join(out_dir, f"zero{stage}-ckpt")
    model, opt, engine = _deepspeed_engine(stage)
    _train_engine(engine, HALF)
    engine.save_checkpoint(ckpt, tag="half")
    _train_engine(engine, STEPS - HALF, first=HALF)
    uninterrupted = _deepspeed_snapshot(model, opt)
    # a fresh model from another seed, with other anchors: everything must come from the checkpoint
    fresh, fresh_opt, fresh_engine = _deepspeed_engine(stage, seed=123, anchor_shift=1.0)
    fresh_engine.load_checkpoint(ckpt, tag="half")
    _train_engine(fresh_engine, STEPS - HALF, first=HALF)
    return {"uninterrupted": uninterrupted, "resumed": _deepspeed_snapshot(fresh, fresh_opt)}


def deepspeed_zero3(out_dir: str) -> Dict[str, object]:
    return _first_step_error(3)


def _first_step_error(stage: int, moments: str = "") -> Dict[str, object]:
    """The error of the first step of a refused DeepSpeed route, and whether any state was made."""
    model, opt, engine = _deepspeed_engine(stage, moments=moments)
    x, y = sc.batch(0)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    try:
        engine.step()
        error = "no error"
    except (RuntimeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return {"error": error, "state_is_empty": not opt.state, "params_unchanged": unchanged}


# ---------------------------------------------------------------------------- Accelerate / Trainer

def _force_fsdp2(accelerator) -> None:
    """Accelerate shards with FSDP2 only on an accelerator: on a CPU its FSDP plugin gives DDP. Setting
    its distributed type to FSDP (in PartialState, which the Accelerator reads, and AcceleratorState)
    makes ``prepare`` run Accelerate's own ``_prepare_fsdp2`` over gloo, and ``save_state`` /
    ``load_state`` its FSDP2 checkpoint code (DCP's get/set_optimizer_state_dict)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert accelerator.is_fsdp2


def _accelerate_run(eight_bit: bool, seed: int = 0, anchor_shift: float = 0.0, moments: str = ""):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    _force_fsdp2(accelerator)
    model = sc.make_model(seed, eight_bit or bool(moments))
    anchors = [a + anchor_shift for a in sc.pretrained_anchors(model)]
    # built on the unsharded model, as users do
    opt = sc.make_optimizer(model, anchors, "auto", eight_bit, moments)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def _train_accelerated(accelerator, model, opt, steps, first=0) -> int:
    fired = 0
    for step in range(first, first + steps):
        x, y = sc.batch(step)
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        if step == 3:  # a param without a grad for one step, as in the single-process run
            dict(model.named_parameters())["2.bias"].grad = None
        opt.step()
        opt.zero_grad()
        fired += sum(int(s["projected"]) for s in opt.optimizer.spd_stats().values())
    return fired


def accelerate_fsdp2(eight_bit: bool, out_dir: str) -> Dict[str, object]:
    accelerator, model, opt = _accelerate_run(eight_bit)
    inner = opt.optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    fired = _train_accelerated(accelerator, model, opt, STEPS)
    sharded = {**sc.snapshot(model, inner), "fired": torch.tensor(fired)}
    single = sc.single_process("auto", eight_bit)
    state_kinds = sorted({type(v).__name__ for st in inner.state.values() for k, v in st.items() if k != "step"})
    local_numel = sum(v.to_local().numel() for st in inner.state.values() for k, v in st.items()
                      if k in ("exp_avg", "exp_avg_sq", "anchor"))
    return {"sharded": sharded, "single": single, "state_is_the_params": set(inner.state) == set(params),
            "state_kinds": state_kinds, "param_kinds": sorted({type(p).__name__ for p in params}),
            "local_state_numel": local_numel,
            "local_param_numel": sum(p.to_local().numel() for p in params),
            "full_param_numel": sum(p.numel() for p in params)}


def accelerate_fsdp2_checkpoint(eight_bit: bool, out_dir: str, moments: str = "") -> Dict[str, object]:
    ckpt = os.path.join(out_dir, f"accelerate-ckpt{'8' if eight_bit else ''}{moments}")
    accelerator, model, opt = _accelerate_run(eight_bit, moments=moments)
    _train_accelerated(accelerator, model, opt, HALF)
    accelerator.save_state(ckpt)
    _train_accelerated(accelerator, model, opt, STEPS - HALF, first=HALF)
    uninterrupted = sc.snapshot(model, opt.optimizer)
    # a fresh model from another seed, with other anchors: everything must come from the checkpoint
    accelerator, fresh, fresh_opt = _accelerate_run(eight_bit, seed=123, anchor_shift=1.0, moments=moments)
    accelerator.load_state(ckpt)
    _train_accelerated(accelerator, fresh, fresh_opt, STEPS - HALF, first=HALF)
    return {"uninterrupted": uninterrupted, "resumed": sc.snapshot(fresh, fresh_opt.optimizer)}


def _trainer(fsdp2: bool, out_dir: str, steps: int = 8):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    from spd_kernels.hf import optimizer_cls_and_kwargs

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from _synthetic import ContainsTokenDataset, tiny_bert_config

    class FSDP2OnThisCPU(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            _force_fsdp2(self.accelerator)
            self.is_fsdp_enabled = True

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), max_steps=steps,
                             per_device_train_batch_size=16, report_to="none", save_strategy="no", use_cpu=True,
                             seed=0, logging_steps=1, weight_decay=0.01)
    trainer = (FSDP2OnThisCPU if fsdp2 else Trainer)(
        model=model, args=args, train_dataset=ContainsTokenDataset(n=256),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(lr=3e-3, weight_decay=1.0, new=("classifier.",)))
    trainer.train()
    return trainer, initial


def trainer_route(fsdp2: bool, out_dir: str) -> Dict[str, object]:
    from spd_kernels.distributed import is_dtensor
    from spd_kernels.hf import adamspd_of

    trainer, initial = _trainer(fsdp2, out_dir)
    opt = adamspd_of(trainer.optimizer)
    stats = opt.spd_stats()
    full = {}
    for name, group, p in opt.named_params():
        full[f"param/{name}"] = sc.full(p)
        if "anchor" in opt.state[p]:
            full[f"anchor/{name}"] = sc.full(opt.state[p]["anchor"])
    params = [p for g in opt.param_groups for p in g["params"]]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"lambdas": [g["weight_decay"] for g in opt.param_groups],
            "names": [g.get("param_names") for g in opt.param_groups],
            "stats_names": sorted(stats), "fired": sum(int(s["projections"]) for s in stats.values()),
            "state_is_the_params": set(opt.state) <= set(params),
            "sharded": sorted({is_dtensor(v) for st in opt.state.values() for k, v in st.items() if k != "step"}),
            "initial": initial, **full, "losses": losses}


# ---------------------------------------------------------------------------- Lightning

def lightning_module():
    """A LightningModule whose ``configure_optimizers`` returns AdamSPD (given anchors for layer 0)."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sc.make_model()

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return sc.make_optimizer(self.net, sc.pretrained_anchors(self.net), "auto")

    return Module()


def lightning_fit(devices: int, strategy: str):
    import pytorch_lightning as pl

    batches = [sc.batch(step) for step in range(STEPS)]
    data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    module = lightning_module()
    # every rank takes the same batches (no distributed sampler): DDP then averages equal grads
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    return module, trainer.optimizers[0]


def lightning_ddp(out_dir: str) -> Dict[str, object]:
    module, opt = lightning_fit(2, "ddp")
    model = sc.make_model()
    plain = sc.make_optimizer(model, sc.pretrained_anchors(model), "auto")
    _train_plain(model, plain, STEPS)
    return {"sharded": sc.snapshot(module.net, opt), "single": sc.snapshot(model, plain),
            "type": type(opt).__name__}


SCENARIOS = {
    "lightning_ddp": lightning_ddp,
    "accelerate_fsdp2": lambda out: accelerate_fsdp2(False, out),
    "accelerate_fsdp2_8bit": lambda out: accelerate_fsdp2(True, out),
    "accelerate_fsdp2_checkpoint": lambda out: accelerate_fsdp2_checkpoint(False, out),
    "accelerate_fsdp2_8bit_checkpoint": lambda out: accelerate_fsdp2_checkpoint(True, out),
    "accelerate_fsdp2_fp8_checkpoint": lambda out: accelerate_fsdp2_checkpoint(False, out, moments="fp8"),
    "trainer_ddp": lambda out: trainer_route(False, out),
    "trainer_fsdp2": lambda out: trainer_route(True, out),
    "zero1": lambda out: deepspeed_zero(1, out),
    "zero2": lambda out: deepspeed_zero(2, out),
    "zero1_checkpoint": lambda out: deepspeed_checkpoint(1, out),
    "zero2_checkpoint": lambda out: deepspeed_checkpoint(2, out),
    "zero3": deepspeed_zero3,
    "zero2_fp8": lambda out: _first_step_error(2, moments="fp8"),
}


def main(out_dir: str, names) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if any(n.startswith("zero") for n in names):
        import importlib

        import deepspeed

        # DeepSpeed's CPU all-reduce kernel (a shared-memory op JIT-built on first use, ~45 s) is a
        # speed-up beside gloo, not what is tested here: without it DeepSpeed uses torch.distributed
        # (gloo) as it is. (``deepspeed.comm.torch`` as an attribute is the torch package.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in names:
        try:
            result = SCENARIOS[name](out_dir)
        except Exception:  # the parent shows it; the other scenarios still run
            result = {"crash": traceback.format_exc()}
        torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        dist.barrier()
    # Every rank is past the last barrier with its results on disk. Exit without tearing the groups
    # down: with the groups DeepSpeed and Accelerate add, one rank's teardown can close sockets a peer
    # is still destroying its own groups over, and that peer then aborts at exit (seen in 4 of ~60 runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
