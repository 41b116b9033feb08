"""One complete training run: data, model, loop and output folder, from ``TrainOptions``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kasa_peft._version import __version__
from kasa_peft.data import PaddingCollator, TaskSpec, encode_examples, file_task, get_task
from kasa_peft.training.artifacts import (
    LABEL_MAPPING_NAME,
    METRICS_NAME,
    TRAIN_CONFIG_NAME,
    RunInfo,
    TrainLog,
    environment_info,
    peak_memory,
    remove_previous_run,
    reset_peak_memory,
    write_json,
)
from kasa_peft.training.evaluation import evaluate
from kasa_peft.training.loop import LoopSettings, Trainer, TrainingState, set_seed
from kasa_peft.training.methods import AdapterSettings, MethodModel, build_method_model
from kasa_peft.training.models import check_max_length, load_base_model, load_tokenizer, resolve_device
from kasa_peft.training.options import TrainOptions

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """Outcome of ``train``: where the model went and the ``metrics.json`` content."""

    output_dir: Path
    main_metric: str
    best_score: float | None
    best_step: int | None
    initial_metrics: dict[str, float] | None
    interrupted: bool
    metrics: dict[str, Any]


def build_task(options: TrainOptions) -> TaskSpec:
    """Return the task of ``options``: a preset, or custom files with the given columns.

    File paths are made absolute, so that the saved task still finds them from
    another working directory.
    """
    if options.task is not None:
        data_dir = Path(options.data_dir).resolve() if options.data_dir is not None else None
        return get_task(options.task, data_dir=data_dir)
    columns = options.text_column or ["text"]
    return file_task(
        Path(options.train_file).resolve(),
        Path(options.validation_file).resolve(),
        text_column=columns[0],
        text_pair_column=columns[1] if len(columns) > 1 else None,
        label_column=options.label_column,
        problem_type=options.problem_type,
    )


def loop_settings(options: TrainOptions) -> LoopSettings:
    """Return the loop's settings from resolved options."""
    return LoopSettings(
        epochs=options.epochs,
        max_steps=options.max_steps,
        batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        head_learning_rate=options.head_learning_rate,
        warmup_ratio=options.warmup_ratio,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        eval_steps=options.eval_steps,
        logging_steps=options.logging_steps,
        seed=options.seed,
        evaluate_before_training=options.evaluate_before_training,
    )


def train(options: TrainOptions, show_progress: bool | None = None) -> TrainingResult:
    """Train with ``options`` and fill the output folder (see ``kasa_peft.training.artifacts``).

    ``show_progress`` controls the tqdm bar on stderr (None: only on a terminal).
    Ctrl-C during the loop returns a result with ``interrupted`` set and the best
    checkpoint so far in the output folder. Raises ``OptionsError`` for invalid
    options, ``DataError`` for data problems and ``ModelLoadError`` when the model
    cannot be loaded.
    """
    options = options.resolved()
    options.validate()
    output_dir = Path(options.output_dir)
    with TrainLog(output_dir) as log:
        return _train_logged(options, output_dir, show_progress, log)


def _train_logged(options: TrainOptions, output_dir: Path, show_progress: bool | None, log: TrainLog) -> TrainingResult:
    started = time.perf_counter()
    logger.info("kasa-peft %s: method %s, model %s, output %s", __version__, options.method, options.model, output_dir)
    device = resolve_device(options.device)
    set_seed(options.seed)

    task = build_task(options)
    train_examples = task.load_split("train", max_samples=options.max_train_samples, seed=options.seed)
    validation_examples = task.load_split("validation", max_samples=options.max_eval_samples, seed=options.seed)
    label_mapping = task.build_label_mapping(train_examples)
    logger.info(
        "Task %s (%s): %d training and %d validation examples%s",
        task.name,
        task.problem_type,
        len(train_examples),
        len(validation_examples),
        f", labels {list(label_mapping.labels)}" if label_mapping is not None else "",
    )

    tokenizer = load_tokenizer(options.model)
    labels = label_mapping.labels if label_mapping is not None else None
    base = load_base_model(
        options.model,
        num_labels=len(labels) if labels is not None else 1,
        problem_type=task.problem_type,
        labels=labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    check_max_length(base, options.max_length)
    train_set = encode_examples(train_examples, tokenizer, max_length=options.max_length, label_mapping=label_mapping)
    validation_set = encode_examples(
        validation_examples, tokenizer, max_length=options.max_length, label_mapping=label_mapping
    )
    collate = PaddingCollator.from_tokenizer(tokenizer)

    settings = AdapterSettings(
        r=options.r,
        alpha=options.alpha,
        dropout=options.dropout,
        target_modules=options.target_modules,
        beta=options.beta,
        gamma=options.gamma,
        truncation_method=options.truncation_method,
        truncation_cache=options.truncation_cache,
    )
    method_model = build_method_model(options.method, base, settings)
    method_model.module.to(device)
    trainable, total = method_model.parameter_counts()
    logger.info(
        "Parameters: %s trainable of %s (%.4f%%), device %s", f"{trainable:,}", f"{total:,}", 100 * trainable / total, device
    )

    run_info = RunInfo(
        method=options.method,
        base_model=_model_reference(options.model),
        task=task.to_dict(),
        labels=list(labels) if labels is not None else None,
        max_length=options.max_length,
    )
    eval_loader = DataLoader(
        validation_set, batch_size=options.eval_batch_size or options.batch_size, shuffle=False, collate_fn=collate
    )

    def evaluate_fn():
        return evaluate(method_model.module, eval_loader, device, task.problem_type, task.metrics)

    report = _MetricsReport(options, task, method_model, device, started, len(train_set), len(validation_set))

    def save_checkpoint(state: TrainingState) -> None:
        method_model.save(output_dir)
        run_info.save(output_dir)
        logger.info("Saved the best model (step %d) to %s", state.global_step, output_dir)

    def on_evaluation(state: TrainingState) -> None:
        write_json(output_dir / METRICS_NAME, report.build(state))

    # Data, model and options have passed their checks, so only now is an earlier run's
    # model in the output folder replaced.
    output_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_previous_run(output_dir)
    log.open_file()
    if removed:
        logger.info("Removed the files of an earlier run from %s: %s", output_dir, ", ".join(removed))
    write_json(output_dir / TRAIN_CONFIG_NAME, options.to_dict())
    if label_mapping is not None:
        label_mapping.save(output_dir / LABEL_MAPPING_NAME)

    reset_peak_memory(device)
    trainer = Trainer(
        method_model,
        train_set,
        collate,
        evaluate_fn,
        task.main_metric,
        loop_settings(options),
        device,
        save_checkpoint=save_checkpoint,
        on_evaluation=on_evaluation,
        show_progress=show_progress,
    )
    state = trainer.train()
    metrics = report.build(state)
    write_json(output_dir / METRICS_NAME, metrics)
    if state.best_step is None:
        logger.warning("No evaluation finished, so no model was saved to %s", output_dir)
    else:
        logger.info(
            "Best %s %.4f at step %d; model in %s; %.1f s in total",
            task.main_metric,
            state.best_score,
            state.best_step,
            output_dir,
            metrics["wall_time_seconds"],
        )
    return TrainingResult(
        output_dir=output_dir,
        main_metric=task.main_metric,
        best_score=state.best_score,
        best_step=state.best_step,
        initial_metrics=state.initial_evaluation["metrics"] if state.initial_evaluation else None,
        interrupted=state.interrupted,
        metrics=metrics,
    )


def _model_reference(model: str) -> str:
    """Return an absolute path for a local model folder, or the hub id unchanged."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


class _MetricsReport:
    """Builds the ``metrics.json`` content from the fixed facts of a run and its state."""

    def __init__(
        self,
        options: TrainOptions,
        task: TaskSpec,
        method_model: MethodModel,
        device: torch.device,
        started: float,
        train_examples: int,
        eval_examples: int,
    ) -> None:
        self.options = options
        self.task = task
        self.device = device
        self.started = started
        self.trainable, self.total = method_model.parameter_counts()
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.environment = environment_info(device)

    def build(self, state: TrainingState) -> dict[str, Any]:
        best = state.best_record
        throughput = state.samples_seen / state.train_seconds if state.train_seconds > 0 else None
        return {
            "task": self.task.name,
            "method": self.options.method,
            "metric": self.task.main_metric,
            "metric_names": list(self.task.metrics),
            "problem_type": self.task.problem_type,
            "best_score": state.best_score,
            "best_step": state.best_step,
            "best_epoch": best["epoch"] if best else None,
            "best_metrics": best["metrics"] if best else None,
            "initial_evaluation": state.initial_evaluation,
            "history": state.history,
            "interrupted": state.interrupted,
            "global_step": state.global_step,
            "total_steps": state.total_steps,
            "epochs_completed": state.epoch,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "parameters": {
                "trainable": self.trainable,
                "total": self.total,
                "trainable_percent": 100 * self.trainable / self.total,
            },
            "wall_time_seconds": time.perf_counter() - self.started,
            "train_seconds": state.train_seconds,
            "train_samples_per_second": throughput,
            "peak_memory": peak_memory(self.device),
            "seed": self.options.seed,
            **self.environment,
        }
