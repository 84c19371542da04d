"""`exaone-plot RUN_DIR`: the figures of a run's metrics.jsonl, from a file as a crashed and resumed
two-stage run leaves it; one-line errors (exit 2) for what cannot be plotted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from megatron_exaone.cli.plot import FIGURES, main, read_metrics, stage_boundaries
from megatron_exaone.errors import DEBUG_ENV

LAYERS = ("model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp")


def step_record(step: int, timeline: int, moe: bool = True, skipped: bool = False) -> dict:
    stage = 0 if step <= 10 else 1
    loss = 9.0 - 0.2 * step + timeline  # the timeline shows in the value: which record was kept
    return {
        "step": step,
        "loss": float("nan") if skipped else loss,
        "lm_loss": loss - 0.4,
        "mtp_loss": loss - 0.5,
        "aux_loss": 3e-4 if moe else 0.0,
        "grad_norm": float("inf") if skipped else 0.7,
        "lr": 1e-3 * min(1.0, step / 4),
        "tokens": 512 * step,
        "stage": stage,
        "stage_name": ("short", "long")[stage],
        "seq_len": 64 * (stage + 1),
        "global_batch_size": 8,
        "tokens_per_s": 600.0 + step,
        "step_tokens": 512,
        "mfu": 0.3 if moe else None,
        "skipped": skipped,
        "skipped_steps": int(skipped),
        "expert_imbalance_max": None if skipped or not moe else 1.4,
        "expert_imbalance": {} if skipped or not moe else {n: 1.2 + 0.01 * step for n in LAYERS},
        "peak_memory_gib": None,
        "gpu_memory_gib": None,
    }


def eval_record(step: int, timeline: int) -> dict:
    return {
        "step": step,
        "tokens": 512 * step,
        "eval/web/loss": 3.2 + timeline,
        "eval/web/ppl": 24.5,
        "eval/web/bpb": 1.1,
        "eval/code/loss": 2.9,
        "eval/code/ppl": 18.2,
        "eval/code/bpb": None,  # no tokenizer known
        "eval/niah/acc": 0.75,
        "eval/niah/acc/len_256": 0.8,
        "eval/time_s": 1.3,
    }


def write_run(run: Path, moe: bool = True, evals: bool = True) -> Path:
    """Logged every 2 steps, stage "long" from step 11, evals every 10 steps. The first launch gets
    to step 16 (step 15 is skipped and logged) and dies mid-line; the relaunch resumes from the
    step-6 checkpoint, runs to step 20 and dies mid-line too."""
    lines = []
    for step in (2, 4, 6, 8, 10, 12, 14, 15, 16):
        lines.append(json.dumps(step_record(step, 0, moe, skipped=step == 15)))
        if evals and step == 10:
            lines.append(json.dumps(eval_record(step, 0)))
    lines.append('{"step": 18, "loss": 5.4, "lm_lo')  # the logger starts a fresh line after it
    for step in range(8, 21, 2):
        lines.append(json.dumps(step_record(step, 1, moe)))
        if evals and step % 10 == 0:
            lines.append(json.dumps(eval_record(step, 1)))
    run.mkdir(parents=True)
    path = run / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 22, "loss": 5.0, "lm')
    return path


@pytest.fixture(autouse=True)
def _no_tracebacks(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def test_reading_keeps_the_resumed_timeline(tmp_path):
    metrics = read_metrics(write_run(tmp_path / "run"))
    steps = {r["step"]: r for r in metrics.steps}
    assert list(steps) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # 15: the abandoned timeline's
    assert steps[6]["loss"] == step_record(6, 0)["loss"]  # before the checkpoint: first launch
    assert steps[8]["loss"] == step_record(8, 1)["loss"]  # repeated after the resume: the last
    assert [(r["step"], r["eval/web/loss"]) for r in metrics.evals] == [(10, 4.2), (20, 4.2)]
    assert metrics.ignored_lines == [11, 21]  # the two records cut short by a kill
    assert stage_boundaries(metrics.steps) == [(10.5, "long")]


def test_evals_of_one_step_merge(tmp_path):
    path = tmp_path / "metrics.jsonl"
    gate_recheck = {"step": 10, "tokens": 5120, "eval/niah/acc": 1.0, "eval/time_s": 0.4}
    records = [step_record(10, 0), eval_record(10, 0), gate_recheck]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (merged,) = read_metrics(path).evals
    assert merged == {**eval_record(10, 0), **gate_recheck}  # the stage-end loss is kept


def test_plots_every_figure_of_a_moe_run(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main([str(run)]) == 0
    out, err = capsys.readouterr()
    names = [name for name, _, _ in FIGURES]
    assert out.splitlines() == [f"wrote {run / 'plots' / name}" for name in names]
    assert "ignored line 11 of" in err and "ignored line 21 of" in err
    for name in names:
        image = imread(run / "plots" / name)
        assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 0.01, name
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(names)  # no temp files


def test_command_skips_figures_without_data(tmp_path):
    run, out = tmp_path / "dense", tmp_path / "figures"
    write_run(run, moe=False, evals=False)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_exaone.cli.plot", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "skipped eval.png: no eval records with a loss, bpb or NIAH accuracy" in lines
    assert any(line.startswith("skipped expert_imbalance.png:") for line in lines)
    written = ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert imread(out / "throughput.png").shape[0] > 200  # no MFU panel, still drawn


def test_malformed_middle_line_is_an_error_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    path = write_run(run)
    lines = path.read_text().split("\n")
    lines[2] = '{"step": 6, "loss": oops}'  # damaged, not cut short: closed
    path.write_text("\n".join(lines))
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"exaone-plot: {path}:3: not a metrics record (invalid JSON")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "plots").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such run directory"),
        ("", "no metrics.jsonl"),
        (json.dumps(eval_record(10, 0)) + "\n", "no training step records"),
        (
            '{"loss": 3.0}\n' + json.dumps(step_record(2, 0)),
            ':1: not a metrics record (no integer "step")',
        ),
    ],
)
def test_unplottable_run_exits_2_with_one_line(tmp_path, capsys, content, expected):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        if content:
            (run / "metrics.jsonl").write_text(content)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exaone-plot: ") and expected in err and err.count("\n") == 1, err


def test_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_run(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main([str(run)]) == 2
    assert "pip install 'megatron-exaone[plot]'" in capsys.readouterr().err
