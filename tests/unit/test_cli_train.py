"""`exaone-train` with an invalid config: exit code 2 and one actionable line on stderr (no
traceback), before any process group or data preparation. The messages themselves are checked in
test_config_recipes.py."""

import pytest

from megatron_exaone.cli.train import main


@pytest.mark.parametrize(
    "world_size, overrides, expected",
    [
        (1, ["trainer.max_stepz=3"], "Did you mean 'trainer.max_steps'?"),  # unknown key
        # a 4-rank layout in one process
        (1, ["experiment=cpu_tiny"], "needs 4 processes and this is a single process"),
        (4, ["experiment=cpu_tiny", "parallel.tp=3"], "valid tp values: 1, 2"),  # impossible layout
        (
            4,
            ["experiment=cpu_tiny", "parallel.ep=1", "parallel.etp=2"],
            "expert tensor parallelism is not implemented",
        ),
        # budget not on a step boundary
        (1, ["curriculum.stages.1.tokens=10000"], "use tokens=9216 or tokens=10240"),
        (
            1,
            ["checkpoint.load=/nonexistent"],
            "checkpoint.load=/nonexistent: no usable checkpoint there",
        ),
    ],
)
def test_invalid_config_exits_2_with_one_actionable_line(
    tmp_path, monkeypatch, capsys, world_size, overrides, expected
):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    assert main([*overrides, f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exaone-train: ") and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing was written
