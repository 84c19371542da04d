"""Hugging Face format <-> our full state dict.

Our names equal transformers' on-disk names except for the routed experts, which we keep stacked
(`mlp.experts.{gate,up,down}_proj` of shape [E, ...]) and HF stores per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`). `from_hf` also reads the fused layout transformers
keeps in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I],
`mlp.gate.e_score_correction_bias`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_exaone.errors import UserError
from megatron_exaone.files import write_json_atomic
from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig
from megatron_exaone.model.config import SPARSE, ConfigError

_STACKED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_GATE_UP = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.gate_up_proj$")
_BIAS_IN_GATE = re.compile(r"^(?P<prefix>.*\.mlp)\.gate\.e_score_correction_bias$")
_BIAS = "e_score_correction_bias"
_SHARED_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")

log = logging.getLogger(__name__)


class HFFormatError(UserError, ValueError):
    """A Hugging Face directory or state dict that does not describe this model."""


# -------------------------------------------------------------------------------------- key mapping
def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our full state dict's keys and shapes for `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def empty_shared_expert_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of the zero-element shared-expert tensors transformers'
    `ExaoneMoeForCausalLM` keeps (and saves) in every sparse layer when num_shared_experts is 0; our
    model has no such module."""
    if config.num_shared_experts:
        return {}
    hidden = config.hidden_size
    shapes = {"gate_proj": (0, hidden), "up_proj": (0, hidden), "down_proj": (hidden, 0)}
    return {
        f"model.layers.{i}.mlp.shared_experts.{proj}.weight": shapes[proj]
        for i, kind in enumerate(config.mlp_layer_types)
        if kind == SPARSE
        for proj in _SHARED_EXPERT_PROJS
    }


def without_empty_shared_experts(
    hf_shapes: Mapping[str, Sequence[int]], config: ModelConfig, source: str
) -> dict[str, Sequence[int]]:
    """`hf_shapes` less the zero-element shared-expert tensors of a num_shared_experts=0 model; such
    a name holding data is refused (config.json and the weights disagree)."""
    empty = empty_shared_expert_shapes(config)
    for key in empty.keys() & hf_shapes.keys():
        if math.prod(hf_shapes[key]):
            raise HFFormatError(
                f"{source}: {key} has shape {tuple(hf_shapes[key])}, but config.json has "
                "num_shared_experts=0, which leaves it empty; fix num_shared_experts in "
                "config.json or remove the tensor."
            )
    return {k: v for k, v in hf_shapes.items() if k not in empty}


def to_hf_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], tie_word_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs from (our key, tensor) pairs, one at a time: stacked experts become
    per-expert keys. Works on a lazy stream, so a converter never needs the whole model at once."""
    for key, tensor in tensors:
        if tie_word_embeddings and key == "lm_head.weight":
            continue
        match = _STACKED.match(key)
        if match:
            for e in range(tensor.shape[0]):
                yield f"{match['prefix']}.{e}.{match['proj']}.weight", tensor[e]
        else:
            yield key, tensor


@dataclasses.dataclass(frozen=True)
class HFSource:
    """How one of our tensors is made from HF tensors: `keys` in expert order, stacked ("stack");
    one half of a fused gate_up tensor ("gate" / "up"); or one tensor as it is ("same")."""

    keys: tuple[str, ...]
    how: str = "same"

    def shape(self, hf_shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        first = tuple(hf_shapes[self.keys[0]])
        if self.how == "stack":
            return (len(self.keys), *first)
        if self.how in ("gate", "up"):
            return (first[0], first[1] // 2, *first[2:])
        return first

    def build(self, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.how == "stack":
            return torch.stack([load(k) for k in self.keys])
        if self.how in ("gate", "up"):
            gate, up = load(self.keys[0]).chunk(2, dim=1)
            return gate if self.how == "gate" else up
        return load(self.keys[0])


def map_hf_keys(
    hf_keys: Iterable[str], config: ModelConfig, source: str = "state dict"
) -> dict[str, HFSource]:
    """Our key -> where its tensor comes from, for HF keys in the per-expert or the fused expert
    layout. Reads no tensor data, so a converter can check a whole directory before loading
    anything."""
    out: dict[str, HFSource] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for key in hf_keys:
        if m := _PER_EXPERT.match(key):
            experts.setdefault((m["prefix"], m["proj"]), {})[int(m["e"])] = key
        elif m := _FUSED_GATE_UP.match(key):
            out[f"{m['prefix']}.gate_proj"], out[f"{m['prefix']}.up_proj"] = (
                HFSource((key,), "gate"),
                HFSource((key,), "up"),
            )
        elif m := _BIAS_IN_GATE.match(key):
            out[f"{m['prefix']}.{_BIAS}"] = HFSource((key,))
        else:
            out[key] = HFSource((key,))
    for (prefix, proj), by_index in experts.items():
        count = config.num_experts
        missing = sorted(set(range(count)) - set(by_index))
        if missing:
            raise HFFormatError(
                f"{source}: {prefix}.{{e}}.{proj}.weight is missing for experts {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''} (config has num_experts={count})."
            )
        extra = sorted(set(by_index) - set(range(count)))
        if extra:
            raise HFFormatError(
                f"{source}: unexpected expert indices {extra[:8]} for {prefix}.*.{proj} "
                f"(config has num_experts={count})."
            )
        out[f"{prefix}.{proj}"] = HFSource(tuple(by_index[e] for e in range(count)), "stack")
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_tensors(
    hf: Mapping[str, torch.Tensor], config: ModelConfig, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Our full state dict from HF tensors (per-expert or fused layout), checked against
    `config`."""
    sources, _ = checked_sources({k: v.shape for k, v in hf.items()}, config, source)
    return {k: s.build(hf.__getitem__) for k, s in sources.items()}


def checked_sources(
    hf_shapes: Mapping[str, Sequence[int]], config: ModelConfig, source: str
) -> tuple[dict[str, HFSource], dict[str, tuple[int, ...]]]:
    """`map_hf_keys` of HF tensor shapes, every resulting name and shape checked against `config`:
    (our key -> its source, our key -> its shape). Reads no tensor data."""
    sources = map_hf_keys(without_empty_shared_experts(hf_shapes, config, source), config, source)
    shapes = {k: s.shape(hf_shapes) for k, s in sources.items()}
    check_shapes(shapes, config, source)
    return sources, shapes


def check_shapes(shapes: Mapping[str, Sequence[int]], config: ModelConfig, source: str) -> None:
    """Raise HFFormatError naming missing keys, unexpected keys or shape mismatches of our state
    dict's shapes."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    if missing:
        raise HFFormatError(
            f"{source}: missing {len(missing)} tensor(s), e.g. {missing[:5]}. The weights do not "
            "match config.json (wrong number of layers or experts, or an incomplete checkpoint?)."
        )
    if unexpected:
        raise HFFormatError(
            f"{source}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}. The weights "
            "do not match config.json."
        )
    for key, shape in want.items():
        if tuple(shapes[key]) != tuple(shape):
            raise HFFormatError(
                f"{source}: {key} has shape {tuple(shapes[key])}, config.json implies "
                f"{tuple(shape)}."
            )


# ------------------------------------------------------------------------------------------ writing
def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(
            f"max_shard_size={size!r}: use a number of bytes or a size like '5GB' or '500MiB'."
        )
    unit = (m[2] or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    scale = 2 ** (10 * power) if "I" in unit else 10 ** (3 * power)
    return int(float(m[1]) * scale)


def generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "_from_model_config": True,
    }


def _hf_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------- output folders
def current_umask() -> int:
    """The process umask, read from /proc where possible: reading it with os.umask means setting it,
    which races with other threads creating files."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def partial_dir(out: Path) -> Path:
    """This process's hidden folder beside `out` while `out` is written, named after its owner
    (host, pid) so that a later run can tell a dead owner's leftover from a live conversion's
    folder."""
    return out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_partials(out: Path) -> None:
    """Remove the partial folders of `out` whose owner on this host no longer runs (a conversion
    killed by SIGKILL, the OOM killer or a power loss). Another host's folder is left alone: its pid
    means nothing here."""
    owned = re.compile(
        rf"\.{re.escape(out.name)}\.partial-{re.escape(socket.gethostname())}-(?P<pid>\d+)"
    )
    dead = [
        p
        for p in out.parent.iterdir()
        if (m := owned.fullmatch(p.name)) and not _process_alive(int(m["pid"]))
    ]
    for folder in dead:
        shutil.rmtree(folder, ignore_errors=True)
    if dead:
        log.info(
            "removed %s, left by a conversion to %s that was killed before it finished",
            ", ".join(p.name for p in dead),
            out,
        )


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new folder to write `out` into (`partial_dir`), renamed to `out` when the body completes
    (replacing an empty `out`) and removed when the body raises: an error, KeyboardInterrupt
    (SIGINT), or SystemExit (SIGTERM under exaone-convert). Dead conversions' leftovers of `out` are
    removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(out)
    staging = partial_dir(out)
    staging.mkdir()  # mode 0o777 less the umask, like any folder (tempfile.mkdtemp's is 0o700)
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    folder: Path,
    limit: int,
    dtype: torch.dtype | None,
    empty_shapes: Mapping[str, tuple[int, ...]],
) -> torch.dtype:
    """Stream (HF key, tensor) pairs, then zero-element tensors of `empty_shapes` (in the weights'
    dtype), into `folder`'s safetensors: `model.safetensors`, or `model-0000k-of-0000N.safetensors`
    and their index. Returns the weights' dtype."""
    file_mode = 0o666 & ~current_umask()  # safetensors creates its files 0o600
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total_bytes = 0
    weights_dtype = dtype
    written: list[str] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"shard-{len(written):05d}.safetensors"
            save_file(pending, str(folder / name), metadata={"format": "pt"})
            os.chmod(folder / name, file_mode)
            written.append(name)
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    def add(key: str, tensor: torch.Tensor) -> None:
        nonlocal pending_bytes, total_bytes, weights_dtype
        target = torch.float32 if key.endswith(_BIAS) else (dtype or tensor.dtype)
        tensor = tensor.detach().to("cpu", target).contiguous()
        weights_dtype = weights_dtype or tensor.dtype
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[key] = tensor
        pending_bytes += size
        total_bytes += size

    for key, tensor in tensors:
        add(key, tensor)
    weights_dtype = weights_dtype or torch.float32
    for key, shape in empty_shapes.items():
        add(key, torch.empty(shape, dtype=weights_dtype))
    flush()

    if len(written) == 1:
        os.replace(folder / written[0], folder / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, (name, keys) in enumerate(zip(written, shards)):
            final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(folder / name, folder / final)
            weight_map.update({k: final for k in keys})
        write_json_atomic(
            folder / "model.safetensors.index.json",
            {
                "metadata": {"total_size": total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
    return weights_dtype


def write_hf_dir(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    extra_files: Iterable[Path] = (),
) -> Path:
    """Stream (HF key, tensor) pairs into safetensors shards of at most `max_shard_size` (a single
    tensor larger than that gets a shard of its own), adding the zero-element shared-expert tensors
    transformers expects when num_shared_experts is 0. Written into a folder beside `out_dir`
    (`staged_output`) and renamed into place only when complete; an existing `out_dir` is refused
    rather than overwritten. Files and folders get the modes the umask gives."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(
            f"{out} already exists; choose a new output directory or remove it first."
        )
    limit = parse_size(max_shard_size)
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise NotADirectoryError(f"cannot create {out}: {existing} is not a writable directory.")
    with staged_output(out) as folder:
        weights_dtype = _write_shards(
            tensors, folder, limit, dtype, empty_shared_expert_shapes(config)
        )
        hf_config = config.to_hf_config()
        hf_config["dtype"] = _hf_dtype_name(weights_dtype)
        write_json_atomic(folder / "config.json", hf_config)
        write_json_atomic(folder / "generation_config.json", generation_config(config))
        for extra in extra_files:
            # not copy2: a copy gets the umask's mode
            shutil.copyfile(extra, folder / Path(extra).name)
    return out


def to_hf(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a full state dict of `ExaoneMoeForCausalLM` as a Hugging Face model directory."""
    check_shapes(
        {
            k: v.shape
            for k, v in state_dict.items()
            if not (config.tie_word_embeddings and k == "lm_head.weight")
        },
        config,
        "state dict",
    )
    return write_hf_dir(
        config,
        to_hf_tensors(state_dict.items(), config.tie_word_embeddings),
        out_dir,
        max_shard_size=max_shard_size,
        dtype=dtype,
    )


# ------------------------------------------------------------------------------------------ reading
def read_hf_config(hf_dir: str | os.PathLike, **overrides) -> ModelConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFFormatError(
            f"{path} not found: an HF model directory needs config.json next to its safetensors."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFFormatError(f"{path}: not valid JSON ({exc}).") from exc
    try:
        return ModelConfig.from_hf_config(data, **overrides)
    except (ConfigError, TypeError) as exc:
        raise HFFormatError(f"{path}: {exc}") from exc


def safetensors_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The weight files of an HF directory, from its index when sharded; every listed shard must
    exist."""
    root = Path(hf_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise HFFormatError(f"{index}: not a valid safetensors index ({exc}).") from exc
        files = [root / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise HFFormatError(
                    f"{f} is listed in {index.name} but missing: the download or copy is "
                    "incomplete."
                )
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise HFFormatError(f"{root}: no model.safetensors or model.safetensors.index.json found.")


# safetensors' dtype names (the header's "dtype" field)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsDir:
    """The tensors of an HF directory's safetensors files: names, shapes and dtypes from the file
    headers at once, data only when `load` asks for a tensor. A truncated or corrupt file is named
    in the error."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in files:
            with self._reading(path), safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    info = handle.get_slice(key)
                    if info.get_dtype() not in _SAFETENSORS_DTYPES:
                        raise HFFormatError(
                            f"{path}: tensor {key} has dtype {info.get_dtype()}, which the "
                            "converter does not read."
                        )
                    self.file[key] = path
                    self.shapes[key] = tuple(info.get_shape())
                    self.dtypes[key] = _SAFETENSORS_DTYPES[info.get_dtype()]

    @staticmethod
    @contextlib.contextmanager
    def _reading(path: Path) -> Iterator[None]:
        try:
            yield
        except (SafetensorError, OSError) as exc:
            raise HFFormatError(
                f"{path}: cannot read safetensors ({exc}); the file is truncated or corrupt."
            ) from exc

    def load(self, key: str) -> torch.Tensor:
        # Opened per tensor: a file kept open keeps every page read from it resident in this
        # process.
        path = self.file[key]
        with self._reading(path), safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)


def from_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF directory (per-expert or fused expert layout) into (ModelConfig, our full state
    dict), after checking every tensor's name and shape against config.json.

    `mtp.*` tensors are required when config.json has num_nextn_predict_layers > 0.
    """
    config, weights, sources, _ = open_hf_dir(hf_dir)
    return config, {k: s.build(weights.load) for k, s in sources.items()}


def open_hf_dir(
    hf_dir: str | os.PathLike,
) -> tuple[ModelConfig, SafetensorsDir, dict[str, HFSource], dict[str, tuple[int, ...]]]:
    """(config, its weights' headers, our key -> source, our key -> shape) of an HF directory, every
    name and shape checked against config.json before any tensor data is read."""
    config = read_hf_config(hf_dir)
    weights = SafetensorsDir(safetensors_files(hf_dir))
    return config, weights, *checked_sources(weights.shapes, config, str(hf_dir))
