"""Which tokens of each sequence this rank computes under context parallelism.

The model takes whole sequences and computes only its share: the sequence is cut into 2 * size equal
chunks and rank r holds chunks r and 2 * size - 1 - r ("zigzag"), so every rank gets the same amount
of causal-attention work. Shifts for MTP inputs and labels are taken on the whole sequences, then
sharded, so no token is lost at a chunk boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceShard:
    size: int
    rank: int

    def index(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Positions (into the sequence dimension) of this rank's tokens, in the order the rank
        holds them."""
        return zigzag_index(seq_len, self.size, self.rank, device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of `x` [B, S, ...]."""
        return x.index_select(1, self.index(x.shape[1], x.device))

    def gathered_keys(
        self, seq_len: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence positions, usable) of the keys an all-gather of every rank's tokens yields, in
        rank order."""
        positions = zigzag_order(seq_len, self.size, device)
        return positions, torch.ones_like(positions, dtype=torch.bool)

    def halo(self, seq_len: int, window: int | None) -> int | None:
        """Keys each chunk needs from the chunk before it under a sliding `window` (W - 1), or None
        when the whole sequence must be gathered instead (no window, or a chunk shorter than W -
        1)."""
        if window is None or window < 2 or window - 1 > seq_len // (2 * self.size):
            return None
        return window - 1

    def halo_keys(
        self, seq_len: int, halo: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence positions, usable) of a sliding layer's keys: the last `halo` tokens of every
        chunk of every rank (gathered over cp, in rank order, each rank's two chunks in the order it
        holds them), then this rank's own tokens. This rank's own chunk tails are duplicates and not
        usable."""
        chunk = seq_len // (2 * self.size)
        tails, owners = [], []
        for rank in range(self.size):
            for first in zigzag_index(seq_len, self.size, rank, device)[::chunk].tolist():
                tails.append(torch.arange(first + chunk - halo, first + chunk, device=device))
                owners.append(torch.full((halo,), rank, device=device))
        own = self.index(seq_len, device)
        positions = torch.cat([*tails, own])
        usable = torch.cat([torch.cat(owners) != self.rank, torch.ones_like(own, dtype=torch.bool)])
        return positions, usable


def zigzag_index(
    seq_len: int, size: int, rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    if seq_len % (2 * size):
        raise ValueError(
            f"context parallel over {size} ranks cuts each sequence into {2 * size} chunks, but "
            f"the sequence has {seq_len} tokens; use a multiple of {2 * size}."
        )
    chunk = seq_len // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    return torch.cat([first, first + (2 * size - 1 - 2 * rank) * chunk])


def zigzag_order(seq_len: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The sequence positions of the tokens of all ranks concatenated in rank order (what an
    all-gather yields)."""
    return torch.cat([zigzag_index(seq_len, size, r, device) for r in range(size)])
