"""Turn a text corpus into packed token shards: documents -> split -> tokenizer -> shards.

Output folder layout::

    DIR/meta.json                 vocab size, dtype, special ids, token/document counts, shard checksums
    DIR/train_00000.bin, ...      training tokens (see aoe.data.shards for the format)
    DIR/val_00000.bin, ...        validation tokens
    DIR/tokenizer/                Hugging Face tokenizer files (load_tokenizer(DIR / "tokenizer"))

Each document is stored as BOS + tokens + EOS, back to back. The train/val split is by whole
documents, so no document contributes tokens to both splits.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sysconfig
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aoe.data.shards import META_FORMAT, META_VERSION, open_shard, read_meta, token_dtype, write_json_atomic, write_shard
from aoe.data.tokenizer import BPE_SPECIAL_TOKENS, BYTE_ALPHABET_SIZE, TextTokenizer, load_tokenizer, train_bpe_tokenizer

DEFAULT_EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz")
# Folders skipped in the standard-library corpus: installed packages and test data (which
# includes deliberately malformed and non-UTF-8 source files).
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


@dataclass
class Document:
    source: str  # path relative to the corpus folder, "path:line" for a JSONL record, or "dataset[index]"
    text: str


@dataclass
class CorpusStats:
    files_read: int = 0
    bytes_read: int = 0
    empty_documents: int = 0
    undecodable_files: int = 0
    skipped_by_extension: Counter = field(default_factory=Counter)


def default_corpus_dir() -> Path:
    """Return the running interpreter's standard-library source folder (no download needed)."""
    return Path(sysconfig.get_paths()["stdlib"])


def prepare_default_corpus(out_dir: str | os.PathLike, bpe_vocab_size: int = 8192, **options) -> dict:
    """Prepare this interpreter's standard-library .py files (one document each) with a trained BPE.

    ``options`` go to prepare_corpus (for example max_bytes, val_fraction, seed, overwrite).
    """
    return prepare_corpus(
        out_dir,
        input_path=default_corpus_dir(),
        extensions=(".py",),
        exclude_dirs=STDLIB_EXCLUDED_DIRS,
        bpe_vocab_size=bpe_vocab_size,
        **options,
    )


def normalize_text(text: str) -> str:
    """Strip a UTF-8 byte-order mark and turn CRLF and lone CR into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- reading documents ---------------------------------------------------------------------------


def _suffix_of(path: Path, extensions: Sequence[str]) -> str | None:
    name = path.name.lower()
    # Longest first, so ".jsonl.gz" wins over ".gz".
    for ext in sorted(extensions, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def _read_text_file(path: Path, stats: CorpusStats) -> str:
    raw = path.read_bytes()
    stats.bytes_read += len(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.undecodable_files += 1
        return raw.decode("utf-8-sig", errors="replace")


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats, label: str) -> Iterator[Document]:
    compressed = path.name.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                stats.bytes_read += len(raw_line)
                record = _parse_jsonl_line(raw_line, path, line_number)
                if record is None:
                    continue
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{line_number}: record has no text field {text_field!r} (found {keys}); set --text-field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_number}: text field {text_field!r} is {type(text).__name__} "
                                     f"{_preview(text)}, expected a string; fix the record or set --text-field")
                yield Document(f"{label}:{line_number}", text)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        if not compressed:
            raise
        raise ValueError(f"{path} is not a valid gzip file ({exc}); compress it with gzip or rename it to .jsonl") from exc


def _parse_jsonl_line(raw_line: bytes, path: Path, line_number: int):
    """Decode and parse one JSONL line; return None for a blank line."""
    try:
        line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{line_number}: invalid UTF-8 at byte {exc.start} of the line; JSONL files must be UTF-8") from exc
    if not line:
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line_number}: invalid JSON ({exc.msg})") from exc


def _preview(value, max_chars: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def iter_file_documents(
    root: Path,
    text_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    exclude_dirs: Sequence[str] = (),
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Yield documents from a file or, recursively and in sorted path order, a folder.

    A .jsonl or .jsonl.gz record is one document; any other accepted file is one document.
    Files with other extensions are counted in ``stats.skipped_by_extension``.
    """
    stats = stats if stats is not None else CorpusStats()
    if not root.exists():
        raise FileNotFoundError(f"corpus path {root} not found")
    if root.is_file():
        paths = [root]
    else:
        paths = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in exclude_dirs)
            paths.extend(Path(directory) / name for name in files)
        paths.sort()
    for path in paths:
        ext = _suffix_of(path, extensions)
        # Sources are recorded relative to the corpus folder, so meta.json does not depend on where it lives.
        label = path.name if root.is_file() else path.relative_to(root).as_posix()
        if ext is None:
            stats.skipped_by_extension[path.suffix.lower() or "(none)"] += 1
            continue
        stats.files_read += 1
        if ext in (".jsonl", ".jsonl.gz"):
            yield from _read_jsonl(path, text_field, stats, label)
        else:
            yield Document(label, _read_text_file(path, stats))


def iter_dataset_documents(
    name: str, config: str | None = None, split: str = "train", text_field: str = "text", stats: CorpusStats | None = None
) -> Iterator[Document]:
    """Yield one document per record of a Hugging Face dataset (hub name, or a folder from save_to_disk)."""
    import datasets

    stats = stats if stats is not None else CorpusStats()
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"dataset {name!r} has no split {split!r}; available: {sorted(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, OSError) as exc:
        raise ValueError(
            f"dataset {name!r} could not be loaded ({type(exc).__name__}: {exc}); the Hugging Face hub may be "
            "unreachable: pass a local folder saved with Dataset.save_to_disk or use --input with text files"
        ) from exc
    if text_field not in loaded.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r}; columns: {loaded.column_names}; set --text-field")
    for index, record in enumerate(loaded):
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"dataset {name!r} record {index}: column {text_field!r} is {type(text).__name__} "
                             f"{_preview(text)}, expected a string; set --text-field to a text column")
        stats.bytes_read += len(text.encode("utf-8"))
        yield Document(f"{name}[{index}]", text)


def collect_documents(
    documents: Iterator[Document], stats: CorpusStats, max_documents: int | None = None, max_bytes: int | None = None
) -> list[Document]:
    """Normalize and keep non-empty documents, in order, up to the document and UTF-8 byte caps."""
    kept: list[Document] = []
    total_bytes = 0
    for doc in documents:
        text = normalize_text(doc.text)
        if not text.strip():
            stats.empty_documents += 1
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and kept and total_bytes + size > max_bytes:
            break
        kept.append(Document(doc.source, text))
        total_bytes += size
        if max_documents is not None and len(kept) >= max_documents:
            break
    return kept


def split_documents(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Return a boolean mask of validation documents: round(val_fraction * N) of them, at least one.

    The fraction counts documents, not tokens; the chosen documents depend only on N and the seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_documents < 2:
        raise ValueError(f"a document-level train/val split needs at least 2 documents, the corpus has {num_documents}")
    num_val = min(num_documents - 1, max(1, round(val_fraction * num_documents)))
    order = np.random.default_rng(seed).permutation(num_documents)
    is_val = np.zeros(num_documents, dtype=bool)
    is_val[order[:num_val]] = True
    return is_val


# --- tokenizing and writing ----------------------------------------------------------------------


class _ShardWriter:
    """Buffers token arrays and writes ``{split}_{index:05d}.bin`` files of at most ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            joined = np.concatenate(self.buffer)
            self._write(joined[: self.shard_tokens])
            rest = joined[self.shard_tokens :]
            self.buffer, self.buffered = [rest], rest.size

    def close(self) -> list[dict]:
        if self.buffered or not self.shards:
            self._write(np.concatenate(self.buffer) if self.buffer else np.zeros(0, dtype=self.dtype))
        self.buffer, self.buffered = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        sha256 = write_shard(self.out_dir / name, tokens.astype(self.dtype, copy=False))
        self.shards.append({"file": name, "num_tokens": int(tokens.size), "sha256": sha256})
        self.num_tokens += int(tokens.size)


def _document_array(ids: list[int], bos_id: int | None, eos_id: int | None, dtype: np.dtype) -> np.ndarray:
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    return np.asarray(head + ids + tail, dtype=dtype)


def _batches_by_size(documents: list[Document], batch_chars: int, max_batch_documents: int = 1024) -> Iterator[list[Document]]:
    """Group documents into batches of about ``batch_chars`` characters (at least one document each)."""
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= batch_chars or len(batch) >= max_batch_documents:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_to_shards(
    documents: list[Document],
    tokenizer: TextTokenizer,
    out_dir: Path,
    split: str,
    dtype: np.dtype,
    batch_chars: int = 1 << 23,
    shard_tokens: int = 1 << 28,
) -> tuple[list[dict], int]:
    """Encode documents in batches and write them as shards; return (shard records, token count).

    The Rust tokenizer encodes the documents of a batch in parallel, so a batch of several
    documents keeps all cores busy while the progress bar still moves between batches.
    """
    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    limit = np.iinfo(dtype).max
    with tqdm(total=sum(len(d.text) for d in documents), desc=f"tokenize {split}", unit="char", unit_scale=True) as bar:
        for batch in _batches_by_size(documents, batch_chars):
            for ids in tokenizer.encode_batch([d.text for d in batch]):
                if ids and max(ids) > limit:
                    raise ValueError(f"token id {max(ids)} does not fit the shard dtype {dtype.name}")
                writer.add(_document_array(ids, tokenizer.bos_id, tokenizer.eos_id, dtype))
            bar.update(sum(len(d.text) for d in batch))
    shards = writer.close()
    return shards, writer.num_tokens


def prepare_corpus(
    out_dir: str | os.PathLike,
    input_path: str | os.PathLike | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    tokenizer: str | None = None,
    bpe_vocab_size: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    exclude_dirs: Sequence[str] = (),
    dtype: str = "auto",
    shard_tokens: int = 1 << 28,
    overwrite: bool = False,
) -> dict:
    """Read a corpus, split it by document, tokenize it and write shards plus meta.json; return the meta dict.

    Give exactly one of ``input_path`` (file or folder) and ``dataset``, and exactly one of
    ``tokenizer`` (see load_tokenizer) and ``bpe_vocab_size`` (train a byte-level BPE on the
    training documents only, so validation text never shapes the vocabulary).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    _check_arguments(input_path, dataset, tokenizer, bpe_vocab_size, val_fraction, max_documents, max_bytes, dtype, shard_tokens)
    # The nearest existing ancestor must be a folder, or mkdir fails only after the corpus is read.
    existing = next(path for path in (out, *out.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"output path {out} cannot be a folder because {existing} is a file; give another path for --out")
    if (out / "meta.json").exists() and not overwrite:
        raise ValueError(f"output folder {out} already contains prepared data (meta.json); pass --overwrite (overwrite=True in Python) to replace it")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    # A missing tokenizer path should fail before the corpus is read.
    loaded_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None

    stats = CorpusStats()
    if input_path is not None:
        source = str(input_path)
        docs_iter = iter_file_documents(Path(input_path).expanduser(), text_field, extensions, exclude_dirs, stats)
    else:
        source = f"dataset:{dataset}" + (f"/{dataset_config}" if dataset_config else "") + f"[{split}]"
        docs_iter = iter_dataset_documents(dataset, dataset_config, split, text_field, stats)
    documents = collect_documents(docs_iter, stats, max_documents, max_bytes)
    if stats.skipped_by_extension:
        skipped = ", ".join(f"{ext}: {n}" for ext, n in sorted(stats.skipped_by_extension.items()))
        print(f"ignored {sum(stats.skipped_by_extension.values())} files with other extensions ({skipped}); accepted: {', '.join(extensions)}")
    if stats.undecodable_files:
        print(f"{stats.undecodable_files} files were not valid UTF-8; invalid bytes were replaced with U+FFFD")
    if not documents:
        raise ValueError(
            f"corpus {source} has no text: {stats.files_read} files with extensions {', '.join(extensions)} were read, "
            f"{stats.empty_documents} empty documents"
        )

    is_val = split_documents(len(documents), val_fraction, seed)
    splits = {
        "train": [d for d, v in zip(documents, is_val) if not v],
        "val": [d for d, v in zip(documents, is_val) if v],
    }

    if loaded_tokenizer is None:
        print(f"training a byte-level BPE tokenizer (vocab_size {bpe_vocab_size}) on {len(splits['train'])} training documents")
        loaded_tokenizer = train_bpe_tokenizer((d.text for d in splits["train"]), bpe_vocab_size)
        tokenizer_spec = f"bpe:{bpe_vocab_size} (byte-level, trained on this corpus's training split)"
        if loaded_tokenizer.vocab_size < bpe_vocab_size:
            # BpeTrainer stops when no adjacent pair occurs min_frequency (2) times, which a small corpus reaches early.
            print(f"note: the BPE vocabulary has {loaded_tokenizer.vocab_size} tokens, fewer than the requested "
                  f"{bpe_vocab_size}, because the training text has no more merges; meta.json records "
                  f"vocab_size {loaded_tokenizer.vocab_size}")
            tokenizer_spec += f", reached vocab_size {loaded_tokenizer.vocab_size}"
    else:
        tokenizer_spec = str(tokenizer)
    if loaded_tokenizer.bos_id is None and loaded_tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer_spec} has neither a BOS nor an EOS token, so documents cannot be separated")
    shard_dtype = _shard_dtype(loaded_tokenizer.vocab_size, dtype)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    for stale in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), out / "meta.json"]:
        stale.unlink(missing_ok=True)
    # Files of an earlier tokenizer (a tokenizer.model, say) must not outlive it.
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    loaded_tokenizer.save_pretrained(out / "tokenizer")

    shards, num_tokens = {}, {}
    for name, docs in splits.items():
        shards[name], num_tokens[name] = tokenize_to_shards(docs, loaded_tokenizer, out, name, shard_dtype, shard_tokens=shard_tokens)

    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "vocab_size": loaded_tokenizer.vocab_size,
        "dtype": shard_dtype.name,
        "bos_id": loaded_tokenizer.bos_id,
        "eos_id": loaded_tokenizer.eos_id,
        "pad_id": loaded_tokenizer.pad_id,
        "tokenizer": tokenizer_spec,
        "num_tokens": num_tokens,
        "num_documents": {name: len(docs) for name, docs in splits.items()},
        "num_bytes": {name: sum(len(d.text.encode("utf-8")) for d in docs) for name, docs in splits.items()},
        "val_documents": [d.source for d in splits["val"]],
        "split": {"by": "documents", "val_fraction": val_fraction, "seed": seed},
        "sources": [source],
        "files_read": stats.files_read,
        "ignored_files": dict(stats.skipped_by_extension),
        "empty_documents": stats.empty_documents,
        "limits": {"max_documents": max_documents, "max_bytes": max_bytes},
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(out / "meta.json", meta)
    return meta


def _check_arguments(input_path, dataset, tokenizer, bpe_vocab_size, val_fraction, max_documents, max_bytes, dtype, shard_tokens) -> None:
    if (input_path is None) == (dataset is None):
        raise ValueError("give exactly one corpus source: input_path (--input) or dataset (--dataset)")
    if (tokenizer is None) == (bpe_vocab_size is None):
        raise ValueError("give exactly one of tokenizer (--tokenizer) and bpe_vocab_size (--bpe-vocab-size)")
    min_vocab = BYTE_ALPHABET_SIZE + len(BPE_SPECIAL_TOKENS)
    if bpe_vocab_size is not None and bpe_vocab_size < min_vocab:
        raise ValueError(f"bpe_vocab_size must be >= {min_vocab} (256 byte tokens + {len(BPE_SPECIAL_TOKENS)} special tokens), got {bpe_vocab_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, value in (("max_documents", max_documents), ("max_bytes", max_bytes), ("shard_tokens", shard_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise ValueError(f"dtype must be one of auto, uint16, uint32; got {dtype!r}")


def _shard_dtype(vocab_size: int, requested: str) -> np.dtype:
    automatic = token_dtype(vocab_size)
    if requested == "auto":
        return automatic
    chosen = np.dtype(requested).newbyteorder("<")
    if vocab_size - 1 > np.iinfo(chosen).max:
        raise ValueError(f"vocabulary of {vocab_size} tokens is too large for shard dtype {requested} (max id {np.iinfo(chosen).max}); use uint32 or auto")
    return chosen


def verify_prepared(data_dir: str | os.PathLike) -> dict:
    """Check every shard of a prepared folder against meta.json; return the meta dict."""
    meta = read_meta(data_dir)
    for split_shards in meta["shards"].values():
        for shard in split_shards:
            open_shard(Path(data_dir) / shard["file"], shard["num_tokens"], shard["sha256"], meta["vocab_size"])
    return meta
