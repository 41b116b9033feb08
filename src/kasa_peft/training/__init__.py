"""Fine-tuning sequence classifiers with KaSA and baseline methods (``kasa-peft train``).

This layer builds on the core adapter (``kasa_peft.model``) and the data layer
(``kasa_peft.data``); the core never imports it. Modules:

- ``options``: ``TrainOptions`` and merging a YAML/JSON config file with command-line values;
- ``models``: loading base models and tokenizers, finding the task head, the device;
- ``methods``: preparing, saving and loading the model for each method;
- ``optimization``: AdamW parameter groups and the linear warmup/decay schedule;
- ``loop``: the training loop and its state;
- ``evaluation``: metrics over a data set;
- ``artifacts``: the files of an output folder;
- ``runner``: one complete training run (``train``);
- ``predictor``: loading a trained model folder for evaluation and prediction;
- ``demo``: the bundled demo run.
"""

from kasa_peft.training.options import OptionsError, TrainOptions, merge_options, read_config_file
from kasa_peft.training.runner import TrainingResult, train

__all__ = ["OptionsError", "TrainOptions", "TrainingResult", "merge_options", "read_config_file", "train"]
