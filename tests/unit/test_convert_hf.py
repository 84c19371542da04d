"""HF directory reading/writing: round trips, layouts, and clear errors that leave nothing
half-written."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_exaone.convert.hf import (
    HFFormatError,
    from_hf,
    from_hf_tensors,
    to_hf,
    to_hf_tensors,
    write_hf_dir,
)
from megatron_exaone.model import build_model, tiny


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny(vocab_size=128)
    return config, build_model(config, seed=3)


def hf_tensors(path):
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        out.update(load_file(path / name))
    return out


def test_sharded_round_trip_is_tensor_for_tensor_identical(tmp_path, tiny_model):
    config, model = tiny_model
    first = to_hf(config, model.state_dict(), tmp_path / "a", max_shard_size="40KB")
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "mtp.fc.weight" in index["weight_map"]
    config2, state = from_hf(first)
    assert config2 == config
    second = to_hf(config2, state, tmp_path / "b", max_shard_size="40KB")
    a, b = hf_tensors(first), hf_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.1.mlp.e_score_correction_bias"].dtype == torch.float32


def test_bf16_export_keeps_correction_bias_fp32(tmp_path, tiny_model):
    config, model = tiny_model
    out = to_hf(config, model.state_dict(), tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = hf_tensors(out)
    assert tensors["model.layers.1.mlp.e_score_correction_bias"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_fused_expert_layout_is_accepted(tiny_model):
    config, model = tiny_model
    state = model.state_dict()
    fused = {}
    for key, value in state.items():
        if key.endswith("experts.gate_proj"):
            fused[key.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [value, state[key.replace("gate", "up")]], 1
            )
        elif key.endswith("experts.up_proj"):
            continue
        elif key.endswith("mlp.e_score_correction_bias"):
            fused[key.replace("mlp.e_score", "mlp.gate.e_score")] = value
        else:
            fused[key] = value
    back = from_hf_tensors(fused, config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def corrupt(tmp_path, tiny_model, name):
    config, model = tiny_model
    return to_hf(config, model.state_dict(), tmp_path / name)


def test_missing_config_json(tmp_path, tiny_model):
    out = corrupt(tmp_path, tiny_model, "x")
    os.remove(out / "config.json")
    with pytest.raises(HFFormatError, match="config.json not found"):
        from_hf(out)


def test_wrong_model_type(tmp_path, tiny_model):
    out = corrupt(tmp_path, tiny_model, "x")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_moe"}))
    with pytest.raises(HFFormatError, match="model_type='qwen3_moe'"):
        from_hf(out)


def test_missing_and_unexpected_keys_and_shape_mismatch(tmp_path, tiny_model):
    out = corrupt(tmp_path, tiny_model, "x")
    tensors = load_file(out / "model.safetensors")
    for edit, needle in (
        (lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"), "missing 1 tensor"),
        (lambda t: t.__setitem__("model.layers.9.foo", torch.zeros(1)), "unexpected"),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(3)),
            "model.norm.weight has shape",
        ),
        (
            lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"),
            r"missing for experts \[5\]",
        ),
    ):
        broken = dict(tensors)
        edit(broken)
        save_file(broken, str(out / "model.safetensors"))
        with pytest.raises(HFFormatError, match=needle):
            from_hf(out)


def test_truncated_safetensors_and_missing_shard(tmp_path, tiny_model):
    config, model = tiny_model
    out = to_hf(config, model.state_dict(), tmp_path / "s", max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(HFFormatError, match=f"{shards[1].name}.*truncated or corrupt"):
        from_hf(out)
    shards[1].unlink()
    with pytest.raises(HFFormatError, match=f"{shards[1].name} is listed"):
        from_hf(out)


def test_failed_write_leaves_nothing_and_existing_output_is_refused(tmp_path, tiny_model):
    config, model = tiny_model
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(5)
    with pytest.raises(HFFormatError):
        to_hf(config, state, tmp_path / "bad")
    existing = to_hf(config, model.state_dict(), tmp_path / "good")
    with pytest.raises(FileExistsError):
        to_hf(config, model.state_dict(), existing)

    def fails_midway():
        yield from list(to_hf_tensors(model.state_dict().items()))[:3]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_dir(config, fails_midway(), tmp_path / "half", max_shard_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
