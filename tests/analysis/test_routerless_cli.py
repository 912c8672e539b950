"""The ``aoe routerless`` and ``aoe convert`` commands end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aoe.analysis.convert import save_model_folder
from aoe.analysis.heldout import load_aoe_folder, perplexity, token_windows
from aoe.cli import main
from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
from aoe.model.decoder import Transformer

VOCAB = 64


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=64,
                         attention=AttentionConfig(n_heads=4),
                         ffn=FFNConfig(kind="moe", d_ffn=16, n_experts=4, top_k=2), init_std=0.3)
    # A large init makes the experts' outputs differ enough that the expert choice moves perplexity.
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("moe")
    save_model_folder(folder, config, Transformer(config).state_dict(), {})
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=400).astype(np.uint16)
    np.save(folder / "held.npy", tokens)
    return folder


def test_routerless_command_writes_grid_and_report(moe_folder, tmp_path):
    report = tmp_path / "doc.md"
    report.write_text("intro\n")
    code = main(["routerless", str(moe_folder), "--corpus", f"held={moe_folder / 'held.npy'}", "--node", "gate",
                 "output", "router", "--norm", "l2", "linf", "--seq-len", "15", "--threads", "1", "--out-json", str(tmp_path / "r.json"),
                 "--report", str(report)])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    settings = [(row["node"], row["norm"]) for row in result["rows"]]
    assert settings == [("original", None), ("gate", "l2"), ("gate", "linf"), ("output", "l2"), ("output", "linf"),
                        ("router", None), ("random", None)]
    expected = perplexity(load_aoe_folder(moe_folder), token_windows(np.load(moe_folder / "held.npy"), 15))["ppl"]
    assert abs(result["rows"][0]["ppl"]["held"] - expected) < 1e-6 * expected
    # Ranking by the router logits through the patched code reproduces the original model.
    assert abs(result["rows"][5]["ppl"]["held"] - expected) < 1e-5 * expected
    assert abs(result["rows"][6]["ppl"]["held"] - expected) > 1e-3 * expected
    text = report.read_text()
    assert text.startswith("intro\n")
    assert "<!-- routerless:begin -->" in text
    assert "| xW_g | L∞ |" in text
    assert (tmp_path / "figures" / "routerless.png").stat().st_size > 1000


def test_routerless_command_needs_something_to_measure(moe_folder, capsys):
    assert main(["routerless", str(moe_folder)]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_convert_command_measures_before_and_after(moe_folder, tmp_path):
    held = moe_folder / "held.npy"
    code = main(["convert", str(moe_folder), "--out", str(tmp_path / "aoe"), "--d-low", "4", "16", "--corpus", str(held),
                 "--seq-len", "15", "--train-tokens", str(held), "--steps", "1", "--batch-size", "2", "--threads", "1"])
    assert code == 0
    result = json.loads((tmp_path / "aoe" / "convert.json").read_text())
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["router MoE (source)", "AoE d_low=4", "AoE d_low=16"]
    assert result["rows"][2]["gate_relative_error"] < 1e-6
    assert result["rows"][1]["gate_relative_error"] > 0.1
    for row in result["rows"][1:]:
        assert set(row["after"]) == {"held"}
    converted = load_aoe_folder(tmp_path / "aoe" / "dlow_4")
    assert converted.config.ffn.kind == "aoe"
    assert converted.config.ffn.d_low == 4
    assert (tmp_path / "aoe" / "dlow_4_continued" / "model.safetensors").is_file()


def test_convert_command_rejects_steps_without_tokens(moe_folder, tmp_path, capsys):
    assert main(["convert", str(moe_folder), "--out", str(tmp_path / "x"), "--d-low", "4", "--steps", "3"]) == 2
    assert "--train-tokens" in capsys.readouterr().err
