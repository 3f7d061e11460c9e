"""End to end: a Llama-architecture model fine-tuned through the Hugging Face Trainer, one optimizer at a time.

    python bench/e2e_trainer.py                    # ~58M params, every optimizer, a table and JSON
    python bench/e2e_trainer.py --size tiny        # a seconds-long smoke run (what the test runs)

What it reports, per optimizer, from one invocation (each optimizer in a fresh
process, so peak memory is its own; all in one run, so the ratios compare):

- tokens/s of whole training steps (forward, backward, optimizer step, zero_grad), median over the
  timed steps after the warm-up ones;
- the optimizer step's share of a training step (time between the Trainer's
  ``on_pre_optimizer_step`` and ``on_optimizer_step`` callbacks);
- peak memory: the process's peak RSS on the CPU, peak allocated on a GPU;
- optimizer state bytes, counted from the tensors the optimizer holds (tensor subclasses, as
  torchao's 8-bit states, by their inner tensors), also per parameter.

The model is built from a ``LlamaConfig`` with random weights (nothing is downloaded) and trains on
synthetic token batches (next-token prediction on random ids): the cost, not the quality, is measured.
Optimizers: ``torch.optim.AdamW(fused=True)``, AdamSPD with fp32 states, with bf16 anchors, with 8-bit
moments (and bf16 anchors) through ``spd_kernels.hf.optimizer_cls_and_kwargs``, bitsandbytes'
``AdamW8bit`` and torchao's ``AdamW8bit`` (which compiles its step: its first steps are warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

OPTIMIZERS = ("adamw_fused", "adamspd_fp32", "adamspd_bf16_anchors", "adamspd_8bit", "bnb_adamw8bit",
              "torchao_adamw8bit")
SIZES = {
    # ~58M params: 16.4M embedding, 16.4M LM head, 8 layers of 3.2M
    "base": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}
LR = 1e-4


def optimizer_choice(name: str):
    """What to hand the Trainer for each optimizer: ``optimizer_cls_and_kwargs``."""
    import torch

    from spd_kernels.hf import optimizer_cls_and_kwargs

    if name == "adamw_fused":
        return torch.optim.AdamW, {"lr": LR, "fused": True}
    if name == "adamspd_fp32":
        return optimizer_cls_and_kwargs(lr=LR, weight_decay=1.0)
    if name == "adamspd_bf16_anchors":
        return optimizer_cls_and_kwargs(lr=LR, weight_decay=1.0, anchor_dtype=torch.bfloat16)
    if name == "adamspd_8bit":
        return optimizer_cls_and_kwargs(lr=LR, weight_decay=1.0, anchor_dtype=torch.bfloat16, optim_bits=8)
    if name == "bnb_adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit, {"lr": LR}
    if name == "torchao_adamw8bit":
        import torchao.optim

        return torchao.optim.AdamW8bit, {"lr": LR}
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized states) counts its inner tensors."""
    import torch

    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(optimizer) -> int:
    import torch

    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "spd_stats"):
        optimizer = optimizer.optimizer  # Accelerate's wrapper
    return sum(tensor_bytes(v) for entry in optimizer.state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


class TokenBatches:
    """Random token ids; the labels are the ids (the model shifts them): next-token prediction."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        import torch

        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def child(args) -> Dict[str, Any]:
    """One optimizer, in this process: train, time, measure."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    marks: List[Dict[str, float]] = []

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append({"begin": now()})

        def on_pre_optimizer_step(self, *a, **k):
            marks[-1]["opt_begin"] = now()

        def on_optimizer_step(self, *a, **k):
            marks[-1]["opt_end"] = now()

        def on_step_end(self, *a, **k):
            marks[-1]["end"] = now()

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch,
                                  report_to="none", save_strategy="no", logging_strategy="no", use_cpu=not cuda,
                                  seed=0, dataloader_num_workers=0, bf16=False)
        trainer = Trainer(model=model, args=targs, train_dataset=TokenBatches(args.batch * steps, args.seq,
                                                                              config.vocab_size),
                          optimizer_cls_and_kwargs=optimizer_choice(args.child), callbacks=[Timer()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = marks[args.warmup:]
    step = statistics.median(m["end"] - m["begin"] for m in timed)
    opt_step = statistics.median(m["opt_end"] - m["opt_begin"] for m in timed)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = state_bytes(trainer.optimizer)
    return {"optimizer": args.child, "params": n_params, "tokens_per_s": args.batch * args.seq / step,
            "step_s": step, "optimizer_step_s": opt_step, "optimizer_share": opt_step / step,
            "peak_bytes": peak, "peak_kind": "peak allocated (GPU)" if cuda else "peak RSS",
            "state_bytes": state, "state_bytes_per_param": state / n_params, "timed_steps": len(timed)}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from spd_kernels.bench.machine import cpu_cores, cpu_model

    return f"{cpu_model()}, {cpu_cores()} cores"


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes", "torchao"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def table(rows: List[Dict[str, Any]]) -> str:
    base = next((r for r in rows if r["optimizer"] == "adamw_fused"), rows[0])
    lines = ["| optimizer | tokens/s | vs AdamW fused | optimizer step (ms) | share of a step | "
             f"{rows[0]['peak_kind']} (MB) | state (MB) | state B/param |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                     f"| {1e3 * r['optimizer_step_s']:.1f} | {100 * r['optimizer_share']:.1f}% "
                     f"| {r['peak_bytes'] / 2**20:.0f} | {r['state_bytes'] / 2**20:.1f} "
                     f"| {r['state_bytes_per_param']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    parser.add_argument("--out", default=None, help="write e2e.json and e2e.md here")
    parser.add_argument("--child", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for name in args.optimizers:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--size", args.size, "--seq", str(args.seq),
               "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    meta = {"machine": machine(), "versions": versions(), "size": args.size, "params": rows[0]["params"],
            "seq": args.seq, "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d")}
    text = (f"{meta['machine']}; {meta['params'] / 1e6:.1f}M-param Llama ({args.size}), {args.batch} x {args.seq} "
            f"tokens per step, median of {args.steps} steps after {args.warmup}; "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n\n" + table(rows))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "e2e.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
