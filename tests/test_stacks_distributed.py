"""AdamSPD where large models are fine-tuned: Accelerate's FSDP2, the HF Trainer (DDP, FSDP2), DeepSpeed ZeRO.

Two ranks on 127.0.0.1 (gloo, torchrun) run tests/stack_runs.py; the assertions
are here. Every rank trains the model of tests/distributed_scenarios.py on the
same batches, so each framework's averaged gradients equal the single-process
ones, and a sharded run must equal the single-process run.

- Accelerate shards with FSDP2 only on an accelerator (on a CPU its FSDP plugin
  gives DDP). The runs force its distributed type to FSDP, so ``prepare`` runs
  Accelerate's own ``_prepare_fsdp2`` (the optimizer built on the unsharded
  model, placeholders, ``fully_shard``, ``fsdp2_switch_optimizer_parameters``)
  and ``save_state``/``load_state`` its FSDP2 checkpoint code, over gloo. The
  Trainer's FSDP2 run is a ``Trainer`` whose Accelerator is forced the same way.
- Lightning's DDP runs under torchrun (it takes the ranks from the environment).
- DeepSpeed 0.19.8 runs ZeRO on this CPU (``DS_ACCELERATOR=cpu``). The runs
  leave out its JIT-built shared-memory all-reduce (a speed-up over gloo).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from .test_distributed import assert_matches_single_process, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STACK_SCENARIOS = ["accelerate_fsdp2", "accelerate_fsdp2_8bit", "accelerate_fsdp2_checkpoint",
                   "accelerate_fsdp2_8bit_checkpoint", "accelerate_fsdp2_fp8_checkpoint", "trainer_ddp", "trainer_fsdp2", "lightning_ddp"]
ZERO_SCENARIOS = ["zero1", "zero2", "zero1_checkpoint", "zero2_checkpoint", "zero3", "zero2_fp8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out_dir, scenarios, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.join(ROOT, "tests", "stack_runs.py"),
           str(out_dir), *scenarios]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    (out_dir / "torchrun.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return {name: [torch.load(out_dir / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
            for name in scenarios}


def ranks(results, name):
    """Both ranks' results of a scenario; a scenario that raised fails its own tests, naming the error."""
    for rank in results[name]:
        assert "crash" not in rank, rank["crash"]
    return results[name]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    pytest.importorskip("pytorch_lightning")
    return torchrun(tmp_path_factory.mktemp("stacks"), STACK_SCENARIOS)


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return torchrun(tmp_path_factory.mktemp("zero"), ZERO_SCENARIOS, DS_ACCELERATOR="cpu",
                    TORCH_EXTENSIONS_DIR=str(tmp_path_factory.mktemp("torch_extensions")))


def assert_resumed_bitwise(rank):
    """A run resumed from a mid-run checkpoint ends where the uninterrupted run did, anchors included."""
    want, got = rank["uninterrupted"], rank["resumed"]
    assert want.keys() == got.keys() and any(k.startswith("anchor/") for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------------------- Accelerate FSDP2

@pytest.mark.parametrize("name", ["accelerate_fsdp2", "accelerate_fsdp2_8bit"])
def test_accelerate_fsdp2_keeps_given_anchors_and_equals_the_single_process_run(stacks, name):
    for rank in ranks(stacks, name):
        # anchors given for layer 0 in 'pre' (full tensors, built before sharding) are the ones used:
        # params, moments, anchors and stats equal the single-process run's with those anchors
        assert any(k.startswith("anchor/0.") for k in rank["single"])
        assert_matches_single_process(rank["sharded"], rank["single"], min_fired=4)


@pytest.mark.parametrize("name", ["accelerate_fsdp2", "accelerate_fsdp2_8bit"])
def test_accelerate_fsdp2_leaves_no_stale_state(stacks, name):
    for rank in ranks(stacks, name):
        assert rank["state_is_the_params"] and rank["param_kinds"] == rank["state_kinds"] == ["DTensor"]
        # this rank's shards only: about half the model each (not the 3x of full-size state per rank)
        assert rank["local_param_numel"] < 0.55 * rank["full_param_numel"]
        per_param = rank["local_state_numel"] / rank["local_param_numel"]
        assert per_param <= 3.0  # exp_avg, exp_avg_sq (codes under 8-bit) and anchor, for its own shards


@pytest.mark.parametrize("name", ["accelerate_fsdp2_checkpoint", "accelerate_fsdp2_8bit_checkpoint",
                                  "accelerate_fsdp2_fp8_checkpoint"])
def test_accelerate_save_state_load_state_resumes_bitwise(stacks, name):
    for rank in ranks(stacks, name):
        assert_resumed_bitwise(rank)


# ---------------------------------------------------------------------------- HF Trainer

@pytest.mark.parametrize("name, sharded", [("trainer_ddp", False), ("trainer_fsdp2", True)])
def test_trainer_route_gives_lambda_names_and_state_of_the_stepped_params(stacks, name, sharded):
    for rank in ranks(stacks, name):
        assert rank["lambdas"] == [1.0, 0.0]  # SPD's lambda on the pre-trained weights, the new head plain
        assert rank["names"][1] == ["classifier.weight", "classifier.bias"]
        assert "bert.embeddings.word_embeddings.weight" in rank["stats_names"] and rank["fired"] > 0
        assert rank["state_is_the_params"] and rank["sharded"] == [sharded]
        anchored = [k for k in rank if k.startswith("anchor/")]
        assert len(anchored) == len(rank["names"][0])
        for key in anchored:  # each anchor is its weight before the first update
            assert torch.equal(rank[key], rank["initial"][key[len("anchor/"):]]), key
    first, second = ranks(stacks, name)
    for key, value in first.items():
        if key.startswith("param/"):
            assert torch.equal(value, second[key]), key  # the ranks agree


# ---------------------------------------------------------------------------- Lightning

def test_lightning_configure_optimizers_under_ddp_equals_the_single_process_run(stacks):
    for rank in ranks(stacks, "lightning_ddp"):
        assert rank["type"] == "AdamSPD"
        got, want = rank["sharded"], rank["single"]
        assert got.keys() == want.keys() and any(k.startswith("anchor/") for k in want)
        for key in want:
            assert relative_error(got[key], want[key]) <= 1e-6, key


# ---------------------------------------------------------------------------- DeepSpeed ZeRO

@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_deepspeed_zero_equals_the_single_process_run(zero, name):
    for rank in ranks(zero, name):
        single = rank["single"]
        assert {k.split("/")[0] for k in single} >= {"param", "exp_avg", "exp_avg_sq", "anchor", "projections"}
        for key, want in single.items():
            if key.startswith("projections/"):
                continue
            assert relative_error(rank[key], want) <= 1e-6, (key, relative_error(rank[key], want))
        # the stats of the fragments this rank holds are their whole tensors'
        assert rank["projections"]
        for layer, count in rank["projections"].items():
            assert torch.equal(count, single[f"projections/{layer}"]), layer
        assert sum(int(v) for k, v in single.items() if k.startswith("projections/")) >= 4


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_deepspeed_zero_state_is_the_partitions_and_one_all_reduce_per_step_call(zero, name):
    for rank in ranks(zero, name):
        flats = [shape for group in rank["group_params"] for shape in group]
        assert rank["state_keys"] == flats and rank["state_dict_keys"] == [0, 1, 2]
        # moments and anchors of this rank's partition only (about half the model, three states)
        assert rank["state_numel"] <= 3 * (rank["model_numel"] / 2 + 16)
        assert rank["lambdas"] == [1.0, 1.0, 1.0]
        # DeepSpeed steps each of the 3 groups in its own call: one all-reduce of the sums each
        assert len(rank["comms"]) == 3 * 6 and all(c == {"c10d.allreduce_": 1} for c in rank["comms"])


@pytest.mark.parametrize("name", ["zero1_checkpoint", "zero2_checkpoint"])
def test_deepspeed_save_checkpoint_load_checkpoint_resumes_bitwise(zero, name):
    for rank in ranks(zero, name):
        assert_resumed_bitwise(rank)


def test_deepspeed_with_compressed_moments_fails_at_the_first_step_and_changes_nothing(zero):
    for rank in ranks(zero, "zero2_fp8"):
        assert re.match(r"ValueError: param_groups\[\d\]: compressed moments \(.*exp_avg_dtype.*\) under DeepSpeed "
                        r"ZeRO are not supported", rank["error"]), rank["error"]
        assert "FSDP2" in rank["error"]
        assert rank["state_is_empty"] and rank["params_unchanged"]


def test_deepspeed_zero3_fails_at_the_first_step_naming_the_alternatives(zero):
    for rank in ranks(zero, "zero3"):
        assert re.match(r"RuntimeError: param_groups\[0\]: DeepSpeed ZeRO-3 is not supported", rank["error"])
        assert "ZeRO stage 1 or 2" in rank["error"] and "FSDP2" in rank["error"]
        assert rank["state_is_empty"]
