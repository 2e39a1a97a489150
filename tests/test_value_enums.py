"""The StrEnums that replace compared strings keep the wire values (Ollama's and the runner's), and
come back as enums from the runner's frames."""

from __future__ import annotations

from pathlib import Path

import orjson

from rkllama_ollama.models.capabilities import Capability, detect_capabilities
from rkllama_ollama.models.store import WeightsFormat
from rkllama_ollama.runtime.base import DoneReason, Engine, GenerationStats, LoadSpec


def test_the_values_are_the_wire_strings() -> None:
    assert [reason.value for reason in DoneReason] == ["stop", "length", "abort", "load", "unload"]
    assert {Engine.LLAMACPP: "llamacpp", Engine.RKLLM: "rkllm"} == {"llamacpp": "llamacpp", "rkllm": "rkllm"}
    assert orjson.dumps({"done_reason": DoneReason.LENGTH, "capabilities": [Capability.VISION]}) == (
        b'{"done_reason":"length","capabilities":["vision"]}'
    )
    assert f"{Engine.RKLLM}-1" == "rkllm-1"  # cache folder names are built this way


def test_frames_from_the_runner_come_back_as_enums() -> None:
    spec = LoadSpec(engine=Engine.RKLLM, model_path="m.rkllm")
    back = LoadSpec.from_wire(orjson.loads(orjson.dumps(spec.to_wire())))
    assert back == spec and back.engine is Engine.RKLLM
    stats = GenerationStats(DoneReason.ABORT, 3, 3, 1, 0, 0)
    again = GenerationStats.from_wire(orjson.loads(orjson.dumps(stats.to_wire())))
    assert again == stats and again.done_reason is DoneReason.ABORT


def test_the_weights_format_follows_the_file_and_decides_the_engine() -> None:
    assert WeightsFormat.of(Path("/m/Qwen.RKLLM")) is WeightsFormat.RKLLM
    assert WeightsFormat.of(Path("/m/qwen.gguf")) is WeightsFormat.GGUF
    assert detect_capabilities("{{ tools }}{{ suffix }}<think>") == [
        Capability.COMPLETION,
        Capability.TOOLS,
        Capability.INSERT,
        Capability.THINKING,
    ]
