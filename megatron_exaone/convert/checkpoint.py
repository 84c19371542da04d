"""Training checkpoints (DCP, any layout) <-> Hugging Face directories, streamed both ways.

`checkpoint_to_hf` never holds the model: it reads the checkpoint's metadata, then loads groups of
full tensors of about one output shard at a time (DCP assembles each from however many ranks' pieces
wrote it), converts them and writes the shard. Peak memory is about one shard (plus the largest
tensor). `hf_to_checkpoint` plans the DCP save from the safetensors headers and builds each tensor
when DCP writes it: peak memory is about one layer's stacked experts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem
from tqdm import tqdm

from megatron_exaone.checkpoint.store import (
    CorruptCheckpointError,
    checksum_problems,
    find_checkpoint,
    read_meta,
    read_tensors,
    save_checkpoint,
    saved_tensors,
)
from megatron_exaone.data.tokenizer import special_token_ids, tokenizer_json_path
from megatron_exaone.errors import UserError
from megatron_exaone.model import ModelConfig
from megatron_exaone.model.config import ConfigError

from .hf import (
    HFFormatError,
    expected_shapes,
    open_hf_dir,
    parse_size,
    staged_output,
    to_hf_tensors,
    write_hf_dir,
)

log = logging.getLogger(__name__)


class CheckpointFormatError(UserError, ValueError):
    """A training checkpoint that cannot be converted."""


@dataclasses.dataclass
class CheckpointInfo:
    path: Path
    meta: dict[str, Any]
    config: ModelConfig
    # model tensors only (no optimizer state, RNG or extras)
    tensors: dict[str, TensorStorageMetadata]


def open_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """The newest complete checkpoint under `path` (a run's checkpoints/ folder) or `path`
    itself."""
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise CheckpointFormatError(
            f"{path}: no complete checkpoint found (a checkpoint directory holds .metadata "
            "and meta.json; a run's checkpoints/ folder holds step_* directories)."
        )
    meta = read_meta(checkpoint)
    if "model_config" not in meta:
        raise CheckpointFormatError(
            f"{checkpoint / 'meta.json'} has no model_config; it was not written by "
            "exaone-train or exaone-convert."
        )
    try:
        config = ModelConfig(**meta["model_config"])
    except (TypeError, ConfigError) as exc:
        raise CheckpointFormatError(
            f"{checkpoint / 'meta.json'}: model_config is not valid: {exc}"
        ) from exc
    metadata = saved_tensors(checkpoint)
    wanted = expected_shapes(config)
    tensors = {k: v for k, v in metadata.items() if k in wanted}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise CheckpointFormatError(
            f"{checkpoint}: {len(missing)} model tensor(s) missing, e.g. {missing[:4]}."
        )
    for key, md in tensors.items():
        if tuple(md.size) != tuple(wanted[key]):
            raise CheckpointFormatError(
                f"{checkpoint}: {key} has shape {tuple(md.size)}, the model config implies "
                f"{tuple(wanted[key])}."
            )
    return CheckpointInfo(checkpoint, meta, config, tensors)


def _load(
    checkpoint: Path, metadata: dict[str, TensorStorageMetadata], keys: list[str]
) -> dict[str, torch.Tensor]:
    state = {
        k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in keys
    }
    read_tensors(checkpoint, state)
    return state


def stream_model_tensors(
    info: CheckpointInfo, group_bytes: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) in the model's order, loaded from the checkpoint in groups of about
    `group_bytes`. The checkpoint's checksums are verified meanwhile, in background threads; a
    mismatch raises `CorruptCheckpointError` after the last tensor, before a consumer can finish its
    output."""
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-check") as checker:
        problems = checker.submit(checksum_problems, info.path)
        yield from _stream_groups(info, group_bytes)
        if problems.result():
            raise CorruptCheckpointError(info.path, problems.result())


def _stream_groups(info: CheckpointInfo, group_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    order = [k for k in expected_shapes(info.config) if k in info.tensors]
    total = sum(
        info.tensors[k].size.numel() * info.tensors[k].properties.dtype.itemsize for k in order
    )
    progress = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None)
    group: list[str] = []
    size = 0
    for i, key in enumerate(order):
        md = info.tensors[key]
        group.append(key)
        size += md.size.numel() * md.properties.dtype.itemsize
        if size >= group_bytes or i == len(order) - 1:
            loaded = _load(info.path, info.tensors, group)
            for name in group:
                yield name, loaded.pop(name)
            progress.update(size)
            group, size = [], 0
    progress.close()


def checkpoint_to_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a training checkpoint of any layout as an HF directory (per-expert keys, `mtp.*`, fp32
    correction bias, config.json, generation_config.json, tokenizer files), streamed tensor group by
    tensor group."""
    info = open_checkpoint(checkpoint)
    layout = info.meta.get("layout")
    log.info(
        "converting %s (step %s, %s tokens, %s) to %s",
        info.path,
        info.meta.get("step"),
        info.meta.get("tokens"),
        f"saved with layout {layout}" if layout else "an imported model",
        out_dir,
    )
    tokenizer = run_tokenizer(tokenizer_dir, info)
    config = with_tokenizer_ids(info.config, tokenizer)
    extra = _tokenizer_files(tokenizer) if tokenizer else []
    limit = parse_size(max_shard_size)
    tensors = to_hf_tensors(stream_model_tensors(info, limit), config.tie_word_embeddings)
    return write_hf_dir(
        config, tensors, out_dir, max_shard_size=limit, dtype=dtype, extra_files=extra
    )


def run_tokenizer(tokenizer_dir: str | os.PathLike | None, info: CheckpointInfo) -> Path | None:
    """The folder of the tokenizer to export: `tokenizer_dir` (a folder or its tokenizer.json; it
    must exist), else the run's tokenizer recorded in meta.json while it still exists; None (with a
    warning naming the model config's ids that the export keeps) when there is neither."""
    if tokenizer_dir is not None:
        return tokenizer_json_path(tokenizer_dir).parent
    recorded = info.meta.get("tokenizer")
    if recorded and (Path(recorded) / "tokenizer.json").is_file():
        return Path(recorded)
    why = (
        f"the run's tokenizer {recorded} has no tokenizer.json any more"
        if recorded
        else f"{info.path / 'meta.json'} records no tokenizer"
    )
    config = info.config
    log.warning(
        "no tokenizer to export (%s): config.json and generation_config.json keep the model "
        "config's bos_token_id=%s, eos_token_id=%s, pad_token_id=%s; pass --tokenizer DIR (the "
        "tokenizer the run trained with) to take them from it",
        why,
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    return None


def with_tokenizer_ids(config: ModelConfig, tokenizer: Path | None) -> ModelConfig:
    """`config` with the bos/eos/pad token ids of `tokenizer` (those it defines), which config.json
    and generation_config.json must name for generation to stop at the tokens the run's documents
    end with."""
    if tokenizer is None:
        return config
    ids = special_token_ids(tokenizer)
    for name, value in ids.items():
        if not all(
            0 <= v < config.vocab_size for v in (value if isinstance(value, list) else [value])
        ):
            raise CheckpointFormatError(
                f"{tokenizer}: {name}={value} is outside the model's vocabulary "
                f"(vocab_size={config.vocab_size}); pass --tokenizer DIR with the tokenizer "
                "the run trained with."
            )
    log.info(
        "special token ids from %s: %s", tokenizer, ", ".join(f"{k}={v}" for k, v in ids.items())
    )
    return dataclasses.replace(config, **ids)


@torch.no_grad()
def verify_with_transformers(
    checkpoint: str | os.PathLike, hf_dir: str | os.PathLike, tokens: int = 32
) -> float:
    """Load the export with transformers' ExaoneMoeForCausalLM and our model from the checkpoint
    (both whole, in fp32: meant for small models and tests) and return the largest logit difference
    on random tokens."""
    from transformers import AutoModelForCausalLM

    from megatron_exaone.model import ExaoneMoeForCausalLM

    info = open_checkpoint(checkpoint)
    ours = ExaoneMoeForCausalLM(info.config).eval()
    ours.load_state_dict(
        dict(stream_model_tensors(info, 1 << 62)), strict=not info.config.tie_word_embeddings
    )
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(
        0, info.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
    )
    return (hf(ids).logits - ours(ids).logits).abs().max().item()


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return [tokenizer_dir / n for n in names if (tokenizer_dir / n).is_file()]


class _BuildOnWritePlanner(DefaultSavePlanner):
    """Plans a DCP save from meta-device placeholders and builds each tensor only when DCP's writer
    asks for its data (`resolve_data`, called tensor by tensor as files are written). With one file
    per tensor (DCP holds a file's tensors until it closes the file) the model is never in
    memory."""

    def __init__(self, build: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self._build = build

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self._build(write_item.index.fqn)


def hf_to_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An HF directory (per-expert or fused expert layout) as a training checkpoint
    OUT_DIR/step_00000000 that exaone-train loads under any layout (`checkpoint.load=OUT_DIR`;
    optimizer and step start fresh).

    Streamed: every name and shape is checked against config.json from the safetensors headers
    first, then each tensor (a layer's stacked experts at most) is read and written in turn. Peak
    memory is about the largest tensor, not the model. Written into a folder beside OUT_DIR
    (`staged_output`) that becomes OUT_DIR when complete."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory.")
    config, weights, sources, shapes = open_hf_dir(hf_dir)
    dtypes = {k: weights.dtypes[s.keys[0]] for k, s in sources.items()}
    placeholders = {k: torch.empty(shapes[k], dtype=dtypes[k], device="meta") for k in sources}
    total = sum(t.numel() * t.element_size() for t in placeholders.values())
    log.info(
        "writing %d tensors (%.2f GB) of %s as a training checkpoint under %s",
        len(sources),
        total / 1e9,
        hf_dir,
        out,
    )
    progress = tqdm(total=total, unit="B", unit_scale=True, desc="importing", disable=None)

    def build(key: str) -> torch.Tensor:
        tensor = sources[key].build(weights.load).to(dtypes[key])
        progress.update(tensor.numel() * tensor.element_size())
        return tensor

    meta = {
        "tokens": 0,
        "source": str(Path(hf_dir).resolve()),
        "model_config": dataclasses.asdict(config),
        "layout": None,
        "world_size": 1,
    }
    try:
        with staged_output(out) as folder:
            written = save_checkpoint(
                folder,
                0,
                placeholders,
                meta=meta,
                planner=_BuildOnWritePlanner(build),
                file_per_tensor=True,
            )
    finally:
        progress.close()
    return out / written.name


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a training checkpoint or an HF directory: config, step, tokens, layout, parameter
    counts."""
    p = Path(path)
    if (p / "config.json").is_file():
        from .hf import read_hf_config

        config, kind, meta = read_hf_config(p), "Hugging Face directory", {}
    else:
        info = open_checkpoint(p)
        config, kind, meta = info.config, f"training checkpoint {info.path.name}", info.meta
    total = sum(torch.Size(s).numel() for s in expected_shapes(config).values())
    moe_layers = sum(t == "sparse" for t in config.mlp_layer_types)
    idle_experts = config.num_experts - config.num_experts_per_tok
    active = (
        total - moe_layers * idle_experts * 3 * config.hidden_size * config.moe_intermediate_size
    )
    where = {} if kind == "Hugging Face directory" else {"checkpoint": str(info.path)}
    return {
        "kind": kind,
        "path": str(p),
        **where,
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "layout": meta.get("layout"),
        "world_size": meta.get("world_size"),
        "layers": config.num_hidden_layers,
        "mtp_layers": config.num_nextn_predict_layers,
        "hidden_size": config.hidden_size,
        "experts": f"{config.num_experts} (top-{config.num_experts_per_tok}, "
        f"{config.num_shared_experts} shared)",
        "vocab_size": config.vocab_size,
        "total_parameters": total,
        "active_parameters_per_token": active,
    }


__all__ = [
    "CheckpointFormatError",
    "checkpoint_to_hf",
    "hf_to_checkpoint",
    "describe",
    "open_checkpoint",
    "HFFormatError",
]
