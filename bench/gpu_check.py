"""GPU timings of the fused Triton AdamSPD (run on a CUDA machine, from the source tree).

    PYTHONPATH=. python bench/gpu_check.py [--out results.json] [--quick]

Correctness at realistic sizes (parity, the split step, determinism, CUDA
graphs, AMP, FSDP2 over NCCL, the HF examples) is the pytest suite's:
``PYTHONPATH=. python -m pytest -m cuda``. This script times, with
``triton.testing.do_bench`` (medians, all in this one run):

1. ms/step of AdamSPD (triton, full ``step()``), its kernels alone, its
   CUDA-graph replay, ``torch.optim.AdamW(fused=True)``, ``AdamW(foreach=True)``
   and the reference, on vit_b, many_small, llama_like and lora; GB/s at the
   minimal byte count (32 B/param SPD fp32, 28 AdamW) and % of the
   device-to-device copy bandwidth measured in the same run;
2. the kernels under other (BLOCK, TILES, num_warps) settings;
3. the split step's kernels (sharded params, no collective) next to the fused step's.
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


def make_params(shapes, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=DEV, dtype=dtype) * 0.02) for s in shapes]


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
    timing = []
    names = ["vit_b", "many_small", "lora"] + ([] if args.quick else ["llama_like"])
    for name in names:
        section(f"timing_{name}", lambda name=name: timing.extend(time_set(name, param_sets.get(name), bw)) or True)
    RESULTS["timing"] = timing
    section("configs", lambda: kernel_configs("vit_b", vit, bw) + kernel_configs("llama_like", param_sets.llama_like(), bw))
    section("split_timing", lambda: [split_timing("vit_b", vit, bw)] + (
        [] if args.quick else [split_timing("llama_like", param_sets.llama_like(), bw)]))
    log("")
    log(f"{'set':11s} {'impl':20s} {'ms/step':>9s} {'GB/s':>7s} {'%copy':>6s} {'vs fused':>8s} {'x ref':>7s}")
    for r in timing:
        log(f"{r['set']:11s} {r['impl']:20s} {r['ms']:9.3f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} "
            f"{r['vs_adamw_fused']:8.2f} {r['speedup_vs_reference']:7.1f}")
    log("sections: " + ", ".join(f"{n}={'ok' if ok else 'ERROR'}" for n, ok in sections))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 0 if all(ok for _, ok in sections) else 1

if __name__ == "__main__":
    sys.exit(main())
