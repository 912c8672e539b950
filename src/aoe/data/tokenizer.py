"""Tokenizers for aoe: SentencePiece models, Hugging Face tokenizer files, and byte-level BPE.

Every tokenizer ends up as a ``transformers.PreTrainedTokenizerFast`` backed by the Rust
``tokenizers`` library, so batched encoding uses all cores and ``save_pretrained`` writes files
that ``transformers.AutoTokenizer.from_pretrained`` loads with the same ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Special tokens of a trained byte-level BPE, in id order. The first three follow the
# SentencePiece convention (unk 0, bos 1, eos 2) that the Llama tokenizer also uses.
BPE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
BYTE_ALPHABET_SIZE = 256

_SENTENCEPIECE_SPACE = "\u2581"  # "▁", SentencePiece's symbol for a space


class TextTokenizer:
    """A fast Hugging Face tokenizer with the small interface that data preparation needs."""

    def __init__(self, hf: PreTrainedTokenizerFast, spec: str):
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"tokenizer {spec!r} loaded as a slow (Python) tokenizer; aoe needs a fast one")
        self._hf = hf
        self.spec = spec
        # A private copy that encodes "<s>" or "</s>" found in raw text as ordinary text, so that
        # a corpus which mentions those strings (source code does) never gains stray control ids.
        self._encoder = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._encoder.encode_special_tokens = True

    @property
    def hf(self) -> PreTrainedTokenizerFast:
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(hf)``)."""
        return len(self._hf)

    @property
    def bos_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self._hf.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode texts in parallel, without BOS/EOS or other special tokens."""
        # encode_batch_fast skips character offsets, which data preparation never reads.
        return [enc.ids for enc in self._encoder.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoder.decode(list(ids), skip_special_tokens=False)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self._hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"TextTokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith((".model", ".json"))


def load_tokenizer(spec: str | os.PathLike) -> TextTokenizer:
    """Load a tokenizer from a SentencePiece ``.model`` file, a folder, a ``tokenizer.json`` or a hub name.

    A folder needs Hugging Face tokenizer files (``tokenizer.json``/``tokenizer_config.json``) or a
    ``tokenizer.model``. Anything that is not an existing path is tried as a hub name.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".model":
            return TextTokenizer(sentencepiece_to_hf(path), spec)
        if path.suffix == ".json":
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
            _set_special_tokens_from_vocab(hf)
            return TextTokenizer(hf, spec)
        raise ValueError(f"tokenizer file {spec!r} is neither a SentencePiece .model nor a tokenizer.json")
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return TextTokenizer(AutoTokenizer.from_pretrained(str(path)), spec)
        if (path / "tokenizer.model").is_file():
            return TextTokenizer(sentencepiece_to_hf(path / "tokenizer.model"), spec)
        raise FileNotFoundError(f"tokenizer folder {spec!r} contains neither tokenizer.json, tokenizer_config.json nor tokenizer.model")
    if _looks_like_path(spec):
        raise FileNotFoundError(f"tokenizer path {spec!r} not found")
    return TextTokenizer(_load_from_hub(spec), spec)


def _load_from_hub(name: str) -> PreTrainedTokenizerFast:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    try:
        # The local hub cache first, so that a cached tokenizer works without a network.
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as cached_error:
        if offline:
            raise ValueError(
                f"tokenizer {name!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                "pass a local path to a tokenizer.model, tokenizer.json or tokenizer folder"
            ) from cached_error
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # the hub client raises many types (HTTP, OSError, ValueError)
        raise ValueError(
            f"tokenizer {name!r} is not a local path and could not be loaded from the Hugging Face hub "
            f"(the hub may be unreachable: {type(exc).__name__}: {exc}); pass a local path to a "
            "tokenizer.model, tokenizer.json or tokenizer folder"
        ) from exc


def _set_special_tokens_from_vocab(hf: PreTrainedTokenizerFast) -> None:
    vocab = hf.get_vocab()
    for attribute, token in (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>")):
        if getattr(hf, attribute) is None and token in vocab:
            setattr(hf, attribute, token)


# --- SentencePiece ------------------------------------------------------------------------------


def sentencepiece_to_hf(model_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Convert a SentencePiece BPE model (such as Llama's) into a fast tokenizer with the same ids.

    transformers' own conversion (checked with transformers 5.2 and Llama 2's model) encodes runs
    of spaces differently from the ``sentencepiece`` library. Two details fix that. Merges are
    ranked by the score of the merged piece, the order in which sentencepiece applies them. Words
    are cut as sentencepiece's ``allow_whitespace_only_pieces`` cuts them: a run of spaces plus
    the characters up to the next space.
    """
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = SentencePieceExtractor(str(model_file)).proto
    trainer_spec, normalizer_spec = proto.trainer_spec, proto.normalizer_spec
    if trainer_spec.model_type != 2:  # 1 = unigram, 2 = BPE, 3 = word, 4 = char
        raise NotImplementedError(
            f"SentencePiece model {model_file} has model_type {trainer_spec.model_type}; only BPE models (type 2, "
            "as Llama's) are converted here because only their ids have been checked against sentencepiece"
        )
    if normalizer_spec.precompiled_charsmap or normalizer_spec.remove_extra_whitespaces:
        raise NotImplementedError(
            f"SentencePiece model {model_file} normalizes text (charsmap or extra-whitespace removal); "
            "only identity normalization, as in Llama's model, is converted"
        )
    if not trainer_spec.allow_whitespace_only_pieces or trainer_spec.treat_whitespace_as_suffix:
        raise NotImplementedError(
            f"SentencePiece model {model_file}: only allow_whitespace_only_pieces=true with whitespace as a "
            "prefix (Llama's settings) is converted"
        )

    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    unk_piece = proto.pieces[trainer_spec.unk_id].piece
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(proto, vocab),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=trainer_spec.byte_fallback,
            dropout=None,
        )
    )
    space = _SENTENCEPIECE_SPACE
    steps = [normalizers.Prepend(space)] if normalizer_spec.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", space)])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{space}*[^{space}]+|{space}+"), behavior="isolated")
    decoder_steps = [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer_spec.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decoder_steps)

    # Control pieces (unk, bos, eos) are special: sentencepiece never produces them from text.
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]
    backend.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in control])

    def piece_or_none(piece_id: int) -> str | None:
        return proto.pieces[piece_id].piece if 0 <= piece_id < len(proto.pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk_piece,
        bos_token=piece_or_none(trainer_spec.bos_id),
        eos_token=piece_or_none(trainer_spec.eos_id),
        pad_token=piece_or_none(trainer_spec.pad_id),
        clean_up_tokenization_spaces=False,
    )


def _sentencepiece_merges(proto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Return every (left, right) merge that forms a normal piece, best piece score first.

    sentencepiece merges the adjacent pair whose merged piece has the highest score, so the
    merge rank follows that score. Ties, such as Llama's space-only pieces that all score -1e9,
    go by piece id.
    """
    ranked = []
    for piece_id, piece in enumerate(proto.pieces):
        if piece.type != 1:  # only NORMAL pieces come from merges
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, piece_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --- byte-level BPE -----------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: tuple[str, ...] = BPE_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> TextTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization) on ``texts``.

    ``special_tokens`` get ids 0, 1, ... in order; "<s>", "</s>", "<pad>" and "<unk>" become the
    bos, eos, pad and unk tokens when present. Training runs in Rust on all cores.
    """
    min_vocab = BYTE_ALPHABET_SIZE + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be an integer >= {min_vocab} (256 byte tokens + {len(special_tokens)} special tokens), got {vocab_size!r}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_non_empty(texts), trainer=trainer)

    names = {"<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token", "<unk>": "unk_token"}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        **{names[t]: t for t in special_tokens if t in names},
    )
    return TextTokenizer(hf, f"byte-level BPE, vocab_size {vocab_size}")


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)
