"""The long fault campaign: exaone-train killed, stopped, corrupted and starved of disk many times
over, each time compared with the uninterrupted run. The fast version of each fault is a test
(tests/distributed/test_faults.py, tests/distributed/test_slurm.py); this script repeats them at
random moments, saves included.

    python tools/fault_campaign.py [--kills 40] [--signals 10] [--launcher-kills 5]
                                   [--corruptions 5] [--disk-full 3] [--seed 0] [--work DIR]

Faults, all through the public commands (`python -m megatron_exaone.cli.train`, launch/local.sh):
- kills: SIGKILL of a one-process run at a random moment (a third of them while a checkpoint is
  being written); relaunched until done, the losses must equal the uninterrupted run's at every
  step.
- signals: SIGTERM, SIGINT or SIGUSR1 at a random moment: exit 0, the newest checkpoint of the step
  it stopped at.
- launcher kills: SIGKILL of launch/local.sh (2 ranks): no rank may survive it; the relaunch resumes
  exactly.
- corruptions: bytes overwritten, a file truncated or deleted in the newest checkpoint: the relaunch
  must detect it and resume from the previous checkpoint, exactly.
- disk full (root only): checkpoints on a small tmpfs: the run must stop with one line and leave the
  previous checkpoint intact; moved to a larger disk, the run resumes exactly.

Prints one line of counts, e.g. `kills=40 resumed_exact=40 ... corrupt_detected=5/5`, and exits 1 on
any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.sample_data import prepare_sample_data  # noqa: E402
from megatron_exaone.checkpoint.store import checkpoint_dirs, checksum_problems  # noqa: E402
from megatron_exaone.lifetime import child_pids  # noqa: E402

STEPS = 30  # cpu_tiny: stages of 20 and 10 steps
KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens")


class Campaign:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        tokenizer, prefix = prepare_sample_data(work / "data", 4096)
        self.data = [
            "data.prepare_sample=false",
            f"data.datasets.sample=[{prefix}]",
            f"data.tokenizer={tokenizer}",
        ]
        self.runs = 0

    # -------------------------------------------------------------------------------------- helpers
    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAILED: {what}", flush=True)

    def new_run_dir(self, kind: str) -> Path:
        self.runs += 1
        return self.work / f"{kind}-{self.runs:03d}"

    def argv(self, run_dir: Path, *extra: str) -> list[str]:
        return [
            "experiment=cpu_tiny",
            "parallel=single",
            f"run_dir={run_dir}",
            "trainer.device=cpu",
            "wandb.enabled=false",
            "checkpoint.keep_last=3",
            *self.data,
            *extra,
        ]

    def start(self, run_dir: Path, *extra: str, ranks: int = 1) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir.parent / f"{run_dir.name}.log").open("a")
        if ranks == 1:
            command = [
                sys.executable,
                "-m",
                "megatron_exaone.cli.train",
                *self.argv(run_dir, *extra),
            ]
        else:
            command = [str(ROOT / "launch" / "local.sh"), str(ranks), *self.argv(run_dir, *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )

    def train(self, run_dir: Path, *extra: str, ranks: int = 1) -> int:
        process = self.start(run_dir, *extra, ranks=ranks)
        return process.wait(600)

    @staticmethod
    def metrics(run_dir: Path) -> dict[int, dict]:
        out = {}
        path = run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[record["step"]] = record
        return out

    def exact(self, run_dir: Path, reference: dict[int, dict]) -> bool:
        got = self.metrics(run_dir)
        return sorted(got) == sorted(reference) and all(
            got[s][k] == reference[s][k] for s in got for k in KEYS
        )

    def run_to_end(self, run_dir: Path, *extra: str, ranks: int = 1) -> bool:
        for _ in range(3):
            if self.train(run_dir, *extra, ranks=ranks) == 0 and self.finished(run_dir):
                return True
        return False

    @staticmethod
    def finished(run_dir: Path) -> bool:
        status = run_dir / "launch_status.json"
        return status.is_file() and not json.loads(status.read_text())["resume"]

    def wait_step(self, process: subprocess.Popen, run_dir: Path, step: int) -> bool:
        while process.poll() is None:
            if max(self.metrics(run_dir), default=0) >= step:
                return True
            time.sleep(0.01)
        return False

    @staticmethod
    def saving(run_dir: Path, since: float) -> bool:
        """Is a checkpoint being written (a temporary folder newer than `since`; a killed save
        leaves one)?"""
        return any(p.stat().st_mtime > since for p in (run_dir / "checkpoints").glob(".step_*.tmp"))

    # --------------------------------------------------------------------------------------- faults
    def reference(self, ranks: int) -> dict[int, dict]:
        run_dir = self.new_run_dir(f"reference{ranks}")
        if self.train(run_dir, "checkpoint.interval=2", ranks=ranks) != 0:
            raise SystemExit(f"the uninterrupted run failed: see {run_dir}.log")
        return self.metrics(run_dir)

    def kills(self, n: int, reference: dict[int, dict]) -> None:
        """SIGKILL after 1-4 new steps of a launch, or (a third of the time) while its first
        checkpoint is being written; a launch that would reach the end first runs to the end, and
        the next run starts."""
        run_dir, done = self.new_run_dir("kills"), 0
        while done < n:
            resumed = max((step for step, _ in checkpoint_dirs(run_dir / "checkpoints")), default=0)
            logged, steps = self.logged(run_dir), self.rng.randint(1, 4)
            started = time.time()
            process = self.start(run_dir, "checkpoint.interval=1")
            during_save = self.rng.random() < 1 / 3
            if resumed + steps >= STEPS:
                process.wait(600)
            elif during_save:
                while process.poll() is None and not self.saving(run_dir, started):
                    time.sleep(0.002)
            else:
                while process.poll() is None and self.logged(run_dir) < logged + steps:
                    time.sleep(0.01)
                time.sleep(self.rng.uniform(0, 0.3))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                done += 1
                self.count("kills")
                self.count("kills_during_save", during_save)
            if self.finished(run_dir):
                self.check_exact(run_dir, reference, "kills")
                run_dir = self.new_run_dir("kills")
        if self.run_to_end(run_dir, "checkpoint.interval=1"):
            self.check_exact(run_dir, reference, "kills")

    @staticmethod
    def logged(run_dir: Path) -> int:
        """How many complete step records the run has logged (a resumed run logs repeated steps
        again)."""
        path = run_dir / "metrics.jsonl"
        return path.read_text().count("\n") if path.is_file() else 0

    def check_exact(self, run_dir: Path, reference: dict[int, dict], kind: str) -> None:
        if self.exact(run_dir, reference):
            self.count(f"{kind}_runs_exact")
        else:
            self.fail(f"{run_dir}: losses differ from the uninterrupted run")

    def signals(self, n: int, reference: dict[int, dict]) -> None:
        for _ in range(n):
            run_dir = self.new_run_dir("signal")
            sig = self.rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
            process = self.start(run_dir, "checkpoint.interval=0")
            self.wait_step(process, run_dir, self.rng.randint(1, STEPS - 5))
            process.send_signal(sig)
            code = process.wait(120)
            stopped = max(self.metrics(run_dir), default=0)
            saved = [step for step, _ in checkpoint_dirs(run_dir / "checkpoints")]
            if code != 0 or not saved or saved[-1] != stopped:  # (a stage end before it saves too)
                self.fail(
                    f"{run_dir}: {sig.name} gave exit {code}, checkpoints {saved}, last step "
                    f"{stopped}"
                )
                continue
            self.count("signals_saved")
            if self.run_to_end(run_dir, "checkpoint.interval=0"):
                self.check_exact(run_dir, reference, "signals")

    def launcher_kills(self, n: int, reference: dict[int, dict]) -> None:
        for _ in range(n):
            run_dir = self.new_run_dir("launcher")
            process = self.start(run_dir, "checkpoint.interval=1", ranks=2)
            self.wait_step(process, run_dir, self.rng.randint(2, STEPS - 5))
            ranks = child_pids(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
                time.sleep(0.05)
            survivors = [pid for pid in ranks if _alive(pid)]
            self.count("launcher_kills")
            self.count("orphans", len(survivors))
            for pid in survivors:
                os.kill(pid, signal.SIGKILL)
            if self.run_to_end(run_dir, "checkpoint.interval=1", ranks=2):
                self.check_exact(run_dir, reference, "launcher")

    def corruptions(self, n: int, reference: dict[int, dict]) -> None:
        source = self.new_run_dir("corrupt-source")
        self.train(
            source, "checkpoint.interval=2", "checkpoint.keep_last=0", "trainer.max_steps=12"
        )
        for i in range(n):
            run_dir = self.new_run_dir("corrupt")
            shutil.copytree(source / "checkpoints", run_dir / "checkpoints")
            newest = checkpoint_dirs(run_dir / "checkpoints")[-1][1]
            damage = ["overwrite", "truncate", "delete"][i % 3]
            victim = self.rng.choice(sorted(p for p in newest.iterdir() if p.name != "meta.json"))
            _damage(victim, damage, self.rng)
            detected = bool(checksum_problems(newest))
            if self.run_to_end(run_dir, "checkpoint.interval=2") and detected:
                metrics = self.metrics(run_dir)
                resumed_from = min(metrics) - 1
                if resumed_from < 12 and all(
                    metrics[s][k] == reference[s][k] for s in metrics for k in KEYS
                ):
                    self.count("corrupt_detected")
                    continue
            self.fail(f"{run_dir}: {damage} of {victim.name} was not detected and recovered from")
        self.count("corruptions", n)

    def disk_full(self, n: int, reference: dict[int, dict]) -> None:
        if os.geteuid() != 0:
            print("disk full: skipped (mounting a tmpfs needs root)")
            return
        for _ in range(n):
            run_dir = self.new_run_dir("diskfull")
            mount = run_dir / "checkpoints"
            mount.mkdir(parents=True)
            size = self.rng.randint(12, 30) << 20  # 1-2 checkpoints of about 10 MB fit
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True
            )
            try:
                code = self.train(run_dir, "checkpoint.interval=2", "checkpoint.keep_last=0")
                log = (run_dir.parent / f"{run_dir.name}.log").read_text()
                kept = checkpoint_dirs(mount)
                intact = kept and not checksum_problems(kept[-1][1])
                clean = not list(mount.glob(".step_*"))
                if (
                    code == 2
                    and "no space left on the device" in log
                    and "Traceback" not in log
                    and intact
                    and clean
                ):
                    self.count("disk_full_handled")
                else:
                    self.fail(
                        f"{run_dir}: a full disk gave exit {code} (intact {bool(intact)}, clean "
                        f"{clean})"
                    )
                    continue
                saved = run_dir / "saved"
                shutil.copytree(mount, saved)
            finally:
                subprocess.run(["umount", str(mount)], check=True)
            shutil.rmtree(mount)
            saved.rename(mount)
            if self.run_to_end(run_dir, "checkpoint.interval=2", "checkpoint.keep_last=0"):
                self.check_exact(run_dir, reference, "disk_full")
        self.count("disk_full", n)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _damage(path: Path, how: str, rng: random.Random) -> None:
    size = path.stat().st_size
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, rng.randint(0, max(0, size - 1)))
    else:
        length = min(size, 200_000)
        with open(path, "r+b") as f:
            f.seek(rng.randint(0, size - length))
            f.write(os.urandom(length))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--signals", type=int, default=10)
    parser.add_argument("--launcher-kills", type=int, default=5)
    parser.add_argument("--corruptions", type=int, default=5)
    parser.add_argument("--disk-full", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, help="working directory (default: a temporary one, removed after)"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    start = time.monotonic()
    campaign = Campaign(work, args.seed)
    one, two = campaign.reference(1), campaign.reference(2)
    for name, fn, n, reference in (
        ("kills", campaign.kills, args.kills, one),
        ("signals", campaign.signals, args.signals, one),
        ("launcher kills", campaign.launcher_kills, args.launcher_kills, two),
        ("corruptions", campaign.corruptions, args.corruptions, one),
        ("disk full", campaign.disk_full, args.disk_full, one),
    ):
        if n:
            print(f"{name}: {n} ...", flush=True)
            fn(n, reference)
    c = campaign.counts
    print(
        f"kills={c.get('kills', 0)} (during a save: {c.get('kills_during_save', 0)}) "
        f"runs_resumed_exact={c.get('kills_runs_exact', 0)} "
        f"signals_saved={c.get('signals_saved', 0)}/{args.signals} "
        f"signal_runs_exact={c.get('signals_runs_exact', 0)} "
        f"launcher_kills={c.get('launcher_kills', 0)} orphans={c.get('orphans', 0)} "
        f"launcher_runs_exact={c.get('launcher_runs_exact', 0)} "
        f"corrupt_detected={c.get('corrupt_detected', 0)}/{c.get('corruptions', 0)} "
        f"disk_full_handled={c.get('disk_full_handled', 0)}/{c.get('disk_full', 0)} "
        f"disk_full_runs_exact={c.get('disk_full_runs_exact', 0)} "
        f"failures={len(campaign.failures)} ({time.monotonic() - start:.0f} s)"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
