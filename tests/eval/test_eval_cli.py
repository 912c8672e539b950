"""``aoe eval`` end to end on a tiny run folder and synthetic local data, plus the task list and table."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from aoe.eval import cli, suite
from hf_testing import build_model, small_config, write_run_dir
from test_eval_formats import jsonl, write


def test_paper_tasks_and_shots():
    tasks = suite.parse_tasks("paper")
    assert tasks == ["arc_easy", "piqa", "siqa", "winogrande", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "sst2"]
    assert [suite.SHOTS[t] for t in tasks] == [0] * 5 + [3] * 5
    assert suite.parse_tasks("mmlu,arc_challenge") == ["mmlu", "arc_challenge"]
    assert [suite.SHOTS[t] for t in ("mmlu", "arc_challenge")] == [5, 5]
    assert suite.parse_tasks("social_iqa,siqa") == ["siqa"]
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        suite.parse_tasks("squad")


def test_table_order_average_and_missing():
    scores = {"sst2": 0.5, "arc_easy": 0.25, "mnli": suite.MISSING, "piqa": 0.75}
    table = suite.results_table(scores, "m")
    header, _, row = table.strip().splitlines()
    assert header == "| model | ARC-E | PIQA | MNLI | SST2 | AVG (3 of 4) |"
    assert row == "| m | 25.00 | 75.00 | missing | 50.00 | 50.00 |"


def synthetic_data(root):
    write(root / "arc_easy" / "arc_easy_test.jsonl", jsonl(
        *({"query": f"Question: What is {i} plus one?", "choices": [str(i + 1), "seven", "blue"], "gold": 0}
          for i in range(4))))
    write(root / "glue" / "sst2" / "dev.tsv",
          "text\tlabel\n" + "".join(f"a fine film number {i} .\t{i % 2}\n" for i in range(6)))
    return root


def test_eval_run_folder_offline(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = write_run_dir(tmp_path, build_model(small_config("moe")), tokenizer)
    data_dir = synthetic_data(tmp_path / "eval_data")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--tasks", "arc_easy,sst2,qqp", "--data-dir", str(data_dir),
                              "--limit", "3", "--output", str(tmp_path / "out")])
    assert cli.run(args) == 0

    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["scores"]["qqp"] == suite.MISSING
    assert report["tasks"]["arc_easy"]["shots"] == 0
    assert report["tasks"]["sst2"]["shots"] == 3
    for task in ("arc_easy", "sst2"):
        acc = report["scores"][task]
        # Three examples: the accuracy is a multiple of 1/3.
        assert round(acc * 3) == pytest.approx(acc * 3, abs=1e-9)
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.splitlines()[0] == "| model | ARC-E | SST2 | QQP | AVG (2 of 3) |"
    assert "| missing |" in table


@pytest.mark.slow
def test_eval_perplexity_only(tmp_path):
    from aoe.data.loader import TokenDataset, eval_batches
    from aoe.data.prepare import prepare_corpus
    from aoe.data.tokenizer import load_tokenizer
    from aoe.eval.perplexity import evaluate_perplexity
    from hf_testing import TEXT

    corpus = tmp_path / "corpus"
    for i in range(8):
        write(corpus / f"doc{i}.txt", TEXT[i * 40:] + f" Document {i}.")
    prepare_corpus(tmp_path / "data", input_path=corpus, bpe_vocab_size=300, val_fraction=0.25)
    model = build_model(small_config("aoe"))
    run_dir = write_run_dir(tmp_path, model, tokenizer=load_tokenizer(str(tmp_path / "data" / "tokenizer")))

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(run_dir), "--tasks", "none", "--perplexity", "--ppl-batches", "2",
                              "--batch-size", "2", "--output", str(tmp_path / "out")])
    assert cli.run(args) == 0

    report = json.loads((tmp_path / "out" / "results.json").read_text())
    batches = eval_batches(TokenDataset(tmp_path / "data", split="val"), 2, 64, 2)
    expected = evaluate_perplexity(model, batches)
    assert report["perplexity"]["tokens"] == expected["tokens"]
    assert report["perplexity"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert report["scores"] == {}


def run_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_device_validated():
    import torch

    from aoe.eval.models import check_device

    assert check_device("cpu") == "cpu"
    for spec in ("tpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=rf"invalid --device '{spec}': expected one of cpu, cuda, mps"):
            check_device(spec)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="invalid --device 'cuda': no CUDA GPU is available"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="invalid --device 'cuda:99'"):
            check_device("cuda:99")
    # The device is checked before the model path, which does not exist here.
    with pytest.raises(ValueError, match="invalid --device 'tpu'"):
        run_eval(["/nonexistent/model", "--tasks", "none", "--perplexity", "--device", "tpu"])


def test_output_checked_before_loading(tmp_path, monkeypatch):
    from aoe.eval import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(models, "load_lm", no_load)
    run_dir = write_run_dir(tmp_path, build_model(small_config("dense")))
    taken = tmp_path / "taken"
    taken.write_text("keep", encoding="utf-8")
    with pytest.raises(ValueError, match="it exists and is not a folder"):
        run_eval([str(run_dir), "--tasks", "none", "--perplexity", "--output", str(taken)])
    with pytest.raises(ValueError, match="taken is a file, so the folder cannot be created"):
        run_eval([str(run_dir), "--tasks", "none", "--perplexity", "--output", str(taken / "sub")])
    assert taken.read_text(encoding="utf-8") == "keep"
    if Path("/proc/self").is_dir():
        with pytest.raises(ValueError, match="cannot write to /proc"):
            run_eval([str(run_dir), "--tasks", "none", "--perplexity", "--output", "/proc/aoe_eval_output"])


def test_missing_model_errors(tmp_path, capsys):
    from aoe.cli import main

    assert main(["eval", str(tmp_path / "absent"), "--tasks", "none", "--perplexity"]) == 2
    assert "not found" in capsys.readouterr().err

    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="neither a run folder nor a Hugging Face model folder"):
        run_eval([str(tmp_path / "plain"), "--tasks", "none", "--perplexity"])

    run_dir = write_run_dir(tmp_path, build_model(small_config("dense")))
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(ValueError, match=f"no good checkpoint in {run_dir}"):
        run_eval([str(run_dir), "--tasks", "none", "--perplexity"])


def test_default_output_separates_task_sets():
    from aoe.eval.cli import default_output

    paper = default_output("runs/demo/aoe", True, "paper", None, False)
    quick = default_output("runs/demo/aoe", True, "arc_easy, sst2", 5, True)
    exported = default_output("hf/demo-aoe/", False, "mmlu,arc_challenge", None, False)
    assert paper == Path("runs/demo/aoe/eval/paper")
    assert quick == Path("runs/demo/aoe/eval/arc_easy+sst2-limit5-perplexity")
    assert exported == Path("eval_results/demo-aoe/mmlu+arc_challenge")
