"""Stage gates: the checks a curriculum stage declares (`curriculum.Gate`) against an evaluation
record."""

from __future__ import annotations

from megatron_exaone.curriculum import Gate, Stage


def gate_failures(
    stage_index: int, stage: Stage, record: dict[str, float | None]
) -> list[tuple[Gate, str]]:
    """The gates of `stage` that `record` does not meet, each with a one-line message naming the
    stage, the metric, its value and the minimum."""
    failures = []
    for gate in stage.gates:
        value = record.get(gate.metric)
        if value is not None and value >= gate.min:
            continue
        shown = "not measured" if value is None else f"{value:.3f}"
        failures.append(
            (
                gate,
                f"stage {stage_index} ({stage.name}) failed its gate: {gate.metric} = {shown}, "
                f"below the minimum {gate.min:g}",
            )
        )
    return failures
