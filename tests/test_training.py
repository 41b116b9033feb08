"""Training internals: options, schedule, parameter groups, the loop, saving and loading per method.

The models are tiny BERT classifiers built in memory (hidden size 32, 2 layers, vocabulary
of 64 ids, dropout off) on synthetic token data, so every test runs in a second or two.
End-to-end runs through the command line are in ``test_cli.py``.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from kasa_peft.training.evaluation import EvaluationResult, collect_outputs, evaluate
from kasa_peft.training.loop import LoopSettings, Trainer, set_seed
from kasa_peft.training.methods import (
    METHODS,
    PEFT_METHODS,
    AdapterSettings,
    MethodModel,
    build_method_model,
    load_trained_model,
)
from kasa_peft.training.models import find_head_modules
from kasa_peft.training.optimization import linear_schedule, parameter_groups, warmup_steps_for
from kasa_peft.training.options import OptionsError, TrainOptions, merge_options, read_config_file

VOCAB_SIZE = 64
SEQUENCE_LENGTH = 8


def tiny_bert(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


class TokenDataset(Dataset):
    """Fixed-length random token sequences; the label is whether the first token id is >= 32."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB_SIZE, (size, SEQUENCE_LENGTH), generator=generator)
        self.labels = (self.input_ids[:, 0] >= VOCAB_SIZE // 2).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([item["input_ids"] for item in items])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.stack([item["labels"] for item in items]),
    }


def settings(**overrides) -> LoopSettings:
    values = dict(
        epochs=2,
        max_steps=None,
        batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        head_learning_rate=1e-2,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        eval_steps=None,
        logging_steps=100,
        seed=0,
    )
    values.update(overrides)
    return LoopSettings(**values)


def make_trainer(method: str = "kasa", model_seed: int = 0, data_size: int = 32, **loop_overrides) -> Trainer:
    set_seed(0)
    method_model = build_method_model(method, tiny_bert(seed=model_seed), AdapterSettings(r=4, alpha=8.0))
    evaluation_data = [collate([TokenDataset(16, seed=1)[i] for i in range(16)])]

    def evaluate_fn() -> EvaluationResult:
        return evaluate(method_model.module, evaluation_data, torch.device("cpu"), "classification", ["accuracy"])

    return Trainer(
        method_model,
        TokenDataset(data_size, seed=0),
        collate,
        evaluate_fn,
        "accuracy",
        settings(**loop_overrides),
        torch.device("cpu"),
        show_progress=False,
    )


def trainable_snapshot(method_model: MethodModel) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in method_model.trainable_parameters()}


# ----- options ---------------------------------------------------------------------------


def test_options_file_then_command_line(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning-rate: 1e-4\nr: 4\ntarget_modules: query,value\nbatch_size: 16\n", encoding="utf-8")
    file_values = read_config_file(config)
    options = merge_options(file_values, {"r": 2})
    assert options.learning_rate == 1e-4  # PyYAML reads "1e-4" as a string; it must become a float
    assert options.r == 2
    assert options.target_modules == ["query", "value"]
    assert options.batch_size == 16
    assert options.epochs == TrainOptions().epochs


def test_options_unknown_key_named(tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"learning_rate": 1e-4, "lerning_rate": 1e-3}), encoding="utf-8")
    with pytest.raises(OptionsError, match="unknown option 'lerning_rate'"):
        read_config_file(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"r": "eight"}', "r='eight' is invalid"),
        ('{"epochs": 2.5}', "epochs=2.5 is invalid"),
        ('{"evaluate_before_training": "yes"}', "expected true or false"),
        ('[1, 2]', "must contain a mapping"),
        ('{"r": 8,', "not valid JSON"),
    ],
)
def test_options_file_value_errors(tmp_path, text, message):
    config = tmp_path / "train.json"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(OptionsError, match=message):
        read_config_file(config)


def test_options_config_extension_and_missing(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text("r = 8\n", encoding="utf-8")
    with pytest.raises(OptionsError, match="extension '.toml'"):
        read_config_file(config)
    with pytest.raises(OptionsError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"task": "rte", "train_file": "a.tsv"}, "either --task"),
        ({"train_file": "a.tsv"}, "no validation data"),
        ({}, "no training data"),
        ({"train_file": "a.tsv", "validation_file": "b.tsv", "text_column": ["a", "b", "c"]}, "names 3 columns"),
        ({"task": "rte", "text_column": ["a"]}, "presets fix their columns"),
        ({"train_file": "a.tsv", "validation_file": "b.tsv", "data_dir": "x"}, "only applies to --task"),
        ({"task": "rte", "method": "adapterx"}, "method 'adapterx' is unknown"),
        ({"task": "rte", "batch_size": 0}, "batch_size=0 is invalid"),
        ({"task": "rte", "warmup_ratio": 1.0}, "warmup_ratio=1.0 is invalid"),
        ({"task": "rte", "learning_rate": -1.0}, "learning_rate=-1.0 is invalid"),
        ({"task": "rte", "truncation_method": "fast"}, "truncation_method 'fast' is unknown"),
        ({"task": "rte", "method": "lora", "truncation_cache": "tc"}, "remove --truncation-cache"),
        ({"task": "rte", "method": "full", "truncation_method": "exact"}, "remove --truncation-method"),
        ({"task": "rte", "truncation_cache": " "}, "truncation_cache is empty"),
    ],
)
def test_options_validate_rejects(values, message):
    options = TrainOptions(output_dir="out", model="unused", **values)
    with pytest.raises(OptionsError, match=message):
        options.resolved().validate()


def test_options_resolved_learning_rates():
    adapter = TrainOptions(model="m").resolved()
    full = TrainOptions(model="m", method="full").resolved()
    explicit = TrainOptions(model="m", learning_rate=1e-3, head_learning_rate=2e-3).resolved()
    assert adapter.learning_rate == 5e-4
    assert adapter.head_learning_rate == 5e-4
    assert full.learning_rate == 3e-5
    assert explicit.learning_rate == 1e-3
    assert explicit.head_learning_rate == 2e-3
    assert adapter.text_column == ["text"]


# ----- schedule and parameter groups ---------------------------------------------------


def test_linear_schedule_matches_formula():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    total, warmup = 10, warmup_steps_for(10, 0.25)
    scheduler = linear_schedule(optimizer, warmup, total)
    observed = []
    for _ in range(total + 1):
        observed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Hand-computed: warmup = ceil(2.5) = 3 steps rising by 1/3, then 7 steps falling to 0.
    expected = [0.5 * f for f in (0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0)]
    assert warmup == 3
    assert observed == pytest.approx(expected, abs=1e-12)


def test_parameter_groups_split_head_and_decay():
    method_model = build_method_model("kasa", tiny_bert(), AdapterSettings(r=4))
    groups = {group["name"]: group for group in parameter_groups(method_model, 1e-3, 5e-3, 0.1)}
    assert set(groups) == {"adapter", "adapter (no decay)", "head", "head (no decay)"}
    assert groups["adapter"]["lr"] == 1e-3
    assert groups["head"]["lr"] == 5e-3
    assert groups["adapter"]["weight_decay"] == 0.1
    assert groups["adapter (no decay)"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["adapter (no decay)"]["params"])  # the singular values d
    assert all(p.dim() > 1 for p in groups["adapter"]["params"])
    grouped = sum(len(group["params"]) for group in groups.values())
    assert grouped == len(list(method_model.trainable_parameters()))
    head_shapes = sorted(tuple(p.shape) for p in groups["head"]["params"] + groups["head (no decay)"]["params"])
    assert head_shapes == [(2,), (2, 32)]


def test_head_modules_of_model_families():
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    distilbert = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=8)
    )
    assert find_head_modules(tiny_bert()) == ["classifier"]
    assert find_head_modules(gpt2) == ["score"]
    assert find_head_modules(distilbert) == ["pre_classifier", "classifier"]
    with pytest.raises(ValueError, match="cannot find the task head"):
        find_head_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ----- the loop ----------------------------------------------------------------------------


def test_loop_adds_regularizer_to_gradient(monkeypatch):
    trainer = make_trainer("kasa", max_steps=1)
    kasa_model = trainer.method_model.kasa_model
    captured = {}

    def capture_gradients(self):
        captured.update({name: p.grad.detach().clone() for name, p in self.method_model.trainable_parameters()})
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_optimizer_step", capture_gradients)
    first_batch = next(iter(trainer.loader))
    trainer.state.data_generator.manual_seed(0)  # replay the same first batch inside train()
    trainer.train()

    kasa_model.zero_grad()
    loss = kasa_model(**first_batch).loss + kasa_model.regularization_loss()
    loss.backward()
    for name, parameter in trainer.method_model.trainable_parameters():
        # Same float32 graph on the same batch; only summation order may differ.
        torch.testing.assert_close(captured[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any("lora_diag" in name for name in captured), "the KaSA singular values must receive gradients"


def test_loop_accumulation_matches_large_batch():
    # One step over 8 examples equals one step over two accumulated batches of 4, because
    # the sampler draws the same permutation and each half-batch loss is scaled by 1/2.
    large = make_trainer("lora", max_steps=1, batch_size=8)
    accumulated = make_trainer("lora", max_steps=1, batch_size=4, gradient_accumulation_steps=2)
    large.train()
    accumulated.train()
    large_parameters = trainable_snapshot(large.method_model)
    accumulated_parameters = trainable_snapshot(accumulated.method_model)
    for name, value in large_parameters.items():
        torch.testing.assert_close(accumulated_parameters[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert accumulated.state.global_step == 1
    assert accumulated.state.samples_seen == 8


def test_loop_partial_accumulation_at_epoch_end():
    # 20 examples in batches of 8: 3 batches per epoch, accumulation 2 -> steps of 2 and 1 batches.
    trainer = make_trainer("kasa", data_size=20, epochs=2, gradient_accumulation_steps=2)
    state = trainer.train()
    assert state.steps_per_epoch == 2
    assert state.total_steps == 4
    assert state.global_step == 4
    assert state.samples_seen == 40
    assert [record["step"] for record in state.history] == [2, 4]
    assert [record["epoch"] for record in state.history] == [1.0, 2.0]


def test_loop_eval_steps_and_final_evaluation():
    trainer = make_trainer("kasa", max_steps=5, eval_steps=2)
    state = trainer.train()
    assert [record["step"] for record in state.history] == [2, 4, 5]
    assert state.epoch == 1  # 4 steps per epoch, so step 5 is inside the second epoch
    for record in state.history:
        assert record["task_loss"] is not None
        assert record["regularization_loss"] > 0
        assert set(record["metrics"]) == {"accuracy"}


def test_loop_same_seed_same_result():
    first = make_trainer("kasa", epochs=2)
    second = make_trainer("kasa", epochs=2)
    first_state = first.train()
    second_state = second.train()
    assert first_state.history == second_state.history
    for name, value in trainable_snapshot(first.method_model).items():
        assert torch.equal(trainable_snapshot(second.method_model)[name], value), name


def test_loop_interrupt_keeps_best(monkeypatch):
    trainer = make_trainer("kasa", max_steps=8, eval_steps=2)
    saved_steps = []
    trainer.save_checkpoint = lambda state: saved_steps.append(state.global_step)
    original_step = Trainer._optimizer_step

    def step_then_interrupt(self):
        if self.state.global_step == 5:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_interrupt)
    state = trainer.train()
    assert state.interrupted
    assert state.global_step == 5
    assert [record["step"] for record in state.history] == [2, 4]
    assert state.best_step in (2, 4)
    assert saved_steps[-1] == state.best_step


def test_loop_interrupted_save_keeps_previous_best():
    trainer = make_trainer("kasa", max_steps=6, eval_steps=2)
    saved_steps = []

    def save_or_interrupt(state):
        if saved_steps:
            raise KeyboardInterrupt  # the second save is cut off
        saved_steps.append(state.global_step)

    trainer.save_checkpoint = save_or_interrupt
    # Force every evaluation to improve, so that the second one tries to save.
    scores = iter([0.1, 0.2, 0.3])
    trainer.evaluate_fn = lambda: EvaluationResult(metrics={"accuracy": next(scores)}, loss=0.5, num_examples=4)
    state = trainer.train()
    assert state.interrupted
    assert saved_steps == [2]
    assert state.best_step == 2
    assert state.best_score == 0.1


def test_loop_state_dict_contents():
    trainer = make_trainer("kasa", max_steps=2)
    trainer.train()
    state = trainer.state.state_dict()
    assert state["global_step"] == 2
    assert set(state) >= {"optimizer", "scheduler", "rng", "history", "best_score"}
    assert set(state["rng"]) >= {"python", "torch", "data_loader", "numpy"}
    assert state["scheduler"]["last_epoch"] == 2


def test_evaluate_matches_hand_count():
    class FixedLogits(torch.nn.Module):
        def forward(self, input_ids, labels=None, attention_mask=None):
            logits = torch.nn.functional.one_hot(input_ids[:, 0] % 3, 3).float()
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return type("Output", (), {"logits": logits, "loss": loss})()

    batches = [
        {"input_ids": torch.tensor([[0], [1], [2]]), "labels": torch.tensor([0, 1, 1])},
        {"input_ids": torch.tensor([[2], [0]]), "labels": torch.tensor([2, 1])},
    ]
    result = evaluate(FixedLogits(), batches, torch.device("cpu"), "classification", ["accuracy"])
    # Predictions 0,1,2,2,0 against 0,1,1,2,1: three of five correct.
    assert result.metrics == {"accuracy": 3 / 5}
    assert result.num_examples == 5
    expected_loss = torch.nn.functional.cross_entropy(
        torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2, 0]), 3).double(), torch.tensor([0, 1, 1, 2, 1])
    ).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)


# ----- saving and loading per method ----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_method_save_load_round_trip(tmp_path, method):
    if method in PEFT_METHODS:
        pytest.importorskip("peft")
    pristine = tiny_bert(seed=3)
    method_model = build_method_model(method, copy.deepcopy(pristine), AdapterSettings(r=4, alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in method_model.trainable_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    inputs = TokenDataset(4, seed=5).input_ids
    method_model.module.eval()
    with torch.no_grad():
        expected = method_model.module(input_ids=inputs).logits
    method_model.save(tmp_path)

    loaded = load_trained_model(method, tmp_path, lambda: copy.deepcopy(pristine))
    with torch.no_grad():
        actual = loaded(input_ids=inputs).logits
    # The same float32 computation on the same weights, up to the order of additions.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    assert not list(tmp_path.glob(".staging-*"))


def test_kasa_method_uses_truncation_settings(tmp_path):
    settings = AdapterSettings(r=4, truncation_method="exact", truncation_cache=str(tmp_path / "cache"))

    first = build_method_model("kasa", tiny_bert(), settings)
    second = build_method_model("kasa", tiny_bert(), settings)

    assert first.module.peft_config["default"].truncation_method == "exact"
    # query and value in 2 layers: 4 truncations computed by the first, reused by the second.
    assert (first.module.truncation_cache.misses, second.module.truncation_cache.hits) == (4, 4)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def test_method_trainable_counts():
    counts = {}
    for method in ("kasa", "full"):
        counts[method] = build_method_model(method, tiny_bert(), AdapterSettings(r=4)).parameter_counts()
    total_base = sum(p.numel() for p in tiny_bert().parameters())
    head = 32 * 2 + 2
    # KaSA per targeted 32x32 layer: A (4x32) + B (32x4) + d (4); query and value in 2 layers.
    assert counts["kasa"][0] == 4 * (4 * 32 + 32 * 4 + 4) + head
    assert counts["full"] == (total_base, total_base)


def test_collect_outputs_restores_training_mode():
    model = tiny_bert()
    model.train()
    batch = collate([TokenDataset(2, seed=0)[i] for i in range(2)])
    outputs = collect_outputs(model, [batch], torch.device("cpu"))
    assert model.training
    assert outputs.logits.shape == (2, 2)
    assert math.isfinite(outputs.loss)
