"""The layer map of docs/architecture.md, enforced: a module imports only its own layer and the layers
below it, and the server process never loads an engine (llama.cpp, the RKLLM ctypes binding, tokenizers)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rkllama_ollama"

# Lower numbers are lower layers.
LAYERS = {
    "runtime": 0,
    "notify": 0,
    "models": 1,
    "durations": 1,
    "chat": 2,
    "options": 2,
    "structured": 2,
    "config": 2,
    "residency": 3,
    "scheduler": 3,
    "generation": 4,
    "model_admin": 4,
    "api": 5,
    "daemon": 6,
    "client": 6,
    "doctor": 6,
    "cli_format": 6,
    "cli_repl": 7,
    "cli": 8,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else -1  # the package root (__version__) is below all


def imports_of(path: Path, module: str, is_package: bool) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                found.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.append(node.module)
    return [name for name in found if name.split(".")[0] == "rkllama_ollama"]


def test_every_module_has_a_layer() -> None:
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    tops -= {"__init__", "py.typed"}
    assert tops <= set(LAYERS), tops - set(LAYERS)


def test_imports_only_run_downward() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        if module == "rkllama_ollama":
            continue
        for imported in imports_of(path, module, relative.name == "__init__"):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_the_server_process_loads_no_engine() -> None:
    heavy = [
        "llama_cpp",
        "transformers",
        "tokenizers",
        "numpy",
        "PIL",
        "gguf",
        "rkllama_ollama.runtime.rkllm.session",
        "rkllama_ollama.runtime.llamacpp",
        "huggingface_hub.hf_api",
    ]
    code = (
        "import json, sys; import rkllama_ollama.api.app, rkllama_ollama.daemon; "
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout
    )
    assert loaded == []
