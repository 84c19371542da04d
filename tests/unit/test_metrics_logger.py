import json
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_exaone.training.metrics import MetricsLogger


def record(step: int) -> dict:
    return {
        "step": step,
        "loss": 1.0,
        "lm_loss": 1.0,
        "mtp_loss": 0.0,
        "aux_loss": 0.0,
        "grad_norm": 1.0,
        "lr": 1e-3,
        "tokens": 8 * step,
        "stage": 0,
        "tokens_per_s": 8.0,
        "step_tokens": 8,
    }


def test_a_resumed_run_appends_after_a_line_cut_short_by_a_kill(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, total_tokens=100)
    logger.log(record(1), "s")
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # the killed process's last write, cut short
    logger = MetricsLogger(tmp_path, enabled=True, total_tokens=100)
    logger.log(record(2), "s")
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert (
        len(lines) == 3 and json.loads(lines[0])["step"] == 1 and json.loads(lines[2]) == record(2)
    )


def test_console_line_shows_peak_memory_when_measured(tmp_path, caplog):
    logger = MetricsLogger(tmp_path, enabled=True, total_tokens=100)
    with caplog.at_level("INFO", logger="megatron_exaone.train"):
        logger.log({**record(1), "peak_memory_gib": 61.25, "gpu_memory_gib": 79.2}, "s")
        logger.log({**record(2), "peak_memory_gib": None, "gpu_memory_gib": None}, "s")
    logger.close()
    first, second = (r.getMessage() for r in caplog.records if r.getMessage().startswith("step"))
    assert "| memory 61.2 of 79 GiB |" in first and "memory" not in second


def eval_record(step: int) -> dict:
    return {
        "step": step,
        "tokens": 8 * step,
        "eval/sample/loss": 3.2,
        "eval/sample/ppl": 24.5,
        "eval/sample/bpb": None,
        "eval/niah/acc": 0.75,
        "eval/niah/acc/len_256": 0.8,
        "eval/time_s": 1.3,
    }


def test_tensorboard_events_hold_the_records_steps_and_values(tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [
        {**record(step), "loss": 4.0 / step, "expert_imbalance": {"layers.1": 1.0 + step / 3}}
        for step in (1, 2, 3)
    ]
    logger = MetricsLogger(tmp_path, enabled=True, total_tokens=100, tensorboard=True)
    for r in records:
        logger.log(r, "s")
    logger.log_eval(eval_record(3))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()  # while the run goes on: each record is flushed
    logger.close()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    def float32(value: float) -> float:
        return float(np.float32(value))

    assert scalars("train/loss") == [(r["step"], float32(r["loss"])) for r in records]
    assert scalars("expert_imbalance/layers.1") == [
        (r["step"], float32(r["expert_imbalance"]["layers.1"])) for r in records
    ]
    assert scalars("eval/sample/loss") == [(3, float32(3.2))]
    assert "eval/sample/bpb" not in events.Tags()["scalars"]  # None: not measured


def test_an_evaluation_is_one_json_line_and_one_console_line(tmp_path, caplog):
    MetricsLogger(tmp_path / "rank1", enabled=False, total_tokens=100).log_eval(eval_record(2))
    logger = MetricsLogger(tmp_path, enabled=True, total_tokens=100)
    logger.log(record(1), "s")
    with caplog.at_level("INFO", logger="megatron_exaone.train"):
        logger.log_eval({**eval_record(2), "tokens": 10240})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == {**eval_record(2), "tokens": 10240} and len(lines) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "eval at step 2 (10,240 tokens): sample loss 3.2000 ppl 24.50 bpb n/a | niah acc 0.750 "
        "| 1.3 s"
    ]
    assert not (tmp_path / "rank1").exists()


def wandb_records(path: Path) -> list:
    """The protobuf records of a short run's .wandb transaction log: a 7-byte header, then (in
    LevelDB's log format) chunks of a 4-byte checksum, a 2-byte length, a 1-byte type and data."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(b":W&B")
    records, pos = [], 7
    while pos < len(data):
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        assert kind == 1  # a whole record: only one that crosses a 32 KiB block comes in pieces
        records.append(Record.FromString(data[pos + 7 : pos + 7 + length]))
        pos += 7 + length
    return records


def test_wandb_records_the_config_and_metrics_only(tmp_path, monkeypatch):
    """What the README promises: no console output, package list, system metrics, machine or git
    metadata, or code; wandb records all of these by default."""
    wandb = pytest.importorskip("wandb", reason="the [wandb] extra")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # a training script that the user's W&B settings ask to save
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('training')\n")
    monkeypatch.setenv("WANDB_PROGRAM", "train.py")
    monkeypatch.setenv("WANDB_SAVE_CODE", "true")
    run_config = {"model": {"hidden_size": 64}, "trainer": {"max_steps": 2}}
    logger = MetricsLogger(
        tmp_path / "run",
        enabled=True,
        total_tokens=100,
        wandb_settings={"enabled": True, "project": "test", "mode": "offline"},
        run_config=run_config,
    )
    print("a line on the console")
    logger.log(record(1), "s")
    logger.close()
    wandb.teardown()  # finish() returns before wandb's service has written out the .wandb file
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    saved = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert not {p for p in saved if not p.startswith("logs/") and not p.endswith(".wandb")}
    records = wandb_records(next(run_dir.glob("*.wandb")))
    kinds = {r.WhichOneof("record_type") for r in records}
    assert not kinds & {"stats", "environment", "files", "output", "output_raw"}, kinds
    (run,) = (r.run for r in records if r.HasField("run"))
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert {k: config[k] for k in run_config} == run_config
    (history,) = (r.history for r in records if r.HasField("history"))
    logged = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in history.item}
    assert logged["loss"] == 1.0
