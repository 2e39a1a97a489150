"""RKLLM engine: ctypes binding of librkllmrt for ABI families C (1.1.x) to F (1.3.0).

abi.py      ctypes layouts and signatures per family
library.py  find the library, detect version/family (file literal, banner probe), open it
npu.py      the board's NPU facts: SoC, driver version, device nodes and access (no native code)
startup.py  the runtime's start-up lines -> cause and fix (no device, bad model, NPU memory, ...)
params.py   Modelfile / Ollama options -> RKLLMParam values
tokens.py   prompt tokenisation and chat-template facts of a tokenizer folder
session.py  RkllmRuntime.load(spec) -> RkllmSession (runtime/base.py Session)

The daemon process never loads the vendor library: the runner child imports session.py; the daemon
imports only the pure-Python startup.py and npu.py (to explain a runner that crashed while loading).
"""
