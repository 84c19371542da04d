"""Everything that knows about ranks: the layout and its process groups (`mesh`) and the explicit
autograd collectives the parallel passes use (`comm`). `testing.run_distributed` runs a function on
local gloo ranks."""

from .comm import (
    all_gather_along,
    all_reduce_,
    all_to_all,
    copy_to_tp,
    gather_from_sp,
    global_sum,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
)
from .mesh import LayoutError, ParallelDims, ParallelMesh, build_mesh, rank_coordinates

__all__ = [
    "LayoutError",
    "ParallelDims",
    "ParallelMesh",
    "build_mesh",
    "rank_coordinates",
    "copy_to_tp",
    "reduce_from_tp",
    "scatter_to_sp",
    "gather_from_sp",
    "reduce_scatter_to_sp",
    "all_gather_along",
    "all_to_all",
    "all_reduce_",
    "global_sum",
]
