"""The training loop: optimisation, periodic evaluation, best-checkpoint tracking, Ctrl-C.

``Trainer.train`` runs the loop and returns its ``TrainingState``. Everything a resumed
run would need (counters, optimizer, scheduler, random generators and the evaluation
history) lives in that one object, and ``TrainingState.state_dict`` gathers it. Resuming
itself is not implemented.

Steps count optimizer updates. With gradient accumulation, a step covers
``gradient_accumulation_steps`` batches, and the last step of an epoch covers whatever
batches remain. The loss of each batch is the task loss returned by the model plus the
method's regularizer (``MethodModel.regularization_loss``), and the log reports both
separately.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from kasa_peft.training.evaluation import EvaluationResult, move_batch
from kasa_peft.training.methods import MethodModel
from kasa_peft.training.optimization import build_optimizer, linear_schedule, warmup_steps_for

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """The loop's share of ``TrainOptions``; see there for the meaning of each value."""

    epochs: int
    max_steps: int | None
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    head_learning_rate: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    eval_steps: int | None
    logging_steps: int
    seed: int
    evaluate_before_training: bool = False


@dataclass
class TrainingState:
    """Mutable state of one run: counters, optimizer, schedule, generators and history.

    ``history`` contains one record per evaluation (see ``Trainer._evaluate``), and
    ``initial_evaluation`` the record made before the first step, if any. ``epoch``
    counts completed epochs.
    """

    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    data_generator: torch.Generator
    total_steps: int
    steps_per_epoch: int
    global_step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    best_score: float | None = None
    best_step: int | None = None
    best_record: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_evaluation: dict[str, Any] | None = None
    interrupted: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue this run later, as a picklable dict."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "total_steps": self.total_steps,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "history": list(self.history),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(self.data_generator),
        }


def capture_rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    """Return the states of Python's, NumPy's, torch's and the data loader's generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "data_loader": data_generator.get_state(),
    }
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global generators."""
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


class _LossWindow:
    """Sums of task loss and regularizer over the batches since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.task_loss = 0.0
        self.regularization = 0.0
        self.batches = 0

    def add(self, task_loss: float, regularization: float) -> None:
        self.task_loss += task_loss
        self.regularization += regularization
        self.batches += 1

    def means(self) -> tuple[float | None, float | None]:
        if self.batches == 0:
            return None, None
        return self.task_loss / self.batches, self.regularization / self.batches


class Trainer:
    """Trains a ``MethodModel`` on a data set and evaluates it as configured.

    Args:
        method_model: the model and its method-specific behaviour.
        train_dataset: items collated by ``collate_fn`` into batches with ``labels``.
        collate_fn: the DataLoader collate function (dynamic padding).
        evaluate_fn: evaluates the model on the validation set.
        main_metric: the metric that decides the best checkpoint (higher is better).
        settings: loop settings.
        device: where the model and batches live.
        save_checkpoint: called with the state when an evaluation beats the best score,
            before the state records the new best, so that an interrupted save leaves
            the state describing the checkpoint that is still on disk.
        on_evaluation: called with the state after each evaluation and checkpoint.
        show_progress: tqdm's ``disable`` inverted, None shows the bar only on a terminal.
    """

    def __init__(
        self,
        method_model: MethodModel,
        train_dataset: Dataset,
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        evaluate_fn: Callable[[], EvaluationResult],
        main_metric: str,
        settings: LoopSettings,
        device: torch.device,
        save_checkpoint: Callable[[TrainingState], None] | None = None,
        on_evaluation: Callable[[TrainingState], None] | None = None,
        show_progress: bool | None = None,
    ) -> None:
        self.method_model = method_model
        self.model = method_model.module
        self.evaluate_fn = evaluate_fn
        self.main_metric = main_metric
        self.settings = settings
        self.device = device
        self.save_checkpoint = save_checkpoint
        self.on_evaluation = on_evaluation
        self.show_progress = show_progress

        generator = torch.Generator()
        generator.manual_seed(settings.seed)
        self.loader = DataLoader(
            train_dataset, batch_size=settings.batch_size, shuffle=True, generator=generator, collate_fn=collate_fn
        )
        batches_per_epoch = len(self.loader)
        if batches_per_epoch == 0:
            raise ValueError("the training set is empty; add examples to the training file.")
        steps_per_epoch = math.ceil(batches_per_epoch / settings.gradient_accumulation_steps)
        total_steps = settings.max_steps if settings.max_steps is not None else settings.epochs * steps_per_epoch

        optimizer = build_optimizer(method_model, settings.learning_rate, settings.head_learning_rate, settings.weight_decay)
        warmup_steps = warmup_steps_for(total_steps, settings.warmup_ratio)
        scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
        self.state = TrainingState(
            optimizer=optimizer,
            scheduler=scheduler,
            data_generator=generator,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
        self._trainable = [parameter for _, parameter in method_model.trainable_parameters()]
        self._log_window = _LossWindow()
        self._eval_window = _LossWindow()
        self._last_evaluated_step: int | None = None
        self._progress: Any = None
        for group in optimizer.param_groups:
            logger.info(
                "Parameter group %s: %d tensors, lr %.3g, weight decay %g",
                group["name"],
                len(group["params"]),
                group["initial_lr"],
                group["weight_decay"],
            )
        logger.info(
            "Training for %d steps (%d per epoch, %d batches of %d, gradient accumulation %d, warmup %d steps)",
            total_steps,
            steps_per_epoch,
            batches_per_epoch,
            settings.batch_size,
            settings.gradient_accumulation_steps,
            warmup_steps,
        )

    # ----- the loop -----------------------------------------------------------------------

    def train(self) -> TrainingState:
        """Run the loop until the last step or Ctrl-C; return the final state.

        A ``KeyboardInterrupt`` stops the loop, sets ``state.interrupted`` and returns
        normally; the best checkpoint saved so far stays as it is.
        """
        from tqdm.auto import tqdm

        state = self.state
        self.model.to(self.device)
        try:
            if self.settings.evaluate_before_training:
                state.initial_evaluation = self._evaluate(initial=True)
            self._progress = tqdm(
                total=state.total_steps, desc="training", unit="step", disable=self._progress_disabled(), dynamic_ncols=True
            )
            while state.global_step < state.total_steps:
                finished_epoch = self._run_epoch()
                if finished_epoch:
                    state.epoch += 1
                    if self.settings.eval_steps is None:
                        self._evaluate()
            if self._last_evaluated_step != state.global_step:
                self._evaluate()
        except KeyboardInterrupt:
            state.interrupted = True
            logger.warning(
                "Interrupted at step %d of %d; the best checkpoint so far is kept (step %s).",
                state.global_step,
                state.total_steps,
                state.best_step,
            )
        finally:
            if self._progress is not None:
                self._progress.close()
        return state

    def _progress_disabled(self) -> bool | None:
        if self.show_progress is None:
            return None
        return not self.show_progress

    def _run_epoch(self) -> bool:
        """Run the batches of one epoch; return False when training ends inside the epoch."""
        state = self.state
        accumulation = self.settings.gradient_accumulation_steps
        batches_per_epoch = len(self.loader)
        self.model.train()
        window_size = 0
        window_done = 0
        started = time.perf_counter()
        for batch_index, batch in enumerate(self.loader):
            if window_done == 0:
                window_size = min(accumulation, batches_per_epoch - batch_index)
            self._train_batch(batch, window_size)
            window_done += 1
            if window_done < window_size:
                continue
            window_done = 0
            self._optimizer_step()
            state.train_seconds += time.perf_counter() - started
            self._after_step()
            started = time.perf_counter()
            if state.global_step >= state.total_steps:
                return batch_index == batches_per_epoch - 1
        return True

    def _train_batch(self, batch: dict[str, torch.Tensor], window_size: int) -> None:
        batch = move_batch(batch, self.device)
        output = self.model(**batch)
        task_loss = output.loss
        regularization = self.method_model.regularization_loss()
        loss = task_loss if regularization is None else task_loss + regularization
        (loss / window_size).backward()
        regularization_value = regularization.detach().item() if regularization is not None else 0.0
        task_loss_value = task_loss.detach().item()
        self._log_window.add(task_loss_value, regularization_value)
        self._eval_window.add(task_loss_value, regularization_value)
        self.state.samples_seen += int(batch["input_ids"].shape[0])

    def _optimizer_step(self) -> None:
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.settings.max_grad_norm)
        self.state.optimizer.step()
        self.state.scheduler.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    def _after_step(self) -> None:
        state = self.state
        task_loss, regularization = self._log_window.means()
        throughput = state.samples_seen / state.train_seconds if state.train_seconds > 0 else 0.0
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(
                loss=f"{task_loss:.4f}", lr=f"{self.current_learning_rate():.2e}", samples_per_s=f"{throughput:.1f}"
            )
        if state.global_step % self.settings.logging_steps == 0 or state.global_step == state.total_steps:
            logger.info(
                "step %d/%d epoch %.2f: task loss %.4f, regularizer %.6f, lr %.3e, %.1f samples/s",
                state.global_step,
                state.total_steps,
                self.fractional_epoch(),
                task_loss,
                regularization,
                self.current_learning_rate(),
                throughput,
            )
            self._log_window.reset()
        if self.settings.eval_steps is not None and state.global_step % self.settings.eval_steps == 0:
            self._evaluate()

    # ----- evaluation and bookkeeping ----------------------------------------------------

    def current_learning_rate(self) -> float:
        """Return the learning rate of the first parameter group (the adapter's, when present)."""
        return float(self.state.optimizer.param_groups[0]["lr"])

    def fractional_epoch(self) -> float:
        """Return the training progress in epochs, ``global_step / steps_per_epoch``."""
        return self.state.global_step / self.state.steps_per_epoch

    def _evaluate(self, initial: bool = False) -> dict[str, Any]:
        state = self.state
        result = self.evaluate_fn()
        task_loss, regularization = self._eval_window.means()
        self._eval_window.reset()
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": round(self.fractional_epoch(), 4),
            "metrics": result.metrics,
            "eval_loss": result.loss,
            "task_loss": task_loss,
            "regularization_loss": regularization,
            "learning_rate": self.current_learning_rate(),
        }
        score = result.metrics[self.main_metric]
        metrics_text = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
        if initial:
            logger.info("Evaluation before training (%d examples): %s", result.num_examples, metrics_text)
            return record

        self._last_evaluated_step = state.global_step
        improved = state.best_score is None or score > state.best_score
        state.history.append(record)
        logger.info(
            "Evaluation at step %d (epoch %.2f, %d examples): %s%s",
            state.global_step,
            self.fractional_epoch(),
            result.num_examples,
            metrics_text,
            " (new best)" if improved else f" (best {self.main_metric} {state.best_score:.4f} at step {state.best_step})",
        )
        if improved:
            if self.save_checkpoint is not None:
                self.save_checkpoint(state)
            state.best_score = score
            state.best_step = state.global_step
            state.best_record = record
        if self.on_evaluation is not None:
            self.on_evaluation(state)
        return record
