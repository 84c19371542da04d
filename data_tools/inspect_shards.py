"""`exaone-data inspect`: statistics of `.bin/.idx` shards and decoded sample documents."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_exaone.data.indexed import IndexedDataset, dataset_paths, read_stats
from megatron_exaone.data.tokenizer import load_tokenizer


def find_shards(path: str | os.PathLike) -> list[Path]:
    """Dataset prefixes under `path`: a prefix, a .bin/.idx file, or a directory searched
    recursively."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(idx.with_suffix("") for idx in p.rglob("*.idx"))
        if not shards:
            raise FileNotFoundError(f"{p}: no .idx files in this directory")
        return shards
    bin_path, idx_path = dataset_paths(p)
    if not idx_path.is_file():
        raise FileNotFoundError(
            f"{idx_path}: not found; pass a dataset prefix, its .bin/.idx, or a directory"
        )
    return [idx_path.with_suffix("")]


def shard_stats(prefix: Path) -> dict:
    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    stats = {
        "prefix": str(prefix),
        "dtype": str(ds.dtype),
        "sequences": len(ds),
        "documents": ds.num_documents,
        "tokens": ds.num_tokens,
        "bin_bytes": ds.bin_path.stat().st_size,
    }
    if len(lengths):
        stats.update(
            min_length=int(lengths.min()),
            mean_length=round(float(lengths.mean()), 1),
            median_length=int(np.median(lengths)),
            max_length=int(lengths.max()),
        )
    side = read_stats(prefix)
    for key in ("bytes", "bytes_per_token", "bad_lines", "empty_documents"):
        if key in side:
            stats[key] = side[key]
    if "tokenizer" in side:
        stats["tokenizer"] = side["tokenizer"]
    return stats


def sample_documents(
    prefix: Path, tokenizer_path: str | os.PathLike, count: int, max_chars: int
) -> list[dict]:
    """`count` documents spread evenly over the shard, decoded (special tokens kept visible), each
    cut to `max_chars` characters."""
    ds = IndexedDataset(prefix)
    tok = load_tokenizer(tokenizer_path)
    picks = (
        np.unique(np.linspace(0, len(ds) - 1, num=min(count, len(ds))).astype(int))
        if len(ds)
        else []
    )
    out = []
    for i in picks:
        text = tok.decode(ds.get(int(i)).tolist(), skip_special_tokens=False)
        out.append(
            {
                "sequence": int(i),
                "tokens": int(ds.sequence_lengths[i]),
                "text": text[:max_chars],
                "more_characters": max(len(text) - max_chars, 0),
            }
        )
    return out


def inspect(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    samples: int = 3,
    max_chars: int = 500,
) -> list[dict]:
    """Per-shard stats for `path`; with `samples` > 0 each also holds "samples", its decoded
    documents, or None when no tokenizer is known. The tokenizer defaults to the one named in the
    sidecar."""
    shards = find_shards(path)
    stats = [shard_stats(s) for s in shards]
    if samples > 0:
        for shard, st in zip(shards, stats):
            tok_path = tokenizer or st.get("tokenizer", {}).get("path")
            st["samples"] = (
                None if tok_path is None else sample_documents(shard, tok_path, samples, max_chars)
            )
    return stats


def _undecoded_note(stats: dict) -> str | None:
    if "samples" in stats and stats["samples"] is None:
        prefix = stats["prefix"]
        return f"{prefix}: no tokenizer known (no stats sidecar); pass --tokenizer to decode"
    return None


def undecoded(stats: list[dict]) -> list[str]:
    """A note for each shard whose samples were asked for but could not be decoded."""
    return [note for st in stats if (note := _undecoded_note(st))]


def format_samples(stats: list[dict]) -> list[str]:
    """Shard by shard, its decoded samples (or why there are none) as text blocks, each under a
    `--- ... ---` header."""
    blocks = []
    for st in stats:
        if note := _undecoded_note(st):
            blocks.append(f"--- {note} ---")
        for sample in st.get("samples") or []:
            text = sample["text"]
            if sample["more_characters"]:
                text += f" [... {sample['more_characters']} more characters]"
            header = f"--- sequence {sample['sequence']} ({sample['tokens']} tokens) ---"
            blocks.append(f"{header}\n{text}")
    return blocks


def format_stats(stats: list[dict]) -> str:
    lines = []
    for s in stats:
        lines.append(
            f"{s['prefix']}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['dtype']}, "
            f"{s['bin_bytes'] / 1e6:.1f} MB"
        )
        if "mean_length" in s:
            lines.append(
                f"  document length: min {s['min_length']}, median {s['median_length']}, "
                f"mean {s['mean_length']}, max {s['max_length']}"
            )
        if "bytes_per_token" in s:
            lines.append(
                f"  text: {s['bytes']:,} bytes, {s['bytes_per_token']:.3f} bytes/token, "
                f"{s.get('empty_documents', 0)} empty, {s.get('bad_lines', 0)} bad lines skipped"
            )
        if "tokenizer" in s:
            lines.append(
                f"  tokenizer: {s['tokenizer']['path']} (sha256 {s['tokenizer']['sha256'][:12]}), "
                f"end-of-document {s['tokenizer']['eod_token']!r}"
            )
    if len(stats) > 1:
        lines.append(
            f"total: {len(stats)} shards, {sum(s['documents'] for s in stats):,} documents, "
            f"{sum(s['tokens'] for s in stats):,} tokens"
        )
    return "\n".join(lines)
