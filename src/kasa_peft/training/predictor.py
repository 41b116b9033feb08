"""Loading a training output folder to evaluate or predict with the model it contains.

``Predictor`` reads ``kasa_peft_task.json`` (``RunInfo``), loads the tokenizer and base
model it names, puts the saved adapter (or the fully fine-tuned model) on top, and runs
batches through it with the task's columns and label mapping.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader

from kasa_peft.data import (
    GLUE_TASK_NAMES,
    DataError,
    LabelMapping,
    MissingColumnError,
    PaddingCollator,
    TaskSpec,
    TextExamples,
    encode_examples,
    glue_task,
    read_examples,
)
from kasa_peft.training.artifacts import RunInfo
from kasa_peft.training.evaluation import EvaluationResult, collect_outputs, evaluate
from kasa_peft.training.methods import load_trained_model
from kasa_peft.training.models import load_base_model, load_tokenizer, resolve_device

logger = logging.getLogger(__name__)

PREDICTION_FORMATS: tuple[str, ...] = ("jsonl", "tsv", "csv")


class Predictor:
    """A trained model loaded from a ``kasa-peft train`` output folder.

    Args:
        directory: the output folder (``--output-dir`` of the training run).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        base_model: loads the base model from here instead of the recorded path, for
            a folder that was moved to another machine. A KaSA adapter checks that the
            weights are the ones it was trained on.

    Raises ``RunInfoError`` when the folder is not a training output, ``ModelLoadError``
    when the model cannot be loaded, and the core's ``AdapterFileError`` when a KaSA
    adapter does not fit the base model.
    """

    def __init__(self, directory: str | os.PathLike, device: str = "auto", base_model: str | None = None) -> None:
        self.directory = Path(directory)
        self.run_info = RunInfo.load(self.directory)
        self.task = TaskSpec.from_dict(self.run_info.task)
        labels = self.run_info.labels
        self.label_mapping = LabelMapping(tuple(labels)) if labels is not None else None
        self.device = resolve_device(device)
        model_path = base_model or self.run_info.base_model
        self.tokenizer = load_tokenizer(model_path)
        self.collate = PaddingCollator.from_tokenizer(self.tokenizer)

        def load_base() -> torch.nn.Module:
            return load_base_model(
                model_path,
                num_labels=len(labels) if labels is not None else 1,
                problem_type=self.task.problem_type,
                labels=labels,
                pad_token_id=self.tokenizer.pad_token_id,
            )

        self.model = load_trained_model(self.run_info.method, self.directory, load_base).to(self.device)
        logger.info("Loaded the %s model from %s on %s", self.run_info.method, self.directory, self.device)

    @property
    def text_columns(self) -> list[str]:
        """The text column, and the second text column for sentence pairs."""
        columns = [self.task.text_column]
        if self.task.text_pair_column is not None:
            columns.append(self.task.text_pair_column)
        return columns

    def evaluation_examples(
        self,
        file: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        max_samples: int | None = None,
        seed: int = 42,
    ) -> TextExamples:
        """Read labelled examples: ``file`` with the task's columns, or the task's validation split.

        ``data_dir`` replaces the recorded folder of a GLUE preset. Raises ``DataError``
        for missing files, columns or labels.
        """
        if file is not None:
            if data_dir is not None:
                raise DataError("both an evaluation file and data_dir are given; pass only one of them.")
            try:
                return read_examples(
                    file,
                    text_column=self.task.text_column,
                    text_pair_column=self.task.text_pair_column,
                    label_column=self.task.label_column,
                    problem_type=self.task.problem_type,
                    max_samples=max_samples,
                    seed=seed,
                )
            except MissingColumnError as error:
                # The columns were fixed at training, so the advice to set them does not apply here.
                raise MissingColumnError(
                    f"column {error.column!r} not found in {file}; this model reads the columns it was trained "
                    f"with ({self._trained_columns()}), and the file has {list(error.available)}. Rename the "
                    "file's columns to match.",
                    option=error.option,
                    column=error.column,
                    available=error.available,
                ) from error
        task = self.task
        if data_dir is not None:
            if task.name not in GLUE_TASK_NAMES:
                raise DataError(
                    f"data_dir applies to GLUE presets only, and this model was trained on task {task.name!r}; "
                    "pass an evaluation file instead."
                )
            task = glue_task(task.name, Path(data_dir).resolve())
        return task.load_split("validation", max_samples=max_samples, seed=seed)

    def _trained_columns(self) -> str:
        names = [self.task.text_column, self.task.text_pair_column, self.task.label_column]
        return ", ".join(repr(name) for name in names if name is not None)

    def prediction_examples(self, file: str | os.PathLike, text_columns: Sequence[str] | None = None) -> TextExamples:
        """Read unlabelled examples from ``file``; the columns default to the task's."""
        columns = list(text_columns) if text_columns else self.text_columns
        if len(columns) != len(self.text_columns):
            raise DataError(
                f"text columns {columns} do not fit the model, which was trained on "
                f"{'sentence pairs' if len(self.text_columns) == 2 else 'single texts'} ({self.text_columns}); "
                f"give {len(self.text_columns)} column(s)."
            )
        return read_examples(
            file,
            text_column=columns[0],
            text_pair_column=columns[1] if len(columns) > 1 else None,
            label_column=None,
            problem_type=self.task.problem_type,
        )

    def texts_as_examples(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> TextExamples:
        """Wrap texts given on the command line as unlabelled examples."""
        pair = self.task.text_pair_column is not None
        if pair and (text_pairs is None or len(text_pairs) != len(texts)):
            raise DataError(
                f"this model was trained on sentence pairs ({self.text_columns}); give one --text-pair for each --text "
                f"(got {len(texts)} texts and {len(text_pairs or [])} pairs)."
            )
        if not pair and text_pairs:
            raise DataError(f"this model was trained on single texts ({self.text_columns}); remove --text-pair.")
        for index, text in enumerate(list(texts) + list(text_pairs or [])):
            if not text.strip():
                raise DataError(f"text number {index + 1} is empty; every text needs content.")
        return TextExamples(
            texts=list(texts),
            text_pairs=list(text_pairs) if pair else None,
            labels=None,
            problem_type=self.task.problem_type,
            source=Path("<command line>"),
            line_numbers=list(range(1, len(texts) + 1)),
            position_unit="text",
        )

    def _loader(self, examples: TextExamples, batch_size: int) -> DataLoader:
        dataset = encode_examples(
            examples, self.tokenizer, max_length=self.run_info.max_length, label_mapping=self.label_mapping
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate)

    def evaluate(self, examples: TextExamples, batch_size: int = 64) -> EvaluationResult:
        """Compute the task's metrics on labelled examples.

        Raises ``UnknownLabelError`` for a label outside the training label mapping.
        """
        loader = self._loader(examples, batch_size)
        return evaluate(self.model, loader, self.device, self.task.problem_type, self.task.metrics)

    def predict(self, examples: TextExamples, batch_size: int = 64) -> list[dict[str, Any]]:
        """Return one record per example with its texts and the prediction.

        Classification records have ``label`` (the predicted label name), ``score``
        (its probability) and ``probabilities`` (per label). Regression records have
        ``score``, the predicted value.
        """
        outputs = collect_outputs(self.model, self._loader(examples, batch_size), self.device)
        records: list[dict[str, Any]] = []
        if self.task.problem_type == "regression":
            scores = outputs.logits[:, 0].tolist()
        else:
            probabilities = torch.softmax(outputs.logits.double(), dim=-1)
            best = probabilities.argmax(dim=-1).tolist()
        for index in range(len(examples)):
            record: dict[str, Any] = {"text": examples.texts[index]}
            if examples.text_pairs is not None:
                record["text_pair"] = examples.text_pairs[index]
            if self.task.problem_type == "regression":
                record["score"] = scores[index]
            else:
                row = probabilities[index].tolist()
                record["label"] = self.label_mapping.decode(best[index])
                record["score"] = row[best[index]]
                record["probabilities"] = dict(zip(self.label_mapping.labels, row))
            records.append(record)
        return records


def prediction_format(path: str | os.PathLike | None) -> str:
    """Return the output format for ``path`` by extension; JSON Lines for stdout (None)."""
    if path is None:
        return "jsonl"
    suffix = Path(path).suffix.lower()
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv"}
    if suffix not in formats:
        raise DataError(f"output file {str(path)!r} has extension {suffix!r}; use .jsonl, .tsv or .csv.")
    return formats[suffix]


def write_predictions(records: Sequence[dict[str, Any]], handle: TextIO, file_format: str) -> None:
    """Write prediction records as JSON Lines, or as a TSV/CSV table with one column per probability."""
    if file_format == "jsonl":
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    if not records:
        return
    fields = [key for key in records[0] if key != "probabilities"]
    labels = list(records[0].get("probabilities", {}))
    if file_format == "tsv":
        writer = csv.writer(
            handle, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, escapechar="\\", lineterminator="\n"
        )
    else:
        writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(fields + [f"probability_{label}" for label in labels])
    for record in records:
        probabilities = record.get("probabilities", {})
        writer.writerow([record[key] for key in fields] + [probabilities[label] for label in labels])
