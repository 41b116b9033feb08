"""KasaLayer and KasaAdapter against plain float64 dense references."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa_peft.layer import KasaAdapter, KasaLayer, total_regularization
from kasa_peft.truncation import smallest_singular_triplets

SHAPES = [(24, 24), (40, 16), (16, 40)]  # square, tall (out > in), wide (out < in)


def dense_reference(weight: torch.Tensor, r: int):
    """Return the float64 (U_r, S_r, Vh_r) of the r smallest singular triplets of weight (out, in)."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:, :]


def make_layer(shape, r, conv1d=False, dtype=torch.float32, scaling=2.0, seed=0):
    torch.manual_seed(seed)
    out_features, in_features = shape
    if conv1d:
        base = Conv1D(out_features, in_features)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(in_features, out_features)
    base = base.to(dtype)
    layer = KasaLayer(base)
    truncation = smallest_singular_triplets(layer.base_weight_matrix(), r, method="exact")
    adapter = layer.add_adapter("default", truncation, scaling=scaling, dropout=0.0)
    with torch.no_grad():
        adapter.lora_B.normal_()  # B = 0 at init; a trained B exercises the update path
        adapter.lora_diag.normal_()
    layer.active_adapter = "default"
    return layer, adapter


def weight_out_in(layer: KasaLayer) -> torch.Tensor:
    return layer.base_weight_matrix().detach().to(torch.float64)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall", "wide"])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_forward_matches_dense_reference(shape, r, conv1d):
    layer, adapter = make_layer(shape, r, conv1d=conv1d)
    x = torch.randn(3, 5, shape[1])
    w = weight_out_in(layer)
    u, s, vh = dense_reference(w, r)
    a = adapter.lora_A.detach().double()
    b = adapter.lora_B.detach().double()
    d = adapter.lora_diag.detach().double()
    effective = w - u @ torch.diag(s) @ vh + adapter.scaling * b @ torch.diag(d) @ a
    expected = x.double() @ effective.T + layer.bias.detach().double()

    actual = layer(x)

    # float32 inputs and float32 factors: errors of a few float32 roundoffs times the norms.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall", "wide"])
def test_delta_weight_matches_dense_reference(shape, conv1d):
    r = 5
    layer, adapter = make_layer(shape, r, conv1d=conv1d)
    w = weight_out_in(layer)
    u, s, vh = dense_reference(w, r)
    a, b, d = (t.detach().double() for t in (adapter.lora_A, adapter.lora_B, adapter.lora_diag))
    expected = adapter.scaling * b @ torch.diag(d) @ a - u @ torch.diag(s) @ vh

    actual = adapter.delta_weight().double()

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall", "wide"])
def test_truncated_weight_is_best_rank_k_minus_r(shape):
    # Eckart-Young: W - U_r S_r Vh_r is the best rank-(k - r) approximation, so its error
    # equals the norm of the removed singular values and its rank is k - r.
    r = 3
    layer, adapter = make_layer(shape, r)
    w = weight_out_in(layer)
    truncated = w - adapter.removed_weight().double()
    s_all = torch.linalg.svdvals(w)
    k = min(shape)

    assert torch.linalg.matrix_rank(truncated, rtol=1e-5).item() == k - r
    assert math.isclose(torch.linalg.matrix_norm(w - truncated).item(), s_all[-r:].norm().item(), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_half_precision_forward(dtype, conv1d):
    shape, r = (32, 48), 4
    layer, adapter = make_layer(shape, r, conv1d=conv1d, dtype=dtype)
    assert adapter.lora_A.dtype == torch.float32
    assert adapter.removed_U.dtype == torch.float32
    x = torch.randn(4, shape[1]).to(dtype)
    w = weight_out_in(layer)
    u, s, vh = dense_reference(w, r)
    a, b, d = (t.detach().double() for t in (adapter.lora_A, adapter.lora_B, adapter.lora_diag))
    effective = w - u @ torch.diag(s) @ vh + adapter.scaling * b @ torch.diag(d) @ a
    expected = x.double() @ effective.T + layer.bias.detach().double()

    actual = layer(x)

    assert actual.dtype == dtype
    # The base matmul and the final sum round to the half dtype: allow 16 unit roundoffs
    # (2^-11 for float16, 2^-8 for bfloat16) of the output's magnitude.
    roundoff = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=16 * roundoff * scale)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_matches_dense_and_unmerge_restores_exactly(conv1d):
    layer, adapter = make_layer((20, 30), 4, conv1d=conv1d)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 30)
    unmerged_output = layer(x)
    w = weight_out_in(layer)
    expected_matrix = w + adapter.delta_weight().double()

    layer.merge("default")

    merged_matrix = layer.base_weight_matrix().double()
    torch.testing.assert_close(merged_matrix, expected_matrix, rtol=1e-6, atol=1e-6 * expected_matrix.abs().max().item())
    torch.testing.assert_close(layer(x), unmerged_output, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_disabled_layer_is_exactly_base():
    layer, _ = make_layer((16, 16), 2)
    x = torch.randn(3, 16)
    layer.disabled = True

    assert torch.equal(layer(x), layer.base_layer(x))


def test_dropout_only_on_update_branch():
    layer, adapter = make_layer((16, 12), 3)
    adapter.dropout = nn.Dropout(1.0 - 1e-7)  # drops (almost) everything in training mode
    layer.train()
    x = torch.randn(5, 12)
    w = weight_out_in(layer)
    expected = x.double() @ (w - adapter.removed_weight().double()).T + layer.bias.double()

    actual = layer(x)

    # With the update branch dropped, only the truncation acts; it must not be dropped.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


def test_zero_b_gives_truncated_model_at_init():
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    layer = KasaLayer(base)
    truncation = smallest_singular_triplets(layer.base_weight_matrix(), 2, method="exact")
    adapter = layer.add_adapter("default", truncation, scaling=1.0, dropout=0.0)
    layer.active_adapter = "default"
    x = torch.randn(4, 12)
    w = base.weight.double()
    u, s, vh = dense_reference(w, 2)

    assert torch.count_nonzero(adapter.lora_B) == 0
    expected = x.double() @ (w - u @ torch.diag(s) @ vh).T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def orthonormal(rows, cols, generator):
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64))
    return q if rows >= cols else q.T


def adapter_with(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> KasaAdapter:
    out_features, r = b.shape
    in_features = a.shape[1]
    truncation = smallest_singular_triplets(torch.randn(out_features, in_features, dtype=torch.float64), r, "exact")
    adapter = KasaAdapter(truncation, scaling=1.0, dropout=0.0, dtype=torch.float64)
    with torch.no_grad():
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        adapter.lora_diag.copy_(d)
    return adapter


def assert_gradients_match_dense(layer, adapter, reference) -> None:
    """Compare the gradients of x, A, B and d of a (3, 4, in) float64 input with a dense reference.

    ``reference(x, truncated, update)`` returns the layer's output without the bias for the
    flattened (12, in) input, given ``truncated = W - U diag(S) Vh`` and ``update = 1.5 B diag(d) A``.
    The layer's adapter scaling must be 1.5.
    """
    x = torch.randn(3, 4, layer.base_weight_matrix().shape[1], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 4, layer.base_weight_matrix().shape[0], dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()

    w = weight_out_in(layer)
    u, s, vh = (t.detach().clone() for t in (adapter.removed_U, adapter.removed_S, adapter.removed_Vh))
    a, b, d = (t.detach().clone().requires_grad_(True) for t in (adapter.lora_A, adapter.lora_B, adapter.lora_diag))
    x_ref = x.detach().clone().requires_grad_(True)
    flat = x_ref.reshape(12, -1)
    expected = reference(flat, w - (u * s) @ vh, 1.5 * (b * d) @ a) + layer.base_layer.bias.detach()
    (expected.reshape(grad_out.shape) * grad_out).sum().backward()

    for ours, expected_grad in ((x.grad, x_ref.grad), (adapter.lora_A.grad, a.grad), (adapter.lora_B.grad, b.grad), (adapter.lora_diag.grad, d.grad)):
        assert torch.allclose(ours, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_layer_gradients_match_dense_float64(conv1d, dropout):
    # float64 end to end, so the fused backward (no dropout) and plain autograd (dropout,
    # in eval mode so that both paths compute the same function) are held to 1e-10.
    layer, adapter = make_layer((7, 5), 2, conv1d=conv1d, dtype=torch.float64, scaling=1.5)
    if dropout:
        adapter.dropout = nn.Dropout(dropout)
        layer.eval()

    def reference(x_ref, truncated, update):
        return x_ref @ (truncated + update).T

    assert_gradients_match_dense(layer, adapter, reference)


class FixedMask(nn.Module):
    """A stand-in for dropout in training mode: multiplies by a fixed mask, so a reference can repeat it."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.reshape(x.shape)


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_gradients_with_dropout_in_training(conv1d):
    # The update branch receives the masked input and the removed branch the plain one.
    # Everything is float64, so the layer's gradients are held to 1e-10 against plain autograd.
    layer, adapter = make_layer((7, 5), 2, conv1d=conv1d, dtype=torch.float64, scaling=1.5)
    generator = torch.Generator().manual_seed(2)
    mask = (torch.rand(12, 5, generator=generator, dtype=torch.float64) > 0.5) * 2.0
    adapter.dropout = FixedMask(mask)
    layer.train()

    def reference(x_ref, truncated, update):
        return x_ref @ truncated.T + (x_ref * mask) @ update.T

    assert_gradients_match_dense(layer, adapter, reference)


def test_regularizer_zero_for_orthonormal_factors():
    generator = torch.Generator().manual_seed(0)
    r = 4
    a = orthonormal(r, 20, generator)  # orthonormal rows: A A^T = I_r
    b = orthonormal(30, r, generator)  # orthonormal columns: B^T B = I_r
    adapter = adapter_with(a, b, torch.zeros(r, dtype=torch.float64))

    penalty = adapter.regularization(beta=1.0, gamma=1.0)

    # Exactly zero up to float32 rounding: the Gram matrices are r x r. The out x out
    # matrix B B^T - I_30 would have norm sqrt(30 - 4), not zero.
    assert penalty.item() == pytest.approx(0.0, abs=1e-6)


def test_regularizer_known_non_orthogonal_value():
    generator = torch.Generator().manual_seed(1)
    r = 3
    a = 2.0 * orthonormal(r, 10, generator)  # A A^T = 4 I: ||3 I_3||_F = 3 sqrt(3)
    b = torch.zeros(12, r, dtype=torch.float64)  # B^T B = 0: ||-I_3||_F = sqrt(3)
    d = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # sum d^2 = 5.25
    adapter = adapter_with(a, b, d)

    penalty = adapter.regularization(beta=0.1, gamma=0.01)

    expected = 0.1 * 5.25 + 0.01 * (3 * math.sqrt(3) + math.sqrt(3))
    assert penalty.item() == pytest.approx(expected, rel=1e-6)


def test_regularizer_random_factors_match_dense():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(5, 17, generator=generator, dtype=torch.float64)
    b = torch.randn(23, 5, generator=generator, dtype=torch.float64)
    d = torch.randn(5, generator=generator, dtype=torch.float64)
    adapter = adapter_with(a, b, d)
    eye = torch.eye(5, dtype=torch.float64)
    expected = 0.3 * (d**2).sum() + 0.7 * (
        torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
    )

    penalty = adapter.regularization(beta=0.3, gamma=0.7)

    # Computed in float32 by design: relative error of a few float32 roundoffs.
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reference_code_convention_matches_dense_outer_gram():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    b = torch.randn(11, 4, generator=generator, dtype=torch.float64)
    d = torch.randn(4, generator=generator, dtype=torch.float64)
    adapter = adapter_with(a, b, d)
    expected = 0.5 * (d**2).sum() + 2.0 * (
        torch.linalg.matrix_norm(b @ b.T - torch.eye(11, dtype=torch.float64))
        + torch.linalg.matrix_norm(a.T @ a - torch.eye(9, dtype=torch.float64))
    )

    penalty = adapter.regularization(beta=0.5, gamma=2.0, gram_convention="reference-code")

    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("convention", ["paper", "reference-code"])
def test_total_regularization_matches_dense_sum(convention):
    # Three shapes, two adapters of the first, so the batched groups have one or two members.
    generator = torch.Generator().manual_seed(5)
    shapes = [(4, 9, 11), (4, 9, 11), (3, 9, 11), (4, 11, 9)]
    factors = [
        (torch.randn(r, n, generator=generator, dtype=torch.float64),
         torch.randn(m, r, generator=generator, dtype=torch.float64),
         torch.randn(r, generator=generator, dtype=torch.float64))
        for r, n, m in shapes
    ]
    adapters = [adapter_with(a, b, d) for a, b, d in factors]
    expected = 0.0
    for a, b, d in factors:
        if convention == "paper":
            gram_b, gram_a = b.T @ b, a @ a.T
        else:
            gram_b, gram_a = b @ b.T, a.T @ a
        eye_b, eye_a = (torch.eye(g.shape[0], dtype=torch.float64) for g in (gram_b, gram_a))
        orthogonality = torch.linalg.matrix_norm(gram_b - eye_b) + torch.linalg.matrix_norm(gram_a - eye_a)
        expected += float(0.3 * (d**2).sum() + 0.7 * orthogonality)

    total = total_regularization(adapters, beta=0.3, gamma=0.7, gram_convention=convention)

    # float32 arithmetic on values of order 10: a few float32 roundoffs relative.
    assert total.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no adapters"):
        total_regularization([], beta=0.3, gamma=0.7)


def test_regularizer_gradients_match_float64_autograd():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    b = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    d = torch.randn(3, generator=generator, dtype=torch.float64)
    adapter = adapter_with(a, b, d)
    adapter.regularization(beta=0.2, gamma=0.4).backward()
    a_ref, b_ref, d_ref = (t.clone().requires_grad_(True) for t in (a, b, d))
    eye = torch.eye(3, dtype=torch.float64)
    reference = 0.2 * (d_ref**2).sum() + 0.4 * (
        torch.linalg.matrix_norm(b_ref.T @ b_ref - eye) + torch.linalg.matrix_norm(a_ref @ a_ref.T - eye)
    )
    reference.backward()

    torch.testing.assert_close(adapter.lora_A.grad, a_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_B.grad, b_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_diag.grad, d_ref.grad, rtol=1e-5, atol=1e-6)


def test_add_adapter_rejects_factors_of_wrong_shape():
    layer = KasaLayer(nn.Linear(8, 6))
    wrong = smallest_singular_triplets(torch.randn(6, 9), 2, "exact")

    with pytest.raises(ValueError, match=r"do not fit a weight of shape \(6, 8\)"):
        layer.add_adapter("default", wrong, scaling=1.0, dropout=0.0)
