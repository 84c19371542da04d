"""Parallel layout: the sizes (`ParallelDims`), their validation, and the one place process groups
are created (`build_mesh` -> `ParallelMesh`).

Ranks follow Megatron-Core's order, tp fastest: rank = tp + TP*cp + TP*CP*dp + TP*CP*DP*pp. Experts
use a second grid over the same ranks ("MoE parallel folding"): within a pipeline stage the TP*CP*DP
ranks are re-split as edp x ep x etp with etp fastest, so rank = etp + ETP*ep + ETP*EP*edp +
TP*CP*DP*pp.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from megatron_exaone.errors import UserError

if TYPE_CHECKING:
    from megatron_exaone.config.schema import ParallelConfig
from megatron_exaone.model.config import SPARSE, ModelConfig

DENSE_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")
_SIZE_FIELDS = ("tp", "pp", "vpp", "ep", "etp", "dp", "cp")


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot run on this world size or model; the message says what to
    change."""


@dataclass(frozen=True)
class ParallelDims:
    """Parallel sizes. `dp=None` means "derive from the world size"; `vpp` is virtual stages per
    pipeline rank."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int | None = None
    cp: int = 1

    @classmethod
    def of(cls, parallel: ParallelConfig) -> ParallelDims:
        """The sizes of a `parallel` recipe group."""
        return cls(**{f.name: getattr(parallel, f.name) for f in dataclasses.fields(cls)})

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self._resolved_dp() * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: the ranks of a pipeline stage left over after ep x etp."""
        return self.tp * self.cp * self._resolved_dp() // (self.ep * self.etp)

    def _resolved_dp(self) -> int:
        if self.dp is None:
            raise LayoutError("dp is not known yet: call ParallelDims.resolve(world_size) first.")
        return self.dp

    def resolve(self, world_size: int) -> ParallelDims:
        """These sizes with dp derived from the world size when it was left out."""
        if self.dp is not None:
            return self
        problem = _size_problem(self) or _world_problem(self, world_size)
        if problem:
            _raise(self, world_size, None, problem)
        return dataclasses.replace(self, dp=world_size // (self.tp * self.cp * self.pp))

    def validate(self, world_size: int, model_config: ModelConfig | None = None) -> ParallelDims:
        """Check every layout rule (no process group needed); return the resolved sizes or raise
        `LayoutError`."""
        problem = _first_problem(self, world_size, model_config)
        if problem:
            _raise(self, world_size, model_config, problem)
        return self.resolve(world_size)


# --------------------------------------------------------------------------------------- validation
# A problem is (message, fields worth suggesting other values for).
_Problem = tuple[str, tuple[str, ...]]


def _size_problem(d: ParallelDims) -> _Problem | None:
    for name in _SIZE_FIELDS:
        value = getattr(d, name)
        if name == "dp" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name}={value!r}: every parallel size must be an integer >= 1.", ()
    return None


def _world_problem(d: ParallelDims, world: int) -> _Problem | None:
    inner = d.tp * d.cp * d.pp
    grid = f"tp={d.tp} cp={d.cp} pp={d.pp}"
    blame = tuple(n for n in ("tp", "cp", "pp") if getattr(d, n) > 1)
    if d.dp is None:
        if world % inner:
            return (
                f"tp*cp*pp = {inner} ({grid}) does not divide the world size {world}: the ranks "
                "form a tp x cp x dp x pp grid.",
                blame,
            )
        return None
    if inner * d.dp != world:
        hint = f" Leave dp unset to derive dp={world // inner}." if world % inner == 0 else ""
        return (
            f"tp*cp*dp*pp = {inner * d.dp} ({grid} dp={d.dp}) but the world size is {world}.{hint}",
            ("dp",) + blame,
        )
    return None


def _layout_problem(d: ParallelDims, world: int) -> _Problem | None:
    if d.vpp > 1 and d.pp == 1:
        return (
            f"vpp={d.vpp} needs pp > 1: virtual pipeline stages interleave across pipeline ranks. "
            "Set vpp=1 or pp >= 2.",
            ("pp", "vpp"),
        )
    if d.etp not in (1, d.tp):
        return (
            f"etp={d.etp} with tp={d.tp}: expert tensor parallel must be 1 (experts unsplit, the "
            f"usual choice with EP) or equal to tp={d.tp}.",
            ("etp",),
        )
    stage = d.tp * d.cp * (d.dp if d.dp is not None else world // (d.tp * d.cp * d.pp))
    if stage % (d.ep * d.etp):
        return (
            f"ep*etp = {d.ep * d.etp} (ep={d.ep} etp={d.etp}) does not divide tp*cp*dp = {stage}: "
            f"MoE parallel folding re-splits the {stage} ranks of a pipeline stage into edp x ep x "
            "etp.",
            ("ep",),
        )
    return None


def _model_problem(d: ParallelDims, m: ModelConfig) -> _Problem | None:
    heads, kv = m.num_attention_heads, m.num_key_value_heads
    if heads % d.tp:
        return (
            f"tp={d.tp} does not divide num_attention_heads={heads}: each tensor-parallel rank "
            "holds whole query heads.",
            ("tp",),
        )
    if kv % d.tp and d.tp % kv:
        return (
            f"tp={d.tp} and num_key_value_heads={kv}: one must divide the other (tp <= kv splits "
            "the KV heads, tp > kv replicates each KV head tp/kv times).",
            ("tp",),
        )
    if SPARSE not in m.mlp_layer_types:
        if d.ep > 1:
            return f"ep={d.ep} but the model has no MoE layers: use ep=1.", ("ep",)
    elif d.ep > m.num_experts:
        return (
            f"ep={d.ep} exceeds num_experts={m.num_experts}: every expert-parallel rank needs at "
            "least one expert.",
            ("ep",),
        )
    elif m.num_experts % d.ep:
        return (
            f"ep={d.ep} does not divide num_experts={m.num_experts}: each expert-parallel rank "
            "holds num_experts/ep experts.",
            ("ep",),
        )
    if m.num_hidden_layers < d.pp * d.vpp:
        return (
            f"pp*vpp = {d.pp * d.vpp} pipeline stages (pp={d.pp} vpp={d.vpp}) but the model has "
            f"{m.num_hidden_layers} decoder layers: every (virtual) stage needs at least one "
            "decoder layer (the embedding joins the first stage; final norm, lm_head and MTP the "
            "last).",
            ("pp", "vpp"),
        )
    return None


def _first_problem(d: ParallelDims, world: int, m: ModelConfig | None) -> _Problem | None:
    if not isinstance(world, int) or world < 1:
        return f"world size {world!r} must be an integer >= 1.", ()
    return (
        _size_problem(d)
        or _world_problem(d, world)
        or _layout_problem(d, world)
        or (_model_problem(d, m) if m is not None else None)
    )


def _suggestions(
    d: ParallelDims, world: int, m: ModelConfig | None, fields: tuple[str, ...]
) -> str:
    """For each blamed field, the values that pass every rule with the other sizes unchanged and dp
    derived."""
    parts = []
    for name in fields:
        if name == "vpp":
            candidates = range(1, (m.num_hidden_layers if m is not None else 1) + 1)
        else:
            candidates = [v for v in range(1, world + 1) if world % v == 0]
        derived_dp = {} if name == "dp" else {"dp": None}
        valid = [
            v
            for v in candidates
            if _first_problem(dataclasses.replace(d, **{name: v}, **derived_dp), world, m) is None
        ]
        shown = ", ".join(map(str, valid[:16])) + (", ..." if len(valid) > 16 else "")
        parts.append(f"valid {name} values: {shown}" if valid else f"no {name} value works")
    if not parts:
        return ""
    scope = "for this model and " if m is not None else "for "
    return (
        f" With the other sizes unchanged (dp derived), {scope}world size {world}: "
        + "; ".join(parts)
        + "."
    )


def _raise(d: ParallelDims, world: int, m: ModelConfig | None, problem: _Problem) -> None:
    message, fields = problem
    raise LayoutError(message + _suggestions(d, world, m, fields))


# -------------------------------------------------------------------------------------- coordinates
def rank_coordinates(rank: int, dims: ParallelDims) -> dict[str, int]:
    """Coordinates of a global rank in both views: pp, dp, cp, tp (dense) and edp, ep, etp
    (experts)."""
    stage_size = dims.tp * dims.cp * dims._resolved_dp()
    if not 0 <= rank < stage_size * dims.pp:
        raise ValueError(f"rank {rank} is outside the world of {stage_size * dims.pp} ranks.")
    local = rank % stage_size  # position inside the pipeline stage, shared by both views
    return {
        "pp": rank // stage_size,
        "dp": local // (dims.tp * dims.cp),
        "cp": (local // dims.tp) % dims.cp,
        "tp": local % dims.tp,
        "edp": local // (dims.ep * dims.etp),
        "ep": (local // dims.etp) % dims.ep,
        "etp": local % dims.etp,
    }


def _mesh_tensor(dims: ParallelDims, names: tuple[str, ...]) -> torch.Tensor:
    """Ranks laid out on the grid `names` by `rank_coordinates`, so the mesh and the pure function
    cannot differ."""
    sizes = {
        "pp": dims.pp,
        "dp": dims.dp,
        "cp": dims.cp,
        "tp": dims.tp,
        "edp": dims.edp,
        "ep": dims.ep,
        "etp": dims.etp,
    }
    grid = torch.empty([sizes[n] for n in names], dtype=torch.int)
    for rank in range(dims.world_size):
        coords = rank_coordinates(rank, dims)
        grid[tuple(coords[n] for n in names)] = rank
    return grid


# ----------------------------------------------------------------------------------- process groups
def _group(view: str, dim: str) -> property:
    return property(
        lambda self: getattr(self, view).get_group(dim),
        doc=f"Process group of the {dim} dimension.",
    )


def _coordinate(dim: str) -> property:
    return property(lambda self: self.coords[dim], doc=f"This rank's index in its {dim} group.")


@dataclass(frozen=True, eq=False)
class ParallelMesh:
    """This rank's view of the layout: the dense and expert DeviceMeshes, their groups, coordinates
    and sizes."""

    dims: ParallelDims
    rank: int
    coords: dict[str, int]
    dense: DeviceMesh  # ("pp", "dp", "cp", "tp")
    sparse: DeviceMesh  # ("pp", "edp", "ep", "etp"), same ranks re-split for experts
    dense_fsdp_mesh: DeviceMesh  # 1-D: dp, or dp x cp flattened when cp > 1 (FSDP2 of dense params)
    expert_fsdp_mesh: DeviceMesh  # 1-D: edp (FSDP2 of expert params)
    stage_mesh: DeviceMesh  # 1-D: dp x cp x tp, all ranks of one pipeline stage
    sequence_mesh: DeviceMesh  # 1-D: cp x tp, the ranks that each hold part of the same sequences
    # {first, last} pipeline rank at this rank's (dp, cp, tp) position: they hold the two copies of
    # the embedding (the last stage's MTP reads it). None when pp == 1 or on a middle pipeline rank.
    embedding_group: ProcessGroup | None = None

    tp_group = _group("dense", "tp")
    cp_group = _group("dense", "cp")
    dp_group = _group("dense", "dp")
    pp_group = _group("dense", "pp")
    ep_group = _group("sparse", "ep")
    edp_group = _group("sparse", "edp")
    etp_group = _group("sparse", "etp")
    tp_rank = _coordinate("tp")
    cp_rank = _coordinate("cp")
    dp_rank = _coordinate("dp")
    pp_rank = _coordinate("pp")
    ep_rank = _coordinate("ep")
    edp_rank = _coordinate("edp")
    etp_rank = _coordinate("etp")

    @property
    def dp_cp_group(self) -> ProcessGroup:
        """dp x cp: the group dense parameters are sharded and their gradients reduced over."""
        return self.dense_fsdp_mesh.get_group()

    @property
    def cp_tp_group(self) -> ProcessGroup:
        """cp x tp: the ranks that each compute part of the same sequences (MoE sequence
        statistics)."""
        return self.sequence_mesh.get_group()

    @property
    def tp_cp_dp_group(self) -> ProcessGroup:
        """All ranks of this pipeline stage: expert-load counts and global token counts are reduced
        over it."""
        return self.stage_mesh.get_group()

    @functools.cached_property
    def background_group(self) -> ProcessGroup | None:
        """A gloo group of all ranks for collectives of background threads (asynchronous checkpoint
        saves), so they never interleave with the training's on the default group; None in one
        process. Created on first use, a collective call."""
        return dist.new_group(backend="gloo") if self.dims.world_size > 1 else None

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def describe(self) -> str:
        """One line for logs: sizes and this rank's coordinates in both views."""
        d, c = self.dims, self.coords
        dense = " ".join(f"{n}={c[n]}/{getattr(d, n)}" for n in DENSE_DIMS)
        expert = " ".join(f"{n}={c[n]}/{getattr(d, n)}" for n in EXPERT_DIMS[1:])
        return f"rank {self.rank}/{d.world_size} | dense {dense} vpp={d.vpp} | experts {expert}"


def build_mesh(
    dims: ParallelDims, device_type: str, timeout: timedelta | None = None
) -> ParallelMesh:
    """Create every process group of the layout (collective: all ranks call it, in the same order).

    `timeout` applies to every group of the mesh; without it sub-groups keep torch's backend default
    (30 min for gloo, 10 min for NCCL), not the world group's.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs torch.distributed to be initialized (init_process_group) first."
        )
    dims = dims.validate(dist.get_world_size())
    dense = DeviceMesh(device_type, _mesh_tensor(dims, DENSE_DIMS), mesh_dim_names=DENSE_DIMS)
    sparse = DeviceMesh(device_type, _mesh_tensor(dims, EXPERT_DIMS), mesh_dim_names=EXPERT_DIMS)
    # Flattening creates groups, so these run on every rank in the same order. With cp == 1 the dp
    # groups already are the dp x cp groups.
    dense_fsdp = dense["dp", "cp"]._flatten("dp_cp") if dims.cp > 1 else dense["dp"]
    stage = dense["dp", "cp", "tp"]._flatten("dp_cp_tp")
    sequence = (
        dense["cp", "tp"]._flatten("cp_tp")
        if dims.cp > 1 and dims.tp > 1
        else dense["cp" if dims.cp > 1 else "tp"]
    )
    if timeout is not None:
        groups = (
            dense.get_all_groups()
            + sparse.get_all_groups()
            + [dense_fsdp.get_group(), stage.get_group(), sequence.get_group()]
        )
        for group in {id(g): g for g in groups}.values():
            dist.distributed_c10d._set_pg_timeout(timeout, group)
    rank = dist.get_rank()
    return ParallelMesh(
        dims=dims,
        rank=rank,
        coords=rank_coordinates(rank, dims),
        dense=dense,
        sparse=sparse,
        dense_fsdp_mesh=dense_fsdp,
        expert_fsdp_mesh=sparse["edp"],
        stage_mesh=stage,
        sequence_mesh=sequence,
        embedding_group=_embedding_group(dims, timeout),
    )


def _embedding_group(dims: ParallelDims, timeout: timedelta | None) -> ProcessGroup | None:
    """For every (dp, cp, tp) position the group {pp rank 0, pp rank pp-1}; this rank's one, if it
    is in any."""
    if dims.pp == 1:
        return None
    grid = _mesh_tensor(dims, DENSE_DIMS)  # [pp, dp, cp, tp]
    pairs = torch.stack([grid[0], grid[-1]], dim=-1).reshape(-1, 2).tolist()
    # Creates every pair's group on every rank, in the same order.
    group, _ = dist.new_subgroups_by_enumeration(pairs, timeout=timeout)
    return group
