import json
import math
import os
import shutil

import pytest
import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_exaone.checkpoint.state import (
    CheckpointLayoutError,
    TensorView,
    _mesh_view,
    axis_index,
    init_optimizer_state,
    view_grid,
)
from megatron_exaone.checkpoint.store import (
    async_save_checkpoint,
    checkpoint_dirs,
    find_checkpoint,
    load_checkpoint,
    prune,
    read_meta,
    save_checkpoint,
)
from megatron_exaone.parallel.mesh import ParallelDims, rank_coordinates


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 2), value)}, "step": torch.tensor(int(value))}


def steps(root) -> list[int]:
    return [step for step, _ in checkpoint_dirs(root)]


def test_save_find_load_and_retention(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(root, step, state(float(step)), meta={"tokens": step * 10}, keep_last=2)
    assert steps(root) == [2, 3]
    found = find_checkpoint(root)
    meta = read_meta(found)
    assert (
        found.name == "step_00000003"
        and meta.pop("files")
        and meta == {"step": 3, "tokens": 30, "format": 2}
    )
    target = state(0.0)
    load_checkpoint(found, target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 3.0)) and target["step"] == 3


def test_only_tensors_are_saved(tmp_path):
    with pytest.raises(TypeError, match="checkpoint entry step is a int; save tensors only"):
        save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.zeros(2), "step": 1})
    assert steps(tmp_path / "ckpt") == []


def test_incomplete_newest_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, state(1.0))
    newest = save_checkpoint(root, 2, state(2.0))
    (newest / ".metadata").unlink()
    with caplog.at_level("WARNING"):
        assert find_checkpoint(root).name == "step_00000001"
    assert "step_00000002" in caplog.text and "incomplete" in caplog.text
    shutil.rmtree(root / "step_00000001")
    assert find_checkpoint(root) is None


# ---------------------------------------------------------------------------------------- retention
def test_retention_goes_by_step_number_and_never_removes_a_newer_checkpoint(tmp_path):
    """The failure of the issue: steps 2..10 written, all made unusable, the run restarted and
    writing step 4 with keep_last=2 kept the broken steps 8 and 10 (highest names) and deleted step
    4 itself."""
    root = tmp_path / "ckpt"
    for step in range(2, 11, 2):
        save_checkpoint(root, step, state(float(step)))
    for _, path in checkpoint_dirs(root):
        (path / ".metadata").unlink()
    save_checkpoint(root, 2, state(2.0), keep_last=2)
    save_checkpoint(root, 4, state(4.0), keep_last=2)
    # the later (broken) ones stay until the run passes their steps
    assert steps(root) == [2, 4, 6, 8, 10]
    assert (root / "latest").read_text().strip() == "step_00000004"
    save_checkpoint(root, 6, state(6.0), keep_last=2)
    assert steps(root) == [4, 6, 8, 10]
    assert find_checkpoint(root).name == "step_00000006"  # the broken step 8 and 10 are skipped


def test_unusable_checkpoints_do_not_count_towards_keep_last(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(root, step, state(float(step)))
    os.truncate(_data_file(root / "step_00000003"), 1)
    save_checkpoint(root, 4, state(4.0))
    assert [p.name for p in prune(root, newest=4, keep_last=2)] == ["step_00000001"]
    # 4 and 2 are the two usable ones; the truncated 3 between them stays
    assert steps(root) == [2, 3, 4]


# ------------------------------------------------------------------------------------- the manifest
def test_meta_lists_every_file_with_its_size_and_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", 1, state(1.0), meta={"tokens": 10})
    files = read_meta(path)["files"]
    assert {name: entry["bytes"] for name, entry in files.items()} == {
        f.name: f.stat().st_size for f in path.iterdir() if f.name != "meta.json"
    }
    assert ".metadata" in files and any(name.endswith(".distcp") for name in files)
    assert all(entry["bytes"] and len(entry["xxh128"]) == 32 for entry in files.values())


def _data_file(checkpoint):
    return next(f for f in checkpoint.iterdir() if f.name.endswith(".distcp"))


def test_truncated_newest_is_skipped_for_the_previous_one(tmp_path, caplog):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, state(1.0))
    save_checkpoint(root, 2, state(2.0))
    newest = save_checkpoint(root, 3, state(3.0))
    data = _data_file(newest)
    size = data.stat().st_size
    os.truncate(data, size // 2)
    with caplog.at_level("WARNING"):
        found = find_checkpoint(root)
    assert found.name == "step_00000002"
    assert (
        f"skipping checkpoint {newest}: file {data.name} is truncated ({size // 2} of {size} bytes)"
        in caplog.text
    )
    assert "previous complete checkpoint" in caplog.text
    target = state(0.0)
    load_checkpoint(found, target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 2.0))

    # A missing file, or one that grew, fails the same way; with nothing complete left there is no
    # checkpoint.
    data2 = _data_file(root / "step_00000002")
    data2.unlink()
    with open(_data_file(root / "step_00000001"), "ab") as f:
        f.write(b"x")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert find_checkpoint(root) is None
    assert f"file {data2.name} is missing" in caplog.text and "wrong size" in caplog.text
    assert "no complete checkpoint" in caplog.text


def test_a_checkpoint_named_directly_is_verified_too(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "ckpt", 1, state(1.0))
    assert find_checkpoint(path) == path
    os.truncate(path / ".metadata", 1)
    with caplog.at_level("WARNING"):
        assert find_checkpoint(path) is None
    assert "file .metadata is truncated" in caplog.text


def test_a_checkpoint_of_the_pickled_format_is_refused(tmp_path, caplog):
    root = tmp_path / "ckpt"
    path = save_checkpoint(root, 4, state(4.0), meta={"tokens": 40})
    meta = read_meta(path)
    meta["format"] = 1  # as written before the run state became tensors + JSON
    (path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        assert find_checkpoint(root) is None
    assert "earlier development version" in caplog.text


# -------------------------------------------------------------------------------------- async saves
# background thread
@pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process")
def test_async_save_keeps_the_values_of_the_call_and_publishes_on_wait(tmp_path):
    root = tmp_path / "ckpt"
    live = state(5.0)
    pending = async_save_checkpoint(root, 5, live, meta={"tokens": 50}, keep_last=1)
    live["model"]["w"].fill_(-1.0)  # training goes on: the checkpoint holds the staged copy
    path = pending.wait()
    assert path == root / "step_00000005" and find_checkpoint(root) == path and pending.done()
    assert (root / "latest").read_text().strip() == "step_00000005" and read_meta(path)[
        "tokens"
    ] == 50
    files = read_meta(path)["files"]
    assert {n: e["bytes"] for n, e in files.items()} == {
        f.name: f.stat().st_size for f in path.iterdir() if f.name != "meta.json"
    }
    target = state(0.0)
    load_checkpoint(path, target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 5.0))


# --------------------------------------------------------------------------------------- mesh views


def test_view_grid_orders_ranks_by_cut_then_replica():
    tp2_dp2 = ParallelDims(tp=2, dp=2)  # rank = tp + 2 dp
    assert view_grid(tp2_dp2, 0, ("tp", "dp_cp")).tolist() == [[0, 2], [1, 3]]
    assert view_grid(tp2_dp2, 0, ("tp",)).tolist() == [[0, 2], [1, 3]]  # dp ranks are replicas
    # KV head on 2 ranks
    assert view_grid(ParallelDims(tp=4, dp=1), 0, ("tp/2",)).tolist() == [[0, 1], [2, 3]]
    assert view_grid(ParallelDims(ep=2, dp=4), 0, ("ep", "edp")).tolist() == [[0, 2], [1, 3]]
    assert view_grid(ParallelDims(cp=2, dp=2), 0, ("dp_cp",)).tolist() == [0, 1, 2, 3]  # cp fastest
    # second pipeline stage
    assert view_grid(ParallelDims(tp=2, pp=2, dp=1), 1, ("tp",)).tolist() == [2, 3]
    with pytest.raises(CheckpointLayoutError, match="do not tile"):
        view_grid(tp2_dp2, 0, ("tp", "tp"))


@pytest.mark.parametrize(
    "dims,axes,rows",
    [
        (ParallelDims(tp=2, dp=2), ("tp", "dp_cp"), 12),
        (
            ParallelDims(tp=2, dp=2),
            ("tp", "dp_cp"),
            6,
        ),  # 3 rows per TP rank: FSDP chunks of 2 and 1
        (ParallelDims(tp=4, dp=2), ("tp/2", "dp_cp"), 8),
        (ParallelDims(tp=2, dp=4, ep=4), ("ep", "edp"), 8),
    ],
)
def test_mesh_view_boxes_are_the_chunks_the_passes_take(dims, axes, rows):
    """For every rank: DCP's box of the view equals torch.chunk applied cut after cut, as the passes
    and FSDP2 cut the tensor; the boxes of distinct pieces tile the tensor."""
    full = torch.arange(rows * 3).reshape(rows, 3)
    seen = {}
    for rank in range(dims.world_size):
        coords = rank_coordinates(rank, dims)
        piece = full
        for axis in axes:
            index, count = axis_index(axis, coords, dims)
            # fewer than `count` when the rows run out (FSDP2: empty shards)
            chunks = piece.chunk(count, dim=0)
            piece = chunks[index] if index < len(chunks) else piece[:0]
        view = _mesh_view(dims, 0, axes, "cpu", rank)
        placements = [DShard(0)] * len(axes) + [Replicate()] * (view.ndim - len(axes))
        shape, offset = compute_local_shape_and_global_offset(full.shape, view, placements)
        assert torch.equal(full[offset[0] : offset[0] + shape[0]], piece), (rank, shape, offset)
        seen[tuple(offset)] = tuple(shape)
    assert sum(math.prod(s) for s in seen.values()) == full.numel()


def test_host_tensors_of_a_gpu_layout_are_saved_where_they_live():
    """Offloaded master weights and moments (host tensors) under a GPU layout's view: the DCP
    tensor aliases the host storage with the rank's box, instead of the copy on the GPU that
    `DTensor.from_local` would make (and that a load would fill). No GPU is needed: the CUDA view
    is never initialised."""
    dims = ParallelDims(tp=2, dp=2)
    for rank in range(dims.world_size):
        on_gpu = _mesh_view(dims, 0, ("tp", "dp_cp"), "cuda", rank)
        view = TensorView((8, 3), on_gpu, (DShard(0), DShard(0)))
        host = torch.zeros(view.local_shape())
        wrapped = view.wrap(host)
        assert wrapped.device_mesh.device_type == "cpu"
        assert wrapped.to_local().data_ptr() == host.data_ptr()
        assert (
            compute_local_shape_and_global_offset(
                wrapped.shape, wrapped.device_mesh, wrapped.placements
            )
            == view.local_box()
        )


def test_init_optimizer_state_creates_zero_state_and_leaves_everything_else_alone():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.randn(3, 2)
    optimizer.step()  # `a` has state, `b` has none
    before = {k: v.clone() for k, v in optimizer.state[a].items()}
    values = a.detach().clone(), b.detach().clone()
    init_optimizer_state(optimizer)
    assert torch.equal(a, values[0]) and torch.equal(b, values[1])
    assert all(torch.equal(before[k], optimizer.state[a][k]) for k in before)
    assert optimizer.state[b]["step"].item() == 0 and not optimizer.state[b]["exp_avg"].any()
    assert optimizer.param_groups[0]["lr"] == 0.1 and a.grad is not None and b.grad is None
    # A state created this way behaves as a fresh optimizer's: the next step is bit-identical.
    fresh = torch.optim.AdamW(
        [c := torch.nn.Parameter(values[1].clone())], lr=0.1, weight_decay=0.1
    )
    b.grad = c.grad = torch.randn(4)
    optimizer.step()
    fresh.step()
    assert torch.equal(b, c)
