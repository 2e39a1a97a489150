"""RKLLM engine: ctypes binding of librkllmrt for ABI families C (1.1.x) to F (1.3.0).

abi.py      ctypes layouts and signatures per family
library.py  find the library, detect version/family (child-process probe), open it
params.py   Modelfile / Ollama options -> RKLLMParam values
tokens.py   prompt tokenisation and chat-template facts of a tokenizer folder
session.py  RkllmRuntime.load(spec) -> RkllmSession (runtime/base.py Session)

Nothing here is imported by the daemon process; the runner child imports session.py.
"""
