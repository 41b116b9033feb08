"""On-disk cache for SVD truncations, keyed by the content of the weight.

Computing the r smallest singular triplets of every targeted weight dominates the time
it takes to attach KaSA adapters to a large model. The triplets depend only on the
weight, the method and the engine, so they can be reused across runs:

    cache = TruncationCache("~/.cache/kasa-peft/truncations")
    truncation = cache.get_or_compute(layer.weight, r=16)

Each entry is one safetensors file named after a SHA-256 digest of the weight's bytes,
dtype and shape, the method, its tolerance and ``truncation.ENGINE_VERSION``. A file
stores the ``rank`` smallest triplets in descending order, so a request for ``r <= rank``
is served by slicing the last r of them. A request for more recomputes and replaces the
entry. Files are written to a temporary name and renamed, so readers never see a
partial file. A file that cannot be read, does not fit its key, or whose triplets are not
singular triplets of the weight with non-negative values in descending order (checked
with one float32 pass over the weight, about 0.1 s for 11008 x 4096 on 2 CPU cores) is
logged and recomputed. The check catches damaged files; it cannot tell whether valid
triplets are the smallest ones, which the key (a digest of the weight) already ties
to the computation that wrote them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import truncation
from .adapter_files import apply_default_permissions
from .truncation import DEFAULT_TOL, TRUNCATION_METHODS, Truncation

logger = logging.getLogger(__name__)

CACHE_FORMAT = "kasa-peft-truncation-1"
_HASH_CHUNK_BYTES = 64 * 2**20
# A served entry must have relative residuals and orthogonality errors below this (or
# below 2 * tol for a looser tol). Correct entries, stored as float32 factors and checked in
# float32, reached at most 5e-8 on random and all-MiniLM-L6-v2 weights.
_ENTRY_CHECK_TOL = 1e-6


class TruncationCache:
    """A directory of cached ``smallest_singular_triplets`` results.

    Args:
        directory: where the entries live; created on first write. ``~`` is expanded.
            It must not be a file, nor lie inside one.
        min_rank: compute and store at least this many triplets (capped at
            ``min(out, in) - 1``), so that later requests for a larger r up to this value
            are served from the same entry. 0 stores exactly the requested r.

    Attributes:
        hits: requests served from a file.
        misses: requests that computed the triplets (missing, smaller or unreadable entry).
    """

    def __init__(self, directory: str | os.PathLike[str], *, min_rank: int = 0) -> None:
        if not isinstance(min_rank, int) or isinstance(min_rank, bool) or min_rank < 0:
            raise ValueError(f"min_rank={min_rank!r} is invalid: expected a non-negative integer.")
        self.directory = Path(directory).expanduser()
        for folder in (self.directory, *self.directory.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise ValueError(
                        f"truncation cache folder {self.directory} cannot be created, because {folder} is a "
                        "file. Pass the path of a folder, existing or new."
                    )
                break
        self.min_rank = min_rank
        self.hits = 0
        self.misses = 0

    def get_or_compute(
        self, matrix: torch.Tensor, r: int, method: str = "auto", *, tol: float = DEFAULT_TOL
    ) -> Truncation:
        """Return the r smallest singular triplets of ``matrix``, from the cache if possible.

        Arguments and errors are those of ``truncation.smallest_singular_triplets``; the
        result is on the matrix's device.
        """
        truncation._validate_matrix(matrix)
        if method not in TRUNCATION_METHODS:
            raise ValueError(f"truncation method {method!r} is unknown; expected one of {TRUNCATION_METHODS}.")
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        truncation.validate_rank(r, shape, in_model=False)

        path = self.entry_path(matrix, method, tol=tol)
        cached = self._load(path, shape)
        if cached is not None and cached.rank >= r:
            served = _last_triplets(cached, r, matrix.device)
            if self._check_triplets(path, matrix, served, tol):
                self.hits += 1
                logger.debug("truncation cache hit: %s (rank %d, requested %d)", path.name, cached.rank, r)
                return served

        self.misses += 1
        rank = max(r, min(self.min_rank, min(shape) - 1))
        logger.debug("truncation cache miss: %s; computing rank %d", path.name, rank)
        computed = truncation.smallest_singular_triplets(matrix, rank, method, tol=tol)
        self._store(path, computed, shape, method, tol)
        return _last_triplets(computed, r, matrix.device)

    def entry_path(self, matrix: torch.Tensor, method: str = "auto", *, tol: float = DEFAULT_TOL) -> Path:
        """Return the path of the entry for this weight and method (which may not exist yet)."""
        digest = hashlib.sha256()
        digest.update(_key_header(matrix, method, tol).encode())
        _update_with_tensor_bytes(digest, matrix.detach())
        return self.directory / f"{digest.hexdigest()}.safetensors"

    def _load(self, path: Path, shape: tuple[int, int]) -> Truncation | None:
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
            cached = Truncation(U=tensors["U"], S=tensors["S"], Vh=tensors["Vh"])
            _check_entry(cached, shape)
        except (OSError, SafetensorError, KeyError, ValueError) as error:
            logger.warning("Truncation cache entry %s is unreadable (%s); recomputing it.", path, error)
            return None
        return cached

    @staticmethod
    def _check_triplets(path: Path, matrix: torch.Tensor, served: Truncation, tol: float) -> bool:
        """Return whether ``served`` are singular triplets of ``matrix``; log a warning if not.

        The values must also be non-negative and in descending order. Whether they are the
        smallest ones cannot be checked without the rest of the spectrum.
        """
        values = served.S
        if bool((values < 0).any()) or bool((values[1:] > values[:-1]).any()):
            logger.warning(
                "Truncation cache entry %s contains singular values that are negative or not in descending order; "
                "recomputing it.",
                path,
            )
            return False
        limit = max(_ENTRY_CHECK_TOL, 2.0 * float(tol))
        residual, orthogonality = truncation.triplet_errors(matrix, served)
        if residual <= limit and orthogonality <= limit:
            return True
        logger.warning(
            "Truncation cache entry %s does not contain singular triplets of this weight (relative residual "
            "%.1e, orthogonality error %.1e, limit %.1e); recomputing it.",
            path,
            residual,
            orthogonality,
            limit,
        )
        return False

    def _store(self, path: Path, result: Truncation, shape: tuple[int, int], method: str, tol: float) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                f"cannot create the truncation cache folder {self.directory}: {error}. Pass a writable "
                "folder, or no truncation_cache to compute without one."
            ) from error
        tensors = {
            "U": result.U.detach().cpu().contiguous(),
            "S": result.S.detach().cpu().contiguous(),
            "Vh": result.Vh.detach().cpu().contiguous(),
        }
        metadata = {
            "format": CACHE_FORMAT,
            "engine_version": truncation.ENGINE_VERSION,
            "method": method,
            "tol": repr(float(tol)),
            "shape": f"{shape[0]}x{shape[1]}",
            "rank": str(result.rank),
        }
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem[:16]}-", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            apply_default_permissions(temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _key_header(matrix: torch.Tensor, method: str, tol: float) -> str:
    # tol changes "auto" results only; an "exact" entry serves every tol.
    tolerance = repr(float(tol)) if method == "auto" else "-"
    shape = "x".join(str(size) for size in matrix.shape)
    return f"{CACHE_FORMAT}|{truncation.ENGINE_VERSION}|{method}|{tolerance}|{matrix.dtype}|{shape}|"


def _update_with_tensor_bytes(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed the raw bytes of ``tensor`` in row-major order to ``digest`` (no copy for a contiguous CPU tensor)."""
    tensor = tensor.contiguous()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    flat = tensor.reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _HASH_CHUNK_BYTES):
        chunk = flat[start : start + _HASH_CHUNK_BYTES]
        # ctypes exposes the tensor's memory through the buffer protocol; `chunk` stays
        # alive until update() returns, so the address remains valid.
        buffer = (ctypes.c_ubyte * chunk.numel()).from_address(chunk.data_ptr())
        digest.update(buffer)


def _check_entry(cached: Truncation, shape: tuple[int, int]) -> None:
    """Raise ValueError unless ``cached`` has the factor shapes of a truncation of ``shape``."""
    rank = cached.rank
    if cached.S.ndim != 1 or rank < 1 or rank >= min(shape):
        raise ValueError(f"stored S has shape {tuple(cached.S.shape)}, expected (rank,) with rank < {min(shape)}")
    if tuple(cached.U.shape) != (shape[0], rank) or tuple(cached.Vh.shape) != (rank, shape[1]):
        raise ValueError(
            f"stored U {tuple(cached.U.shape)} and Vh {tuple(cached.Vh.shape)} do not fit a weight of shape {shape}"
        )
    for name, tensor in (("U", cached.U), ("S", cached.S), ("Vh", cached.Vh)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"stored {name} contains non-finite values")


def _last_triplets(result: Truncation, r: int, device: torch.device) -> Truncation:
    """Return the r smallest triplets, which are the last r in descending order."""
    return Truncation(
        U=result.U[:, -r:].contiguous().to(device),
        S=result.S[-r:].contiguous().to(device),
        Vh=result.Vh[-r:, :].contiguous().to(device),
    )
