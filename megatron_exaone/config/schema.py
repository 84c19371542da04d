"""The typed training configuration: one dataclass per recipe group, composed into `TrainConfig`.

These are OmegaConf structured configs (`config.load` merges the Hydra recipes onto them, so an
unknown key is an error), but the classes themselves are plain dataclasses: the trainer and every
library module receive them, or the library objects they build (`ParallelDims`, `Curriculum`,
`ModelConfig`), and never see Hydra or OmegaConf.

Each `__post_init__` checks what a field can be checked against on its own (signs, sizes); the names
a feature owns (precisions, pipeline schedules, recompute modes) and the checks that need several
groups, the world size or the machine are the features' (`training.plan.validate`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_exaone.curriculum import Curriculum, Stage
from megatron_exaone.data.packing import PACKING_MODES
from megatron_exaone.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("online", "offline", "disabled")
# Where `data.prepare_sample` writes the bundled corpus's tokenizer and shards, relative to run_dir.
SAMPLE_TOKENIZER = "tokenizer"
SAMPLE_PREFIX = "data/sample"


class RecipeError(UserError, ValueError):
    """A configuration that cannot run; the message says what to change."""


def _one_of(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{where}={value!r}: use one of {', '.join(map(str, allowed))}.")


def _at_least(where: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{where}={value}: must be >= {low}.")


# ----------------------------------------------------------------------------------------- parallel
@dataclass
class ParallelConfig:
    """Parallel layout and the memory/speed switches that go with it.

    `dp=None` derives data parallel from the world size. `ep` folds into tp*cp*dp (MoE parallel
    folding), so it does not multiply the world size. `fsdp`: shard parameters, gradients and
    optimizer state over dp (FSDP2, the distributed-optimizer equivalent); False replicates them.
    `reshard_after_forward`: FSDP2 frees each decoder layer's gathered BF16 parameters after its
    forward and gathers them again for its backward; False keeps them from forward to backward (one
    gather per micro-batch instead of two, for the memory of every local layer's gathered
    parameters; ZBV/DualPipeV always keep them). `reduce_grads_each_micro_batch`: FSDP2
    reduce-scatters every micro-batch's gradients in its backward, instead of accumulating unsharded
    FP32 gradients (4 B per local parameter) over the step and, under a pipeline, holding every
    layer's gathered BF16 parameters (2 B) until the step's last backward: one reduce-scatter per
    micro-batch for that memory (what long-context stages with many layers per rank need; not with
    ZBV/DualPipeV). `pipeline_layout`: an explicit stage split in
    `parallel.pipeline.pipeline_layout` syntax (e.g. "Et|tt|tL"); None splits evenly. `compile`:
    compile each decoder layer with torch.compile (`parallel.compile`; fuses the elementwise work,
    needed for FP8 speed).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int | None = None
    cp: int = 1
    sequence_parallel: bool = True
    pipeline_schedule: str = "1f1b"
    pipeline_layout: str | None = None
    fsdp: bool = True
    reshard_after_forward: bool = True
    reduce_grads_each_micro_batch: bool = False
    recompute: str = "none"
    recompute_modules: list[str] = field(default_factory=lambda: ["attention"])
    compile: bool = False

    def with_overrides(self, overrides: dict[str, Any]) -> ParallelConfig:
        """This layout with a curriculum stage's `parallel` overrides applied.

        When the overrides change a size but do not name `dp`, dp is derived again from the world
        size: a stage that raises cp (or changes tp/pp) takes the ranks from data parallelism
        instead of failing.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"parallel overrides {unknown} are not parallel settings; use some of "
                f"{sorted(names)}."
            )
        changes = dict(overrides)
        if {"tp", "pp", "cp"} & changes.keys() and "dp" not in changes:
            changes["dp"] = None
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------- precision
@dataclass
class PrecisionConfig:
    """Numerics of the compute path. The names, their backends and what each option applies to are
    the table of `precision.registry` (`PRECISIONS`), which checks this config
    (`validate_precision`) before anything runs.

    `name`: fp32, bf16 (bf16 compute with fp32 master weights, optimizer state and gradient
    reduction; on CPU the trainer computes in fp32, because CPU bf16 matmuls are slow and not what a
    GPU run computes), or an FP8 mode: fp8_te_* (Transformer Engine on CUDA: delayed, tensorwise =
    current scaling, blockwise, mxfp8 on Blackwell), fp8_torch (torch-native scaled matmuls, CUDA
    compute capability >= 8.9), fp8_emulated (FP8 quantize / dequantize with high-precision matmuls,
    runs anywhere: for tests).

    `recipe`: FP8 scaling recipe (None = the precision's default). `fp8_format`: "hybrid" (E4M3
    forward, E5M2 gradients) or "e4m3". `amax_history_len` / `amax_compute_algo`: delayed scaling
    only. `keep_bf16_first_layers` / `keep_bf16_last_layers`: decoder layers kept in bf16 at each
    end (the usual stability choice, as Megatron's `--first-last-layers-bf16`). `fp8_expert_wgrad`
    (fp8_torch, fp8_emulated): the routed experts' weight-gradient GEMM in FP8 as well; by default
    it runs in BF16 (see `precision.fp8_ops`). `fp8_experts`: false keeps the routed experts in BF16
    (where `torch._scaled_grouped_mm` cannot run). `fp8_mtp` (any FP8 precision) runs the MTP
    module's projections in FP8 too (by default it stays BF16 like lm_head). `fp8_lm_head`
    (fp8_torch, fp8_emulated) runs the output head's logits and the loss's hidden-state gradient in
    FP8 (main and MTP losses; the head's weight gradient stays BF16 with fp32 accumulation): off by
    default, as in Megatron and DeepSeek-V3. `fp8_weight_cache` (fp8_torch, fp8_emulated): quantize
    each FP8 weight once per optimizer step, on its first micro-batch, and reuse the FP8 copies
    (forward's and backward's) for the step's other micro-batches, as Transformer Engine does with
    `is_first_microbatch`: same results, fewer casts, 2 bytes per FP8 weight element held through
    the step. `fp8_fuse_inputs` (fp8_torch, fp8_emulated): a block whose input projections are all
    in FP8 (q, k, v; gate, up) runs them as one GEMM, x quantized once (`precision.fp8_ops`).
    Transformer Engine only (fp8_te_*): `te_attention` runs the attention cores in TE's
    DotProductAttention (its fused BF16 kernels: sliding window, packed documents as THD) instead of
    SDPA / FlexAttention.
    """

    name: str = "bf16"
    recipe: str | None = None
    fp8_format: str = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    keep_bf16_first_layers: int = 1
    keep_bf16_last_layers: int = 1
    fp8_expert_wgrad: bool = False
    fp8_experts: bool = True
    te_attention: bool = False
    fp8_mtp: bool = False
    fp8_weight_cache: bool = False
    fp8_lm_head: bool = False
    fp8_fuse_inputs: bool = True


# ---------------------------------------------------------------------------------------- optimizer
@dataclass
class OptimConfig:
    """Optimizer settings; the learning rate itself comes from the curriculum stage's `lr`.

    `muon`: Muon on hidden weight matrices with AdamW (these betas/eps) on embeddings, lm_head,
    router and norm gains, as in Moonlight / Kimi K2. `muon_adjust_lr`: "match_rms_adamw" scales the
    update by 0.2 * sqrt(max(A, B)) so AdamW's LR and weight decay carry over (Moonlight);
    "original" by sqrt(max(1, A/B)). `clip_grad`: global gradient-norm clip (0 = off).
    `offload`: "cpu" keeps the AdamW groups' FP32 master weights and moments in host memory and
    steps them in DeepSpeed's CPU Adam (`training.offload`; the `[deepspeed]` extra); "none" keeps
    everything on the device.
    """

    name: str = "adamw"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"
    offload: str = "none"

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, ("adamw", "muon"))
        _one_of("optim.offload", self.offload, ("none", "cpu"))
        _one_of("optim.muon_adjust_lr", self.muon_adjust_lr, ("match_rms_adamw", "original"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"optim.betas={list(self.betas)}: give two values in [0, 1), e.g. [0.9, 0.95]."
            )
        if self.weight_decay < 0 or self.eps <= 0 or self.clip_grad < 0:
            raise ValueError("optim: weight_decay and clip_grad must be >= 0 and eps > 0.")
        _at_least("optim.muon_ns_steps", self.muon_ns_steps, 1)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `training.optim.build_optimizer` (everything but the LR and the
        clip)."""
        kwargs = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "clip_grad"
        }
        kwargs["betas"] = tuple(self.betas)
        return kwargs


# --------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Training data: named datasets (the names the curriculum mixtures refer to) and how they are
    read.

    `datasets`: name -> shard prefixes (`PREFIX.bin/.idx`, as written by `exaone-data tokenize`);
    several prefixes are read as one dataset. Relative prefixes, `tokenizer` and `cache_dir` resolve
    against `run_dir`, so a run directory is self-contained and does not depend on where the job was
    launched; use absolute paths for shared data. `cache_dir`: where packing indices are cached
    (None = `index-cache/` beside each dataset). `prepare_sample`: the trainer first trains a
    SuperBPE tokenizer (vocab = model.vocab_size) on the bundled sample corpus into
    run_dir/`SAMPLE_TOKENIZER` and tokenizes the corpus into run_dir/`SAMPLE_PREFIX`.
    """

    datasets: dict[str, list[str]] = field(default_factory=dict)
    packing: str = "concat"
    cache_dir: str | None = None
    tokenizer: str | None = None
    prepare_sample: bool = False

    def __post_init__(self) -> None:
        _one_of("data.packing", self.packing, PACKING_MODES)
        empty = sorted(name for name, prefixes in self.datasets.items() if not prefixes)
        if empty:
            raise ValueError(
                f"data.datasets {empty} list no shard prefix; give each dataset at least one."
            )

    def resolved_datasets(self, run_dir: str | os.PathLike) -> dict[str, list[str]]:
        """Dataset name -> absolute shard prefixes."""
        return {
            name: [_under(run_dir, p) for p in prefixes] for name, prefixes in self.datasets.items()
        }

    def resolved_path(self, path: str | None, run_dir: str | os.PathLike) -> str | None:
        """`tokenizer` or `cache_dir` made absolute (None stays None)."""
        return None if path is None else _under(run_dir, path)


def _under(run_dir: str | os.PathLike, path: str) -> str:
    return str((Path(run_dir) / Path(path).expanduser()).absolute())


# --------------------------------------------------------------------------------------- curriculum
@dataclass
class CurriculumConfig:
    """The stages, as `curriculum.Stage` (its docstring explains the fields); a stage's `parallel`
    keys are `ParallelConfig` fields, applied with `ParallelConfig.with_overrides`."""

    stages: list[Stage] = field(default_factory=list)

    def build(self, batch_multiple: int = 1) -> Curriculum:
        """The validated `Curriculum`; every global batch must be a multiple of `batch_multiple`
        (mbs x dp)."""
        return Curriculum(list(self.stages), batch_multiple=batch_multiple)


# -------------------------------------------------------------------------------------- run control
@dataclass
class TrainerConfig:
    """`max_steps`: stop after this many optimizer steps (None = when the curriculum's tokens are
    consumed). `device`: auto = CUDA when available, else CPU. `max_skipped_steps`: steps with a
    NaN/Inf loss or gradient are skipped (no update); more than this many in a row stop the run.
    `loss_spike_factor`: a loss above this multiple of the recent mean is reported as a spike (0 =
    off). `stop_at_stage_end`: end the launch at the next stage boundary (also happens by itself
    when the next stage changes the parallel layout)."""

    max_steps: int | None = None
    seed: int = 1234
    micro_batch_size: int = 1
    device: str = "auto"
    log_interval: int = 1
    max_skipped_steps: int = 10
    loss_spike_factor: float = 3.0
    stop_at_stage_end: bool = False

    def __post_init__(self) -> None:
        _one_of("trainer.device", self.device, DEVICES)
        _at_least("trainer.max_steps", self.max_steps, 1)
        _at_least("trainer.seed", self.seed, 0)
        _at_least("trainer.micro_batch_size", self.micro_batch_size, 1)
        _at_least("trainer.log_interval", self.log_interval, 1)
        _at_least("trainer.max_skipped_steps", self.max_skipped_steps, 0)
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            raise ValueError(
                f"trainer.loss_spike_factor={self.loss_spike_factor}: use a factor > 1, or 0 for "
                "off."
            )


@dataclass
class CheckpointConfig:
    """`interval`: save every N optimizer steps (0 = only at stage ends / on SIGTERM). `keep_last`:
    how many interval checkpoints to keep (0 = all). `load`: a run's checkpoints/ folder or one
    checkpoint to start from; None resumes from run_dir/checkpoints when it holds one."""

    interval: int = 1000
    keep_last: int = 3
    async_save: bool = False
    load: str | None = None
    save_at_stage_end: bool = True

    def __post_init__(self) -> None:
        _at_least("checkpoint.interval", self.interval, 0)
        _at_least("checkpoint.keep_last", self.keep_last, 0)


@dataclass
class WandbConfig:
    """Weights & Biases logging (optional dependency). `mode`: None lets the trainer decide with
    `resolved_mode`: online when WANDB_API_KEY is set, offline otherwise (sync later with `wandb
    sync`)."""

    enabled: bool = False
    project: str = "megatron-exaone"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    mode: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode is not None:
            _one_of("wandb.mode", self.mode, WANDB_MODES)

    def resolved_mode(self, environ: dict[str, str] | None = None) -> str:
        environ = os.environ if environ is None else environ
        return self.mode or ("online" if environ.get("WANDB_API_KEY") else "offline")


# ------------------------------------------------------------------------------------------- eval
@dataclass
class NiahConfig:
    """The needle-in-a-haystack evaluation (`evaluation.niah`): a pass-key sentence inserted at each
    of `depths` (fractions of the haystack) into text of `dataset` (an evaluation or training
    dataset; None: the first evaluation dataset, else the first training dataset) at each of
    `lengths` (fractions of the sequence length), `trials` times each with new keys of `key_digits`
    digits; the model must rank the true key above `candidates - 1` others by log-likelihood.
    `enabled`: also run it with every evaluation (stage gates run it regardless)."""

    enabled: bool = False
    dataset: str | None = None
    lengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    candidates: int = 4
    key_digits: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("eval.niah.trials", self.trials, 1)
        _at_least("eval.niah.candidates", self.candidates, 2)
        _at_least("eval.niah.key_digits", self.key_digits, 1)
        if self.candidates > 9 * 10 ** (self.key_digits - 1):
            raise ValueError(
                f"eval.niah.candidates={self.candidates}: more than there are "
                f"{self.key_digits}-digit keys."
            )
        for name, values in (("lengths", self.lengths), ("depths", self.depths)):
            if not values or not all(0 <= v <= 1 for v in values):
                raise ValueError(f"eval.niah.{name}={list(values)}: give fractions in [0, 1].")
        if min(self.lengths) <= 0:
            raise ValueError(f"eval.niah.lengths={list(self.lengths)}: fractions must be > 0.")


@dataclass
class EvalConfig:
    """Evaluation in the training loop (`evaluation.validation`): every `interval` optimizer steps
    (0 = never), at the end of every stage (`at_stage_end`) and of training, each dataset's mean
    loss, perplexity and bits per byte on its first `tokens` tokens, in sequences of `seq_len`
    (None: the current stage's). The same sequences on every layout and after a resume.

    Two kinds of evaluation datasets, reported under their names: `datasets`, name -> shard
    prefixes of held-out shards (as `data.datasets`; relative prefixes resolve against run_dir),
    and `holdout`, training dataset name -> the fraction of its documents set aside for evaluation.
    Which documents is a fixed function of their index and the dataset's name (not of the seed), so
    every run and layout holds out the same ones; the training loader never samples them."""

    interval: int = 0
    tokens: int = 16384
    seq_len: int | None = None
    at_stage_end: bool = True
    datasets: dict[str, list[str]] = field(default_factory=dict)
    holdout: dict[str, float] = field(default_factory=dict)
    niah: NiahConfig = field(default_factory=NiahConfig)

    def __post_init__(self) -> None:
        _at_least("eval.interval", self.interval, 0)
        _at_least("eval.tokens", self.tokens, 1)
        _at_least("eval.seq_len", self.seq_len, 2)
        for name, fraction in self.holdout.items():
            if not 0 < fraction < 1:
                raise ValueError(f"eval.holdout.{name}={fraction}: use a fraction in (0, 1).")
        both = sorted(set(self.datasets) & set(self.holdout))
        if both:
            raise ValueError(
                f"eval.datasets and eval.holdout both name {both}: an evaluation dataset is either "
                "held-out shards or part of a training dataset."
            )

    def dataset_names(self) -> list[str]:
        return [*self.datasets, *self.holdout]


@dataclass
class TensorboardConfig:
    """TensorBoard event files in run_dir/tensorboard: the scalars of metrics.jsonl (needs the
    `[tensorboard]` extra)."""

    enabled: bool = False


@dataclass
class TrainConfig:
    """A whole run. `model`: `ModelConfig` fields by their Hugging Face names (checked by building
    the `ModelConfig`). `run_dir` holds config.yaml (resolved), metrics.jsonl and checkpoints/."""

    run_dir: str = "runs/default"
    model: dict[str, Any] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.eval.holdout) - set(self.data.datasets))
        if unknown:
            raise ValueError(
                f"eval.holdout names {unknown}, which data.datasets does not define "
                f"({', '.join(sorted(self.data.datasets)) or 'none'}); hold out part of a training "
                "dataset."
            )
        self._check_niah()

    def _check_niah(self) -> None:
        """Before a run that will need it: the needle-in-a-haystack evaluation writes its needle and
        question with the tokenizer, and cuts its haystacks from a dataset the run knows."""
        niah = self.eval.niah
        if not (niah.enabled or any(stage.gates for stage in self.curriculum.stages)):
            return
        if self.data.tokenizer is None:
            raise ValueError(
                "the needle-in-a-haystack evaluation (eval.niah.enabled or a stage's gates) needs "
                "the tokenizer to write its needle and question: set data.tokenizer."
            )
        known = [*self.eval.dataset_names(), *self.data.datasets]
        if niah.dataset is not None and niah.dataset not in known:
            raise ValueError(
                f"eval.niah.dataset={niah.dataset!r} is neither an evaluation nor a training "
                f"dataset ({', '.join(known) or 'none'})."
            )
