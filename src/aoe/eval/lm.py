"""An lm-evaluation-harness ``LM`` over any causal model that maps token ids to logits.

``ScoringLM`` serves native aoe run folders (``aoe.model.decoder.Transformer``), exported
Hugging Face folders and other Hugging Face causal LMs through one tokenisation and batching
path, so their scores are comparable:

- a (context, continuation) pair is split into tokens as lm-eval's ``HFLM`` does. Trailing
  spaces of the context move to the continuation, the whole string is encoded, and the
  context's own token count marks the split. When a token straddles the boundary so that no
  continuation token is left, context and continuation are encoded separately instead, so a
  continuation is never scored as empty;
- every request starts with BOS, as every pretraining document does, and a context that
  already starts with BOS does not get a second one;
- requests are sorted by length and right-padded. A padded row's valid positions attend to
  exactly what they would attend to alone, so per-request scores do not depend on the batch
  size, up to fp32 rounding in the attention kernels (about 1e-7 relative, see tests/eval).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

Tensor = torch.Tensor
# (input_ids (B, S), attention_mask (B, S)) -> logits (B, S, V)
LogitsFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TokenizerSpec:
    """The four things scoring needs from a tokenizer; ``encode`` adds no special tokens."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bos_id: int | None
    eos_id: int | None


def hf_tokenizer_spec(tokenizer) -> TokenizerSpec:
    """Wrap a ``transformers`` tokenizer (or aoe ``TextTokenizer.hf``)."""
    return TokenizerSpec(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )


def text_tokenizer_spec(tokenizer) -> TokenizerSpec:
    """Wrap an ``aoe.data.tokenizer.TextTokenizer``, which encodes exactly as data preparation does."""
    return TokenizerSpec(encode=tokenizer.encode, decode=tokenizer.decode, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id)


class ScoringLM(TemplateLM):
    """An lm-eval model that computes log-likelihoods, rolling log-likelihoods and greedy generations."""

    def __init__(self, logits_fn: LogitsFn, tokenizer: TokenizerSpec, max_length: int, batch_size: int = 8,
                 add_bos: bool = True, device: str = "cpu"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"invalid batch_size={batch_size}: expected a positive integer")
        if max_length < 2:
            raise ValueError(f"invalid max_length={max_length}: expected at least 2 tokens")
        if add_bos and tokenizer.bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no BOS token; pass add_bos=False")
        self.logits_fn = logits_fn
        self.tok = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.add_bos = add_bos
        self._device = device
        # Multiple-choice tasks encode each context once per choice; the cache skips the repeats.
        self._encode_cached = functools.lru_cache(maxsize=8192)(lambda text: tuple(tokenizer.encode(text)))

    # ----- tokenisation ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is scored after BOS, the token every pretraining document starts with.
        return self.tok.bos_id if self.add_bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self._encode_cached(string))

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    def with_bos(self, tokens: list[int]) -> list[int]:
        if self.add_bos and (not tokens or tokens[0] != self.tok.bos_id):
            return [self.tok.bos_id, *tokens]
        return list(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        continuation_enc = whole[len(context_enc):]
        if not continuation_enc:
            # A token straddles the boundary and swallowed the whole continuation.
            continuation_enc = self.tok_encode(continuation)
        return self.with_bos(context_enc), continuation_enc

    # ----- scoring -----------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score (key, context_tokens, continuation_tokens) triples; returns (sum log p, is greedy)."""
        rows = []
        for index, (_, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc:
                raise ValueError(f"request {index} has an empty continuation")
            # Keep the last max_length+1 tokens: inputs are all but the last, targets all but the first.
            tokens = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            num_targets = min(len(continuation_enc), len(tokens) - 1)
            rows.append((index, tokens[:-1], tokens[len(tokens) - num_targets:]))

        # Longest first, so that the first batch shows at once whether the largest shapes fit in memory.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="Scoring requests", disable=disable_tqdm):
            width = max(len(rows[i][1]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs = rows[i][1]
                ids[row, :len(inputs)] = torch.tensor(inputs)
                mask[row, :len(inputs)] = 1
            # shape: (B, S, V) log-probabilities in fp32
            log_probs = F.log_softmax(self.logits_fn(ids.to(self._device), mask.to(self._device)).float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                _, inputs, targets = rows[i]
                # shape: (C, V) the positions whose next token is a continuation token
                cont_log_probs = log_probs[row, len(inputs) - len(targets):len(inputs)]
                target = torch.tensor(targets)
                score = cont_log_probs.gather(1, target[:, None]).sum().item()
                greedy = bool((cont_log_probs.argmax(dim=-1) == target).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Return each document's summed log-probability, scored in disjoint windows of max_length tokens."""
        scores = []
        for request in tqdm(requests, desc="Rolling log-likelihood", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            triples = [(None, *make_disjoint_window(window)) for window in windows]
            score = sum(s for s, _ in self._loglikelihood_tokens(triples, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
            scores.append(score)
        return scores

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode greedily, one request at a time, recomputing the full prefix each step.

        NOTE: no KV cache here, so this is slow; none of the tasks aoe reports generates text.
        """
        outputs = []
        for request in tqdm(requests, desc="Generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            tokens = self.with_bos(self.tok_encode(context))
            new_tokens: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (tokens + new_tokens)[-self.max_length:]
                ids = torch.tensor([window], device=self._device)
                next_token = int(self.logits_fn(ids, torch.ones_like(ids))[0, -1].argmax())
                if next_token == self.tok.eos_id:
                    break
                new_tokens.append(next_token)
                text = self.tok_decode(new_tokens)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs
