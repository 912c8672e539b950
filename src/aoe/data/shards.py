"""Token shard files: a 64-byte header followed by the raw token ids.

Header layout (little-endian): magic ``b"AOETOKS\\0"`` (8 bytes), format version (uint32), bytes
per token (uint32, 2 or 4), token count (uint64), zero padding to 64 bytes. meta.json also
records each shard's token count and SHA-256, so a truncated, replaced or foreign file is
detected when a dataset is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

META_FORMAT = "aoe-token-shards"
META_VERSION = 1
SHARD_MAGIC = b"AOETOKS\0"
SHARD_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """Return uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if vocab_size <= 65535:
        return _DTYPES[2]
    if vocab_size <= 2**32:
        return _DTYPES[4]
    raise ValueError(f"vocab_size {vocab_size} does not fit the largest shard dtype (uint32, at most 2**32 ids)")


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write ``tokens`` atomically (temp file, fsync, rename) and return the file's SHA-256."""
    dtype = tokens.dtype.newbyteorder("<")
    if dtype not in _DTYPES.values():
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0")
    body = np.ascontiguousarray(tokens, dtype=dtype).tobytes()
    digest = hashlib.sha256(header)
    digest.update(body)

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def open_shard(
    path: Path, expected_tokens: int | None = None, expected_sha256: str | None = None, vocab_size: int | None = None
) -> np.memmap:
    """Memory-map a shard's tokens after checking its header, size and (if given) checksum and max id.

    Raises FileNotFoundError when the file is missing, and ValueError naming the file when it is
    not an aoe shard, is truncated, does not match the counts and checksum that meta.json
    recorded, or contains a token id >= ``vocab_size``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in meta.json is missing; run `aoe prepare` again to rebuild {path.parent}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated or not an aoe shard")
    with open(path, "rb") as f:
        magic, version, itemsize, num_tokens = _HEADER.unpack(f.read(_HEADER.size))
    if magic != SHARD_MAGIC:
        raise ValueError(f"shard {path} does not start with the aoe magic {SHARD_MAGIC!r} (found {magic!r}): not an aoe token shard")
    if version != SHARD_VERSION:
        raise ValueError(f"shard {path} has format version {version}; this aoe reads version {SHARD_VERSION}")
    if itemsize not in _DTYPES:
        raise ValueError(f"shard {path} declares {itemsize} bytes per token; expected 2 or 4")
    expected_size = HEADER_BYTES + num_tokens * itemsize
    if size != expected_size:
        raise ValueError(
            f"shard {path} is {size} bytes but its header declares {num_tokens} tokens ({expected_size} bytes): "
            "the file is truncated or corrupt; prepare the data again"
        )
    if expected_tokens is not None and num_tokens != expected_tokens:
        raise ValueError(f"shard {path} contains {num_tokens} tokens but meta.json records {expected_tokens}")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ValueError(f"shard {path} has SHA-256 {actual}, meta.json records {expected_sha256}: the file changed or is corrupt")
    if num_tokens == 0:
        return np.zeros(0, dtype=_DTYPES[itemsize])
    tokens = np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        max_id = max_token_id(tokens)
        if max_id >= vocab_size:
            raise ValueError(
                f"shard {path} contains token id {max_id}, but meta.json records vocab_size {vocab_size} (ids must be "
                "below it): the shards and meta.json do not belong together; prepare the data again"
            )
    return tokens


def max_token_id(tokens: np.ndarray, chunk_tokens: int = 1 << 24) -> int:
    """Return the largest id, reading a memory-mapped shard in chunks (about 8 ms for 18M uint16 tokens)."""
    return max(int(tokens[start : start + chunk_tokens].max()) for start in range(0, len(tokens), chunk_tokens))


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Load and check a prepared folder's meta.json."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `aoe prepare` to create a prepared data folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}); prepare the data again") from exc
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path} is not aoe token-shard metadata (format {meta.get('format')!r}, expected {META_FORMAT!r})")
    if meta.get("version") != META_VERSION:
        raise ValueError(f"{path} has metadata version {meta.get('version')}; this aoe reads version {META_VERSION}")
    _check_vocab_and_dtype(path, meta)
    return meta


def _check_vocab_and_dtype(path: Path, meta: dict) -> None:
    """Raise ValueError unless meta.json's vocab_size is a positive integer whose ids fit its shard dtype."""
    vocab_size, dtype = meta.get("vocab_size"), meta.get("dtype")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{path} records vocab_size {vocab_size!r}; expected a positive integer; prepare the data again")
    names = {d.name: d for d in _DTYPES.values()}
    if dtype not in names:
        raise ValueError(f"{path} records dtype {dtype!r}; expected one of {', '.join(names)}; prepare the data again")
    max_id = int(np.iinfo(names[dtype]).max)
    if vocab_size - 1 > max_id:
        raise ValueError(
            f"{path} records vocab_size {vocab_size}, but dtype {dtype} stores ids up to {max_id} only; "
            "the metadata is inconsistent; prepare the data again"
        )
