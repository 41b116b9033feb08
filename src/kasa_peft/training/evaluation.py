"""Running a model over a data set: logits, predictions and task metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kasa_peft.metrics import compute_metrics


@dataclass
class Outputs:
    """Logits of every example in data-set order, and the mean loss when labels were given."""

    logits: torch.Tensor
    labels: torch.Tensor | None
    loss: float | None


@dataclass
class EvaluationResult:
    """Task metrics of one evaluation, the mean evaluation loss and the example count."""

    metrics: dict[str, float]
    loss: float | None
    num_examples: int


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Return the batch with every tensor on ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def collect_outputs(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device) -> Outputs:
    """Run ``model`` in eval mode over ``batches`` and gather logits (float32, on CPU).

    The model's train/eval mode is restored afterwards. The loss is the mean over
    examples of each batch's mean loss, weighted by batch size.
    """
    was_training = model.training
    model.eval()
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    loss_sum = 0.0
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            output = model(**batch)
            logits.append(output.logits.detach().float().cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
                loss_sum += float(output.loss) * batch["labels"].shape[0]
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("no batches to evaluate: the data set is empty.")
    all_logits = torch.cat(logits)
    all_labels = torch.cat(labels) if labels else None
    loss = loss_sum / all_labels.shape[0] if all_labels is not None else None
    return Outputs(all_logits, all_labels, loss)


def predictions_from_logits(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Return class ids (argmax) for classification, or the single output for regression."""
    if problem_type == "regression":
        return logits[:, 0]
    return logits.argmax(dim=-1)


def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
    problem_type: str,
    metric_names: Iterable[str],
) -> EvaluationResult:
    """Compute ``metric_names`` of ``model`` on labelled ``batches``.

    Raises ``ValueError`` when the batches carry no labels.
    """
    outputs = collect_outputs(model, batches, device)
    if outputs.labels is None:
        raise ValueError("the evaluation data has no labels; evaluation needs a label column.")
    predictions = predictions_from_logits(outputs.logits, problem_type)
    metrics = compute_metrics(metric_names, predictions, outputs.labels)
    return EvaluationResult(metrics=metrics, loss=outputs.loss, num_examples=int(outputs.labels.shape[0]))
