"""Data loading, label mapping, tokenization and batching for kasa-peft training.

The package has one module per step:

- ``tasks``: ``TaskSpec`` and the presets (GLUE tasks, the bundled demo, custom files);
- ``files``: reading TSV, CSV and JSON Lines files into ``TextExamples``;
- ``sampling``: the seeded subset behind ``max_train_samples`` and ``max_eval_samples``;
- ``labels``: ``LabelMapping`` between classification labels and class ids;
- ``encoding``: up-front tokenization (``encode_examples``) and dynamic padding
  (``PaddingCollator``);
- ``errors``: ``DataError`` and its subclasses.

A training run typically does::

    from torch.utils.data import DataLoader
    from kasa_peft.data import PaddingCollator, encode_examples, get_task
    from kasa_peft.metrics import compute_metrics

    task = get_task("mrpc", data_dir="path/to/glue")
    train = task.load_split("train", max_samples=1000, seed=42)
    validation = task.load_split("validation")
    mapping = task.build_label_mapping(train)  # None for regression; save it with the adapter
    train_set = encode_examples(train, tokenizer, max_length=128, label_mapping=mapping)
    loader = DataLoader(train_set, batch_size=32, shuffle=True,
                        collate_fn=PaddingCollator.from_tokenizer(tokenizer))
    ...
    scores = compute_metrics(task.metrics, predictions, references)
    best = scores[task.main_metric]

This layer imports torch and uses a transformers tokenizer passed in by the caller.
It does not depend on the adapter modules.
"""

from kasa_peft.data.encoding import EncodedDataset, PaddingCollator, encode_examples
from kasa_peft.data.errors import DataError, DataFileNotFoundError, MissingColumnError, UnknownLabelError
from kasa_peft.data.files import (
    FILE_FORMATS,
    FileFormat,
    ProblemType,
    Table,
    TextExamples,
    detect_file_format,
    read_examples,
    read_table,
)
from kasa_peft.data.labels import LabelMapping, normalize_label, parse_regression_label
from kasa_peft.data.sampling import sample_indices
from kasa_peft.data.tasks import (
    GLUE_TASK_NAMES,
    SPLITS,
    TASK_NAMES,
    Split,
    TaskSpec,
    demo_task,
    file_task,
    get_task,
    glue_task,
)

__all__ = [
    "FILE_FORMATS",
    "GLUE_TASK_NAMES",
    "SPLITS",
    "TASK_NAMES",
    "DataError",
    "DataFileNotFoundError",
    "MissingColumnError",
    "EncodedDataset",
    "FileFormat",
    "LabelMapping",
    "PaddingCollator",
    "ProblemType",
    "Split",
    "Table",
    "TaskSpec",
    "TextExamples",
    "UnknownLabelError",
    "demo_task",
    "detect_file_format",
    "encode_examples",
    "file_task",
    "get_task",
    "glue_task",
    "normalize_label",
    "parse_regression_label",
    "read_examples",
    "read_table",
    "sample_indices",
]
