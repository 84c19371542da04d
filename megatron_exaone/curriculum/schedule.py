"""The multi-stage curriculum: which data mixture, sequence length, batch size, learning rate and
loss weights apply at a given number of consumed tokens.

Stages are defined by token budgets. Every optimizer step consumes `global_batch_size * seq_len`
tokens of the stage it starts in, and a stage must end exactly on a step boundary (validated up
front, with the nearest budgets that would work), so transitions happen at exact token counts.
Everything is a pure function of the token count, so resuming from a checkpoint needs nothing but
that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_exaone.errors import UserError


class CurriculumError(UserError, ValueError):
    """A curriculum whose stages do not add up."""


@dataclass
class LRPhase:
    """Learning rate over one stage, as a function of the tokens consumed within the stage.

    kind: "wsd" (warmup, stable, then decay over the last `decay_fraction`), "cosine" (warmup, then
    cosine to `min_lr`), "constant" (warmup, then `peak_lr`), "decay" (from `peak_lr` to `min_lr`
    over the whole stage: the decay phase of a WSD run split across stages). `decay_shape`:
    "linear", "cosine" or "sqrt" (1 - sqrt).
    """

    kind: str = "wsd"
    peak_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_tokens: int = 0
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def validate(self, where: str) -> None:
        if self.kind not in ("wsd", "cosine", "constant", "decay"):
            raise CurriculumError(
                f"{where}: lr.kind={self.kind!r}; use wsd, cosine, constant or decay."
            )
        if self.decay_shape not in ("linear", "cosine", "sqrt"):
            raise CurriculumError(
                f"{where}: lr.decay_shape={self.decay_shape!r}; use linear, cosine or sqrt."
            )
        if not 0 <= self.decay_fraction <= 1:
            raise CurriculumError(
                f"{where}: lr.decay_fraction={self.decay_fraction} must be within [0, 1]."
            )
        if self.peak_lr <= 0 or self.min_lr < 0 or self.min_lr > self.peak_lr:
            raise CurriculumError(
                f"{where}: need 0 <= min_lr ({self.min_lr}) <= peak_lr ({self.peak_lr}), peak > 0."
            )

    def _decay(self, progress: float, shape: str) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if shape == "cosine":
            frac = 0.5 * (1 + math.cos(math.pi * progress))
        elif shape == "sqrt":
            frac = 1 - math.sqrt(progress)
        else:
            frac = 1 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * frac

    def lr_at(self, tokens: int, stage_tokens: int) -> float:
        """The LR of the step that brings the stage to `tokens` consumed tokens (so the first step
        of a warmup is not 0 and the last step of a decay reaches `min_lr`)."""
        if self.kind != "decay" and tokens < self.warmup_tokens:
            return self.peak_lr * tokens / self.warmup_tokens
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "decay":
            return self._decay(tokens / stage_tokens, self.decay_shape)
        if self.kind == "cosine":
            return self._decay(
                (tokens - self.warmup_tokens) / max(1, stage_tokens - self.warmup_tokens), "cosine"
            )
        decay_start = stage_tokens * (1 - self.decay_fraction)
        if tokens < decay_start:
            return self.peak_lr
        return self._decay(
            (tokens - decay_start) / max(1.0, stage_tokens - decay_start), self.decay_shape
        )


# What a stage gate can check: the evaluation and the metric it reads (`evaluation` reports it).
GATE_METRICS = {"niah": "eval/niah/acc"}
GATE_ACTIONS = ("stop", "warn")


@dataclass
class Gate:
    """A check when a stage ends: evaluation `eval` must score at least `min` at the stage's
    sequence length (`niah`: needle-in-a-haystack retrieval accuracy, `eval/niah/acc`), else
    `on_fail`: `stop` saves a checkpoint and ends the run, `warn` logs a warning and goes on. A
    relaunch after a stop checks the gate again before the next stage starts."""

    eval: str = "niah"
    min: float = 0.9
    on_fail: str = "stop"

    @property
    def metric(self) -> str:
        return GATE_METRICS[self.eval]

    def validate(self, where: str) -> None:
        if self.eval not in GATE_METRICS:
            raise CurriculumError(
                f"{where}: gate eval={self.eval!r}; use one of {', '.join(GATE_METRICS)}."
            )
        if self.on_fail not in GATE_ACTIONS:
            raise CurriculumError(
                f"{where}: gate on_fail={self.on_fail!r}; use one of {', '.join(GATE_ACTIONS)}."
            )


@dataclass
class Stage:
    """One curriculum stage. `batch_ramp_*`: the global batch grows from `batch_ramp_start` by
    `batch_ramp_increment` sequences every `batch_ramp_tokens / number of increments` tokens
    (Megatron's batch-size ramp-up), then stays at `global_batch_size`. `parallel`: layout overrides
    for this stage (e.g. more context parallelism at 256K); a change of layout ends the launch at
    the stage boundary for a resharding relaunch. `gates`: checks run when the stage ends (`Gate`),
    e.g. that long-context retrieval works before the next context extension."""

    name: str
    tokens: int
    seq_len: int
    global_batch_size: int
    mixture: dict[str, float] = field(default_factory=dict)
    lr: LRPhase = field(default_factory=LRPhase)
    mtp_loss_weight: float = 0.05
    aux_loss_coeff: float = 1e-4
    bias_update_rate: float = 1e-4
    batch_ramp_start: int | None = None
    batch_ramp_increment: int = 0
    batch_ramp_tokens: int = 0
    checkpoint_at_end: bool = True
    gates: list[Gate] = field(default_factory=list)
    parallel: dict[str, Any] = field(default_factory=dict)

    def batch_at(self, tokens: int) -> int:
        """Global batch size (sequences) for a step starting `tokens` into the stage."""
        if self.batch_ramp_start is None or tokens >= self.batch_ramp_tokens:
            return self.global_batch_size
        increments = max(
            1, (self.global_batch_size - self.batch_ramp_start) // max(1, self.batch_ramp_increment)
        )
        done = int(tokens // (self.batch_ramp_tokens / increments))
        return min(self.global_batch_size, self.batch_ramp_start + done * self.batch_ramp_increment)


@dataclass(frozen=True)
class StepPlan:
    """Everything a training step needs from the curriculum."""

    stage_index: int
    stage: Stage
    tokens_into_stage: int
    global_batch_size: int
    seq_len: int
    lr: float

    @property
    def tokens(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def ends_stage(self) -> bool:
        return self.tokens_into_stage + self.tokens == self.stage.tokens


class Curriculum:
    """A validated list of stages. `plan(tokens_consumed)` gives the next step's plan."""

    def __init__(self, stages: list[Stage], batch_multiple: int = 1) -> None:
        if not stages:
            raise CurriculumError("the curriculum has no stages; define at least one.")
        self.stages = stages
        self.starts = [0]
        for i, stage in enumerate(stages):
            self._validate(i, stage, batch_multiple)
            self.starts.append(self.starts[-1] + stage.tokens)

    @property
    def total_tokens(self) -> int:
        return self.starts[-1]

    def _validate(self, i: int, stage: Stage, batch_multiple: int) -> None:
        where = f"curriculum stage {i} ({stage.name!r})"
        if stage.tokens <= 0 or stage.seq_len <= 0 or stage.global_batch_size <= 0:
            raise CurriculumError(
                f"{where}: tokens, seq_len and global_batch_size must be positive."
            )
        stage.lr.validate(where)
        for gate in stage.gates:
            gate.validate(where)
        for value in (stage.global_batch_size, stage.batch_ramp_start or batch_multiple):
            if value % batch_multiple:
                raise CurriculumError(
                    f"{where}: a global batch of {value} sequences does not split into "
                    f"data-parallel ranks x micro-batch = {batch_multiple}."
                )
        if stage.batch_ramp_start is not None and stage.batch_ramp_increment % batch_multiple:
            raise CurriculumError(
                f"{where}: batch_ramp_increment={stage.batch_ramp_increment} is not a multiple "
                f"of {batch_multiple}."
            )
        weights = [w for w in stage.mixture.values()]
        if weights and (min(weights) < 0 or sum(weights) <= 0):
            raise CurriculumError(
                f"{where}: mixture weights must be non-negative with a positive sum."
            )
        consumed, last_step = 0, 0
        while consumed < stage.tokens:
            last_step = stage.batch_at(consumed) * stage.seq_len
            consumed += last_step
        if consumed != stage.tokens:
            raise CurriculumError(
                f"{where}: tokens={stage.tokens} does not end on a step boundary (steps of "
                f"{stage.global_batch_size} sequences x {stage.seq_len} tokens = {last_step} "
                f"tokens); use tokens={consumed - last_step} or tokens={consumed}."
            )

    def stage_index_at(self, tokens_consumed: int) -> int:
        if tokens_consumed >= self.total_tokens:
            raise CurriculumError(
                f"all {self.total_tokens} curriculum tokens are consumed (at {tokens_consumed})."
            )
        for i in range(len(self.stages)):
            if tokens_consumed < self.starts[i + 1]:
                return i
        raise AssertionError("unreachable")

    def plan(self, tokens_consumed: int) -> StepPlan:
        i = self.stage_index_at(tokens_consumed)
        stage = self.stages[i]
        into = tokens_consumed - self.starts[i]
        batch = stage.batch_at(into)
        return StepPlan(
            stage_index=i,
            stage=stage,
            tokens_into_stage=into,
            global_batch_size=batch,
            seq_len=stage.seq_len,
            lr=stage.lr.lr_at(into + batch * stage.seq_len, stage.tokens),
        )

    def tokens_after_steps(self, steps: int | None) -> int:
        """The tokens consumed by the first `steps` optimizer steps (the whole curriculum when None
        or more steps than it has)."""
        if steps is None:
            return self.total_tokens
        tokens = 0
        for stage in self.stages:
            into = 0
            while into < stage.tokens and steps > 0:
                step_tokens = stage.batch_at(into) * stage.seq_len
                # past a batch ramp every step is the same size: jump
                ramp_done = stage.batch_ramp_start is None or into >= stage.batch_ramp_tokens
                count = min(steps, (stage.tokens - into) // step_tokens) if ramp_done else 1
                into, steps = into + count * step_tokens, steps - count
            tokens += into
        return tokens

    def is_finished(self, tokens_consumed: int) -> bool:
        return tokens_consumed >= self.total_tokens
