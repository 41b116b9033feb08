"""Model-level promises of ``KasaModel``, each checked on tiny GPT-2, tiny LLaMA and real MiniLM.

Numbers are float32 unless a test states otherwise. Where outputs are compared with a
tolerance, the tolerance is relative to the largest absolute entry of the reference
output, because logits near zero carry no meaning of their own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasa_peft import KasaConfig, KasaLayer, KasaModel, get_kasa_model
from kasa_peft.modules_to_save import ModulesToSaveWrapper


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Assert ``|actual - expected| <= rel * max|expected|`` entrywise."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    difference = (actual.double() - expected.double()).abs().max().item()
    bound = rel * scale
    assert difference <= bound, f"max difference {difference:.3g} exceeds {rel:g} * max|expected| = {bound:.3g}"


def adapter_parameter_names(model: KasaModel, adapter_name: str) -> set[str]:
    """Return the names of ``adapter_name``'s A, B, d and saved-module copy parameters."""
    names = set()
    for name, _ in model.named_parameters():
        if f".kasa_adapters.{adapter_name}.lora_" in name or f".copies.{adapter_name}." in name:
            names.add(name)
    return names


def wrapper_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (KasaLayer, ModulesToSaveWrapper, KasaModel))]


# ----- trainable parameters ---------------------------------------------------------------


def test_only_adapter_parameters_trainable(model_case):
    model = model_case.wrap()

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = adapter_parameter_names(model, "default")

    assert trainable == expected
    lora_names = {name for name in expected if ".lora_" in name}
    assert len(lora_names) == 3 * len(model_case.target_names)
    copy_names = expected - lora_names
    assert bool(copy_names) == bool(model_case.modules_to_save)


def test_targets_are_the_suffix_matches(model_case):
    model = model_case.wrap()

    assert [name for name, _ in model.kasa_layers()] == model_case.target_names


# ----- step 0 and disabling -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "auto"])
def test_step_zero_equals_truncated_base(model_case, method):
    base = model_case.base()
    reference = model_case.reference(base)
    base_output = model_case.output(base)
    model = get_kasa_model(base, model_case.config(truncation_method=method))

    output = model_case.output(model)
    expected = model_case.output(reference)

    # Both sides are float32; the reference weight is rounded once from float64 while the
    # KaSA layer subtracts the float32 low-rank component at run time.
    assert_outputs_close(output, expected, rel=1e-5)
    # The truncation must be visible, or this test could not fail.
    assert not torch.allclose(base_output, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_disable_adapter_reproduces_base_exactly(model_case):
    base_output = model_case.output(model_case.base())
    model = model_case.wrap()

    with model.disable_adapter():
        assert torch.equal(model_case.output(model), base_output)

    model_case.randomize(model, seed=1)
    adapted = model_case.output(model)
    assert not torch.allclose(adapted, base_output)
    with model.disable_adapter():
        assert torch.equal(model_case.output(model), base_output)
    assert torch.equal(model_case.output(model), adapted)


def test_disable_adapter_while_merged(model_case):
    base_output = model_case.output(model_case.base())
    model = model_case.wrap()
    model_case.randomize(model, seed=1)
    model.merge_adapter()
    merged = model_case.output(model)

    with model.disable_adapter():
        assert torch.equal(model_case.output(model), base_output)

    assert torch.equal(model_case.output(model), merged)
    assert all(layer.merged_adapter == "default" for _, layer in model.kasa_layers())


# ----- unload and merge ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merge_first", [False, True], ids=["plain", "after-merge"])
def test_unload_restores_original_weights(model_case, dtype, merge_first):
    base = model_case.base(dtype)
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = model_case.wrap(base)
    model_case.randomize(model, seed=1)
    if merge_first:
        model.merge_adapter()

    plain = model.unload()

    assert type(plain) is type(model_case.pristine)
    assert wrapper_modules(plain) == []
    state = plain.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        # Never modified (or restored from an exact copy), so identical in every dtype.
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def test_unloaded_model_reproduces_base_output(model_case):
    base_output = model_case.output(model_case.base())
    model = model_case.wrap()
    model_case.randomize(model, seed=1)

    plain = model.unload()

    assert torch.equal(model_case.output(plain), base_output)
    with pytest.raises(RuntimeError, match="unloaded"):
        model_case.output(model)


# float32: the merged weight is rounded once, so outputs differ by float32 rounding through
# the network (measured up to 7e-7 relative). Half precision: each merged weight is rounded
# to the half dtype, while the unmerged path adds a float32 update to a rounded base output.
# The bound is 16 unit roundoffs of the dtype (measured: up to 1e-2 for bfloat16 and
# 1.4e-3 for float16).
MERGE_TOLERANCES = {torch.float32: 1e-5, torch.float16: 16 * 2.0**-11, torch.bfloat16: 16 * 2.0**-8}


@pytest.mark.parametrize("dtype", list(MERGE_TOLERANCES), ids=str)
def test_merge_and_unload_matches_unmerged(model_case, dtype):
    model = model_case.wrap(model_case.base(dtype))
    model_case.randomize(model, seed=1)
    unmerged = model_case.output(model)

    plain = model.merge_and_unload()

    assert type(plain) is type(model_case.pristine)
    assert wrapper_modules(plain) == []
    merged = model_case.output(plain)
    assert merged.dtype == dtype
    assert_outputs_close(merged, unmerged, rel=MERGE_TOLERANCES[dtype])
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model_case.output(model)


def test_merge_and_unload_keeps_trained_head(minilm_case):
    model = minilm_case.wrap()
    minilm_case.randomize(model, seed=1)
    trained_head = copy.deepcopy(model.base_model.classifier.copies["default"])

    merged = model.merge_and_unload()

    assert type(merged) is type(minilm_case.pristine)
    assert type(merged.classifier) is nn.Linear
    assert torch.equal(merged.classifier.weight, trained_head.weight)
    assert torch.equal(merged.classifier.bias, trained_head.bias)


def test_merge_unmerge_round_trip_is_exact(model_case):
    model = model_case.wrap()
    model_case.randomize(model, seed=1)
    before = {name: tensor.clone() for name, tensor in model.base_model.state_dict().items()}
    unmerged_output = model_case.output(model)

    model.merge_adapter()
    merged_output = model_case.output(model)
    changed = [name for name, t in model.base_model.state_dict().items() if not torch.equal(t, before[name])]
    model.unmerge_adapter()

    assert sorted(changed) == sorted(f"{name}.base_layer.weight" for name in model_case.target_names)
    assert_outputs_close(merged_output, unmerged_output, rel=1e-5)
    for name, tensor in model.base_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(model_case.output(model), unmerged_output)


# ----- several adapters ---------------------------------------------------------------------


def copy_adapter_values(source: KasaModel, target: KasaModel, adapter_name: str) -> None:
    """Copy A, B, d and saved-module copies of ``adapter_name`` from ``source`` to ``target``."""
    target_parameters = dict(target.named_parameters())
    with torch.no_grad():
        for name in adapter_parameter_names(source, adapter_name):
            target_parameters[name].copy_(source.get_parameter(name))


def test_two_adapters_keep_their_outputs(model_case):
    first_config = model_case.config()
    other_config = model_case.config(r=model_case.other_r, alpha=3.0)
    model = model_case.wrap(config=first_config)
    model_case.randomize(model, "default", seed=1)
    first_alone = model_case.output(model)

    model.add_adapter("other", other_config)
    model_case.randomize(model, "other", seed=2)

    # Adding an adapter does not activate it or change the active one.
    assert model.active_adapter == "default"
    assert torch.equal(model_case.output(model), first_alone)
    model.set_adapter("other")
    other_output = model_case.output(model)
    assert not torch.allclose(other_output, first_alone)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_parameter_names(model, "other")
    for _ in range(2):
        model.set_adapter("default")
        assert torch.equal(model_case.output(model), first_alone)
        model.set_adapter("other")
        assert torch.equal(model_case.output(model), other_output)

    # The second adapter alone on a fresh base, with the same A, B, d and head copy.
    # Its truncation is recomputed there from the same weights, so only the SVD's own
    # run-to-run rounding (none on one machine, in practice) separates the two.
    other_alone = get_kasa_model(model_case.base(), other_config, adapter_name="other")
    copy_adapter_values(model, other_alone, "other")
    assert_outputs_close(model_case.output(other_alone), other_output, rel=1e-6)


def test_ranks_of_two_adapters_are_independent(llama_case):
    model = llama_case.wrap()
    model.add_adapter("other", llama_case.config(r=llama_case.other_r))

    for _, layer in model.kasa_layers():
        assert layer.kasa_adapters["default"].r == llama_case.r
        assert layer.kasa_adapters["other"].r == llama_case.other_r
        assert layer.kasa_adapters["other"].lora_A.shape[0] == llama_case.other_r


def test_delete_adapter_keeps_the_other(model_case):
    model = model_case.wrap()
    model_case.randomize(model, "default", seed=1)
    first = model_case.output(model)
    model.add_adapter("other", model_case.config(r=model_case.other_r))
    model_case.randomize(model, "other", seed=2)

    model.delete_adapter("other")

    assert list(model.peft_config) == ["default"]
    assert all(list(layer.kasa_adapters) == ["default"] for _, layer in model.kasa_layers())
    assert torch.equal(model_case.output(model), first)


# ----- nn.Module behaviour ------------------------------------------------------------------


def test_kasa_model_is_an_nn_module(model_case):
    model = model_case.wrap()
    model_case.randomize(model, seed=1)
    output32 = model_case.output(model)

    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())

    state = model.state_dict()
    assert any(key.endswith(".kasa_adapters.default.lora_diag") for key in state)
    assert any(key.endswith(".kasa_adapters.default.removed_U") for key in state)
    fresh = model_case.wrap()
    fresh.load_state_dict(state)
    assert torch.equal(model_case.output(fresh), output32)

    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    output64 = model_case.output(model)
    assert output64.dtype == torch.float64
    # The float64 model evaluates the float32 weights and factors exactly, so it differs
    # from the float32 run by float32 rounding only.
    assert_outputs_close(output64, output32.double(), rel=1e-5)


def test_forward_passes_labels(model_case):
    model = model_case.wrap()

    result = model(**model_case.inputs, labels=model_case.labels)

    assert result.loss is not None
    assert result.loss.ndim == 0
    assert torch.isfinite(result.loss)
    base_loss = model_case.reference(model_case.base())(**model_case.inputs, labels=model_case.labels).loss
    assert torch.allclose(result.loss, base_loss, rtol=1e-5)


def test_generate_through_wrapper(gpt2_case):
    base = gpt2_case.base()
    expected = base.generate(**gpt2_case.inputs, max_new_tokens=3, do_sample=False)
    model = gpt2_case.wrap()
    gpt2_case.randomize(model, seed=1)

    generated = model.generate(**gpt2_case.inputs, max_new_tokens=3, do_sample=False)
    with model.disable_adapter():
        generated_disabled = model.generate(**gpt2_case.inputs, max_new_tokens=3, do_sample=False)

    assert generated.shape == (2, gpt2_case.inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated_disabled, expected)


def test_attributes_fall_through_to_base(model_case):
    model = model_case.wrap()

    assert model.config is model.base_model.config
    with pytest.raises(AttributeError):
        model.no_such_attribute_anywhere


# ----- regularizer and training ---------------------------------------------------------------


def regularizer_float64(model: KasaModel, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """Return the mean over layers of beta*sum(d^2) + gamma*(||B^T B - I||_F + ||A A^T - I||_F), float64."""
    terms = []
    for _, layer in model.kasa_layers():
        adapter = layer.kasa_adapters[adapter_name]
        a = adapter.lora_A.detach().double()
        b = adapter.lora_B.detach().double()
        d = adapter.lora_diag.detach().double()
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        gram_b = torch.linalg.matrix_norm(b.T @ b - eye)
        gram_a = torch.linalg.matrix_norm(a @ a.T - eye)
        terms.append(beta * (d * d).sum() + gamma * (gram_b + gram_a))
    return torch.stack(terms).mean()


def test_regularization_loss_matches_float64(model_case):
    beta, gamma = 0.1, 0.05
    model = model_case.wrap(config=model_case.config(beta=beta, gamma=gamma))
    model_case.randomize(model, seed=1)

    loss = model.regularization_loss()
    loss.backward()

    expected = regularizer_float64(model, "default", beta, gamma)
    # Formed in float32 from O(r^2 (out + in)) products: relative error of a few 1e-7.
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    for name, layer in model.kasa_layers():
        adapter = layer.kasa_adapters["default"]
        for parameter_name in ("lora_A", "lora_B", "lora_diag"):
            grad = getattr(adapter, parameter_name).grad
            assert grad is not None, f"{name}.{parameter_name}"
            assert grad.abs().max() > 0, f"{name}.{parameter_name}"


def test_training_changes_only_adapter_and_head(model_case):
    model = model_case.wrap()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        initial_loss = model_case.loss(model).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        loss = model_case.loss(model) + model.regularization_loss()
        loss.backward()
        optimizer.step()
    model.eval()

    with torch.no_grad():
        final_loss = model_case.loss(model).item()
    assert final_loss < initial_loss
    after = dict([*model.named_parameters(), *model.named_buffers()])
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    assert changed <= trainable
    # Every B leaves zero and every d moves; the head copy (when there is one) trains too.
    for name, layer in model.kasa_layers():
        assert f"base_model.{name}.kasa_adapters.default.lora_B" in changed
        assert f"base_model.{name}.kasa_adapters.default.lora_diag" in changed
    if model_case.modules_to_save:
        assert any(".copies.default." in name for name in changed)


# ----- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -3])
def test_rank_not_positive_rejected(r):
    with pytest.raises(ValueError, match=rf"r={r} is invalid.*positive integer"):
        KasaConfig(r=r)


def test_rank_pattern_not_positive_rejected():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]=0 is invalid"):
        KasaConfig(rank_pattern={"q_proj": 0})


def test_rank_too_large_names_module_and_shape(model_case):
    base = model_case.base()
    shapes = {}
    for name in model_case.target_names:
        module = base.get_submodule(name)
        out_in = tuple(module.weight.shape)
        shapes[name] = out_in[::-1] if type(module).__name__ == "Conv1D" else out_in
    r = min(min(shape) for shape in shapes.values())
    first_too_small = next(name for name in model_case.target_names if min(shapes[name]) <= r)

    with pytest.raises(ValueError) as error:
        get_kasa_model(base, model_case.config(r=r))

    message = str(error.value)
    assert f"r={r} for {first_too_small} of shape {shapes[first_too_small]}" in message
    assert f"min(out, in)={r}" in message
    assert f"Choose r <= {r - 1}" in message
    assert "rank_pattern" in message
    assert wrapper_modules(base) == []


def test_unmatched_targets_rejected(model_case):
    with pytest.raises(ValueError) as error:
        get_kasa_model(model_case.base(), model_case.config(target_modules=["no_such_layer"]))

    message = str(error.value)
    assert "target_modules=['no_such_layer'] matched no module" in message
    assert type(model_case.pristine).__name__ in message
    assert repr(model_case.target_modules[0]) in message


UNSUPPORTED_TARGETS = {
    "gpt2": [("wte", "Embedding"), ("ln_1", "LayerNorm")],
    "llama": [("embed_tokens", "Embedding"), ("input_layernorm", "LlamaRMSNorm")],
    "minilm": [("word_embeddings", "Embedding"), ("LayerNorm", "LayerNorm")],
}


def test_unsupported_module_type_rejected(model_case):
    for suffix, type_name in UNSUPPORTED_TARGETS[model_case.name]:
        base = model_case.base()
        first = next(name for name, _ in base.named_modules() if name.endswith("." + suffix))

        with pytest.raises(TypeError) as error:
            get_kasa_model(base, model_case.config(target_modules=[suffix]))

        message = str(error.value)
        assert f"module {first!r}" in message
        assert f"is a {type_name}" in message
        assert "Narrow target_modules" in message


def test_non_finite_weight_rejected_naming_module(model_case):
    base = model_case.base()
    bad = model_case.target_names[1]
    with torch.no_grad():
        base.get_submodule(bad).weight[0, 0] = float("nan")

    with pytest.raises(ValueError) as error:
        get_kasa_model(base, model_case.config())

    message = str(error.value)
    assert f"cannot truncate module {bad!r}" in message
    assert "NaN or infinite" in message


def test_failed_wrap_leaves_outputs_unchanged(llama_case):
    base = llama_case.base()
    expected = llama_case.output(base)
    weight = base.get_submodule(llama_case.target_names[-1]).weight
    saved_value = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("inf")

    with pytest.raises(ValueError, match="NaN or infinite"):
        get_kasa_model(base, llama_case.config())

    # Layers wrapped before the failing one lose their adapter again, so none is active.
    assert all(len(m.kasa_adapters) == 0 for m in base.modules() if isinstance(m, KasaLayer))
    with torch.no_grad():
        weight[0, 0] = saved_value
    assert torch.equal(llama_case.output(base), expected)


def test_unknown_adapter_name_rejected(model_case):
    model = model_case.wrap()

    with pytest.raises(ValueError, match=r"adapter 'missing' not found; available adapters: \['default'\]"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match=r"adapter 'missing' not found"):
        model.delete_adapter("missing")
    with pytest.raises(ValueError, match=r"adapter 'missing' not found"):
        model.regularization_loss("missing")


def test_duplicate_adapter_name_rejected(model_case):
    model = model_case.wrap()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match=r"adapter 'default' already exists; delete_adapter it first"):
        model.add_adapter("default", model_case.config(r=model_case.other_r))

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_failed_add_adapter_leaves_no_trace(model_case):
    model = model_case.wrap()
    keys = set(model.state_dict())

    with pytest.raises(ValueError, match="modules_to_save entry 'no_such_head' matched no module"):
        model.add_adapter("other", model_case.config(modules_to_save=["no_such_head"]))

    assert list(model.peft_config) == ["default"]
    assert set(model.state_dict()) == keys


def test_set_adapter_while_merged_rejected(llama_case):
    model = llama_case.wrap()
    model.add_adapter("other", llama_case.config(r=llama_case.other_r))
    model.merge_adapter()

    with pytest.raises(RuntimeError, match="adapter 'default' is merged; call unmerge_adapter"):
        model.set_adapter("other")

    model.unmerge_adapter()
    model.set_adapter("other")
    assert model.active_adapter == "other"


@pytest.mark.parametrize("name", ["", "a.b"])
def test_invalid_adapter_name_rejected(llama_case, name):
    model = llama_case.wrap()

    with pytest.raises(ValueError, match=rf"adapter name {name!r} is invalid"):
        model.add_adapter(name, llama_case.config())


def test_wrapping_twice_rejected(llama_case):
    model = llama_case.wrap()

    with pytest.raises(TypeError, match="already a KasaModel; call add_adapter"):
        get_kasa_model(model, llama_case.config())
