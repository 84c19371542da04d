import shutil

import pytest
import torch

from megatron_exaone.checkpoint.store import find_checkpoint, load_checkpoint, read_meta, save_checkpoint


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 2), value)}, "step": int(value)}


def test_save_find_load_and_retention(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(root, step, state(float(step)), meta={"tokens": step * 10}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    found = find_checkpoint(root)
    assert found.name == "step_00000003" and read_meta(found) == {"step": 3, "tokens": 30}
    target = state(0.0)
    load_checkpoint(found, target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 3.0)) and target["step"] == 3


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
