import json

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
