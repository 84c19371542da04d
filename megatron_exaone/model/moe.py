"""Mixture of experts: sigmoid router with aux-loss-free bias, stacked experts run by a grouped
matmul, shared experts, the sequence-level auxiliary loss and the expert-bias update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import SwiGLUMLP

# (counts [B, E], prob_sums [B, E], tokens per sequence []) -> the same, summed over sequence
# shards.
StatsReducer = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class RouterSettings:
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def route(
    logits: torch.Tensor, bias: torch.Tensor, s: RouterSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' ExaoneMoeTopkRouter on fp32 logits [T, E].

    Returns (sigmoid scores [T, E], gate weights [T, k], expert indices [T, k]). The correction bias
    only steers the choice; gate weights come from the unbiased scores.
    """
    num_tokens, num_experts = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias.float()
    if s.n_group > 1:
        group_scores = choice.view(num_tokens, s.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=s.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, -1, num_experts // s.n_group)
            .reshape(num_tokens, -1)
        )
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=s.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if s.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, weights * s.routed_scaling_factor, indices


def sequence_aux_loss(
    scores: torch.Tensor,
    batch: int,
    top_k: int,
    reduce_stats: StatsReducer | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-level balance loss (without its coefficient), averaged over sequences.

    Per sequence: f_i = E / (k * T) * count_i, P_i = mean_t of the scores normalised over experts;
    loss = sum_i f_i * P_i. count_i counts the tokens whose k highest scores include expert i: the
    scores alone, not the bias-steered choice that dispatches the tokens (DeepSeek-V3's eq. 18, and
    Megatron-Core's `compute_routing_scores_for_aux_loss`), so the loss measures the imbalance the
    router itself produces, which the bias is there to hide. `reduce_stats(counts, prob_sums,
    tokens)` sums the per-sequence statistics over ranks that each hold part of every sequence
    (sequence parallel); None in a single process.
    """
    num_experts = scores.shape[-1]
    scores = scores.view(batch, -1, num_experts)
    seq = scores.shape[1]
    with torch.no_grad():
        top = scores.topk(top_k, dim=-1, sorted=False).indices.view(batch, -1)
        counts = torch.zeros(batch, num_experts, device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(1, top, torch.ones_like(top, dtype=scores.dtype))
    prob_sums = (scores / scores.sum(dim=-1, keepdim=True)).sum(dim=1)
    tokens = torch.tensor(float(seq), device=scores.device)
    if reduce_stats is not None:
        counts, prob_sums, tokens = reduce_stats(counts, prob_sums, tokens)
    f = counts * (num_experts / (top_k * tokens))
    return (f * prob_sums / tokens).sum(dim=-1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward, also sends gradient `scale` into `aux_loss` (Megatron's
    aux-loss auto-scaler). The aux loss thus trains the router through any wrapper, pipeline stage
    boundary or recompute without travelling with the activations."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(hidden: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    return _AttachAuxLoss.apply(hidden, aux_loss, scale)


# runs eagerly inside compiled layers: traced, it would recompile for every split
@torch.compiler.disable
def _loop_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference grouped matmul: x [N, K] split in expert-major groups, w [E, K, M]."""
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)], dim=0)


# (device type, dtype) -> whether torch._grouped_mm runs there. A plain dict rather than
# functools.lru_cache: torch.compile reads a filled dict as a constant, but would trace into an
# lru_cache-wrapped check (`parallel.compile` fills it before compiling).
_GROUPED_MM_USABLE: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_usable(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here and agrees with the reference loop (checked once per
    device/dtype)."""
    key = (device_type, dtype)
    if key not in _GROUPED_MM_USABLE:
        _GROUPED_MM_USABLE[key] = _check_grouped_mm(device_type, dtype)
    return _GROUPED_MM_USABLE[key]


def _check_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(48, 32, generator=gen).to(device_type, dtype)
        w = torch.randn(3, 32, 16, generator=gen).to(device_type, dtype)
        counts = torch.tensor([16, 0, 32], device=device_type)
        offs = counts.cumsum(0).to(torch.int32)
        got = torch._grouped_mm(x, w, offs=offs)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        return torch.allclose(got.float(), _loop_mm(x, w, counts).float(), atol=tol, rtol=tol)
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] sorted by expert, w [E, K, M] (a transposed view is fine), counts [E] rows per
    expert."""
    # kernel requirement
    aligned = all(dim * x.element_size() % 16 == 0 for dim in (x.shape[-1], w.shape[-1]))
    # Under torch.compile, the kernel's shape function accepts BF16 only (eager CPU also runs fp32).
    traceable = x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if aligned and traceable and grouped_mm_usable(x.device.type, x.dtype):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return _loop_mm(x, w, counts)


@torch.compiler.disable  # as _loop_mm
def _loop_wgrad(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sizes = counts.tolist()
    return torch.stack([pa.t() @ pb for pa, pb in zip(a.split(sizes), b.split(sizes))])


def group_ids(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each of `rows` rows sorted by group ([rows] int64); `counts` [G] sums to
    `rows`."""
    groups = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(groups, counts, output_size=rows)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[G, N, K]: a_g^T @ b_g for each group g of the rows of a [T, N] and b [T, K] (sorted by
    group, `counts` [G] rows each): the weight gradient of a grouped matmul. In BF16 one ragged-K
    grouped GEMM (`_ragged_wgrad`), a loop otherwise. `a` may be a column slice of a wider
    tensor."""
    if a.shape[0] == 0:  # an expert-parallel rank that received no tokens
        return a.new_zeros((counts.numel(), a.shape[1], b.shape[1]))
    if a.dtype == torch.bfloat16 and grouped_mm_usable(a.device.type, a.dtype):
        return _ragged_wgrad(a, b, counts.cumsum(0).to(torch.int32))
    return _loop_wgrad(a, b, counts)


@torch.library.custom_op("megatron_exaone::ragged_wgrad", mutates_args=())
def _ragged_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a^T, b) with a^T column-major and b row-major, the one operand layout in
    which the CUDA kernel takes groups of any size (an empty one included; other layouts need
    multiples of 16 bytes). An opaque op so that torch.compile cannot hand the kernel another layout
    of the same values."""
    if a.stride(-1) != 1 or a.stride(0) % 8:
        a = a.contiguous()
    return torch._grouped_mm(a.t(), b.contiguous(), offs=offs)


@_ragged_wgrad.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty((offs.numel(), a.shape[1], b.shape[1]))


class GroupedExperts(nn.Module):
    """Routed experts as stacked weights: gate/up_proj [E, I, H], down_proj [E, H, I] (HF per-expert
    layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: tokens already permuted to expert-major order; counts: tokens per local expert."""
        gate = grouped_mm(x, self.gate_proj.transpose(1, 2), counts)
        up = grouped_mm(x, self.up_proj.transpose(1, 2), counts)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), counts)


class Router(nn.Module):
    """`mlp.gate`: the router projection, always computed in fp32."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


def permute_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable expert-major order of the T*k (token, slot) pairs, and tokens per expert."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # A scatter-add rather than bincount: its output size does not depend on the data (torch.compile
    # friendly).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return order, counts.scatter_add_(0, flat, torch.ones_like(flat))


class _Dispatch(torch.autograd.Function):
    """x[order // top_k]: each token's row once per routed slot, in expert-major order. Autograd's
    backward of that gather is an atomic scatter-add of T*k rows into T; this one gathers the slot
    gradients back into token order (`order` is a permutation) and sums each token's k rows, a
    reduction that a compiler fuses with the gather: deterministic and free of atomics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        row_of_slot = torch.empty_like(order)
        row_of_slot[order] = torch.arange(order.numel(), device=order.device)
        by_token = grad[row_of_slot].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1)
        return by_token, None, None


def dispatch(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of `x` [T, H] for the T*k slots in `order` (from `permute_by_expert`): [T*k, H],
    expert-major. With top_k=1, `x` permuted by `order` (a permutation of its rows)."""
    return _Dispatch.apply(x, order, top_k)


def combine(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Undo the permutation and sum the k expert outputs of each token, weighted by the gates
    (deterministic)."""
    num_tokens, top_k = weights.shape
    unsorted = torch.empty_like(expert_out)
    unsorted[order] = expert_out
    weighted = unsorted.view(num_tokens, top_k, -1).float() * weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(expert_out.dtype)


class MoEBlock(nn.Module):
    """`mlp` of a sparse layer: router `gate`, `experts`, `shared_experts`, fp32
    `e_score_correction_bias`.

    `tokens_per_expert` accumulates routing counts over the micro-batches of a step;
    `update_expert_bias` consumes it at the optimizer step (`count_routed_tokens` is switched off
    while activation checkpointing recomputes). The sequence aux loss (times `aux_loss_scale`) is
    attached to the output's backward, and its value is kept in `last_aux_loss` for logging.
    `reduce_aux_stats` is set by the sequence-parallel pass.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        moe_intermediate_size: int,
        num_shared_experts: int,
        router: RouterSettings,
        aux_loss_coeff: float,
    ) -> None:
        super().__init__()
        self.gate = Router(num_experts, hidden_size)
        self.experts = GroupedExperts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = (
            SwiGLUMLP(hidden_size, moe_intermediate_size * num_shared_experts)
            if num_shared_experts > 0
            else None
        )
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32)
        )
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False
        )
        self.router = router
        self.aux_loss_coeff = aux_loss_coeff
        self.reduce_aux_stats: StatsReducer | None = None
        self.count_routed_tokens = True
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, aux_loss_scale: float = 1.0) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores, weights, indices = route(self.gate(flat), self.e_score_correction_bias, self.router)
        order, counts = permute_by_expert(indices, scores.shape[-1])
        if self.count_routed_tokens:
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        out = combine(
            self.experts(dispatch(flat, order, self.router.top_k), counts), order, weights
        )
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        out = out.view(batch, seq, hidden)
        self.last_aux_loss = None
        if self.aux_loss_coeff > 0:
            aux = self.aux_loss_coeff * sequence_aux_loss(
                scores, batch, self.router.top_k, self.reduce_aux_stats
            )
            self.last_aux_loss = aux.detach() * aux_loss_scale
            if torch.is_grad_enabled():
                out = attach_aux_loss(out, aux, aux_loss_scale)
        return out


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, reduce_counts=None) -> dict[str, float]:
    """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_count - count), then reset
    the counts.

    `reduce_counts(tensor)` sums the counts in place over every rank holding a share of the tokens
    (TP x CP x DP); leave it None in a single process. Runs outside autograd, at the optimizer step.
    Returns each MoE block's load imbalance (max / mean routed tokens per expert) for logging.
    """
    imbalance = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock):
            counts = module.tokens_per_expert
            if reduce_counts is not None:
                reduce_counts(counts)
            if counts.sum() > 0:
                imbalance[name] = (counts.max() / counts.mean()).item()
                if rate > 0:
                    module.e_score_correction_bias += rate * torch.sign(counts.mean() - counts)
            counts.zero_()
    return imbalance
