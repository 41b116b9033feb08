"""Tests for the on-disk truncation cache: hits, misses, slicing, recomputation and bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kasa_peft import truncation
from kasa_peft.truncation import Truncation, smallest_singular_triplets
from kasa_peft.truncation_cache import TruncationCache


def make_weight(out: int = 120, inp: int = 80, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=generator)


@pytest.fixture
def compute_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Record every (r, method) that reaches the real computation."""
    calls: list[tuple[int, str]] = []
    real = truncation.smallest_singular_triplets

    def recording(matrix: torch.Tensor, r: int, method: str = "auto", **kwargs: object) -> Truncation:
        calls.append((r, method))
        return real(matrix, r, method, **kwargs)

    monkeypatch.setattr(truncation, "smallest_singular_triplets", recording)
    return calls


def assert_same(first: Truncation, second: Truncation) -> None:
    assert torch.equal(first.U, second.U)
    assert torch.equal(first.S, second.S)
    assert torch.equal(first.Vh, second.Vh)


def test_miss_then_hit(tmp_path: Path, compute_calls: list[tuple[int, str]]) -> None:
    cache = TruncationCache(tmp_path / "cache")
    weight = make_weight()

    first = cache.get_or_compute(weight, 8)
    second = cache.get_or_compute(weight, 8)

    assert compute_calls == [(8, "auto")]
    assert (cache.misses, cache.hits) == (1, 1)
    assert_same(first, second)
    assert_same(first, smallest_singular_triplets(weight, 8))
    files = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(files) == 1, files
    assert files[0].endswith(".safetensors"), files


def test_smaller_rank_served_from_larger_entry(tmp_path: Path, compute_calls: list[tuple[int, str]]) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()

    cache.get_or_compute(weight, 12, "exact")
    smaller = cache.get_or_compute(weight, 5, "exact")

    assert compute_calls == [(12, "exact")]
    assert smaller.rank == 5
    # The 5 smallest are the last 5 of the descending triplets, the same as a direct request.
    direct = smallest_singular_triplets(weight, 5, "exact")
    assert_same(smaller, direct)


def test_larger_rank_recomputes_and_replaces(tmp_path: Path, compute_calls: list[tuple[int, str]]) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()

    cache.get_or_compute(weight, 4)
    larger = cache.get_or_compute(weight, 10)
    again = cache.get_or_compute(weight, 7)

    assert compute_calls == [(4, "auto"), (10, "auto")]
    assert (cache.misses, cache.hits) == (2, 1)
    assert larger.rank == 10
    assert_same(again, Truncation(U=larger.U[:, -7:], S=larger.S[-7:], Vh=larger.Vh[-7:, :]))
    stored = load_file(cache.entry_path(weight))
    assert stored["S"].shape == (10,)


def test_min_rank_stores_extra_triplets(tmp_path: Path, compute_calls: list[tuple[int, str]]) -> None:
    cache = TruncationCache(tmp_path, min_rank=16)
    weight = make_weight()

    small = cache.get_or_compute(weight, 4)
    larger = cache.get_or_compute(weight, 16)

    assert compute_calls == [(16, "auto")]
    assert small.rank == 4
    assert larger.rank == 16
    assert_same(small, Truncation(U=larger.U[:, -4:], S=larger.S[-4:], Vh=larger.Vh[-4:, :]))


def test_min_rank_is_capped_below_k(tmp_path: Path, compute_calls: list[tuple[int, str]]) -> None:
    cache = TruncationCache(tmp_path, min_rank=1000)
    weight = make_weight(30, 20)

    result = cache.get_or_compute(weight, 3)

    assert compute_calls == [(19, "auto")]
    assert result.rank == 3


def test_key_depends_on_content_dtype_shape_and_method(tmp_path: Path) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    changed = weight.clone()
    changed[3, 4] += 1e-3

    paths = {
        cache.entry_path(weight),
        cache.entry_path(changed),
        cache.entry_path(weight.double()),
        cache.entry_path(weight.reshape(80, 120)),
        cache.entry_path(weight, "exact"),
        cache.entry_path(weight, "auto", tol=1e-6),
    }

    assert len(paths) == 6
    assert cache.entry_path(weight.clone()) == cache.entry_path(weight)
    # A view is keyed by its values in row-major order, not by its storage.
    assert cache.entry_path(weight.mT) == cache.entry_path(weight.mT.contiguous())
    assert cache.entry_path(weight.mT) != cache.entry_path(weight.reshape(80, 120))


def test_key_includes_engine_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    before = cache.entry_path(weight)

    monkeypatch.setattr(truncation, "ENGINE_VERSION", truncation.ENGINE_VERSION + "-next")

    assert cache.entry_path(weight) != before


def test_corrupted_file_is_recomputed_with_warning(
    tmp_path: Path, compute_calls: list[tuple[int, str]], caplog: pytest.LogCaptureFixture
) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    expected = cache.get_or_compute(weight, 6)
    path = cache.entry_path(weight)
    path.write_bytes(b"this is not a safetensors file")

    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation_cache")
    result = cache.get_or_compute(weight, 6)

    assert compute_calls == [(6, "auto"), (6, "auto")]
    assert_same(result, expected)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert path.name in warnings[0]
    assert "recomputing" in warnings[0]
    # The entry was rewritten and is served again.
    assert_same(cache.get_or_compute(weight, 6), expected)
    assert cache.hits == 1


def test_truncated_file_is_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A file cut short, as a crash in the middle of a non-atomic copy would leave it.
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    expected = cache.get_or_compute(weight, 6)
    path = cache.entry_path(weight)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation_cache")
    result = cache.get_or_compute(weight, 6)

    assert cache.misses == 2
    assert_same(result, expected)
    assert any("unreadable" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "tensors",
    [
        {"U": torch.zeros(120, 6), "S": torch.zeros(6)},  # Vh missing
        {"U": torch.zeros(121, 6), "S": torch.zeros(6), "Vh": torch.zeros(6, 80)},  # wrong out
        {"U": torch.zeros(120, 6), "S": torch.zeros(5), "Vh": torch.zeros(6, 80)},  # rank mismatch
        {"U": torch.full((120, 6), float("nan")), "S": torch.zeros(6), "Vh": torch.zeros(6, 80)},
    ],
    ids=["missing-tensor", "wrong-shape", "rank-mismatch", "non-finite"],
)
def test_mismatched_entry_is_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tensors: dict[str, torch.Tensor]
) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    save_file(tensors, cache.entry_path(weight))

    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation_cache")
    result = cache.get_or_compute(weight, 6)

    assert cache.misses == 1
    assert_same(result, smallest_singular_triplets(weight, 6))
    assert any(record.levelno == logging.WARNING for record in caplog.records)


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    cache = TruncationCache(tmp_path)
    for seed in range(3):
        cache.get_or_compute(make_weight(seed=seed), 4)

    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == 3
    assert all(name.endswith(".safetensors") and not name.startswith(".") for name in names), names


def test_failed_write_removes_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kasa_peft.truncation_cache as cache_module

    def failing_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", failing_save)
    cache = TruncationCache(tmp_path)

    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(make_weight(), 4)
    assert list(tmp_path.iterdir()) == []


def test_low_precision_weight_round_trip(tmp_path: Path) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight().to(torch.bfloat16)

    computed = cache.get_or_compute(weight, 5)
    served = cache.get_or_compute(weight, 5)

    assert computed.U.dtype == torch.float32
    assert cache.hits == 1
    assert_same(computed, served)


def test_metadata_describes_entry(tmp_path: Path) -> None:
    from safetensors import safe_open

    cache = TruncationCache(tmp_path)
    weight = make_weight()
    cache.get_or_compute(weight, 5, "exact")

    with safe_open(cache.entry_path(weight, "exact"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["method"] == "exact"
    assert metadata["rank"] == "5"
    assert metadata["shape"] == "120x80"
    assert metadata["engine_version"] == truncation.ENGINE_VERSION


@pytest.mark.parametrize(
    ("r", "method", "message"),
    [(0, "auto", "r=0"), (80, "auto", "r must be below"), (4, "fast", "unknown")],
)
def test_invalid_request_raises(tmp_path: Path, r: int, method: str, message: str) -> None:
    cache = TruncationCache(tmp_path)

    with pytest.raises(ValueError) as raised:
        cache.get_or_compute(make_weight(), r, method)
    assert message in str(raised.value)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_invalid_min_rank_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_rank"):
        TruncationCache(tmp_path, min_rank=-1)


def test_user_directory_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    cache = TruncationCache("~/truncations")

    assert cache.directory == tmp_path / "truncations"


def test_damaged_triplets_are_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    stored = cache.get_or_compute(weight, 6)
    # A well-formed entry whose singular values are wrong, e.g. edited by hand.
    save_file({"U": stored.U, "S": stored.S * 2.0, "Vh": stored.Vh}, cache.entry_path(weight))

    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation_cache")
    result = cache.get_or_compute(weight, 6)

    assert (cache.misses, cache.hits) == (2, 0)
    assert_same(result, smallest_singular_triplets(weight, 6))
    assert any("does not contain singular triplets" in record.getMessage() for record in caplog.records)
    assert_same(cache.get_or_compute(weight, 6), result)  # the rewritten entry is served
    assert cache.hits == 1


@pytest.mark.parametrize("change", ["negated", "ascending"])
def test_invalid_singular_values_are_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()
    stored = cache.get_or_compute(weight, 6)
    if change == "negated":  # still singular triplets in the residual sense
        tensors = {"U": -stored.U, "S": -stored.S, "Vh": stored.Vh}
    else:
        tensors = {"U": stored.U.flip(1), "S": stored.S.flip(0), "Vh": stored.Vh.flip(0)}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, cache.entry_path(weight))

    caplog.set_level(logging.WARNING, logger="kasa_peft.truncation_cache")
    result = cache.get_or_compute(weight, 4)

    assert (cache.misses, cache.hits) == (2, 0)
    assert_same(result, smallest_singular_triplets(weight, 4))
    assert any("descending order" in record.getMessage() for record in caplog.records)


def test_loose_tol_entry_is_served(tmp_path: Path) -> None:
    cache = TruncationCache(tmp_path)
    weight = make_weight()

    cache.get_or_compute(weight, 6, tol=1e-4)
    cache.get_or_compute(weight, 6, tol=1e-4)

    assert cache.hits == 1


def test_folder_that_is_a_file_raises(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")

    with pytest.raises(ValueError, match="afile is a file"):
        TruncationCache(afile)
    with pytest.raises(ValueError, match="afile is a file"):
        TruncationCache(afile / "sub")


def test_folder_creation_failure_names_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    cache = TruncationCache(tmp_path / "new")
    monkeypatch.setattr(Path, "mkdir", failing_mkdir)

    with pytest.raises(OSError, match="cannot create the truncation cache folder .*new.*Permission denied"):
        cache.get_or_compute(make_weight(), 4)


def test_get_kasa_model_accepts_a_folder_path(tmp_path: Path) -> None:
    from kasa_peft import KasaConfig, get_kasa_model

    torch.manual_seed(0)
    config = KasaConfig(r=2, target_modules=["0"], truncation_method="exact")
    model = get_kasa_model(torch.nn.Sequential(torch.nn.Linear(8, 6)), config, truncation_cache=str(tmp_path / "c"))

    assert isinstance(model.truncation_cache, TruncationCache)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


def test_get_kasa_model_rejects_other_cache_types() -> None:
    from kasa_peft import KasaConfig, get_kasa_model

    config = KasaConfig(r=2, target_modules=["0"])
    base = torch.nn.Sequential(torch.nn.Linear(8, 6))

    with pytest.raises(TypeError, match="truncation_cache=5 is invalid: expected a folder path"):
        get_kasa_model(base, config, truncation_cache=5)
    assert isinstance(base[0], torch.nn.Linear)
