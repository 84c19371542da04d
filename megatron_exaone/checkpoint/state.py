"""Layout-agnostic training state: model, optimizer, extra values and RNG states as one DCP state
dict.

Every tensor is saved under its full-model name as a DTensor *view*: this rank's plain local tensor
with the global shape, on a mesh whose dimensions are the cuts that produced the local tensor, in
the order they were taken (the `ParamLayout` shards: tensor parallel, replicated-KV or expert
parallel; then the FSDP2 Shard(0) over dp x cp or edp), plus one trailing `Replicate` dimension for
the ranks that hold the same piece. DCP reads only this rank's box (offsets and sizes) from the
view, writes each distinct box once (replicas are de-duplicated) and, on load, reads whatever boxes
the *current* layout needs: checkpoints reshard across tp / ep / dp / cp / pp.

The mesh views are built with `_init_backend=False`: no process group is created (DCP and
`DTensor.from_local` with an explicit shape never communicate over them), so building them is free,
rank-local and deterministic. Each view is a pure function of `ParallelDims`, the pipeline rank and
the list of cut axes; `_check_view` verifies that this rank's coordinates in the view reproduce the
recorded cuts, so an unknown kind of shard fails loudly instead of writing a checkpoint with wrong
offsets.

Keys: `<param or buffer name>` (model), `optim.<param name>.<state key>` (optimizer state: tensors
of the parameter's shape share its view; scalars such as AdamW's per-parameter `step` are
replicated, Python numbers as 0-d tensors), `extra` (a dict of global JSON values, from rank 0, as a
uint8 tensor of its JSON text) and `rng.rank<N>` (each rank's RNG states as JSON text, restored only
when the layout is unchanged). `te_extra_state.rank<N>.<module>._extra_state`: each rank's
Transformer Engine FP8 metadata (DelayedScaling amax histories; absent for the stateless recipes),
restored when the layout is unchanged. Nothing is pickled, so loading a checkpoint cannot run code.
`meta.json` (written by rank 0) records step, tokens, the layout, the world size and the model
config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_exaone.errors import UserError
from megatron_exaone.model.init import is_stacked_experts
from megatron_exaone.parallel.mesh import ParallelDims, ParallelMesh, rank_coordinates
from megatron_exaone.parallel.sharding import layout_of, local_tensor, plan_of
from megatron_exaone.precision import load_te_extra_state, te_extra_state

from . import store

log = logging.getLogger(__name__)

OPTIM_PREFIX = "optim."
EXTRA_KEY = "extra"


class CheckpointLayoutError(UserError, ValueError):
    """A tensor whose sharding the checkpoint code cannot describe (a new kind of shard), or a saved
    state that does not fit the model or optimizer it is loaded into."""


def rng_key(rank: int) -> str:
    return f"rng.rank{rank}"


TE_PREFIX = "te_extra_state."


def te_key(rank: int) -> str:
    """The prefix of rank `rank`'s TE extra states (`<prefix>.<module>._extra_state`)."""
    return f"{TE_PREFIX}rank{rank}"


def json_tensor(value: Any) -> torch.Tensor:
    """`value` (JSON-serialisable) as a uint8 tensor of its JSON text: DCP saves it like any
    tensor."""
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor) -> Any:
    return json.loads(tensor.numpy().tobytes().decode())


# --------------------------------------------------------------------------------------- mesh views
# A cut axis -> (this rank's chunk index, number of chunks) from the rank's coordinates.
# "tp/N": N KV heads replicated over tp > N ranks; rank t holds head t // (tp / N).
def axis_index(axis: str, coords: dict[str, int], dims: ParallelDims) -> tuple[int, int]:
    if axis == "tp":
        return coords["tp"], dims.tp
    if axis == "ep":
        return coords["ep"], dims.ep
    if axis == "edp":
        return coords["edp"], dims.edp
    # FSDP of dense parameters: dp x cp flattened, cp fastest (DeviceMesh._flatten order)
    if axis == "dp_cp":
        return coords["dp"] * dims.cp + coords["cp"], dims.dp * dims.cp
    if axis.startswith("tp/"):
        heads = int(axis[3:])
        if dims.tp % heads:
            raise CheckpointLayoutError(f"axis {axis}: tp={dims.tp} is not a multiple of {heads}")
        return coords["tp"] // (dims.tp // heads), heads
    raise CheckpointLayoutError(f"unknown cut axis {axis!r}")


def view_grid(dims: ParallelDims, pp_rank: int, axes: Sequence[str]) -> torch.Tensor:
    """The global ranks of pipeline stage `pp_rank` arranged as [count of axes[0], ..., count of
    axes[-1], R]: each rank at its chunk indices along the cut axes, and the R ranks holding the
    same piece (replicas) along the last dimension in rank order. The R dimension is left out when R
    == 1. Pure function (no process group)."""
    stage = dims.tp * dims.cp * dims.dp
    counts = [axis_index(a, rank_coordinates(pp_rank * stage, dims), dims)[1] for a in axes]
    cells: dict[tuple[int, ...], list[int]] = {}
    for rank in range(pp_rank * stage, (pp_rank + 1) * stage):
        coords = rank_coordinates(rank, dims)
        cells.setdefault(tuple(axis_index(a, coords, dims)[0] for a in axes), []).append(rank)
    replicas = {len(v) for v in cells.values()}
    if len(cells) != math.prod(counts) or len(replicas) != 1:
        raise CheckpointLayoutError(
            f"cut axes {tuple(axes)} do not tile the {stage} ranks of a pipeline stage of {dims}"
        )
    (r,) = replicas
    grid = torch.empty(*counts, r, dtype=torch.int)
    for index, ranks in cells.items():
        grid[index] = torch.tensor(ranks, dtype=torch.int)
    return grid if r > 1 else grid.squeeze(-1)


@functools.cache
def _mesh_view(
    dims: ParallelDims, pp_rank: int, axes: tuple[str, ...], device_type: str, rank: int
) -> DeviceMesh:
    grid = view_grid(dims, pp_rank, axes)
    names = tuple(a.replace("/", "_kv") for a in axes) + (
        ("replica",) if grid.ndim > len(axes) else ()
    )
    return DeviceMesh(device_type, grid, mesh_dim_names=names, _init_backend=False, _rank=rank)


@dataclass(frozen=True)
class TensorView:
    """How this rank's local tensor sits in the global tensor: global shape, and (if it is cut or
    replicated over a mesh view) the view and its placements. `mesh=None`: the local tensor is the
    whole tensor."""

    full_shape: tuple[int, ...]
    mesh: DeviceMesh | None = None
    placements: tuple = ()

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """`local` as a DCP-saveable / -loadable tensor (aliases `local`'s storage, wherever it
        lives: host tensors of a GPU run, such as offloaded master weights, get a host mesh, since
        `DTensor.from_local` would copy them to the mesh's device and DCP would load into the
        copy)."""
        if tuple(local.shape) != self.local_shape():
            raise CheckpointLayoutError(
                f"local tensor of shape {tuple(local.shape)} does not fit {self}"
            )
        if self.mesh is None:
            return local
        stride = torch.empty(self.full_shape, device="meta").stride()
        return DTensor.from_local(
            local,
            _on_device(self.mesh, local.device.type),
            self.placements,
            run_check=False,
            shape=torch.Size(self.full_shape),
            stride=stride,
        )

    def local_shape(self) -> tuple[int, ...]:
        return self.local_box()[0]

    def local_box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shape, offsets) of this rank's piece in the global tensor, as DCP will compute them."""
        if self.mesh is None:
            return self.full_shape, (0,) * len(self.full_shape)
        shape, offsets = compute_local_shape_and_global_offset(
            self.full_shape, self.mesh, self.placements
        )
        return tuple(shape), tuple(offsets)


@functools.cache
def _twin(mesh: DeviceMesh, device_type: str, rank: int) -> DeviceMesh:
    # `rank` is part of the key: meshes compare equal whatever rank they were built for
    return DeviceMesh(
        device_type, mesh.mesh, mesh_dim_names=mesh.mesh_dim_names, _init_backend=False, _rank=rank
    )


def _on_device(mesh: DeviceMesh, device_type: str) -> DeviceMesh:
    """`mesh`, or the same view of the ranks for tensors on `device_type`."""
    if mesh.device_type == device_type:
        return mesh
    return _twin(mesh, device_type, int(mesh.mesh[tuple(mesh.get_coordinate())]))


def _cuts(
    name: str, root: nn.Module, tensor: torch.Tensor, mesh: ParallelMesh
) -> list[tuple[str, int, int, int]]:
    """(axis, dim, index, count) for every cut of `tensor` (a parameter or buffer of `root`),
    outermost first."""
    layout = layout_of(root, name, tensor)
    plan = plan_of(root)
    cuts = []
    for i, shard in enumerate(layout.shards):
        if i == 0 and shard.dim == 0 and is_stacked_experts(name) and shard.count == mesh.dims.ep:
            axis = "ep"
        elif name in plan.tp_replicated_kv and shard.count != mesh.dims.tp:
            axis = f"tp/{shard.count}"
        elif shard.count == mesh.dims.tp:
            axis = "tp"
        else:
            raise CheckpointLayoutError(
                f"{name}: cannot tell which parallel dimension made shard {shard}"
            )
        cuts.append((axis, shard.dim, shard.index, shard.count))
    if isinstance(tensor, DTensor):  # FSDP2: Shard(0) of the local (TP/EP) tensor over a 1-D mesh
        dmesh = tensor.device_mesh
        for mesh_dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Replicate):
                continue
            if type(placement) is not DShard:
                raise CheckpointLayoutError(f"{name}: unsupported DTensor placement {placement}")
            axis = "edp" if is_stacked_experts(name) else "dp_cp"
            cuts.append((axis, placement.dim, dmesh.get_local_rank(mesh_dim), dmesh.size(mesh_dim)))
    return cuts


def tensor_view(name: str, root: nn.Module, tensor: torch.Tensor, mesh: ParallelMesh) -> TensorView:
    """The view of parameter/buffer `name` of `root` (a model or pipeline chunk) on this rank."""
    layout = layout_of(root, name, tensor)
    cuts = _cuts(name, root, tensor, mesh)
    if not cuts:
        # whole tensor on every holder: DCP keeps one copy per key
        return TensorView(layout.full_shape)
    axes = tuple(c[0] for c in cuts)
    view = _mesh_view(mesh.dims, mesh.pp_rank, axes, mesh.dense.device_type, mesh.rank)
    placements = tuple(DShard(c[1]) for c in cuts) + (
        (Replicate(),) if view.ndim > len(cuts) else ()
    )
    _check_view(name, view, cuts)
    return TensorView(layout.full_shape, view, placements)


def _check_view(name: str, view: DeviceMesh, cuts: list[tuple[str, int, int, int]]) -> None:
    coordinate = view.get_coordinate()
    for mesh_dim, (axis, _dim, index, count) in enumerate(cuts):
        if coordinate is None or coordinate[mesh_dim] != index or view.size(mesh_dim) != count:
            raise CheckpointLayoutError(
                f"{name}: its shard {index}/{count} does not match this rank's {axis} "
                f"coordinate {coordinate} in {view}"
            )


def _persistent_buffers(root: nn.Module):
    for module_name, module in root.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{buffer_name}" if module_name else buffer_name), buffer


def _entries(
    chunks: Sequence[nn.Module], mesh: ParallelMesh
) -> dict[str, tuple[torch.Tensor, TensorView]]:
    """name -> (parameter or persistent buffer, its view), over this rank's chunks."""
    out: dict[str, tuple[torch.Tensor, TensorView]] = {}
    for chunk in chunks:
        for name, tensor in [*chunk.named_parameters(), *_persistent_buffers(chunk)]:
            if name in out:
                raise CheckpointLayoutError(f"{name} appears in two model chunks of one rank")
            out[name] = tensor, tensor_view(name, chunk, tensor, mesh)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return local_tensor(t).detach()


# -------------------------------------------------------------------------------------------- model
def _masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """The FP32 masters an optimizer keeps off the parameters (`optim.offload=cpu`), else none."""
    return optimizer.master_weights() if hasattr(optimizer, "master_weights") else {}


def model_state(
    chunks: Sequence[nn.Module],
    mesh: ParallelMesh,
    masters: dict[int, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Every parameter and persistent buffer of this rank's chunks as a DCP tensor (aliasing the
    local storage) keyed by its full-model name. `dcp.save` writes it; `dcp.load` into it loads in
    place. `masters` (id(parameter) -> its FP32 master's local tensor, kept by an optimizer that
    offloads them) stand in for their parameters: the weights saved and loaded are the masters."""
    masters = masters or {}
    with torch.no_grad():
        return {
            name: view.wrap(masters.get(id(t), _local(t)))
            for name, (t, view) in _entries(chunks, mesh).items()
        }


def load_model_state(
    chunks: Sequence[nn.Module], mesh: ParallelMesh, checkpoint_dir: str | Path
) -> None:
    """Load the model weights of checkpoint `checkpoint_dir` (any layout) into this rank's chunks,
    in place."""
    with torch.no_grad():
        store.load_checkpoint(checkpoint_dir, model_state(chunks, mesh))


# ---------------------------------------------------------------------------------------- optimizer
def _param_views(
    chunks: Sequence[nn.Module], mesh: ParallelMesh
) -> dict[int, tuple[str, TensorView]]:
    return {
        id(t): (name, view)
        for name, (t, view) in _entries(chunks, mesh).items()
        if isinstance(t, nn.Parameter)
    }


def _optimizer_entries(chunks, optimizer, mesh) -> dict[str, tuple[torch.nn.Parameter, str, Any]]:
    """key -> (parameter, state key, DCP tensor) for every optimizer state entry of this rank (a
    Python number becomes a 0-d tensor)."""
    views = _param_views(chunks, mesh)
    out = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in views:
                    raise CheckpointLayoutError(
                        "the optimizer holds a parameter that is not in the model chunks"
                    )
                name, view = views[id(p)]
                for key, value in optimizer.state.get(p, {}).items():
                    full_key = f"{OPTIM_PREFIX}{name}.{key}"
                    if (
                        isinstance(value, torch.Tensor)
                        and tuple(_local(value).shape) == tuple(_local(p).shape)
                        and value.ndim
                    ):
                        out[full_key] = p, key, view.wrap(_local(value))
                    elif (
                        isinstance(value, torch.Tensor)
                        and not isinstance(value, DTensor)
                        and value.numel() == 1
                    ):
                        # e.g. AdamW's step: the same on every holder
                        out[full_key] = p, key, value.detach()
                    elif isinstance(value, (bool, int, float)):
                        out[full_key] = p, key, torch.tensor(value)
                    else:
                        raise CheckpointLayoutError(
                            f"{full_key}: cannot checkpoint optimizer state of type "
                            f"{type(value).__name__} / shape {getattr(value, 'shape', '')}"
                        )
    return out


def optimizer_state(
    chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer, mesh: ParallelMesh
) -> dict[str, Any]:
    """The optimizer's per-parameter state as DCP values keyed `optim.<param name>.<state key>`.
    Hyper-parameters of the param groups (lr, betas, ...) are not saved: they come from the run's
    config and LR schedule."""
    return {k: v for k, (_p, _key, v) in _optimizer_entries(chunks, optimizer, mesh).items()}


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of every parameter that has none, as the optimizer's first step would
    (AdamW: zero moments), with step counters reset to 0: the next real step is bit-identical to a
    fresh optimizer's. Done by one step on zero gradients at lr 0, which leaves the parameters
    bit-identical; parameters that already have a state get no gradient, so the optimizer skips them
    and their state is untouched."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if p.requires_grad and not optimizer.state.get(p)]
    if not missing:
        return
    saved_grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
        for p in missing:
            for key, value in optimizer.state.get(p, {}).items():
                if key == "step" and isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    optimizer.state[p][key] = type(value)(0)
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in zip(params, saved_grads):
            p.grad = grad


def _prepare_optimizer_load(
    chunks, optimizer, mesh, saved_keys: set[str]
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], None]]:
    """The optimizer part of a load: (state dict to load into, function to call with it after
    `dcp.load`)."""
    init_optimizer_state(optimizer)
    entries = _optimizer_entries(chunks, optimizer, mesh)
    by_param: dict[int, list[str]] = {}
    for key, (p, _k, _v) in entries.items():
        by_param.setdefault(id(p), []).append(key)
    for keys in by_param.values():
        present = [k for k in keys if k in saved_keys]
        if present and len(present) != len(keys):
            raise CheckpointLayoutError(
                f"the checkpoint has {present} but not {sorted(set(keys) - set(present))}:"
                " it was written by another optimizer"
            )
        # no state saved for this parameter (it had never been stepped): none after the load
        if not present:
            optimizer.state.pop(entries[keys[0]][0], None)
            for k in keys:
                del entries[k]
    state = {k: v for k, (_p, _key, v) in entries.items()}

    def finish(loaded: dict[str, Any]) -> None:
        for key, (p, state_key, _value) in entries.items():
            current = optimizer.state[p][state_key]
            if not isinstance(current, torch.Tensor):  # a Python number, saved as a 0-d tensor
                optimizer.state[p][state_key] = type(current)(loaded[key].item())

    return state, finish


def load_optimizer_state(
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    mesh: ParallelMesh,
    checkpoint_dir: str | Path,
) -> None:
    """Load the optimizer state of `checkpoint_dir` (any layout) into `optimizer`, creating missing
    states first."""
    state, finish = _prepare_optimizer_load(
        chunks, optimizer, mesh, set(store.saved_tensors(checkpoint_dir))
    )
    store.load_checkpoint(checkpoint_dir, state)
    finish(state)


# ----------------------------------------------------------------------------------- RNG and extras
def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON values: torch (CPU and, if initialized, every CUDA device),
    Python, NumPy."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        name, keys, position, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), position, has_gauss, cached]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def layout_record(mesh: ParallelMesh) -> dict[str, Any]:
    return {"layout": dataclasses.asdict(mesh.dims), "world_size": _rank_world()[1]}


def te_state(chunks: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's non-empty Transformer Engine extra states (DelayedScaling amax histories and
    scales; the stateless recipes have none), keyed `<module>._extra_state`."""
    return {
        key: value
        for chunk in chunks
        for key, value in te_extra_state(chunk).items()
        if value.numel()
    }


def restore_te_state(
    chunks: Sequence[nn.Module], state: dict[str, torch.Tensor], checkpoint: Path
) -> None:
    """Put saved TE extra states back. TE >= 2.18 refuses to unpickle DelayedScaling state unless
    NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1; then the run goes on with a fresh amax history and says
    so."""
    try:
        for chunk in chunks:
            load_te_extra_state(chunk, state, strict=False)
    except RuntimeError as exc:
        log.warning(
            "%s: Transformer Engine did not load its saved FP8 scaling state (%s); the "
            "delayed-scaling amax history restarts. For a checkpoint you trust, set "
            "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 to keep it.",
            checkpoint,
            str(exc).splitlines()[0],
        )


# -------------------------------------------------------------------------------------- save / load
def save(
    root: str | Path,
    step: int,
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    mesh: ParallelMesh,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    *,
    meta: dict[str, Any] | None = None,
    model_config: Any = None,
    async_save: bool = False,
) -> Path | store.PendingCheckpoint:
    """Save model, optimizer, `extra` (global JSON values: progress, loader state, counters; rank
    0's copy is kept) and every rank's RNG states as ROOT/step_N. Collective: every rank calls it.

    meta.json gets step, tokens (`extra["tokens"]` if given), the layout, the world size and the
    model config (`model_config`, else the chunks' `.config`), then the entries of `meta` (JSON
    values; they win).

    `async_save=True` returns a `store.PendingCheckpoint` once the state is copied to memory
    (training may go on and change the weights); the next save waits for it, and
    `wait_pending_save()` must run on every rank before the process group is destroyed. `latest` is
    written only once the whole checkpoint is on disk. Otherwise returns the checkpoint directory
    once it is visible."""
    rank, _ = _rank_world()
    extra = dict(extra or {})
    state = model_state(chunks, mesh, _masters(optimizer))
    if optimizer is not None:
        state.update(optimizer_state(chunks, optimizer, mesh))
    if rank == 0:
        state[EXTRA_KEY] = json_tensor(extra)
    state[rng_key(rank)] = json_tensor(rng_state())
    state.update({f"{te_key(rank)}.{name}": value for name, value in te_state(chunks).items()})
    config = model_config if model_config is not None else getattr(chunks[0], "config", None)
    record = {
        "tokens": extra.get("tokens"),
        **layout_record(mesh),
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        **(meta or {}),
    }
    if async_save:
        return store.async_save_checkpoint(
            root, step, state, meta=record, keep_last=keep_last, group=mesh.background_group
        )
    return store.save_checkpoint(root, step, state, meta=record, keep_last=keep_last)


def wait_pending_save() -> Path | None:
    """Wait (on every rank) for the async save in flight, if any; returns its directory once it is
    visible."""
    return store.wait_pending()


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load` read: the checkpoint directory, its meta.json and the saved `extra` values ({}
    for a checkpoint without them, such as a converted HF model)."""

    path: Path
    meta: dict[str, Any]
    extra: dict[str, Any]


def load(
    path: str | Path,
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    mesh: ParallelMesh,
    restore_rng: bool = True,
) -> LoadedCheckpoint | None:
    """Load the checkpoint at `path` (one checkpoint, or a root: its newest usable one) into this
    rank's chunks and optimizer, whatever layout wrote it; None when there is no checkpoint.
    Collective.

    The files' checksums are verified while they load. Under a root, a checkpoint whose files do not
    match falls back to the previous one with a warning naming the file; a checkpoint named
    directly, or the last one left, raises `store.CorruptCheckpointError`.

    Optimizer states absent from the checkpoint (a model-only checkpoint, or parameters never
    stepped) are left empty, as in a fresh optimizer. Per-rank RNG states are restored when the
    layout (sizes and world size) is unchanged, and skipped with a log line otherwise. Call before
    the first forward pass (FSDP2 parameters must be in their sharded state)."""
    candidates = store.checkpoint_candidates(path)
    for i, checkpoint in enumerate(candidates):
        try:
            return _load_one(checkpoint, chunks, optimizer, mesh, restore_rng)
        except store.CorruptCheckpointError as exc:
            if i + 1 == len(candidates):
                raise
            log.warning("%s; falling back to the previous checkpoint %s", exc, candidates[i + 1])
    return None


def _load_one(
    checkpoint: Path,
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    mesh: ParallelMesh,
    restore_rng: bool,
) -> LoadedCheckpoint:
    meta = store.read_meta(checkpoint)
    rank, _ = _rank_world()
    saved = store.saved_tensors(checkpoint)
    state = model_state(chunks, mesh, _masters(optimizer))
    finish = None
    if optimizer is not None:
        optim_state, finish = _prepare_optimizer_load(chunks, optimizer, mesh, set(saved))
        state.update(optim_state)

    def receive(key: str) -> None:  # a JSON / TE entry: a uint8 tensor of the saved size
        state[key] = torch.empty(tuple(saved[key].size), dtype=saved[key].properties.dtype)

    if EXTRA_KEY in saved:
        receive(EXTRA_KEY)
    same_layout = {k: meta.get(k) for k in ("layout", "world_size")} == layout_record(mesh)
    rng_restored = restore_rng and same_layout and rng_key(rank) in saved
    if rng_restored:
        receive(rng_key(rank))
    elif restore_rng and rank == 0 and meta.get("layout") is not None:  # imports hold no RNG
        log.info(
            "checkpoint %s was written by layout %s on %s ranks, this run is %s on %s ranks: "
            "per-rank RNG states are not restored",
            checkpoint,
            meta.get("layout"),
            meta.get("world_size"),
            layout_record(mesh)["layout"],
            layout_record(mesh)["world_size"],
        )
    own_te = [key for key in saved if key.startswith(f"{te_key(rank)}.")]
    if same_layout:
        for key in own_te:
            receive(key)
    elif rank == 0 and any(key.startswith(TE_PREFIX) for key in saved):
        log.info(
            "the checkpoint's Transformer Engine FP8 scaling state was written by another layout: "
            "the delayed-scaling amax history restarts"
        )
    with torch.no_grad():
        store.load_checkpoint(checkpoint, state)
    if finish is not None:
        finish(state)
    if hasattr(optimizer, "load_masters_into_params"):
        optimizer.load_masters_into_params()
    if rng_restored:
        set_rng_state(from_json_tensor(state[rng_key(rank)]))
    if same_layout and own_te:
        restore_te_state(
            chunks, {key[len(te_key(rank)) + 1 :]: state[key] for key in own_te}, checkpoint
        )
    extra = from_json_tensor(state[EXTRA_KEY]) if EXTRA_KEY in state else {}
    return LoadedCheckpoint(checkpoint, meta, extra)
