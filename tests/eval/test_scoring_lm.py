"""ScoringLM: log-likelihoods against a manual full forward, token boundaries, BOS, batch sizes."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from aoe.eval.lm import ScoringLM, hf_tokenizer_spec, text_tokenizer_spec
from hf_testing import build_model, small_config

REQUESTS = [
    ("Question: which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("A lady walks to a barbell and ", "lifts it."),
    ("", "The lazy dog."),
    ("The quick", " brown"),
    ("Question: which gas do plants take in?\nAnswer: carbon dioxide. The quick brown fox jumps over", " the lazy dog"),
    ("A lady", " walks to a barbell and lifts it. Question: which gas do plants take in?"),
]


@pytest.fixture(scope="module")
def model():
    return build_model(small_config("aoe"), seed=11)


def make_lm(model, tokenizer, batch_size: int = 4, max_length: int | None = None) -> ScoringLM:
    def logits_fn(ids, mask):
        return model(ids, attention_mask=mask).logits

    return ScoringLM(logits_fn, text_tokenizer_spec(tokenizer), max_length=max_length or model.config.max_seq_len,
                     batch_size=batch_size)


def instances(pairs) -> list[Instance]:
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def manual_score(model, tokens: list[int], num_targets: int) -> tuple[float, bool]:
    """Sum of log p(token | prefix) over the last num_targets tokens, from one unpadded forward."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0], dim=-1)
    targets = tokens[-num_targets:]
    positions = range(len(tokens) - 1 - num_targets, len(tokens) - 1)
    score = sum(log_probs[p, t].item() for p, t in zip(positions, targets))
    greedy = all(log_probs[p].argmax().item() == t for p, t in zip(positions, targets))
    return score, greedy


def test_scores_equal_manual_log_prob_sum(model, tokenizer):
    lm = make_lm(model, tokenizer)
    results = lm.loglikelihood(instances(REQUESTS), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(REQUESTS, results):
        context_tokens = tokenizer.encode(context.rstrip()) if context else []
        trailing = context[len(context.rstrip()):]
        whole = tokenizer.encode(context.rstrip() + trailing + continuation)
        continuation_tokens = whole[len(context_tokens):]
        # Longer requests keep their last max_seq_len + 1 tokens, as lm-eval's HFLM does.
        tokens = [tokenizer.bos_id, *context_tokens, *continuation_tokens][-(model.config.max_seq_len + 1):]
        expected_score, expected_greedy = manual_score(model, tokens, len(continuation_tokens))
        assert score == pytest.approx(expected_score, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy


def find_straddling_pair(tokenizer) -> tuple[str, str]:
    """A (context, continuation) whose joint encoding leaves no token after the context's count."""
    for word in ("barbell", "carbon", "dioxide", "quick", "lady", "plants", "Question", "jumps"):
        for cut in range(1, len(word)):
            context, continuation = "A " + word[:cut], word[cut:]
            whole = tokenizer.encode(context + continuation)
            if len(whole) <= len(tokenizer.encode(context)):
                return context, continuation
    raise AssertionError("no boundary-straddling pair found for this tokenizer")


def test_straddling_token_keeps_continuation(model, tokenizer):
    context, continuation = find_straddling_pair(tokenizer)
    lm = make_lm(model, tokenizer)
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    assert continuation_enc == tokenizer.encode(continuation)
    assert context_enc == [tokenizer.bos_id, *tokenizer.encode(context)]
    (score, _), = lm.loglikelihood(instances([(context, continuation)]), disable_tqdm=True)
    expected, _ = manual_score(model, context_enc + continuation_enc, len(continuation_enc))
    assert score == pytest.approx(expected, abs=1e-4)


def test_bos_is_never_doubled(model, tokenizer):
    lm = make_lm(model, tokenizer)
    bos = tokenizer.bos_id
    context_enc, _ = lm._encode_pair("The quick", " brown")
    assert context_enc[0] == bos
    assert context_enc[1] != bos
    assert lm.with_bos([bos, 5, 6]) == [bos, 5, 6]
    assert lm.with_bos([5, 6]) == [bos, 5, 6]
    # An empty context is scored after BOS alone.
    assert lm.prefix_token_id == bos
    # A Hugging Face tokenizer turns the literal "<s>" into the BOS id; it must not get a second one.
    hf_lm = ScoringLM(lm.logits_fn, hf_tokenizer_spec(tokenizer.hf), max_length=64)
    hf_context, _ = hf_lm._encode_pair("<s>The quick", " brown")
    assert hf_context[:2] == [bos, *tokenizer.hf.encode("The", add_special_tokens=False)[:1]]
    assert hf_context.count(bos) == 1


def test_scores_equal_across_batch_sizes(model, tokenizer):
    reference = make_lm(model, tokenizer, batch_size=1).loglikelihood(instances(REQUESTS), disable_tqdm=True)
    for batch_size in (4, 5):
        results = make_lm(model, tokenizer, batch_size=batch_size).loglikelihood(instances(REQUESTS), disable_tqdm=True)
        for (score, greedy), (ref_score, ref_greedy) in zip(results, reference):
            # A padded batch takes SDPA's masked kernel instead of the causal one, so sums of about
            # -100 differ by up to ~1e-5 (fp32 rounding, measured); a wrong mask moves them by > 0.1.
            assert score == pytest.approx(ref_score, rel=1e-6, abs=1e-5)
            assert greedy == ref_greedy


def test_truncation_keeps_the_continuation(model, tokenizer):
    lm = make_lm(model, tokenizer, max_length=12)
    context, continuation = REQUESTS[5]
    (score, _), = lm.loglikelihood(instances([(context, continuation)]), disable_tqdm=True)
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    tokens = (context_enc + continuation_enc)[-13:]
    expected, _ = manual_score(model, tokens, len(continuation_enc))
    assert score == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_of_short_text(model, tokenizer):
    lm = make_lm(model, tokenizer)
    text = "The quick brown fox jumps over the lazy dog."
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (score,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    tokens = [tokenizer.bos_id, *tokenizer.encode(text)]
    expected, _ = manual_score(model, tokens, len(tokens) - 1)
    assert score == pytest.approx(expected, abs=1e-4)


def test_rejects_bad_settings(model, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        make_lm(model, tokenizer, batch_size=0)


def test_exported_folder_scores_like_run_folder(tmp_path, tokenizer):
    from aoe.eval.models import is_run_dir, load_lm
    from aoe.hf.export import export_model
    from hf_testing import write_run_dir

    native = build_model(small_config("moe"), seed=5)
    run_dir = write_run_dir(tmp_path, native, tokenizer)
    out_dir = export_model(native, tmp_path / "hf", tokenizer.hf)
    assert is_run_dir(run_dir)
    assert not is_run_dir(out_dir)

    from_run = load_lm(str(run_dir), batch_size=3)
    from_export = load_lm(str(out_dir), batch_size=3)
    assert from_run.kind == "run"
    assert from_export.kind == "hf"
    run_scores = from_run.lm.loglikelihood(instances(REQUESTS), disable_tqdm=True)
    export_scores = from_export.lm.loglikelihood(instances(REQUESTS), disable_tqdm=True)
    for (run_score, run_greedy), (export_score, export_greedy) in zip(run_scores, export_scores):
        assert export_score == pytest.approx(run_score, abs=1e-4)
        assert export_greedy == run_greedy
