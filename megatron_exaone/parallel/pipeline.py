"""Pipeline parallelism: the stage split, the stage modules ("chunks") and the schedules that run them.

The model is cut into pp * vpp virtual stages of units: `E` (embedding), one `t` per decoder layer, and `L` (final
norm, lm_head, MTP and the loss). `pipeline_layout` gives the split (balanced by default, or an explicit layout
string); `PipelineChunk` keeps only a stage's units under their full-model names, so `materialize`, the tensor and
expert parallel passes, checkpoints and the HF converter see the same names as for the single-process model.
Schedules come from `torch.distributed.pipelining`; `PipelineRunner` runs one training step over them.

Losses: every micro-batch's CE is divided by the valid-label count of the whole global batch (all micro-batches
and data-parallel ranks) and MoE aux losses are weighted by the micro-batch's share of the global sequences, so
the summed gradients equal those of the single-process model on the global batch (schedules run with
`scale_grads=False`). With MTP the last stage holds a copy of the embedding; `sync_embedding_grads` sums the two
copies' gradients so they stay identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)

from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig
from megatron_exaone.model.loss import IGNORE_INDEX
from megatron_exaone.model.model import AttentionInputs, default_position_ids
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.model.sequence_shard import SequenceShard

from .mesh import LayoutError, ParallelMesh
from .sharding import local_tensor
from .comm import all_reduce_

EMBEDDING_WEIGHT = "model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class StageSpec:
    """The units of one virtual stage: the embedding, decoder layers (full-model indices), the head + loss."""

    embedding: bool
    layers: tuple[int, ...]
    head: bool


def pipeline_layout(config: ModelConfig, pp: int, vpp: int = 1, layout: str | None = None) -> list[StageSpec]:
    """The units of each of the pp * vpp virtual stages, in the order the activations flow through them.

    Default (`layout=None`): contiguous layers, as even as possible, every stage >= 1 layer. The embedding and the
    head each count as about one layer, so the layers left over by the even split go to the middle stages first
    (the latest first: under 1F1B the early stages keep the most micro-batches in flight), then to the first stage.

    `layout` (in the spirit of Megatron's `--pipeline-model-parallel-layout`): `E` = embedding, `t` = one decoder
    layer, `L` = final norm + lm_head + MTP + loss, `|` separates virtual stages. `X*n` repeats a unit and
    `(...)*n` a group; whitespace is ignored. `E` opens the first stage, `L` closes the last, a stage may hold
    only `E` or only `L`, but none is empty. Examples for 4 layers: "Et|tt|tL", "E|t*4|L", "E(t|)*3tL".
    """
    stages = pp * vpp
    if layout is None:
        return _balanced_layout(config.num_hidden_layers, stages)
    return _parse_layout(layout, config.num_hidden_layers, pp, vpp)


def format_layout(specs: Sequence[StageSpec]) -> str:
    """The layout string of `specs` (inverse of `pipeline_layout(..., layout=...)`), e.g. for logs."""
    return "|".join("E" * s.embedding + "t" * len(s.layers) + "L" * s.head for s in specs)


def _balanced_layout(num_layers: int, stages: int) -> list[StageSpec]:
    if num_layers < stages:
        raise LayoutError(f"{stages} pipeline stages (pp*vpp) but the model has {num_layers} decoder layers: every "
                          "stage of the default layout holds at least one layer; use fewer stages or an explicit "
                          "layout.")
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    for i in (list(range(stages - 2, 0, -1)) + [0])[:extra]:  # extra < stages: the last stage never gets one
        counts[i] += 1
    return _specs_from_counts(counts)


def _specs_from_counts(counts: Sequence[int]) -> list[StageSpec]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    last = len(counts) - 1
    return [StageSpec(embedding=i == 0, layers=tuple(range(start, start + n)), head=i == last)
            for i, (start, n) in enumerate(zip(starts, counts))]


def _parse_layout(layout: str, num_layers: int, pp: int, vpp: int) -> list[StageSpec]:
    def fail(problem: str) -> LayoutError:
        return LayoutError(f"pipeline layout {layout!r}: {problem}")

    text = "".join(layout.split())
    expanded, end = _expand(text, 0, fail)
    if end < len(text):
        raise fail(f"unmatched ')' at position {end} (whitespace removed).")
    stages = expanded.split("|")
    if len(stages) != pp * vpp:
        raise fail(f"{len(stages)} stages but pp*vpp = {pp * vpp} (pp={pp}, vpp={vpp}); '|' separates stages.")
    for unit, name, where in (("E", "embedding", "open the first"), ("L", "head and loss", "close the last")):
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
    """Expand repetitions from `pos` up to an unmatched ')' or the end; returns (units, position reached)."""
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
            raise fail(f"unknown character {char!r} at position {pos} (whitespace removed); use E, t, L, |, "
                       "(, ) and *N.")
        count, pos = _repeat_count(text, pos, fail)
        parts.append(item * count)
    return "".join(parts), pos


def _repeat_count(text: str, pos: int, fail: Callable[[str], LayoutError]) -> tuple[int, int]:
    if pos == len(text) or text[pos] != "*":
        return 1, pos
    end = pos + 1
    while end < len(text) and text[end].isdigit():
        end += 1
    if end == pos + 1 or int(text[pos + 1:end]) < 1:
        raise fail(f"'*' at position {pos} (whitespace removed) must be followed by a count >= 1.")
    return int(text[pos + 1:end]), end


# ---------------------------------------------------------------------------------------------- schedules
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
    """Zero-bubble schedules run the weight-gradient half of the backward separately, so FSDP2 must keep
    parameters unsharded between forward and backward (reshard_after_forward=False)."""
    return schedule in SCHEDULES and SCHEDULES[schedule].v_shape


def _schedule_kind(name: str, pp: int, vpp: int) -> _ScheduleKind:
    """The schedule `name`, checked against pp and vpp (no process group needed)."""
    if name not in SCHEDULES:
        raise LayoutError(f"pipeline schedule {name!r} is unknown; choose one of {sorted(SCHEDULES)}.")
    if pp < 2:
        raise LayoutError(f"pipeline schedule {name!r} needs pp >= 2 (got pp={pp}).")
    if name == "1f1b" and vpp != 1:
        raise LayoutError(f"1f1b runs one stage per rank but vpp={vpp}: use interleaved_1f1b (or zbv/dualpipev "
                          "with vpp=2), or set vpp=1.")
    if name == "interleaved_1f1b" and vpp < 2:
        raise LayoutError("interleaved_1f1b needs vpp >= 2 virtual stages per rank; use 1f1b for vpp=1.")
    if SCHEDULES[name].v_shape and vpp != 2:
        raise LayoutError(f"{name} runs exactly two stages per rank (V shape): set vpp=2 (got vpp={vpp}).")
    return SCHEDULES[name]


def check_schedule(name: str, pp: int, vpp: int, n_microbatches: int) -> None:
    """Raise `LayoutError` if `name` cannot run pp x vpp stages on `n_microbatches` micro-batches."""
    _schedule_kind(name, pp, vpp)
    stages = pp * vpp
    if n_microbatches < 1:
        raise LayoutError(f"n_microbatches={n_microbatches} must be >= 1.")
    if name == "1f1b" and n_microbatches < pp:
        raise LayoutError(f"1f1b needs at least pp={pp} micro-batches, got {n_microbatches}.")
    rounds = max(1, n_microbatches // pp)
    if name == "interleaved_1f1b" and n_microbatches % rounds:
        raise LayoutError(f"interleaved_1f1b needs the micro-batch count to be a multiple of its rounds "
                          f"(max(1, n_microbatches // pp) = {rounds}); got {n_microbatches}: use a multiple of "
                          f"pp={pp} or fewer than {2 * pp}.")
    if name == "dualpipev" and n_microbatches < stages:
        raise LayoutError(f"dualpipev needs at least as many micro-batches as stages ({stages}), got "
                          f"{n_microbatches}.")


def local_stage_indices(schedule: str, pp_rank: int, pp: int, vpp: int) -> list[int]:
    """The virtual stages pipeline rank `pp_rank` runs, in torch.distributed.pipelining's order for `schedule`."""
    if _schedule_kind(schedule, pp, vpp).v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(vpp)]


# ---------------------------------------------------------------------------------------------- the stage module
@dataclass(frozen=True)
class LossScaling:
    """Per-step global counts: CE is divided by `valid_tokens` (labels != -100 in the whole global batch), a
    micro-batch's aux loss is weighted by its share of the `sequences` of the global batch."""

    valid_tokens: torch.Tensor
    sequences: int


class LossMetrics:
    """Detached loss terms summed over the micro-batches of a step (each already weighted by its share of the
    global batch, so the sums over micro-batches, stages and data-parallel ranks are the step's losses)."""

    NAMES = ("lm_loss", "mtp_loss", "aux_loss")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(self.NAMES, 0.0)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value.detach().float()


def mtp_enabled(config: ModelConfig) -> bool:
    """Whether the last stage runs MTP (and so holds a copy of the embedding)."""
    return config.num_nextn_predict_layers > 0 and config.mtp_loss_weight > 0


class PipelineChunk(nn.Module):
    """One virtual stage of `ExaoneMoeForCausalLM`, holding only its units under their full-model names
    (`model.embed_tokens`, `model.layers.<i>`, `model.norm`, `lm_head`, `mtp`).

    forward(x, *, position_ids, token_ids, labels): `x` is the input ids on the first stage, the hidden states
    elsewhere. The keyword inputs come whole to every stage (RoPE and document masks are rebuilt from
    `position_ids`; the last stage reads `token_ids` for MTP and `labels` for the loss). Returns the hidden states,
    or on the last stage the micro-batch loss lm + mtp_loss_weight * mtp normalised by `loss_scaling`.
    """

    def __init__(self, full: ExaoneMoeForCausalLM, spec: StageSpec, stage_index: int, num_stages: int,
                 sequence_shards: int = 1) -> None:
        super().__init__()
        if full.config.tie_word_embeddings:
            raise LayoutError("tie_word_embeddings with pipeline parallelism is not supported: the tied lm_head "
                              "would live on another stage than the embedding.")
        self.config = full.config
        self.spec = spec
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.sequence_shards = sequence_shards  # tokens of a sequence per rank: 1 / (cp * tp under SP)
        self.sequence_shard: SequenceShard | None = None  # set by the context-parallel pass
        self.runs_mtp = spec.head and mtp_enabled(full.config)
        self.model = nn.Module()
        if spec.embedding:
            self.model.embed_tokens = full.model.embed_tokens
        elif self.runs_mtp:  # a separate copy with the same name: same init, gradients summed with the first stage
            self.model.embed_tokens = copy.deepcopy(full.model.embed_tokens)
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in spec.layers})
        if spec.head:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
            self.mtp = full.mtp  # kept with mtp_loss_weight = 0 too, so checkpoints hold every weight
        self.loss_scaling: LossScaling | None = None
        self.metrics = LossMetrics()

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def hidden_shape(self, micro_batch: int, seq_len: int) -> tuple[int, int, int]:
        """Shape of the hidden states this stage receives or sends for a [micro_batch, seq_len] micro-batch."""
        return micro_batch, seq_len // self.sequence_shards, self.config.hidden_size

    def _scaling(self) -> LossScaling:
        if self.loss_scaling is None:
            raise RuntimeError("PipelineChunk.loss_scaling is not set: set the step's global counts first "
                               "(PipelineRunner.step does).")
        return self.loss_scaling

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, token_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        shard = self.sequence_shard
        if self.spec.embedding:
            hidden = self.model.embed_tokens(x if shard is None else shard.take(x))
        else:
            hidden = x
        attn = AttentionInputs(self.config, position_ids, hidden.dtype, shard)
        # MoE blocks attach their aux loss (times this micro-batch's share of the sequences) to their outputs'
        # backward, so it needs no path to the last stage; its value is only logged.
        aux_loss_scale = x.shape[0] / self._scaling().sequences
        for layer in self.model.layers.values():
            hidden = layer(hidden, attn.rope, attn.masks, aux_loss_scale)
        for block in self.model.layers.modules():
            if isinstance(block, MoEBlock) and block.last_aux_loss is not None:
                self.metrics.add("aux_loss", block.last_aux_loss)
        if not self.spec.head:
            return hidden
        if labels is None or (self.runs_mtp and token_ids is None):
            raise ValueError("the last pipeline stage needs labels (and token_ids for MTP) as keyword inputs.")
        return self._loss(self.model.norm(hidden), token_ids, labels, attn)

    def _loss(self, hidden: torch.Tensor, token_ids: torch.Tensor | None, labels: torch.Tensor,
              attn: AttentionInputs) -> torch.Tensor:
        """As `ExaoneMoeForCausalLM.forward` with `loss_normalizer` (the aux loss is already attached upstream)."""
        normalizer = self._scaling().valid_tokens
        loss = self.lm_head.loss(hidden, attn.take(labels), normalizer)
        self.metrics.add("lm_loss", loss)
        if self.runs_mtp:
            mtp_hidden = self.mtp(hidden, token_ids, self.model.embed_tokens, attn.rope, attn.masks, attn.take)
            mtp_loss = torch.stack([self.lm_head.loss(h, attn.take(shift_left(labels, depth + 1, fill=IGNORE_INDEX)),
                                                      normalizer) for depth, h in enumerate(mtp_hidden)]).mean()
            self.metrics.add("mtp_loss", mtp_loss)
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        return loss


@torch.no_grad()
def sync_embedding_grads(chunks: Sequence[nn.Module], mesh: ParallelMesh) -> None:
    """Sum the gradients of the first stage's embedding and the last stage's copy (for MTP), on both copies.

    Both copies on one rank (V-shaped schedules) are summed locally; otherwise over `mesh.embedding_group`. Call
    after backward, before or after the data-parallel reduction (the sum is linear; under FSDP2 both ends hold the
    same shard)."""
    pipeline = [c for c in chunks if isinstance(c, PipelineChunk)]
    if not pipeline or not mtp_enabled(pipeline[0].config):
        return
    copies = [dict(c.named_parameters())[EMBEDDING_WEIGHT] for c in pipeline if hasattr(c.model, "embed_tokens")]
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
    """How many (synchronised) copies of the embedding one pipeline holds: 2 when the last stage runs MTP."""
    return 2 if pp > 1 and mtp_enabled(config) else 1


# ---------------------------------------------------------------------------------------------- running a step
class ReducingEachMicroBatchStage(PipelineStage):
    """A `PipelineStage` whose FSDP2 module reduce-scatters every micro-batch's gradients during that micro-batch's
    backward, layer by layer, and reshards its parameters after it, as FSDP2 does outside a pipeline.

    The plain stage runs FSDP2 without gradient sync until the step's last backward: it accumulates unsharded FP32
    gradients (4 B per local parameter) and keeps the gathered BF16 parameters (2 B) through the step, which a
    long-context stage with many layers per rank cannot afford. This one trades that memory for one
    reduce-scatter per micro-batch. Full backward only: zero-bubble schedules split it and keep parameters
    gathered anyway."""

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        # The full backward PipelineStage itself runs (a torch internal, imported where it is needed).
        from torch.distributed.pipelining._backward import stage_backward

        self.submod.set_requires_gradient_sync(True)
        self.submod.set_reshard_after_backward(True)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        self.perform_reduce_grad(1)  # the units whose post-backward hooks did not fire (no input grad), then wait
        return grads, None


def make_pipeline_stages(chunks: Sequence[PipelineChunk], mesh: ParallelMesh, micro_batch: int, seq_len: int,
                         activation_dtype: torch.dtype, reduce_each_micro_batch: bool = False
                         ) -> list[PipelineStage]:
    """`PipelineStage`s with static shapes for [micro_batch, seq_len] micro-batches (`ReducingEachMicroBatchStage`s
    with `reduce_each_micro_batch`).

    Static shapes, because runtime shape inference would run each stage's forward on uninitialised buffers (token
    ids out of range, routing counts polluted)."""
    stage_class = ReducingEachMicroBatchStage if reduce_each_micro_batch else PipelineStage
    stages = []
    for chunk in chunks:
        device = next(chunk.parameters()).device
        hidden = torch.empty(chunk.hidden_shape(micro_batch, seq_len), dtype=activation_dtype, device="meta",
                             requires_grad=True)
        inputs = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta") if chunk.spec.embedding \
            else hidden
        outputs = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True) if chunk.is_last \
            else hidden
        stages.append(stage_class(chunk, chunk.stage_index, chunk.num_stages, device, input_args=inputs,
                                  output_args=outputs, group=mesh.pp_group))
    return stages


def _stage_output_is_loss(output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return output


def build_pipeline_schedule(stages: Sequence[PipelineStage], mesh: ParallelMesh, n_microbatches: int,
                            schedule_name: str, loss_fn: Callable[..., torch.Tensor] = _stage_output_is_loss) -> Any:
    """The torch.distributed.pipelining schedule `schedule_name` over this rank's `stages`.

    Gradients are not rescaled by the micro-batch count (`scale_grads=False`): the losses are already normalised by
    global counts. `loss_fn(stage_output, target)` defaults to returning the last stage's output, the loss."""
    dims = mesh.dims
    check_schedule(schedule_name, dims.pp, dims.vpp, n_microbatches)
    if len(stages) != dims.vpp:
        raise LayoutError(f"{len(stages)} stages on this rank but vpp={dims.vpp}.")
    kind = SCHEDULES[schedule_name]
    return kind.cls(list(stages) if kind.multi else stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Forward and backward of one training step over this rank's chunks (gradients accumulate in `.grad`).

    `step` splits this rank's share of the global batch into `n_microbatches`, sets the global counts on the chunks
    and runs the schedule; every rank of the pipeline passes the same batch. Schedules are built per micro-batch
    shape. `activation_dtype` is the dtype of the hidden states sent between stages (default: the parameters'; pass
    bfloat16 when FSDP2 computes in bf16 over fp32 parameters). `reduce_each_micro_batch`: FSDP2 reduce-scatters
    every micro-batch's gradients (`ReducingEachMicroBatchStage`; not with zero-bubble schedules).
    """

    def __init__(self, chunks: Sequence[PipelineChunk], mesh: ParallelMesh, schedule: str, n_microbatches: int,
                 activation_dtype: torch.dtype | None = None, reduce_each_micro_batch: bool = False) -> None:
        dims = mesh.dims
        check_schedule(schedule, dims.pp, dims.vpp, n_microbatches)
        if reduce_each_micro_batch and splits_weight_backward(schedule):
            raise LayoutError(f"reducing gradients each micro-batch needs a full backward per micro-batch; {schedule} "
                              "splits it (and keeps parameters gathered): use 1f1b or interleaved_1f1b.")
        self.reduce_each_micro_batch = reduce_each_micro_batch
        expected = local_stage_indices(schedule, mesh.pp_rank, dims.pp, dims.vpp)
        if [c.stage_index for c in chunks] != expected:
            raise LayoutError(f"{schedule} runs stages {expected} on pipeline rank {mesh.pp_rank}, but the chunks "
                              f"are stages {[c.stage_index for c in chunks]}: build them for the same schedule.")
        self.chunks = list(chunks)
        self.mesh = mesh
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        param = next(self.chunks[0].parameters())
        self.activation_dtype = activation_dtype or param.dtype
        self.device = param.device
        self._schedules: dict[tuple[int, int, int], Any] = {}  # (micro-batch, seq_len, count) -> schedule

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
             n_microbatches: int | None = None) -> dict[str, float]:
        """Run forward and backward for this rank's [batch, seq] share; returns the step's global losses
        (`loss`, `lm_loss`, `mtp_loss`, `aux_loss`), the same on every rank. `n_microbatches` overrides the
        constructor's for this step (a growing global batch)."""
        if n_microbatches is not None and n_microbatches != self.n_microbatches:
            check_schedule(self.schedule, self.mesh.dims.pp, self.mesh.dims.vpp, n_microbatches)
            self.n_microbatches = n_microbatches
        batch, seq_len = input_ids.shape
        if batch % self.n_microbatches:
            raise ValueError(f"the local batch of {batch} sequences does not split into {self.n_microbatches} "
                             "equal micro-batches.")
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        scaling = self._global_scaling(labels)
        for chunk in self.chunks:
            chunk.loss_scaling = scaling
        schedule = self._schedule_for(batch // self.n_microbatches, seq_len)
        first = self.chunks[0].spec.embedding
        last = any(c.is_last for c in self.chunks)
        schedule.step(*((input_ids,) if first else ()), target=labels if last else None, return_outputs=False,
                      position_ids=position_ids, token_ids=input_ids, labels=labels)
        return self._reduce_metrics()

    def _global_scaling(self, labels: torch.Tensor) -> LossScaling:
        valid = (labels != IGNORE_INDEX).sum().to(torch.float32)
        all_reduce_(valid, self.mesh.dp_group)  # the ranks of a cp group hold the same whole sequences
        # Every data-parallel rank holds the same number of sequences (context parallel splits tokens, not them).
        return LossScaling(valid_tokens=valid.clamp(min=1), sequences=labels.shape[0] * self.mesh.dims.dp)

    def _schedule_for(self, micro_batch: int, seq_len: int) -> Any:
        key = (micro_batch, seq_len, self.n_microbatches)
        if key not in self._schedules:
            stages = make_pipeline_stages(self.chunks, self.mesh, micro_batch, seq_len, self.activation_dtype,
                                          self.reduce_each_micro_batch)
            self._schedules[key] = build_pipeline_schedule(stages, self.mesh, self.n_microbatches, self.schedule)
        return self._schedules[key]

    def _reduce_metrics(self) -> dict[str, float]:
        """Sum the chunks' metrics over micro-batches, stages (pp) and data-parallel ranks; reset them."""
        values = torch.zeros(len(LossMetrics.NAMES), dtype=torch.float32, device=self.device)
        for chunk in self.chunks:
            values += torch.stack([torch.as_tensor(chunk.metrics.sums[n], dtype=torch.float32, device=self.device)
                                   for n in LossMetrics.NAMES])
            chunk.metrics.reset()
        all_reduce_(values, self.mesh.pp_group)
        all_reduce_(values, self.mesh.dp_cp_group)
        metrics = dict(zip(LossMetrics.NAMES, values.tolist()))
        metrics["aux_loss"] /= self.mesh.dims.cp  # every rank of a cp group computes its sequences' whole aux loss
        mtp_weight = self.chunks[0].config.mtp_loss_weight
        metrics["loss"] = metrics["lm_loss"] + mtp_weight * metrics["mtp_loss"] + metrics["aux_loss"]
        return metrics
