"""Base-weight checksums and fingerprints."""

import pytest
import torch

from kasa_peft.fingerprint import (
    fingerprint_mismatch,
    fingerprint_tolerance,
    weight_checksum,
    weight_fingerprint,
)


@pytest.mark.parametrize("shape", [(64, 64), (7, 5), (33, 6)], ids=["even", "odd-row-bytes", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_checksum_detects_smallest_change(shape, dtype):
    weight = torch.randn(*shape).to(dtype)
    changed = weight.clone()
    # The next representable value: the smallest possible change of one entry.
    changed[2, 3] = torch.nextafter(changed[2, 3].float(), torch.tensor(float("inf"))).to(dtype)
    if changed[2, 3] == weight[2, 3]:
        changed[2, 3] = -weight[2, 3]

    assert not torch.equal(weight_checksum(weight), weight_checksum(changed))


def test_checksum_detects_transpose_and_row_swap():
    weight = torch.randn(32, 32)
    swapped = weight[[1, 0] + list(range(2, 32))]

    assert not torch.equal(weight_checksum(weight), weight_checksum(weight.T))
    assert not torch.equal(weight_checksum(weight), weight_checksum(swapped))


def test_checksum_independent_of_thread_count():
    weight = torch.randn(1024, 768)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight_checksum(weight)
        torch.set_num_threads(2)
        two = weight_checksum(weight)
    finally:
        torch.set_num_threads(threads)

    assert torch.equal(one, two)


def test_fingerprint_matches_float64_projections():
    weight = torch.randn(40, 24)
    generator = torch.Generator().manual_seed(20241209)
    left = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    right = torch.randn(24, 4, generator=generator, dtype=torch.float64)
    w = weight.double()
    expected = torch.cat([torch.linalg.matrix_norm(w).reshape(1), torch.einsum("oi,ok,ik->k", w, left, right)])

    torch.testing.assert_close(weight_fingerprint(weight), expected, rtol=1e-12, atol=0)


def test_fingerprint_accepts_dtype_change_and_rejects_other_weights():
    weight = torch.randn(256, 128)
    saved = weight_fingerprint(weight)
    tolerance = fingerprint_tolerance(torch.float32, torch.bfloat16)
    other = weight + 0.05 * weight.norm() / weight.numel() ** 0.5 * torch.randn_like(weight)

    assert fingerprint_mismatch(saved, weight_fingerprint(weight.bfloat16()), tolerance) is None
    assert fingerprint_mismatch(saved, weight_fingerprint(other), tolerance) is not None


def test_fingerprint_nan_is_a_mismatch():
    weight = torch.randn(16, 16)
    saved = weight_fingerprint(weight)
    weight[0, 0] = float("nan")

    assert fingerprint_mismatch(saved, weight_fingerprint(weight), 1.0) is not None


def test_same_dtype_load_uses_checksum_only(tmp_path, monkeypatch):
    from torch import nn

    import kasa_peft.base_match
    from kasa_peft import KasaConfig, KasaModel, get_kasa_model

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))

    get_kasa_model(build(), KasaConfig(r=2, target_modules=["0", "2"])).save_pretrained(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the float64 fingerprint is only needed across dtypes")

    monkeypatch.setattr(kasa_peft.base_match, "weight_fingerprint", fail)
    KasaModel.from_pretrained(build(), tmp_path)

    with pytest.raises(AssertionError, match="only needed across dtypes"):
        KasaModel.from_pretrained(build().to(torch.bfloat16), tmp_path)
