"""Tokenizer loading, conversion from SentencePiece, BPE training and save/reload."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from aoe.data.tokenizer import load_tokenizer, train_bpe_tokenizer

SHARED_DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
LLAMA_MODEL = SHARED_DATA / "tokenizer" / "llama2" / "tokenizer.model"
NOVELS = SHARED_DATA / "corpus" / "100_english_novels"

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Ein Käse, zwei Käse; naïve café. 日本語のテキスト 🙂\n",
    "It was the best of times, it was the worst of times, it was the age of wisdom.\n",
] * 4
PROBE_TEXTS = [
    "Hello world! It was the best of times.",
    "  two leading spaces\nnew line\n\n   x   \n",
    "Ünïcödé 日本語 🙂 \t tab\r\nCRLF",
    "class A:\n        def f(self):\n                return 12345\n",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(TRAIN_TEXTS, vocab_size=300, show_progress=False)


def test_bpe_round_trip(bpe):
    for text in PROBE_TEXTS:
        assert bpe.decode(bpe.encode_batch([text])[0]) == text


def test_bpe_special_ids(bpe):
    assert (bpe.hf.unk_token_id, bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2, 3)
    assert 260 < bpe.vocab_size <= 300
    # Merges were learned: frequent text takes fewer tokens than bytes.
    text = TRAIN_TEXTS[0]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_bpe_literal_special_text_is_plain(bpe):
    ids = bpe.encode("<s> and </s> in text")
    assert bpe.bos_id not in ids
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == "<s> and </s> in text"


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 260"):
        train_bpe_tokenizer(TRAIN_TEXTS, vocab_size=259)


def test_save_pretrained_same_ids(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    expected = bpe.encode_batch(PROBE_TEXTS)
    assert [auto(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS] == expected
    assert reloaded.encode_batch(PROBE_TEXTS) == expected
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 3)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode_batch(PROBE_TEXTS) == expected


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.model"))


def test_unreachable_hub_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass a local path"):
        load_tokenizer("no-such-org-aoe/no-such-tokenizer")


@pytest.fixture(scope="module")
def llama():
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"Llama 2 tokenizer not found at {LLAMA_MODEL.resolve()}")
    return load_tokenizer(LLAMA_MODEL)


def _novel_paragraphs(count: int) -> list[str]:
    if not NOVELS.is_dir():
        return []
    text = sorted(NOVELS.glob("*.txt"))[0].read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    middle = len(text) // 2
    return [text[middle : middle + 3000], text[:2000], *text[middle:].split("\n\n")[:count]]


def test_llama_ids_match_sentencepiece(llama):
    spm = pytest.importorskip("sentencepiece")
    processor = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    texts = PROBE_TEXTS + ["   ", " ", "a  b   c    d\t\t e", "<s> hi </s>"] + _novel_paragraphs(20)
    assert llama.encode_batch(texts) == processor.encode(texts)
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == (32000, 1, 2, None)
    assert llama.encode("Hello world") == [15043, 3186]


def test_llama_save_reload(llama, tmp_path):
    llama.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in PROBE_TEXTS:
        assert auto(text, add_special_tokens=False)["input_ids"] == llama.encode(text)
        assert llama.decode(llama.encode(text)) == text
