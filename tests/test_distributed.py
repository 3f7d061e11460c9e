"""AdamSPD under FSDP2 / HSDP / DDP: several processes on one machine (gloo, 127.0.0.1).

A sharded step must equal the single-process step on the full tensors (the
per-tensor sums are all-reduced, once per step), and a DCP checkpoint must
resume a run bit for bit. The ranks run tests/distributed_scenarios.py and save
what they saw; the assertions are here.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spd_kernels import backends

from . import distributed_scenarios as sc

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

FSDP_IMPLS = backends.available("cpu")
#: what impl='auto' runs on CPU tensors here
AUTO = backends.choose("auto", torch.empty(1), None).name

#: fp32 params and states after the run; the stats rows (c and the norms carry the
#: sums' rounding, and c cancels) get a looser bound
STATE_TOL = 1e-6
STATS_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, scenarios, tmp_path):
    mp.start_processes(sc.run_rank, args=(world, _free_port(), str(tmp_path), scenarios), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    scenarios = [f"fsdp:{impl}" for impl in FSDP_IMPLS] + [f"single:{impl}" for impl in FSDP_IMPLS]
    scenarios += [f"ddp:{AUTO}", "dcp", "errors", "load_full"]
    scenarios += [f"fsdp8:{impl}" for impl in FSDP_IMPLS] + [f"single8:{impl}" for impl in FSDP_IMPLS]
    scenarios += ["dcp8", "load_full8", "load_full8_unaligned"]
    scenarios += [f"fsdpfp8:{AUTO}", f"singlefp8:{AUTO}", "dcpfp8"]
    return run_ranks(2, scenarios, tmp_path_factory.mktemp("two_ranks"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def assert_matches_single_process(sharded, single, min_fired=4, state_tol=STATE_TOL, stats_tol=STATS_TOL):
    assert sharded.keys() - {"comms"} >= single.keys() - {"fired", "first"}
    for key, want in single.items():
        if key in ("fired", "first"):
            continue
        got = sharded[key]
        assert got.shape == want.shape, key
        if key.startswith("step/"):
            assert torch.equal(got, want), key
        else:
            tol = stats_tol if key.startswith("stats/") else state_tol
            assert relative_error(got, want) <= tol, (key, relative_error(got, want))
    # projections fired on both sides, and on the same (layer, step) count
    assert int(single["fired"]) >= min_fired
    assert int(sharded["fired"]) == int(single["fired"])


@pytest.mark.parametrize("impl", FSDP_IMPLS)
def test_fsdp2_equals_single_process(two_ranks, impl):
    for rank in two_ranks:
        assert_matches_single_process(rank[f"fsdp:{impl}"], rank[f"single:{impl}"])


def test_uneven_and_empty_shards_were_exercised(two_ranks):
    r0, r1 = (r["fsdp:reference"] for r in two_ranks)
    assert r0["local/0.weight"].shape == (3, 7) and r1["local/0.weight"].shape == (2, 7)
    assert r0["local/6.weight"].shape == (1, 1000) and r1["local/6.weight"].shape == (0, 1000)
    assert r1["local/6.bias"].numel() == 0


@pytest.mark.parametrize("impl", FSDP_IMPLS)
def test_one_all_reduce_per_step(two_ranks, impl):
    # three param groups, several buckets, one mesh: one collective per step() on every rank
    for rank in two_ranks:
        comms = rank[f"fsdp:{impl}"]["comms"]
        assert len(comms) == sc.STEPS
        assert all(c == {"c10d.allreduce_": 1} for c in comms), comms


def test_ddp_equals_single_process_without_collectives(two_ranks):
    for rank in two_ranks:
        ddp = rank[f"ddp:{AUTO}"]
        assert all(c == {} for c in ddp["comms"]), ddp["comms"]  # DDP's replicas need no reduction of sums
        assert_matches_single_process(ddp, rank[f"single:{AUTO}"])
    for key, value in two_ranks[0][f"ddp:{AUTO}"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, two_ranks[1][f"ddp:{AUTO}"][key]), key  # the replicas stay identical


def test_dcp_checkpoint_resumes_bitwise(two_ranks):
    for rank in two_ranks:
        dcp = rank["dcp"]
        assert dcp["anchor_kinds"] == ["DTensor"]
        want, got = dcp["uninterrupted"], dcp["resumed"]
        assert want.keys() == got.keys() and any(k.startswith("anchor/") for k in want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(4, [f"hsdp:{AUTO}", f"single:{AUTO}", f"2d:{AUTO}"], tmp_path_factory.mktemp("four_ranks"))


EIGHT_BIT_TENSORS = {"4.weight", "4.bias", "6.weight"}  # of the 8-bit model, at MIN_8BIT_SIZE

#: after the first steps, grads that differ in their last bits (see distributed_scenarios) can move a
#: rounded code one step on one side: at most this fraction of a tensor's codes may differ (one bf16 v
#: code of 32768 did on the 4.weight of the fp8 m + bf16 v run) ...
MAX_FLIPPED_CODES = 1e-3
#: ... and the rest then carries it: one bf16 step of v is 2^-8 of v, so that element's update moves
#: by ~0.2% for each step the code lives (6.2e-6 on that 4.weight over the last three steps)
FLIPPED_TOL = 1e-4


def assert_compressed_run_matches_single_process(sharded, single):
    """Bitwise while the grads are (the codes, scales and values of every state: blocks local to
    the shard, rounding bits by the element's index in the whole tensor), then within a few
    flipped codes."""
    assert len(sharded["first"]) == len(single["first"]) == sc.EXACT_STEPS
    for got, want in zip(sharded["first"], single["first"]):
        assert any(key.startswith("grad/") for key in want)
        for key, value in want.items():
            if key.startswith(("grad/", "exp_avg", "step/")):
                assert torch.equal(got[key], value), key  # the grads: the premise; the states: exact
            else:
                tol = STATS_TOL if key.startswith("stats/") else STATE_TOL
                assert relative_error(got[key], value) <= tol, (key, relative_error(got[key], value))
    coded = {key for key, want in single.items()
             if key.startswith(("exp_avg/", "exp_avg_sq/")) and want.dtype in (torch.uint8, torch.bfloat16)}
    assert coded
    for key in coded:
        flipped = int((sharded[key] != single[key]).sum())
        assert flipped <= MAX_FLIPPED_CODES * single[key].numel(), (key, flipped, single[key].numel())
    rest = {key: want for key, want in single.items() if key not in coded}
    assert_matches_single_process(sharded, rest, min_fired=2, state_tol=FLIPPED_TOL, stats_tol=FLIPPED_TOL)


@pytest.mark.parametrize("impl", FSDP_IMPLS)
def test_fsdp2_with_8bit_states_equals_single_process(two_ranks, impl):
    # blocks are local to a shard; the 8-bit model's shards end on block bounds (one is empty),
    # so codes and absmax must match the single-process run's while the grads do
    for rank in two_ranks:
        sharded, single = rank[f"fsdp8:{impl}"], rank[f"single8:{impl}"]
        assert {k.split("/", 1)[1] for k in single if k.startswith("exp_avg_value/")} == EIGHT_BIT_TENSORS
        for name in EIGHT_BIT_TENSORS:
            assert single[f"exp_avg/{name}"].dtype == sharded[f"exp_avg/{name}"].dtype == torch.uint8
            assert single[f"exp_avg_sq/{name}"].any()  # the codes moved: not a test on zeros
        assert_compressed_run_matches_single_process(sharded, single)


def test_dcp_checkpoint_with_8bit_states_resumes_bitwise(two_ranks):
    for rank in two_ranks:
        dcp = rank["dcp8"]
        # codes, absmax and anchors all came back as DTensors (each rank's own blocks)
        assert dcp["state_kinds"] == ["DTensor:torch.float32", "DTensor:torch.uint8"]
        want, got = dcp["uninterrupted"], dcp["resumed"]
        assert want.keys() == got.keys() and any(k.startswith("exp_avg_value/") for k in want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_fsdp2_with_fp8_and_bf16_moments_equals_single_process(two_ranks):
    # fp8 blocks are local to a shard, and the shards end on block bounds (as for 8-bit); stochastic
    # rounding's bits follow the element's index in the whole tensor (each shard adds its start), so
    # the sharded run rounds as the single process does: codes and scales match while the grads do
    for rank in two_ranks:
        sharded, single = rank[f"fsdpfp8:{AUTO}"], rank[f"singlefp8:{AUTO}"]
        # fp8 m on the large tensors, bf16 v on every tensor
        assert {k.split("/", 1)[1] for k in single if k.startswith("exp_avg_value/")} == EIGHT_BIT_TENSORS
        assert {k.split("/", 1)[1] for k in single if k.startswith("exp_avg_sq_value/")} == EIGHT_BIT_TENSORS | {
            "0.weight", "0.bias", "2.weight", "2.bias", "6.bias"}
        for name in EIGHT_BIT_TENSORS:
            assert single[f"exp_avg/{name}"].dtype == torch.uint8  # fp8 codes, gathered as bytes
            assert single[f"exp_avg_sq/{name}"].dtype == torch.bfloat16 and single[f"exp_avg_sq/{name}"].any()
        assert_compressed_run_matches_single_process(sharded, single)


def test_dcp_checkpoint_with_fp8_and_bf16_moments_resumes_bitwise(two_ranks):
    for rank in two_ranks:
        dcp = rank["dcpfp8"]
        assert dcp["state_kinds"] == ["DTensor:torch.bfloat16", "DTensor:torch.float32", "DTensor:torch.float8_e4m3fn"]
        want, got = dcp["uninterrupted"], dcp["resumed"]
        assert want.keys() == got.keys() and any(k.startswith("exp_avg_value/") for k in want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_full_8bit_state_dict_loads_into_a_sharded_optimizer(two_ranks):
    # a single-process 8-bit checkpoint: each shard's blocks are cut out of the whole tensor's
    # (the 8-bit model's shards end on block bounds), so both runs go on alike
    for rank in two_ranks:
        out = rank["load_full8"]
        assert out["kinds"] == ["DTensor"]
        assert any(k.startswith("exp_avg_value/") for k in out["single"])
        assert_matches_single_process(out["sharded"], out["single"], min_fired=1)


#: shards that split a block re-quantize a whole tensor's 8-bit moments in their own blocks: one
#: more rounding (the signed map has no -1.0, so a block whose largest value is negative changes
#: its absmax); measured 2.6e-2 worst relative error (a first moment) after 3 more steps here
REQUANTIZED_TOL = 5e-2


def test_full_8bit_state_dict_loads_into_shards_that_split_blocks(two_ranks):
    for rank in two_ranks:
        out = rank["load_full8_unaligned"]
        assert out["kinds"] == ["DTensor"]
        single = {k: v for k, v in out["single"].items() if v.dtype != torch.uint8}  # codes may differ
        assert {k.split("/", 1)[1] for k in single if k.startswith("exp_avg_value/")} == {"4.weight", "4.bias",
                                                                                         "6.weight"}
        assert_matches_single_process(out["sharded"], single, min_fired=1, state_tol=REQUANTIZED_TOL,
                                      stats_tol=REQUANTIZED_TOL)


def test_full_state_dict_loads_into_a_sharded_optimizer(two_ranks):
    # e.g. a single-GPU checkpoint resumed under FSDP2: saved full tensors are sliced like their params
    for rank in two_ranks:
        out = rank["load_full"]
        assert out["kinds"] == ["DTensor"]
        assert_matches_single_process(out["sharded"], out["single"], min_fired=2)


def test_hsdp_2x2_mesh_reduces_over_the_shard_dim_only(four_ranks):
    # (replicate, shard) mesh of 4 ranks: all-reducing over all 4 would double every sum
    for rank in four_ranks:
        hsdp = rank[f"hsdp:{AUTO}"]
        assert all(c == {"c10d.allreduce_": 1} for c in hsdp["comms"]), hsdp["comms"]
        assert_matches_single_process(hsdp, rank[f"single:{AUTO}"])


@pytest.mark.parametrize("case, pattern", [
    ("anchor_placement", r"ValueError: param_groups\[0\]\['pre'\]\[0\]: DTensor placed as \(Shard\(dim=1\),\)"),
    ("anchor_full_shape", r"ValueError: param_groups\[0\]\['pre'\]\[0\]: shape \(3, 4\) does not match"),
    ("dtensor_anchor_plain_param", r"ValueError: param_groups\[0\]\['pre'\]\[0\]: a DTensor for a param that is a plain"),
    ("partial_param", r"ValueError: param_groups\[0\]\['params'\]\[0\]: a DTensor param with a Partial placement"),
    ("plain_grad", r"RuntimeError: param_groups\[0\]\['params'\]\[0\]: the param is a DTensor but its grad is Tensor"),
    ("load_misplaced", r"ValueError: load_state_dict: param_groups\[0\]\['params'\]\[0\]: saved exp_avg: DTensor placed as"),
])
def test_bad_sharded_inputs_raise_named_errors(two_ranks, case, pattern):
    for rank in two_ranks:
        assert re.match(pattern, rank["errors"][case]), rank["errors"][case]
        assert rank["errors"]["plain_grad_changed_nothing"] == "True"
        assert rank["errors"]["load_misplaced_changed_nothing"] == "True"


def test_each_sharded_dim_set_reduces_once_over_its_own_group(four_ranks):
    # a 2 x 2 mesh; params sharded over both dims (twice, in both orders), over dim 0 only, over dim 1
    # only: three (mesh, sharded dims) keys, three collectives per step, and the single-process result
    for rank in four_ranks:
        out = rank[f"2d:{AUTO}"]
        assert all(c == {"c10d.allreduce_": 3} for c in out["comms"]), out["comms"]
        assert out["sharded/fired"] == out["single/fired"] > 3
        for key in out:
            if key.startswith("single/") and key != "single/fired":
                got = out["sharded/" + key[len("single/"):]]
                tol = STATS_TOL if "/stats/" in key else STATE_TOL
                assert relative_error(got, out[key]) <= tol, key


def test_fsdp2_example_runs_under_torchrun(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.join(root, "examples", "fsdp2.py"),
           "--steps", "40", "--ckpt-dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": root}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last, fired = map(float, re.search(r"loss ([\d.]+) .* -> ([\d.]+) .*fired (\d+)", out.stdout).groups())
    assert last < 0.7 * first and fired > 0, out.stdout
    assert (tmp_path / "ckpt" / ".metadata").exists()
