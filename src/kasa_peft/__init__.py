"""kasa-peft: non-destructive KaSA adapters for PyTorch and transformers models.

KaSA (Knowledge-aware Singular-value Adaptation, Wang et al., ICLR 2025) removes the r
smallest singular triplets of each targeted weight and learns an update
``scaling * B diag(d) A`` in their place. See ``KasaConfig`` and ``get_kasa_model``.
"""

from ._version import __version__
from .config import KasaConfig
from .layer import KasaAdapter, KasaLayer
from .model import KasaModel, get_kasa_model
from .truncation import Truncation, smallest_singular_triplets
from .truncation_cache import TruncationCache

__all__ = [
    "KasaAdapter",
    "KasaConfig",
    "KasaLayer",
    "KasaModel",
    "Truncation",
    "TruncationCache",
    "__version__",
    "get_kasa_model",
    "smallest_singular_triplets",
]
