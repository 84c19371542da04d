"""Pipeline parallelism: the stage split, the stage modules ("chunks") and the schedules that run
them.

The model is cut into pp * vpp virtual stages of units: `E` (embedding), one `t` per decoder layer,
and `L` (final norm, lm_head, MTP and the loss). `pipeline_layout` gives the split (balanced by
default, or an explicit layout string); `PipelineChunk` keeps only a stage's units under their
full-model names, so `materialize`, the tensor and expert parallel passes, checkpoints and the HF
converter see the same names as for the single-process model. Schedules come from
`torch.distributed.pipelining`; `parallel.step.PipelineRunner` runs one training step over them.

Losses: every micro-batch's CE is divided by the valid-label count of the whole global batch (all
micro-batches and data-parallel ranks) and MoE aux losses are weighted by the micro-batch's share of
the global sequences, so the summed gradients equal those of the single-process model on the global
batch (schedules run with `scale_grads=False`). With MTP the last stage holds a copy of the
embedding; `sync_embedding_grads` sums the two copies' gradients so they stay identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig
from megatron_exaone.model.loss import LossMetrics, LossScaling, total_loss
from megatron_exaone.model.model import AttentionInputs, ModelPart, moe_aux_loss, mtp_enabled

from .comm import all_reduce_
from .mesh import LayoutError, ParallelMesh
from .sharding import local_tensor

EMBEDDING_WEIGHT = "model.embed_tokens.weight"


# ------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class StageSpec:
    """The units of one virtual stage: the embedding, decoder layers (full-model indices), the head
    + loss."""

    embedding: bool
    layers: tuple[int, ...]
    head: bool


def pipeline_layout(
    config: ModelConfig, pp: int, vpp: int = 1, layout: str | None = None
) -> list[StageSpec]:
    """The units of each of the pp * vpp virtual stages, in the order the activations flow through
    them.

    Default (`layout=None`): contiguous layers, as even as possible, every stage >= 1 layer. The
    embedding and the head each count as about one layer, so the layers left over by the even split
    go to the middle stages first (the latest first: under 1F1B the early stages keep the most
    micro-batches in flight), then to the first stage.

    `layout` (in the spirit of Megatron's `--pipeline-model-parallel-layout`): `E` = embedding, `t`
    = one decoder layer, `L` = final norm + lm_head + MTP + loss, `|` separates virtual stages.
    `X*n` repeats a unit and `(...)*n` a group; whitespace is ignored. `E` opens the first stage,
    `L` closes the last, a stage may hold only `E` or only `L`, but none is empty. Examples for 4
    layers: "Et|tt|tL", "E|t*4|L", "E(t|)*3tL".
    """
    stages = pp * vpp
    if layout is None:
        return _balanced_layout(config.num_hidden_layers, stages)
    return _parse_layout(layout, config.num_hidden_layers, pp, vpp)


def format_layout(specs: Sequence[StageSpec]) -> str:
    """The layout string of `specs` (inverse of `pipeline_layout(..., layout=...)`), e.g. for
    logs."""
    return "|".join("E" * s.embedding + "t" * len(s.layers) + "L" * s.head for s in specs)


def _balanced_layout(num_layers: int, stages: int) -> list[StageSpec]:
    if num_layers < stages:
        raise LayoutError(
            f"{stages} pipeline stages (pp*vpp) but the model has {num_layers} decoder layers: "
            "every stage of the default layout holds at least one layer; use fewer stages or an "
            "explicit layout."
        )
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    # extra < stages: the last stage never gets one
    for i in (list(range(stages - 2, 0, -1)) + [0])[:extra]:
        counts[i] += 1
    return _specs_from_counts(counts)


def _specs_from_counts(counts: Sequence[int]) -> list[StageSpec]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    last = len(counts) - 1
    return [
        StageSpec(embedding=i == 0, layers=tuple(range(start, start + n)), head=i == last)
        for i, (start, n) in enumerate(zip(starts, counts))
    ]


def _parse_layout(layout: str, num_layers: int, pp: int, vpp: int) -> list[StageSpec]:
    def fail(problem: str) -> LayoutError:
        return LayoutError(f"pipeline layout {layout!r}: {problem}")

    text = "".join(layout.split())
    expanded, end = _expand(text, 0, fail)
    if end < len(text):
        raise fail(f"unmatched ')' at position {end} (whitespace removed).")
    stages = expanded.split("|")
    if len(stages) != pp * vpp:
        raise fail(
            f"{len(stages)} stages but pp*vpp = {pp * vpp} (pp={pp}, vpp={vpp}); '|' separates "
            "stages."
        )
    for unit, name in (("E", "embedding"), ("L", "head and loss")):
        if expanded.count(unit) != 1:
            raise fail(f"needs exactly one '{unit}' ({name}), found {expanded.count(unit)}.")
    if not stages[0].startswith("E"):
        raise fail("'E' (embedding) must open the first stage.")
    if not stages[-1].endswith("L"):
        raise fail("'L' (final norm, lm_head, MTP and the loss) must close the last stage.")
    for i, stage in enumerate(stages):
        if not stage:
            raise fail(f"stage {i} is empty; every stage needs at least one unit (E, t or L).")
    found = expanded.count("t")
    if found != num_layers:
        raise fail(f"{found} decoder layers ('t') but the model has {num_layers}.")
    return _specs_from_counts([s.count("t") for s in stages])


def _expand(text: str, pos: int, fail: Callable[[str], LayoutError]) -> tuple[str, int]:
    """Expand repetitions from `pos` up to an unmatched ')' or the end; returns (units, position
    reached)."""
    parts = []
    while pos < len(text) and text[pos] != ")":
        char = text[pos]
        if char == "(":
            item, pos = _expand(text, pos + 1, fail)
            if pos == len(text):
                raise fail("'(' is never closed.")
            pos += 1
        elif char in "EtL|":
            item, pos = char, pos + 1
        elif char == "*":
            raise fail(f"'*' at position {pos} (whitespace removed) has nothing to repeat.")
        else:
            raise fail(
                f"unknown character {char!r} at position {pos} (whitespace removed); use E, t, L, "
                "|, (, ) and *N."
            )
        count, pos = _repeat_count(text, pos, fail)
        parts.append(item * count)
    return "".join(parts), pos


def _repeat_count(text: str, pos: int, fail: Callable[[str], LayoutError]) -> tuple[int, int]:
    if pos == len(text) or text[pos] != "*":
        return 1, pos
    end = pos + 1
    while end < len(text) and text[end].isdigit():
        end += 1
    if end == pos + 1 or int(text[pos + 1 : end]) < 1:
        raise fail(f"'*' at position {pos} (whitespace removed) must be followed by a count >= 1.")
    return int(text[pos + 1 : end]), end


# ---------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class _ScheduleKind:
    cls: type
    multi: bool  # takes all of a rank's stages (vpp of them)
    v_shape: bool  # rank r holds stages r and 2*pp-1-r (else r, r+pp, r+2pp, ...)


SCHEDULES = {
    "1f1b": _ScheduleKind(Schedule1F1B, multi=False, v_shape=False),
    "interleaved_1f1b": _ScheduleKind(ScheduleInterleaved1F1B, multi=True, v_shape=False),
    "zbv": _ScheduleKind(ScheduleZBVZeroBubble, multi=True, v_shape=True),
    "dualpipev": _ScheduleKind(ScheduleDualPipeV, multi=True, v_shape=True),
}


def splits_weight_backward(schedule: str) -> bool:
    """Zero-bubble schedules run the weight-gradient half of the backward separately, so FSDP2 must
    keep parameters unsharded between forward and backward (reshard_after_forward=False)."""
    return schedule in SCHEDULES and SCHEDULES[schedule].v_shape


def _schedule_kind(name: str, pp: int, vpp: int) -> _ScheduleKind:
    """The schedule `name`, checked against pp and vpp (no process group needed)."""
    if name not in SCHEDULES:
        raise LayoutError(
            f"pipeline schedule {name!r} is unknown; choose one of {sorted(SCHEDULES)}."
        )
    if pp < 2:
        raise LayoutError(f"pipeline schedule {name!r} needs pp >= 2 (got pp={pp}).")
    if name == "1f1b" and vpp != 1:
        raise LayoutError(
            f"1f1b runs one stage per rank but vpp={vpp}: use interleaved_1f1b (or zbv/dualpipev "
            "with vpp=2), or set vpp=1."
        )
    if name == "interleaved_1f1b" and vpp < 2:
        raise LayoutError(
            "interleaved_1f1b needs vpp >= 2 virtual stages per rank; use 1f1b for vpp=1."
        )
    if SCHEDULES[name].v_shape and vpp != 2:
        raise LayoutError(
            f"{name} runs exactly two stages per rank (V shape): set vpp=2 (got vpp={vpp})."
        )
    return SCHEDULES[name]


def check_schedule(name: str, pp: int, vpp: int, n_microbatches: int) -> None:
    """Raise `LayoutError` if `name` cannot run pp x vpp stages on `n_microbatches`
    micro-batches."""
    _schedule_kind(name, pp, vpp)
    stages = pp * vpp
    if n_microbatches < 1:
        raise LayoutError(f"n_microbatches={n_microbatches} must be >= 1.")
    if name == "1f1b" and n_microbatches < pp:
        raise LayoutError(f"1f1b needs at least pp={pp} micro-batches, got {n_microbatches}.")
    rounds = max(1, n_microbatches // pp)
    if name == "interleaved_1f1b" and n_microbatches % rounds:
        raise LayoutError(
            f"interleaved_1f1b needs the micro-batch count to be a multiple of its rounds "
            f"(max(1, n_microbatches // pp) = {rounds}); got {n_microbatches}: use a multiple of "
            f"pp={pp} or fewer than {2 * pp}."
        )
    if name == "dualpipev" and n_microbatches < stages:
        raise LayoutError(
            f"dualpipev needs at least as many micro-batches as stages ({stages}), got "
            f"{n_microbatches}."
        )


def local_stage_indices(schedule: str, pp_rank: int, pp: int, vpp: int) -> list[int]:
    """The virtual stages pipeline rank `pp_rank` runs, in torch.distributed.pipelining's order for
    `schedule`."""
    if _schedule_kind(schedule, pp, vpp).v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(vpp)]


# --------------------------------------------------------------------------------- the stage module
class PipelineChunk(ExaoneMoeForCausalLM):
    """One virtual stage: the model with the parts it does not run removed (`ModelPart` of its
    `StageSpec`), under the full-model names (`model.embed_tokens`, `model.layers.<i>`,
    `model.norm`, `lm_head`, `mtp`). A last stage that trains MTP holds a copy of the embedding,
    whose gradients `sync_embedding_grads` sums with the first's.

    forward(x, *, position_ids, token_ids, labels) is the pipeline schedule's contract, made of the
    model's pieces: `x` is the input ids on the first stage, the hidden states elsewhere. The
    keyword inputs come whole to every stage (RoPE and document masks are rebuilt from
    `position_ids`; the last stage reads `token_ids` for MTP and `labels` for the loss). Returns the
    hidden states, or on the last stage the micro-batch's `total_loss(lm, mtp, 0)` normalised by
    `loss_scaling` (the aux loss reaches its router through the MoE outputs).
    """

    def __init__(
        self,
        config: ModelConfig,
        spec: StageSpec,
        stage_index: int,
        num_stages: int,
        sequence_shards: int = 1,
    ) -> None:
        if config.tie_word_embeddings:
            raise LayoutError(
                "tie_word_embeddings with pipeline parallelism is not supported: the tied lm_head "
                "would live on another stage than the embedding."
            )
        super().__init__(config, ModelPart(spec.embedding, spec.layers, spec.head))
        self.spec = spec
        self.stage_index = stage_index
        self.num_stages = num_stages
        # tokens of a sequence per rank: 1 / (cp * tp under SP)
        self.sequence_shards = sequence_shards
        self.loss_scaling: LossScaling | None = None
        self.metrics = LossMetrics()

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def hidden_shape(self, micro_batch: int, seq_len: int) -> tuple[int, int, int]:
        """Shape of the hidden states this stage receives or sends for a [micro_batch, seq_len]
        micro-batch."""
        return micro_batch, seq_len // self.sequence_shards, self.config.hidden_size

    def _scaling(self) -> LossScaling:
        if self.loss_scaling is None:
            raise RuntimeError(
                "PipelineChunk.loss_scaling is not set: set the step's global counts first "
                "(PipelineRunner.step does)."
            )
        return self.loss_scaling

    def forward(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scaling = self._scaling()
        if self.spec.embedding:
            attn = AttentionInputs(
                self.config, position_ids, self.model.embed_tokens.weight.dtype, self.sequence_shard
            )
            hidden = self.model.embed_tokens(attn.take(x))
        else:
            attn = AttentionInputs(self.config, position_ids, x.dtype, self.sequence_shard)
            hidden = x
        hidden = self.model.decode(hidden, attn, x.shape[0] / scaling.sequences)
        self.metrics.add("aux_loss", moe_aux_loss(self.model.layers.modules()))
        if not self.spec.head:
            return hidden
        if labels is None or token_ids is None:
            raise ValueError(
                "the last pipeline stage needs labels and token_ids as keyword inputs."
            )
        hidden = self.model.norm(hidden)

        def loss_of(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return self.lm_head.loss(h, targets, scaling.valid_tokens)

        lm_loss = loss_of(hidden, attn.take(labels))
        mtp_loss = self.mtp_loss(hidden, token_ids, labels, attn, loss_of)
        self.metrics.add("lm_loss", lm_loss)
        self.metrics.add("mtp_loss", mtp_loss)
        return total_loss(
            lm_loss, 0.0 if mtp_loss is None else mtp_loss, 0.0, self.config.mtp_loss_weight
        )


@torch.no_grad()
def sync_embedding_grads(chunks: Sequence[nn.Module], mesh: ParallelMesh) -> None:
    """Sum the gradients of the first stage's embedding and the last stage's copy (for MTP), on both
    copies.

    Both copies on one rank (V-shaped schedules) are summed locally; otherwise over
    `mesh.embedding_group`. Call after backward, before or after the data-parallel reduction (the
    sum is linear; under FSDP2 both ends hold the same shard)."""
    pipeline = [c for c in chunks if isinstance(c, PipelineChunk)]
    if not pipeline or not mtp_enabled(pipeline[0].config):
        return
    copies = [
        dict(c.named_parameters())[EMBEDDING_WEIGHT]
        for c in pipeline
        if hasattr(c.model, "embed_tokens")
    ]
    if not copies:
        return
    for param in copies:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [local_tensor(p.grad) for p in copies]
    total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(dim=0)
    if len(grads) == 1:  # the other copy lives on the other end of the pipeline
        all_reduce_(total, mesh.embedding_group)
    for grad in grads:
        grad.copy_(total)


def embedding_copies(config: ModelConfig, pp: int) -> int:
    """How many (synchronised) copies of the embedding one pipeline holds: 2 when the last stage
    runs MTP."""
    return 2 if pp > 1 and mtp_enabled(config) else 1


# ----------------------------------------------------------------------------------- running a step
class ReducingEachMicroBatchStage(PipelineStage):
    """A `PipelineStage` whose FSDP2 module reduce-scatters every micro-batch's gradients during
    that micro-batch's backward, layer by layer, and reshards its parameters after it, as FSDP2 does
    outside a pipeline.

    The plain stage runs FSDP2 without gradient sync until the step's last backward: it accumulates
    unsharded FP32 gradients (4 B per local parameter) and keeps the gathered BF16 parameters (2 B)
    through the step, which a long-context stage with many layers per rank cannot afford. This one
    trades that memory for one reduce-scatter per micro-batch. Full backward only: zero-bubble
    schedules split it and keep parameters gathered anyway."""

    def backward_maybe_with_nosync(
        self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False
    ):
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        # The full backward PipelineStage itself runs (a torch internal, imported where it is
        # needed).
        from torch.distributed.pipelining._backward import stage_backward

        self.submod.set_requires_gradient_sync(True)
        self.submod.set_reshard_after_backward(True)
        grads = stage_backward(
            bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
        )
        # the units whose post-backward hooks did not fire (no input grad), then wait
        self.perform_reduce_grad(1)
        return grads, None


def make_pipeline_stages(
    chunks: Sequence[PipelineChunk],
    mesh: ParallelMesh,
    micro_batch: int,
    seq_len: int,
    activation_dtype: torch.dtype,
    reduce_each_micro_batch: bool = False,
) -> list[PipelineStage]:
    """`PipelineStage`s with static shapes for [micro_batch, seq_len] micro-batches
    (`ReducingEachMicroBatchStage`s with `reduce_each_micro_batch`).

    Static shapes, because runtime shape inference would run each stage's forward on uninitialised
    buffers (token ids out of range, routing counts polluted)."""
    stage_class = ReducingEachMicroBatchStage if reduce_each_micro_batch else PipelineStage
    stages = []
    for chunk in chunks:
        device = next(chunk.parameters()).device
        hidden = torch.empty(
            chunk.hidden_shape(micro_batch, seq_len),
            dtype=activation_dtype,
            device="meta",
            requires_grad=True,
        )
        inputs = (
            torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
            if chunk.spec.embedding
            else hidden
        )
        outputs = (
            torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
            if chunk.is_last
            else hidden
        )
        stages.append(
            stage_class(
                chunk,
                chunk.stage_index,
                chunk.num_stages,
                device,
                input_args=inputs,
                output_args=outputs,
                group=mesh.pp_group,
            )
        )
    return stages


def _stage_output_is_loss(output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return output


def build_pipeline_schedule(
    stages: Sequence[PipelineStage],
    mesh: ParallelMesh,
    n_microbatches: int,
    schedule_name: str,
    loss_fn: Callable[..., torch.Tensor] = _stage_output_is_loss,
) -> Any:
    """The torch.distributed.pipelining schedule `schedule_name` over this rank's `stages`.

    Gradients are not rescaled by the micro-batch count (`scale_grads=False`): the losses are
    already normalised by global counts. `loss_fn(stage_output, target)` defaults to returning the
    last stage's output, the loss."""
    dims = mesh.dims
    check_schedule(schedule_name, dims.pp, dims.vpp, n_microbatches)
    if len(stages) != dims.vpp:
        raise LayoutError(f"{len(stages)} stages on this rank but vpp={dims.vpp}.")
    kind = SCHEDULES[schedule_name]
    return kind.cls(
        list(stages) if kind.multi else stages[0],
        n_microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
