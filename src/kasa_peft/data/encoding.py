"""Tokenization and batching for sequence classification and regression.

``encode_examples`` tokenizes every example once, up front, with one batched call to a
(preferably fast) transformers tokenizer. Texts are truncated to ``max_length``
tokens including special tokens, and sentence pairs are encoded as pairs, so the
tokenizer inserts its separator and token type ids and truncates the longer text
first. Nothing is padded at this stage.

``PaddingCollator`` pads each batch to its longest example (dynamic padding) and
builds the attention mask, for use as a ``torch.utils.data.DataLoader`` ``collate_fn``::

    dataset = encode_examples(train, tokenizer, max_length=128, label_mapping=mapping)
    loader = DataLoader(dataset, batch_size=32, shuffle=True,
                        collate_fn=PaddingCollator.from_tokenizer(tokenizer))

A batch is a dict of tensors: ``input_ids`` and ``attention_mask`` (int64, shape
``(batch, length)``), ``token_type_ids`` when the tokenizer produces them, and
``labels`` when the examples have labels (int64 class ids for classification, float32
for regression, shape ``(batch,)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from kasa_peft.data.errors import DataError, UnknownLabelError
from kasa_peft.data.files import TextExamples
from kasa_peft.data.labels import LabelMapping

logger = logging.getLogger(__name__)

# Rows per tokenizer call. Each call is one batch for the fast tokenizer's Rust code;
# the chunking only bounds peak memory and gives progress messages for large files.
TOKENIZE_CHUNK_SIZE = 8192


class EncodedDataset(Dataset):
    """Token ids and labels of encoded examples; item ``i`` is a dict of Python lists.

    Items contain ``input_ids``, plus ``token_type_ids`` if the tokenizer produced
    them and ``labels`` (an int class id or a float) if the examples were labelled.
    """

    def __init__(
        self,
        input_ids: list[list[int]],
        token_type_ids: list[list[int]] | None = None,
        labels: list[int] | list[float] | None = None,
    ) -> None:
        for name, values in (("token_type_ids", token_type_ids), ("labels", labels)):
            if values is not None and len(values) != len(input_ids):
                raise ValueError(f"{name} has {len(values)} entries but input_ids has {len(input_ids)}")
        self.input_ids = input_ids
        self.token_type_ids = token_type_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[index]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[index]
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    @property
    def has_labels(self) -> bool:
        """Whether items contain ``labels``."""
        return self.labels is not None


def _encode_labels(examples: TextExamples, label_mapping: LabelMapping | None) -> list[int] | list[float] | None:
    if examples.labels is None:
        return None
    if examples.problem_type == "regression":
        return [float(label) for label in examples.labels]
    if label_mapping is None:
        raise DataError(
            f"examples from {examples.source} are classification examples; pass the label_mapping "
            "(from TaskSpec.build_label_mapping or LabelMapping.load) to encode their labels"
        )

    ids = []
    for index, label in enumerate(examples.labels):
        try:
            ids.append(label_mapping.encode(label))
        except UnknownLabelError as error:
            raise UnknownLabelError(f"{examples.location(index)}: {error}") from None
    return ids


def encode_examples(
    examples: TextExamples,
    tokenizer: Any,
    *,
    max_length: int,
    label_mapping: LabelMapping | None = None,
) -> EncodedDataset:
    """Tokenize examples with truncation to ``max_length`` tokens, without padding.

    ``tokenizer`` is a transformers tokenizer; a slow (Python) tokenizer works but
    logs a warning because it is much slower. ``label_mapping`` is required for
    labelled classification examples and ignored otherwise. Raises
    ``UnknownLabelError`` naming the file, line and label for a label that the mapping
    does not contain, and ``ValueError`` for an invalid ``max_length``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is invalid: expected an integer of at least 2 tokens")
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and max_length > model_max_length:
        logger.warning(
            "max_length=%d exceeds the tokenizer's model_max_length=%d; the model may not accept sequences this long",
            max_length,
            model_max_length,
        )
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("Tokenizer %s is not a fast tokenizer; tokenization will be slow", type(tokenizer).__name__)

    labels = _encode_labels(examples, label_mapping)

    input_ids: list[list[int]] = []
    token_type_ids: list[list[int]] | None = []
    total = len(examples)
    for start in range(0, total, TOKENIZE_CHUNK_SIZE):
        end = min(start + TOKENIZE_CHUNK_SIZE, total)
        texts = examples.texts[start:end]
        pairs = examples.text_pairs[start:end] if examples.text_pairs is not None else None
        encoding = tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        input_ids.extend(encoding["input_ids"])
        if token_type_ids is not None and "token_type_ids" in encoding:
            token_type_ids.extend(encoding["token_type_ids"])
        else:
            token_type_ids = None
        if total > TOKENIZE_CHUNK_SIZE:
            logger.info("Tokenized %d of %d examples from %s", end, total, examples.source)

    return EncodedDataset(input_ids, token_type_ids, labels)


@dataclass(frozen=True)
class PaddingCollator:
    """Collate function that pads a batch to its longest sequence.

    ``input_ids`` are padded with ``pad_token_id``, ``token_type_ids`` with 0, and the
    attention mask is 1 on real tokens and 0 on padding. ``padding_side`` is
    ``"right"`` or ``"left"``. With ``pad_to_multiple_of`` set, the padded length is
    rounded up to a multiple of it, which can help tensor cores on GPUs.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r} is invalid: expected 'right' or 'left'")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: expected a positive integer")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
        """Build a collator with the tokenizer's pad token id and padding side.

        Raises ``ValueError`` if the tokenizer has no pad token, which is the case
        for GPT-2 style tokenizers. Set ``tokenizer.pad_token`` (for example to the EOS token)
        and the model's ``config.pad_token_id`` before calling this.
        """
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token "
                "(for example tokenizer.pad_token = tokenizer.eos_token) and the model's config.pad_token_id"
            )
        padding_side = getattr(tokenizer, "padding_side", "right")
        return cls(int(pad_token_id), padding_side, pad_to_multiple_of)

    def _pad(self, sequences: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
        padded = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if not sequence:
                continue
            values = torch.tensor(sequence, dtype=torch.long)
            if self.padding_side == "right":
                padded[row, : len(sequence)] = values
            else:
                padded[row, length - len(sequence) :] = values
        return padded

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(feature["input_ids"]) for feature in features]
        length = max(lengths)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = {
            "input_ids": self._pad([feature["input_ids"] for feature in features], length, self.pad_token_id),
            "attention_mask": self._pad([[1] * size for size in lengths], length, 0),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = self._pad([feature["token_type_ids"] for feature in features], length, 0)
        if "labels" in features[0]:
            labels = [feature["labels"] for feature in features]
            dtype = torch.float32 if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch
