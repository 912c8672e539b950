"""Checkpoints: exact round trip, rejection of damaged files, fallback to an older checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from aoe.model.decoder import Transformer
from aoe.train.checkpoint import (
    CheckpointError,
    MODEL_FILE,
    OPTIMIZER_TENSORS,
    STATE_JSON,
    clean_partial_writes,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from aoe.train.optim import build_optimizer

from conftest import tiny_run_config


def trained_pair(tmp_path, seed=0):
    config = tiny_run_config(tmp_path)
    torch.manual_seed(seed)
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.optim)
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return config, model, optimizer


def save(tmp_path, step, model, optimizer, keep_last=5):
    state = {"micro_step": 0, "tokens_seen": 123 * step, "loader": {"position": step}}
    return save_checkpoint(tmp_path / "run", step, model, optimizer, state, {"extra": torch.arange(3.0)}, keep_last)


def test_round_trip_is_exact(tmp_path):
    config, model, optimizer = trained_pair(tmp_path)
    path = save(tmp_path, 7, model, optimizer)

    fresh_model = Transformer(config.model)
    fresh_optimizer = build_optimizer(fresh_model, config.optim)
    torch.manual_seed(99)
    checkpoint = find_checkpoint(tmp_path / "run")
    assert checkpoint.step == 7
    assert checkpoint.path == path
    state, tensors = load_checkpoint(checkpoint, fresh_model, fresh_optimizer)

    assert state["step"] == 7
    assert state["loader"] == {"position": 7}
    assert state["tokens_seen"] == 861
    assert torch.equal(tensors["extra"], torch.arange(3.0))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh_model.lm_head.weight is fresh_model.embed.weight
    original, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for index, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, restored["state"][index][key]), (index, key)


def test_rng_state_restored(tmp_path):
    config, model, optimizer = trained_pair(tmp_path)
    torch.manual_seed(1234)
    save(tmp_path, 1, model, optimizer)
    expected = torch.rand(4)
    torch.manual_seed(5)
    load_checkpoint(find_checkpoint(tmp_path / "run"), model, optimizer)
    assert torch.equal(torch.rand(4), expected)


def test_model_file_loads_with_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    config, model, optimizer = trained_pair(tmp_path)
    path = save(tmp_path, 3, model, optimizer)
    fresh = Transformer(config.model)
    fresh.load_state_dict(load_file(str(path / MODEL_FILE)))
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_keep_last_prunes_oldest(tmp_path):
    _, model, optimizer = trained_pair(tmp_path)
    for step in (2, 4, 6, 8):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [6, 8]


@pytest.mark.parametrize("damage, message", [
    ("truncate_model", "model.safetensors has .* bytes, the manifest records"),
    ("flip_optimizer", "optimizer.safetensors has sha256"),
    ("delete_state", "state.json is missing"),
    ("truncate_manifest", "manifest.json is not a valid manifest"),
    ("delete_manifest", "manifest.json is missing"),
    ("manifest_entry_without_bytes", "manifest.json is not a valid manifest .*model.safetensors needs a 'sha256' string and a 'bytes'"),
    ("manifest_files_list", "manifest.json is not a valid manifest .*'files' table"),
    ("manifest_not_object", "manifest.json is not a valid manifest"),
    ("state_not_json", "state.json is not valid JSON"),
    ("state_without_step", "state.json is not a valid trainer state .*'step' must be a int"),
    ("state_bool_step", "state.json is not a valid trainer state .*'step' must be a int, got True"),
    ("optimizer_without_groups", "optimizer.json is not a valid optimizer state"),
    ("model_not_safetensors", "model.safetensors is not a valid safetensors file"),
])
def test_damaged_checkpoint_rejected_and_falls_back(tmp_path, damage, message):
    _, model, optimizer = trained_pair(tmp_path)
    save(tmp_path, 4, model, optimizer)
    bad = save(tmp_path, 8, model, optimizer)
    if damage == "truncate_model":
        with open(bad / MODEL_FILE, "r+b") as handle:
            handle.truncate(os.path.getsize(bad / MODEL_FILE) // 2)
    elif damage == "flip_optimizer":
        data = bytearray((bad / OPTIMIZER_TENSORS).read_bytes())
        data[-1] ^= 0xFF
        (bad / OPTIMIZER_TENSORS).write_bytes(bytes(data))
    elif damage == "delete_state":
        (bad / STATE_JSON).unlink()
    elif damage == "truncate_manifest":
        text = (bad / "manifest.json").read_text()
        (bad / "manifest.json").write_text(text[: len(text) // 2])
    elif damage == "delete_manifest":
        (bad / "manifest.json").unlink()
    elif damage.startswith("manifest_"):
        manifest = json.loads((bad / "manifest.json").read_text())
        if damage == "manifest_entry_without_bytes":
            del manifest["files"][MODEL_FILE]["bytes"]
        elif damage == "manifest_files_list":
            manifest["files"] = list(manifest["files"])
        else:
            manifest = [manifest]
        (bad / "manifest.json").write_text(json.dumps(manifest))
    else:
        # A file rewritten together with its manifest entry: the sizes and digests match, only
        # the structure shows the damage.
        name, text = {
            "state_not_json": (STATE_JSON, "{step: 8"),
            "state_without_step": (STATE_JSON, json.dumps({"micro_step": 0})),
            "state_bool_step": (STATE_JSON, json.dumps({**json.loads((bad / STATE_JSON).read_text()), "step": True})),
            "optimizer_without_groups": ("optimizer.json", json.dumps({"state": {}})),
            "model_not_safetensors": (MODEL_FILE, "not tensors"),
        }[damage]
        (bad / name).write_text(text)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"][name] = {"sha256": sha256_file(bad / name), "bytes": (bad / name).stat().st_size}
        (bad / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(tmp_path / "run", step=8)
    fallback = find_checkpoint(tmp_path / "run")
    assert fallback.step == 4


def test_resave_keeps_damaged_checkpoint_aside(tmp_path):
    _, model, optimizer = trained_pair(tmp_path)
    bad = save(tmp_path, 8, model, optimizer)
    (bad / STATE_JSON).write_text("{}")
    save(tmp_path, 8, model, optimizer)
    verify_checkpoint(bad)
    kept = bad.with_name(bad.name + ".rejected")
    assert (kept / STATE_JSON).read_text() == "{}"
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [8]


def test_partial_write_is_ignored_and_cleaned(tmp_path):
    _, model, optimizer = trained_pair(tmp_path)
    save(tmp_path, 4, model, optimizer)
    partial = tmp_path / "run" / "checkpoints" / ".tmp-step_00000008-1"
    partial.mkdir()
    (partial / MODEL_FILE).write_bytes(b"\0" * 10)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]
    assert clean_partial_writes(tmp_path / "run") == [partial]
    assert not partial.exists()


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    config, model, optimizer = trained_pair(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        load_model(tmp_path / "run")
    save(tmp_path, 5, model, optimizer)
    with pytest.raises(CheckpointError, match="no checkpoint for step=6 .*steps: 5"):
        load_model(tmp_path / "run", step=6)
    loaded, loaded_config = load_model(tmp_path / "run", step=5)
    for text in ("{not json", "[1, 2]", json.dumps({"model": 5})):
        config_path = tmp_path / "run" / "config.json"
        good_text = config_path.read_text()
        config_path.write_text(text)
        with pytest.raises(CheckpointError, match=r"damaged run config .*config.json: ") as info:
            load_model(tmp_path / "run")
        assert "\n" not in str(info.value)
        config_path.write_text(good_text)
    assert loaded_config == config
    assert torch.equal(loaded.layers[0].ffn.router.weight, model.layers[0].ffn.router.weight)


def test_saved_weights_are_readable_by_others(tmp_path):
    import os
    import stat

    from aoe.train.checkpoint import apply_default_permissions

    folder = tmp_path / "export"
    folder.mkdir(mode=0o700)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    previous = os.umask(0o022)
    try:
        apply_default_permissions(folder)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
