"""A curriculum stage's schedule against Megatron-Core (the `megatron-core` package, in the [dev]
extra), counting its steps in tokens.

Learning rate: `OptimizerParamScheduler`, for every kind of phase and decay shape, with warmup.
Megatron sets the LR for the next iteration after each step (its first iteration runs at num_steps
0); `LRPhase.lr_at(tokens)` is the LR of the step that brings the stage to `tokens`, so step k here
is Megatron's LR after k steps. Batch ramp-up: `RampupBatchsizeNumMicroBatchesCalculator`
(Megatron-LM's --rampup-batch-size), the global batch of each step from the samples consumed
before it."""

from __future__ import annotations

import pytest
import torch

from megatron_exaone.curriculum.schedule import Curriculum, LRPhase, Stage

scheduler = pytest.importorskip("megatron.core.optimizer_param_scheduler")
microbatches = pytest.importorskip("megatron.core.num_microbatches_calculator")

STEP_TOKENS, STEPS, WARMUP_TOKENS = 64, 50, 5 * 64
STAGE_TOKENS = STEP_TOKENS * STEPS
PEAK, MIN = 3e-4, 3e-5
# Megatron's names for the WSD decay shapes
WSD_STYLES = {"linear": "linear", "cosine": "cosine", "sqrt": "minus_sqrt"}


def megatron_lrs(warmup: int, style: str, wsd_style: str | None = None, wsd_tokens: int = 0):
    """Megatron's LR after each of STEPS steps of STEP_TOKENS."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    lr_scheduler = scheduler.OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=PEAK, min_lr=MIN, lr_warmup_steps=warmup,
        lr_decay_steps=STAGE_TOKENS, lr_decay_style=style, start_wd=0.0, end_wd=0.0,
        wd_incr_steps=STAGE_TOKENS, wd_incr_style="constant", wsd_decay_steps=wsd_tokens or None,
        lr_wsd_decay_style=wsd_style,
    )  # fmt: skip
    lrs = []
    for _ in range(STEPS):
        lr_scheduler.step(STEP_TOKENS)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def ours(phase: LRPhase) -> list[float]:
    return [phase.lr_at(STEP_TOKENS * k, STAGE_TOKENS) for k in range(1, STEPS + 1)]


@pytest.mark.parametrize("shape", sorted(WSD_STYLES))
def test_wsd_matches_megatron_core(shape):
    phase = LRPhase("wsd", PEAK, MIN, WARMUP_TOKENS, decay_fraction=0.2, decay_shape=shape)
    decay_tokens = STAGE_TOKENS // 5
    want = megatron_lrs(WARMUP_TOKENS, "WSD", WSD_STYLES[shape], decay_tokens)
    assert ours(phase) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind,style", [("cosine", "cosine"), ("constant", "constant")])
def test_warmup_then_cosine_or_constant_matches_megatron_core(kind, style):
    phase = LRPhase(kind, PEAK, MIN, WARMUP_TOKENS)
    assert ours(phase) == pytest.approx(megatron_lrs(WARMUP_TOKENS, style), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("shape", sorted(WSD_STYLES))
def test_a_decay_stage_matches_megatron_cores_decay_over_the_whole_stage(shape):
    """`decay`: a WSD run's decay phase given a stage of its own (no warmup); Megatron's WSD with
    the whole schedule as its decay."""
    phase = LRPhase("decay", PEAK, MIN, decay_shape=shape)
    want = megatron_lrs(0, "WSD", WSD_STYLES[shape], STAGE_TOKENS)
    assert ours(phase) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "start,increment,ramp_sequences",
    [(2, 2, 16), (2, 2, 13), (4, 4, 40)],
    ids=["whole_increments", "fractional_increments", "one_increment"],
)
def test_batch_ramp_matches_megatron_core(start, increment, ramp_sequences):
    seq_len, batch, steps = 16, 8, 20
    theirs = microbatches.RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=batch, micro_batch_size=1, data_parallel_size=1,
        decrease_batch_size_if_needed=False, rank=0, start_global_batch_size=start,
        batch_size_increment=increment, ramup_samples=ramp_sequences,
    )  # fmt: skip
    want, samples = [], 0
    for _ in range(steps):
        theirs.update(samples, consistency_check=True)
        want.append(theirs.get_current_global_batch_size())
        samples += want[-1]
    stage = Stage(
        "ramp", tokens=samples * seq_len, seq_len=seq_len, global_batch_size=batch,
        batch_ramp_start=start, batch_ramp_increment=increment,
        batch_ramp_tokens=ramp_sequences * seq_len,
    )  # fmt: skip
    curriculum, tokens, got = Curriculum([stage]), 0, []
    while not curriculum.is_finished(tokens):
        got.append(curriculum.plan(tokens).global_batch_size)
        tokens += got[-1] * seq_len
    assert got == want
    assert want[0] == start and want[-1] == batch
