"""Agreement with PEFT 0.21's KaSA (``LoraConfig(kasa_config=KasaConfig())``) for the same A, B, d.

PEFT truncates the base weight in place, from a float32 SVD, while kasa_peft keeps the base
weight and subtracts the r smallest triplets of a float64 SVD at run time. The two agree up
to the float32 SVD's reconstruction error, which is what the tolerances below allow for.
"""

from __future__ import annotations

import pytest
import torch

from kasa_peft import KasaModel, get_kasa_model

peft = pytest.importorskip("peft")

BETA, GAMMA = 0.1, 0.05


def peft_kasa_model(case, r: int, alpha: float):
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(case.target_modules),
        lora_dropout=0.0,
        kasa_config=peft.KasaConfig(beta=BETA, gamma=GAMMA),
    )
    return peft.get_peft_model(case.base(), config)


def copy_into_peft(ours: KasaModel, theirs) -> None:
    """Copy A, B and d of our active adapter into PEFT's adapter named ``default``."""
    with torch.no_grad():
        for name, layer in ours.kasa_layers():
            adapter = layer.kasa_adapters[ours.active_adapter]
            module = theirs.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(adapter.lora_A)
            module.lora_B["default"].weight.copy_(adapter.lora_B)
            module.lora_diag["default"].copy_(adapter.lora_diag)


def paired_models(case, trained: bool):
    config = case.config(modules_to_save=None, beta=BETA, gamma=GAMMA)
    ours = get_kasa_model(case.base(), config)
    if trained:
        case.randomize(ours, seed=3)
    theirs = peft_kasa_model(case, config.r, config.alpha).eval()
    copy_into_peft(ours, theirs)
    return ours, theirs


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# The two cases whose targets are nn.Linear, the only layers PEFT's KaSA adapts.
model_cases = pytest.mark.parametrize("model_case", ["llama", "minilm"], indirect=True)


@model_cases
@pytest.mark.parametrize("trained", [False, True], ids=["step0", "trained"])
def test_forward_matches_peft(model_case, trained):
    ours, theirs = paired_models(model_case, trained)

    ours_output = model_case.output(ours)
    theirs_output = model_case.output(theirs)

    # Relative to the largest logit; measured up to 1.8e-6 (MiniLM) and 8e-7 (LLaMA).
    assert relative_difference(ours_output, theirs_output) <= 1e-5


@model_cases
def test_merged_weights_match_peft(model_case):
    ours, theirs = paired_models(model_case, trained=True)

    ours_plain = ours.merge_and_unload()
    theirs_plain = theirs.merge_and_unload()

    for name in model_case.target_names:
        ours_weight = ours_plain.get_submodule(name).weight.double()
        theirs_weight = theirs_plain.get_submodule(name).weight.double()
        original = model_case.pristine.get_submodule(name).weight.double()
        # PEFT's float32 SVD reconstructs W only to float32 accuracy: measured up to
        # 2.9e-6 * max|W| (MiniLM) and 1.2e-6 * max|W| (LLaMA).
        difference = (ours_weight - theirs_weight).abs().max().item()
        assert difference <= 1e-5 * original.abs().max().item(), name


@model_cases
def test_regularizer_matches_peft_sum(model_case):
    ours, theirs = paired_models(model_case, trained=True)

    ours_loss = ours.regularization_loss()
    theirs_loss = theirs.base_model._get_kasa_loss()

    # PEFT sums the per-layer terms; kasa_peft averages them.
    layers = len(model_case.target_names)
    assert ours_loss.item() * layers == pytest.approx(theirs_loss.item(), rel=1e-5)


def test_peft_rejects_conv1d_but_kasa_peft_adapts_it(gpt2_case):
    config = gpt2_case.config(modules_to_save=None)

    with pytest.raises(ValueError, match="fan_in_fan_out"):
        peft_kasa_model(gpt2_case, config.r, config.alpha)

    ours = get_kasa_model(gpt2_case.base(), config)
    assert [name for name, _ in ours.kasa_layers()] == gpt2_case.target_names
    assert all(layer.fan_in_fan_out for _, layer in ours.kasa_layers())
    assert torch.isfinite(gpt2_case.output(ours)).all()
