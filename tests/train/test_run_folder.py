"""The run folder: resume reports, rejected checkpoints kept, checks before compute, the run lock."""

from __future__ import annotations

import json
import os

import pytest

from aoe.config_utils import ConfigError
from aoe.train import trainer as trainer_module
from aoe.train.checkpoint import MANIFEST, MODEL_FILE, list_checkpoints
from aoe.train.trainer import RunLock, train

from conftest import fake_data, tiny_run_config

# Six steps with checkpoints at 2, 4 and 6 (keep_last 2 leaves 4 and 6): a second or two each.
SHORT = dict(schedule={"max_steps": 6, "warmup_steps": 1}, checkpoint={"interval": 2, "keep_last": 2},
             train={"eval_interval": 3})


def short_config(tmp_path, **sections):
    parts = {name: dict(values) for name, values in SHORT.items()}
    for name, values in sections.items():
        parts[name] = {**parts.get(name, {}), **values}
    return tiny_run_config(tmp_path, **parts)


def drop_manifest_bytes(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    del manifest["files"][MODEL_FILE]["bytes"]
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_resume_is_reported_and_bad_checkpoint_kept(tmp_path, capsys):
    config = short_config(tmp_path)
    train(config, data=fake_data(config))
    run_dir = config.run_dir
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 6]
    capsys.readouterr()

    bad = run_dir / "checkpoints" / "step_00000006"
    drop_manifest_bytes(bad)
    train(config, data=fake_data(config))
    log_text = (run_dir / "train.log").read_text()
    console = capsys.readouterr().err
    for text in (log_text, console):
        assert "rejected checkpoint: corrupted checkpoint" in text
        assert "step_00000006.rejected" in text
        assert "resumed from" in text
        assert "(step 4," in text
    kept = run_dir / "checkpoints" / "step_00000006.rejected"
    assert "bytes" not in json.loads((kept / MANIFEST).read_text())["files"][MODEL_FILE]
    # The resumed run wrote a good step 6 next to the kept one.
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 6]


def test_all_checkpoints_bad_warns_and_keeps_them(tmp_path, capsys):
    config = short_config(tmp_path)
    train(config, data=fake_data(config))
    run_dir = config.run_dir
    for _, path in list_checkpoints(run_dir):
        drop_manifest_bytes(path)
    capsys.readouterr()

    result = train(config, data=fake_data(config))
    console = capsys.readouterr().err
    assert "NO GOOD CHECKPOINT" in console
    assert "rejected step_00000006, step_00000004" in console
    assert "NO GOOD CHECKPOINT" in (run_dir / "train.log").read_text()
    assert result.metrics["steps"] == 6
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000004.rejected", "step_00000006", "step_00000006.rejected"]


def _make(path, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_text("x")
    else:
        path.mkdir()


# (case id, entry relative to the run folder or "OUT" for train.out_dir, file or folder, message regex)
OBSTACLES = [
    ("out_dir is a file", "OUT", "file", r"invalid train.out_dir: .* is a file, expected a folder"),
    ("run folder is a file", ".", "file", r"invalid train.run_name: .* is a file, expected a folder"),
    ("checkpoints is a file", "checkpoints", "file", r"checkpoints: expected a folder, found a file"),
    ("tb is a file", "tb", "file", r"tb: expected a folder, found a file"),
    ("metrics.jsonl is a folder", "metrics.jsonl", "dir", r"metrics.jsonl: expected a regular file"),
    ("train.log is a folder", "train.log", "dir", r"train.log: expected a regular file"),
    ("peak_flops.json is a folder", "peak_flops.json", "dir", r"peak_flops.json: expected a regular file"),
]


@pytest.mark.parametrize("case, entry, kind, message", OBSTACLES, ids=[c[0] for c in OBSTACLES])
def test_run_folder_obstacle_fails_before_compute(tmp_path, monkeypatch, case, entry, kind, message):
    config = short_config(tmp_path)
    path = {"OUT": tmp_path / "runs", ".": config.run_dir}.get(entry, config.run_dir / entry)
    _make(path, kind)
    monkeypatch.setattr(trainer_module, "_Loop", None)  # building the model would fail differently
    with pytest.raises(ConfigError, match=message) as info:
        train(config, data=fake_data(config))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("config.json", "{not json", r"invalid run file .*config.json: not valid JSON"),
    ("config.json", "[1]", r"invalid run file .*config.json: expected a JSON object"),
    ("routing.json", "{\"train\": [1", r"invalid run file .*routing.json: not valid JSON"),
    ("routing.json", "[]", r"invalid run file .*routing.json: expected an object whose 'train' list"),
    ("routing.json", "{\"train\": [{\"layers\": []}]}", r"invalid run file .*routing.json: expected an object"),
])
def test_damaged_run_file_fails_before_compute(tmp_path, monkeypatch, name, text, message):
    config = short_config(tmp_path)
    run_dir = config.run_dir
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (run_dir / name).write_text(text)
    monkeypatch.setattr(trainer_module, "_Loop", None)
    with pytest.raises(ConfigError, match=message):
        train(config, data=fake_data(config))


def test_damaged_peak_cache_is_measured_again(tmp_path):
    config = short_config(tmp_path, schedule={"max_steps": 2}, train={"peak_flops": None, "eval_batches": 0})
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "peak_flops.json").write_text(json.dumps({"flops": "fast"}))
    # A lock file left by a killed process holds no lock and must not block the run.
    (config.run_dir / ".lock").write_text("999999\n")
    result = train(config, data=fake_data(config, eval_batches=0))
    log_text = (config.run_dir / "train.log").read_text()
    assert "ignoring the damaged cache" in log_text
    assert "validation is off" in log_text
    peak = json.loads((config.run_dir / "peak_flops.json").read_text())
    assert peak["flops"] == result.metrics["peak_flops"]
    assert peak["flops"] > 1e8


def test_second_process_on_run_folder_is_refused(tmp_path, monkeypatch):
    config = short_config(tmp_path)
    config.run_dir.mkdir(parents=True)
    holder = RunLock(config.run_dir)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(trainer_module, "_Loop", None)
            with pytest.raises(ConfigError, match=rf"run folder .* is in use by another aoe train process "
                                                  rf"\(PID {os.getpid()}\)"):
                train(config, data=fake_data(config))
    finally:
        holder.release()
    # Released: the next run takes the lock (and releases it when done, as the second lock shows).
    train(config, data=fake_data(config))
    RunLock(config.run_dir).release()
