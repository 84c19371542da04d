"""exaone-convert against transformers: a tp2 x pp2 x ep2 training checkpoint exports to a directory
that transformers loads with our logits; an HF directory imports into a checkpoint exaone-train
resumes from with transformers' loss; HF -> checkpoint -> HF is lossless and the import never holds
the model; bad inputs give clear errors and leave nothing behind."""

import json
import logging
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ExaoneMoeConfig
from transformers import ExaoneMoeForCausalLM as HFModel

from megatron_exaone.checkpoint import state as ckpt
from megatron_exaone.cli.convert import main as convert
from megatron_exaone.convert.hf import HFSource
from megatron_exaone.model import ExaoneMoeForCausalLM, tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_pipeline_chunks
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.step import PipelineRunner
from megatron_exaone.parallel.testing import run_distributed
from megatron_exaone.training.optim import build_optimizer

CONFIG = tiny(vocab_size=128, num_attention_heads=4, num_key_value_heads=4)


def train_and_save(rank, world, root):
    """One optimizer step under tp2 x pp2 x ep2 (4 ranks), then a checkpoint."""
    mesh = build_mesh(ParallelDims(tp=2, pp=2, ep=2), "cpu")
    chunks = build_pipeline_chunks(CONFIG, mesh, 11, "cpu", "1f1b")
    opt = build_optimizer(chunks, "adamw", lr=1e-2)
    x = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    PipelineRunner(chunks, mesh, "1f1b", 2).step(x, shift_left(x, 1, -100))
    from megatron_exaone.parallel.build import all_reduce_grads

    all_reduce_grads(chunks, mesh)
    opt.step()
    ckpt.save(root, 1, chunks, opt, mesh, extra={"tokens": 64}, model_config=CONFIG)


@pytest.fixture(scope="module")
def parallel_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    run_distributed(train_and_save, 4, str(root), timeout_s=120)
    return root


def full_state(hf_dir: Path) -> dict:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    return {k: v for f in files for k, v in load_file(hf_dir / f).items()}


def test_parallel_checkpoint_exports_to_transformers(parallel_checkpoint, tmp_path):
    out = tmp_path / "hf"
    assert (
        convert(
            [
                "to-hf",
                str(parallel_checkpoint),
                str(out),
                "--dtype",
                "fp32",
                "--max-shard-size",
                "60KB",
            ]
        )
        == 0
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    assert any(k.startswith("mtp.") for k in full_state(out))
    ours = ExaoneMoeForCausalLM(CONFIG).eval()
    from megatron_exaone.convert.checkpoint import open_checkpoint, stream_model_tensors

    ours.load_state_dict(dict(stream_model_tensors(open_checkpoint(parallel_checkpoint), 1 << 30)))
    x = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x).logits - hf.eval()(x).logits).abs().max() <= 1e-5


def test_bf16_export_and_inspect(parallel_checkpoint, tmp_path, capsys):
    out = tmp_path / "hf16"
    assert convert(["to-hf", str(parallel_checkpoint), str(out)]) == 0
    tensors = full_state(out)
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.e_score_correction_bias"].dtype == torch.float32
    capsys.readouterr()
    assert convert(["inspect", str(parallel_checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 1 and summary["layout"]["tp"] == 2 and summary["total_parameters"] > 0


def hf_loss_per_document(hf, batch):
    """transformers' loss on a packed batch, running each packed document on its own."""
    logits = []
    for row, positions in zip(batch["input_ids"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(row)]
        starts = ([0] if starts[0] != 0 else []) + starts
        pieces = [hf(row[a:b][None]).logits[0] for a, b in zip(starts, starts[1:]) if b > a]
        logits.append(torch.cat(pieces))
    logits = torch.stack(logits)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )


def test_hf_import_resumes_in_the_trainer_with_transformers_loss(tmp_path, caplog):
    from data_tools.sample_data import prepare_sample_data
    from megatron_exaone.config.load import load_config

    tokenizer_dir, prefix = prepare_sample_data(tmp_path / "data", 512)
    hf_config = ExaoneMoeConfig(
        vocab_size=512,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    hf = HFModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "released")
    assert convert(["from-hf", str(tmp_path / "released"), str(tmp_path / "imported")]) == 0

    from megatron_exaone.cli.train import main as train

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=cpu_tiny",
        "parallel=single",
        f"run_dir={run_dir}",
        "model=from_checkpoint",
        f"checkpoint.load={tmp_path / 'imported'}",
        "trainer.max_steps=1",
        "data.prepare_sample=false",
        f"data.datasets.sample=[{prefix}]",
        f"data.tokenizer={tokenizer_dir}",
        "optim.clip_grad=0",
    ]
    caplog.set_level(logging.INFO, logger="megatron_exaone")
    assert train(overrides) == 0
    # an import is a model, not a run: no "resumed ... layout None", no RNG-state notice
    assert "(an imported model: training starts at step 0" in caplog.text
    assert "layout None" not in caplog.text and "per-rank RNG states" not in caplog.text
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    cfg = load_config(overrides)
    from megatron_exaone.data.loader import MixtureLoader

    stage = cfg.curriculum.stages[0]
    batch = MixtureLoader(
        {"sample": [str(prefix)]},
        [{"sample": 1.0}],
        stage.seq_len,
        stage.global_batch_size,
        seed=cfg.trainer.seed,
    ).next_batch()
    with torch.no_grad():
        want = hf_loss_per_document(hf, batch).item()
    assert abs(first["lm_loss"] - want) <= 1e-5, (first["lm_loss"], want)


class LiveTensors:
    """Wraps HFSource.build to track the bytes of built tensors' storage still alive
    (weakref.finalize on the storage: a detached copy or a view held by DCP keeps it alive)."""

    def __init__(self, build):
        self.build, self.live, self.peak, self.largest = build, 0, 0, 0

    def __call__(self, source, load):
        tensor = self.build(source, load)
        storage = tensor.untyped_storage()
        self.live += storage.nbytes()
        self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
        weakref.finalize(storage, self.freed, storage.nbytes())
        return tensor

    def freed(self, size):
        self.live -= size


def test_hf_checkpoint_hf_round_trip_is_identical_and_import_is_streamed(tmp_path, monkeypatch):
    hf_config = ExaoneMoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    HFModel(hf_config).save_pretrained(tmp_path / "a")
    built = LiveTensors(HFSource.build)
    monkeypatch.setattr(HFSource, "build", lambda source, load: built(source, load))
    assert convert(["from-hf", str(tmp_path / "a"), str(tmp_path / "ckpt")]) == 0
    # Each tensor is built when DCP writes it and freed after: at most two alive (the one being
    # written and the next), never the model.
    assert built.peak <= 2 * built.largest, (built.peak, built.largest)
    monkeypatch.undo()
    assert convert(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "b"), "--dtype", "fp32"]) == 0
    a, b = full_state(tmp_path / "a"), full_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_clearly_and_leave_nothing(parallel_checkpoint, tmp_path, capsys):
    HFModel(
        ExaoneMoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=8,
            layer_types=["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        )
    ).save_pretrained(tmp_path / "hf")
    cases = []
    wrong_type = tmp_path / "wrong_type"
    wrong_type.mkdir()
    (wrong_type / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases.append(
        (["from-hf", str(wrong_type), str(tmp_path / "o1")], "model_type='llama'", tmp_path / "o1")
    )
    truncated = tmp_path / "hf" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:200])
    cases.append(
        (
            ["from-hf", str(tmp_path / "hf"), str(tmp_path / "o2")],
            "truncated or corrupt",
            tmp_path / "o2",
        )
    )
    cases.append(
        (
            ["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "o3")],
            "no complete checkpoint",
            tmp_path / "o3",
        )
    )
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("")  # an output path below a regular file cannot be created, even by root
    cases.append(
        (
            ["to-hf", str(parallel_checkpoint), str(not_a_dir / "out")],
            "is not a writable directory",
            not_a_dir / "out",
        )
    )
    for argv, needle, out in cases:
        assert convert(argv) == 2, argv
        assert needle in capsys.readouterr().err, (argv, needle)
        assert not out.exists(), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "hf", "wrong_type"]


def test_zero_shared_experts_import_and_export_with_transformers(tmp_path, capsys):
    """transformers keeps zero-element shared-expert tensors when num_shared_experts is 0: from-hf
    skips them, to-hf writes them, and a non-empty tensor under such a name is still refused."""
    hf_config = ExaoneMoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_shared_experts=0,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    hf = HFModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "released")
    assert (
        full_state(tmp_path / "released")[
            "model.layers.1.mlp.shared_experts.down_proj.weight"
        ].numel()
        == 0
    )
    assert convert(["from-hf", str(tmp_path / "released"), str(tmp_path / "imported")]) == 0

    from megatron_exaone.convert.checkpoint import open_checkpoint, stream_model_tensors

    info = open_checkpoint(tmp_path / "imported")
    ours = ExaoneMoeForCausalLM(info.config).eval()
    ours.load_state_dict(dict(stream_model_tensors(info, 1 << 30)))
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() <= 1e-5

    assert (
        convert(
            ["to-hf", str(tmp_path / "imported"), str(tmp_path / "exported"), "--dtype", "fp32"]
        )
        == 0
    )
    _, loading = AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", output_loading_info=True
    )
    assert (
        not loading["missing_keys"]
        and not loading["unexpected_keys"]
        and not loading["mismatched_keys"]
    )
    released, exported = full_state(tmp_path / "released"), full_state(tmp_path / "exported")
    assert released.keys() == exported.keys() and all(
        torch.equal(released[k], exported[k]) for k in released
    )

    from safetensors.torch import save_file

    key = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    save_file(
        {**released, key: torch.zeros(2, 32)}, str(tmp_path / "released" / "model.safetensors")
    )
    capsys.readouterr()
    assert convert(["from-hf", str(tmp_path / "released"), str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert key in error and "num_shared_experts=0" in error and not (tmp_path / "refused").exists()
