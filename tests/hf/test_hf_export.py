"""Export to a Hugging Face folder: fresh-process loading, logits and expert parity, tied embeddings."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from aoe.hf import export
from aoe.hf.convert import to_hf_model
from hf_testing import build_model, small_config, write_run_dir

VARIANTS = {
    "aoe": {},
    "moe": {},
    "dense": {},
    "aoe_l1_top_k_softmax_all": {"kind": "aoe", "score_norm": "l1", "gate_normalization": "top_k_softmax_all"},
    "aoe_linf": {"kind": "aoe", "score_norm": "linf"},
    "aoe_top_p": {"kind": "aoe", "selection": "top_p"},
    "moe_expert_choice": {"kind": "moe", "selection": "expert_choice"},
    "moe_large_router": {"kind": "moe", "router": "large", "router_match_d_low": 8},
    "moe_factorized_gate": {"kind": "moe", "d_low": 8},
    "moe_top_1": {"kind": "moe", "top_k": 1},
}


def variant_config(name: str, tie: bool = True):
    changes = dict(VARIANTS[name])
    kind = changes.pop("kind", name)
    if "top_k" in changes:
        config = small_config(kind, tie=tie)
        return config.with_ffn(**changes)
    return small_config(kind, tie=tie, **changes)


def record_native_masks(model) -> list[torch.Tensor]:
    """Wrap each native sparse layer's ``select`` so that its expert masks are recorded in layer order."""
    masks: list[torch.Tensor] = []
    for block in model.layers:
        if not hasattr(block.ffn, "select"):
            continue
        original = block.ffn.select

        def recording(scores_TE, valid_T, original=original):
            selection = original(scores_TE, valid_T)
            masks.append(selection.mask_TE.clone())
            return selection

        block.ffn.select = recording
    return masks


def batch_with_left_padding() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(4, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :13] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_experts_match_native(name):
    native = build_model(variant_config(name))
    hf_model = to_hf_model(native)
    ids, mask = batch_with_left_padding()
    for attention_mask in (None, mask):
        native_masks = record_native_masks(native)
        with torch.no_grad():
            expected = native(ids, attention_mask=attention_mask).logits
            out = hf_model(ids, attention_mask=attention_mask, use_cache=False, output_expert_selection=True)
        valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        assert (out.logits - expected)[valid].abs().max().item() <= 1e-5
        assert len(out.expert_masks) == len(native_masks)
        for layer, (hf_mask, native_mask) in enumerate(zip(out.expert_masks, native_masks)):
            assert torch.equal(hf_mask, native_mask), f"layer {layer} selects different experts"


@pytest.mark.parametrize("name", ["aoe", "aoe_top_p", "moe"])
def test_loss_and_aux_match_native(name):
    native = build_model(variant_config(name))
    hf_model = to_hf_model(native)
    ids, _ = batch_with_left_padding()
    labels = ids.clone()
    labels[0, 5:9] = -100
    native_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    expected = native(ids, labels=native_labels)
    out = hf_model(ids, labels=labels, use_cache=False)
    assert out.aux_loss is not None
    assert abs(out.aux_loss.item() - expected.aux_loss.item()) <= 1e-6
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5


def test_tied_embeddings_survive_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        native = build_model(small_config("aoe", tie=tie))
        out_dir = export.export_model(native, tmp_path / f"tie_{tie}")
        config = json.loads((out_dir / "config.json").read_text())
        assert config["tie_word_embeddings"] is tie
        loaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)
        shares = loaded.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()
        assert shares is tie
        assert torch.equal(loaded.lm_head.weight, native.lm_head.weight)


FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folders, ids_path, out_path = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    ids = torch.load(ids_path, weights_only=True)
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            out = model(ids, use_cache=False, output_expert_selection=True)
        results[folder] = {
            "logits": out.logits,
            "masks": list(out.expert_masks),
            "tied": torch.tensor(model.lm_head.weight.data_ptr() == model.model.embed.weight.data_ptr()),
            "vocab": torch.tensor(len(tokenizer)),
            "eos": torch.tensor(model.generation_config.eos_token_id),
        }
    results["aoe_modules"] = [name for name in sys.modules if name == "aoe" or name.startswith("aoe.")]
    torch.save(results, out_path)
""")


@pytest.mark.slow
def test_export_cli_loads_in_fresh_process(tmp_path, tokenizer):
    kinds = {"aoe": True, "moe": False, "dense": True}
    natives, folders = {}, []
    for kind, tie in kinds.items():
        native = build_model(small_config(kind, tie=tie), seed=3)
        run_dir = write_run_dir(tmp_path / kind, native, tokenizer)
        parser = argparse.ArgumentParser()
        export.add_arguments(parser)
        out_dir = tmp_path / f"hf_{kind}"
        assert export.run(parser.parse_args([str(run_dir), str(out_dir)])) == 0
        natives[str(out_dir)] = native
        folders.append(str(out_dir))

    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    # The child runs from tmp_path with -I (isolated mode: no cwd or PYTHONPATH on sys.path) and
    # asserts afterwards that it never imported aoe.
    subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS_SCRIPT, ",".join(folders), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], cwd=tmp_path, check=True, timeout=300)
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    assert results["aoe_modules"] == []
    for folder, native in natives.items():
        native_masks = record_native_masks(native)
        with torch.no_grad():
            expected = native(ids).logits
        got = results[folder]
        assert (got["logits"] - expected).abs().max().item() <= 1e-5
        assert len(got["masks"]) == len(native_masks)
        for hf_mask, native_mask in zip(got["masks"], native_masks):
            assert torch.equal(hf_mask, native_mask)
        assert bool(got["tied"]) is native.config.tie_embeddings
        assert int(got["vocab"]) == len(tokenizer.hf)
        assert int(got["eos"]) == tokenizer.eos_id


def test_export_rejects_non_empty_output(tmp_path):
    native = build_model(small_config("dense"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="--overwrite"):
        export.export_model(native, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.parametrize("name", ["aoe", "moe"])
def test_bf16_weights_and_autocast_run(name):
    native = build_model(variant_config(name))
    ids, mask = batch_with_left_padding()
    with torch.no_grad():
        reference = to_hf_model(native)(ids, attention_mask=mask, use_cache=False).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = to_hf_model(native)(ids, attention_mask=mask, use_cache=False).logits
        bf16 = to_hf_model(native).to(torch.bfloat16)(ids, attention_mask=mask, use_cache=False)
    valid = mask.bool()
    scale = reference[valid].abs().mean().item()
    for logits in (autocast, bf16.logits):
        assert logits.dtype == torch.float32
        # bf16 keeps 8 mantissa bits: the logits move by a few percent of their size, not more.
        assert (logits - reference)[valid].abs().mean().item() < 0.05 * scale


def folder_bytes(folder) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("target", ["run", "parent", "inside"])
def test_export_cli_protects_run_folder(tmp_path, target):
    from aoe import cli

    run_dir = write_run_dir(tmp_path / "r", build_model(small_config("dense")))
    before = folder_bytes(run_dir)
    out = {"run": run_dir, "parent": run_dir.parent, "inside": run_dir / "export"}[target]
    assert cli.main(["export", str(run_dir), str(out), "--overwrite", "--no-tokenizer"]) == 2
    assert folder_bytes(run_dir) == before
    assert not (run_dir / "export").exists()


def test_export_rejects_file_and_foreign_folder(tmp_path, capsys):
    from aoe import cli

    run_dir = write_run_dir(tmp_path / "r", build_model(small_config("dense")))
    file_path = tmp_path / "passwd"
    file_path.write_text("root:x:0:0\n")
    assert cli.main(["export", str(run_dir), str(file_path), "--overwrite", "--no-tokenizer"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert file_path.read_text() == "root:x:0:0\n"

    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="contains no aoe_export.json"):
        export.export_model(build_model(small_config("dense")), foreign, overwrite=True)
    assert (foreign / "meta.json").read_text() == "{}"


def test_export_overwrite_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is accepted without --overwrite
    export.export_model(build_model(small_config("dense"), seed=0), out)
    first = folder_bytes(out)
    assert "aoe_export.json" in first

    def failing_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(build_model(small_config("dense"), seed=1), out, overwrite=True)
    assert folder_bytes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    monkeypatch.undo()
    export.export_model(build_model(small_config("dense"), seed=1), out, overwrite=True)
    second = folder_bytes(out)
    assert second["model.safetensors"] != first["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
