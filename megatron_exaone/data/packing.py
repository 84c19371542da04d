"""Packing documents into samples of seq_len + 1 tokens, one epoch at a time.

concat (Megatron): documents in shuffled order form one token stream; sample i is stream tokens [i *
seq_len, i * seq_len + seq_len + 1), so consecutive samples share one token and every token is a
label once. Documents are cut wherever a sample ends.

best_fit: documents of at most seq_len + 1 tokens are never cut. Longer ones are cut into full
samples (again sharing one token) and a remainder; the remainders and short documents are packed by
best-fit decreasing, and the unused tail of a sample is padding whose labels are -100.

An epoch index is one flat int64 array (cacheable as a single `.npy`); `pieces()` turns a sample
number into the (sequence, first token, token count) runs it is made of, and `assemble()` into model
inputs.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable

import numpy as np

PACKING_MODES = ("concat", "best_fit")
IGNORE_INDEX = -100
Pieces = list[tuple[int, int, int]]  # (sequence, first token, token count)


def concat_epoch(lengths: np.ndarray, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """[D, S, order[D], ends[D], shuffle[S]]: shuffled document order, cumulative token ends, sample
    order."""
    order = rng.permutation(len(lengths)).astype(np.int64)
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64)[order])
    total = int(ends[-1]) if len(ends) else 0
    if total < seq_len + 1:
        raise ValueError(
            f"{total} tokens cannot fill one sample of seq_len + 1 = {seq_len + 1} tokens"
        )
    num_samples = (total - 1) // seq_len
    shuffle = rng.permutation(num_samples).astype(np.int64)
    return np.concatenate([[len(order), num_samples], order, ends, shuffle])


def best_fit_epoch(lengths: np.ndarray, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """[S, P, bin_ptr[S+1], piece_seq[P], piece_start[P], piece_len[P]], samples already in shuffled
    order."""
    cap = seq_len + 1
    order = rng.permutation(len(lengths)).astype(np.int64)
    n = np.asarray(lengths, dtype=np.int64)[order]
    full = np.maximum(n - 1, 0) // seq_len  # full samples cut from each document
    # tokens left after them (1: nothing left to predict)
    rest = np.maximum(n - 1, 0) - full * seq_len + 1
    # Full samples: one bin each.
    f_seq = np.repeat(order, full)
    f_start = (np.arange(len(f_seq)) - np.repeat(np.cumsum(full) - full, full)) * seq_len
    # Remainders (whole short documents included) by best-fit decreasing.
    keep = rest >= 2
    r_seq, r_start, r_len = order[keep], (full * seq_len)[keep], rest[keep]
    by_size = np.argsort(-r_len, kind="stable")
    r_bin = _best_fit(r_len[by_size].tolist(), cap)
    r_seq, r_start, r_len = r_seq[by_size], r_start[by_size], r_len[by_size]
    # All bins, shuffled; pieces grouped by bin, in packing order within a bin.
    num_full, num_rest = len(f_seq), (max(r_bin) + 1 if r_bin else 0)
    if num_full + num_rest == 0:
        raise ValueError(f"no document has the 2 tokens a sample needs (seq_len {seq_len})")
    bin_of_piece = np.concatenate(
        [np.arange(num_full), num_full + np.asarray(r_bin, dtype=np.int64)]
    )
    new_bin = rng.permutation(num_full + num_rest)[bin_of_piece]
    piece_order = np.argsort(new_bin, kind="stable")
    seqs = np.concatenate([f_seq, r_seq])[piece_order]
    starts = np.concatenate([f_start, r_start])[piece_order]
    lens = np.concatenate([np.full(num_full, cap, np.int64), r_len])[piece_order]
    bin_ptr = np.concatenate([[0], np.cumsum(np.bincount(new_bin, minlength=num_full + num_rest))])
    return np.concatenate([[num_full + num_rest, len(seqs)], bin_ptr, seqs, starts, lens]).astype(
        np.int64
    )


def _best_fit(sizes: list[int], cap: int) -> list[int]:
    """Bin of each item (sizes in decreasing order): the open bin with the least room that still
    fits it."""
    bins_by_room: dict[int, list[int]] = {}
    # sorted distinct rooms of open bins; at most cap entries, so insort stays cheap
    rooms: list[int] = []
    assignment, num_bins = [], 0
    for size in sizes:
        i = bisect_left(rooms, size)
        if i < len(rooms):
            room = rooms[i]
            b = bins_by_room[room].pop()
            if not bins_by_room[room]:
                del rooms[i]
        else:
            room, b, num_bins = cap, num_bins, num_bins + 1
        assignment.append(b)
        room -= size
        if room >= 2:  # a piece needs two tokens to hold a label
            stack = bins_by_room.setdefault(room, [])
            if not stack:
                insort(rooms, room)
            stack.append(b)
    return assignment


class EpochIndex:
    """Views into one epoch's flat index array."""

    def __init__(self, flat: np.ndarray, mode: str, seq_len: int) -> None:
        self.mode, self.seq_len = mode, seq_len
        a, b = int(flat[0]), int(flat[1])
        if mode == "concat":
            self.num_samples = b
            self.order, self.ends, self.shuffle = (
                flat[2 : 2 + a],
                flat[2 + a : 2 + 2 * a],
                flat[2 + 2 * a : 2 + 2 * a + b],
            )
        else:
            self.num_samples = a
            self.bin_ptr = flat[2 : 3 + a]
            self.seqs, self.starts, self.lens = (
                flat[3 + a + i * b : 3 + a + (i + 1) * b] for i in range(3)
            )

    def pieces(self, i: int) -> Pieces:
        if self.mode == "best_fit":
            lo, hi = int(self.bin_ptr[i]), int(self.bin_ptr[i + 1])
            return [
                (int(s), int(o), int(n))
                for s, o, n in zip(self.seqs[lo:hi], self.starts[lo:hi], self.lens[lo:hi])
            ]
        pos = int(self.shuffle[i]) * self.seq_len
        need = self.seq_len + 1
        d = int(np.searchsorted(self.ends, pos, side="right"))
        out: Pieces = []
        while need:
            doc_start = int(self.ends[d - 1]) if d else 0
            offset = pos - doc_start
            take = min(need, int(self.ends[d]) - pos)
            if take:
                out.append((int(self.order[d]), offset, take))
            need -= take
            pos += take
            d += 1
        return out


def build_epoch(
    mode: str, lengths: np.ndarray, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
    builders: dict[str, Callable[..., np.ndarray]] = {
        "concat": concat_epoch,
        "best_fit": best_fit_epoch,
    }
    if mode not in builders:
        raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, not {mode!r}")
    return builders[mode](lengths, seq_len, rng)


def assemble(
    pieces: Pieces, read: Callable[[int, int, int], np.ndarray], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, position_ids), each [seq_len], from the runs of one sample.

    Positions restart at 0 at the sample start and at every run (a new document), which is how the
    model finds document boundaries; labels are the inputs shifted by one, -100 where the target is
    padding.
    """
    cap = seq_len + 1
    tokens = np.full(cap, pad_id, dtype=np.int64)
    positions = np.zeros(cap, dtype=np.int64)
    filled = 0
    for seq, start, count in pieces:
        tokens[filled : filled + count] = read(seq, start, count)
        positions[filled : filled + count] = np.arange(count)
        filled += count
    positions[filled:] = np.arange(cap - filled)  # padding is a document of its own
    labels = tokens[1:].copy()
    if filled < cap:
        labels[max(filled - 1, 0) :] = IGNORE_INDEX
    return tokens[:-1], labels, positions[:-1]
