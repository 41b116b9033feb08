"""AdamW with separate learning rates for adapter and head, and the linear schedule.

Parameters fall into four groups: adapter (or backbone, for full fine-tuning) and head,
each with and without weight decay. One-dimensional parameters get no weight decay:
biases, LayerNorm weights and KaSA's singular values ``lora_diag``, since decaying them
shrinks scales and offsets rather than limiting the weights' size.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from kasa_peft.training.methods import MethodModel


def parameter_groups(
    method_model: MethodModel, learning_rate: float, head_learning_rate: float, weight_decay: float
) -> list[dict]:
    """Return AdamW parameter groups; each carries a ``name`` for logging.

    Raises ``ValueError`` when the model has no trainable parameter.
    """
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (False, True): [],
        (False, False): [],
        (True, True): [],
        (True, False): [],
    }
    for name, parameter in method_model.trainable_parameters():
        is_head = method_model.is_head_parameter(name)
        decays = parameter.dim() > 1
        buckets[(is_head, decays)].append(parameter)
    groups = []
    for (is_head, decays), parameters in buckets.items():
        if not parameters:
            continue
        groups.append(
            {
                "name": f"{'head' if is_head else 'adapter'}{'' if decays else ' (no decay)'}",
                "params": parameters,
                "lr": head_learning_rate if is_head else learning_rate,
                "weight_decay": weight_decay if decays else 0.0,
            }
        )
    if not groups:
        raise ValueError(f"the {method_model.method} model has no trainable parameter; check target_modules.")
    return groups


def build_optimizer(
    method_model: MethodModel, learning_rate: float, head_learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters, grouped by ``parameter_groups``."""
    return torch.optim.AdamW(parameter_groups(method_model, learning_rate, head_learning_rate, weight_decay))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Return the number of warmup steps: ``ceil(warmup_ratio * total_steps)``."""
    return math.ceil(warmup_ratio * total_steps)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Return a schedule that rises linearly to each group's rate, then falls linearly to 0.

    The factor at optimizer step ``s`` is ``s / warmup_steps`` during warmup and
    ``(total_steps - s) / (total_steps - warmup_steps)`` after it.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        remaining = total_steps - warmup_steps
        if remaining <= 0:
            return 0.0
        return max(0.0, (total_steps - step) / remaining)

    return LambdaLR(optimizer, factor)
