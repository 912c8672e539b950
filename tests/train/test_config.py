"""Run configs: presets, loading, overrides, and one clear message per kind of bad input."""

from __future__ import annotations

import json

import pytest

from aoe.config_utils import ConfigError
from aoe.train.config import RunConfig, check_data, load_run_config
from aoe.train.presets import PAPER_MAX_STEPS, RUN_PRESETS, run_preset


def write_data_dir(path, vocab_size=8192, train_tokens=100_000, tokenizer=True, meta_text=None):
    path.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "num_tokens": {"train": train_tokens, "val": 1000}}
    (path / "meta.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
    if tokenizer:
        (path / "tokenizer").mkdir(exist_ok=True)
    return path


def test_paper_presets_follow_the_recipe():
    for name in ("paper-732m-moe", "paper-732m-aoe-dlow256", "paper-4b-aoe"):
        config = run_preset(name)
        assert config.optim.betas == (0.9, 0.95)
        assert config.optim.weight_decay == 0.1
        assert config.optim.grad_clip == 1.0
        assert config.schedule.warmup_steps == 4800
        assert config.schedule.min_lr == 1.28e-5
        assert config.data.seq_len == 2048
        assert config.data.tokens_per_step == 4_194_304
        assert config.schedule.max_steps == PAPER_MAX_STEPS == 23_841
    assert run_preset("paper-732m-moe").optim.lr == 2e-4
    assert run_preset("paper-4b-moe").optim.lr == 3.2e-4
    assert run_preset("paper-732m-aoe-dlow64").model.ffn.d_low == 64


def test_every_preset_builds_and_round_trips():
    assert len(RUN_PRESETS) == 10
    for name, build in RUN_PRESETS.items():
        config = build()
        assert config.name == name
        assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_overrides_and_yaml_file(tmp_path):
    config = load_run_config("tiny-aoe", ["model.ffn.top_k=1", "optim.lr=3e-4", "train.run_name=x"])
    assert config.model.ffn.top_k == 1
    assert config.optim.lr == 3e-4
    assert config.run_dir.name == "x"
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-moe\nname: mine\noptim:\n  lr: 0.002\nschedule:\n  max_steps: 50\n")
    config = load_run_config(str(path), ["schedule.warmup_steps=5"])
    assert config.name == "mine"
    assert config.optim.lr == 0.002
    assert config.schedule.max_steps == 50
    assert config.schedule.warmup_steps == 5
    assert config.model == run_preset("tiny-moe").model
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(config.to_dict()))
    assert load_run_config(str(json_path)) == config


def test_auto_vocab_reads_the_data_folder(tmp_path):
    data = write_data_dir(tmp_path / "data", vocab_size=300)
    config = load_run_config("tiny-moe", [f"data.path={data}", "model.vocab_size=auto"])
    assert config.model.vocab_size == 300
    assert check_data(config)["vocab_size"] == 300


# (case id, spec, overrides, data folder setup or None, expected message regex)
BAD_CASES = [
    ("top_k above n_experts", "tiny-moe", ["model.ffn.top_k=9"], None, r"top_k=9: expected an integer from 1 to n_experts=8"),
    ("top_k zero", "tiny-moe", ["model.ffn.top_k=0"], None, r"top_k=0"),
    ("n_experts zero", "tiny-moe", ["model.ffn.n_experts=0"], None, r"n_experts=0"),
    ("d_low not below d_model", "tiny-aoe", ["model.ffn.d_low=256"], None, r"d_low=256: expected d_low < d_model=256"),
    ("aoe without d_low", "tiny-moe", ["model.ffn.kind=aoe"], None, r"d_low=None: AoE needs the low rank"),
    ("heads not dividing d_model", "tiny-moe", ["model.attention.n_heads=3"], None, r"n_heads=3: expected a divisor of d_model=256"),
    ("odd head dimension", "tiny-moe", ["model.d_model=12", "model.attention.n_heads=4"], None, r"even head dimension"),
    ("unknown ffn kind", "tiny-moe", ["model.ffn.kind=aeo"], None, r"kind='aeo': expected one of 'dense', 'moe', 'aoe'"),
    ("unknown selection", "tiny-moe", ["model.ffn.selection=top_q"], None, r"selection='top_q'"),
    ("unknown score norm", "tiny-aoe", ["model.ffn.score_norm=l3"], None, r"score_norm='l3'"),
    ("top_p above one", "tiny-moe", ["model.ffn.top_p=1.5"], None, r"top_p=1.5"),
    ("negative lr", "tiny-moe", ["optim.lr=-1e-3"], None, r"optim.lr=-0.001: expected a finite number > 0"),
    ("zero lr", "tiny-moe", ["optim.lr=0"], None, r"optim.lr=0"),
    ("min_lr above lr", "tiny-moe", ["schedule.min_lr=0.1"], None, r"schedule.min_lr=0.1: expected at most the peak optim.lr"),
    ("warmup not below max_steps", "tiny-moe", ["schedule.warmup_steps=600"], None, r"warmup_steps=600: expected an integer from 0 to max_steps-1=599"),
    ("zero max_steps", "tiny-moe", ["schedule.max_steps=0"], None, r"max_steps=0"),
    ("seq_len above max_seq_len", "tiny-moe", ["data.seq_len=512"], None, r"seq_len=512: expected at most model.max_seq_len=256"),
    ("zero micro-batch", "tiny-moe", ["data.micro_batch_size=0"], None, r"micro_batch_size=0: expected a positive integer"),
    ("negative accumulation", "tiny-moe", ["data.grad_accum_steps=-1"], None, r"grad_accum_steps=-1"),
    ("text seq_len", "tiny-moe", ["data.seq_len=abc"], None, r"seq_len='abc': expected a value of type int"),
    ("fp16 precision", "tiny-moe", ["train.precision=fp16"], None, r"precision='fp16': expected one of 'fp32', 'bf16'"),
    ("unknown device", "tiny-moe", ["train.device=tpu"], None, r"device='tpu'"),
    ("zero log interval", "tiny-moe", ["train.log_interval=0"], None, r"log_interval=0"),
    ("negative eval batches", "tiny-moe", ["train.eval_batches=-1"], None, r"eval_batches=-1"),
    ("zero threads", "tiny-moe", ["train.num_threads=0"], None, r"num_threads=0"),
    ("run name with slash", "tiny-moe", ["train.run_name=a/b"], None, r"run_name='a/b'"),
    ("keep no checkpoints", "tiny-moe", ["checkpoint.keep_last=0"], None, r"keep_last=0"),
    ("negative checkpoint interval", "tiny-moe", ["checkpoint.interval=-5"], None, r"interval=-5"),
    ("one beta", "tiny-moe", ["optim.betas=[0.9]"], None, r"betas=\[0.9\]: expected two numbers"),
    ("beta above one", "tiny-moe", ["optim.betas=[0.9,1.5]"], None, r"betas="),
    ("negative clip", "tiny-moe", ["optim.grad_clip=-1"], None, r"grad_clip=-1"),
    ("negative weight decay", "tiny-moe", ["optim.weight_decay=-0.1"], None, r"weight_decay=-0.1"),
    ("unknown optim key", "tiny-moe", ["optim.lrr=1"], None, r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("unknown ffn key", "tiny-moe", ["model.ffn.topk=2"], None, r"'model.ffn.topk'; did you mean 'model.ffn.top_k'\?"),
    ("unknown section", "tiny-moe", ["trian.seed=1"], None, r"'trian'; did you mean 'train'\?"),
    ("override without value", "tiny-moe", ["optim.lr"], None, r"expected the form section.field=value"),
    ("unknown preset", "tiny-moee", [], None, r"unknown run preset 'tiny-moee'; did you mean 'tiny-moe'\?"),
    ("missing config file", "missing.yaml", [], None, r"config file not found: missing.yaml"),
    ("file with unknown key", "yaml:optim:\n  lr: 0.001\n  wd: 0.1\n", [], None, r"unknown config key 'optim.wd'"),
    ("file not a mapping", "yaml:- 1\n- 2\n", [], None, r"the top level must be a mapping"),
    ("file with unknown preset", "yaml:preset: huge-moe\n", [], None, r"unknown run preset 'huge-moe'"),
    ("missing data folder", "tiny-moe", [], "absent", r"data.path=.*expected an existing folder"),
    ("data folder without meta", "tiny-moe", [], "no-meta", r"expected a folder with meta.json"),
    ("meta not JSON", "tiny-moe", [], "bad-meta", r"meta.json: not valid JSON"),
    ("missing tokenizer", "tiny-moe", [], "no-tokenizer", r"expected a tokenizer folder at .*tokenizer"),
    ("data vocab above model", "tiny-moe", [], "big-vocab", r"model.vocab_size=8192: expected at least the data's vocabulary size 32000"),
    ("empty corpus", "tiny-moe", [], "empty", r"the corpus is empty or too small"),
    ("auto vocab without data", "tiny-moe", ["model.vocab_size=auto"], "absent", r"data.path=.*expected an existing folder"),
    ("section as number", "tiny-moe", ["model=5"], None, r"invalid model=5: expected a mapping of fields such as vocab_size"),
    ("nested section null", "tiny-moe", ["model.ffn=null"], None, r"invalid model.ffn=None: expected a mapping of fields"),
    ("section as list", "tiny-moe", ["optim=[1,2]"], None, r"invalid optim=\[1, 2\]: expected a mapping of fields"),
    ("file section as number", "yaml:model: 5\n", [], None, r"invalid model=5: expected a mapping of fields"),
    ("auto vocab with data as number", "yaml:data: 5\nmodel:\n  vocab_size: auto\n", [], None, r"expected an existing folder|invalid data=5"),
    ("YAML syntax error", "yaml:optim:\n  lr: [0.1\n", [], None, r"invalid config file .*bad.yaml: YAML syntax error: .* at line 3 column 1"),
    ("YAML tab indentation", "yaml:optim:\n\tlr: 0.1\n", [], None, r"invalid config file .*bad.yaml: YAML syntax error: .*line 2"),
    ("empty YAML file", "yaml:", [], None, r"config file .*bad.yaml is empty"),
    ("YAML file of comments", "yaml:# nothing yet\n", [], None, r"config file .*bad.yaml is empty"),
    ("JSON syntax error", "json:{\"optim\": {\"lr\": }}", [], None, r"invalid config file .*bad.json: not valid JSON \(Expecting value at line 1 column 18\)"),
    ("folder as config file", "dir:", [], None, r"invalid config file .*: it is not a regular file"),
    ("device as config file", "/dev/null", [], None, r"invalid config file /dev/null: it is not a regular file"),
    ("bool as integer", "tiny-moe", ["model.d_model=true"], None, r"invalid model.d_model=True: expected a value of type int"),
    ("integer as bool", "tiny-moe", ["model.tie_embeddings=5"], None, r"invalid model.tie_embeddings=5: expected a value of type bool \(true or false\)"),
    ("number as run name in a file", "yaml:train:\n  run_name: 123\n", [], None, r"invalid train.run_name=123: expected a value of type str"),
    ("null integer", "tiny-moe", ["model.d_model=null"], None, r"invalid model.d_model=None: expected an integer, null is not allowed"),
    ("infinite lr", "tiny-moe", ["optim.lr=inf"], None, r"invalid optim.lr=inf: expected a finite number"),
    ("NaN lr", "tiny-moe", ["optim.lr=NaN"], None, r"invalid optim.lr=nan: expected a finite number"),
    ("infinite peak FLOP/s", "tiny-moe", ["train.peak_flops=Infinity"], None, r"invalid train.peak_flops=inf"),
]


@pytest.mark.parametrize("case, spec, overrides, data_setup, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_message(tmp_path, case, spec, overrides, data_setup, message):
    if spec.startswith(("yaml:", "json:")):
        path = tmp_path / f"bad.{spec[:4]}"
        path.write_text(spec[5:])
        spec = str(path)
    elif spec == "dir:":
        spec = str(tmp_path)
    data = tmp_path / "data"
    if data_setup == "no-meta":
        data.mkdir()
    elif data_setup == "bad-meta":
        write_data_dir(data, meta_text="{not json")
    elif data_setup == "no-tokenizer":
        write_data_dir(data, tokenizer=False)
    elif data_setup == "big-vocab":
        write_data_dir(data, vocab_size=32000)
    elif data_setup == "empty":
        write_data_dir(data, train_tokens=0)
    overrides = list(overrides) + ([f"data.path={data}"] if data_setup else [])
    with pytest.raises(ValueError, match=message) as info:
        config = load_run_config(spec, overrides)
        check_data(config)
    assert "\n" not in str(info.value)


def test_bad_case_table_is_large():
    assert len(BAD_CASES) >= 30


def test_number_override_of_a_string_field_is_the_string():
    config = load_run_config("tiny-moe", ["train.run_name=123", "data.path=1e3", "train.num_threads=null"])
    assert config.train.run_name == "123"
    assert config.data.path == "1e3"
    assert config.train.num_threads is None


def test_config_error_is_value_error():
    with pytest.raises(ConfigError):
        load_run_config("tiny-moe", ["optim.lr=-1"])


def test_presets_table_explains_active_count(capsys):
    import argparse

    from aoe.train import presets_cli

    assert presets_cli.run(argparse.Namespace(json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    dense = next(line.split() for line in lines if line.startswith("tiny-dense"))
    # Tied embeddings: the head counts once in total, twice in active.
    assert float(dense[3].rstrip("M")) > float(dense[2].rstrip("M"))
    assert "counting the embedding and the output head separately" in lines[-2]
    assert "tied" in lines[-1]
