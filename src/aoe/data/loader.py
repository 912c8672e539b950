"""Memory-mapped token datasets and a resumable loader of packed training windows.

A window is ``seq_len + 1`` consecutive tokens of the split's concatenated token stream.
Window ``i`` covers tokens ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))``, so windows never
overlap, and the last ``num_tokens % (seq_len + 1)`` tokens are unused. A window ``w`` gives
``input_ids = w[:-1]`` and ``labels = w[1:]``: labels are already shifted, position t holds the
token that follows input position t.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aoe.data.shards import open_shard, read_meta

LOADER_STATE_VERSION = 1


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, S) int64
    labels: torch.Tensor  # (B, S) int64, next-token targets aligned with input_ids


class TokenDataset:
    """The token stream of one split of a prepared folder, memory-mapped from its shards.

    Opening checks every shard's header, size and SHA-256 against meta.json, and that no token
    id reaches meta.json's vocab_size. ``verify=False`` skips the checksum and the id check,
    which read every byte, but keeps the header and size checks.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", verify: bool = True):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        if split not in self.meta["shards"]:
            raise ValueError(f"split must be one of {sorted(self.meta['shards'])}, got {split!r}")
        self.split = split
        self._shards = [
            open_shard(self.data_dir / s["file"], s["num_tokens"], s["sha256"] if verify else None,
                       self.vocab_size if verify else None)
            for s in self.meta["shards"][split]
        ]
        for shard, info in zip(self._shards, self.meta["shards"][split]):
            if shard.dtype.name != self.meta["dtype"]:
                raise ValueError(f"shard {info['file']} stores {shard.dtype.name} tokens but meta.json records {self.meta['dtype']}")
        # Start offset of each shard in the concatenated stream, plus the total at the end.
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self._shards])]).astype(np.int64)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Return tokens ``[start, stop)`` of the concatenated stream as int64, across shard borders."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside the {len(self)} tokens of split {self.split!r}")
        parts = []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for index in range(max(first, 0), len(self._shards)):
            shard_start = int(self._offsets[index])
            if shard_start >= stop:
                break
            lo, hi = max(start - shard_start, 0), min(stop - shard_start, len(self._shards[index]))
            if hi > lo:
                parts.append(np.asarray(self._shards[index][lo:hi], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_shape(dataset: TokenDataset, batch_size: int, seq_len: int) -> int:
    """Validate the batch shape and return the number of windows in the split."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len + 1 > len(dataset):
        raise ValueError(
            f"seq_len {seq_len} needs windows of {seq_len + 1} tokens, but split {dataset.split!r} has only {len(dataset)} tokens"
        )
    return len(dataset) // (seq_len + 1)


def _windows_to_batch(dataset: TokenDataset, window_ids: np.ndarray, seq_len: int) -> Batch:
    span = seq_len + 1
    rows = np.stack([dataset.tokens(int(w) * span, (int(w) + 1) * span) for w in window_ids])
    tokens = torch.from_numpy(rows)
    # shape: (B, S + 1) -> input_ids (B, S), labels (B, S)
    return Batch(input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())


class PackedLoader:
    """Endless, resumable iterator of training batches over disjoint windows.

    Each epoch orders all windows by a permutation drawn from ``numpy.random.default_rng([seed,
    epoch])`` (the identity when ``shuffle=False``). Rank r takes positions r, r + world_size, ...
    of that order, so ranks never share a window, and every rank gets the same
    ``batches_per_epoch``. The leftover windows at the end of an epoch's order are skipped, and
    because every epoch draws a new order, different windows are skipped in each epoch.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        num_windows = _check_shape(dataset, batch_size, seq_len)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.batches_per_epoch = num_windows // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"split {dataset.split!r} has {num_windows} windows of {seq_len + 1} tokens, fewer than one batch per rank "
                f"(batch_size {batch_size} x world_size {world_size}); lower batch_size or seq_len"
            )
        self.dataset = dataset
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.num_windows = num_windows
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order_epoch: int | None = None
        self._rank_windows = np.zeros(0, dtype=np.int64)

    def _windows_of_epoch(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            used = self.batches_per_epoch * self.batch_size * self.world_size
            self._rank_windows = order[:used][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._rank_windows

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        windows = self._windows_of_epoch(self.epoch)
        start = self.batch_in_epoch * self.batch_size
        batch = _windows_to_batch(self.dataset, windows[start : start + self.batch_size], self.seq_len)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        """Return the position of the next batch plus the settings that must match on resume."""
        return {
            "version": LOADER_STATE_VERSION,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_tokens": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the following batches equal those the saved loader would have given.

        The loader must have the same seed, shape, rank, world size and dataset size; changing
        them would change which windows follow, so it raises ValueError instead.
        """
        if state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported (expected {LOADER_STATE_VERSION})")
        current = self.state_dict()
        for key in ("seed", "rank", "world_size", "batch_size", "seq_len", "shuffle", "num_tokens"):
            if state.get(key) != current[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {key}={current[key]!r}; resume needs the same value")
        epoch, position = state["epoch"], state["batch_in_epoch"]
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"loader state position epoch={epoch!r}, batch_in_epoch={position!r} is invalid for {self.batches_per_epoch} batches per epoch")
        self.epoch, self.batch_in_epoch = epoch, position


def eval_batches(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
    """Yield batches of consecutive windows from the start of the split, the same ones on every call.

    The last batch contains the remaining windows and can be smaller than ``batch_size``.
    """
    num_windows = _check_shape(dataset, batch_size, seq_len)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    for number, start in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield _windows_to_batch(dataset, np.arange(start, min(start + batch_size, num_windows)), seq_len)
