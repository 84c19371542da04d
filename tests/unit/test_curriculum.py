import pytest

from megatron_exaone.curriculum import Curriculum, CurriculumError, Gate, LRPhase, Stage


def two_stages():
    return Curriculum(
        [
            Stage(
                "pretrain",
                tokens=8 * 64 * 10,
                seq_len=64,
                global_batch_size=8,
                mixture={"web": 1.0},
                lr=LRPhase(
                    "wsd", peak_lr=1e-3, min_lr=1e-4, warmup_tokens=8 * 64 * 2, decay_fraction=0.0
                ),
            ),
            Stage(
                "long",
                tokens=4 * 128 * 5,
                seq_len=128,
                global_batch_size=4,
                mixture={"web": 0.5, "books": 0.5},
                lr=LRPhase("decay", peak_lr=1e-3, min_lr=1e-4),
                mtp_loss_weight=0.1,
            ),
        ]
    )


def test_plan_switches_stage_at_the_exact_token_count():
    cur = two_stages()
    tokens, plans = 0, []
    while not cur.is_finished(tokens):
        plan = cur.plan(tokens)
        plans.append(plan)
        tokens += plan.tokens
    assert [p.stage_index for p in plans] == [0] * 10 + [1] * 5
    assert tokens == cur.total_tokens == 8 * 64 * 10 + 4 * 128 * 5
    assert plans[9].ends_stage and not plans[8].ends_stage and plans[14].ends_stage
    assert plans[10].seq_len == 128 and plans[10].global_batch_size == 4
    assert plans[0].lr == pytest.approx(1e-3 / 2) and plans[1].lr == pytest.approx(1e-3)
    assert plans[10].lr == pytest.approx(1e-3 - 0.9e-3 / 5) and plans[14].lr == pytest.approx(1e-4)


def test_batch_ramp_and_budget_validation():
    stage = Stage(
        "ramp",
        tokens=0,
        seq_len=10,
        global_batch_size=8,
        batch_ramp_start=2,
        batch_ramp_increment=2,
        batch_ramp_tokens=120,
    )
    assert [stage.batch_at(t) for t in (0, 39, 40, 80, 119, 120)] == [2, 2, 4, 6, 6, 8]
    with pytest.raises(
        CurriculumError,
        match=r"tokens=1000 does not end on a step boundary.*tokens=960 or "
        r"tokens=1040",
    ):
        Curriculum([Stage("s", tokens=1000, seq_len=10, global_batch_size=8)])
    with pytest.raises(CurriculumError, match="does not split into data-parallel ranks"):
        Curriculum([Stage("s", tokens=60, seq_len=10, global_batch_size=6)], batch_multiple=4)
    with pytest.raises(CurriculumError, match="no stages"):
        Curriculum([])


@pytest.mark.parametrize("kind", ["wsd", "cosine", "constant", "decay"])
def test_lr_phases(kind):
    phase = LRPhase(
        kind,
        peak_lr=1.0,
        min_lr=0.1,
        warmup_tokens=10 if kind != "decay" else 0,
        decay_fraction=0.5,
    )
    values = [phase.lr_at(t, 100) for t in range(1, 101)]
    assert max(values) == pytest.approx(1.0, abs=0.01)  # a decay's first step is already 1% down
    assert values[-1] == (1.0 if kind == "constant" else pytest.approx(0.1))
    if kind != "decay":
        assert values[0] == pytest.approx(0.1)  # warmup: 1 of 10 tokens
    if kind == "wsd":
        assert values[49] == 1.0 and values[51] < 1.0


def test_tokens_after_steps_matches_stepping_through_the_plan():
    stages = [
        Stage("ramp", tokens=1536, seq_len=64, global_batch_size=6,
              batch_ramp_start=2, batch_ramp_increment=2, batch_ramp_tokens=64 * 4),
        Stage("flat", tokens=128 * 8 * 5, seq_len=128, global_batch_size=8),
    ]  # fmt: skip
    curriculum = Curriculum(stages, batch_multiple=2)
    tokens, expected = 0, [0]
    while not curriculum.is_finished(tokens):
        tokens += curriculum.plan(tokens).tokens
        expected.append(tokens)
    assert [curriculum.tokens_after_steps(n) for n in range(len(expected))] == expected
    assert curriculum.tokens_after_steps(len(expected) + 10) == curriculum.total_tokens
    assert curriculum.tokens_after_steps(None) == curriculum.total_tokens


def test_stage_gates_are_checked():
    gate = Gate(eval="niah", min=0.9, on_fail="stop")
    assert gate.metric == "eval/niah/acc"
    Curriculum([Stage("s", tokens=64, seq_len=64, global_batch_size=1, gates=[gate])])
    for bad, match in ((Gate(eval="mmlu"), "gate eval='mmlu'"), (Gate(on_fail="pause"), "on_fail")):
        with pytest.raises(CurriculumError, match=match):
            Curriculum([Stage("s", tokens=64, seq_len=64, global_batch_size=1, gates=[bad])])


def test_the_log_shows_the_shares_of_weights_that_do_not_sum_to_one():
    from megatron_exaone.training.trainer import _mixture_text

    assert _mixture_text({"web": 2, "code": 1}) == (
        "web 2, code 1 (weights sum to 3: sampled as web 0.667, code 0.333)"
    )
    assert _mixture_text({"web": 0.7, "code": 0.3}) == "web 0.7, code 0.3"
    assert _mixture_text({}) == "uniform"
