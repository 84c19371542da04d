"""launch/slurm.sbatch on a real single-node Slurm cluster (munge, slurmctld, slurmd started here;
.ci/run installs Debian's slurm-wlm and munge): a job trains experiment=cpu_tiny on 2 tasks (gloo)
to the end; a second job is preempted twice, once by `scancel --signal=USR1` and once by a time
limit that reaches the script's --signal lead time. Each time the ranks save a checkpoint and exit
0, the script requeues the job, and the requeued job resumes: its losses equal the uninterrupted
job's step for step. launch/tokenize.sbatch tokenizes the sample corpus as an array job of 3 shards
and merges them in a dependent job into the bytes of one unsharded run.

The cluster is one node with cons_tres, proctrack/linuxproc and munge authentication, with a requeue
delay of 5 s (cred_expire) instead of 120 s and a 2 s scheduler interval, so the module runs in a
few minutes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.sample_corpus import files
from tests.commands import exaone_data
from tests.runs import by_step, free_port, records

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None,
    reason="Slurm is not installed (.ci/run installs slurm-wlm and munge)",
)
# cpu_tiny's two stages, longer (80 + 40 steps), so a time-limit signal (slurmctld checks about
# every 10 s) comes while the job still trains.
STEPS = 120
CURRICULUM = ["curriculum.stages.0.tokens=40960", "curriculum.stages.1.tokens=40960"]
CONF = """\
ClusterName=megatron-exaone-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/spool/ctld
SlurmdSpoolDir={dir}/spool/d
SlurmctldPidFile={dir}/ctld.pid
SlurmdPidFile={dir}/d.pid
SlurmctldLogFile={dir}/log/ctld.log
SlurmdLogFile={dir}/log/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
AuthType=auth/munge
AuthInfo=cred_expire=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def run(*argv: str, env: dict, check: bool = True) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def wait_until(condition, what: str, timeout: float = 180):
    """Poll `condition` (a hang guard of `timeout` s, not a measurement); its first true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged --force"], check=True)
    wait_until(
        lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged", 30
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """A running one-node cluster; the environment its client commands need (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons of a test cluster run as root")
    start_munge()
    directory = tmp_path_factory.mktemp("slurm")
    for sub in ("spool/ctld", "spool/d", "log"):
        (directory / sub).mkdir(parents=True)
    host = socket.gethostname()
    conf = directory / "slurm.conf"
    conf.write_text(
        CONF.format(
            host=host,
            dir=directory,
            ctld_port=free_port(),
            d_port=free_port(),
            cpus=max(2, os.cpu_count() or 2),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf), "PYTHON": sys.executable}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        wait_until(
            lambda: "idle" in run("sinfo", "-h", "-o", "%T", env=env, check=False),
            "the node to be idle",
            60,
        )
        yield env
    finally:
        run("scancel", "--user=root", env=env, check=False)
        for pid_file in ("d.pid", "ctld.pid"):
            if (directory / pid_file).is_file():
                subprocess.run(["kill", (directory / pid_file).read_text().strip()], check=False)


def job(job_id: str, env: dict) -> dict[str, str]:
    text = run("scontrol", "show", "job", job_id, env=env)
    return dict(re.findall(r"(\w+)=(\S+)", text))


def seconds(duration: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, clock = duration.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def submit(env: dict, run_dir: Path, sample_data: list[str]) -> str:
    """launch/slurm.sbatch with experiment=cpu_tiny on 2 tasks of one node (gloo); the job id."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # the job's output file goes there
    overrides = [
        "experiment=cpu_tiny",
        "parallel=single",
        f"run_dir={run_dir}",
        "trainer.device=cpu",
        "checkpoint.interval=0",
        *CURRICULUM,
        *sample_data,
    ]
    return run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={run_dir.parent}/slurm-%j.out",
        f"--chdir={ROOT}",
        "--job-name=exaone-test",
        str(ROOT / "launch" / "slurm.sbatch"),
        *overrides,
        env=env,
    )


def finished(job_id: str, env: dict) -> dict[str, str]:
    return wait_until(
        lambda: (
            (info := job(job_id, env))["JobState"]
            in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
            and info
        ),
        f"job {job_id} to end",
        timeout=300,
    )


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir)]
    return max(steps) if steps else 0


def requeued(job_id: str, env: dict, times: int) -> None:
    wait_until(
        lambda: int(job(job_id, env)["Restarts"]) >= times,
        f"job {job_id} to be requeued {times} time(s)",
    )


def test_a_job_trains_and_a_preempted_job_requeues_and_resumes_exactly(
    slurm, tmp_path, sample_data
):
    env = slurm
    reference_dir, preempted_dir = tmp_path / "reference" / "run", tmp_path / "preempted" / "run"
    reference = submit(env, reference_dir, sample_data)
    info = finished(reference, env)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info,
        _output(reference_dir),
    )
    expected = by_step(reference_dir)
    assert sorted(expected) == list(range(1, STEPS + 1)) and int(info["Restarts"]) == 0

    preempted = submit(env, preempted_dir, sample_data)
    # 1. A preemption by hand: SIGUSR1 to every process of the job's step.
    wait_until(lambda: last_step(preempted_dir) >= 3, "the job to train")
    run("scancel", "--signal=USR1", preempted, env=env)
    requeued(preempted, env, 1)
    first_stop = last_step(preempted_dir)
    # 2. The time limit comes within the script's --signal=USR1@120 lead time: Slurm sends SIGUSR1
    #    itself.
    wait_until(
        lambda: (
            last_step(preempted_dir) >= first_stop + 3
            and job(preempted, env)["JobState"] == "RUNNING"
        ),
        "the requeued job to train",
    )
    elapsed = seconds(job(preempted, env)["RunTime"])
    # < 120 s left
    run("scontrol", "update", f"JobId={preempted}", f"TimeLimit={elapsed // 60 + 2}", env=env)
    requeued(preempted, env, 2)
    # the last run goes to the end
    run("scontrol", "update", f"JobId={preempted}", "TimeLimit=10", env=env)
    info = finished(preempted, env)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info,
        _output(preempted_dir),
    )

    log = _output(preempted_dir)
    assert log.count("requeueing job") == 2 and "received SIGUSR1" in log
    steps = [r["step"] for r in records(preempted_dir)]
    # each stop saved its step: nothing was lost or repeated
    assert steps == list(range(1, STEPS + 1)), steps
    metrics = by_step(preempted_dir)
    for step in expected:
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "tokens", "lr"):
            assert metrics[step][key] == expected[step][key], (step, key)


def test_a_tokenize_array_job_and_its_merge_write_the_bytes_of_one_run(
    slurm, tmp_path, tokenizers_dir
):
    """launch/tokenize.sbatch submits 3 array tasks, one shard each, and the merge after them."""
    env = slurm
    tokenizer = tokenizers_dir["superbpe-default"]
    common = ["--input", *map(str, files()), "--tokenizer", str(tokenizer), "--no-progress"]
    single = exaone_data("tokenize", *common, "--output-prefix", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    # submitted from tmp_path: the script's logs/ folder goes there
    submitted = subprocess.run(
        [str(ROOT / "launch" / "tokenize.sbatch"), f"--chdir={ROOT}", "--cpus-per-task=1"]
        + ["--time=10", f"--output={tmp_path}/%x-%j.out", "--", *common, "--num-shards", "3"]
        + ["--output-prefix", str(tmp_path / "out" / "web")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    [merge] = re.findall(r"merge job (\d+)", submitted.stdout)
    info = wait_until(
        lambda: (
            (
                (info := job(merge, env))["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                or info["Reason"] == "DependencyNeverSatisfied"
            )
            and info
        ),
        f"merge job {merge} to end",
    )
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, logs)
    for ext in ("bin", "idx"):
        assert (tmp_path / "out" / f"web.{ext}").read_bytes() == (
            tmp_path / f"single.{ext}"
        ).read_bytes()
    assert [p.name for p in sorted((tmp_path / "out").glob("*.stats.json"))] == [
        f"web-0000{i}-of-00003.stats.json" for i in range(3)
    ] + ["web.stats.json"]
    assert logs.count("wrote ") == 4, logs


def _output(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.parent.glob("slurm-*.out")))
