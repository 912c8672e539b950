"""MoE -> AoE conversion: SVD factorisation, the Mixtral mapping, and the saved model folder."""

from __future__ import annotations

import json

import pytest
import torch

from aoe.analysis.convert import convert, gate_approximation_error, hf_mixtral_to_moe, moe_to_aoe, svd_factorize
from aoe.analysis.heldout import load_aoe_folder
from aoe.layers.experts import ExpertBank
from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
from aoe.model.decoder import Transformer

D_MODEL, D_FFN, EXPERTS, VOCAB = 32, 16, 4, 64
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These shapes are tiny, and on a loaded CPU a second thread made each op several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_moe() -> Transformer:
    config = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2, max_seq_len=64,
                         attention=AttentionConfig(n_heads=4, n_kv_heads=2),
                         ffn=FFNConfig(kind="moe", d_ffn=D_FFN, n_experts=EXPERTS, top_k=2))
    torch.manual_seed(0)
    return Transformer(config).eval()


def test_svd_full_rank_reproduces_gate():
    w = torch.randn(D_MODEL, D_FFN, generator=torch.Generator().manual_seed(0))
    down, up = svd_factorize(w, D_FFN)
    assert down.shape == (D_MODEL, D_FFN)
    assert up.shape == (D_FFN, D_FFN)
    torch.testing.assert_close(down @ up, w, rtol=1e-5, atol=1e-5)


def test_svd_low_rank_error_is_eckart_young():
    w = torch.randn(D_MODEL, D_FFN, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(w.double())
    for d_low in (1, 4, 8):
        down, up = svd_factorize(w, d_low)
        error = torch.linalg.matrix_norm((w - down @ up).double())
        assert abs(float(error) - float(singular[d_low:].square().sum().sqrt())) < 1e-4
        # W_down and W_up share sqrt(S) equally, so their Gram matrices have the same diagonal.
        torch.testing.assert_close(torch.diag(down.t() @ down), torch.diag(up @ up.t()), rtol=1e-4, atol=1e-5)


def test_svd_rejects_rank_above_limit():
    with pytest.raises(ValueError, match="d_low=17"):
        svd_factorize(torch.randn(D_MODEL, D_FFN), D_FFN + 1)


def test_full_rank_converted_expert_equals_original():
    moe = tiny_moe()
    aoe_config, aoe_state = moe_to_aoe(moe.config, moe.state_dict(), D_FFN)
    converted = Transformer(aoe_config)
    converted.load_state_dict(aoe_state)
    x = torch.randn(11, D_MODEL, generator=torch.Generator().manual_seed(2))
    for layer in range(2):
        original_bank: ExpertBank = moe.layers[layer].ffn.experts
        aoe_bank: ExpertBank = converted.layers[layer].ffn.experts
        assert aoe_bank.factorized
        assert aoe_bank.hidden == D_FFN
        for e in range(EXPERTS):
            with torch.no_grad():
                expected = original_bank.expert_forward(e, x)
                low = aoe_bank.low_rank(x)[:, e]
                torch.testing.assert_close(aoe_bank.expert_forward(e, x, low), expected, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(aoe_bank.expert_forward(e, x), expected, rtol=1e-5, atol=1e-6)


def test_converted_model_keeps_non_expert_weights():
    moe = tiny_moe()
    aoe_config, aoe_state = moe_to_aoe(moe.config, moe.state_dict(), 8)
    assert aoe_config.ffn.kind == "aoe"
    assert aoe_config.ffn.d_wide == D_FFN
    assert aoe_config.ffn.d_low == 8
    assert not any(".router." in name for name in aoe_state)
    for name, value in moe.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(aoe_state[name], value), name
        elif name.endswith(("w_proj", "w_out")):
            assert torch.equal(aoe_state[name], value), name


def test_convert_writes_loadable_folder(tmp_path):
    moe = tiny_moe()
    from aoe.analysis.convert import save_model_folder

    save_model_folder(tmp_path / "moe", moe.config, moe.state_dict(), {})
    out = convert(tmp_path / "moe", tmp_path / "aoe", d_low=8)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["ffn"]["kind"] == "aoe"
    assert meta["d_low"] == 8
    expected_error = gate_approximation_error(moe.state_dict(), 8)
    assert abs(meta["gate_relative_error"] - expected_error) < 1e-9
    assert 0 < expected_error < 1
    model = load_aoe_folder(out)
    with torch.no_grad():
        out_logits = model(IDS).logits
    reference = Transformer(model.config)
    reference.load_state_dict(moe_to_aoe(moe.config, moe.state_dict(), 8)[1])
    with torch.no_grad():
        torch.testing.assert_close(out_logits, reference.eval()(IDS).logits, rtol=0, atol=0)


def test_convert_rejects_aoe_source():
    moe = tiny_moe()
    aoe_config, aoe_state = moe_to_aoe(moe.config, moe.state_dict(), 8)
    with pytest.raises(ValueError, match="router MoE"):
        moe_to_aoe(aoe_config, aoe_state, 8)


def test_hf_mixtral_maps_exactly_onto_aoe_moe():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FFN,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=EXPERTS, max_position_embeddings=64, rms_norm_eps=1e-5,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(config).eval()
    moe_config, state = hf_mixtral_to_moe(hf)
    ours = Transformer(moe_config).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        expected = hf(input_ids=IDS).logits
        actual = ours(IDS).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_convert_reads_training_run_folder(tmp_path):
    from aoe.train.checkpoint import save_checkpoint
    from aoe.train.config import DataConfig, RunConfig

    moe = tiny_moe()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_config = RunConfig(model=moe.config, data=DataConfig(seq_len=32))
    (run_dir / "config.json").write_text(json.dumps(run_config.to_dict()))
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.1)
    save_checkpoint(run_dir, 3, moe, optimizer, state={"micro_step": 0, "tokens_seen": 0, "loader": {}}, state_tensors={}, keep_last=1)
    out = convert(run_dir, tmp_path / "aoe", d_low=D_FFN)
    converted = load_aoe_folder(out)
    expected_state = moe_to_aoe(moe.config, moe.state_dict(), D_FFN)[1]
    for name, value in converted.state_dict().items():
        assert torch.equal(value, expected_state[name]), name
