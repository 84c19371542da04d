"""One training step's forward and backward over this rank's model chunks (gradients accumulate in
`.grad`), with one loss normalisation and one metric reduction: through a pipeline schedule
(`PipelineRunner`, pp > 1) or, with one stage, by accumulating micro-batches (`AccumulationRunner`).
`step_runner` picks the one a layout needs.

Both split this rank's share of the global batch into micro-batches, divide every micro-batch's CE
by the valid labels of the whole global batch and weight its MoE aux loss by its share of the global
sequences, so the summed gradients equal the single-process model's on the global batch; both return
the step's global losses, the same on every rank. `sequence_losses` runs the same forward without
gradients, for evaluation.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from megatron_exaone.model.loss import IGNORE_INDEX, LossMetrics, LossScaling, total_loss
from megatron_exaone.model.model import default_position_ids
from megatron_exaone.model.moe import MoEBlock

from .comm import all_reduce_, recv_, send_
from .mesh import LayoutError, ParallelMesh
from .pipeline import (
    PipelineChunk,
    build_pipeline_schedule,
    check_schedule,
    local_stage_indices,
    make_pipeline_stages,
)


class StepRunner(abc.ABC):
    """What every step shares: the global counts, the micro-batch split and the metric reduction."""

    def __init__(
        self, chunks: Sequence[nn.Module], mesh: ParallelMesh, n_microbatches: int
    ) -> None:
        self.chunks = list(chunks)
        self.mesh = mesh
        self.n_microbatches = n_microbatches
        self.device = next(self.chunks[0].parameters()).device

    def step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        n_microbatches: int | None = None,
    ) -> dict[str, float]:
        """Run forward and backward for this rank's [batch, seq] share; returns the step's global
        losses (`loss`, `lm_loss`, `mtp_loss`, `aux_loss`). `n_microbatches` overrides the
        constructor's for this step (a growing global batch)."""
        if n_microbatches is not None:
            self._set_microbatches(n_microbatches)
        if input_ids.shape[0] % self.n_microbatches:
            raise ValueError(
                f"the local batch of {input_ids.shape[0]} sequences does not split into "
                f"{self.n_microbatches} equal micro-batches."
            )
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        self._forward_backward(input_ids, labels, position_ids, self._global_scaling(labels))
        return self._reduce_metrics()

    def _set_microbatches(self, n_microbatches: int) -> None:
        self.n_microbatches = n_microbatches

    @torch.no_grad()
    def sequence_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The summed next-token cross-entropy (nats) of each sequence of a global batch [N, S],
        which every rank passes whole (N a multiple of dp), through this layout's training forward
        without gradients: fp32 [N], the same on every rank.

        Data-parallel rank r computes rows [r N/dp, (r+1) N/dp), one sequence at a time, so every
        layout sums each sequence's tokens alike. The MTP head is skipped, and the MoE routing
        counts (the expert-bias update's) and the step's loss metrics are left as they were."""
        rows, dp = input_ids.shape[0], self.mesh.dims.dp
        if rows % dp:
            raise ValueError(f"{rows} sequences do not split over {dp} data-parallel ranks.")
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        local = rows // dp
        first = self.mesh.dp_rank * local
        sums = torch.zeros(rows, dtype=torch.float32, device=self.device)
        with _evaluating(self.chunks):
            for row in range(first, first + local):
                one = slice(row, row + 1)
                loss = self._forward_only(
                    input_ids[one].to(self.device),
                    labels[one].to(self.device),
                    position_ids[one].to(self.device),
                )
                if loss is not None:  # the last pipeline stage
                    sums[row] = loss.float()
        # context-parallel ranks hold parts of the same sequences; data-parallel ranks other rows
        all_reduce_(sums, self.mesh.pp_group)
        return all_reduce_(sums, self.mesh.dp_cp_group)

    @abc.abstractmethod
    def _forward_only(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """One sequence's summed CE on the rank that computes the loss, None elsewhere."""

    @abc.abstractmethod
    def _forward_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        scaling: LossScaling,
    ) -> None:
        """Each runner's own way through the micro-batches."""

    def _metrics(self) -> list[LossMetrics]:
        return [chunk.metrics for chunk in self.chunks]

    def _global_scaling(self, labels: torch.Tensor) -> LossScaling:
        # The ranks of a cp group hold the same whole sequences: count over dp only.
        valid = all_reduce_((labels != IGNORE_INDEX).sum().to(torch.float32), self.mesh.dp_group)
        # Every data-parallel rank holds the same number of sequences (context parallel splits
        # tokens, not them).
        return LossScaling(
            valid_tokens=valid.clamp(min=1), sequences=labels.shape[0] * self.mesh.dims.dp
        )

    def _reduce_metrics(self) -> dict[str, float]:
        """Sum the metrics over micro-batches, pipeline stages and data-parallel ranks; reset
        them."""
        values = torch.zeros(len(LossMetrics.NAMES), dtype=torch.float32, device=self.device)
        for metrics in self._metrics():
            values += torch.stack(
                [
                    torch.as_tensor(metrics.sums[n], dtype=torch.float32, device=self.device)
                    for n in LossMetrics.NAMES
                ]
            )
            metrics.reset()
        all_reduce_(values, self.mesh.pp_group)
        all_reduce_(values, self.mesh.dp_cp_group)
        metrics = dict(zip(LossMetrics.NAMES, values.tolist()))
        # every rank of a cp group computes its sequences' whole aux loss
        metrics["aux_loss"] /= self.mesh.dims.cp
        metrics["loss"] = total_loss(
            metrics["lm_loss"],
            metrics["mtp_loss"],
            metrics["aux_loss"],
            self.chunks[0].config.mtp_loss_weight,
        )
        return metrics


class AccumulationRunner(StepRunner):
    """One stage: each micro-batch's forward and backward in turn through the model. Under FSDP2 the
    gradients are reduce-scattered after the last micro-batch, or after each with
    `reduce_each_micro_batch`."""

    def __init__(
        self,
        model: nn.Module,
        mesh: ParallelMesh,
        n_microbatches: int,
        reduce_each_micro_batch: bool = False,
    ) -> None:
        super().__init__([model], mesh, n_microbatches)
        self.reduce_each_micro_batch = reduce_each_micro_batch
        self.metrics = LossMetrics()

    def _metrics(self) -> list[LossMetrics]:
        return [self.metrics]

    def _forward_only(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        (model,) = self.chunks
        out = model(
            input_ids,
            labels=labels,
            position_ids=position_ids,
            return_logits=False,
            loss_normalizer=1.0,
            aux_loss_scale=0.0,
        )
        return out.lm_loss

    def _forward_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        scaling: LossScaling,
    ) -> None:
        (model,) = self.chunks
        micro = input_ids.shape[0] // self.n_microbatches
        for first in range(0, input_ids.shape[0], micro):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(
                    first + micro == input_ids.shape[0] or self.reduce_each_micro_batch
                )
            part = slice(first, first + micro)
            out = model(
                input_ids[part],
                labels=labels[part],
                position_ids=position_ids[part],
                return_logits=False,
                loss_normalizer=scaling.valid_tokens,
                aux_loss_scale=micro / scaling.sequences,
            )
            out.loss.backward()
            for name in LossMetrics.NAMES:
                self.metrics.add(name, getattr(out, name))


class PipelineRunner(StepRunner):
    """The pipeline schedule over this rank's chunks; every rank of the pipeline passes the same
    batch. Schedules are built per micro-batch shape. `activation_dtype` is the dtype of the hidden
    states sent between stages (default: the parameters'; pass bfloat16 when FSDP2 computes in bf16
    over fp32 parameters). `reduce_each_micro_batch`: FSDP2 reduce-scatters every micro-batch's
    gradients (`ReducingEachMicroBatchStage`; not with zero-bubble schedules:
    `features.DataParallel` refuses the pair)."""

    def __init__(
        self,
        chunks: Sequence[PipelineChunk],
        mesh: ParallelMesh,
        schedule: str,
        n_microbatches: int,
        activation_dtype: torch.dtype | None = None,
        reduce_each_micro_batch: bool = False,
    ) -> None:
        dims = mesh.dims
        check_schedule(schedule, dims.pp, dims.vpp, n_microbatches)
        expected = local_stage_indices(schedule, mesh.pp_rank, dims.pp, dims.vpp)
        if [c.stage_index for c in chunks] != expected:
            raise LayoutError(
                f"{schedule} runs stages {expected} on pipeline rank {mesh.pp_rank}, but the "
                f"chunks are stages {[c.stage_index for c in chunks]}: build them for the same "
                "schedule."
            )
        super().__init__(chunks, mesh, n_microbatches)
        self.schedule = schedule
        self.reduce_each_micro_batch = reduce_each_micro_batch
        self.activation_dtype = activation_dtype or next(self.chunks[0].parameters()).dtype
        # (micro-batch, seq_len, count) -> schedule
        self._schedules: dict[tuple[int, int, int], Any] = {}

    def _set_microbatches(self, n_microbatches: int) -> None:
        if n_microbatches != self.n_microbatches:
            check_schedule(self.schedule, self.mesh.dims.pp, self.mesh.dims.vpp, n_microbatches)
        super()._set_microbatches(n_microbatches)

    def _forward_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        scaling: LossScaling,
    ) -> None:
        for chunk in self.chunks:
            chunk.loss_scaling = scaling
        batch, seq_len = input_ids.shape
        schedule = self._schedule_for(batch // self.n_microbatches, seq_len)
        first = self.chunks[0].spec.embedding
        last = any(c.is_last for c in self.chunks)
        schedule.step(
            *((input_ids,) if first else ()),
            target=labels if last else None,
            return_outputs=False,
            position_ids=position_ids,
            token_ids=input_ids,
            labels=labels,
        )

    def _forward_only(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """The stages in order, each on the rank that holds it: a pipeline with one sequence in
        flight (evaluation is a small share of the time; every schedule's stage placement works)."""
        dims, group = self.mesh.dims, self.mesh.pp_group
        owner = {
            stage: rank
            for rank in range(dims.pp)
            for stage in local_stage_indices(self.schedule, rank, dims.pp, dims.vpp)
        }
        mine = {chunk.stage_index: chunk for chunk in self.chunks}
        here, hidden, loss = self.mesh.pp_rank, None, None
        for stage in range(len(owner)):
            if stage not in mine:
                continue
            chunk = mine[stage]
            if stage == 0:
                x = input_ids
            elif owner[stage - 1] == here:
                x = hidden
            else:
                shape = chunk.hidden_shape(1, input_ids.shape[1])
                buffer = torch.empty(shape, dtype=self.activation_dtype, device=self.device)
                x = recv_(buffer, owner[stage - 1], group)
            out = chunk(x, position_ids=position_ids, token_ids=input_ids, labels=labels)
            if chunk.is_last:
                loss = out
            else:
                hidden = out.to(self.activation_dtype)
                if owner[stage + 1] != here:
                    send_(hidden, owner[stage + 1], group)
        return loss

    def _schedule_for(self, micro_batch: int, seq_len: int) -> Any:
        key = (micro_batch, seq_len, self.n_microbatches)
        if key not in self._schedules:
            stages = make_pipeline_stages(
                self.chunks,
                self.mesh,
                micro_batch,
                seq_len,
                self.activation_dtype,
                self.reduce_each_micro_batch,
            )
            self._schedules[key] = build_pipeline_schedule(
                stages, self.mesh, self.n_microbatches, self.schedule
            )
        return self._schedules[key]


@contextlib.contextmanager
def _evaluating(chunks: Sequence[nn.Module]) -> Iterator[None]:
    """The chunks set up for `sequence_losses` (losses as plain sums, no MTP, routing counts
    untouched), then restored; FSDP2 modules give back their gathered parameters after."""
    blocks = [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoEBlock)]
    counting = [block.count_routed_tokens for block in blocks]
    configs = [chunk.config for chunk in chunks]
    scalings = [getattr(chunk, "loss_scaling", None) for chunk in chunks]
    for block in blocks:
        block.count_routed_tokens = False
    for chunk in chunks:
        chunk.config = dataclasses.replace(chunk.config, mtp_loss_weight=0.0)
        if isinstance(chunk, PipelineChunk):
            chunk.loss_scaling = LossScaling(valid_tokens=1.0, sequences=1)
    try:
        yield
    finally:
        for block, count in zip(blocks, counting):
            block.count_routed_tokens = count
        for chunk, config, scaling in zip(chunks, configs, scalings):
            chunk.config = config
            if isinstance(chunk, PipelineChunk):
                chunk.loss_scaling = scaling
                chunk.metrics.reset()
            for module in chunk.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def step_runner(
    chunks: Sequence[nn.Module],
    mesh: ParallelMesh,
    schedule: str,
    n_microbatches: int,
    activation_dtype: torch.dtype | None = None,
    reduce_each_micro_batch: bool = False,
) -> StepRunner:
    """The step runner of a layout: the pipeline schedule when pp > 1, micro-batch accumulation
    otherwise."""
    if mesh.dims.pp > 1:
        return PipelineRunner(
            chunks, mesh, schedule, n_microbatches, activation_dtype, reduce_each_micro_batch
        )
    (model,) = chunks
    return AccumulationRunner(model, mesh, n_microbatches, reduce_each_micro_batch)
