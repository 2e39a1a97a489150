"""`rkllama-ollama doctor`: what a board owner runs first. Each line is OK, WARN or PROBLEM, with a fix.

Checks, in this order: the SoC (device tree), the RKNPU driver version (sysfs/debugfs, else the kernel
log) against what the runtimes need, the NPU device nodes and this user's access to them, the
`librkllmrt.so` found (version and ABI family, identified in a child process so a bad library cannot
crash the doctor), free memory, the model store, and every installed `.rkllm` model: the SoC it was
converted for, the runtime version it was converted for against the installed one, its context length,
its tokenizer and chat template. The exit code is 1 when a `.rkllm` model cannot run here.

Every file-system read goes through `root`, so tests run the doctor on fake board trees.
The vendor facts behind the checks are in docs/board-startup.md.
"""

from __future__ import annotations

import enum
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rkllama_ollama.models.catalogue import Catalogue, load_catalogue
from rkllama_ollama.models.facts import guess_rkllm_name_facts
from rkllama_ollama.models.store import ModelEntry, Store, WeightsFormat
from rkllama_ollama.runtime.rkllm import npu
from rkllama_ollama.runtime.rkllm.library import PROBE_TIMEOUT_S, RkllmLibraryError, find_library, probe
from rkllama_ollama.runtime.rkllm.startup import diagnose

IDENTIFY_TIMEOUT_S = 120.0
LOW_MEMORY_BYTES = 1 << 30
HEAD_BYTES = 1 << 20  # how much of a .rkllm file is searched for readable metadata


class Level(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    PROBLEM = "PROBLEM"


@dataclass(frozen=True)
class Finding:
    level: Level
    topic: str
    text: str
    fix: str = ""
    blocks: bool = False  # a .rkllm model cannot run because of this


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: Level, topic: str, text: str, fix: str = "", *, blocks: bool = False) -> None:
        self.findings.append(Finding(level, topic, text, fix, blocks or level is Level.PROBLEM))

    @property
    def exit_code(self) -> int:
        return 1 if any(f.blocks for f in self.findings) else 0

    def render(self) -> str:
        width = max((len(f.topic) for f in self.findings), default=0)
        lines = []
        for f in self.findings:
            lines.append(f"{f.level.value:<8} {f.topic:<{width}}  {f.text}")
            if f.fix:
                lines.append(f"{'':<8} {'':<{width}}  fix: {f.fix}")
        problems = sum(f.level is Level.PROBLEM for f in self.findings)
        warnings = sum(f.level is Level.WARN for f in self.findings)
        verdict = "an .rkllm model cannot run here" if self.exit_code else "nothing stops the models"
        lines.append(f"{problems} problem(s), {warnings} warning(s): {verdict}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RuntimeInfo:
    path: str
    version: str
    family: str
    source: str


@dataclass(frozen=True)
class ModelOrigin:
    """What a .rkllm file was converted for, and how we know."""

    platform: str | None  # rk3588 / rk3576 / ...
    toolkit: str | None  # the RKLLM version it was converted with
    max_context: int  # 0 = unknown
    source: str  # "file", "file name", "catalogue", or joined


# ------------------------------------------------------------------------------------------------ versions


def version_key(version: str) -> tuple[int, ...]:
    """Orderable: 1.2.1b1 sorts before 1.2.1."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)(?:b(\d+))?", version)
    if not match:
        return (0,)
    major, minor, patch, beta = match.groups()
    return (int(major), int(minor), int(patch), 0 if beta else 1, int(beta or 0))


# ------------------------------------------------------------------------------------------------ model facts

_META_PLATFORM = re.compile(rb"(?i)target_platform[\"':=\s]{1,4}(rk35\d\ds?|rv1126b)")
_META_TOOLKIT = re.compile(
    rb"(?i)(?:toolkit_version|rkllm-toolkit version)[\"':=\s]{1,4}v?(\d+\.\d+\.\d+(?:b\d+)?)"
)
_META_CONTEXT = re.compile(rb"(?i)max_context(?:_len|_limit)?[\"':=\s]{1,4}(\d+)")
_NAME_TOOLKIT = re.compile(
    r"(?i)(?:rkllm|toolkit|v)[-_ ]?(1\.\d+\.\d+(?:b\d+)?)|[-_](1\.[0-3]\.\d+(?:b\d+)?)(?=[-_.])"
)


def _soc_name(text: str) -> str:
    value = text.lower()
    return npu.SOC_ALIASES.get(value, value)


def model_origin(weights: Path, catalogue: Catalogue | None) -> ModelOrigin:
    """Platform / toolkit / context of a .rkllm file: readable metadata in the file first, then the file
    name, then the catalogue entry whose file it is."""
    platform: str | None = None
    toolkit: str | None = None
    max_context = 0
    sources: list[str] = []
    try:
        with weights.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        head = b""
    if (m := _META_PLATFORM.search(head)) is not None:
        platform = _soc_name(m.group(1).decode())
    if (m := _META_TOOLKIT.search(head)) is not None:
        toolkit = m.group(1).decode()
    if (m := _META_CONTEXT.search(head)) is not None:
        max_context = int(m.group(1))
    if platform or toolkit or max_context:
        sources.append("file")
    named = guess_rkllm_name_facts(weights.name)
    if platform is None and named["platform"]:
        platform = _soc_name(named["platform"])
        sources.append("file name")
    if toolkit is None and (in_name := _NAME_TOOLKIT.search(weights.name)) is not None:
        toolkit = in_name.group(1) or in_name.group(2)
        sources.append("file name")
    if catalogue is not None and (platform is None or toolkit is None or not max_context):
        for name in catalogue.names():
            for soc in catalogue.socs_for(name):
                entry = catalogue.lookup(name, soc)
                if entry.file == weights.name:
                    platform = platform or entry.soc
                    toolkit = toolkit or entry.toolkit or None
                    max_context = max_context or entry.max_context
                    sources.append("catalogue")
    return ModelOrigin(platform, toolkit, max_context, ", ".join(dict.fromkeys(sources)) or "nothing")


# ------------------------------------------------------------------------------------------------ checks


def check_soc(report: Report, root: Path) -> str | None:
    soc = npu.detect_soc(root)
    if soc is None:
        compatible = ", ".join(npu.device_tree_compatible(root)) or "no device tree"
        report.add(
            Level.PROBLEM,
            "soc",
            f"no Rockchip NPU: this machine is not an RK3588/RK3576/RK3562/RV1126B board ({compatible})",
            ".rkllm models run only on a Rockchip board with an NPU; on this machine use GGUF models on the "
            "CPU (rkllama-ollama pull hf.co/<org>/<repo>:Q4_K_M)",
        )
        return None
    model = npu.board_model(root)
    report.add(Level.OK, "soc", soc.upper() + (f" ({model})" if model else ""))
    return soc


_BANNER_DRIVER = re.compile(r"rknpu driver version:\s*v?(\d+\.\d+\.\d+)")


def check_runtime_start(
    report: Report, runtime: RuntimeInfo, environ: Mapping[str, str], root: Path
) -> str | None:
    """rkllm_init in a child process with a model that does not exist: the runtime opens the NPU and
    prints its banner (the driver version it sees), or says why it cannot. Returns that driver version."""
    result = probe(runtime.path, PROBE_TIMEOUT_S, dict(environ))
    lines = result.output.splitlines()
    problem = diagnose(lines, root)
    if problem is not None and problem.fatal:
        report.add(Level.PROBLEM, "runtime start", problem.summary(), problem.fix)
        return None
    banner = next((line.strip() for line in lines if "rkllm-runtime version:" in line), None)
    if banner is None:
        report.add(
            Level.WARN,
            "runtime start",
            "rkllm_init printed no version banner and no known error",
            "look at the runner log of the first load (rkllama-ollama serve with RKLLAMA_LOG_LEVEL=debug)",
        )
        return None
    report.add(Level.OK, "runtime start", f"rkllm_init opens the NPU: {banner}")
    if problem is not None:  # a warning, e.g. the driver is too old: check_driver says it with its fix
        report.add(Level.WARN, "runtime start", problem.summary(), problem.fix)
    match = _BANNER_DRIVER.search(banner)
    return match.group(1) if match else None


def check_driver(
    report: Report,
    root: Path,
    soc: str | None,
    runtime: RuntimeInfo | None,
    banner_driver: str | None = None,
) -> None:
    version, where = npu.driver_version(root)
    if version is None and banner_driver is not None:
        version, where = banner_driver, "the runtime's start-up banner"
    needs = f"{npu.DRIVER_RECOMMENDED} recommended, at least {npu.DRIVER_MINIMUM}"
    who = f"runtime {runtime.version} needs" if runtime else "the RKLLM runtimes (1.1.0-1.3.0) need"
    if version is None:
        report.add(
            Level.WARN,
            "npu driver",
            f"RKNPU driver version unknown ({where}); {who} {needs}",
            "run the doctor as root (sudo rkllama-ollama doctor) to read /sys/kernel/debug/rknpu/version",
        )
        return
    key = npu.version_tuple(version)
    if key < npu.version_tuple(npu.DRIVER_MINIMUM):
        report.add(
            Level.PROBLEM,
            "npu driver",
            f"RKNPU driver {version} (from {where}) is too old: {who} {needs}",
            f"upgrade the board's kernel / RKNPU driver to {npu.DRIVER_RECOMMENDED} (vendor kernel 5.10/6.1)",
        )
    elif key < npu.version_tuple(npu.DRIVER_RECOMMENDED):
        report.add(
            Level.WARN,
            "npu driver",
            f"RKNPU driver {version} ({where}): the runtimes are documented for {npu.DRIVER_RECOMMENDED}",
            f"upgrade the RKNPU driver to {npu.DRIVER_RECOMMENDED} if generation fails or prints garbage",
        )
    else:
        report.add(Level.OK, "npu driver", f"RKNPU driver {version} (from {where}); {who} {needs}")


def check_devices(report: Report, nodes: list[npu.DeviceNode], root: Path) -> None:
    if not nodes:
        report.add(
            Level.PROBLEM,
            "npu device",
            "no NPU device node: neither /dev/rknpu nor a /dev/dri/renderD* node of the rknpu driver",
            npu.device_access_fix(root),
        )
        return
    usable = [node for node in nodes if node.accessible]
    listed = ", ".join(
        f"/{node.path.relative_to(root).as_posix()} (group {node.group or '?'})" for node in nodes
    )
    if usable:
        report.add(Level.OK, "npu device", f"{listed}: {npu.user_name()} may open it")
        return
    node = nodes[0]
    group = node.group or "render"
    report.add(
        Level.PROBLEM,
        "npu device",
        f"{listed}: {npu.user_name()} may not open it (not in group '{group}')",
        f"sudo usermod -aG {group} {npu.user_name()} and log in again; for the systemd service add "
        f"SupplementaryGroups={group}",
    )


def identify_runtime(path: str, environ: Mapping[str, str]) -> RuntimeInfo | str:
    """The runtime's identity from a child process; an error message instead when it cannot be told."""
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "rkllama_ollama.runtime.rkllm.library", path],
            capture_output=True,
            timeout=IDENTIFY_TIMEOUT_S,
            env=dict(environ),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"identifying {path} took longer than {IDENTIFY_TIMEOUT_S:.0f}s"
    for line in reversed(completed.stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            if "error" in data:
                return str(data["error"])
            return RuntimeInfo(data["path"], data["version"], data["family"], data["source"])
    return f"identifying {path} failed (exit status {completed.returncode})"


_SOURCE_WORDS = {
    "file": "read from the library file",
    "probe": "from its start-up banner",
    "override": "set by RKLLAMA_RKLLM_VERSION",
    "symbols": "guessed from its exported functions",
}


def check_runtime(report: Report, environ: Mapping[str, str], has_rkllm_models: bool) -> RuntimeInfo | None:
    try:
        path = find_library(dict(environ))
    except RkllmLibraryError as exc:
        report.add(
            Level.PROBLEM if has_rkllm_models else Level.WARN,
            "runtime",
            str(exc),
            "download librkllmrt.so of the release your models were converted for from airockchip/rknn-llm "
            "(rkllm-runtime/Linux/librkllm_api/aarch64/) to /usr/lib, or set RKLLAMA_RKLLM_LIB",
        )
        return None
    identity = identify_runtime(path, environ)
    if isinstance(identity, str):
        report.add(
            Level.PROBLEM if has_rkllm_models else Level.WARN,
            "runtime",
            identity,
            "install a supported librkllmrt.so (1.1.x, 1.2.0, 1.2.1b1, 1.2.1-1.2.3, 1.3.0)",
        )
        return None
    report.add(
        Level.OK,
        "runtime",
        f"{identity.path}: RKLLM runtime {identity.version}, ABI family {identity.family} "
        f"({_SOURCE_WORDS.get(identity.source, identity.source)})",
    )
    return identity


def read_available_memory(root: Path) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def check_memory(report: Report, root: Path) -> int | None:
    available = read_available_memory(root)
    if available is None:
        report.add(Level.WARN, "memory", "free memory unknown (no /proc/meminfo)")
    elif available < LOW_MEMORY_BYTES:
        report.add(
            Level.WARN,
            "memory",
            f"{_gib(available)} available",
            "stop other programs or use a smaller model; a model needs about its file size in RAM",
        )
    else:
        report.add(Level.OK, "memory", f"{_gib(available)} available")
    return available


def check_store(report: Report, models_dir: Path, entries: list[ModelEntry]) -> None:
    if not models_dir.is_dir():
        report.add(
            Level.WARN,
            "store",
            f"{models_dir} does not exist yet",
            "it is created by the first `rkllama-ollama pull`; set RKLLAMA_MODELS to use an existing store",
        )
        return
    rkllm = sum(entry.format == WeightsFormat.RKLLM for entry in entries)
    writable = os.access(models_dir, os.W_OK)
    text = f"{models_dir}: {rkllm} .rkllm and {len(entries) - rkllm} .gguf model(s)"
    if writable:
        report.add(Level.OK, "store", text)
    else:
        report.add(Level.WARN, "store", text + ", not writable", f"pulls need write access to {models_dir}")


def _hf_cache_has(repo: str | None, environ: Mapping[str, str]) -> bool:
    if not repo or "/" not in repo:
        return False
    hf_home = Path(
        environ.get("HF_HOME") or Path(environ.get("HOME", str(Path.home()))) / ".cache/huggingface"
    )
    hub = Path(environ.get("HF_HUB_CACHE") or hf_home / "hub")
    return (hub / ("models--" + repo.replace("/", "--"))).is_dir()


def check_model(
    report: Report,
    entry: ModelEntry,
    soc: str | None,
    runtime: RuntimeInfo | None,
    available: int | None,
    catalogue: Catalogue | None,
    environ: Mapping[str, str],
) -> None:
    topic = f"model {entry.name.display}"
    origin = model_origin(entry.weights, catalogue)
    file_name = entry.weights.name
    if origin.platform is None:
        report.add(Level.WARN, topic, f"{file_name}: the SoC it was converted for is not known (no metadata)")
    elif soc is not None and origin.platform != soc:
        report.add(
            Level.PROBLEM,
            topic,
            f"{file_name} was converted for {origin.platform.upper()} ({origin.source}), this board is "
            f"{soc.upper()}: it cannot load",
            f"pull the {soc.upper()} build of this model (catalogue names pick it automatically) or convert "
            f"it with rkllm-toolkit for target_platform={soc}",
        )
    elif soc is not None:
        report.add(Level.OK, topic, f"{file_name}: converted for {origin.platform.upper()} ({origin.source})")
    if origin.toolkit is None:
        report.add(Level.WARN, topic, "the RKLLM version it was converted with is not known")
    elif origin.toolkit.startswith("1.0."):
        report.add(
            Level.PROBLEM,
            topic,
            f"converted with RKLLM {origin.toolkit}: runtimes from 1.1.0 on do not load 1.0.x models",
            "use a build converted with rkllm-toolkit 1.1 or newer",
        )
    elif runtime is not None and version_key(origin.toolkit) > version_key(runtime.version):
        report.add(
            Level.WARN,
            topic,
            f"converted with RKLLM {origin.toolkit}, newer than the installed runtime {runtime.version}: "
            "loading is not promised",
            f"install librkllmrt.so {origin.toolkit} or newer",
        )
    else:
        against = f" (runtime {runtime.version})" if runtime is not None else ""
        report.add(Level.OK, topic, f"converted with RKLLM {origin.toolkit}{against}")
    num_ctx = entry.context_length
    if origin.max_context and num_ctx > origin.max_context:
        report.add(
            Level.WARN,
            topic,
            f"context {num_ctx} tokens asked, the model was converted for at most {origin.max_context}",
            f"set NUM_CTX={origin.max_context} (or lower) in {entry.folder / 'Modelfile'}",
        )
    else:
        limit = f" (converted for up to {origin.max_context})" if origin.max_context else ""
        asked = (
            f"context {num_ctx} tokens" if num_ctx else "context: no NUM_CTX, the request's num_ctx applies"
        )
        report.add(Level.OK, topic, asked + limit)
    repo = entry.modelfile.huggingface_path
    if entry.tokenizer_dir is not None and entry.chat_template:
        report.add(Level.OK, topic, f"tokenizer and chat template in {entry.tokenizer_dir}")
    elif _hf_cache_has(repo, environ):
        report.add(Level.OK, topic, f"tokenizer from the Hugging Face cache ({repo})")
    else:
        missing = "chat template" if entry.tokenizer_dir is not None else "tokenizer and chat template"
        report.add(
            Level.WARN,
            topic,
            f"no {missing} found: prompts fall back to a generic template",
            f"pull the model again (it fetches the tokenizer of HUGGINGFACE_PATH={repo})"
            if repo
            else "add HUGGINGFACE_PATH=<org>/<repo> of the original model to its Modelfile and pull it again",
        )
    if available is not None and entry.weights.stat().st_size > available:
        report.add(
            Level.WARN,
            topic,
            f"the file ({_gib(entry.weights.stat().st_size)}) is larger than the available memory",
            "free memory or use a smaller model",
        )


def run_doctor(
    models_dir: Path,
    root: Path = npu.ROOT,
    environ: Mapping[str, str] | None = None,
    catalogue: Catalogue | None = None,
) -> Report:
    env = dict(os.environ if environ is None else environ)
    report = Report()
    soc = check_soc(report, root)
    entries = [] if not models_dir.is_dir() else Store(models_dir, offer_embedded=False).list()
    rkllm_models = [entry for entry in entries if entry.format == WeightsFormat.RKLLM]
    # The runtime is identified before the driver line is written: the driver line says what it needs.
    runtime_report = Report()
    runtime = check_runtime(runtime_report, env, bool(rkllm_models))
    nodes = npu.npu_nodes(root)
    banner_driver = None
    if runtime is not None and soc is not None and nodes:
        # Only where an NPU can be there: elsewhere the doctor already said why nothing can run.
        banner_driver = check_runtime_start(runtime_report, runtime, env, root)
    check_driver(report, root, soc, runtime, banner_driver)
    check_devices(report, nodes, root)
    report.findings += runtime_report.findings
    available = check_memory(report, root)
    check_store(report, models_dir, entries)
    if catalogue is None:
        catalogue = load_catalogue()
    for entry in rkllm_models:
        check_model(report, entry, soc, runtime, available, catalogue, env)
    return report
