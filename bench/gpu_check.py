"""GPU check for the fused Triton AdamSPD (run on a CUDA machine, from the source tree).

    PYTHONPATH=. python bench/gpu_check.py [--out results.json] [--quick]

1. Parity at realistic sizes: one step from identical state, kernel vs
   reference, on vit_b (fp32 and bf16 params, anchored / anchor-free /
   amsgrad), over several steps; determinism (two runs bitwise equal).
2. CUDA graph: captures ``opt.step()`` and replays it; replay == eager, bitwise.
3. Timing (``triton.testing.do_bench``, medians, all in this one run): ms/step
   of AdamSPD (triton, full ``step()``), its kernels alone, its CUDA-graph
   replay, ``torch.optim.AdamW(fused=True)``, ``AdamW(foreach=True)`` and the
   reference, on vit_b, many_small, llama_like and lora; GB/s at the minimal
   byte count (32 B/param SPD fp32, 28 AdamW) and % of the device-to-device
   copy bandwidth measured in the same run.
4. The split step (sharded params): two-shard emulation on vit_b against the
   reference; its kernels' time next to the fused step's; a one-rank FSDP2 run
   over NCCL (DTensor params, the all-reduce on the GPU) against the
   single-process optimizer, with the collectives counted.
5. The Hugging Face examples on the GPU, if transformers/peft are installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

from spd_kernels import AdamSPD, param_sets
from spd_kernels.bucket import Bucket
from spd_kernels.ops import adam_spd as k
from spd_kernels.reference import reference_step
from spd_kernels.verify import two_shard_step
from spd_kernels.stats import STAT_C

DEV = torch.device("cuda")
RESULTS: dict = {}


def log(*args):
    print(*args, flush=True)


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read + written."""
    n = 1 << 28  # 1 GiB of fp32
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * n * 4 / ms / 1e6


def signed_grads(params, anchors, gen_seed):
    """Random grads whose condition c has a random, clear sign per tensor."""
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    out = []
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, device=DEV, generator=g)
        d = p.float() - (anchors[i].float() if anchors is not None else 0.0)
        dd = float((d * d).sum())
        sign = 1.0 if (i * 7 + gen_seed) % 3 else -1.0
        k_ = 3.0 * float(noise.norm()) / max(dd, 1e-30) ** 0.5 + 1e-3
        out.append((noise - sign * k_ * d).to(p.dtype))
    return out


def make_state(shapes, p_dtype, a_dtype, amsgrad, seed=0):
    torch.manual_seed(seed)
    params = [torch.randn(s, device=DEV).to(p_dtype) for s in shapes]
    return dict(
        params=params,
        exp_avgs=[torch.zeros(s, device=DEV) for s in shapes],
        exp_avg_sqs=[torch.zeros(s, device=DEV) for s in shapes],
        max_exp_avg_sqs=[torch.zeros(s, device=DEV) for s in shapes] if amsgrad else None,
        anchors=None if a_dtype is None else [(p.float() + 0.1 * torch.randn_like(p.float())).to(a_dtype)
                                              for p in params],
        steps=[torch.zeros((), device=DEV) for _ in shapes],
    )


def rel(x, y):
    if x.numel() == 0:
        return 0.0
    return float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))


def parity(name, shapes, p_dtype, a_dtype, amsgrad, steps=4):
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1.0, amsgrad=amsgrad)
    state = make_state(shapes, p_dtype, a_dtype, amsgrad)
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    branch_mismatch = fired = 0
    for step in range(steps):
        grads = signed_grads(state["params"], state["anchors"], step + 1)
        want = {key: None if v is None else [t.clone() for t in v] for key, v in state.items()}
        want_stats = reference_step(grads=grads, **want, **hp)
        got_stats = k.adam_spd_triton_step(Bucket(grads=grads, **state, **hp)).clone()
        for i in range(len(shapes)):
            worst["param"] = max(worst["param"], rel(state["params"][i], want["params"][i]))
            worst["exp_avg"] = max(worst["exp_avg"], rel(state["exp_avgs"][i], want["exp_avgs"][i]))
            worst["exp_avg_sq"] = max(worst["exp_avg_sq"], rel(state["exp_avg_sqs"][i], want["exp_avg_sqs"][i]))
        gs, ws = got_stats.cpu(), want_stats.cpu()
        branch_mismatch += int(((gs[:, STAT_C] < 0) != (ws[:, STAT_C] < 0)).sum())
        fired += int((gs[:, STAT_C] < 0).sum())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[p_dtype]
    ok = all(v <= tol for v in worst.values()) and branch_mismatch == 0 and fired > 0
    row = dict(set=name, p=str(p_dtype), a=str(a_dtype), amsgrad=amsgrad, fired=fired,
               branch_mismatch=branch_mismatch, ok=ok, **worst)
    log(f"parity {name:10s} p={p_dtype} a={a_dtype} amsgrad={amsgrad}: "
        + " ".join(f"{kk}={v:.2e}" for kk, v in worst.items())
        + f" fired={fired} branch_mismatch={branch_mismatch} {'PASS' if ok else 'FAIL'}")
    return row


def determinism():
    outs = []
    for _ in range(2):
        state = make_state(param_sets.vit_b()[:40], torch.float32, torch.float32, False, seed=3)
        for step in range(3):
            grads = signed_grads(state["params"], state["anchors"], step + 5)
            k.adam_spd_triton_step(Bucket(grads=grads, **state, lr=1e-3, weight_decay=1.0))
        outs.append(state)
    same = all(torch.equal(a, b) for a, b in zip(outs[0]["params"], outs[1]["params"]))
    log(f"determinism: two runs bitwise equal = {same}")
    return same


def split_parity(name, shapes, p_dtype, a_dtype, steps=3):
    """The split step on two halves of every tensor (sums added between), against the reference."""
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1.0, amsgrad=False)
    state = make_state(shapes, p_dtype, a_dtype, False)
    split = two_shard_step(k.adam_spd_triton_partials)
    worst, mismatch = 0.0, 0
    for step in range(steps):
        grads = signed_grads(state["params"], state["anchors"], step + 11)
        want = {key: None if v is None else [t.clone() for t in v] for key, v in state.items()}
        want_stats = reference_step(grads=grads, **want, **hp)
        got_stats = split(Bucket(grads=grads, **state, **hp)).clone()
        worst = max([worst] + [rel(p, q) for p, q in zip(state["params"], want["params"])])
        mismatch += int(((got_stats[:, STAT_C] < 0) != (want_stats[:, STAT_C] < 0)).sum())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[p_dtype]
    ok = worst <= tol and mismatch == 0
    log(f"split parity {name} p={p_dtype} a={a_dtype}: param={worst:.2e} branch_mismatch={mismatch} "
        f"{'PASS' if ok else 'FAIL'}")
    return dict(set=name, p=str(p_dtype), a=str(a_dtype), param=worst, branch_mismatch=mismatch, ok=ok)


def split_timing(name, shapes, bw, reps_ms=200):
    """Kernels of the split step (no collective) next to the fused step's, same bucket."""
    n = param_sets.numel(shapes)
    state = make_state(shapes, torch.float32, torch.float32, False, seed=5)
    grads = signed_grads(state["params"], state["anchors"], 3)
    bucket = Bucket(grads=grads, **state, lr=1e-3, weight_decay=1.0)
    fused = do_bench(lambda: k.adam_spd_triton_step(bucket), warmup=50, rep=reps_ms, return_mode="median")
    bucket.backend_cache = None
    bucket.sums = torch.zeros((len(shapes), 3), dtype=torch.float64, device=DEV)
    split = do_bench(lambda: k.adam_spd_triton_partials(bucket)(), warmup=50, rep=reps_ms, return_mode="median")
    row = dict(set=name, fused_ms=fused, split_ms=split, split_vs_fused=split / fused,
               split_pct_copy=100 * n * 32 / split / 1e6 / bw)
    log(f"split timing {name}: fused {fused:.3f} ms, split {split:.3f} ms ({split / fused:.2f}x), "
        f"{row['split_pct_copy']:.1f}% of copy")
    return row


def fsdp_one_rank():
    """FSDP2 on a one-rank NCCL mesh: DTensor params, the sums all-reduced on the GPU."""
    import os
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 8)).to(DEV)

        x = torch.randn(32, 64, device=DEV)
        results = []
        comms = []
        for sharded in (False, True):
            m = model()
            anchors = [p.detach() + 0.01 for p in m.parameters()]  # full tensors, placed like their params
            if sharded:
                fully_shard(m, mesh=init_device_mesh("cuda", (1,)))
            opt = AdamSPD([{"params": list(m.parameters()), "pre": anchors}], lr=1e-2, weight_decay=1.0)
            for _ in range(5):
                opt.zero_grad()
                m(x).square().mean().backward()
                with CommDebugMode() as mode:
                    opt.step()
                if sharded:
                    comms.append(mode.get_total_counts())
            results.append([(p.full_tensor() if sharded else p).detach().clone() for p in m.parameters()])
        worst = max(rel(a, b) for a, b in zip(results[1], results[0]))
        ok = worst <= 1e-6 and comms == [1] * 5
        log(f"fsdp one rank (nccl): worst rel err {worst:.2e}, collectives per step {comms} "
            f"{'PASS' if ok else 'FAIL'}")
        return ok
    finally:
        dist.destroy_process_group()


def hf_examples():
    """The Hugging Face examples on the GPU (Trainer + scheduler; PEFT LoRA), when installed."""
    import importlib.util
    import os

    if not all(importlib.util.find_spec(m) for m in ("transformers", "peft", "accelerate")):
        log("hf examples: transformers/peft/accelerate not installed here, skipped")
        return "skipped"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import hf_trainer
    import peft_lora

    losses, _ = hf_trainer.main(max_steps=60)
    lora_losses, opt = peft_lora.main(steps=80)
    lora_first, lora_last = sum(lora_losses[:10]) / 10, sum(lora_losses[-10:]) / 10
    on_gpu = all(p.is_cuda for g in opt.param_groups for p in g["params"])
    ok = losses[-1] < 0.7 * losses[0] and lora_last < 0.8 * lora_first and on_gpu
    log(f"hf examples: trainer loss {losses[0]:.3f} -> {losses[-1]:.3f}; lora {lora_first:.3f} -> {lora_last:.3f};"
        f" params on GPU {on_gpu} {'PASS' if ok else 'FAIL'}")
    return ok


def built_before_cuda():
    """An optimizer built on CPU params, then model.cuda(): state and anchors follow the params."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = AdamSPD(model.parameters(), lr=1e-2, weight_decay=1.0)
    twin = torch.nn.Linear(64, 32).to(DEV)
    twin.load_state_dict(model.state_dict())
    twin_opt = AdamSPD(twin.parameters(), lr=1e-2, weight_decay=1.0)
    model.to(DEV)
    x = torch.randn(16, 64, device=DEV)
    for _ in range(4):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    on_gpu = all(v.is_cuda for s in opt.state.values() for k, v in s.items() if k != "step")
    log(f"optimizer built before model.cuda(): equal to one built after = {same}, state on GPU = {on_gpu}")
    return same and on_gpu


def make_params(shapes, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=DEV, dtype=dtype) * 0.02) for s in shapes]


def cuda_graph_check():
    shapes = param_sets.vit_b()[:60]
    eager = make_params(shapes, seed=1)
    graphed = make_params(shapes, seed=1)
    grads = signed_grads([p.detach() for p in eager], None, 9)
    for p, q, g in zip(eager, graphed, grads):
        p.grad = g.clone()
        q.grad = g.clone()
    opt_e = AdamSPD(eager, lr=1e-3, weight_decay=1.0, impl="triton")
    opt_g = AdamSPD(graphed, lr=1e-3, weight_decay=1.0, impl="triton")
    # warm up on a side stream (builds plans and state), as torch's graph docs ask
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt_g.step()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        opt_e.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    # capture does not run the work: replay 5 times == 5 eager steps
    for _ in range(5):
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    same = all(torch.equal(p, q) for p, q in zip(eager, graphed))
    steps_same = all(torch.equal(opt_e.state[p]["step"], opt_g.state[q]["step"]) for p, q in zip(eager, graphed))
    log(f"cuda graph: replay == eager bitwise: params={same} steps={steps_same} "
        f"(step={opt_g.state[graphed[0]]['step'].item():.0f})")
    return same and steps_same


def amp_check():
    """GradScaler on CUDA: scaler.step == unscale_ then step; an injected inf changes nothing."""
    import copy

    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(DEV)
    model_b = copy.deepcopy(model_a)
    x, y = torch.randn(512, 64, device=DEV), torch.randn(512, 8, device=DEV)
    opts = [AdamSPD(m.parameters(), lr=1e-2, weight_decay=1.0, impl="triton") for m in (model_a, model_b)]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12) for _ in range(2)]
    for step in range(10):
        idx = torch.randint(0, 512, (64,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(step))
        for k_, (model, opt, scaler) in enumerate(zip((model_a, model_b), opts, scalers)):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x[idx]).float(), y[idx])
            scaler.scale(loss).backward()
            if k_ == 1:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    worst = max(rel(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    before = [p.detach().clone() for p in model_a.parameters()]
    steps_before = [opts[0].state[p]["step"].clone() for p in model_a.parameters()]
    opts[0].zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model_a(x).float(), y)
    scalers[0].scale(loss).backward()
    next(model_a.parameters()).grad[0, 0] = float("inf")
    scalers[0].step(opts[0])
    scalers[0].update()
    unchanged = all(torch.equal(p, b) for p, b in zip(model_a.parameters(), before)) and all(
        torch.equal(opts[0].state[p]["step"], s) for p, s in zip(model_a.parameters(), steps_before))
    ok = worst <= 1e-6 and unchanged
    log(f"amp: scaler.step vs unscale_+step worst rel err {worst:.2e}; injected inf left everything unchanged: "
        f"{unchanged} {'PASS' if ok else 'FAIL'}")
    return ok


def time_set(name, shapes, bw, reps_ms=200):
    n = param_sets.numel(shapes)
    rows = []
    anchor_free = name == "lora"

    def spd_opt(impl, params):
        pre = None if anchor_free else [p.detach().clone() + 0.01 for p in params]
        return AdamSPD([{"params": params, "pre": pre}], lr=1e-3, weight_decay=1.0, impl=impl)

    def with_grads(params, seed):
        for p, g in zip(params, signed_grads([p.detach() for p in params], None, seed)):
            p.grad = g

    def record(label, ms, bytes_per_param):
        gbs = n * bytes_per_param / ms / 1e6
        rows.append(dict(set=name, impl=label, ms=ms, gbs=gbs, pct_copy=100 * gbs / bw))

    # ours: full step(), kernels alone, CUDA graph replay
    params = make_params(shapes, seed=2)
    with_grads(params, 4)
    opt = spd_opt("triton", params)
    opt.step()
    torch.cuda.synchronize()
    record("spd triton step()", do_bench(opt.step, warmup=50, rep=reps_ms, return_mode="median"), 32)
    stats = opt.last_step_stats()
    fired = sum(int(stats[p][STAT_C] < 0) for p in params)
    bucket = opt._bucket_cache[1][0][2]
    record("spd triton kernels", do_bench(lambda: k.adam_spd_triton_step(bucket), warmup=50, rep=reps_ms,
                                          return_mode="median"), 32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    record("spd triton graph", do_bench(graph.replay, warmup=50, rep=reps_ms, return_mode="median"), 32)
    del graph, opt, bucket, params
    torch.cuda.empty_cache()

    for label, kw in (("adamw fused", dict(fused=True)), ("adamw foreach", dict(foreach=True)),
                      ("adamw fused again", dict(fused=True))):
        params = make_params(shapes, seed=2)
        with_grads(params, 4)
        adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
        adamw.step()
        record(label, do_bench(adamw.step, warmup=50, rep=reps_ms, return_mode="median"), 28)
        del adamw, params
        torch.cuda.empty_cache()

    params = make_params(shapes, seed=2)
    with_grads(params, 4)
    ref = spd_opt("reference", params)
    ref.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        ref.step()
    torch.cuda.synchronize()
    record("spd reference", (time.perf_counter() - t0) * 1e3 / reps, 32)
    del ref, params
    torch.cuda.empty_cache()

    fused_ms = next(r["ms"] for r in rows if r["impl"] == "adamw fused")
    ref_ms = next(r["ms"] for r in rows if r["impl"] == "spd reference")
    for r in rows:
        r["vs_adamw_fused"] = r["ms"] / fused_ms
        r["speedup_vs_reference"] = ref_ms / r["ms"]
        r["fired"] = fired
        r["tensors"] = len(shapes)
        r["params_M"] = n / 1e6
    return rows


def kernel_configs(name, shapes, bw, reps_ms=200):
    """Kernels alone under other (BLOCK, TILES, num_warps) settings than the default."""
    n = param_sets.numel(shapes)
    state = make_state(shapes, torch.float32, torch.float32, False, seed=5)
    grads = signed_grads(state["params"], state["anchors"], 3)
    bucket = Bucket(grads=grads, **state, lr=1e-3, weight_decay=1.0)
    rows = []
    for block, tiles, warps in ((1024, 4, 8), (1024, 8, 8), (2048, 2, 8), (2048, 4, 8), (512, 8, 4), (1024, 2, 4)):
        fn = lambda: k.adam_spd_triton_step(bucket, block=block, tiles=tiles, num_warps=warps)  # noqa: E731
        fn()
        ms = do_bench(fn, warmup=50, rep=reps_ms, return_mode="median")
        gbs = n * 32 / ms / 1e6
        rows.append(dict(set=name, block=block, tiles=tiles, warps=warps, ms=ms, gbs=gbs, pct_copy=100 * gbs / bw))
        log(f"config {name:10s} BLOCK={block:5d} TILES={tiles} warps={warps}: {ms:.3f} ms, {gbs:.0f} GB/s, "
            f"{100 * gbs / bw:.1f}% of copy")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="skip llama_like")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = dict(name=props.name, sms=props.multi_processor_count,
                             torch=torch.__version__, triton=triton.__version__)
    log(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}")
    sections = []

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn()
            sections.append((name, True))
        except Exception:
            traceback.print_exc()
            RESULTS[name] = "error"
            sections.append((name, False))
        log(f"[{name}: {time.perf_counter() - t0:.1f}s]")

    section("copy_gbs", copy_bandwidth)
    bw = RESULTS.get("copy_gbs") if isinstance(RESULTS.get("copy_gbs"), float) else 3000.0
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    vit = param_sets.vit_b()
    section("parity", lambda: [
        parity("vit_b", vit, torch.float32, torch.float32, False),
        parity("vit_b", vit, torch.float32, torch.bfloat16, True),
        parity("vit_b", vit, torch.float32, None, False),
        parity("vit_b", vit, torch.bfloat16, torch.bfloat16, False),
        parity("vit_b", vit, torch.bfloat16, None, True),
        parity("vit_b", vit, torch.float16, torch.float32, False),
    ])
    section("determinism", determinism)
    section("cuda_graph", cuda_graph_check)
    section("amp", amp_check)
    timing = []
    names = ["vit_b", "many_small", "lora"] + ([] if args.quick else ["llama_like"])
    for name in names:
        section(f"timing_{name}", lambda name=name: timing.extend(time_set(name, param_sets.get(name), bw)) or True)
    RESULTS["timing"] = timing
    section("configs", lambda: kernel_configs("vit_b", vit, bw) + kernel_configs("llama_like", param_sets.llama_like(), bw))
    section("split_parity", lambda: [
        split_parity("vit_b", vit, torch.float32, torch.float32),
        split_parity("vit_b", vit, torch.bfloat16, None),
    ])
    section("split_timing", lambda: [split_timing("vit_b", vit, bw)] + (
        [] if args.quick else [split_timing("llama_like", param_sets.llama_like(), bw)]))
    section("fsdp_one_rank", fsdp_one_rank)
    section("hf_examples", hf_examples)
    section("built_before_cuda", built_before_cuda)

    log("")
    log(f"{'set':11s} {'impl':20s} {'ms/step':>9s} {'GB/s':>7s} {'%copy':>6s} {'vs fused':>8s} {'x ref':>7s}")
    for r in timing:
        log(f"{r['set']:11s} {r['impl']:20s} {r['ms']:9.3f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} "
            f"{r['vs_adamw_fused']:8.2f} {r['speedup_vs_reference']:7.1f}")
    log("sections: " + ", ".join(f"{n}={'ok' if ok else 'ERROR'}" for n, ok in sections))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    parity_ok = isinstance(RESULTS.get("parity"), list) and all(r["ok"] for r in RESULTS["parity"])
    checks_ok = all(RESULTS.get(name) is True
                    for name in ("determinism", "cuda_graph", "amp", "fsdp_one_rank", "built_before_cuda"))
    checks_ok = checks_ok and RESULTS.get("hf_examples") in (True, "skipped")
    checks_ok = checks_ok and isinstance(RESULTS.get("split_parity"), list) and all(
        r["ok"] for r in RESULTS["split_parity"])
    return 0 if parity_ok and checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
