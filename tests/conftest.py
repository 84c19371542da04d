"""Helpers shared by the test directories."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from megatron_exaone.model.mtp import shift_left


def _fixed_batch_losses(model: nn.Module, tokens: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        out = model(tokens, labels=shift_left(tokens, 1, -100))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    return losses


@pytest.fixture
def fixed_batch_losses() -> Callable[[nn.Module, torch.Tensor, int], list[float]]:
    """`fixed_batch_losses(model, tokens, steps)`: that many AdamW steps (lr 1e-3) of next-token
    prediction on one fixed batch; the LM loss of each step (how the FP8 tests compare
    precisions)."""
    return _fixed_batch_losses


def _accumulated_losses(
    model: nn.Module, steps: int, micro_batches: int, mark_stale: bool = True
) -> list[float]:
    # Imported here: the precision package is not needed by every test directory that loads this
    # file.
    from megatron_exaone.precision import mark_fp8_weights_stale

    param = next(model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator(device=param.device).manual_seed(4)
    losses = []
    for _ in range(steps):
        if mark_stale:
            mark_fp8_weights_stale(model)
        for _ in range(micro_batches):
            x = torch.randint(
                0, model.config.vocab_size, (2, 16), device=param.device, generator=gen
            )
            out = model(x, labels=shift_left(x, 1, -100))
            out.loss.backward()
            losses.append(out.lm_loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


@pytest.fixture
def accumulated_losses() -> Callable[..., list[float]]:
    """`accumulated_losses(model, steps, micro_batches, mark_stale=True)`: that many AdamW steps (lr
    1e-2) of `micro_batches` accumulated micro-batches each (new tokens every time), marking the FP8
    weights stale at the start of each step as the trainer does (unless `mark_stale` is False); the
    LM loss of every micro-batch."""
    return _accumulated_losses


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> list[str]:
    """exaone-train overrides that read the sample corpus's tokenizer and shards, built once per
    session for the cpu_tiny model (so runs skip the tokenizer training)."""
    from data_tools.sample_data import prepare_sample_data
    from megatron_exaone.config.load import load_config
    from megatron_exaone.training.plan import validate

    vocab = validate(
        load_config(["experiment=cpu_tiny", "parallel=single"]), 1, "cpu"
    ).model.vocab_size
    tokenizer, prefix = prepare_sample_data(tmp_path_factory.mktemp("sample_data"), vocab)
    return [
        "data.prepare_sample=false",
        f"data.datasets.sample=[{prefix}]",
        f"data.tokenizer={tokenizer}",
    ]


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory) -> dict:
    """A SuperBPE tokenizer (1,500 tokens) trained on the sample corpus with each pretokenizer, by
    name."""
    from data_tools.sample_corpus import files
    from data_tools.train_tokenizer import TrainTokenizerConfig, train_tokenizer

    out = {}
    for name in ("superbpe-default", "k-exaone"):
        out[name] = tmp_path_factory.mktemp(name)
        train_tokenizer(
            TrainTokenizerConfig(
                inputs=files(),
                output=out[name],
                vocab_size=1500,
                pretokenizer=name,
                show_progress=False,
            )
        )
    return out
