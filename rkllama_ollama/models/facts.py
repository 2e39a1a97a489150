"""What a model's files say about it: details, model_info, template and special tokens.

GGUF facts come from the header (`gguf_meta`); `.rkllm` files have no readable metadata, so their
family, parameter size, quantisation and target SoC are guessed from the file name
(``Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm``, ``Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm``)
and completed from the Hugging Face files in ``tokenizer/`` (``config.json``, ``tokenizer_config.json``,
``chat_template.jinja``) when they exist.

The result is a plain JSON-able dict so the store can cache it in the model's manifest.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .capabilities import is_embedding_only
from .gguf_meta import GGUFError, read_gguf

log = logging.getLogger(__name__)

SHOW_ARRAY_LIMIT = 5  # /api/show replaces longer arrays with [] (Ollama, non-verbose)
HIDDEN_INFO_KEYS = ("general.name", "tokenizer.chat_template")

# llama.cpp file types (general.file_type) -> Ollama's quantization_level strings
GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}

_RKLLM_FAMILIES = (
    (re.compile(r"qwen3"), "qwen3"),
    (re.compile(r"qwen2|qwen-|qwen_|distill-qwen"), "qwen2"),
    (re.compile(r"gemma-?3"), "gemma3"),
    (re.compile(r"gemma-?2"), "gemma2"),
    (re.compile(r"gemma"), "gemma"),
    (re.compile(r"minicpm"), "minicpm"),
    (re.compile(r"phi-?3"), "phi3"),
    (re.compile(r"internlm"), "internlm2"),
    (re.compile(r"chatglm|glm-?4"), "chatglm"),
    (re.compile(r"baichuan"), "baichuan"),
    (re.compile(r"smollm|tinyllama|llama|mistral"), "llama"),
    (re.compile(r"deepseek"), "deepseek"),
    (re.compile(r"qwen"), "qwen"),
)
_SIZE_RE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([bBmM])(?![A-Za-z0-9])")
_RKLLM_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(w\d+a\d+(?:_g\d+)?)", re.IGNORECASE)
_PLATFORM_RE = re.compile(r"(?<![A-Za-z0-9])(rk\d{4})", re.IGNORECASE)
_GGUF_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE
)
TEMPLATE_FILES = ("chat_template.jinja",)


def format_parameter_count(count: int) -> str:
    """Ollama-style short size: ``8.0B``, ``1.5B``, ``135M``, ``33.4M``."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            value = count / scale
            if unit in ("T", "B") or value < 100:
                return f"{value:.1f}{unit}"
            return f"{value:.0f}{unit}"
    return str(count) if count > 0 else ""


def show_model_info(metadata: dict[str, Any]) -> dict[str, Any]:
    """GGUF metadata as /api/show's model_info: long arrays become [], name and template are removed."""
    info: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in HIDDEN_INFO_KEYS:
            continue
        info[key] = value
    return info


def gguf_whole_arrays_and_tensors(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """For `/api/show` with `verbose`: every array of the GGUF metadata whole (the cached facts keep
    only short ones), and the tensor list as Ollama shows it (name, ggml type, shape). Reads the header
    again, vocabulary included: a few hundred milliseconds on a large vocabulary, so only when asked.
    Raises GGUFError / OSError when the file cannot be read."""
    header = read_gguf(path, max_array_items=None, tensor_infos=True)
    arrays = {
        key: value
        for key, value in header.metadata.items()
        if isinstance(value, list) and key not in HIDDEN_INFO_KEYS
    }
    tensors = [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in header.tensors]
    return arrays, tensors


def gguf_facts(path: Path) -> dict[str, Any]:
    """Facts from a GGUF header. Raises GGUFError / OSError when the file cannot be read."""
    header = read_gguf(path, max_array_items=SHOW_ARRAY_LIMIT)
    metadata = dict(header.metadata)
    for key, length in header.array_lengths.items():
        if length > SHOW_ARRAY_LIMIT:
            metadata[key] = []
    architecture = str(metadata.get("general.architecture") or "")
    parameter_count = metadata.get("general.parameter_count") or header.parameter_count
    if parameter_count and "general.parameter_count" not in metadata:
        metadata["general.parameter_count"] = parameter_count
    size_label = metadata.get("general.size_label")
    parameter_size = size_label if isinstance(size_label, str) and size_label else ""
    if not parameter_size and isinstance(parameter_count, int):
        parameter_size = format_parameter_count(parameter_count)
    quantization = GGUF_FILE_TYPES.get(metadata.get("general.file_type", -1), "")
    if not quantization:
        match = _GGUF_QUANT_RE.search(path.stem)
        quantization = match.group(1).upper() if match else ""
    chat_template = header.metadata.get("tokenizer.chat_template")
    return {
        "architecture": architecture,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": architecture,
            "families": [architecture] if architecture else None,
            "parameter_size": parameter_size,
            "quantization_level": quantization,
        },
        "model_info": show_model_info(metadata),
        "chat_template": chat_template if isinstance(chat_template, str) else None,
        "bos_token": header.special_tokens.get("bos", ""),
        "eos_token": header.special_tokens.get("eos", ""),
        "max_context_length": _int(metadata.get(f"{architecture}.context_length")),
        "embedding_length": _int(metadata.get(f"{architecture}.embedding_length")),
        "embedding_only": is_embedding_only(architecture, metadata),
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("unreadable json path=%s error=%s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return ""


def _hf_chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def guess_rkllm_name_facts(file_name: str) -> dict[str, str]:
    """Family, parameter size, quantisation and SoC from an ``.rkllm`` file name ("" when unknown)."""
    lowered = file_name.lower()
    family = next((name for pattern, name in _RKLLM_FAMILIES if pattern.search(lowered)), "")
    size = _SIZE_RE.search(Path(file_name).stem)
    quant = _RKLLM_QUANT_RE.search(file_name)
    platform = _PLATFORM_RE.search(file_name)
    return {
        "family": family,
        "parameter_size": f"{size.group(1)}{size.group(2).upper()}" if size else "",
        "quantization_level": quant.group(1).upper() if quant else "",
        "platform": platform.group(1).upper() if platform else "",
    }


def hf_support_files(folder: Path, tokenizer_dir: Path | None = None) -> list[Path]:
    """Hugging Face files whose change invalidates cached `rkllm_facts`."""
    tokenizer = tokenizer_dir or folder / "tokenizer"
    names = ("config.json", "tokenizer_config.json", "chat_template.json", *TEMPLATE_FILES)
    return [base / name for base in (tokenizer, folder) for name in names]


def rkllm_facts(path: Path, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Facts for an ``.rkllm`` model: the file name, plus the HF files in `tokenizer_dir` (by default
    the model's ``tokenizer/`` folder; the Hugging Face cache snapshot for RKLLama models) if present."""
    folder = path.parent
    guessed = guess_rkllm_name_facts(path.name)
    config: dict[str, Any] = {}
    tokenizer_config: dict[str, Any] = {}
    chat_template: str | None = None
    for base in (tokenizer_dir or folder / "tokenizer", folder):
        config = config or _read_json(base / "config.json")
        tokenizer_config = tokenizer_config or _read_json(base / "tokenizer_config.json")
        for name in TEMPLATE_FILES:
            if chat_template is None and (base / name).is_file():
                try:
                    chat_template = (base / name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    log.warning("unreadable chat template path=%s error=%s", base / name, exc)
    chat_template = chat_template or _hf_chat_template(tokenizer_config)
    for base in (tokenizer_dir or folder / "tokenizer", folder):  # {"chat_template": ...} of processors
        chat_template = chat_template or _hf_chat_template(_read_json(base / "chat_template.json"))
    family = guessed["family"] or str(config.get("model_type") or "")
    architecture = family or "rkllm"
    max_context = _int(config.get("max_position_embeddings"))
    embedding_length = _int(config.get("hidden_size"))
    model_info: dict[str, Any] = {"general.architecture": architecture, "general.basename": path.stem}
    if max_context:
        model_info[f"{architecture}.context_length"] = max_context
    if embedding_length:
        model_info[f"{architecture}.embedding_length"] = embedding_length
    if guessed["platform"]:
        model_info["rkllm.target_platform"] = guessed["platform"]
    if guessed["quantization_level"]:
        model_info["rkllm.quantization"] = guessed["quantization_level"]
    return {
        "architecture": architecture,
        "details": {
            "parent_model": "",
            "format": "rkllm",
            "family": family,
            "families": [family] if family else None,
            "parameter_size": guessed["parameter_size"],
            "quantization_level": guessed["quantization_level"],
        },
        "model_info": model_info,
        "chat_template": chat_template,
        "bos_token": _token_text(tokenizer_config.get("bos_token")),
        "eos_token": _token_text(tokenizer_config.get("eos_token")),
        "max_context_length": max_context,
        "embedding_length": embedding_length,
        "embedding_only": is_embedding_only(architecture, {}, path.name),
    }


def weights_facts(path: Path, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Facts for a weights file of either format; an unreadable GGUF gives file-name facts only."""
    if path.suffix.lower() == ".rkllm":
        return rkllm_facts(path, tokenizer_dir)
    try:
        return gguf_facts(path)
    except (GGUFError, OSError) as exc:
        log.warning("gguf metadata unreadable path=%s error=%s", path, exc)
        match = _GGUF_QUANT_RE.search(path.stem)
        return {
            "architecture": "",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "",
                "families": None,
                "parameter_size": "",
                "quantization_level": match.group(1).upper() if match else "",
            },
            "model_info": {},
            "chat_template": None,
            "bos_token": "",
            "eos_token": "",
            "max_context_length": 0,
            "embedding_length": 0,
            "embedding_only": False,
        }
