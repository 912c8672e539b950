"""prepare_corpus on a small mixed corpus: counts, document-level split, shard checks, errors."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from aoe.data.loader import TokenDataset
from aoe.data.prepare import (
    _shard_dtype,
    default_corpus_dir,
    normalize_text,
    prepare_corpus,
    prepare_default_corpus,
    split_documents,
    verify_prepared,
)
from aoe.data.shards import HEADER_BYTES, token_dtype, write_shard
from aoe.data.tokenizer import load_tokenizer

BOM_CRLF_BYTES = "\ufeffFirst line of a novel.\r\nSecond line, café.\r\n\r\nThe end.\r\n".encode("utf-8")
JSONL_TEXTS = ["a record about foxes", "another record, with <s> in it", "third: 42 and 7"]
GZ_TEXTS = ["compressed record one", "compressed record two\nwith a second line"]


def _write_corpus(root: Path) -> list[str]:
    """Write the test corpus and return the expected normalized documents in read order."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain text file.\nIt has two lines.\n", encoding="utf-8")
    (root / "bom_crlf.txt").write_bytes(BOM_CRLF_BYTES)
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    with open(root / "sub" / "records.jsonl", "w", encoding="utf-8") as f:
        for text in JSONL_TEXTS:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write("\n")
    with gzip.open(root / "sub" / "records.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in GZ_TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    bom_doc = "First line of a novel.\nSecond line, café.\n\nThe end.\n"
    return ["Plain text file.\nIt has two lines.\n", bom_doc, *JSONL_TEXTS, *GZ_TEXTS]


def _documents(tokens: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    starts = np.flatnonzero(tokens == bos)
    docs = []
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(tokens)
        assert tokens[stop - 1] == eos
        docs.append(tokens[start + 1 : stop - 1].tolist())
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected_docs = _write_corpus(root)
    out = tmp_path_factory.mktemp("prepared")
    meta = prepare_corpus(out, input_path=root, bpe_vocab_size=300, val_fraction=0.3, seed=3, overwrite=True)
    return out, meta, expected_docs


def test_normalize_text():
    assert normalize_text("\ufeffa\r\nb\rc\n") == "a\nb\nc\n"


def test_prepare_counts_and_split(prepared):
    out, meta, expected_docs = prepared
    tokenizer = load_tokenizer(out / "tokenizer")
    assert meta["num_documents"] == {"train": 5, "val": 2}
    assert meta["empty_documents"] == 1
    assert meta["ignored_files"] == {".md": 1}
    assert meta["dtype"] == "uint16"
    expected_tokens = sum(len(ids) + 2 for ids in tokenizer.encode_batch(expected_docs))
    assert meta["num_tokens"]["train"] + meta["num_tokens"]["val"] == expected_tokens

    decoded = {}
    for split in ("train", "val"):
        dataset = TokenDataset(out, split)
        assert len(dataset) == meta["num_tokens"][split]
        stream = dataset.tokens(0, len(dataset))
        decoded[split] = [tokenizer.decode(ids) for ids in _documents(stream, meta["bos_id"], meta["eos_id"])]
    # Whole documents on each side, none shared, none lost, BOM and CR gone.
    assert sorted(decoded["train"] + decoded["val"]) == sorted(expected_docs)
    assert not set(decoded["train"]) & set(decoded["val"])
    assert all("\r" not in d and "\ufeff" not in d for d in decoded["train"] + decoded["val"])


def test_prepare_split_is_seeded(tmp_path, prepared):
    _, meta, _ = prepared
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    again = prepare_corpus(tmp_path / "again", input_path=corpus, bpe_vocab_size=300, val_fraction=0.3, seed=3)
    assert again["val_documents"] == meta["val_documents"]
    assert again["shards"] == meta["shards"]


def test_split_documents_counts():
    assert split_documents(100, 0.05, 0).sum() == 5
    assert split_documents(3, 0.05, 0).sum() == 1
    assert split_documents(2, 0.9, 0).sum() == 1
    assert not np.array_equal(split_documents(100, 0.1, 0), split_documents(100, 0.1, 1))
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(1, 0.05, 0)


def test_truncated_shard_detected(prepared, tmp_path):
    out, meta, _ = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / meta["shards"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(copy, "train")


def test_foreign_and_altered_shards_detected(prepared, tmp_path):
    out, meta, _ = prepared
    for path in out.iterdir():
        if path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    shard = tmp_path / meta["shards"]["val"][0]["file"]
    original = shard.read_bytes()

    shard.write_bytes(b"\x00" * len(original))
    with pytest.raises(ValueError, match="not an aoe token shard"):
        TokenDataset(tmp_path, "val")

    altered = bytearray(original)
    altered[HEADER_BYTES] ^= 1
    shard.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="SHA-256"):
        verify_prepared(tmp_path)


def test_empty_corpus_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no text"):
        prepare_corpus(tmp_path / "out", input_path=tmp_path, bpe_vocab_size=300)


def test_argument_errors(tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_corpus(tmp_path / "out", input_path=tmp_path, tokenizer=str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="corpus path"):
        prepare_corpus(tmp_path / "out", input_path=tmp_path / "missing", bpe_vocab_size=300)
    with pytest.raises(ValueError, match="exactly one of tokenizer"):
        prepare_corpus(tmp_path / "out", input_path=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(tmp_path / "out", input_path=tmp_path, bpe_vocab_size=300, val_fraction=0.0)


def test_shard_dtype_limits(tmp_path):
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    with pytest.raises(ValueError, match="too large for shard dtype uint16"):
        _shard_dtype(70000, "uint16")
    sha = write_shard(tmp_path / "x.bin", np.arange(10, dtype=np.uint32))
    assert len(sha) == 64
    assert (tmp_path / "x.bin").stat().st_size == HEADER_BYTES + 40


def test_max_documents_cap(tmp_path):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    meta = prepare_corpus(tmp_path / "out", input_path=corpus, bpe_vocab_size=300, max_documents=4)
    assert sum(meta["num_documents"].values()) == 4


def test_default_corpus_dir_is_stdlib():
    assert (default_corpus_dir() / "os.py").is_file()


def test_prepare_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["first record", "second record", "third record", "  ", "fourth record"]
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    meta = prepare_corpus(tmp_path / "out", dataset=str(tmp_path / "saved"), text_field="body", bpe_vocab_size=300, val_fraction=0.25)
    assert meta["num_documents"] == {"train": 3, "val": 1}
    assert meta["empty_documents"] == 1
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare_corpus(tmp_path / "out2", dataset=str(tmp_path / "saved"), bpe_vocab_size=300)


def test_default_corpus_capped(tmp_path):
    meta = prepare_default_corpus(tmp_path / "out", bpe_vocab_size=300, max_bytes=200_000)
    assert 0 < sum(meta["num_bytes"].values()) <= 200_000
    assert meta["num_documents"]["val"] >= 1
    assert all(source.endswith(".py") for source in meta["val_documents"])
    assert not any(part in ("test", "site-packages") for s in meta["val_documents"] for part in s.split("/"))


def test_cli_prepare_and_errors(tmp_path, capsys):
    from aoe.cli import main

    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(corpus), "--bpe-vocab-size", "300", "--out", str(out), "--val-fraction", "0.3"]) == 0
    assert "train" in capsys.readouterr().out
    assert TokenDataset(out, "val").meta["num_documents"] == {"train": 5, "val": 2}

    assert main(["prepare", "--input", str(corpus), "--bpe-vocab-size", "300", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare", "--input", str(corpus), "--tokenizer", str(tmp_path / "missing.model"), "--out", str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["prepare", "--input", str(corpus), "--bpe-vocab-size", "100", "--out", str(tmp_path / "o3")]) == 2
    assert "bpe_vocab_size must be >= 260" in capsys.readouterr().err


def test_small_shards_same_stream(prepared, tmp_path):
    out, meta, _ = prepared
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    split = prepare_corpus(tmp_path / "split", input_path=corpus, bpe_vocab_size=300, val_fraction=0.3, seed=3, shard_tokens=7)
    assert len(split["shards"]["train"]) == -(-meta["num_tokens"]["train"] // 7)
    assert all(s["num_tokens"] == 7 for s in split["shards"]["train"][:-1])
    for name in ("train", "val"):
        whole, pieces = TokenDataset(out, name), TokenDataset(tmp_path / "split", name)
        assert np.array_equal(whole.tokens(0, len(whole)), pieces.tokens(0, len(pieces)))


def test_single_jsonl_file_input(tmp_path):
    path = tmp_path / "only.jsonl"
    path.write_text("".join(json.dumps({"content": f"record number {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    meta = prepare_corpus(tmp_path / "out", input_path=path, text_field="content", bpe_vocab_size=300, val_fraction=0.2)
    assert meta["num_documents"] == {"train": 8, "val": 2}
    assert all(source.startswith("only.jsonl:") for source in meta["val_documents"])
    with pytest.raises(ValueError, match="no text field 'text'"):
        prepare_corpus(tmp_path / "out2", input_path=path, bpe_vocab_size=300)


def test_invalid_jsonl_inputs_named(tmp_path):
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text(json.dumps({"text": "not compressed"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"plain\.jsonl\.gz is not a valid gzip file"):
        prepare_corpus(tmp_path / "out", input_path=not_gzip, bpe_vocab_size=300)

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress((json.dumps({"text": "x" * 1000}) + "\n").encode())[:30])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz is not a valid gzip file"):
        prepare_corpus(tmp_path / "out", input_path=truncated, bpe_vocab_size=300)

    for line_two, type_name in (("[\"a\", \"b\"]", "list"), ("null", "NoneType"), ("42", "int")):
        path = tmp_path / f"{type_name}.jsonl"
        path.write_text('{"text": "fine"}\n{"text": ' + line_two + "}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"{type_name}\.jsonl:2: text field 'text' is {type_name} .*expected a string"):
            prepare_corpus(tmp_path / "out", input_path=path, bpe_vocab_size=300)

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: invalid UTF-8"):
        prepare_corpus(tmp_path / "out", input_path=latin1, bpe_vocab_size=300)
    assert not (tmp_path / "out").exists()


def test_out_path_under_file_rejected(tmp_path):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    taken = tmp_path / "taken"
    taken.write_text("keep me", encoding="utf-8")
    for out in (taken, taken / "sub"):
        with pytest.raises(ValueError, match=r"taken is a file; give another path for --out"):
            prepare_corpus(out, input_path=corpus, bpe_vocab_size=300)
    assert taken.read_text(encoding="utf-8") == "keep me"


def test_unreached_bpe_vocab_noted(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    meta = prepare_corpus(tmp_path / "out", input_path=corpus, bpe_vocab_size=100_000, val_fraction=0.3)
    reached = load_tokenizer(str(tmp_path / "out" / "tokenizer")).vocab_size
    assert meta["vocab_size"] == reached
    assert reached < 1000
    printed = capsys.readouterr().out
    assert f"the BPE vocabulary has {reached} tokens, fewer than the requested 100000" in printed
    assert meta["tokenizer"].endswith(f"reached vocab_size {reached}")


def test_dataset_non_string_text_rejected(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first record", None, "third"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"record 1: column 'text' is NoneType None, expected a string"):
        prepare_corpus(tmp_path / "out", dataset=str(tmp_path / "saved"), bpe_vocab_size=300)
