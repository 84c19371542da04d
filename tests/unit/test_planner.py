"""tools/planner.py: hand-checked training state for a tiny model, monotonic in tp/pp, the published
K-EXAONE layout fits an 80 GiB H100 while an impossible one is flagged, and invalid layouts print
the mesh's message."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_exaone.model import k_exaone_236b, tiny
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims
from megatron_exaone.training.flops import flops_per_token
from tools import planner

GIB = 1024**3


def hand_params(c):
    """(dense, expert) parameter counts of the full model from the config alone."""
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    # q, o, k, v, q/k norms, the layer's two norms
    attention = 2 * h * q + 2 * h * kv + 2 * d + 2 * h
    dense_mlp = 3 * h * c.intermediate_size
    shared = 3 * h * c.moe_intermediate_size * c.num_shared_experts
    experts = 3 * h * c.moe_intermediate_size * c.num_experts
    moe_layers = c.mlp_layer_types.count("sparse")
    dense = 2 * c.vocab_size * h + h  # embedding, lm_head, final norm
    dense += c.num_hidden_layers * attention + (c.num_hidden_layers - moe_layers) * dense_mlp
    dense += moe_layers * (shared + c.num_experts * h)  # shared experts, router
    # MTP: fc, three norms, one dense decoder layer
    dense += 2 * h * h + 3 * h + attention + dense_mlp
    return dense, moe_layers * experts


def run(model, sharding="fsdp", optimizer="adamw", offload="none", **dims):
    dims.setdefault("dp", 1)
    return planner.plan(
        planner.PlanInput(
            model=model,
            dims=ParallelDims(**dims),
            seq_len=64,
            sharding=sharding,
            optimizer=optimizer,
            offload=offload,
        )
    )


def test_tiny_single_gpu_state_is_16_bytes_per_parameter():
    config = tiny()
    dense, experts = hand_params(config)
    result = run(config)
    (rank,) = result.ranks
    assert result.total_params == dense + experts
    assert (rank.dense_params, rank.expert_params) == (dense, experts)
    assert rank.bytes["parameters"] == 4 * (dense + experts)
    assert rank.bytes["gradients"] == 4 * (dense + experts)
    assert rank.bytes["optimizer state"] == 8 * (dense + experts)  # AdamW moments, fp32


def test_tiny_tp2_ep2_dp2_shards_by_hand():
    config = tiny()  # 4 query heads, 2 KV heads, 8 experts
    h, v = config.hidden_size, config.vocab_size
    dense, experts = hand_params(config)
    # replicated on every TP rank: norms (2 per layer + 2 q/k norms per layer + final + 3 MTP) and
    # routers
    layers = config.num_hidden_layers + 1
    replicated = layers * (2 * h + 2 * config.head_dim) + h + 3 * h
    replicated += config.mlp_layer_types.count("sparse") * config.num_experts * h
    local_dense = replicated + (dense - replicated) // 2
    (rank,) = run(config, tp=2, ep=2, dp=2).ranks
    assert (rank.dense_params, rank.expert_params) == (local_dense, experts // 2)
    edp = 2 * 2 // 2
    assert rank.bytes["parameters"] == 4 * local_dense / 2 + 4 * (experts // 2) / edp
    assert rank.bytes["optimizer state"] == 8 * local_dense / 2 + 8 * (experts // 2) / edp
    # Muon: 4 B momentum on hidden matrices, AdamW on embedding, lm_head, router and 1-D parameters
    (muon,) = run(config, optimizer="muon", tp=2, ep=2, dp=2).ranks
    adamw_dense = replicated + 2 * v * h // 2
    assert (
        muon.bytes["optimizer state"]
        == (8 * adamw_dense + 4 * (local_dense - adamw_dense)) / 2 + 4 * (experts // 2) / edp
    )
    # Megatron's distributed optimizer for comparison: bf16 params + fp32 grads unsharded,
    # master+moments sharded
    (zero1,) = run(config, sharding="zero1", tp=2, ep=2, dp=2).ranks
    assert zero1.bytes["parameters"] == 2 * (local_dense + experts // 2)
    assert zero1.bytes["optimizer state"] == 12 * local_dense / 2 + 12 * (experts // 2) / edp


def test_fsdp_gathers_are_counted_on_one_rank_and_held_when_kept():
    """FSDP2 gathers a BF16 copy of each unit on GPU even over a one-rank group; keeping the
    gathered parameters from forward to backward (parallel.reshard_after_forward=false) holds every
    layer's copy through the step."""
    config = tiny()
    (fsdp,) = run(config).ranks
    (replicated,) = run(config, sharding="none").ranks
    (kept,) = planner.plan(
        planner.PlanInput(model=config, dims=ParallelDims(dp=1), seq_len=64, keep_gathered=True)
    ).ranks
    dense, experts = hand_params(config)
    expert_layer = experts // config.mlp_layer_types.count("sparse")
    gathers = fsdp.bytes["communication buffers"] - replicated.bytes["communication buffers"]
    # experts: two layers gathered, one reduced
    assert gathers >= 2 * 2 * expert_layer + (2 + 4) * expert_layer
    assert kept.bytes["parameters"] - fsdp.bytes["parameters"] == 2 * (dense + experts)


def test_accumulated_gradients_are_unsharded_unless_reduced_each_micro_batch():
    """A step of several micro-batches holds unsharded FP32 gradients (FSDP2 without gradient sync),
    and under a pipeline the gathered BF16 parameters too; reducing each micro-batch holds sharded
    gradients only."""
    config = k_exaone_236b()
    dims = ParallelDims(tp=4, pp=8, ep=8, dp=2)
    accumulated, each = (
        planner.plan(planner.PlanInput(model=config, dims=dims, reduce_each_micro_batch=flag))
        for flag in (False, True)
    )
    for a, e in zip(accumulated.ranks, each.ranks):
        local = a.dense_params + a.expert_params
        # dense over dp=2, experts over edp=1
        sharded = 4 * a.dense_params / 2 + 4 * a.expert_params / 1
        assert a.bytes["gradients"] == 4 * local and e.bytes["gradients"] == sharded
        assert a.bytes["parameters"] - e.bytes["parameters"] == 2 * local
    assert accumulated.worst.peak > each.worst.peak


def test_fp8_weight_cache_holds_two_bytes_per_fp8_layer_weight():
    config = tiny()  # 4 layers: the first and last stay bf16
    plain, cached = (
        planner.plan(
            planner.PlanInput(
                model=config,
                dims=ParallelDims(dp=1),
                seq_len=64,
                precision="fp8",
                fp8_weight_cache=cache,
            )
        ).ranks[0]
        for cache in (False, True)
    )
    units = planner.unit_params(config, ParallelDims(dp=1))
    fp8_layers = sum(units[f"L{j}"].dense + units[f"L{j}"].expert for j in (1, 2))
    assert cached.bytes["parameters"] - plain.bytes["parameters"] == 2 * fp8_layers


def test_fp8_lm_head_counts_the_head_operands_and_its_flops():
    config = tiny()

    def rank(**fp8):
        return planner.plan(
            planner.PlanInput(
                model=config, dims=ParallelDims(dp=1), seq_len=64, precision="fp8", **fp8
            )
        )

    head = config.vocab_size * config.hidden_size
    cached = rank(fp8_weight_cache=True).ranks[0]
    cached_head = rank(fp8_weight_cache=True, fp8_lm_head=True).ranks[0]
    assert cached_head.bytes["parameters"] - cached.bytes["parameters"] == 2 * head
    plain, with_head = rank(), rank(fp8_lm_head=True)
    assert with_head.flops_per_token == plain.flops_per_token
    # main and MTP loss
    assert with_head.fp8_flops_per_token - plain.fp8_flops_per_token == 4 * head * 2


def test_more_tensor_or_pipeline_parallelism_needs_less_memory_per_gpu():
    config = k_exaone_236b()

    def worst(sharding="fsdp", **dims):
        return planner.plan(
            planner.PlanInput(
                model=config, dims=ParallelDims(**dims), seq_len=4096, sharding=sharding
            )
        ).worst

    # more GPUs in tp (dp and ep fixed): dense weights split further, experts shard over a larger
    # edp
    tp1, tp2, tp4 = (worst(tp=t, pp=8, ep=2, dp=2) for t in (1, 2, 4))
    assert tp1.peak > tp2.peak > tp4.peak
    assert (
        tp1.bytes["activations (saved)"]
        > tp2.bytes["activations (saved)"]
        > tp4.bytes["activations (saved)"]
    )
    # same world size, unsharded weights (distributed optimizer): trading dp for tp halves the
    # weights per GPU
    a, b = worst("zero1", tp=2, pp=8, ep=8, dp=4), worst("zero1", tp=4, pp=8, ep=8, dp=2)
    assert a.dense_params == pytest.approx(2 * b.dense_params, rel=0.02) and a.peak > b.peak
    # more pipeline stages: fewer layers per GPU
    pp4, pp8, pp16 = (worst(tp=4, pp=p, ep=8, dp=2) for p in (4, 8, 16))
    assert pp4.peak > pp8.peak > pp16.peak
    assert pp4.layers == 12 and pp8.layers == 6 and pp16.layers == 3
    assert pp4.bytes["optimizer state"] > 1.7 * pp8.bytes["optimizer state"]


def test_recompute_trades_memory_for_flops():
    config = k_exaone_236b()
    plans = {
        r: planner.plan(
            planner.PlanInput(model=config, dims=ParallelDims(tp=4, pp=8, ep=8, dp=2), recompute=r)
        )
        for r in ("none", "selective", "full")
    }
    saved = {r: p.ranks[0].bytes["activations (saved)"] for r, p in plans.items()}
    assert saved["none"] > saved["selective"] > saved["full"]
    flops = {r: p.flops_per_token_recompute for r, p in plans.items()}
    assert flops["none"] == plans["none"].flops_per_token == flops_per_token(config, 4096)
    assert flops["none"] < flops["selective"] < flops["full"]
    # full recompute repeats the forward of every decoder layer (incl. MTP's): a third of their
    # training FLOPs
    h, v = config.hidden_size, config.vocab_size
    heads = 6 * (h * v * 2 + 2 * h * h)  # lm_head for the main and the MTP loss, mtp.fc
    assert flops["full"] - flops["none"] == pytest.approx(
        (flops_per_token(config, 4096) - heads) / 3, rel=1e-9
    )


def test_published_layout_fits_and_an_impossible_one_is_flagged(capsys):
    published = planner.main(
        ["--layout", "k_exaone_236b_h100x64", "--seq-len", "4096", "--recompute", "full"]
    )
    out = capsys.readouterr().out
    assert published == 0 and "=> fits" in out and "tp4 pp8 ep8 etp1 dp2" in out
    flagged = planner.main(
        ["--model", "k_exaone_236b", "--tp", "1", "--pp", "1", "--ep", "1", "--dp", "64"]
    )
    out = capsys.readouterr().out
    assert flagged == 1 and "DOES NOT FIT" in out
    result = planner.plan(
        planner.PlanInput(model=k_exaone_236b(), dims=ParallelDims(tp=4, pp=8, ep=8, dp=2))
    )
    assert result.fits and 40 * GIB < result.worst.peak <= 80 * GIB
    assert not planner.plan(replace(result.inp, gpu_gib=40.0)).fits


def test_every_stage_of_the_k_exaone_experiments_fits(capsys):
    """--experiment plans each curriculum stage with its own layout: all fit 80 GB on 64 and 256
    H100s. The 256K stage fits because it reduces gradients every micro-batch; accumulating them
    over the step would not."""
    for name in ("k_exaone_236b_h100x64", "k_exaone_236b_h100x256"):
        assert planner.main(["--experiment", name]) == 0
    out = capsys.readouterr().out
    assert out.count("context_256k (256K)") == 2 and "tp4 pp2 ep8 cp8 dp1" in out
    last = planner.experiment_plans("k_exaone_236b_h100x64")[-1]
    assert last.inp.seq_len == 262144 and last.inp.reduce_each_micro_batch and last.fits
    assert not planner.plan(replace(last.inp, reduce_each_micro_batch=False)).fits


def test_all_published_lists_every_k_exaone_layout(capsys):
    assert planner.main(["--all-published"]) == 0
    out = capsys.readouterr().out
    for name in ("k_exaone_236b_h100x64", "k_exaone_236b_h100x256"):
        assert out.count(name) == 6  # bf16/fp8 x adamw/muon/adamw offloaded
    assert out.count("adamw+cpu") == 4


def test_invalid_layout_prints_the_mesh_message(capsys):
    with pytest.raises(LayoutError) as info:
        ParallelDims(tp=3, pp=8, ep=8, dp=2).validate(48, k_exaone_236b())
    assert planner.main(["--tp", "3", "--pp", "8", "--ep", "8", "--dp", "2"]) == 2
    assert str(info.value) in capsys.readouterr().err
    assert planner.main(["--tp", "4", "--pp", "8", "--ep", "2", "--etp", "4", "--dp", "2"]) == 2
    assert "expert tensor parallelism is not implemented" in capsys.readouterr().err
    assert planner.main(["--tp", "4", "--pp", "64", "--ep", "8", "--dp", "2"]) == 2
    assert "decoder layers" in capsys.readouterr().err


def test_offload_moves_adamw_state_to_the_host_by_hand():
    """optim.offload=cpu under FSDP2: bf16 sharded parameters and reduced gradients on the GPU (the
    unsharded accumulation stays fp32), no optimizer state; 16 B per local element on the host."""
    config = tiny()
    dense, experts = hand_params(config)
    local = dense / 2 + experts / 2  # dp2: dense and experts (edp = 2) sharded in two
    (device,) = run(config, dp=2).ranks
    (rank,) = run(config, offload="cpu", dp=2).ranks
    assert rank.bytes["parameters"] == 2 * local
    assert rank.bytes["gradients"] == device.bytes["gradients"] == 4 * (dense + experts)
    assert rank.bytes["optimizer state"] == 0 and rank.host_bytes == 16 * local
    assert rank.peak < device.peak and device.host_bytes == 0
    # Muon: only the AdamW groups' moments leave the GPU
    (muon,) = run(config, optimizer="muon", dp=2).ranks
    (muon_offloaded,) = run(config, optimizer="muon", offload="cpu", dp=2).ranks
    adamw_local = muon_offloaded.host_bytes / 16
    assert 0 < adamw_local < local
    assert muon.bytes["parameters"] == muon_offloaded.bytes["parameters"] == 4 * local
    assert muon.bytes["optimizer state"] - muon_offloaded.bytes["optimizer state"] == (
        8 * adamw_local
    )
    # without sharding the parameters and gradients stay fp32 on the GPU
    (plain,) = run(config, sharding="none", offload="cpu").ranks
    assert plain.bytes["parameters"] == 4 * (dense + experts)
    assert plain.bytes["optimizer state"] == 0
    with pytest.raises(LayoutError, match="zero1"):
        run(config, sharding="zero1", offload="cpu", dp=2)


def test_offload_fits_k_exaone_on_fewer_gpus_and_flags_the_host(capsys):
    """AdamW on the published 64-H100 layout does not fit at 8K; offloaded it does on every stage of
    the experiment. TP8 x PP4 x EP8 on 32 H100s fits only offloaded, with 928 GiB of host memory
    per node: flagged on nodes of 512 GiB."""
    assert planner.main(["--layout", "k_exaone_236b_h100x64", "--seq-len", "8192"]) == 1
    assert planner.main(["--experiment", "k_exaone_236b_h100x64_adamw_offload"]) == 0
    out = capsys.readouterr().out
    assert out.count("adamw+cpu") == 5 and "DOES NOT FIT" in out
    layout = ["--tp", "8", "--pp", "4", "--ep", "8", "--dp", "1", "--seq-len", "8192"]
    assert planner.main(layout) == 1
    assert planner.main([*layout, "--offload", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "=> host memory fits: 928 GiB per node of 8 GPUs" in out
    assert planner.main([*layout, "--offload", "cpu", "--host-memory", "512"]) == 1
    out = capsys.readouterr().out
    assert "=> fits: worst pipeline rank" in out
    assert "=> host memory DOES NOT FIT: 928 GiB per node of 8 GPUs (worst rank x 8) of 512" in out
