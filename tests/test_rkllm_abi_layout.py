"""ctypes layouts of every RKLLM ABI family == the C compiler's (sim headers) == the reference tables."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from rkllama_ollama.runtime.rkllm.abi import Family, layout_for
from tests.rkllm_support.sim import NATIVE

pytestmark = pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="reference tables are LP64")

# The vendor headers of each release compiled for LP64 and read back (docs/rkllm-runtime.md, "Layouts").
# One line per struct: "<struct> <sizeof>: <field> <offset>, ...". Nested members as "outer.inner".
_SHARED_C_TO_F = """
RKLLMLoraAdapter 24: lora_adapter_path 0, lora_adapter_name 8, scale 16
RKLLMEmbedInput 16: embed 0, n_tokens 8
RKLLMTokenInput 16: input_ids 0, n_tokens 8
RKLLMLoraParam 8: lora_adapter_name 0
RKLLMPromptCacheParam 16: save_prompt_cache 0, prompt_cache_path 8
RKLLMResultLastHiddenLayer 16: hidden_states 0, embd_size 8, num_tokens 12
"""
_PARAM_D_E = """
RKLLMParam 208: model_path 0, max_context_len 8, max_new_tokens 12, top_k 16, n_keep 20, top_p 24, \
temperature 28, repeat_penalty 32, frequency_penalty 36, presence_penalty 40, mirostat 44, mirostat_tau 48, \
mirostat_eta 52, skip_special_token 56, is_async 57, img_start 64, img_end 72, img_content 80, extend_param 88
"""
_SHARED_D_TO_F = """
RKLLMResultLogits 16: logits 0, vocab_size 8, num_tokens 12
"""
_SHARED_E_F = """
RKLLMExtendParam 120: base_domain_id 0, embed_flash 4, enabled_cpus_num 5, enabled_cpus_mask 8, n_batch 12, \
use_cross_attn 13, reserved 14
RKLLMCrossAttnParam 40: encoder_k_cache 0, encoder_v_cache 8, encoder_mask 16, encoder_pos 24, num_tokens 32
RKLLMPerfStat 20: prefill_time_ms 0, prefill_tokens 4, generate_time_ms 8, generate_tokens 12, \
memory_usage_mb 16
RKLLMResult 72: text 0, token_id 8, last_hidden_layer 16, logits 32, perf 48
"""
_MULTIMODAL_48 = """
RKLLMMultiModalInput 48: prompt 0, image_embed 8, n_image_tokens 16, n_image 24, image_width 32, \
image_height 40
"""
_D_COMMON = (
    _SHARED_C_TO_F
    + _PARAM_D_E
    + _SHARED_D_TO_F
    + """
RKLLMExtendParam 120: base_domain_id 0, embed_flash 4, enabled_cpus_num 5, enabled_cpus_mask 8, reserved 12
RKLLMInferParam 32: mode 0, lora_params 8, prompt_cache_params 16, keep_history 24
RKLLMResult 48: text 0, token_id 8, last_hidden_layer 16, logits 32
"""
)

REFERENCE_LP64: dict[Family, str] = {
    Family.C: _SHARED_C_TO_F
    + """
RKLLMExtendParam 116: base_domain_id 0, reserved 4
RKLLMParam 200: model_path 0, max_context_len 8, max_new_tokens 12, top_k 16, top_p 20, temperature 24, \
repeat_penalty 28, frequency_penalty 32, presence_penalty 36, mirostat 40, mirostat_tau 44, mirostat_eta 48, \
skip_special_token 52, is_async 53, img_start 56, img_end 64, img_content 72, extend_param 80
RKLLMMultiModalInput 24: prompt 0, image_embed 8, n_image_tokens 16
RKLLMInput 32: input_type 0, prompt_input 8, embed_input 8, token_input 8, multimodal_input 8
RKLLMInferParam 24: mode 0, lora_params 8, prompt_cache_params 16
RKLLMResult 32: text 0, token_id 8, last_hidden_layer 16
""",
    Family.D: _D_COMMON
    + """
RKLLMMultiModalInput 24: prompt 0, image_embed 8, n_image_tokens 16
RKLLMInput 32: input_type 0, prompt_input 8, embed_input 8, token_input 8, multimodal_input 8
""",
    Family.D_PRIME: _D_COMMON
    + _MULTIMODAL_48
    + """
RKLLMInput 56: input_type 0, prompt_input 8, embed_input 8, token_input 8, multimodal_input 8
""",
    Family.E: _SHARED_C_TO_F
    + _PARAM_D_E
    + _SHARED_D_TO_F
    + _SHARED_E_F
    + _MULTIMODAL_48
    + """
RKLLMInput 64: role 0, enable_thinking 8, input_type 12, prompt_input 16, embed_input 16, token_input 16, \
multimodal_input 16
RKLLMInferParam 32: mode 0, lora_params 8, prompt_cache_params 16, keep_history 24
""",
    Family.F: _SHARED_C_TO_F
    + _SHARED_D_TO_F
    + _SHARED_E_F
    + """
RKLLMParam 184: model_path 0, max_context_len 8, max_new_tokens 12, top_k 16, n_keep 20, top_p 24, \
temperature 28, repeat_penalty 32, frequency_penalty 36, presence_penalty 40, mirostat 44, mirostat_tau 48, \
mirostat_eta 52, skip_special_token 56, ignore_eos_token 57, is_async 58, extend_param 60
RKLLMMultiModalInput 144: prompt 0, image 8, image.image_embed 8, image.n_image_tokens 16, image.n_image 24, \
image.image_start 32, image.image_end 40, image.image_content 48, image.image_width 56, \
image.image_height 64, \
video 72, video.video_embed 72, video.n_frame_tokens 80, video.n_frame_per_video 88, video.n_video 96, \
video.video_start 104, video.video_end 112, video.video_content 120, video.frame_width 128, \
video.frame_height 136
RKLLMInput 160: role 0, enable_thinking 8, input_type 12, prompt_input 16, embed_input 16, token_input 16, \
multimodal_input 16
RKLLMSamplingParam 36: top_k 0, top_p 4, temperature 8, repeat_penalty 12, frequency_penalty 16, \
presence_penalty 20, mirostat 24, mirostat_tau 28, mirostat_eta 32
RKLLMInferParam 40: mode 0, lora_params 8, prompt_cache_params 16, sampling_params 24, keep_history 32, \
max_new_tokens 36
RKLLMCallback 48: result_callback 0, result_userdata 8, tokenizer_callback 16, tokenizer_userdata 24, \
embed_callback 32, embed_userdata 40
""",
}

SIM_FAMILIES = {Family.C: "C", Family.D: "D", Family.E: "E", Family.F: "F"}


def parse_reference(text: str) -> dict[str, tuple[int, dict[str, int]]]:
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        head, _, body = line.partition(":")
        name, size = head.split()
        offsets = {}
        for item in body.split(","):
            field, offset = item.split()
            offsets[field] = int(offset)
        assert name not in structs, f"{name} transcribed twice"
        structs[name] = (int(size), offsets)
    return structs


def ctypes_member(cls: type, dotted: str) -> tuple[int, int]:
    """(offset, size) of a possibly nested member, relative to `cls`."""
    offset = 0
    current = cls
    for part in dotted.split("."):
        descriptor = getattr(current, part)
        offset += descriptor.offset
        field_type = dict(_all_fields(current)).get(part)
        if field_type is None:  # a member of an anonymous union: same size as in that union
            return offset, descriptor.size
        current = field_type
    return offset, descriptor.size


def _all_fields(cls: type) -> list[tuple[str, type]]:
    pairs = [(f[0], f[1]) for f in cls._fields_]
    for anonymous in getattr(cls, "_anonymous_", ()):
        union_type = dict(pairs)[anonymous]
        pairs += [(f[0], f[1]) for f in union_type._fields_]
    return pairs


def probe_output(family_letter: str, out_dir: Path) -> str:
    """What sim_probe.c, compiled by gcc against the simulator's rkllm.h for the family, prints."""
    binary = out_dir / f"probe-{family_letter}"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-Wall",
            "-Werror",
            f"-DRKLLM_SIM_FAMILY=RKLLM_SIM_FAMILY_{family_letter}",
            "-o",
            str(binary),
            str(NATIVE / "rkllm_sim" / "sim_probe.c"),
        ],
        check=True,
    )
    return subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout


def compile_probe(family_letter: str, out_dir: Path) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """The probe's structs: struct -> (sizeof, field -> (offset, size))."""
    structs: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
    for line in probe_output(family_letter, out_dir).splitlines():
        parts = line.split()
        if parts[0] == "array":
            continue
        if len(parts) == 2:
            structs[parts[0]] = (int(parts[1]), {})
        else:
            name, field = parts[0].split(".", 1)
            structs[name][1][field] = (int(parts[1]), int(parts[2]))
    return structs


@pytest.mark.parametrize("family", list(SIM_FAMILIES), ids=lambda f: f.name)
def test_ctypes_layout_equals_the_c_compiler(family: Family, tmp_path: Path) -> None:
    compiled = compile_probe(SIM_FAMILIES[family], tmp_path)
    classes = layout_for(family).struct_classes()
    assert set(compiled) == set(classes)
    for name, (size, members) in compiled.items():
        cls = classes[name]
        assert ctypes.sizeof(cls) == size, name
        ctypes_fields = {n for n, _ in _all_fields(cls) if not n.startswith("_")}
        top_level = {m for m in members if "." not in m}
        assert top_level == ctypes_fields, name
        for member, (offset, member_size) in members.items():
            assert ctypes_member(cls, member) == (offset, member_size), f"{name}.{member}"


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.name)
def test_ctypes_layout_equals_the_reference_tables(family: Family) -> None:
    reference = parse_reference(REFERENCE_LP64[family])
    classes = layout_for(family).struct_classes()
    assert set(reference) == set(classes)
    for name, (size, offsets) in reference.items():
        cls = classes[name]
        assert ctypes.sizeof(cls) == size, name
        for member, offset in offsets.items():
            assert ctypes_member(cls, member)[0] == offset, f"{name}.{member}"


@pytest.mark.parametrize("family", list(SIM_FAMILIES), ids=lambda f: f.name)
def test_simulator_headers_equal_the_reference_tables(family: Family, tmp_path: Path) -> None:
    compiled = compile_probe(SIM_FAMILIES[family], tmp_path)
    reference = parse_reference(REFERENCE_LP64[family])
    for name, (size, offsets) in reference.items():
        assert compiled[name][0] == size, name
        assert {m: o for m, (o, _) in compiled[name][1].items()} == offsets, name


def test_families_differ_where_the_reference_says_they_break() -> None:
    c, d, e, f = (layout_for(x) for x in (Family.C, Family.D, Family.E, Family.F))
    assert c.Param.top_p.offset == 20 and d.Param.top_p.offset == 24  # n_keep inserted in 1.2.0
    assert e.Input.input_type.offset == 12 and d.Input.input_type.offset == 0  # role prefix in 1.2.1
    assert f.InferParam.keep_history.offset == 32 and e.InferParam.keep_history.offset == 24
    assert f.Param.extend_param.offset == 60 and e.Param.extend_param.offset == 88


_CALLBACK_RETURN_PROBE = r"""
#include "rkllm.h"
#include <stdio.h>
int main(void) {
    printf("%d\n", __builtin_types_compatible_p(LLMResultCallback,
                                                int (*)(RKLLMResult *, void *, LLMCallState)));
    printf("%d\n", __builtin_types_compatible_p(LLMResultCallback,
                                                void (*)(RKLLMResult *, void *, LLMCallState)));
    return 0;
}
"""


@pytest.mark.parametrize("family", list(SIM_FAMILIES), ids=lambda f: f.name)
def test_callback_return_type_is_the_headers(family: Family, tmp_path: Path) -> None:
    """void up to 1.2.1b1, int from 1.2.1: the ctypes callback type says what the header says."""
    source = tmp_path / "callback.c"
    source.write_text(_CALLBACK_RETURN_PROBE)
    binary = tmp_path / "callback"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            f"-DRKLLM_SIM_FAMILY=RKLLM_SIM_FAMILY_{SIM_FAMILIES[family]}",
            f"-I{NATIVE / 'rkllm_sim'}",
            "-o",
            str(binary),
            str(source),
        ],
        check=True,
    )
    returns_int, returns_void = subprocess.run(
        [str(binary)], check=True, capture_output=True, text=True
    ).stdout.split()
    restype = layout_for(family).ResultCallback._restype_
    assert (returns_int, returns_void) == (("1", "0") if family >= Family.E else ("0", "1"))
    assert restype is (ctypes.c_int if returns_int == "1" else None)


def test_callback_return_type_per_family_including_d_prime() -> None:
    assert layout_for(Family.D_PRIME).ResultCallback._restype_ is None
    assert layout_for(Family.D).ResultCallback._restype_ is None
    assert layout_for(Family.C).ResultCallback._restype_ is None
    assert layout_for(Family.E).ResultCallback._restype_ is ctypes.c_int
    assert layout_for(Family.F).ResultCallback._restype_ is ctypes.c_int


@pytest.mark.parametrize("family", [Family.E, Family.F], ids=lambda f: f.name)
def test_multi_batch_arrays_have_the_c_stride(family: Family, tmp_path: Path) -> None:
    """rkllm_run reads n_batch consecutive RKLLMInput and the callback gets n_batch RKLLMResult: a
    ctypes array of the family's structs must put element i where C puts it."""
    layout = layout_for(family)
    arrays = [line.split() for line in probe_output(SIM_FAMILIES[family], tmp_path).splitlines()]
    measured = {
        parts[1]: (int(parts[2]), int(parts[3]), int(parts[4])) for parts in arrays if parts[0] == "array"
    }
    inputs = (layout.Input * 4)()
    results = (layout.Result * 4)()
    base = ctypes.addressof(inputs)
    n_tokens = (
        ctypes.addressof(inputs[3]) + layout.Input.token_input.offset + layout.TokenInput.n_tokens.offset
    )
    assert measured["RKLLMInput"] == (4, ctypes.sizeof(inputs), n_tokens - base)
    token_id = ctypes.addressof(results[3]) + layout.Result.token_id.offset
    assert measured["RKLLMResult"] == (4, ctypes.sizeof(results), token_id - ctypes.addressof(results))
