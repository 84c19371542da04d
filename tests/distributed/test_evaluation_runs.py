"""Evaluation in the training loop and in exaone-eval: the same numbers on every layout and after a
resume, the dashboards a run writes (TensorBoard events read back with TensorBoard's own reader,
the plots), and a stage gate that stops the run, is checked again on relaunch, and warns.

Runs go through the exaone-train code (`cli.train.main` in a forked process) on the cpu_tiny model
and the sample corpus, with a tenth of its documents held out for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_exaone.cli.eval import evaluate
from megatron_exaone.cli.plot import plot_run
from megatron_exaone.cli.train import prepare
from megatron_exaone.parallel.testing import run_distributed
from tests.passkey import write_corpora
from tests.runs import by_step, checkpoint_steps, overrides, records, train

EVAL = ["+eval.holdout.sample=0.1", "eval.tokens=512", "eval.interval=2"]
# results of one checkpoint on another layout: fp32 sums in another order
LAYOUT_RTOL = 1e-5
METRICS = ("eval/sample/loss", "eval/sample/ppl", "eval/sample/bpb")


def eval_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "eval/sample/loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data) -> Path:
    """4 steps on one process, evaluated every 2, checkpoints every 2, TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("trained")
    train(
        overrides(
            run_dir, sample_data, *EVAL, "trainer.max_steps=4", "checkpoint.interval=2",
            "checkpoint.keep_last=0", "tensorboard.enabled=true",
        ),
        stderr=run_dir / "console.log",
    )  # fmt: skip
    return run_dir


def test_the_console_names_the_run_directory_and_counts_the_eta_to_max_steps(trained):
    lines = (trained / "console.log").read_text().splitlines()
    assert any(line.endswith(f"run directory: {trained}") for line in lines)
    steps = [line for line in lines if " | ETA " in line]
    # 4 of the curriculum's 30 steps: the last step of this launch has nothing left
    assert len(steps) == 4 and steps[-1].endswith("ETA 0:00:00")
    assert any("eval at step 2 (1,024 tokens): sample loss" in line for line in lines)


def test_the_loop_evaluates_at_its_interval(trained):
    evals = eval_records(trained)
    assert sorted(evals) == [2, 4]  # the end of training (step 4) is not evaluated twice
    for record in evals.values():
        assert record["eval/sample/ppl"] == pytest.approx(2.718281828 ** record["eval/sample/loss"])
        # bits per byte: nats per token * tokens / (ln 2 * bytes); about 3 bytes per token
        assert 0.25 < record["eval/sample/bpb"] / record["eval/sample/loss"] < 0.75
        assert record["eval/time_s"] > 0
    assert evals[4]["eval/sample/loss"] < evals[2]["eval/sample/loss"]


def _evaluate_rank(rank: int, world: int, argv: list[str]) -> dict:
    return evaluate(*prepare(argv, None, world))


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (1, ["parallel=single"]),
        (2, ["parallel=single"]),  # data parallel: the rows split over 2 ranks
        (2, ["parallel=single", "parallel.pp=2"]),
        (2, ["parallel=cpu_tp2"]),
        (2, ["parallel=single", "parallel.cp=2"]),
        (4, ["parallel=cpu_4proc"]),  # tp2 x pp2, experts over ep2
    ],
    ids=["1proc", "dp2", "pp2", "tp2-sp", "cp2", "tp2-pp2-ep2"],
)
def test_exaone_eval_equals_the_loop_on_every_layout(trained, sample_data, world, layout):
    argv = overrides(trained, sample_data, *EVAL, f"checkpoint.load={trained}/checkpoints")
    results = run_distributed(_evaluate_rank, world, argv + layout, timeout_s=120)
    loop = eval_records(trained)[4]
    for result in results:  # every rank returns the same record
        assert result["checkpoint"].endswith("step_00000004") and result["tokens"] == 2048
        for key in METRICS:
            assert result[key] == pytest.approx(loop[key], rel=LAYOUT_RTOL), key


def test_a_resumed_run_evaluates_as_the_uninterrupted_one(trained, sample_data, tmp_path):
    argv = overrides(tmp_path, sample_data, *EVAL, "checkpoint.interval=2")
    train([*argv, "trainer.max_steps=2"])
    train([*argv, "trainer.max_steps=4"])
    assert checkpoint_steps(tmp_path)[-1] == 4
    resumed, uninterrupted = eval_records(tmp_path), eval_records(trained)
    assert sorted(resumed) == [2, 4]
    for step in (2, 4):
        for key in METRICS:
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6), key


def test_tensorboard_holds_the_metrics(trained):
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    steps = by_step(trained)
    train_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert train_loss == pytest.approx({s: r["loss"] for s, r in steps.items()}, rel=1e-6)
    eval_loss = {e.step: e.value for e in events.Scalars("eval/sample/loss")}
    evals = eval_records(trained)
    assert eval_loss == pytest.approx({s: r["eval/sample/loss"] for s, r in evals.items()})


def test_the_run_plots(trained):
    written = {path.name for path in plot_run(trained)}
    assert {"loss.png", "lr.png", "eval.png", "expert_imbalance.png"} <= written
    assert all((trained / "plots" / name).stat().st_size > 10_000 for name in written)


# ------------------------------------------------------------------------------------------ gates
def _stages(on_fail: str, second_stage: bool = False) -> str:
    gate = f"gates:[{{eval:niah,min:0.9,on_fail:{on_fail}}}]"
    stages = [
        f"{{name:ctx,tokens:2048,seq_len:128,global_batch_size:8,mixture:{{sample:1.0}},{gate}}}"
    ]
    if second_stage:
        stages.append(
            "{name:more,tokens:1024,seq_len:128,global_batch_size:8,mixture:{sample:1.0}}"
        )
    return "curriculum.stages=[" + ",".join(stages) + "]"


NIAH = ["eval.niah.lengths=[1.0]", "eval.niah.depths=[0.0,1.0]", "eval.niah.key_digits=3"]


def test_an_untrained_model_fails_its_gate_and_a_relaunch_checks_it_again(sample_data, tmp_path):
    argv = overrides(tmp_path, sample_data, *NIAH, _stages("stop", second_stage=True))
    stderr = tmp_path / "stderr.txt"
    train(argv, expect=2, stderr=stderr)
    message = stderr.read_text().strip().splitlines()[-1]
    assert message.startswith("exaone-train: stage 0 (ctx) failed its gate: eval/niah/acc = 0.")
    assert "below the minimum 0.9" in message and "Relaunching checks the gate again" in message
    # the stage's 2 steps, then its checkpoint; not a launch that asks to be requeued
    assert checkpoint_steps(tmp_path) == [2] and not (tmp_path / "launch_status.json").exists()
    niah = [r for r in records(tmp_path) if "eval/niah/acc" in r]
    assert len(niah) == 1 and niah[0]["eval/niah/acc"] < 0.9
    assert {"eval/niah/acc/len_128", "eval/niah/acc/depth_0", "eval/niah/acc/depth_100"} <= set(
        niah[0]
    )

    train(argv, expect=2, stderr=stderr)  # the same command: the gate fails again, nothing trains
    assert stderr.read_text().strip().splitlines()[-1] == message
    assert max(by_step(tmp_path)) == 2

    # the stage's gate turned into a warning: the relaunch goes on into the next stage
    train(overrides(tmp_path, sample_data, *NIAH, _stages("warn", second_stage=True)))
    assert max(by_step(tmp_path)) == 3
    status = json.loads((tmp_path / "launch_status.json").read_text())
    assert status["reason"] == "curriculum finished"


def test_the_gate_passes_once_the_model_has_learnt_to_fetch_a_pass_key(sample_data, tmp_path):
    """The tiny model trained for 700 steps (of 4 x 64 tokens) on pass-key text passes the gate it
    failed untrained (above): accuracy 1.0 here, against 0.9 after 500-600 steps."""
    from data_tools.tokenize_corpus import TokenizeConfig, tokenize

    tokenizer = next(o.split("=", 1)[1] for o in sample_data if o.startswith("data.tokenizer="))
    shards = {}
    for path in write_corpora(tmp_path, documents=4000):
        shards[path.stem] = str(tmp_path / path.stem)
        tokenize(TokenizeConfig([str(path)], tokenizer, shards[path.stem], workers=1))
    stage = (
        "{name:passkey,tokens:179200,seq_len:64,global_batch_size:4,mixture:{passkey:1.0},"
        "lr:{kind:constant,peak_lr:1.5e-3,min_lr:0.0,warmup_tokens:2560},"
        "gates:[{eval:niah,min:0.9,on_fail:stop}]}"
    )
    run_dir = tmp_path / "run"
    argv = overrides(
        run_dir, sample_data, "~data.datasets.sample", "data.packing=best_fit",
        f"+data.datasets.passkey=[{shards['passkey']}]",
        f"+eval.datasets.filler=[{shards['filler']}]",
        f"curriculum.stages=[{stage}]", "eval.niah.dataset=filler", "eval.niah.lengths=[1.0]",
        "eval.niah.trials=4", "eval.niah.key_digits=1", "checkpoint.interval=0",
        "trainer.log_interval=100",
    )  # fmt: skip
    train(argv, timeout=600)
    (niah,) = [r for r in records(run_dir) if "eval/niah/acc" in r]
    assert niah["step"] == 700 and niah["eval/niah/acc"] >= 0.9, niah
    assert json.loads((run_dir / "launch_status.json").read_text())["reason"] == (
        "curriculum finished"
    )
    # exaone-eval on a pipeline of two ranks finds the same
    results = run_distributed(
        _evaluate_rank, 2, [*argv, "parallel.pp=2", "eval.niah.enabled=true"], timeout_s=120
    )
    assert results[0]["eval/niah/acc"] == niah["eval/niah/acc"]
