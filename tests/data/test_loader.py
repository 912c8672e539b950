"""PackedLoader and eval_batches over a synthetic dataset whose token i has value i."""

import json

import numpy as np
import pytest
import torch

from aoe.data.loader import PackedLoader, TokenDataset, eval_batches
from aoe.data.shards import META_FORMAT, META_VERSION, write_json_atomic, write_shard

NUM_TOKENS = 5000
SEQ_LEN = 15  # windows of 16 tokens: 312 windows, 8 tokens left over
SPAN = SEQ_LEN + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A train split of tokens 0..NUM_TOKENS-1 in three uneven shards, so windows cross shard borders."""
    out = tmp_path_factory.mktemp("synthetic")
    tokens = np.arange(NUM_TOKENS, dtype=np.uint16)
    shards = []
    for index, (lo, hi) in enumerate([(0, 1000), (1000, 1007), (1007, NUM_TOKENS)]):
        name = f"train_{index:05d}.bin"
        shards.append({"file": name, "num_tokens": hi - lo, "sha256": write_shard(out / name, tokens[lo:hi])})
    meta = {"format": META_FORMAT, "version": META_VERSION, "vocab_size": 65535, "dtype": "uint16", "shards": {"train": shards}}
    write_json_atomic(out / "meta.json", meta)
    return TokenDataset(out, "train")


def _window_starts(batch):
    return (batch.input_ids[:, 0] // SPAN).tolist()


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels)


def test_dataset_reads_across_shards(dataset):
    assert len(dataset) == NUM_TOKENS
    assert dataset.tokens(995, 1010).tolist() == list(range(995, 1010))


def test_batch_is_window_with_shifted_labels(dataset):
    batch = next(PackedLoader(dataset, batch_size=4, seq_len=SEQ_LEN, seed=0))
    assert batch.input_ids.dtype == torch.int64
    assert batch.input_ids.shape == (4, SEQ_LEN)
    assert torch.equal(batch.labels, batch.input_ids + 1)
    assert all(int(x) % SPAN == 0 for x in batch.input_ids[:, 0])


def test_epoch_covers_distinct_windows(dataset):
    loader = PackedLoader(dataset, batch_size=4, seq_len=SEQ_LEN, seed=1)
    assert loader.batches_per_epoch == 312 // 4
    starts = [s for b in _take(loader, loader.batches_per_epoch) for s in _window_starts(b)]
    assert len(set(starts)) == len(starts) == 312
    assert loader.state_dict()["epoch"] == 1
    next_epoch = [s for b in _take(loader, 3) for s in _window_starts(b)]
    assert next_epoch != starts[:12]


def test_loader_seeded(dataset):
    a = _take(PackedLoader(dataset, 4, SEQ_LEN, seed=7), 5)
    b = _take(PackedLoader(dataset, 4, SEQ_LEN, seed=7), 5)
    c = _take(PackedLoader(dataset, 4, SEQ_LEN, seed=8), 5)
    _assert_same(a, b)
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))


def test_no_shuffle_is_sequential(dataset):
    batch = next(PackedLoader(dataset, 3, SEQ_LEN, seed=0, shuffle=False))
    assert _window_starts(batch) == [0, 1, 2]


def test_two_ranks_disjoint(dataset):
    ranks = [PackedLoader(dataset, 5, SEQ_LEN, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 312 // 10
    seen = [{s for b in _take(loader, loader.batches_per_epoch) for s in _window_starts(b)} for loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 31 * 5
    assert not seen[0] & seen[1]


def test_resume_mid_epoch_and_across_boundary(dataset):
    loader = PackedLoader(dataset, 4, SEQ_LEN, seed=5)
    _take(loader, 70)  # 78 batches per epoch
    state = json.loads(json.dumps(loader.state_dict()))
    expected = _take(loader, 20)  # crosses into epoch 1

    resumed = PackedLoader(dataset, 4, SEQ_LEN, seed=5)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 20), expected)
    assert resumed.state_dict() == loader.state_dict()


def test_resume_at_epoch_start(dataset):
    loader = PackedLoader(dataset, 4, SEQ_LEN, seed=5, rank=1, world_size=2)
    _take(loader, loader.batches_per_epoch * 2)
    state = loader.state_dict()
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 0)
    expected = _take(loader, 3)
    resumed = PackedLoader(dataset, 4, SEQ_LEN, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 3), expected)


def test_resume_rejects_other_settings(dataset):
    state = PackedLoader(dataset, 4, SEQ_LEN, seed=5).state_dict()
    with pytest.raises(ValueError, match="batch_size=4"):
        PackedLoader(dataset, 8, SEQ_LEN, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1"):
        PackedLoader(dataset, 4, SEQ_LEN, seed=5, rank=0, world_size=2).load_state_dict(state)


def test_shape_validation(dataset):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        PackedLoader(dataset, 0, SEQ_LEN, seed=0)
    with pytest.raises(ValueError, match="only 5000 tokens"):
        PackedLoader(dataset, 1, NUM_TOKENS, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch per rank"):
        PackedLoader(dataset, 200, SEQ_LEN, seed=0, world_size=2)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        PackedLoader(dataset, 1, SEQ_LEN, seed=-1)
    with pytest.raises(ValueError, match="rank must be"):
        PackedLoader(dataset, 1, SEQ_LEN, seed=0, rank=2, world_size=2)


def test_eval_batches_deterministic(dataset):
    first = list(eval_batches(dataset, batch_size=50, seq_len=SEQ_LEN))
    _assert_same(first, list(eval_batches(dataset, batch_size=50, seq_len=SEQ_LEN)))
    assert len(first) == 7  # 312 windows: six batches of 50 and one of 12
    assert first[-1].input_ids.shape == (12, SEQ_LEN)
    assert [s for b in first for s in _window_starts(b)] == list(range(312))
    assert torch.equal(first[0].labels, first[0].input_ids + 1)
    assert len(list(eval_batches(dataset, 50, SEQ_LEN, max_batches=2))) == 2


def _write_folder(out, tokens, vocab_size, dtype="uint16"):
    """A one-shard train split with a correct checksum and the given meta.json vocab_size and dtype."""
    out.mkdir(exist_ok=True)
    sha256 = write_shard(out / "train_00000.bin", tokens)
    shards = {"train": [{"file": "train_00000.bin", "num_tokens": int(tokens.size), "sha256": sha256}]}
    meta = {"format": META_FORMAT, "version": META_VERSION, "vocab_size": vocab_size, "dtype": dtype, "shards": shards}
    write_json_atomic(out / "meta.json", meta)
    return out


def test_ids_beyond_vocab_rejected(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    assert len(TokenDataset(_write_folder(tmp_path / "fits", tokens, 100), "train")) == 100

    folder = _write_folder(tmp_path / "small_vocab", tokens, 99)
    with pytest.raises(ValueError, match=r"train_00000\.bin contains token id 99, but meta.json records vocab_size 99"):
        TokenDataset(folder, "train")
    # The unverified path skips the full read, as documented.
    assert len(TokenDataset(folder, "train", verify=False)) == 100


def test_meta_vocab_must_fit_dtype(tmp_path):
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="vocab_size 70000, but dtype uint16 stores ids up to 65535"):
        TokenDataset(_write_folder(tmp_path / "a", tokens, 70000), "train")
    assert TokenDataset(_write_folder(tmp_path / "b", tokens, 65536), "train").vocab_size == 65536
    for bad in (0, "300", None, 2.5):
        with pytest.raises(ValueError, match="expected a positive integer"):
            TokenDataset(_write_folder(tmp_path / "c", tokens, bad), "train")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        TokenDataset(_write_folder(tmp_path / "d", tokens, 300, dtype="int8"), "train")


def test_missing_shard_names_prepare(tmp_path):
    folder = _write_folder(tmp_path / "gone", np.arange(10, dtype=np.uint16), 300)
    (folder / "train_00000.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_00000\.bin listed in meta.json is missing; run `aoe prepare` again"):
        TokenDataset(folder, "train")
