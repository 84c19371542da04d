"""Megatron-style tensor + sequence parallelism as a pass over the single-device model (on the meta
device).

Column-parallel (output rows split): q/k/v_proj, gate/up_proj of dense MLPs and shared experts,
mtp.fc. Row-parallel (input columns split): o_proj, down_proj. Vocab-parallel: embed_tokens and
lm_head (with a vocab-parallel loss that never builds full-vocabulary logits). The linears stay
`nn.Linear` with local shapes; the communication sits on the module that owns them, as forward
hooks:

  sequence parallel: [B, S/tp, H] --all-gather--> attention / MLP --reduce-scatter--> [B, S/tp, H]
  tensor parallel:   [B, S, H]    --copy-->       attention / MLP --all-reduce-->     [B, S, H]

MoE blocks always see sequence-split tokens (under TP without SP the block splits its input and
gathers its output), so routed experts never compute a token twice. Every parameter is classified:
sharded, or replicated with a full gradient, or replicated with a partial gradient (used on a slice
of the sequence or of the heads); partial gradients are summed over TP by `reduce_tp_partial_grads`,
and an unclassified parameter is an error, so the silent-divergence class of pytorch/torchtitan#2387
cannot occur.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.loss import OutputHead
from megatron_exaone.model.mlp import SwiGLUMLP
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.mtp import MultiTokenPredictor
from megatron_exaone.model.norms import RMSNorm

from . import comm
from .sharding import ParamLayout, Shard, local_tensor, plan_of, shard_parameter
from .vocab_parallel import VocabParallelEmbedding, VocabParallelOutputHead


class TensorParallelError(ValueError):
    """A model that cannot be split over the requested tensor-parallel size."""


def _entry_exit_hooks(
    module: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool, dim: int = 1
) -> None:
    """Gather (SP) or copy (TP) the module input; reduce-scatter (SP) or all-reduce (TP) its output.
    `dim` is the token dimension that SP splits."""
    enter = (
        (lambda x: comm.gather_from_sp(x, group, dim=dim))
        if sequence_parallel
        else (lambda x: comm.copy_to_tp(x, group))
    )
    leave = (
        (lambda y: comm.reduce_scatter_to_sp(y, group, dim=dim))
        if sequence_parallel
        else (lambda y: comm.reduce_from_tp(y, group))
    )
    module.register_forward_pre_hook(lambda _m, args: (enter(args[0]), *args[1:]))
    module.register_forward_hook(lambda _m, _args, out: leave(out))


def _split_sequence_hooks(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Without SP, a MoE block works on its 1/tp share of the (replicated) sequence and gathers the
    result."""
    module.register_forward_pre_hook(
        lambda _m, args: (comm.scatter_to_sp(args[0], group, dim=1), *args[1:])
    )
    module.register_forward_hook(lambda _m, _args, out: comm.all_gather_along(out, group, dim=1))


def sequence_stats_reducer(group: dist.ProcessGroup):
    """MoE `reduce_aux_stats` for ranks that each route part of every sequence (SP over tp, CP over
    cp x tp): the per-sequence counts and token totals summed, the probability sums summed with
    their gradient kept local."""

    def reduce(counts: torch.Tensor, prob_sums: torch.Tensor, tokens: torch.Tensor):
        counts = comm.all_reduce_(counts.detach().clone(), group)
        tokens = comm.all_reduce_(tokens.clone(), group)
        return counts, comm.reduce_from_tp(prob_sums, group), tokens

    return reduce


def _column(root: nn.Module, name: str, rank: int, size: int) -> None:
    shard_parameter(root, f"{name}.weight", Shard(0, rank, size))


def _row(root: nn.Module, name: str, rank: int, size: int) -> None:
    shard_parameter(root, f"{name}.weight", Shard(1, rank, size))


def _shard_mlp(root: nn.Module, name: str, rank: int, size: int) -> None:
    _column(root, f"{name}.gate_proj", rank, size)
    _column(root, f"{name}.up_proj", rank, size)
    _row(root, f"{name}.down_proj", rank, size)


def _shard_attention(root: nn.Module, name: str, attn: Attention, rank: int, size: int) -> None:
    """Query heads split over tp; KV heads split too, or, when tp exceeds their count, each KV head
    replicated on the tp / kv ranks whose query heads use it."""
    heads = attn.q_proj.out_features // attn.head_dim
    kv_heads = attn.k_proj.out_features // attn.head_dim
    if heads % size or (kv_heads % size and size % kv_heads):
        raise TensorParallelError(
            f"{name}: {heads} query / {kv_heads} key-value heads do not split over tp={size};"
            " tp must divide the query heads and divide or be a multiple of the KV heads."
        )
    _column(root, f"{name}.q_proj", rank, size)
    _row(root, f"{name}.o_proj", rank, size)
    for proj in ("k_proj", "v_proj"):
        if kv_heads % size == 0:
            _column(root, f"{name}.{proj}", rank, size)
        else:
            shard_parameter(
                root, f"{name}.{proj}.weight", Shard(0, rank // (size // kv_heads), kv_heads)
            )
            plan_of(root).tp_replicated_kv.add(f"{name}.{proj}.weight")


def apply_tensor_parallel(
    root: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool
) -> None:
    """Shard `root` (a full model or a pipeline stage, on the meta device) over the TP `group` in
    place."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    plan = plan_of(root)
    # Replicated parameters that see only this rank's heads or tokens even without SP.
    always_partial: set[str] = set()
    for name, module in list(root.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, DecoderLayer):
            _shard_attention(root, f"{prefix}self_attn", module.self_attn, rank, size)
            _entry_exit_hooks(module.self_attn, group, sequence_parallel)
            always_partial |= {
                f"{prefix}self_attn.q_norm.weight",
                f"{prefix}self_attn.k_norm.weight",
            }
            if isinstance(module.mlp, SwiGLUMLP):
                _shard_mlp(root, f"{prefix}mlp", rank, size)
                _entry_exit_hooks(module.mlp, group, sequence_parallel)
        elif isinstance(module, MoEBlock):
            module.reduce_aux_stats = sequence_stats_reducer(group)
            if not sequence_parallel:
                _split_sequence_hooks(module, group)
            always_partial.add(f"{prefix}gate.weight")
            if module.shared_experts is not None:
                _shard_mlp(root, f"{prefix}shared_experts", rank, size)
                # Shared experts see the block's flattened [tokens, H] share of the sequence.
                _entry_exit_hooks(module.shared_experts, group, True, dim=0)
        elif isinstance(module, MultiTokenPredictor):
            _shard_mtp_fc(root, prefix, module, group, sequence_parallel, rank, size)
        elif isinstance(module, nn.Embedding):
            _swap(root, name, VocabParallelEmbedding.shard_of(module, group, sequence_parallel))
            plan.layouts[f"{prefix}weight"] = ParamLayout(
                tuple(module.weight.shape), (Shard(0, rank, size),)
            )
        elif isinstance(module, OutputHead):
            _swap(root, name, VocabParallelOutputHead.shard_of(module, group, sequence_parallel))
            plan.layouts[f"{prefix}weight"] = ParamLayout(
                tuple(module.weight.shape), (Shard(0, rank, size),)
            )
    plan.tp_partial_grads |= _classify_replicated(
        root, plan.layouts.keys(), always_partial, sequence_parallel
    )


def _classify_replicated(
    root: nn.Module, sharded, always_partial: set[str], sequence_parallel: bool
) -> set[str]:
    """The replicated parameters whose gradients must be summed over TP; raises on a parameter of
    unknown kind.

    Under SP every replicated parameter sees 1/tp of the tokens. Without SP the norm gains see the
    whole (replicated) activations and get full gradients. Routed experts are reduced over the
    expert-data-parallel group by the data-parallel pass."""
    norm_gains = {f"{name}.weight" for name, m in root.named_modules() if isinstance(m, RMSNorm)}
    partial = set()
    for name, _ in root.named_parameters():
        if name in sharded or ".experts." in name:
            continue
        if sequence_parallel or name in always_partial:
            partial.add(name)
        elif name not in norm_gains:
            raise TensorParallelError(
                f"tensor-parallel pass does not know how to treat parameter {name!r}: "
                "shard it or declare how its gradient is reduced."
            )
    return partial


def _shard_mtp_fc(root, prefix, module, group, sequence_parallel, rank, size) -> None:
    """mtp.fc is column parallel: gather the sequence, project to H/tp, gather the hidden dim,
    re-split (SP)."""
    _column(root, f"{prefix}fc", rank, size)
    enter = (
        (lambda x: comm.gather_from_sp(x, group, dim=1))
        if sequence_parallel
        else (lambda x: comm.copy_to_tp(x, group))
    )

    def leave(y: torch.Tensor) -> torch.Tensor:
        y = comm.all_gather_along(y, group, dim=-1)
        return comm.scatter_to_sp(y, group, dim=1) if sequence_parallel else y

    module.fc.register_forward_pre_hook(lambda _m, args: (enter(args[0]),))
    module.fc.register_forward_hook(lambda _m, _args, out: leave(out))


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


@torch.no_grad()
def reduce_tp_partial_grads(root: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum, over TP, the gradients of replicated parameters that each TP rank computed from part of
    the data (and, for replicated KV heads, over the ranks sharing each head)."""
    if dist.get_world_size(group) == 1:
        return
    plan = plan_of(root)
    grads = {n: local_tensor(p.grad) for n, p in root.named_parameters() if p.grad is not None}
    partial = [g for n, g in grads.items() if n in plan.tp_partial_grads]
    if partial:
        flat = torch.cat([g.reshape(-1) for g in partial])
        comm.all_reduce_(flat, group)
        offset = 0
        for g in partial:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    for name in sorted(plan.tp_replicated_kv & grads.keys()):
        # Each rank adds its share into the slot of its KV head; the sum over TP lands per head.
        shard = plan.layouts[name].shards[0]
        slots = grads[name].new_zeros((shard.count, *grads[name].shape))
        slots[shard.index] = grads[name]
        comm.all_reduce_(slots, group)
        grads[name].copy_(slots[shard.index])
