"""FP8 on CPU: scaling math, the emulated FP8 linear and grouped experts against fp32, the precision
pass, 50 training steps against fp32, and composition with tensor parallel and FSDP2 (gloo ranks).

The GPU kernels (`fp8_torch`) are checked against this emulation in tests/gpu/test_fp8_gpu.py; where
torch's CPU build has `torch._scaled_mm`, the torch backend's calling conventions are checked here
too (a real call).
"""

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from megatron_exaone.config.schema import PrecisionConfig
from megatron_exaone.model import ExaoneMoeForCausalLM, build_model, tiny
from megatron_exaone.model.loss import linear_cross_entropy
from megatron_exaone.model.moe import GroupedExperts, Router, grouped_wgrad
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_parallel_model, reduce_grads
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.pipeline import PipelineChunk, StageSpec
from megatron_exaone.parallel.sharding import layout_of, materialize
from megatron_exaone.parallel.testing import run_distributed
from megatron_exaone.precision import (
    Fp8Unavailable,
    PrecisionUnavailable,
    apply_precision,
    validate_precision,
)
from megatron_exaone.precision.fp8_common import (
    E4M3,
    E5M2,
    FP8_MAX,
    Fp8Recipe,
    amax,
    current_scale,
    per_group_scale,
    quantize,
    quantize_both_layouts,
    quantize_with_scale,
    scale_from_amax,
    to_fp8,
    to_fp8_both_layouts,
    to_fp8_per_group_columns,
)
from megatron_exaone.precision.fp8_emulated import EmulatedGemms
from megatron_exaone.precision.fp8_ops import (
    Fp8FusedInputs,
    Fp8GroupedExperts,
    Fp8Head,
    Fp8HeadGemms,
    Fp8Linear,
    fp8_grouped_linear,
    fp8_linear,
    linear_weight_operands,
)
from megatron_exaone.precision.fp8_torch import TorchGemms, pad_groups

EMULATED = EmulatedGemms()
ALL_FP8 = dict(keep_bf16_first_layers=0, keep_bf16_last_layers=0)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# ------------------------------------------------------------------------------------- scaling math
def test_format_ranges_and_saturation():
    assert FP8_MAX[E4M3] == 448.0 and FP8_MAX[E5M2] == 57344.0
    one = torch.tensor(1.0)
    x = torch.tensor([1000.0, -1e6, 448.0, 500.0, float("inf")])
    assert quantize(x, one, E4M3).float().tolist() == [448.0, -448.0, 448.0, 448.0, 448.0]
    y = torch.tensor([1e5, -1e9, 57344.0, 3.0])
    assert quantize(y, one, E5M2).float().tolist() == [57344.0, -57344.0, 57344.0, 3.0]


@pytest.mark.parametrize(
    "dtype, mantissa_bits, min_subnormal", [(E4M3, 3, 2.0**-9), (E5M2, 2, 2.0**-16)]
)
def test_round_trip_error_bound(dtype, mantissa_bits, min_subnormal):
    """Each element is off by at most half a unit in the last place: 2^-(m+1) relative in the normal
    range, half the smallest subnormal (divided by the scale) below it."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 4096)
    q = to_fp8(x, dtype, "tensorwise", 0)
    err = (q.dequantize() - x).abs()
    scale = 1 / q.scale_inv
    bound = torch.maximum(
        x.abs() * 2.0 ** -(mantissa_bits + 1), torch.full_like(x, min_subnormal / 2) / scale
    )
    assert (err <= bound * (1 + 1e-6)).all()
    assert q.dequantize().abs().max() == pytest.approx(
        x.abs().max().item(), rel=2.0 ** -(mantissa_bits + 1)
    )


def test_amax_and_scales_tensorwise_vs_rowwise():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -8.0], [0.0, 0.0, 0.0]])
    assert amax(x).item() == 8.0
    assert amax(x, 1).flatten().tolist() == [4.0, 8.0, 0.0]
    assert amax(x, 0).flatten().tolist() == [1.0, 4.0, 8.0]
    assert current_scale(x, E4M3, "tensorwise", 1).item() == pytest.approx(448 / 8)
    rows = current_scale(x, E4M3, "rowwise", 1)
    assert rows.shape == (3, 1) and rows[:2].flatten().tolist() == pytest.approx([112.0, 56.0])
    # all-zero rows: finite scale, zero data
    assert torch.isfinite(scale_from_amax(torch.tensor(0.0), E4M3))
    q = to_fp8(x, E4M3, "rowwise", 1)
    # every row uses the full range
    assert q.data[:2].float().abs().amax(dim=1).tolist() == [448.0, 448.0]
    assert (q.data[2].float() == 0).all()
    cols = to_fp8(x, E4M3, "rowwise", 0)
    assert cols.scale_inv.shape == (1, 3) and cols.t().scale_inv.shape == (3, 1)


def test_cast_transpose_is_one_quantization_in_both_layouts():
    """Tensorwise operands are cast once into row-major and column-major storage: the same bytes as
    `to_fp8`, the strides each GEMM operand takes; compiled by inductor (which saturates through
    `where` instead of clamp, see `quantize`) the bytes are the same as eager, out-of-range values,
    infinities and NaN included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 80, generator=gen) * 3
    rows, cols = to_fp8_both_layouts(x, E4M3)
    want = to_fp8(x, E4M3, "tensorwise", 1)
    assert rows.data.stride() == (80, 1) and cols.data.stride() == (1, 48)
    for q in (rows, cols):
        assert torch.equal(q.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(q.scale_inv, want.scale_inv)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e9])
    compiled = torch.compile(quantize_both_layouts, dynamic=False)
    for dtype, scale in ((E4M3, torch.tensor(100.0)), (E5M2, torch.tensor(1e4))):
        eager = quantize_both_layouts(x, scale, dtype)
        for got, expected in zip(compiled(x, scale, dtype), eager):
            assert got.stride() == expected.stride()
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    saturated = eager[0][0, :4].float()
    assert saturated.tolist()[:2] == [57344.0, -57344.0] and saturated[2].isnan()
    torch._dynamo.reset()


def test_per_group_column_scales():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 4, generator=gen)
    q = to_fp8_per_group_columns(x, counts, E4M3)
    assert q.scale_inv.shape == (3, 4)
    assert torch.allclose(q.scale_inv[0] * 448, x[:3].abs().amax(0))
    assert torch.allclose(q.scale_inv[2] * 448, x[3:].abs().amax(0))
    assert torch.isfinite(q.scale_inv[1]).all()  # an empty group
    deq = q.data.float() * q.scale_inv[torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])]
    assert rel(deq, x) < 0.05
    half = x.bfloat16()  # the amax of bf16 values is taken in bf16, exactly
    assert torch.equal(
        to_fp8_per_group_columns(half, counts, E4M3).scale_inv,
        to_fp8_per_group_columns(half.float(), counts, E4M3).scale_inv,
    )
    # an EP rank without tokens
    empty = to_fp8_per_group_columns(x[:0], torch.zeros(3, dtype=torch.long), E4M3)
    assert empty.data.shape == (0, 4) and empty.scale_inv.shape == (3, 4)


# --------------------------------------------------------------------------------------- FP8 linear
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
def test_emulated_linear_close_to_fp32(scaling, grad_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 64, generator=gen, requires_grad=True)
    w = (torch.randn(48, 64, generator=gen) * 0.1).requires_grad_()
    dy = torch.randn(2, 64, 48, generator=gen)
    want_y = x @ w.t()
    want_dx, want_dw = torch.autograd.grad(want_y, (x, w), dy)
    y = fp8_linear(x, w, EMULATED, Fp8Recipe(scaling, grad_dtype))
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    grad_tol = 0.08 if grad_dtype == E5M2 else 0.05  # E5M2 has one mantissa bit less
    assert y.shape == want_y.shape and y.dtype == x.dtype
    assert rel(y, want_y) < 0.05 and rel(dx, want_dx) < grad_tol and rel(dw, want_dw) < grad_tol


def test_emulated_linear_quantizes_along_each_gemms_contraction():
    """Rowwise backward re-quantizes: dX = q(dY per row) @ q(W per column), dW = q(dY per column)^T
    @ q(X per column), and the forward result is the dequantized product."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=gen, requires_grad=True)
    w = torch.randn(16, 64, generator=gen, requires_grad=True)
    dy = torch.randn(32, 16, generator=gen)
    y = fp8_linear(x, w, EMULATED, Fp8Recipe("rowwise", E5M2))
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    def deq(t, dtype, dim):  # in fp64, as the emulation multiplies
        return to_fp8(t.detach(), dtype, "rowwise", dim).dequantize().double()

    torch.testing.assert_close(y, (deq(x, E4M3, 1) @ deq(w, E4M3, 1).t()).float())
    torch.testing.assert_close(dx, (deq(dy, E5M2, 1) @ deq(w, E4M3, 0)).float())
    torch.testing.assert_close(dw, (deq(dy, E5M2, 0).t() @ deq(x, E4M3, 0)).float())


@pytest.mark.parametrize("fp8_wgrad", [True, False])
def test_emulated_grouped_experts_close_to_fp32(fp8_wgrad):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 11, 16])
    x = torch.randn(int(counts.sum()), 32, generator=gen, requires_grad=True)
    w = (torch.randn(4, 48, 32, generator=gen) * 0.1).requires_grad_()
    dy = torch.randn(x.shape[0], 48, generator=gen)
    y = fp8_grouped_linear(x, w, counts, EMULATED, fp8_wgrad)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    want_y = torch.cat([chunk @ w[e].t() for e, chunk in enumerate(x.split(counts.tolist()))])
    want_dx, want_dw = torch.autograd.grad(want_y, (x, w), dy)
    assert rel(y, want_y) < 0.05 and rel(dx, want_dx) < 0.05 and rel(dw, want_dw) < 0.05
    if not fp8_wgrad:  # the high-precision weight gradient is exact
        torch.testing.assert_close(dw, want_dw)
    assert (dw[1] == 0).all()  # an expert without tokens gets no gradient
    none = torch.zeros(0, 32, requires_grad=True)  # an expert-parallel rank that received no tokens
    y = fp8_grouped_linear(none, w, torch.zeros(4, dtype=torch.long), EMULATED, fp8_wgrad)
    assert y.shape == (0, 48) and (torch.autograd.grad(y, w, torch.zeros_like(y))[0] == 0).all()


def test_grouped_linear_quantizes_tokens_per_row_and_weights_per_expert():
    """Forward and input gradient are exactly the products of the quantized operands: X and each
    weight's columns of dY with one scale per row, each expert's stacked (gate, up) weights with one
    scale, which backward reuses."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 32, generator=gen, requires_grad=True)
    gate = (torch.randn(3, 16, 32, generator=gen) * 0.1).requires_grad_()
    up = (torch.randn(3, 16, 32, generator=gen) * 3.0).requires_grad_()
    dy = torch.randn(8, 32, generator=gen)
    y = fp8_grouped_linear(x, (gate, up), counts, EMULATED, fp8_wgrad=False)
    dx, dgate, dup = torch.autograd.grad(y, (x, gate, up), dy)
    rows = to_fp8(x.detach(), E4M3, "rowwise", 1).dequantize().double()
    drows = torch.cat(
        [to_fp8(part, E4M3, "rowwise", 1).dequantize() for part in dy.split(16, dim=1)], 1
    ).double()
    stacked = torch.cat([gate, up], dim=1).detach()
    qw = quantize_with_scale(stacked, per_group_scale(stacked, E4M3), E4M3)
    # each expert's largest maps to 448
    assert (qw.data.float().abs().amax(dim=(1, 2)) == FP8_MAX[E4M3]).all()
    w = qw.dequantize().double()
    ids = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])
    torch.testing.assert_close(y, torch.einsum("tk,tnk->tn", rows, w[ids]).float())
    torch.testing.assert_close(dx, torch.einsum("tn,tnk->tk", drows, w[ids]).float())
    # each weight gets its own contiguous BF16-path gradient: dy's columns of that weight times X,
    # per expert
    for grad, columns in ((dgate, slice(0, 16)), (dup, slice(16, 32))):
        assert grad.is_contiguous()
        torch.testing.assert_close(grad, grouped_wgrad(dy[:, columns], x.detach(), counts))


def _cpu_scaled_mm_works() -> bool:
    try:
        one = torch.tensor(1.0)
        torch._scaled_mm(
            torch.ones(16, 16).to(E4M3),
            torch.ones(16, 16).to(E4M3).t(),
            one,
            one,
            out_dtype=torch.float32,
        )
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(
    not _cpu_scaled_mm_works(), reason="this torch build has no CPU torch._scaled_mm"
)
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("k", [64, 40])  # 40: the forward contraction is zero-padded to 48
def test_torch_backend_linear_matches_emulation_on_cpu(scaling, k):
    """Calling conventions of `TorchGemms.mm` (inverse scales, layouts, scale strides, padding of
    the contraction: 24 tokens in the weight gradient) in all three GEMMs, on torch's CPU kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, k, generator=gen, requires_grad=True)
    w = torch.randn(32, k, generator=gen, requires_grad=True)
    dy = torch.randn(24, 32, generator=gen)
    recipe = Fp8Recipe(scaling, E5M2)
    got = fp8_linear(x, w, TorchGemms(), recipe)
    want = fp8_linear(x, w, EMULATED, recipe)
    for a, b in zip(
        (got, *torch.autograd.grad(got, (x, w), dy)), (want, *torch.autograd.grad(want, (x, w), dy))
    ):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------- FP8 output head
def _head_case(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(40, 64, generator=gen, requires_grad=True)
    weight = (torch.randn(96, 64, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, 96, (40,), generator=gen)
    labels[::7] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_head_loss_quantizes_logits_and_hidden_gradient(scaling):
    """precision.fp8_lm_head in the fused loss (chunks of 16 rows): logits = q(h) @ q(W)^T per
    chunk, the hidden gradient q(dlogits) @ q(W along V) in E5M2 (dlogits = softmax - onehot lies in
    [-1, 1]: tensorwise it takes the static scale fp8_max, rowwise each row's amax), the weight
    gradient dlogits^T @ h in high precision, against the same arithmetic written out in fp64."""
    hidden, weight, labels = _head_case()
    recipe = Fp8Recipe(scaling, E5M2)
    gemms = Fp8HeadGemms(weight, EMULATED, recipe, linear_weight_operands(weight, recipe))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, gemms=gemms)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))

    def deq(t, dtype, dim):
        return to_fp8(t.detach(), dtype, scaling, dim).dequantize().double()

    def deq_logit_grads(t):
        if scaling == "rowwise":
            return deq(t, E5M2, 1)
        static = torch.tensor(FP8_MAX[E5M2])
        return quantize_with_scale(t.detach(), static, E5M2).dequantize().double()

    valid = labels != -100
    want_loss, want_gh, want_gw = 0.0, [], torch.zeros_like(weight, dtype=torch.float64)
    for rows in torch.arange(40).split(16):
        h, y = hidden[rows].detach(), labels[rows]
        logits = (deq(h, E4M3, 1) @ deq(weight, E4M3, 1).t()).float()
        lse = logits.logsumexp(-1)
        want_loss += ((lse - logits.gather(1, y.clamp(min=0)[:, None])[:, 0]) * valid[rows]).sum()
        dlogits = (logits.softmax(-1) - F.one_hot(y.clamp(min=0), 96)) * valid[rows, None]
        want_gh.append(deq_logit_grads(dlogits) @ deq(weight, E4M3, 0))
        want_gw += dlogits.double().t() @ h.double()
    count = valid.sum()
    torch.testing.assert_close(loss, (want_loss / count).float())
    torch.testing.assert_close(grad_h, (torch.cat(want_gh) / count).float())
    torch.testing.assert_close(grad_w, (want_gw / count).float())
    # and close to the high-precision loss
    want = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert abs(loss - want) < 0.01 * want
    assert rel(grad_h, torch.autograd.grad(want, hidden)[0]) < 0.1


@pytest.mark.skipif(
    not _cpu_scaled_mm_works(), reason="this torch build has no CPU torch._scaled_mm"
)
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_torch_backend_head_matches_emulation_on_cpu(scaling):
    """The head's operands in their GEMM layouts (the weight's input-gradient copy column-major) on
    torch's CPU scaled-matmul kernel: the same loss and gradients as the emulation."""
    hidden, weight, labels = _head_case(seed=4)
    recipe = Fp8Recipe(scaling, E5M2)
    results = []
    for gemms in (TorchGemms(), EMULATED):
        head = Fp8HeadGemms(weight, gemms, recipe, linear_weight_operands(weight, recipe))
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, gemms=head)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- the pass
def config(**overrides):
    return tiny(vocab_size=256, **overrides)


def test_pass_converts_middle_layers_and_keeps_the_rest():
    cfg = config()
    model = build_model(cfg, seed=0)
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_precision(model, "fp8_emulated", cfg.num_hidden_layers, "cpu")
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == names
    model.load_state_dict(state)  # same keys and shapes: checkpoints load either way
    kept = {f"model.layers.{i}" for i in (0, cfg.num_hidden_layers - 1)}
    assert set(report.bf16) == kept | {"mtp", "lm_head"}
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear | Fp8GroupedExperts):
            assert name in report.fp8
            assert name.startswith("model.layers.") and name.split(".")[2] not in {
                "0",
                str(cfg.num_hidden_layers - 1),
            }
        elif name.startswith("model.layers.1.") and type(module) in (
            torch.nn.Linear,
            GroupedExperts,
        ):
            pytest.fail(f"{name} was left in BF16")
    assert type(model.lm_head) is type(build_model(cfg).lm_head)
    assert all(
        type(m) is torch.nn.Linear for m in model.mtp.modules() if isinstance(m, torch.nn.Linear)
    )
    assert all(type(m) is Router for m in model.modules() if isinstance(m, Router))
    assert any(n.endswith("mlp.experts") for n in report.fp8)


def test_fp8_mtp_converts_the_mtp_projections():
    cfg = config()
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = shift_left(x, 1, -100)
    want = model(x, labels=labels).mtp_loss
    report = apply_precision(
        model, PrecisionConfig("fp8_emulated", fp8_mtp=True), cfg.num_hidden_layers, "cpu"
    )
    mtp_linears = [
        n
        for n, m in model.named_modules()
        if n.startswith("mtp.") and isinstance(m, torch.nn.Linear)
    ]
    assert mtp_linears and all(n in report.fp8 for n in mtp_linears) and "mtp" not in report.bf16
    assert type(model.mtp.fc) is Fp8Linear
    assert abs(model(x, labels=labels).mtp_loss - want) < 0.02 * want
    with pytest.raises(PrecisionUnavailable, match="fp8_mtp=true needs an FP8 precision"):
        validate_precision(PrecisionConfig(name="bf16", fp8_mtp=True), None)


def test_fp8_lm_head_converts_the_output_head():
    """Logits (evaluation) and the fused losses, main and MTP, through the FP8 head: close to BF16,
    and logits taken outside the fused loss still train the head."""
    cfg = config()
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = shift_left(x, 1, -100)
    want = model(x, labels=labels, return_logits=False)
    report = apply_precision(
        model, PrecisionConfig("fp8_emulated", fp8_lm_head=True), cfg.num_hidden_layers, "cpu"
    )
    assert (
        "lm_head" in report.fp8
        and "lm_head" not in report.bf16
        and isinstance(model.lm_head, Fp8Head)
    )
    got = model(x, labels=labels, return_logits=False)
    for name in ("lm_loss", "mtp_loss"):
        assert abs(getattr(got, name) - getattr(want, name)) < 0.01 * getattr(want, name), name
    unfused = model(x, labels=labels)  # full logits, CE through autograd
    torch.testing.assert_close(unfused.lm_loss, got.lm_loss, rtol=1e-5, atol=1e-5)
    unfused.lm_loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    for name in ("fp8_te_tensorwise", "bf16"):
        with pytest.raises(
            PrecisionUnavailable, match="fp8_lm_head=true applies to fp8_torch and fp8_emulated"
        ):
            validate_precision(PrecisionConfig(name=name, fp8_lm_head=True), None)


def test_pass_on_meta_then_materialize_gives_the_same_weights():
    cfg = config()
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(cfg)
    apply_precision(model, PrecisionConfig("fp8_emulated", **ALL_FP8), cfg.num_hidden_layers, "cpu")
    materialize(model, cfg, seed=3, device="cpu")
    reference = build_model(cfg, seed=3)
    for (name, got), (_, want) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(got, want), name
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    assert rel(model(x).logits, reference(x).logits) < 0.05


def test_pass_rules_for_pipeline_chunks_experts_and_shapes(caplog):
    # experts and shared experts of width 24: not a multiple of 16
    cfg = config(moe_intermediate_size=24)
    chunk = PipelineChunk(cfg, StageSpec(embedding=False, layers=(2, 3), head=True), 1, 2)
    with caplog.at_level(logging.WARNING, logger="megatron_exaone.precision"):
        report = apply_precision(
            chunk, PrecisionConfig("fp8_emulated", fp8_lm_head=True), cfg.num_hidden_layers, "cpu"
        )
    assert "lm_head" in report.fp8 and isinstance(chunk.lm_head, Fp8Head)  # the last stage's head
    assert "model.layers.3" in report.bf16  # the last layer by its global index
    assert "model.layers.2.self_attn.q_proj" in report.fp8
    assert "multiple of 16" in report.bf16["model.layers.2.mlp.experts"]
    assert "multiple of 16" in report.bf16["model.layers.2.mlp.shared_experts.down_proj"]
    assert "model.layers.2.mlp.shared_experts.down_proj" in caplog.text

    model = build_model(config())
    report = apply_precision(model, PrecisionConfig("fp8_emulated", fp8_experts=False), 4, "cpu")
    assert "fp8_experts=False" in report.bf16["model.layers.1.mlp.experts"]
    assert type(model.model.layers[1].mlp.experts) is GroupedExperts


def test_fp8_where_it_cannot_run_is_an_error():
    model = build_model(config())
    with pytest.raises(Fp8Unavailable, match="CUDA"):
        apply_precision(model, "fp8_torch", 4, "cpu")
    with pytest.raises(Fp8Unavailable, match="fp8_te"):
        apply_precision(model, "fp8_te_delayed", 4, "cpu")
    assert apply_precision(model, "bf16", 4, "cpu").fp8 == []
    with pytest.raises(PrecisionUnavailable, match="fp8_emulated"):
        validate_precision(PrecisionConfig(name="fp8_torch"), "cpu")
    validate_precision(PrecisionConfig(name="fp8_torch"), None)  # this build ships the backend
    validate_precision(PrecisionConfig(name="fp8_emulated", recipe="rowwise"), "cpu")


def test_input_projections_run_as_one_fp8_gemm():
    """precision.fp8_fuse_inputs (the default): every FP8 layer's attention (q, k, v) and dense or
    shared-expert MLP (gate, up) runs one GEMM over the concatenated weights, and the linears' own
    forwards no longer run. Rowwise scales are per token and per output channel, so the forward
    gives the numbers of three GEMMs; backward quantizes each token's output gradient over the
    joint width, so the gradients are another FP8 rounding, as far from high precision as the
    unfused ones. The parameters are unchanged; turned off, nothing is fused."""
    cfg = config()
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    runs = {}
    for fuse in (True, False, None):  # None: high precision
        model = build_model(cfg, seed=0)
        report = None
        if fuse is not None:
            plan = PrecisionConfig(
                "fp8_emulated", recipe="rowwise", fp8_fuse_inputs=fuse, **ALL_FP8
            )
            report = apply_precision(model, plan, cfg.num_hidden_layers, "cpu")
        calls: list[str] = []
        for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
            model.get_submodule(name).register_forward_hook(
                lambda *_, n=name, seen=calls: seen.append(n)
            )
        out = model(x, labels=shift_left(x, 1, -100))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs[fuse] = out.loss.detach(), grads, report, calls, model
    loss, grads, report, calls, model = runs[True]
    blocks = {f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)}
    blocks |= {"model.layers.0.mlp"} | {
        f"model.layers.{i}.mlp.shared_experts" for i in range(1, cfg.num_hidden_layers)
    }
    assert set(report.fused) == blocks and calls == []
    assert all(isinstance(model.get_submodule(n), Fp8FusedInputs) for n in blocks)
    assert not isinstance(model.mtp.layers[0].self_attn, Fp8FusedInputs)  # MTP stays BF16
    unfused_loss, unfused_grads, unfused_report, unfused_calls, _ = runs[False]
    assert unfused_report.fused == [] and len(unfused_calls) == 2
    torch.testing.assert_close(loss, unfused_loss, rtol=1e-6, atol=0)
    high = runs[None][1]
    assert rel(grads, high) < 0.1 and rel(grads, high) < 1.25 * rel(unfused_grads, high)


# ----------------------------------------------------------------------------------------- training
def train(fixed_batch_losses, plan: PrecisionConfig | None, steps: int = 50) -> list[float]:
    cfg = config()
    model = build_model(cfg, seed=0)
    if plan is not None:
        apply_precision(model, plan, cfg.num_hidden_layers, "cpu")
    x = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    return fixed_batch_losses(model, x, steps)


def test_fifty_fp8_steps_track_fp32(fixed_batch_losses):
    """Every decoder layer in FP8 (no BF16 ends), and then the head and MTP too: the loss falls as
    in fp32 and ends within 2% of it."""
    want = train(fixed_batch_losses, None)
    assert want[-1] < 0.5 * want[0]
    for recipe, head in (("tensorwise", False), ("rowwise", False), ("tensorwise", True)):
        plan = PrecisionConfig(
            "fp8_emulated", recipe=recipe, fp8_lm_head=head, fp8_mtp=head, **ALL_FP8
        )
        got = train(fixed_batch_losses, plan)
        assert abs(got[-1] - want[-1]) < 0.02 * want[-1], (recipe, head, got[-1], want[-1])


def _weight_cache_run(
    accumulated_losses,
    plan: PrecisionConfig,
    steps: int,
    micro_batches: int,
    mark_stale: bool = True,
    compile_backend: str | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(every micro-batch's LM loss, final weights) of the tiny model trained with `plan`."""
    cfg = config()
    model = build_model(cfg, seed=0)
    apply_precision(model, plan, cfg.num_hidden_layers, "cpu")
    if compile_backend:
        apply_compile(model, backend=compile_backend)
    losses = accumulated_losses(model, steps, micro_batches, mark_stale)
    torch._dynamo.reset()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "recipe,compile_backend", [("tensorwise", None), ("rowwise", None), ("tensorwise", "aot_eager")]
)
def test_weight_cache_reuses_one_quantization_per_optimizer_step(
    accumulated_losses, recipe, compile_backend
):
    """precision.fp8_weight_cache: FP8 weights quantized on each step's first micro-batch and reused
    for the others train exactly as quantizing them every time (eagerly and compiled); not marking
    them stale after the optimizer step (what the trainer does) would train on the old weights,
    which shows the cache is what runs."""
    plan = PrecisionConfig("fp8_emulated", recipe=recipe, fp8_lm_head=True, fp8_mtp=True, **ALL_FP8)
    cached = dataclasses.replace(plan, fp8_weight_cache=True)
    want_losses, want_weights = _weight_cache_run(
        accumulated_losses, plan, 3, 3, compile_backend=compile_backend
    )
    got_losses, got_weights = _weight_cache_run(
        accumulated_losses, cached, 3, 3, compile_backend=compile_backend
    )
    assert got_losses == want_losses
    for name, want in want_weights.items():
        assert torch.equal(got_weights[name], want), name
    fresh_losses, _ = _weight_cache_run(accumulated_losses, plan, 2, 2)
    stale_losses, _ = _weight_cache_run(accumulated_losses, cached, 2, 2, mark_stale=False)
    assert stale_losses[:2] == fresh_losses[:2] and stale_losses[2] != fresh_losses[2]


# --------------------------------------------------------------------------------------- TP / FSDP2
# name -> (ParallelDims kwargs, sequence parallel, FSDP2, recipe)
LAYOUTS = {
    "tp2_sp_tensorwise": (dict(tp=2), True, False, "tensorwise"),
    "tp2_rowwise": (dict(tp=2), False, False, "rowwise"),
    "dp2_fsdp_tensorwise": (dict(dp=2), True, True, "tensorwise"),
}


def _batch(cfg):
    x = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    return x, shift_left(x, 1, -100)


def _single_process(recipe: str, micro_batches: int):
    """The reference: one process, the global batch in `micro_batches` accumulated parts (as the dp
    ranks split it: current scaling takes each part's own amax)."""
    cfg = config(aux_loss_coeff=0.0)
    model = build_model(cfg, seed=5)
    apply_precision(
        model,
        PrecisionConfig("fp8_emulated", recipe=recipe, fp8_lm_head=True, **ALL_FP8),
        cfg.num_hidden_layers,
        "cpu",
    )
    x, labels = _batch(cfg)
    loss = 0.0
    for part, part_labels in zip(x.chunk(micro_batches), labels.chunk(micro_batches)):
        out = model(part, labels=part_labels, loss_normalizer=(labels != -100).sum())
        out.loss.backward()
        loss += out.lm_loss.item()
    return loss, {n: p.grad for n, p in model.named_parameters()}


def _run_layouts(rank, world):
    results = {}
    for name, (dims, sequence_parallel, fsdp, recipe) in LAYOUTS.items():
        cfg = config(aux_loss_coeff=0.0)
        mesh = build_mesh(ParallelDims(**dims), "cpu")
        plan = PrecisionConfig("fp8_emulated", recipe=recipe, fp8_lm_head=True, **ALL_FP8)
        model = build_parallel_model(
            cfg, mesh, seed=5, device="cpu", sequence_parallel=sequence_parallel, precision=plan
        )
        layouts = {n: layout_of(model, n, p) for n, p in model.named_parameters()}
        if fsdp:
            apply_data_parallel(model, mesh, bf16=False)
        x, labels = _batch(cfg)
        rows = slice(mesh.dp_rank * 4 // mesh.dims.dp, (mesh.dp_rank + 1) * 4 // mesh.dims.dp)
        out = model(x[rows], labels=labels[rows], loss_normalizer=(labels != -100).sum())
        out.loss.backward()
        reduce_grads(model, mesh, fsdp)
        want_loss, want_grads = _single_process(recipe, mesh.dims.dp)
        grads = {}
        for n, p in model.named_parameters():
            got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[n] = rel(got, layouts[n].slice_of(want_grads[n]))
        loss = torch.tensor(out.lm_loss.item())
        # the dp ranks' shares of the global loss
        torch.distributed.all_reduce(loss, group=mesh.dp_cp_group)
        results[name] = {
            "loss": (loss.item(), want_loss),
            "grads": grads,
            "fp8": sum(isinstance(m, Fp8Linear) for m in model.modules()),
            "fp8_head": isinstance(model.lm_head, Fp8Head),
        }
    return results


def test_tensor_parallel_and_fsdp_match_single_process_fp8():
    """The same FP8 losses as one process (decoder layers and the vocabulary-parallel head in FP8),
    for tp2 + SP (tensorwise, amax max-reduced over TP), tp2 (rowwise: scales per local shard where
    TP splits the contraction) and FSDP2 over dp2 (the reference accumulates the dp ranks' halves of
    the batch, since current scaling takes each micro-batch's own amax).

    Gradients: equal up to summation order (and the FP8 rounding flips it causes) for FSDP2 and TP's
    dense layers. Under TP the routed experts see 1/tp of the tokens, so their weight-gradient
    scales (per expert and column, over its tokens) differ: a few %. Rowwise TP gradients are not
    compared: its slightly different activations can flip a near-tie top-k routing choice, which
    changes gradients by far more than FP8 rounding."""
    for rank, results in enumerate(run_distributed(_run_layouts, 2, timeout_s=120)):
        for name, r in results.items():
            got, want = r["loss"]
            assert abs(got - want) < 1e-3 * want, (name, rank, got, want)
            assert r["fp8"] > 0 and r["fp8_head"]
            if name == "tp2_rowwise":
                continue
            for param, err in r["grads"].items():
                limit = 0.05 if name.startswith("tp2") and ".experts." in param else 1e-3
                assert err < limit, (name, rank, param, err)


def test_padding_groups_to_16_rows_keeps_every_per_group_product():
    """The FP8 ragged-K grouped GEMM needs groups of a positive multiple of 16 rows: zero rows are
    inserted."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 16])
    a, b = torch.randn(38, 3, generator=gen), torch.randn(38, 4, generator=gen)
    (pa, pb), padded = pad_groups([a, b], counts)
    assert padded.tolist() == [16, 16, 32, 16] and pa.shape[0] >= 80 and pa.shape[0] % 16 == 0
    assert (pa[80:] == 0).all() and (pa[16:32] == 0).all()
    torch.testing.assert_close(grouped_wgrad(pa[:80], pb[:80], padded), grouped_wgrad(a, b, counts))
    fp8 = a.to(torch.float8_e4m3fn)
    (p8,), _ = pad_groups([fp8], counts)
    assert p8.dtype == fp8.dtype and torch.equal(p8[32:49].float(), fp8[5:22].float())
