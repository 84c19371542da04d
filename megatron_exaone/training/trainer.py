"""The training loop: curriculum -> batch -> forward/backward (pipeline schedule or micro-batch
accumulation) -> gradient reduction -> NaN guard -> clipping -> expert-bias update -> optimizer step
-> metrics -> checkpoints.

One `Trainer` per rank. Everything the step needs comes from the curriculum's plan at the current
token count, so a run resumed from a checkpoint (same or different layout) continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone import lifetime
from megatron_exaone.checkpoint import state as ckpt
from megatron_exaone.checkpoint.resume import resume_source
from megatron_exaone.config.schema import TrainConfig
from megatron_exaone.curriculum import Curriculum, StepPlan
from megatron_exaone.data.loader import DataStage, MixtureLoader
from megatron_exaone.data.mixture import normalize_weights
from megatron_exaone.errors import UserError
from megatron_exaone.evaluation import Evaluator, gate_failures
from megatron_exaone.files import write_json_atomic
from megatron_exaone.model import ModelConfig, update_expert_bias
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.parallel.build import build_chunks, reduce_grads
from megatron_exaone.parallel.comm import all_gather_objects, all_reduce_, barrier
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.grad_norm import clip_grad_norm_
from megatron_exaone.parallel.mesh import ParallelDims, ParallelMesh, build_mesh
from megatron_exaone.parallel.pipeline import embedding_copies
from megatron_exaone.parallel.step import step_runner
from megatron_exaone.precision import mark_fp8_weights_stale

from .flops import flops_per_token, peak_flops
from .metrics import MetricsLogger
from .offload import build_for_optimizer
from .optim import build_optimizer

log = logging.getLogger("megatron_exaone.train")

# rank 0 writes it when a launch ends normally: why it stopped and whether relaunching the same
# command continues the run (launch/slurm.sbatch requeues the job then). A launch that fails leaves
# none.
LAUNCH_STATUS = "launch_status.json"
LOSS_KEYS = ("lm_loss", "mtp_loss", "aux_loss")


class TrainingAborted(UserError, RuntimeError):
    """Too many consecutive non-finite steps."""


class GateFailed(UserError, RuntimeError):
    """A stage's evaluation gate with `on_fail: stop` was not met."""


@dataclasses.dataclass
class Progress:
    """Counters saved with every checkpoint. `skipped_in_a_row`: the current run of skipped
    (non-finite) steps, with the step and the quantity that started it (`first_bad_step`,
    `first_bad_value`)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    first_bad_step: int | None = None
    first_bad_value: str | None = None
    # the stage whose `stop` gate failed: a relaunch checks its gates again before going on
    failed_gate_stage: int | None = None


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model_config: ModelConfig,
        dims: ParallelDims,
        curriculum: Curriculum,
        device: torch.device,
    ) -> None:
        self.cfg, self.model_config, self.curriculum = cfg, model_config, curriculum
        self.device = device
        self.run_dir = Path(cfg.run_dir)
        self.mesh: ParallelMesh = build_mesh(dims, device.type)
        self.rank = dist.get_rank()
        if self.rank == 0:
            log.info("run directory: %s", self.run_dir.absolute())
        self.progress = Progress()
        self._loss_ema: float | None = None
        self._last_good_checkpoint: Path | None = None
        self._last_saved_step = 0
        self._last_eval_step: int | None = None
        lifetime.install_stop_handlers()
        if self.rank == 0:
            (self.run_dir / LAUNCH_STATUS).unlink(missing_ok=True)
        self._prepare_data()
        self.build, self.chunks = build_model(cfg, model_config, curriculum, self.mesh, device)
        optimizer_kwargs = cfg.optim.optimizer_kwargs()
        self.optimizer = build_optimizer(
            self.chunks, **optimizer_kwargs, tp_group=self.mesh.tp_group, tp_size=dims.tp
        )
        self.loader = self._build_loader()
        self.runner = step_runner(
            self.chunks,
            self.mesh,
            cfg.parallel.pipeline_schedule,
            self._microbatches(),
            activation_dtype=self.build.activation_dtype,
            reduce_each_micro_batch=cfg.parallel.reduce_grads_each_micro_batch,
        )
        self.evaluator = self._build_evaluator()
        self.metrics = MetricsLogger(
            self.run_dir,
            enabled=self.rank == 0,
            # what this launch will train: the ETA stops at max_steps
            total_tokens=curriculum.tokens_after_steps(cfg.trainer.max_steps),
            wandb_settings={**dataclasses.asdict(cfg.wandb), "mode": cfg.wandb.resolved_mode()},
            run_config=dataclasses.asdict(cfg),
            tensorboard=cfg.tensorboard.enabled,
        )
        self._resume()

    # ---------------------------------------------------------------------------------------- setup
    def _prepare_data(self) -> None:
        data = self.cfg.data
        self.datasets = data.resolved_datasets(self.run_dir)
        tokenizer = data.resolved_path(data.tokenizer, self.run_dir)
        self.tokenizer_dir: Path | None = Path(tokenizer) if tokenizer else None
        # the embedded default: build the tokenizer and shards once, on rank 0
        if data.prepare_sample:
            if self.rank == 0:
                prepare_sample_data(self.run_dir / "data", self.model_config.vocab_size)
            barrier()

    def _build_loader(self) -> MixtureLoader:
        stages = [
            DataStage(
                dict(s.mixture) or {name: 1.0 for name in self.datasets},
                s.seq_len,
                s.global_batch_size,
            )
            for s in self.curriculum.stages
        ]
        first = self.curriculum.stages[0]
        return MixtureLoader(
            self.datasets,
            stages,
            seq_len=first.seq_len,
            global_batch_size=first.global_batch_size,
            # cp ranks: same sequences
            dp_rank=self.mesh.dp_rank,
            dp_size=self.mesh.dims.dp,
            seed=self.cfg.trainer.seed,
            packing=self.cfg.data.packing,
            pad_token_id=self.model_config.pad_token_id or 0,
            vocab_size=self.model_config.vocab_size,
            cache_dir=self.cfg.data.resolved_path(self.cfg.data.cache_dir, self.run_dir),
            # documents held out for evaluation are never trained on
            holdout=self.cfg.eval.holdout,
        )

    def _build_evaluator(self) -> Evaluator | None:
        """The evaluator when the recipe evaluates anything (datasets, niah, stage gates)."""
        wanted = self.cfg.eval
        gates = any(stage.gates for stage in self.curriculum.stages)
        if not (wanted.dataset_names() or wanted.niah.enabled or gates):
            return None
        return Evaluator.for_run(self.cfg, self.runner, self.mesh.dims, self.model_config)

    def _microbatches(self, global_batch: int | None = None) -> int:
        global_batch = global_batch or self.curriculum.stages[0].global_batch_size
        return global_batch // (self.mesh.dims.dp * self.cfg.trainer.micro_batch_size)

    def _resume(self) -> None:
        source = resume_source(self.cfg.run_dir, self.cfg.checkpoint.load)
        loaded = (
            ckpt.load(source, self.chunks, self.optimizer, self.mesh)
            if source is not None
            else None
        )
        if loaded is None:
            log.info("starting from the initial weights (seed %d)", self.cfg.trainer.seed)
            return
        self._last_good_checkpoint = loaded.path
        # an HF import holds weights only: the step count, data position and optimizer start fresh
        if "progress" not in loaded.extra:
            log.info(
                "starting from the weights of %s (an imported model: training starts at step 0 "
                "with a fresh optimizer)",
                loaded.path,
            )
            return
        self.progress = Progress(**loaded.extra["progress"])
        self.loader.load_state_dict(loaded.extra["loader"])
        if loaded.path.parent == self.run_dir / "checkpoints":
            # a finished run relaunched has nothing new to save
            self._last_saved_step = self.progress.step
        log.info(
            "resumed from %s (step %d, %s tokens, saved with layout %s)",
            loaded.path,
            self.progress.step,
            f"{self.progress.tokens:,}",
            loaded.meta.get("layout"),
        )

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> str:
        """Train until the curriculum is done, max_steps, a stop signal, a stage that needs another
        layout, or a failed stage gate (`GateFailed`, after the checkpoint). Returns the reason."""
        reason, resume = "curriculum finished", False
        stage_index, failed_gate = None, None
        first_step, seq_len = self.progress.step, None
        # a signal during start-up: stop at once
        stop = self._all_agree(lifetime.stop_requested() is not None)
        if not stop and self.progress.failed_gate_stage is not None:
            failed_gate = self._check_gates(self.progress.failed_gate_stage)
        while (
            not stop and not failed_gate and not self.curriculum.is_finished(self.progress.tokens)
        ):
            if (
                self.cfg.trainer.max_steps is not None
                and self.progress.step >= self.cfg.trainer.max_steps
            ):
                reason = f"trainer.max_steps={self.cfg.trainer.max_steps} reached"
                break
            plan = self.curriculum.plan(self.progress.tokens)
            seq_len = plan.seq_len
            if plan.stage_index != stage_index:
                stage_index = plan.stage_index
                if not self._enter_stage(plan):
                    stage = f"stage {plan.stage_index} ({plan.stage.name})"
                    reason = f"{stage} needs layout {plan.stage.parallel}"
                    resume = True
                    break
            self._step(plan)
            stop = self._all_agree(lifetime.stop_requested() is not None)
            if plan.ends_stage:
                failed_gate = self._finish_stage(plan, force_save=stop)
                if self.cfg.trainer.stop_at_stage_end and not failed_gate:
                    stage = f"stage {plan.stage_index} ({plan.stage.name})"
                    reason = f"{stage} finished (trainer.stop_at_stage_end)"
                    resume = True
                    break
            else:
                if self._eval_due():
                    self._evaluate(plan.seq_len)
                if stop or self._interval_due():
                    self._save()
        if stop:
            reason, resume = (
                f"stop signal ({lifetime.stop_requested() or 'received by another rank'})",
                True,
            )
        elif not (failed_gate or resume) and self._last_eval_step != self.progress.step:
            if self.progress.step > first_step:  # the end of training
                self._evaluate(seq_len)
        if not self._latest_is_current():
            self._save()
        ckpt.wait_pending_save()
        self.metrics.close()
        if failed_gate:
            raise GateFailed(failed_gate)
        log.info(
            "training stopped: %s (step %d, %s tokens)%s",
            reason,
            self.progress.step,
            f"{self.progress.tokens:,}",
            "; relaunch the same command to continue" if resume else "",
        )
        self._write_launch_status(reason, resume)
        return reason

    def _write_launch_status(self, reason: str, resume: bool) -> None:
        if self.rank == 0:
            status = {"reason": reason, "resume": resume}
            progress = {"step": self.progress.step, "tokens": self.progress.tokens}
            # one line: launch/slurm.sbatch greps it and prints it
            write_json_atomic(self.run_dir / LAUNCH_STATUS, {**status, **progress}, indent=None)

    def _enter_stage(self, plan: StepPlan) -> bool:
        stage = plan.stage
        wanted = {
            k: v for k, v in stage.parallel.items() if getattr(self.cfg.parallel, k, None) != v
        }
        if wanted:
            log.warning(
                "stage %d (%s) asks for parallel settings %s: saving a checkpoint; relaunch with "
                "those overrides to continue (the checkpoint reshards to the new layout)",
                plan.stage_index,
                stage.name,
                wanted,
            )
            self._save()
            return False
        self.loader.set_stage(plan.stage_index)
        for chunk in self.chunks:
            for module in chunk.modules():
                if isinstance(module, MoEBlock):
                    module.aux_loss_coeff = stage.aux_loss_coeff
            _set_mtp_weight(chunk, stage.mtp_loss_weight)
        log.info(
            "entering curriculum stage %d (%s) at %s tokens: seq_len %d, global batch %d, mixture "
            "%s, mtp weight %g, aux coeff %g, bias rate %g",
            plan.stage_index,
            stage.name,
            f"{self.progress.tokens:,}",
            stage.seq_len,
            stage.global_batch_size,
            _mixture_text(stage.mixture),
            stage.mtp_loss_weight,
            stage.aux_loss_coeff,
            stage.bias_update_rate,
        )
        return True

    def _step(self, plan: StepPlan) -> None:
        start = time.perf_counter()
        self.optimizer.set_lr(plan.lr)
        batch = {
            k: v.to(self.device) for k, v in self.loader.next_batch(plan.global_batch_size).items()
        }
        # the optimizer changed the weights: FP8 weight caches quantize them again
        for chunk in self.chunks:
            mark_fp8_weights_stale(chunk)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses = self._forward_backward(batch, plan)
        reduce_grads(self.chunks, self.mesh, self.cfg.parallel.fsdp)
        grad_norm = clip_grad_norm_(
            self.chunks,
            self.cfg.optim.clip_grad,
            self.mesh,
            embedding_copies(self.model_config, self.mesh.dims.pp),
        ).item()
        nonfinite = [
            k
            for k in (*LOSS_KEYS, "grad_norm")
            if not math.isfinite({**losses, "grad_norm": grad_norm}[k])
        ]
        finite = not nonfinite
        if finite:
            imbalance = self._update_expert_bias(plan.stage.bias_update_rate)
            self.optimizer.step()
            self.progress.skipped_in_a_row, self.progress.first_bad_step = 0, None
        else:
            imbalance = {}
            self._discard_step(nonfinite)
        self.optimizer.zero_grad()
        self.progress.step += 1
        self.progress.tokens += plan.tokens
        elapsed = time.perf_counter() - start
        self._log(plan, losses, grad_norm, elapsed, imbalance, skipped=not finite)
        self._check_skipped_limit()

    def _forward_backward(self, batch: dict[str, torch.Tensor], plan: StepPlan) -> dict[str, float]:
        return self.runner.step(
            batch["input_ids"],
            batch["labels"],
            batch["position_ids"],
            n_microbatches=self._microbatches(plan.global_batch_size),
        )

    def _update_expert_bias(self, rate: float) -> dict[str, float]:
        group = self.mesh.tp_cp_dp_group
        imbalance: dict[str, float] = {}
        for chunk in self.chunks:
            imbalance.update(update_expert_bias(chunk, rate, lambda t: all_reduce_(t, group)))
        # each pipeline stage holds different layers; rank 0 logs them all
        if self.mesh.dims.pp > 1:
            imbalance = {
                k: v
                for part in all_gather_objects(imbalance, self.mesh.pp_group)
                for k, v in part.items()
            }
        return imbalance

    def _discard_step(self, nonfinite: list[str]) -> None:
        """A step whose loss or gradient norm is NaN/Inf: no update. More than
        trainer.max_skipped_steps of them in a row end the run (`_check_skipped_limit`); while they
        last, no checkpoint is written (the newest stays the last good one)."""
        self.progress.skipped_steps += 1
        self.progress.skipped_in_a_row += 1
        if self.progress.first_bad_step is None:
            self.progress.first_bad_step = self.progress.step + 1
            self.progress.first_bad_value = nonfinite[0]
        for chunk in self.chunks:
            for module in chunk.modules():
                if isinstance(module, MoEBlock):
                    module.tokens_per_expert.zero_()
        log.warning(
            "non-finite %s at step %d: update skipped (%d in a row, limit "
            "trainer.max_skipped_steps=%d)",
            " and ".join(nonfinite),
            self.progress.step + 1,
            self.progress.skipped_in_a_row,
            self.cfg.trainer.max_skipped_steps,
        )

    def _check_skipped_limit(self) -> None:
        limit = self.cfg.trainer.max_skipped_steps
        if self.progress.skipped_in_a_row > limit:
            good = self._last_good_checkpoint or "none (no checkpoint was written)"
            raise TrainingAborted(
                f"{self.progress.skipped_in_a_row} steps in a row were non-finite (limit "
                f"trainer.max_skipped_steps={limit}); the first, step "
                f"{self.progress.first_bad_step}, had a non-finite "
                f"{self.progress.first_bad_value}. The last good checkpoint is {good}: relaunching "
                "resumes from it; change what broke first (learning rate, data around that step, "
                "precision)."
            )

    def _log(
        self,
        plan: StepPlan,
        losses: dict[str, float],
        grad_norm: float,
        elapsed: float,
        imbalance: dict[str, float],
        skipped: bool,
    ) -> None:
        tokens_per_s = plan.tokens / elapsed
        peak = peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        )
        mfu = (
            flops_per_token(self.model_config, plan.seq_len)
            * tokens_per_s
            / (peak * dist.get_world_size())
            if peak
            else None
        )
        loss = losses["loss"]
        if (
            self._loss_ema is not None
            and math.isfinite(loss)
            and loss > self.cfg.trainer.loss_spike_factor * self._loss_ema
            and self.rank == 0
        ):
            log.warning(
                "loss spike at step %d: %.4f is more than %gx the running average %.4f",
                self.progress.step,
                loss,
                self.cfg.trainer.loss_spike_factor,
                self._loss_ema,
            )
        if math.isfinite(loss):
            self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
        record = {
            "step": self.progress.step,
            **{key: losses[key] for key in ("loss", *LOSS_KEYS)},
            "grad_norm": grad_norm,
            "lr": plan.lr,
            "tokens": self.progress.tokens,
            "stage": plan.stage_index,
            "stage_name": plan.stage.name,
            "seq_len": plan.seq_len,
            "global_batch_size": plan.global_batch_size,
            "tokens_per_s": tokens_per_s,
            "step_tokens": plan.tokens,
            "mfu": mfu,
            "skipped": skipped,
            "skipped_steps": self.progress.skipped_steps,
            "expert_imbalance_max": max(imbalance.values()) if imbalance else None,
            "expert_imbalance": imbalance,
        }
        if self.progress.step % self.cfg.trainer.log_interval == 0 or plan.ends_stage or skipped:
            # its all-reduce only when logged
            self.metrics.log({**record, **self._peak_memory()}, plan.stage.name)

    def _peak_memory(self) -> dict[str, float | None]:
        """`peak_memory_gib`: the most GPU memory any rank allocated during the step (what
        tools/planner.py estimates), with the GPU's size as `gpu_memory_gib`; None on CPU."""
        if self.device.type != "cuda":
            return {"peak_memory_gib": None, "gpu_memory_gib": None}
        peak = all_reduce_(
            torch.tensor(float(torch.cuda.max_memory_allocated(self.device)), device=self.device),
            op=dist.ReduceOp.MAX,
        )
        total = torch.cuda.get_device_properties(self.device).total_memory
        return {"peak_memory_gib": peak.item() / 2**30, "gpu_memory_gib": total / 2**30}

    # ---------------------------------------------------------------------------------- checkpoints
    def _interval_due(self) -> bool:
        interval = self.cfg.checkpoint.interval
        return bool(interval) and self.progress.step % interval == 0

    def _finish_stage(self, plan: StepPlan, force_save: bool) -> str | None:
        """Evaluate, check the stage's gates and save; the message of a failed `stop` gate."""
        stage = plan.stage
        log.info(
            "curriculum stage %d (%s) finished at %s tokens",
            plan.stage_index,
            stage.name,
            f"{self.progress.tokens:,}",
        )
        record = self._evaluate(
            plan.seq_len if self.cfg.eval.at_stage_end else None,
            niah_seq_len=plan.seq_len if stage.gates else None,
        )
        failed = self._check_gates(plan.stage_index, record)
        at_end = stage.checkpoint_at_end and self.cfg.checkpoint.save_at_stage_end
        if force_save or failed or at_end:
            self._save()
        return failed

    # ----------------------------------------------------------------------------------- evaluation
    def _eval_due(self) -> bool:
        interval = self.cfg.eval.interval
        return bool(interval) and self.progress.step % interval == 0

    def _evaluate(
        self, seq_len: int | None, niah_seq_len: int | None = None
    ) -> dict[str, float | None]:
        """Run and log the evaluations: validation of the evaluation datasets at `seq_len`
        (`eval.seq_len` overrides it; None: no validation) and niah at `niah_seq_len` (by default
        at `seq_len` when `eval.niah.enabled`). The record, or {} when nothing ran."""
        if self.evaluator is None:
            return {}
        if niah_seq_len is None and self.cfg.eval.niah.enabled:
            niah_seq_len = seq_len
        validate = seq_len is not None and bool(self.evaluator.dataset_names)
        validation_seq_len = (self.cfg.eval.seq_len or seq_len) if validate else None
        if validation_seq_len is None and niah_seq_len is None:
            return {}
        # the optimizer changed the weights since the FP8 caches were filled
        for chunk in self.chunks:
            mark_fp8_weights_stale(chunk)
        record = self.evaluator.evaluate(validation_seq_len, niah_seq_len)
        self._last_eval_step = self.progress.step
        self.metrics.log_eval(
            {"step": self.progress.step, "tokens": self.progress.tokens, **record}
        )
        return record

    def _check_gates(
        self, stage_index: int, record: dict[str, float | None] | None = None
    ) -> str | None:
        """Check stage `stage_index`'s gates on `record` (by default, evaluate at the stage's
        sequence length); the message of a failed `stop` gate (recorded in the progress, so a
        relaunch checks again), None when none failed."""
        stage = self.curriculum.stages[stage_index]
        if not stage.gates:
            return None
        if record is None:
            record = self._evaluate(None, niah_seq_len=stage.seq_len)
        failures = gate_failures(stage_index, stage, record)
        for gate, message in failures:
            if gate.on_fail == "warn":
                log.warning("%s; going on (on_fail: warn)", message)
        stops = [message for gate, message in failures if gate.on_fail == "stop"]
        self.progress.failed_gate_stage = stage_index if stops else None
        if not stops:
            return None
        return (
            f"{stops[0]}: the run stops here with a checkpoint (on_fail: stop). Relaunching checks "
            "the gate again; train the stage longer, or change its gate, to go on."
        )

    def _save(self) -> None:
        if self.progress.skipped_in_a_row:
            if self.rank == 0:
                log.warning(
                    "not saving a checkpoint at step %d: the last %d step(s) were non-finite, so "
                    "the newest checkpoint stays the last good one (%s)",
                    self.progress.step,
                    self.progress.skipped_in_a_row,
                    self._last_good_checkpoint,
                )
            return
        extra = {"progress": dataclasses.asdict(self.progress), "loader": self.loader.state_dict()}
        meta = {
            "tokens": self.progress.tokens,
            "stage": self.curriculum.stage_index_at(
                min(self.progress.tokens, self.curriculum.total_tokens - 1)
            ),
            "tokenizer": str(self.tokenizer_dir.resolve()) if self.tokenizer_dir else None,
        }
        result = ckpt.save(
            self.run_dir / "checkpoints",
            self.progress.step,
            self.chunks,
            self.optimizer,
            self.mesh,
            extra=extra,
            keep_last=self.cfg.checkpoint.keep_last,
            meta=meta,
            model_config=self.model_config,
            async_save=self.cfg.checkpoint.async_save,
        )
        if self.rank == 0:
            async_save = self.cfg.checkpoint.async_save
            done = "started (asynchronous)" if async_save else f"written to {result}"
            log.info("checkpoint for step %d %s", self.progress.step, done)
        self._last_saved_step = self.progress.step
        self._last_good_checkpoint = (
            self.run_dir / "checkpoints" / ckpt.store.step_dir_name(self.progress.step)
        )

    def _latest_is_current(self) -> bool:
        """Is there nothing new to save (the last checkpoint is of this step, or nothing was trained
        yet)?"""
        return self._last_saved_step == self.progress.step

    def _all_agree(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank."""
        flags = torch.tensor([float(flag)], device=self.device)
        return bool(all_reduce_(flags, op=dist.ReduceOp.MAX).item())


def build_model(
    cfg: TrainConfig,
    model_config: ModelConfig,
    curriculum: Curriculum,
    mesh: ParallelMesh,
    device: torch.device,
) -> tuple[Build, list[nn.Module]]:
    """This rank's model chunks for the run's layout (`parallel.build.build_chunks`), with the
    build they came from."""
    if mesh.dims.pp > 1:
        # The last stage runs MTP (and holds a copy of the embedding) only if built to: build it for
        # the curriculum's largest MTP weight, so a stage that turns MTP on trains it; each stage
        # sets its own.
        model_config = dataclasses.replace(
            model_config,
            mtp_loss_weight=max(
                [model_config.mtp_loss_weight] + [s.mtp_loss_weight for s in curriculum.stages]
            ),
        )
    build = Build(
        model_config, cfg.parallel, cfg.precision, mesh.dims, device.type, cfg.trainer.seed
    )
    build = build_for_optimizer(build, cfg.optim.offload, cfg.optim.name)
    rank = dist.get_rank()
    if cfg.parallel.compile:
        log.info(
            "rank %d: the decoder layers will be compiled with torch.compile during the first "
            "steps (slower until the kernels are built)",
            rank,
        )
    chunks = build_chunks(build, mesh)
    params = sum(param.numel() for chunk in chunks for param in chunk.parameters())
    log.info(
        "rank %d: %s; %d model chunk(s), %.2fM local parameters",
        rank,
        mesh.describe(),
        len(chunks),
        params / 1e6,
    )
    return build, chunks


def _mixture_text(mixture: dict[str, float]) -> str:
    """A stage's mixture for the log, with the shares the loader samples when the weights do not
    sum to 1."""
    if not mixture:
        return "uniform"
    shares = normalize_weights(list(mixture.values()))
    text = ", ".join(f"{name} {weight:g}" for name, weight in mixture.items())
    if abs(sum(mixture.values()) - 1) > 1e-9:
        normalised = ", ".join(f"{name} {share:.3g}" for name, share in zip(mixture, shares))
        text += f" (weights sum to {sum(mixture.values()):g}: sampled as {normalised})"
    return text


def _set_mtp_weight(chunk: nn.Module, weight: float) -> None:
    config = getattr(chunk, "config", None)
    if config is not None:
        chunk.config = dataclasses.replace(config, mtp_loss_weight=weight)


def prepare_sample_data(data_dir: Path, vocab_size: int) -> None:
    """The bundled sample corpus as a tokenizer and shards under `data_dir`, by the data tool
    (`exaone-data prepare-sample`, a process of its own: the library does not import the command
    package)."""
    command = [sys.executable, "-m", "data_tools", "prepare-sample", str(data_dir)]
    command += ["--vocab-size", str(vocab_size)]
    if subprocess.run(command).returncode:
        raise SampleDataError(f"`{' '.join(command[1:])}` failed (its messages are above)")


class SampleDataError(UserError, RuntimeError):
    """The bundled sample data could not be prepared."""
