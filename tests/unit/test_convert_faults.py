"""exaone-convert's outputs beyond the weights: the tokenizer's special-token ids, file modes under
the umask, no temporary folder left behind by a killed export, and errors of the user-error
family."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

from data_tools.sample_data import prepare_sample_data
from megatron_exaone.checkpoint.store import save_checkpoint
from megatron_exaone.cli.convert import main as convert
from megatron_exaone.convert.checkpoint import CheckpointFormatError
from megatron_exaone.convert.hf import HFFormatError
from megatron_exaone.errors import UserError
from megatron_exaone.model import ModelConfig, build_model, tiny

# the smallest vocabulary the sample tokenizer trains (8 special + 256 byte tokens + merges)
VOCAB = 512
CONFIG = tiny(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def sample_tokenizer(tmp_path_factory) -> Path:
    tokenizer_dir, _ = prepare_sample_data(tmp_path_factory.mktemp("data"), VOCAB)
    return tokenizer_dir


def write_checkpoint(root: Path, tokenizer: Path | None) -> Path:
    """A checkpoint as exaone-train records it: weights, model config and the run's tokenizer
    folder."""
    meta = {
        "model_config": dataclasses.asdict(CONFIG),
        "tokenizer": str(tokenizer) if tokenizer else None,
    }
    save_checkpoint(root, 1, build_model(CONFIG, seed=0).state_dict(), meta=meta)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints", sample_tokenizer)


def token_ids(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


# ----------------------------------------------------------------------------------- special tokens
def test_export_takes_special_token_ids_from_the_runs_tokenizer(
    checkpoint, sample_tokenizer, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(sample_tokenizer)
    # what exaone-data ends documents with
    end_of_document = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    want = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id, end_of_document],
        "pad_token_id": tokenizer.pad_token_id,
    }
    # the default would be a wrong, ordinary token
    assert ModelConfig.eos_token_id not in want["eos_token_id"]
    out = tmp_path / "hf"
    assert convert(["to-hf", str(checkpoint), str(out), "--dtype", "fp32"]) == 0
    assert token_ids(out / "config.json") == want
    assert token_ids(out / "generation_config.json") == want
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (
        want["eos_token_id"],
        want["pad_token_id"],
    )
    assert AutoTokenizer.from_pretrained(out).eos_token_id == tokenizer.eos_token_id


def test_explicit_tokenizer_wins_and_a_missing_one_keeps_the_model_ids_with_a_warning(
    sample_tokenizer, tmp_path, caplog
):
    bare = write_checkpoint(tmp_path / "bare", None)
    with caplog.at_level(logging.WARNING):
        assert convert(["to-hf", str(bare), str(tmp_path / "plain")]) == 0
    assert token_ids(tmp_path / "plain" / "config.json") == {
        "bos_token_id": CONFIG.bos_token_id,
        "eos_token_id": CONFIG.eos_token_id,
        "pad_token_id": CONFIG.pad_token_id,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "--tokenizer" in warnings[0]
        and f"eos_token_id={CONFIG.eos_token_id}" in warnings[0]
    )
    assert (
        convert(["to-hf", str(bare), str(tmp_path / "given"), "--tokenizer", str(sample_tokenizer)])
        == 0
    )
    assert (
        token_ids(tmp_path / "given" / "generation_config.json")["eos_token_id"][0]
        == AutoTokenizer.from_pretrained(sample_tokenizer).eos_token_id
    )
    assert (tmp_path / "given" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------- file modes
def modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root.parent)): p.stat().st_mode & 0o7777 for p in [root, *root.rglob("*")]
    }


def test_outputs_get_the_modes_the_umask_gives(checkpoint, sample_tokenizer, tmp_path):
    # a copy must not keep its source's mode
    (sample_tokenizer / "tokenizer_config.json").chmod(0o600)
    previous = os.umask(0o022)
    try:
        assert (
            convert(["to-hf", str(checkpoint), str(tmp_path / "hf"), "--max-shard-size", "100KB"])
            == 0
        )
        assert convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    finally:
        os.umask(previous)
        (sample_tokenizer / "tokenizer_config.json").chmod(0o644)
    written = {**modes(tmp_path / "hf"), **modes(tmp_path / "imported")}
    assert (
        "hf/tokenizer_config.json" in written
        and sum(name.endswith(".safetensors") for name in written) > 1
    )
    wrong = {
        name: oct(mode)
        for name, mode in written.items()
        if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)
    }
    assert not wrong, wrong


# ----------------------------------------------------------------------------------- killed exports
# exaone-convert to-hf whose export pauses after its first tensors, its temporary
# folder on disk.
PAUSED_TO_HF = """
import sys, time
from megatron_exaone.convert import checkpoint
stream = checkpoint.stream_model_tensors

def paused(info, group_bytes):
    for i, item in enumerate(stream(info, group_bytes)):
        yield item
        if i == 0:
            print("writing", flush=True)
            time.sleep(600)

checkpoint.stream_model_tensors = paused
from megatron_exaone.cli.convert import main
sys.exit(main(sys.argv[1:]))
"""


def start_paused_export(checkpoint: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PAUSED_TO_HF,
            "to-hf",
            str(checkpoint),
            str(out),
            "--max-shard-size",
            "10KB",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "writing\n"
    return proc


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.timeout(180)
def test_a_killed_export_leaves_nothing_the_next_run_does_not_remove(checkpoint, tmp_path, caplog):
    out = tmp_path / "hf"
    killed = start_paused_export(checkpoint, out)
    alive = start_paused_export(checkpoint, out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert len(hidden(tmp_path)) == 2 and all(
            str(alive.pid) in name or str(killed.pid) in name for name in hidden(tmp_path)
        )
        with caplog.at_level(logging.INFO):
            assert convert(["to-hf", str(checkpoint), str(out)]) == 0
        assert (out / "model.safetensors").is_file()
        removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
        assert len(removed) == 1 and str(killed.pid) in removed[0]
        [left] = hidden(tmp_path)  # the live export's folder is kept
        assert left.endswith(f"-{alive.pid}")
        alive.send_signal(signal.SIGTERM)  # a stopped export removes its own folder
        assert alive.wait() == 128 + signal.SIGTERM
        assert hidden(tmp_path) == []
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_format_errors_are_user_errors():
    assert issubclass(HFFormatError, UserError) and issubclass(HFFormatError, ValueError)
    assert issubclass(CheckpointFormatError, UserError) and issubclass(
        CheckpointFormatError, ValueError
    )


def test_an_hf_directory_never_runs_code(checkpoint, tmp_path):
    """from-hf and inspect read config.json and safetensors only: a pickled pytorch_model.bin with a
    payload, beside the safetensors or instead of them, is never loaded."""
    import torch

    from tests.faults import Payload

    out, marker = tmp_path / "hf", tmp_path / "payload-ran"
    assert convert(["to-hf", str(checkpoint), str(out)]) == 0
    torch.save({"model.embed_tokens.weight": Payload(marker)}, out / "pytorch_model.bin")
    assert convert(["inspect", str(out)]) == 0
    assert convert(["from-hf", str(out), str(tmp_path / "imported")]) == 0
    for shard in out.glob("model*.safetensors*"):
        shard.unlink()
    assert convert(["from-hf", str(out), str(tmp_path / "again")]) == 2  # no safetensors: refused
    assert not marker.exists()
