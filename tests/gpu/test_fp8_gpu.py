"""precision=fp8_torch on a CUDA GPU: torch's scaled-matmul kernels against the emulation
(tests/unit/test_fp8.py checks it on CPU) on the same quantized inputs, the FP8 linear and grouped
experts against high precision, and a few training steps of a small model. Needs compute capability
>= 8.9 (grouped experts: sm_90 in torch 2.11). Self-contained: no Hydra, no tokenizers, no process
group.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import metrics

from megatron_exaone.config.schema import PrecisionConfig
from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.loss import linear_cross_entropy
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.precision import apply_precision
from megatron_exaone.precision.fp8_common import (
    E4M3,
    E5M2,
    Fp8Recipe,
    quantize_both_layouts,
    to_fp8,
)
from megatron_exaone.precision.fp8_emulated import EmulatedGemms
from megatron_exaone.precision.fp8_ops import (
    Fp8GroupedExperts,
    Fp8HeadGemms,
    fp8_grouped_linear,
    fp8_linear,
    linear_weight_operands,
)
from megatron_exaone.precision.fp8_torch import TorchGemms, grouped_supported

pytestmark = pytest.mark.gpu
TORCH, EMULATED = TorchGemms(), EmulatedGemms()
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def fp8_capable():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(
            f"FP8 GEMMs need compute capability 8.9+, {torch.cuda.get_device_name()} has less"
        )


@pytest.fixture
def grouped():
    if not grouped_supported():
        pytest.skip("torch._scaled_grouped_mm does not run on this GPU / torch build")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("a_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 200])  # 200: the contraction is zero-padded to 208
def test_scaled_mm_matches_emulation(scaling, a_dtype, out_dtype, k):
    a = to_fp8(randn(96, k, seed=0), a_dtype, scaling, 1)
    b = to_fp8(randn(64, k, seed=1), E4M3, scaling, 1).t()
    got = TORCH.mm(a, b, out_dtype, fast_accum=False)
    assert got.dtype == out_dtype and got.shape == (96, 64)
    # Same FP8 inputs: only accumulation order/precision and the output rounding differ.
    assert rel(got, EMULATED.mm(a, b, torch.float32, False)) < (
        1e-3 if out_dtype == torch.float32 else 5e-3
    )


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@torch._inductor.config.patch(force_disable_caches=True)
def test_compiled_cast_transpose_stores_what_eager_casts(dtype):
    """The compiled cast-transpose (one value stored row-major and transposed) writes the same bytes
    as eager and no NaN/Inf: Triton miscompiles a transposed FP8 store next to min.NaN/max.NaN
    instructions (triton-lang/triton#11111, torchao#4652), which clamp lowers to; `quantize`
    saturates through `where` when compiled. The corruption depends on the kernel's block sizes, so
    several shapes, each compiled for its own (no cache: each run tunes and generates its kernels
    again). Inductor makes it one kernel: x is read once."""
    for rows, cols in ((128, 256), (1000, 768), (4096, 2048), (257, 4096), (8192, 512)):
        x = randn(rows, cols, seed=rows, scale=4.0, dtype=torch.bfloat16)
        scale = torch.tensor(200.0 if dtype == E4M3 else 2e4, device=DEVICE)
        compiled = torch.compile(quantize_both_layouts, dynamic=False)
        eager = quantize_both_layouts(x, scale, dtype)
        metrics.reset()
        results = compiled(x, scale, dtype)
        assert metrics.generated_kernel_count == 1, (rows, cols)
        for got, want in zip(results, eager):
            assert got.stride() == want.stride(), (rows, cols)
            assert torch.isfinite(got.float()).all(), (rows, cols)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (rows, cols)
        torch._dynamo.reset()


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
def test_fp8_linear_forward_backward(scaling, grad_dtype):
    x = randn(4, 128, 256, seed=2, dtype=torch.bfloat16).requires_grad_()
    w = randn(192, 256, seed=3, scale=0.05, dtype=torch.bfloat16).requires_grad_()
    dy = randn(4, 128, 192, seed=4, dtype=torch.bfloat16)
    recipe = Fp8Recipe(scaling, grad_dtype)
    want_y = F.linear(x.float(), w.float())
    want = torch.autograd.grad(want_y, (x, w), dy.float())
    y = fp8_linear(x, w, TORCH, recipe)
    got = torch.autograd.grad(y, (x, w), dy)
    y_emulated = fp8_linear(x, w, EMULATED, recipe)
    emulated = torch.autograd.grad(y_emulated, (x, w), dy)
    assert y.dtype == got[0].dtype == got[1].dtype == torch.bfloat16
    grad_tol = 0.08 if grad_dtype == E5M2 else 0.05
    assert rel(y, want_y) < 0.05
    assert rel(got[0], want[0]) < grad_tol and rel(got[1], want[1]) < grad_tol
    # Against the emulation: the forward uses fast accumulation, all outputs are rounded to bf16.
    assert rel(y, y_emulated) < 1e-2
    assert rel(got[0], emulated[0]) < 1e-2 and rel(got[1], emulated[1]) < 1e-2


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_head_loss(scaling):
    """precision.fp8_lm_head: the fused loss with FP8 logits and hidden-state gradient (4 chunks) on
    the scaled matmul kernels, against the emulation and against high precision."""
    hidden = randn(512, 256, seed=10, dtype=torch.bfloat16).requires_grad_()
    weight = randn(1024, 256, seed=11, scale=0.05, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(
        0, 1024, (512,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(12)
    )
    recipe = Fp8Recipe(scaling, E5M2)
    results = []
    for gemms in (TORCH, EMULATED, None):
        head = (
            None
            if gemms is None
            else Fp8HeadGemms(weight, gemms, recipe, linear_weight_operands(weight, recipe))
        )
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=128, gemms=head)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    (loss, *grads), (emulated_loss, *emulated), (want_loss, *want) = results
    assert (
        abs(loss - emulated_loss) < 1e-3 * emulated_loss
        and abs(loss - want_loss) < 1e-2 * want_loss
    )
    for got, emulation, reference in zip(grads, emulated, want):
        assert got.dtype == torch.bfloat16
        assert rel(got, emulation) < 1e-2 and rel(got, reference) < 0.08


@pytest.mark.parametrize("fp8_wgrad", [False, True])
def test_grouped_experts_matmul(grouped, fp8_wgrad):
    """Gate and up projections in one FP8 grouped GEMM (tokens scaled per row, weights per expert),
    against fp32 and against the emulation, with unaligned groups and an empty one; the weight
    gradient in BF16 or FP8."""
    counts = torch.tensor([40, 0, 17, 100, 3, 64, 16, 8], device=DEVICE)
    rows = int(counts.sum())
    x = randn(rows, 256, seed=5, dtype=torch.bfloat16).requires_grad_()
    gate = randn(8, 64, 256, seed=6, scale=0.05, dtype=torch.bfloat16).requires_grad_()
    up = randn(8, 64, 256, seed=9, scale=0.5, dtype=torch.bfloat16).requires_grad_()
    dy = randn(rows, 128, seed=7, dtype=torch.bfloat16)
    y = fp8_grouped_linear(x, (gate, up), counts, TORCH, fp8_wgrad)
    got = torch.autograd.grad(y, (x, gate, up), dy)
    y_emulated = fp8_grouped_linear(x, (gate, up), counts, EMULATED, fp8_wgrad)
    emulated = torch.autograd.grad(y_emulated, (x, gate, up), dy)
    w = torch.cat([gate, up], dim=1).float()
    want_y = torch.cat([part @ w[e].t() for e, part in enumerate(x.float().split(counts.tolist()))])
    want = torch.autograd.grad(want_y, (x, gate, up), dy.float())
    assert all(t.dtype == torch.bfloat16 for t in (y, *got))
    for value, reference, emulation in zip((y, *got), (want_y, *want), (y_emulated, *emulated)):
        assert rel(value, reference) < 0.05
        assert rel(value, emulation) < 1e-2
    assert (got[1][1] == 0).all() and (got[2][1] == 0).all()  # the expert without tokens


def test_grouped_experts_without_tokens(grouped):
    x = torch.zeros(0, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = randn(4, 32, 64, seed=8, dtype=torch.bfloat16).requires_grad_()
    counts = torch.zeros(4, dtype=torch.long, device=DEVICE)
    y = fp8_grouped_linear(x, w, counts, TORCH)
    assert y.shape == (0, 32)
    dx, dw = torch.autograd.grad(y, (x, w), torch.zeros_like(y))
    assert dx.shape == x.shape and (dw == 0).all()


def train(
    fixed_batch_losses,
    dtype: torch.dtype,
    plan: PrecisionConfig | None,
    steps: int = 30,
    compile: bool = False,
) -> list[float]:
    cfg = tiny(vocab_size=256)
    model = build_model(cfg, seed=0, device=DEVICE).to(dtype)
    if plan is not None:
        report = apply_precision(model, plan, cfg.num_hidden_layers, DEVICE)
        assert any(isinstance(m, Fp8GroupedExperts) for m in model.modules()), report.bf16
    if compile:
        apply_compile(model)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (8, 64), device=DEVICE, generator=gen)
    return fixed_batch_losses(model, x, steps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_steps_track_high_precision(dtype, grouped, fixed_batch_losses):
    """A small MoE model with every decoder layer in fp8_torch trains like the same model without
    FP8."""
    want = train(fixed_batch_losses, dtype, None)
    for recipe in ("tensorwise", "rowwise"):
        plan = PrecisionConfig(
            "fp8_torch", recipe=recipe, keep_bf16_first_layers=0, keep_bf16_last_layers=0
        )
        got = train(fixed_batch_losses, dtype, plan)
        assert got[-1] < 0.7 * got[0], (recipe, got)
        assert abs(got[-1] - want[-1]) < 0.03 * want[-1], (recipe, got[-1], want[-1])


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_layers_train_like_eager_fp8(recipe, grouped, fixed_batch_losses):
    """parallel.compile fuses the FP8 casts and scales into the layers' kernels without changing the
    numerics beyond rounding order."""
    plan = PrecisionConfig(
        "fp8_torch", recipe=recipe, keep_bf16_first_layers=0, keep_bf16_last_layers=0
    )
    eager = train(fixed_batch_losses, torch.bfloat16, plan, steps=10)
    compiled = train(fixed_batch_losses, torch.bfloat16, plan, steps=10, compile=True)
    assert abs(compiled[0] - eager[0]) < 0.01 * eager[0], (compiled[0], eager[0])
    assert abs(compiled[-1] - eager[-1]) < 0.03 * eager[-1], (compiled, eager)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_weight_cache_trains_as_quantizing_every_micro_batch(
    recipe, grouped, accumulated_losses
):
    """precision.fp8_weight_cache under torch.compile (one graph for a step's first micro-batch, one
    for the others), the FP8 head and MTP included: the same FP8 operands as quantizing the weights
    for every micro-batch, so the same losses up to the order of floating-point sums."""
    runs = []
    for cache in (False, True):
        cfg = tiny(vocab_size=256)
        model = build_model(cfg, seed=0, device=DEVICE).to(torch.bfloat16)
        plan = PrecisionConfig(
            "fp8_torch",
            recipe=recipe,
            keep_bf16_first_layers=0,
            keep_bf16_last_layers=0,
            fp8_weight_cache=cache,
            fp8_lm_head=True,
            fp8_mtp=True,
        )
        apply_precision(model, plan, cfg.num_hidden_layers, DEVICE)
        apply_compile(model)
        runs.append(accumulated_losses(model, 3, 3))
        torch._dynamo.reset()
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=0)
