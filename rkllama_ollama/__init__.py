"""rkllama-ollama: an Ollama-compatible daemon for Rockchip NPUs (RKLLM) and GGUF models on the CPU."""

__version__ = "0.1.0"
