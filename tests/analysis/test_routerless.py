"""Router-free selection: plumbing per architecture, and the K = n dense limit."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from aoe.analysis.routerless import NODES, NORM_ORDERS, NORMS, find_moe_blocks, routerless

transformers = pytest.importorskip("transformers")

HIDDEN, EXPERTS, WIDTH, VOCAB = 32, 4, 16, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These shapes are tiny, and on a loaded CPU a second thread made each op several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def tiny_hf_model(arch: str, top_k: int = 2):
    """A random-weight model, built once per module; the tests never change its weights."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k)
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=WIDTH, num_local_experts=EXPERTS, **common)
    elif arch == "phimoe":
        config = transformers.PhimoeConfig(intermediate_size=WIDTH, num_local_experts=EXPERTS, **common)
    elif arch == "olmoe":
        config = transformers.OlmoeConfig(intermediate_size=WIDTH, num_experts=EXPERTS, norm_topk_prob=False, **common)
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(intermediate_size=WIDTH, moe_intermediate_size=WIDTH, num_experts=EXPERTS,
                                             shared_expert_intermediate_size=24, norm_topk_prob=False, **common)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=WIDTH, moe_intermediate_size=WIDTH, num_experts=EXPERTS,
                                             norm_topk_prob=True, head_dim=8, **common)
    else:
        raise AssertionError(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_aoe_moe():
    from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
    from aoe.model.decoder import Transformer

    config = ModelConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=2, max_seq_len=64,
                         attention=AttentionConfig(n_heads=4),
                         ffn=FFNConfig(kind="moe", d_ffn=WIDTH, n_experts=EXPERTS, top_k=2))
    torch.manual_seed(0)
    return Transformer(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_router_node_reproduces_hf_model(arch):
    model = tiny_hf_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = logits(model, IDS)
    with routerless(model, "router"):
        patched = logits(model, IDS)
    with routerless(model, "random"):
        shuffled = logits(model, IDS)
    torch.testing.assert_close(patched, original, rtol=1e-5, atol=1e-5)
    # The patch is live: random selection changes the output.
    assert (shuffled - original).abs().max() > 1e-3
    # The original forward is back and no weight moved.
    torch.testing.assert_close(logits(model, IDS), original, rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_router_node_reproduces_aoe_moe():
    model = tiny_aoe_moe()
    original = logits(model, IDS)
    with routerless(model, "router"):
        patched = logits(model, IDS)
    with routerless(model, "output", "l2"):
        by_norm = logits(model, IDS)
    torch.testing.assert_close(patched, original, rtol=1e-5, atol=1e-5)
    assert (by_norm - original).abs().max() > 1e-4


def dense_reference(block, x_TD, node, norm):
    """sum_e softmax(s)_e E_e(x), with s_e the norm of expert e's node activation, one expert at a time."""
    experts = block.experts
    outputs, scores = [], []
    for e in range(EXPERTS):
        w_gate, w_proj = experts.gate_up_proj[e, :WIDTH], experts.gate_up_proj[e, WIDTH:]
        gate = x_TD @ w_gate.t()
        proj = x_TD @ w_proj.t()
        hidden = F.silu(gate) * proj
        out = hidden @ experts.down_proj[e].t()
        activation = {"gate": gate, "proj": proj, "silu_gate": F.silu(gate), "hidden": hidden, "output": out}[node]
        outputs.append(out)
        scores.append(torch.linalg.vector_norm(activation, ord=NORM_ORDERS[norm], dim=-1))
    weights_TE = torch.softmax(torch.stack(scores, dim=-1), dim=-1)
    return torch.einsum("te,etd->td", weights_TE, torch.stack(outputs))


def block_output(block, x):
    with torch.no_grad():
        return block(x[None])[0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("node", NODES)
def test_all_experts_give_dense_softmax_sum(node, norm):
    # With K = n every rule keeps every expert, and Mixtral's rule (softmax over all, then
    # renormalise the top n) gives softmax over all n norms: the output is that dense mixture.
    model = tiny_hf_model("mixtral")
    block = find_moe_blocks(model)[0]
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), routerless(model, node, norm, top_k=EXPERTS):
        out = block_output(block, x)
        expected = dense_reference(block, x, node, norm)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_all_experts_router_equals_hf_dense():
    # The router setting with K = n equals transformers' own Mixtral block with top-k = n.
    model = tiny_hf_model("mixtral")
    dense = tiny_hf_model("mixtral", top_k=EXPERTS)
    dense.load_state_dict(model.state_dict())
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(3))
    with routerless(model, "router", top_k=EXPERTS):
        out = block_output(find_moe_blocks(model)[0], x)
    torch.testing.assert_close(out, block_output(find_moe_blocks(dense)[0], x), rtol=1e-5, atol=1e-6)


def test_top_k_picks_largest_output_norms():
    model = tiny_hf_model("mixtral")
    block = find_moe_blocks(model)[0]
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(4))
    experts = block.experts
    with torch.no_grad():
        outs = torch.stack([(F.silu(x @ experts.gate_up_proj[e, :WIDTH].t()) * (x @ experts.gate_up_proj[e, WIDTH:].t()))
                            @ experts.down_proj[e].t() for e in range(EXPERTS)])
        norms_TE = outs.norm(dim=-1).t()
        top_TK = norms_TE.topk(2, dim=-1).indices
        weights_TK = torch.softmax(norms_TE.gather(1, top_TK), dim=-1)
        expected = torch.einsum("tk,tkd->td", weights_TK, outs.permute(1, 0, 2)[torch.arange(5)[:, None], top_TK])
        with routerless(model, "output", "l2"):
            out = block_output(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_invalid_node_and_norm_raise():
    model = tiny_hf_model("mixtral")
    with pytest.raises(ValueError, match="invalid node"):
        with routerless(model, "logits"):
            pass
    with pytest.raises(ValueError, match="invalid norm"):
        with routerless(model, "gate", "l3"):
            pass


def test_phimoe_other_k_not_supported():
    model = tiny_hf_model("phimoe")
    with routerless(model, "gate", top_k=3), pytest.raises(NotImplementedError, match="exactly 2"):
        logits(model, IDS)
