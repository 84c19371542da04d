"""`exaone-train`'s Hydra-style flags, run as a user runs the command (and, for the variations,
`parse_command_line` in this process): `--cfg` prints the composed config as YAML, `--info` the
composition, `--help` the recipe groups; each exits 0 without training, and a bad flag or override
is one line on stderr with exit 2."""

import re
import shutil

import pytest
import yaml

from megatron_exaone.cli.args import parse_command_line
from tests.commands import REPO, exaone_train


def printed(*args: str) -> str:
    done = exaone_train(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the flags answered by `parse_command_line`."""
    with pytest.raises(SystemExit) as exited:
        parse_command_line(list(args), "exaone-train", __doc__)
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def help_groups(text: str) -> dict[str, list[str]]:
    """The `== Configuration groups ==` block of --help: group -> its options as listed."""
    block = text.split("== Configuration groups ==")[1].split("== Overrides ==")[0]
    groups: dict[str, list[str]] = {}
    for line in block.splitlines():
        if not line.startswith("  "):  # the explanation
            continue
        if re.match(r"  \S", line):
            group, _, line = line.strip().partition(" ")
            groups[group] = []
        groups[group] += [o for o in re.split(r"[,\s]+", line) if o]
    return groups


def test_cfg_job_prints_the_composed_config_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = printed("experiment=cpu_tiny", "parallel.tp=2", f"run_dir={run_dir}", "--cfg", "job")
    config = yaml.safe_load(out)
    assert config["parallel"]["tp"] == 2 and config["parallel"]["pp"] == 2  # override, experiment
    assert config["run_dir"] == str(run_dir)
    assert "max_steps" in config["trainer"]  # a schema default no recipe sets
    assert "hydra" not in config
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "flags, has_job, has_hydra",
    [(["--cfg", "job", "--resolve"], True, False), (["--cfg=all"], True, True)],
)
def test_cfg_kinds(flags, has_job, has_hydra):
    config = yaml.safe_load(printed("experiment=cpu_tiny", *flags))
    check_cfg(config, flags, has_job, has_hydra)


def test_cfg_hydra_resolved(capsys):
    flags = ["-c", "hydra", "--resolve"]
    code, out, _ = in_process(capsys, "experiment=cpu_tiny", *flags)
    assert code == 0
    check_cfg(yaml.safe_load(out), flags, has_job=False, has_hydra=True)


def check_cfg(config: dict, flags: list[str], has_job: bool, has_hydra: bool) -> None:
    assert ("run_dir" in config) == has_job and ("hydra" in config) == has_hydra
    if has_hydra:
        assert config["hydra"]["runtime"]["choices"]["experiment"] == "cpu_tiny"
        # Hydra's run dir is an interpolation of the time until --resolve
        assert ("${now:" in config["hydra"]["run"]["dir"]) == ("--resolve" not in flags)


def test_package_prints_only_that_node():
    out = printed("experiment=cpu_tiny", "-p", "parallel", "--cfg", "job")
    assert out.startswith("# @package parallel\n")
    node = yaml.safe_load(out)
    assert node["tp"] == 2 and "run_dir" not in node


def test_info_names_the_recipes_and_the_choices():
    out = printed("experiment=cpu_tiny", "--info")
    assert f"file://{REPO / 'recipes'}" in out
    assert "experiment: cpu_tiny" in out and "parallel: cpu_4proc" in out  # the defaults tree
    assert "experiment/cpu_tiny" in out  # the defaults list
    assert "run_dir: runs/cpu_tiny" in out  # the config


def test_info_config_is_only_the_config(capsys):
    code, out, _ = in_process(capsys, "--info", "config")
    assert code == 0 and out.startswith("== Config ==\n") and "run_dir: runs/default" in out


def test_help_lists_the_recipe_groups():
    out = printed("--help")
    assert out.startswith("`exaone-train [HYDRA OVERRIDES...]`") and "--cfg" in out
    groups = help_groups(out)
    assert set(groups) == {
        "curriculum",
        "data",
        "experiment",
        "model",
        "optim",
        "parallel",
        "precision",
    }
    assert "cpu_tiny" in groups["experiment"]
    assert {"bf16*", "fp8_torch"} <= set(groups["precision"])  # bf16: config.yaml's default


def test_help_marks_the_choices_of_the_overrides(capsys):
    code, out, _ = in_process(capsys, "experiment=cpu_tiny", "-h")
    assert code == 0 and out.startswith(__doc__.strip())
    groups = help_groups(out)
    assert "cpu_tiny*" in groups["experiment"] and "cpu_4proc*" in groups["parallel"]


def test_help_lists_the_recipes_of_config_dir(tmp_path):
    recipes = shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    shutil.copy(recipes / "precision" / "bf16.yaml", recipes / "precision" / "mine.yaml")
    assert "mine" in help_groups(printed(f"--config-dir={recipes}", "--help"))["precision"]


def test_plain_overrides_and_config_dir_pass_through():
    argv = ["-cd", "a", "+model.x=1", "~run_dir", "--config-dir=b", "parallel.tp=2"]
    assert parse_command_line(argv, "exaone-train", "doc") == (
        ["+model.x=1", "~run_dir", "parallel.tp=2"],
        "b",
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["experiment=cpu_tiny", "--bogus"], "unknown option '--bogus'"),
        (["trainer.max_stepz=3", "--cfg", "job"], "Did you mean 'trainer.max_steps'?"),
    ],
)
def test_bad_flag_or_override_is_one_line_and_exit_2(args, expected):
    done = exaone_train(*args)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert_one_line(done.stderr, expected)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--cfg", "jobs"], "--cfg jobs: use one of job, hydra, all"),
        (["--cfg", "job", "-p", "nope"], "--package nope: no such node"),
        (["--resolve"], "--resolve and --package only go with --cfg"),
        (["--info", "--cfg"], "--cfg needs a value"),
        (["--info=tree"], "--info tree: use one of"),
    ],
)
def test_misused_flags_are_one_line_and_exit_2(capsys, args, expected):
    code, out, err = in_process(capsys, *args)
    assert (code, out) == (2, ""), err
    assert_one_line(err, expected)


def assert_one_line(err: str, expected: str) -> None:
    assert err.startswith("exaone-train: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
