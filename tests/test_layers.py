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
    "generation_events": 4,
    "generation_plan": 4,
    "generation_relay": 4,
    "request_checks": 4,
    "model_admin": 4,
    "api": 5,
    "daemon": 6,
    "doctor": 6,
    "cli": 7,
}

# What the `rkllama-ollama` command may load before a subcommand runs: itself and its settings. The
# server's modules (serve, doctor, the store for create) load inside the command that needs them.
CLI_START_UP = {
    "rkllama_ollama",
    "rkllama_ollama.config",
    "rkllama_ollama.durations",
    "rkllama_ollama.runtime",
    "rkllama_ollama.runtime.cpus",
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


def _module_level_imports(path: Path) -> list[str]:
    """The package's modules a file imports at module level (not inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return [name for name in found if name.split(".")[0] == "rkllama_ollama"]


def test_the_cli_imports_no_server_module_at_start_up() -> None:
    allowed = CLI_START_UP | {"rkllama_ollama.cli"}
    static = []
    for path in (PACKAGE / "cli").glob("*.py"):
        for imported in _module_level_imports(path):
            if imported not in allowed and not imported.startswith("rkllama_ollama.cli."):
                static.append(f"cli/{path.name} imports {imported}")
    assert static == []
    code = (
        "import json, sys; import rkllama_ollama.cli, rkllama_ollama.cli.repl; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rkllama_ollama'))))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout
    )
    assert "rkllama_ollama.cli.commands" in loaded
    assert [m for m in loaded if m not in allowed and not m.startswith("rkllama_ollama.cli.")] == []
