"""Checkpoints as untrusted input: per-file checksums (XXH3-128) written while saving and verified
while loading (a corrupt newest checkpoint falls back to the previous one), and nothing in a
checkpoint can run code when it loads.

The checksums are checked against XXH3-128 of each file's bytes read whole (not streamed as the
writer hashes them), the payloads are real pickles whose loading would create a directory."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch
import xxhash

from megatron_exaone.checkpoint import integrity, state
from megatron_exaone.checkpoint.integrity import UntrustedCheckpointError
from megatron_exaone.checkpoint.store import (
    CorruptCheckpointError,
    checksum_problems,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from megatron_exaone.cli.convert import main as convert
from megatron_exaone.model import build_model, tiny
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.testing import run_distributed
from tests.faults import corrupt, data_file, planted_entry, planted_metadata


def test_checksums_are_the_xxh3_128_of_each_file(tmp_path):
    big = {"w": torch.randn(5 << 20), "b": torch.arange(7)}  # 20 MiB in one tensor
    path = save_checkpoint(tmp_path / "ckpt", 1, big)
    files = read_meta(path)["files"]
    assert files[data_file(path).name]["bytes"] > 20 << 20
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "xxh128": xxhash.xxh3_128(data).hexdigest()}, name
    assert not list(path.glob(f"*{integrity.DIGEST_SIDECAR}"))  # the ranks' sidecars were folded in
    assert checksum_problems(path) == []


def test_content_changed_in_place_is_detected_on_load(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.randn(1 << 20)})
    damaged = data_file(path)
    corrupt(damaged)
    target = {"w": torch.zeros(1 << 20)}
    with pytest.raises(
        CorruptCheckpointError, match=f"file {damaged.name} does not match the checksum"
    ):
        load_checkpoint(path, target)
    assert checksum_problems(path) == [
        f"file {damaged.name} does not match the checksum recorded when it was "
        "written (its content changed: a damaged disk or a copy that went wrong)"
    ]


def test_inspect_verify_reports_a_corrupt_checkpoint(tmp_path, capsys):
    path = save_checkpoint(
        tmp_path / "ckpt",
        1,
        build_model(tiny(), seed=0).state_dict(),
        meta={"model_config": dataclasses.asdict(tiny())},
    )
    assert convert(["inspect", str(tmp_path / "ckpt"), "--verify"]) == 0
    assert "checksums: ok" in capsys.readouterr().out
    corrupt(data_file(path))
    assert convert(["inspect", str(tmp_path / "ckpt"), "--verify"]) == 1
    assert f"file {data_file(path).name} does not match" in capsys.readouterr().out


def _trained_state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model(tiny(), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def _one_rank_mesh():
    return build_mesh(ParallelDims().validate(1, tiny()), "cpu")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _fall_back(_rank: int, _world: int, root: Path) -> dict:
    mesh = _one_rank_mesh()
    for step in (1, 2):
        model, optimizer = _trained_state(step)
        state.save(root, step, [model], optimizer, mesh, extra={"progress": {"step": step}})
    damaged = data_file(root / "step_00000002")
    corrupt(damaged, offset=damaged.stat().st_size // 2)
    model, optimizer = _trained_state(0)
    messages = _Messages()
    loaded = state.load(root, [model], optimizer, mesh)
    expected, _ = _trained_state(1)
    weights_equal = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), expected.state_dict().values())
    )
    try:
        state.load(root / "step_00000002", [model], optimizer, mesh)
        direct = "loaded"
    except CorruptCheckpointError as exc:
        direct = str(exc)
    return {
        "path": loaded.path.name,
        "extra": loaded.extra,
        "damaged": damaged.name,
        "log": " ".join(messages.lines),
        "weights_equal": weights_equal,
        "direct": direct,
    }


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    result = run_distributed(_fall_back, 1, tmp_path / "checkpoints")[0]
    assert result["path"] == "step_00000001" and result["extra"] == {"progress": {"step": 1}}
    assert (
        f"file {result['damaged']} does not match" in result["log"]
        and "falling back" in result["log"]
    )
    assert result["weights_equal"]
    assert result["damaged"] in result["direct"]  # a checkpoint named directly has no fallback


# ----------------------------------------------------------------------------------------- payloads
def _save_checkpoint(_rank: int, _world: int, root: Path) -> Path:
    model, optimizer = _trained_state(3)
    return state.save(
        root, 3, [model], optimizer, _one_rank_mesh(), extra={"progress": {"step": 3}}
    )


def _load(_rank: int, _world: int, checkpoint: Path) -> str:
    model, optimizer = _trained_state(0)
    try:
        state.load(checkpoint, [model], optimizer, _one_rank_mesh())
    except UntrustedCheckpointError as exc:
        return str(exc)
    return "loaded"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A real training checkpoint (model, optimizer, extra, RNG) of the tiny model."""
    return run_distributed(_save_checkpoint, 1, tmp_path / "checkpoints")[0]


@pytest.mark.parametrize("plant", [planted_metadata, planted_entry])
def test_a_planted_payload_never_runs(checkpoint, tmp_path, plant, capsys):
    marker = tmp_path / "payload-ran"
    plant(checkpoint, marker)
    with pytest.raises(UntrustedCheckpointError, match="could run code|would execute"):
        integrity.read_metadata(checkpoint)
    assert str(checkpoint / ".metadata") in run_distributed(_load, 1, checkpoint)[0]
    for command in (["inspect", str(checkpoint)], ["to-hf", str(checkpoint), str(tmp_path / "hf")]):
        assert convert(command) == 2
        assert str(checkpoint / ".metadata") in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_real_metadata_of_every_entry_kind_passes_the_allow_list(checkpoint):
    metadata = integrity.read_metadata(checkpoint)
    kinds = {type(md).__name__ for md in metadata.state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata"}
    assert {"extra", "rng.rank0", "optim.model.embed_tokens.weight.exp_avg"} <= set(
        metadata.state_dict_metadata
    )


def test_damaged_metadata_is_corruption_not_a_refusal(tmp_path):
    """Random bytes over DCP's .metadata (the unpickler refuses them) count as a damaged file when
    the manifest says it changed, so a run falls back to the previous checkpoint instead of
    stopping."""
    path = save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.zeros(4)})
    (path / ".metadata").write_bytes(os.urandom((path / ".metadata").stat().st_size))
    with pytest.raises(CorruptCheckpointError, match="file .metadata does not match"):
        load_checkpoint(path, {"w": torch.zeros(4)})
