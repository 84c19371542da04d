"""The README's main job on the embedded default, in one process on CPU.

1. train a SuperBPE tokenizer on the bundled sample corpus, 2. tokenize the corpus into Megatron .bin/.idx shards,
3. train the `tiny` EXAONE-MoE model (with MTP, aux loss and expert-bias balancing) for a few dozen steps,
4. write a DCP checkpoint, 5. export it to Hugging Face format and check that transformers loads it with the
same logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from data_tools import sample_corpus
from data_tools.cli import main as exaone_data
from megatron_exaone.checkpoint.store import save_checkpoint
from megatron_exaone.convert.hf import to_hf
from megatron_exaone.data.loader import MixtureLoader
from megatron_exaone.data.tokenizer import load_tokenizer
from megatron_exaone.model import build_model, tiny, update_expert_bias
from megatron_exaone.training.optim import build_optimizer
from megatron_exaone.curriculum import LRPhase

log = logging.getLogger("quickstart")


def _exaone_data(argv: list[str]) -> None:
    if exaone_data(argv) != 0:
        raise RuntimeError(f"exaone-data {argv[0]} failed (see the messages above)")


def prepare_data(run_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    """Tokenizer and shards from the bundled corpus (steps 1 and 2)."""
    inputs = [str(p) for p in sample_corpus.files()]
    tokenizer_dir = run_dir / "tokenizer"
    log.info("step 1/5: training a SuperBPE tokenizer (vocab %d) on the bundled sample corpus", vocab_size)
    _exaone_data(["train-tokenizer", "--input", *inputs, "--vocab-size", str(vocab_size),
                 "--output", str(tokenizer_dir)])
    prefix = run_dir / "data" / "sample"
    log.info("step 2/5: tokenizing the corpus into Megatron .bin/.idx shards under %s", prefix.parent)
    _exaone_data(["tokenize", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output-prefix", str(prefix),
                 "--workers", "2"])
    return tokenizer_dir, prefix


def run(run_dir: Path, steps: int = 40, seq_len: int = 128, global_batch: int = 8, lr: float = 3e-3,
        seed: int = 0, vocab_size: int = 4096) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, data_prefix = prepare_data(run_dir, vocab_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    roles = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config = tiny(vocab_size=tokenizer.get_vocab_size(),
                  **{f"{role}_token_id": tokenizer.token_to_id(roles[f"{role}_token"]) for role in ("bos", "eos", "pad")})
    torch.manual_seed(seed)
    model = build_model(config, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    log.info("step 3/5: training the tiny model (%.2fM parameters, %d layers, %d experts top-%d) for %d steps "
             "of %d x %d tokens", params / 1e6, config.num_hidden_layers, config.num_experts,
             config.num_experts_per_tok, steps, global_batch, seq_len)
    loader = MixtureLoader(datasets={"sample": str(data_prefix)}, stages=[{"sample": 1.0}], seq_len=seq_len,
                           global_batch_size=global_batch, seed=seed)
    optimizer = build_optimizer([model], "adamw", lr=lr, weight_decay=0.1)
    lr_phase = LRPhase("wsd", peak_lr=lr, min_lr=lr / 10, warmup_tokens=max(1, steps // 10), decay_fraction=0.2)
    metrics_path = run_dir / "metrics.jsonl"
    tokens = 0
    start = time.perf_counter()
    with metrics_path.open("w") as metrics:
        for step in range(1, steps + 1):
            current_lr = lr_phase.lr_at(step, steps)  # the phase is unit-free: here, in steps
            optimizer.set_lr(current_lr)
            batch = loader.next_batch()
            out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        return_logits=False)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            update_expert_bias(model, config.bias_update_rate)
            optimizer.step()
            optimizer.zero_grad()
            tokens += batch["input_ids"].numel()
            record = {"step": step, "loss": out.loss.item(), "lm_loss": out.lm_loss.item(),
                      "mtp_loss": out.mtp_loss.item(), "aux_loss": out.aux_loss.item(),
                      "grad_norm": grad_norm.item(), "lr": current_lr, "tokens": tokens, "stage": 0}
            metrics.write(json.dumps(record) + "\n")
            if step == 1 or step % 5 == 0 or step == steps:
                rate = tokens / (time.perf_counter() - start)
                log.info("step %3d/%d  loss %.3f (lm %.3f, mtp %.3f, aux %.2e)  grad norm %.2f  lr %.2e  "
                         "%.0f tokens/s", step, steps, record["loss"], record["lm_loss"], record["mtp_loss"],
                         record["aux_loss"], record["grad_norm"], record["lr"], rate)

    log.info("step 4/5: writing a checkpoint")
    checkpoint = save_checkpoint(
        run_dir / "checkpoints", steps,
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer.optimizers[0]),
         "loader": loader.state_dict()},
        meta={"tokens": tokens, "model_config": dataclasses.asdict(config), "layout": {"world_size": 1}})

    hf_dir = run_dir / "hf"
    log.info("step 5/5: exporting to Hugging Face format")
    to_hf(config, model.state_dict(), hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            (hf_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    check_with_transformers(model, hf_dir, loader.next_batch()["input_ids"][:1])
    return {"run": run_dir, "tokenizer": tokenizer_dir, "data": data_prefix.parent, "metrics": metrics_path,
            "checkpoint": checkpoint, "hf": hf_dir}


def check_with_transformers(model: torch.nn.Module, hf_dir: Path, input_ids: torch.Tensor) -> None:
    """Load the export with transformers' ExaoneMoeForCausalLM and compare logits with ours."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.eval()
    with torch.no_grad():
        diff = (hf(input_ids).logits - model(input_ids).logits).abs().max().item()
    log.info("transformers loads the export as %s; max |logit difference| vs our model: %.2e",
             type(hf).__name__, diff)
    if diff > 1e-4:
        raise RuntimeError(f"the exported model disagrees with ours (max logit difference {diff:.2e})")
