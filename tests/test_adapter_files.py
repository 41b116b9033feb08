"""Saving and loading adapter folders: round trips, file contents, fingerprints, atomic saves."""

from __future__ import annotations

import copy
import json
import os
import re
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import kasa_peft
import kasa_peft.adapter_files
from kasa_peft import KasaModel
from kasa_peft.adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError
from kasa_peft.fingerprint import weight_checksum, weight_fingerprint

ADAPTER_TENSORS = (
    "lora_A",
    "lora_B",
    "lora_diag",
    "removed_U",
    "removed_S",
    "removed_Vh",
    "base_fingerprint",
    "base_checksum",
)


def trained_model(case, seed: int = 1) -> KasaModel:
    model = case.wrap()
    case.randomize(model, seed=seed)
    return model


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """Return a Linear or Conv1D weight in (out, in) orientation."""
    weight = module.weight.detach()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def folder_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def assert_same_adapter(loaded: KasaModel, saved: KasaModel) -> None:
    loaded_state = loaded.adapter_state()
    saved_state = saved.adapter_state()
    assert loaded_state.keys() == saved_state.keys()
    for key, tensor in saved_state.items():
        assert torch.equal(loaded_state[key], tensor), key


@pytest.fixture
def forbid_svd(monkeypatch):
    """Return a function that makes every SVD entry point raise from then on."""

    def fail(*args, **kwargs):
        raise AssertionError("an SVD was computed while loading a saved adapter")

    def forbid() -> None:
        monkeypatch.setattr(torch.linalg, "svd", fail)
        monkeypatch.setattr(torch.linalg, "svdvals", fail)
        monkeypatch.setattr(torch, "svd", fail)
        monkeypatch.setattr(torch, "svd_lowrank", fail)
        monkeypatch.setattr(torch.linalg, "eigh", fail)
        monkeypatch.setattr(torch.linalg, "cholesky", fail)
        monkeypatch.setattr(torch.linalg, "cholesky_ex", fail)
        monkeypatch.setattr(kasa_peft.truncation, "smallest_singular_triplets", fail)
        monkeypatch.setattr(kasa_peft.model, "smallest_singular_triplets", fail)
        monkeypatch.setattr(KasaModel, "_compute_truncation", fail)

    return forbid


# ----- round trip ----------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(model_case, tmp_path, forbid_svd):
    model = trained_model(model_case)
    expected = model_case.output(model)
    model.save_pretrained(tmp_path)
    fresh_base = model_case.base()
    forbid_svd()

    loaded = KasaModel.from_pretrained(fresh_base, tmp_path)

    assert torch.equal(model_case.output(loaded), expected)
    assert_same_adapter(loaded, model)
    assert [name for name, _ in loaded.kasa_layers()] == model_case.target_names
    assert loaded.peft_config["default"] == model.peft_config["default"]


def test_loaded_adapter_is_frozen_unless_trainable(llama_case, tmp_path):
    model = trained_model(llama_case)
    model.save_pretrained(tmp_path)

    frozen = KasaModel.from_pretrained(llama_case.base(), tmp_path)
    trainable = KasaModel.from_pretrained(llama_case.base(), tmp_path, is_trainable=True)

    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    trainable_names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert trainable_names == {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_adapter_beside_existing(model_case, tmp_path, forbid_svd):
    saved = trained_model(model_case, seed=1)
    expected = model_case.output(saved)
    saved.save_pretrained(tmp_path)
    fresh_base = model_case.base()
    forbid_svd()
    first = KasaModel.from_pretrained(fresh_base, tmp_path)
    first_output = model_case.output(first)

    first.load_adapter(tmp_path, "second")
    first.set_adapter("second")

    assert torch.equal(model_case.output(first), expected)
    first.set_adapter("default")
    assert torch.equal(model_case.output(first), first_output)


def test_save_while_merged_loads_unmerged(model_case, tmp_path):
    model = trained_model(model_case)
    expected = model_case.output(model)
    model.merge_adapter()

    model.save_pretrained(tmp_path)
    loaded = KasaModel.from_pretrained(model_case.base(), tmp_path)

    # The fingerprints describe the original base weights, not the merged ones.
    assert torch.equal(model_case.output(loaded), expected)


def test_save_second_adapter_by_name(model_case, tmp_path):
    model = trained_model(model_case, seed=1)
    model.add_adapter("other", model_case.config(r=model_case.other_r))
    model_case.randomize(model, "other", seed=2)
    model.set_adapter("other")
    expected = model_case.output(model)
    model.set_adapter("default")

    model.save_pretrained(tmp_path, adapter_name="other")
    loaded = KasaModel.from_pretrained(model_case.base(), tmp_path, adapter_name="other")

    assert loaded.active_adapter == "other"
    assert loaded.peft_config["other"].r == model_case.other_r
    assert torch.equal(model_case.output(loaded), expected)


# ----- file contents ---------------------------------------------------------------------------


def test_adapter_config_contents(model_case, tmp_path):
    model = trained_model(model_case)
    model.save_pretrained(tmp_path)

    metadata = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))

    assert folder_names(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]
    assert metadata["method"] == "kasa"
    assert metadata["format_version"] == 1
    assert metadata["kasa_peft_version"] == kasa_peft.__version__
    assert metadata["config"] == model_case.config().to_dict()
    assert metadata["base_model"]["class"] == type(model_case.pristine).__name__
    assert sorted(metadata["targets"]) == sorted(model_case.target_names)
    for name in model_case.target_names:
        module = model_case.pristine.get_submodule(name)
        info = metadata["targets"][name]
        assert info["shape"] == list(weight_matrix(module).shape), name
        assert info["layer_type"] == type(module).__name__, name
        assert info["r"] == model_case.r, name
        assert info["base_dtype"] == "float32", name
    suffixes = tuple(model_case.modules_to_save or ())
    expected_saved = [n for n, _ in model_case.pristine.named_modules() if suffixes and n.endswith(suffixes)]
    assert metadata["modules_to_save"] == expected_saved
    assert len(metadata["weights_sha256"]) == 64


def test_weights_file_contents(model_case, tmp_path):
    model = trained_model(model_case)
    model.save_pretrained(tmp_path)
    r = model_case.r

    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as handle:
        keys = set(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}

    expected_keys = {f"{name}.{t}" for name in model_case.target_names for t in ADAPTER_TENSORS}
    for saved_name in model.base_model.state_dict():
        if ".copies.default." in saved_name:
            module_name, _, parameter = saved_name.partition(".copies.default.")
            expected_keys.add(f"modules_to_save.{module_name}.{parameter}")
    assert keys == expected_keys
    for name, layer in model.kasa_layers():
        adapter = layer.kasa_adapters["default"]
        matrix = weight_matrix(model_case.pristine.get_submodule(name))
        out_features, in_features = matrix.shape
        assert tensors[f"{name}.lora_A"].shape == (r, in_features)
        assert tensors[f"{name}.lora_B"].shape == (out_features, r)
        assert tensors[f"{name}.lora_diag"].shape == (r,)
        assert tensors[f"{name}.removed_U"].shape == (out_features, r)
        assert tensors[f"{name}.removed_S"].shape == (r,)
        assert tensors[f"{name}.removed_Vh"].shape == (r, in_features)
        for tensor_name in ("lora_A", "lora_B", "lora_diag"):
            assert torch.equal(tensors[f"{name}.{tensor_name}"], getattr(adapter, tensor_name).detach())
        # Singular values are unique, unlike the vectors: compare them with a float64 SVD
        # of the base weight. Stored in float32, so relative error <= 2^-24 of sigma_max.
        s = torch.linalg.svdvals(matrix.double())
        assert torch.allclose(tensors[f"{name}.removed_S"].double(), s[-r:], rtol=0, atol=1e-6 * s[0].item())
        fingerprint = tensors[f"{name}.base_fingerprint"]
        assert fingerprint.dtype == torch.float64
        assert torch.equal(fingerprint, weight_fingerprint(matrix))
        assert fingerprint[0].item() == pytest.approx(torch.linalg.matrix_norm(matrix.double()).item(), rel=1e-12)
        checksum = tensors[f"{name}.base_checksum"]
        assert checksum.dtype == torch.int64
        assert torch.equal(checksum, weight_checksum(model_case.pristine.get_submodule(name).weight))
    if model_case.modules_to_save:
        for module_name in model_case.modules_to_save:
            matching = [k for k in keys if k.startswith("modules_to_save.") and f".{module_name}." in f".{k}"]
            assert matching, module_name


# ----- fingerprints and shapes -------------------------------------------------------------------


def test_fingerprint_mismatch_names_first_module(model_case, tmp_path):
    trained_model(model_case).save_pretrained(tmp_path)
    base = model_case.base()
    generator = torch.Generator().manual_seed(7)
    second, third = model_case.target_names[1], model_case.target_names[2]
    with torch.no_grad():
        for name in (second, third):
            weight = base.get_submodule(name).weight
            weight.add_(1e-3 * torch.randn(weight.shape, generator=generator))

    with pytest.raises(AdapterFileError) as error:
        KasaModel.from_pretrained(base, tmp_path)

    message = str(error.value)
    assert f"base weight of module {second!r} differs" in message
    assert repr(third) not in message
    assert "same base checkpoint" in message
    assert not any(type(m).__name__ == "KasaLayer" for m in base.modules())


def test_single_entry_change_detected(llama_case, tmp_path):
    trained_model(llama_case).save_pretrained(tmp_path)
    base = llama_case.base()
    name = llama_case.target_names[-1]
    with torch.no_grad():
        # Half a percent of the weights' scale (init std 0.02): far above float32 rounding,
        # far below anything a shape or norm check would notice.
        base.get_submodule(name).weight[3, 5] += 1e-4

    with pytest.raises(AdapterFileError, match=f"base weight of module {name!r} differs"):
        KasaModel.from_pretrained(base, tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_base_weight_rejected(llama_case, tmp_path, value):
    trained_model(llama_case).save_pretrained(tmp_path)
    base = llama_case.base()
    name = llama_case.target_names[1]
    with torch.no_grad():
        base.get_submodule(name).weight[0, 0] = value

    with pytest.raises(AdapterFileError, match=f"module {name!r}"):
        KasaModel.from_pretrained(base, tmp_path)


def smaller_layer(module: nn.Module) -> nn.Module:
    """Return a layer of ``module``'s type with one output feature less."""
    out_features, in_features = weight_matrix(module).shape
    if type(module).__name__ == "Conv1D":
        return type(module)(out_features - 1, in_features)
    return nn.Linear(in_features, out_features - 1)


def test_shape_mismatch_names_module(model_case, tmp_path):
    trained_model(model_case).save_pretrained(tmp_path)
    base = model_case.base()
    name = model_case.target_names[1]
    parent_name, _, child = name.rpartition(".")
    original_shape = list(weight_matrix(base.get_submodule(name)).shape)
    setattr(base.get_submodule(parent_name), child, smaller_layer(base.get_submodule(name)))

    with pytest.raises(AdapterFileError) as error:
        KasaModel.from_pretrained(base, tmp_path)

    message = str(error.value)
    expected_shape = [original_shape[0] - 1, original_shape[1]]
    assert f"module {name!r} has weight shape {expected_shape} (out, in)" in message
    assert f"was saved for {original_shape}" in message


def test_different_architecture_names_module(llama_case, tmp_path):
    from transformers import LlamaForCausalLM

    trained_model(llama_case).save_pretrained(tmp_path)
    config = copy.deepcopy(llama_case.extra["config"])
    config.num_hidden_layers = 1
    shallow = LlamaForCausalLM(config).eval()
    # Same weights for everything the shallow model has, so only the missing layer differs.
    shallow.load_state_dict(llama_case.pristine.state_dict(), strict=False)

    with pytest.raises(AdapterFileError) as error:
        KasaModel.from_pretrained(shallow, tmp_path)

    message = str(error.value)
    missing_module = r"module 'model\.layers\.1\.[a-z_.]+' of the adapter in .* does not exist in LlamaForCausalLM"
    assert re.search(missing_module, message)
    assert "onto the base model it was trained on" in message


# Casting a float32 base to a half dtype rounds every weight. That moves the fingerprint by
# far less than the tolerance for that dtype, and the adapter then runs in float32 beside it.
# The outputs differ from the float32 model's by the half dtype's rounding through the
# network: the bound is 16 unit roundoffs (measured: up to 2.1e-2 for bfloat16, 1.4e-3 for
# float16, relative to the largest logit).
HALF_OUTPUT_TOLERANCE = {torch.bfloat16: 16 * 2.0**-8, torch.float16: 16 * 2.0**-11}


@pytest.mark.parametrize("dtype", list(HALF_OUTPUT_TOLERANCE), ids=str)
def test_float32_adapter_loads_on_half_base(model_case, tmp_path, dtype):
    model = trained_model(model_case)
    expected = model_case.output(model)
    model.save_pretrained(tmp_path)

    loaded = KasaModel.from_pretrained(model_case.base(dtype), tmp_path)

    for _, layer in loaded.kasa_layers():
        assert layer.base_layer.weight.dtype == dtype
        assert layer.kasa_adapters["default"].lora_A.dtype == torch.float32
    output = model_case.output(loaded).float()
    difference = (output - expected).abs().max().item()
    assert difference <= HALF_OUTPUT_TOLERANCE[dtype] * expected.abs().max().item()


# ----- atomic saves and broken folders ----------------------------------------------------------


def write_half_then_fail(tensors, filename, metadata=None):
    """Stand-in for safetensors' save_file that dies halfway through writing."""
    safetensors.torch.save_file(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    with open(filename, "r+b") as handle:
        handle.truncate(size // 2)
    raise OSError(28, "No space left on device")


def fail_before_writing(tensors, filename, metadata=None):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing_save", [fail_before_writing, write_half_then_fail], ids=["before", "halfway"])
def test_failed_save_keeps_previous_adapter(llama_case, tmp_path, monkeypatch, failing_save):
    model = trained_model(llama_case, seed=1)
    first_output = llama_case.output(model)
    model.save_pretrained(tmp_path)
    first_files = {name: (tmp_path / name).read_bytes() for name in folder_names(tmp_path)}
    llama_case.randomize(model, seed=2)

    monkeypatch.setattr(kasa_peft.adapter_files, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()

    assert folder_names(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]
    assert {name: (tmp_path / name).read_bytes() for name in folder_names(tmp_path)} == first_files
    loaded = KasaModel.from_pretrained(llama_case.base(), tmp_path)
    assert torch.equal(llama_case.output(loaded), first_output)


def test_crash_between_renames_is_detected(llama_case, tmp_path, monkeypatch):
    # The one window the two-file save cannot close: the new weights are in place but the
    # config is still the old one. The SHA-256 in the config catches it on load.
    model = trained_model(llama_case, seed=1)
    model.save_pretrained(tmp_path)
    llama_case.randomize(model, seed=2)
    real_replace = os.replace
    calls = []

    def replace_then_crash(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("simulated crash before the config rename")
        real_replace(source, destination)

    monkeypatch.setattr(kasa_peft.adapter_files.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()

    assert folder_names(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]
    with pytest.raises(AdapterFileError, match="SHA-256 differs.*two different saves"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_swapped_weights_rejected(llama_case, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    trained_model(llama_case, seed=1).save_pretrained(first)
    trained_model(llama_case, seed=2).save_pretrained(second)
    shutil.copyfile(second / WEIGHTS_NAME, first / WEIGHTS_NAME)

    with pytest.raises(AdapterFileError) as error:
        KasaModel.from_pretrained(llama_case.base(), first)

    message = str(error.value)
    assert str(first / WEIGHTS_NAME) in message
    assert "does not match" in message
    assert "Save the adapter again" in message


@pytest.mark.parametrize("removed", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file_rejected(llama_case, tmp_path, removed):
    trained_model(llama_case).save_pretrained(tmp_path)
    (tmp_path / removed).unlink()

    with pytest.raises(AdapterFileError, match=rf"{tmp_path / removed} not found.*save_pretrained"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_missing_folder_rejected(llama_case, tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path / "no_such_folder")


def test_missing_tensor_rejected(llama_case, tmp_path):
    trained_model(llama_case).save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    name = llama_case.target_names[0]
    del tensors[f"{name}.removed_S"]
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME)
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    del metadata["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(metadata), encoding="utf-8")

    with pytest.raises(AdapterFileError, match=rf"lacks tensors \['removed_S'\] for module {name!r}"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_peft_lora_folder_rejected(llama_case, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(llama_case.base(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()

    with pytest.raises(AdapterFileError, match="describes method None, not 'kasa'; this folder was not written by kasa_peft"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_invalid_json_rejected(llama_case, tmp_path):
    trained_model(llama_case).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"method": "kasa",', encoding="utf-8")

    with pytest.raises(AdapterFileError, match="is not valid JSON"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_newer_format_version_rejected(llama_case, tmp_path):
    trained_model(llama_case).save_pretrained(tmp_path)
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))
    metadata["format_version"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(metadata), encoding="utf-8")

    with pytest.raises(AdapterFileError, match="has format_version 2; this kasa_peft reads version 1"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


@pytest.fixture
def forbid_pickle(monkeypatch):
    """Make torch.load and every pickle loader raise."""

    def fail(*args, **kwargs):
        raise AssertionError("a pickle file was read")

    class FailingUnpickler:
        def __init__(self, *args, **kwargs):
            fail()

    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(pickle, "load", fail)
    monkeypatch.setattr(pickle, "loads", fail)
    monkeypatch.setattr(pickle, "Unpickler", FailingUnpickler)


def test_pickle_file_never_read(llama_case, tmp_path, forbid_pickle):
    model = trained_model(llama_case)
    expected = llama_case.output(model)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_model.bin", "wb") as handle:
        pickle.dump({"lora_A": [1.0, 2.0]}, handle)

    loaded = KasaModel.from_pretrained(llama_case.base(), tmp_path)
    assert torch.equal(llama_case.output(loaded), expected)

    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFileError, match=rf"{WEIGHTS_NAME} not found"):
        KasaModel.from_pretrained(llama_case.base(), tmp_path)


def test_saved_files_follow_umask(tmp_path):
    from torch import nn

    from kasa_peft import KasaConfig, get_kasa_model

    previous = os.umask(0o022)
    try:
        model = get_kasa_model(nn.Sequential(nn.Linear(8, 6)), KasaConfig(r=2, target_modules=["0"]))
        model.save_pretrained(tmp_path)
    finally:
        os.umask(previous)

    # tempfile.mkstemp creates files with mode 0600; the saved files must be readable like
    # any file the user creates.
    assert (tmp_path / "adapter_config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
