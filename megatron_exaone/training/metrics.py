"""Where a step's and an evaluation's numbers go: the console (a line a person can read),
run_dir/metrics.jsonl (one JSON object per logged optimizer step or evaluation) and, optionally,
TensorBoard event files in run_dir/tensorboard and Weights & Biases (offline unless an API key is
configured). Rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("megatron_exaone.train")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool,
        total_tokens: int,
        wandb_settings: dict | None = None,
        run_config: dict | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.enabled = enabled
        self.total_tokens = total_tokens
        self.start = time.perf_counter()
        self.start_tokens: int | None = None
        self.file = None
        self.wandb = None
        self.tensorboard = None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        # a process killed mid-line: start a fresh line
        if self.file.tell() and not _ends_with_newline(path):
            self.file.write("\n")
        if wandb_settings and wandb_settings.get("enabled"):
            self.wandb = _start_wandb(wandb_settings, run_config or {}, Path(run_dir))
        if tensorboard:
            self.tensorboard = _start_tensorboard(Path(run_dir) / "tensorboard")

    def log(self, record: dict[str, Any], stage_name: str) -> None:
        """Write one optimizer step; `record` has at least step, loss, lm_loss, mtp_loss, aux_loss,
        grad_norm, lr, tokens, stage and tokens_per_s."""
        if not self.enabled:
            return
        self._append(record)
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))},
                step=record["step"],
            )
        if self.tensorboard is not None:
            imbalance = record.get("expert_imbalance") or {}
            self._add_scalars(
                {
                    **{f"train/{key}": value for key, value in record.items()},
                    **{f"expert_imbalance/{layer}": value for layer, value in imbalance.items()},
                },
                record["step"],
            )
        if self.start_tokens is None:
            self.start_tokens = record["tokens"] - record.get("step_tokens", 0)
        rate = record.get("tokens_per_s") or 0.0
        eta = (self.total_tokens - record["tokens"]) / rate if rate else float("nan")
        mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "n/a"
        memory = (
            f" | memory {record['peak_memory_gib']:.1f} of {record['gpu_memory_gib']:.0f} GiB"
            if record.get("peak_memory_gib") is not None
            else ""
        )
        log.info(
            "step %d | stage %d %s | loss %.4f (lm %.4f, mtp %.4f, aux %.2e) | grad norm %.3f | "
            "lr %.2e | %.0f tok/s | MFU %s%s | %s tokens | ETA %s%s",
            record["step"],
            record["stage"],
            stage_name,
            record["loss"],
            record["lm_loss"],
            record["mtp_loss"],
            record["aux_loss"],
            record["grad_norm"],
            record["lr"],
            rate,
            mfu,
            memory,
            f"{record['tokens']:,}",
            _duration(eta) if eta == eta else "?",
            " | step skipped (non-finite)" if record.get("skipped") else "",
        )

    def log_eval(self, record: dict[str, Any]) -> None:
        """Write one evaluation: `record` has step, tokens and `eval/...` values (None where a
        metric could not be measured, e.g. bits per byte without a tokenizer)."""
        if not self.enabled:
            return
        self._append(record)
        scalars = _numeric({k: v for k, v in record.items() if k.startswith("eval/")})
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            self._add_scalars(scalars, record["step"])
        log.info("%s", _eval_line(record))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes what is still queued

    def _append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def _add_scalars(self, values: dict[str, Any], step: int) -> None:
        for tag, value in _numeric(values).items():
            self.tensorboard.add_scalar(tag, value, global_step=step)
        # a dashboard open during the run shows the step now, not when the writer's queue fills
        self.tensorboard.flush()


def _numeric(values: dict[str, Any]) -> dict[str, int | float]:
    """The values a dashboard can plot: numbers, not flags, not None."""
    return {
        k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# how the console line prints an evaluation metric (by the last part of its key)
_EVAL_FORMATS = {"loss": ".4f", "ppl": ".2f", "bpb": ".3f", "acc": ".3f"}


def _eval_line(record: dict[str, Any]) -> str:
    """`eval at step 20 (10,240 tokens): sample loss 3.2000 ppl 24.50 bpb 1.100 | niah acc 0.750 |
    1.3 s`: the `eval/<task>/<metric>` values grouped by task; the finer ones (`eval/niah/acc/
    len_256`) stay in metrics.jsonl and the dashboards."""
    tasks: dict[str, list[str]] = {}
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            text = "n/a" if value is None else format(value, _EVAL_FORMATS.get(parts[2], ".4g"))
            tasks.setdefault(parts[1], []).append(f"{parts[2]} {text}")
    sections = [f"{task} {' '.join(values)}" for task, values in tasks.items()]
    if record.get("eval/time_s") is not None:
        sections.append(f"{record['eval/time_s']:.1f} s")
    return f"eval at step {record['step']} ({record['tokens']:,} tokens): " + " | ".join(sections)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _start_tensorboard(log_dir: Path):
    """TensorBoard event writer; `tensorboard.enabled=true` without the package fails at
    validation."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _start_wandb(settings: dict, run_config: dict, run_dir: Path):
    """W&B run; offline when no API key is configured or the server cannot be reached (a dashboard
    outage must not stop a training run; the offline run syncs later). Only the resolved training
    config is sent, never the environment (which may hold secrets). `wandb.enabled=true` without the
    package fails at validation."""
    import wandb

    mode = settings.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("wandb: no WANDB_API_KEY configured; logging offline to %s/wandb", run_dir)
        mode = "offline"
    if mode == "online":
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        problem = _unreachable(server)
        if problem:
            log.warning(
                "wandb: cannot reach %s (%s); logging offline to %s/wandb instead: upload it "
                "later with `wandb sync %s/wandb/offline-run-*`",
                server,
                problem,
                run_dir,
                run_dir,
            )
            mode = "offline"
    return wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        name=settings.get("name"),
        group=settings.get("group"),
        tags=settings.get("tags") or None,
        mode=mode,
        dir=str(run_dir),
        config=run_config,
        # by default wandb also records the console output (output.log), the installed packages
        # (requirements.txt), system metrics, machine and git metadata (host, command line,
        # executable, commit) and, where the user's W&B settings ask, the code; none of it is the
        # training config, and the command line and console may hold paths or secrets
        settings=wandb.Settings(
            console="off",
            x_save_requirements=False,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
            disable_git=True,
            save_code=False,
        ),
    )


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why no TCP connection to the server of `url` (or the proxy the environment names for it)
    opens within `timeout` seconds; None when one does. wandb itself retries for about 100 s before
    it gives up."""
    parsed = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = (
        urllib.parse.urlsplit(proxy)
        if proxy and not urllib.request.proxy_bypass(parsed.hostname or "")
        else parsed
    )
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None
