"""GPU checks at realistic sizes: ``python -m pytest -m cuda`` on a machine with a GPU.

The same parity harness as the small CPU tests (``spd_kernels.testing``), on
the ViT-B/16 parameter set (152 tensors, 86.6M params): one step of the fused
Triton kernels against the reference from the same state, both branches of
SPD's condition taken; the split step (two shards per tensor) likewise;
determinism; CUDA-graph capture; AMP's GradScaler; a one-rank FSDP2 run over
NCCL; an optimizer built before ``model.cuda()``; the Hugging Face examples.
Skipped without a GPU. Timings are not here: ``python -m spd_kernels bench``
(with ``--kernels-only --cuda-graph`` for where a step's time goes) measures them.
"""
from __future__ import annotations

import copy
import os
import socket
import sys

import pytest
import torch

from spd_kernels import AdamSPD
from spd_kernels.bench import param_sets
from spd_kernels.testing import CASES, bucket_of, case_id, new_state, relative_error, run_step_parity, signed_grad
from spd_kernels.testing import two_shard_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = torch.device("cuda")
VIT_B = param_sets.vit_b()
#: the dtype mixes users run: fp32, bf16 anchors, anchor-free, bf16 params, fp16 params, amsgrad, tensor lr
REALISTIC_CASES = [CASES[i] for i in (0, 1, 2, 3, 4, 6, 8)]


@pytest.fixture(scope="module")
def kernels():
    from spd_kernels.ops import adam_spd

    return adam_spd


@pytest.mark.parametrize("case", REALISTIC_CASES, ids=[case_id(c) for c in REALISTIC_CASES])
def test_vit_b_step_matches_reference(kernels, case):
    run_step_parity(kernels.adam_spd_triton_step, VIT_B, case, DEV, steps=3)


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=[case_id(c) for c in (CASES[0], CASES[6])])
def test_vit_b_split_step_matches_reference(kernels, case):
    run_step_parity(two_shard_step(kernels.adam_spd_triton_partials), VIT_B, case, DEV, steps=3)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=[case_id(c) for c in (CASES[0], CASES[2], CASES[4])])
def test_vit_b_8bit_step_matches_reference(kernels, case):
    # 8-bit moments at ViT-B size: codes equal but for ties, params within the fp32 tolerance
    run_step_parity(kernels.adam_spd_triton_step, VIT_B, case, DEV, steps=3, eight_bit=True)


@pytest.mark.parametrize("pair", [("fp8", "bf16"), ("bf16", "bf16")])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=[case_id(c) for c in (CASES[0], CASES[2], CASES[4])])
def test_vit_b_compressed_step_matches_reference(kernels, case, pair):
    # fp8 m + bf16 v and bf16 moments at ViT-B size: codes equal but for ties, params within tolerance
    run_step_parity(kernels.adam_spd_triton_step, VIT_B, case, DEV, steps=3, formats=pair)


def test_8bit_optimizer_on_the_gpu_runs_triton_and_tracks_32bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).to(DEV)
    twin = copy.deepcopy(model)
    opt8 = AdamSPD(model.parameters(), lr=1e-3, weight_decay=1.0, optim_bits=8, anchor_dtype=torch.bfloat16)
    opt32 = AdamSPD(twin.parameters(), lr=1e-3, weight_decay=1.0, anchor_dtype=torch.bfloat16)
    x, y = torch.randn(1024, 256, device=DEV), torch.randint(0, 10, (1024,), device=DEV)
    for _ in range(30):
        for m, o in ((model, opt8), (twin, opt32)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert all(b.name == "triton" for b, _ in opt8.buckets())
    assert opt8.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    for p, q in zip(model.parameters(), twin.parameters()):
        moved = (q.detach() - opt32.state[q]["anchor"].float()).norm()
        assert float((p - q).norm()) < 0.1 * float(moved) + 1e-6


def test_two_runs_are_bitwise_identical(kernels):
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        state = new_state(VIT_B[:40], torch.float32, torch.float32, False, gen, DEV)
        grad_gen = torch.Generator(device=DEV).manual_seed(5)
        for step in range(3):
            anchors = state["anchors"]
            grads = [signed_grad(p, a, (-1.0) ** (i + step), grad_gen)
                     for i, (p, a) in enumerate(zip(state["params"], anchors))]
            kernels.adam_spd_triton_step(bucket_of(state, grads, lr=1e-3, weight_decay=1.0))
        outs.append(state)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key])), key


def _params(shapes, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=DEV, dtype=dtype) * 0.02) for s in shapes]


def test_cuda_graph_replay_equals_eager():
    shapes = VIT_B[:60]
    eager, graphed = _params(shapes, 1), _params(shapes, 1)
    gen = torch.Generator(device=DEV).manual_seed(9)
    for i, (p, q) in enumerate(zip(eager, graphed)):
        p.grad = signed_grad(p.detach(), None, (-1.0) ** i, gen)
        q.grad = p.grad.clone()
    opt_e = AdamSPD(eager, lr=1e-3, weight_decay=1.0, impl="triton")
    opt_g = AdamSPD(graphed, lr=1e-3, weight_decay=1.0, impl="triton")
    side = torch.cuda.Stream()  # warm up on a side stream (plans, state), as torch's graph docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt_g.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        opt_e.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for _ in range(5):  # capture ran nothing: 5 replays == 5 eager steps
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed):
        assert torch.equal(p, q)
        assert torch.equal(opt_e.state[p]["step"], opt_g.state[q]["step"])
    assert opt_g.state[graphed[0]]["step"].item() == 8


def test_grad_scaler_equals_unscale_then_step_and_inf_skips():
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(DEV)
    model_b = copy.deepcopy(model_a)
    x, y = torch.randn(512, 64, device=DEV), torch.randn(512, 8, device=DEV)
    opts = [AdamSPD(m.parameters(), lr=1e-2, weight_decay=1.0, impl="triton") for m in (model_a, model_b)]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12) for _ in range(2)]
    for step in range(10):
        idx = torch.randint(0, 512, (64,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(step))
        for k, (model, opt, scaler) in enumerate(zip((model_a, model_b), opts, scalers)):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x[idx]).float(), y[idx])
            scaler.scale(loss).backward()
            if k == 1:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert relative_error(p, q) <= 1e-6
    before = [p.detach().clone() for p in model_a.parameters()]
    steps_before = [opts[0].state[p]["step"].clone() for p in model_a.parameters()]
    opts[0].zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model_a(x).float(), y)
    scalers[0].scale(loss).backward()
    next(model_a.parameters()).grad[0, 0] = float("inf")
    scalers[0].step(opts[0])
    for p, b, s in zip(model_a.parameters(), before, steps_before):
        assert torch.equal(p, b) and torch.equal(opts[0].state[p]["step"], s)


def test_fsdp2_one_rank_over_nccl_equals_plain_and_reduces_once_per_step():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    if not dist.is_nccl_available():
        pytest.skip("NCCL not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.randn(32, 64, device=DEV)
        results, comms = [], []
        for sharded in (False, True):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 8)).to(DEV)
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
        assert comms == [1] * 5
        for a, b in zip(results[1], results[0]):
            assert relative_error(a, b) <= 1e-6
    finally:
        dist.destroy_process_group()


def test_optimizer_built_before_model_cuda_follows_its_params():
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
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(v.is_cuda for s in opt.state.values() for k, v in s.items() if k != "step")


def test_hugging_face_examples_train_on_the_gpu():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import hf_trainer
    import peft_lora

    losses, _ = hf_trainer.main(max_steps=60)
    lora_losses, opt = peft_lora.main(steps=80)
    assert losses[-1] < 0.7 * losses[0]
    assert sum(lora_losses[-10:]) < 0.8 * sum(lora_losses[:10])
    assert all(p.is_cuda for g in opt.param_groups for p in g["params"])
