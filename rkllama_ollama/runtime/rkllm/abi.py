"""ctypes layouts and function signatures of the RKLLM C API, one set per ABI family.

The families and the facts behind them are in docs/rkllm-runtime.md. Every family's structs come from
the one builder `_build_layout`; the differences between families are the only `if`s in it.
Pointer-sized members use ctypes' native pointer types, so the same code also gives the armhf
layouts on a 32-bit ARM interpreter.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_void_p,
)
from dataclasses import dataclass
from functools import cache
from typing import Any


class Family(enum.IntEnum):
    """ABI families of librkllmrt that the binding supports, in release order."""

    C = 1  # 1.1.0 - 1.1.4
    D = 2  # 1.2.0
    D_PRIME = 3  # 1.2.1b1: D with a bigger multimodal input
    E = 4  # 1.2.1 - 1.2.3
    F = 5  # 1.3.0


# LLMCallState (C onward). GET_LAST_HIDDEN_LAYER exists only on family C.
RUN_NORMAL = 0
RUN_WAITING = 1
RUN_FINISH = 2
RUN_ERROR = 3
RUN_GET_LAST_HIDDEN_LAYER = 4

# RKLLMInputType
INPUT_PROMPT = 0
INPUT_TOKEN = 1
INPUT_EMBED = 2
INPUT_MULTIMODAL = 3

# RKLLMInferMode (GET_LOGITS from D on)
INFER_GENERATE = 0
INFER_GET_LAST_HIDDEN_LAYER = 1
INFER_GET_LOGITS = 2

# Callback return values (read by E/F; ignored by C/D)
CALLBACK_CONTINUE = 0
CALLBACK_PAUSE = 1

# rkllm_createDefaultParam returns a struct by value whose size the library decides: declare a
# return type bigger than any family's RKLLMParam and copy the family's layout out of it.
DEFAULT_PARAM_BUFFER_SIZE = 1024


class DefaultParamBuffer(Structure):
    _fields_ = [("raw", c_uint8 * DEFAULT_PARAM_BUFFER_SIZE)]


def _struct(name: str, fields: list[tuple[str, Any]], anonymous: tuple[str, ...] = ()) -> type[Structure]:
    attrs: dict[str, Any] = {"_fields_": fields}
    if anonymous:
        attrs["_anonymous_"] = anonymous
    return type(name, (Structure,), attrs)


@dataclass(frozen=True)
class Layout:
    """The ctypes classes of one ABI family. Absent structs are None."""

    family: Family
    ExtendParam: type[Structure]
    Param: type[Structure]
    LoraAdapter: type[Structure]
    EmbedInput: type[Structure]
    TokenInput: type[Structure]
    MultiModalInput: type[Structure]
    Input: type[Structure]
    LoraParam: type[Structure]
    PromptCacheParam: type[Structure]
    CrossAttnParam: type[Structure] | None
    SamplingParam: type[Structure] | None
    InferParam: type[Structure]
    ResultLastHiddenLayer: type[Structure]
    ResultLogits: type[Structure] | None
    PerfStat: type[Structure] | None
    Result: type[Structure]
    Callback: type[Structure] | None  # RKLLMCallback (F)
    ResultCallback: Any  # CFUNCTYPE of LLMResultCallback: void on C/D/D', int on E/F

    @property
    def has_keep_history(self) -> bool:
        return self.family >= Family.D

    @property
    def has_perf(self) -> bool:
        return self.family >= Family.E

    @property
    def has_role(self) -> bool:
        return self.family >= Family.E

    @property
    def hidden_layer_state(self) -> int:
        """The call state that carries hidden states in GET_LAST_HIDDEN_LAYER mode."""
        return RUN_GET_LAST_HIDDEN_LAYER if self.family == Family.C else RUN_NORMAL

    def struct_classes(self) -> dict[str, type[Structure]]:
        """C struct name -> ctypes class, for every struct this family has."""
        names = {
            "RKLLMExtendParam": self.ExtendParam,
            "RKLLMParam": self.Param,
            "RKLLMLoraAdapter": self.LoraAdapter,
            "RKLLMEmbedInput": self.EmbedInput,
            "RKLLMTokenInput": self.TokenInput,
            "RKLLMMultiModalInput": self.MultiModalInput,
            "RKLLMInput": self.Input,
            "RKLLMLoraParam": self.LoraParam,
            "RKLLMPromptCacheParam": self.PromptCacheParam,
            "RKLLMCrossAttnParam": self.CrossAttnParam,
            "RKLLMSamplingParam": self.SamplingParam,
            "RKLLMInferParam": self.InferParam,
            "RKLLMResultLastHiddenLayer": self.ResultLastHiddenLayer,
            "RKLLMResultLogits": self.ResultLogits,
            "RKLLMPerfStat": self.PerfStat,
            "RKLLMResult": self.Result,
            "RKLLMCallback": self.Callback,
        }
        return {name: cls for name, cls in names.items() if cls is not None}


_SAMPLING_FIELDS: list[tuple[str, Any]] = [
    ("top_p", c_float),
    ("temperature", c_float),
    ("repeat_penalty", c_float),
    ("frequency_penalty", c_float),
    ("presence_penalty", c_float),
    ("mirostat", c_int32),
    ("mirostat_tau", c_float),
    ("mirostat_eta", c_float),
]


def _build_layout(family: Family) -> Layout:
    at_least_d = family >= Family.D
    at_least_e = family >= Family.E
    is_f = family == Family.F

    # RKLLMExtendParam: 116 B on C, 120 B from D on (sizes of `reserved` keep the total fixed).
    extend_fields: list[tuple[str, Any]] = [("base_domain_id", c_int32)]
    if at_least_d:
        extend_fields += [
            ("embed_flash", c_int8),
            ("enabled_cpus_num", c_int8),
            ("enabled_cpus_mask", c_uint32),
        ]
    if at_least_e:
        extend_fields += [("n_batch", c_uint8), ("use_cross_attn", c_int8), ("reserved", c_uint8 * 104)]
    elif at_least_d:
        extend_fields.append(("reserved", c_uint8 * 106))
    else:
        extend_fields.append(("reserved", c_uint8 * 112))
    extend_param = _struct("RKLLMExtendParam", extend_fields)

    # RKLLMParam: n_keep inserted after top_k (D), ignore_eos_token added and img_* removed (F).
    param_fields: list[tuple[str, Any]] = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
    ]
    if at_least_d:
        param_fields.append(("n_keep", c_int32))
    param_fields += _SAMPLING_FIELDS
    param_fields.append(("skip_special_token", c_bool))
    if is_f:
        param_fields.append(("ignore_eos_token", c_bool))
    param_fields.append(("is_async", c_bool))
    if not is_f:
        param_fields += [("img_start", c_char_p), ("img_end", c_char_p), ("img_content", c_char_p)]
    param_fields.append(("extend_param", extend_param))
    param = _struct("RKLLMParam", param_fields)

    lora_adapter = _struct(
        "RKLLMLoraAdapter",
        [("lora_adapter_path", c_char_p), ("lora_adapter_name", c_char_p), ("scale", c_float)],
    )
    embed_input = _struct("RKLLMEmbedInput", [("embed", POINTER(c_float)), ("n_tokens", c_size_t)])
    token_input = _struct("RKLLMTokenInput", [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)])

    # Multimodal input: C/D 3 members, D'/E + n_image/width/height, F image{} + video{} sub-structs.
    if is_f:
        image = _struct(
            "RKLLMMultiModalImage",
            [
                ("image_embed", POINTER(c_float)),
                ("n_image_tokens", c_size_t),
                ("n_image", c_size_t),
                ("image_start", c_char_p),
                ("image_end", c_char_p),
                ("image_content", c_char_p),
                ("image_width", c_size_t),
                ("image_height", c_size_t),
            ],
        )
        video = _struct(
            "RKLLMMultiModalVideo",
            [
                ("video_embed", POINTER(c_float)),
                ("n_frame_tokens", c_size_t),
                ("n_frame_per_video", c_size_t),
                ("n_video", c_size_t),
                ("video_start", c_char_p),
                ("video_end", c_char_p),
                ("video_content", c_char_p),
                ("frame_width", c_size_t),
                ("frame_height", c_size_t),
            ],
        )
        multimodal_fields: list[tuple[str, Any]] = [("prompt", c_char_p), ("image", image), ("video", video)]
    else:
        multimodal_fields = [
            ("prompt", c_char_p),
            ("image_embed", POINTER(c_float)),
            ("n_image_tokens", c_size_t),
        ]
        if family >= Family.D_PRIME:
            multimodal_fields += [
                ("n_image", c_size_t),
                ("image_width", c_size_t),
                ("image_height", c_size_t),
            ]
    multimodal_input = _struct("RKLLMMultiModalInput", multimodal_fields)

    input_union = type(
        "RKLLMInputUnion",
        (Union,),
        {
            "_fields_": [
                ("prompt_input", c_char_p),
                ("embed_input", embed_input),
                ("token_input", token_input),
                ("multimodal_input", multimodal_input),
            ]
        },
    )
    input_fields: list[tuple[str, Any]] = []
    if at_least_e:
        input_fields += [("role", c_char_p), ("enable_thinking", c_bool)]
    input_fields += [("input_type", c_int), ("_u", input_union)]
    rkllm_input = _struct("RKLLMInput", input_fields, anonymous=("_u",))

    lora_param = _struct("RKLLMLoraParam", [("lora_adapter_name", c_char_p)])
    prompt_cache_param = _struct(
        "RKLLMPromptCacheParam", [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]
    )
    cross_attn_param = (
        _struct(
            "RKLLMCrossAttnParam",
            [
                ("encoder_k_cache", POINTER(c_float)),
                ("encoder_v_cache", POINTER(c_float)),
                ("encoder_mask", POINTER(c_float)),
                ("encoder_pos", POINTER(c_int32)),
                ("num_tokens", c_int),
            ],
        )
        if at_least_e
        else None
    )
    sampling_param = _struct("RKLLMSamplingParam", [("top_k", c_int32), *_SAMPLING_FIELDS]) if is_f else None

    infer_fields: list[tuple[str, Any]] = [
        ("mode", c_int),
        ("lora_params", POINTER(lora_param)),
        ("prompt_cache_params", POINTER(prompt_cache_param)),
    ]
    if is_f:
        infer_fields.append(("sampling_params", POINTER(sampling_param)))
    if at_least_d:
        infer_fields.append(("keep_history", c_int))
    if is_f:
        infer_fields.append(("max_new_tokens", c_int32))
    infer_param = _struct("RKLLMInferParam", infer_fields)

    hidden_layer = _struct(
        "RKLLMResultLastHiddenLayer",
        [("hidden_states", POINTER(c_float)), ("embd_size", c_int), ("num_tokens", c_int)],
    )
    logits = (
        _struct(
            "RKLLMResultLogits", [("logits", POINTER(c_float)), ("vocab_size", c_int), ("num_tokens", c_int)]
        )
        if at_least_d
        else None
    )
    perf = (
        _struct(
            "RKLLMPerfStat",
            [
                ("prefill_time_ms", c_float),
                ("prefill_tokens", c_int),
                ("generate_time_ms", c_float),
                ("generate_tokens", c_int),
                ("memory_usage_mb", c_float),
            ],
        )
        if at_least_e
        else None
    )
    # `text` is c_void_p, not c_char_p: the callback copies it with ctypes.string_at and a NULL stays None.
    result_fields: list[tuple[str, Any]] = [
        ("text", c_void_p),
        ("token_id", c_int32),
        ("last_hidden_layer", hidden_layer),
    ]
    if logits is not None:
        result_fields.append(("logits", logits))
    if perf is not None:
        result_fields.append(("perf", perf))
    result = _struct("RKLLMResult", result_fields)

    # As each header declares it: `void` up to 1.2.1b1 (C, D, D'), `int` from 1.2.1 (E, F: 0 continue,
    # 1 pause). ctypes ignores the Python return value of a void callback.
    result_callback = CFUNCTYPE(c_int if at_least_e else None, POINTER(result), c_void_p, c_int)
    callback = (
        _struct(
            "RKLLMCallback",
            [
                ("result_callback", result_callback),
                ("result_userdata", c_void_p),
                ("tokenizer_callback", c_void_p),
                ("tokenizer_userdata", c_void_p),
                ("embed_callback", c_void_p),
                ("embed_userdata", c_void_p),
            ],
        )
        if is_f
        else None
    )
    return Layout(
        family=family,
        ExtendParam=extend_param,
        Param=param,
        LoraAdapter=lora_adapter,
        EmbedInput=embed_input,
        TokenInput=token_input,
        MultiModalInput=multimodal_input,
        Input=rkllm_input,
        LoraParam=lora_param,
        PromptCacheParam=prompt_cache_param,
        CrossAttnParam=cross_attn_param,
        SamplingParam=sampling_param,
        InferParam=infer_param,
        ResultLastHiddenLayer=hidden_layer,
        ResultLogits=logits,
        PerfStat=perf,
        Result=result,
        Callback=callback,
        ResultCallback=result_callback,
    )


@cache
def layout_for(family: Family) -> Layout:
    """The ctypes layout of `family`, built once per process."""
    return _build_layout(family)


def declare_functions(lib: ctypes.CDLL, layout: Layout) -> None:
    """Set restype/argtypes of every function the family exports (and only those)."""
    handle = c_void_p
    handle_p = POINTER(c_void_p)
    lib.rkllm_createDefaultParam.restype = DefaultParamBuffer
    lib.rkllm_createDefaultParam.argtypes = []
    third = POINTER(layout.Callback) if layout.Callback is not None else layout.ResultCallback
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "rkllm_init": (c_int, [handle_p, POINTER(layout.Param), third]),
        "rkllm_run": (c_int, [handle, POINTER(layout.Input), POINTER(layout.InferParam), c_void_p]),
        "rkllm_run_async": (c_int, [handle, POINTER(layout.Input), POINTER(layout.InferParam), c_void_p]),
        "rkllm_destroy": (c_int, [handle]),
        "rkllm_abort": (c_int, [handle]),
        "rkllm_is_running": (c_int, [handle]),
        "rkllm_load_lora": (c_int, [handle, POINTER(layout.LoraAdapter)]),
        "rkllm_load_prompt_cache": (c_int, [handle, c_char_p]),
        "rkllm_release_prompt_cache": (c_int, [handle]),
    }
    if layout.family >= Family.D:
        signatures["rkllm_set_chat_template"] = (c_int, [handle, c_char_p, c_char_p, c_char_p])
    if layout.family >= Family.E:
        signatures["rkllm_clear_kv_cache"] = (c_int, [handle, c_int, POINTER(c_int), POINTER(c_int)])
        signatures["rkllm_get_kv_cache_size"] = (c_int, [handle, POINTER(c_int)])
        signatures["rkllm_set_function_tools"] = (c_int, [handle, c_char_p, c_char_p, c_char_p])
        signatures["rkllm_set_cross_attn_params"] = (c_int, [handle, POINTER(layout.CrossAttnParam)])
    elif layout.family >= Family.D:
        signatures["rkllm_clear_kv_cache"] = (c_int, [handle, c_int])
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


def default_param(lib: ctypes.CDLL, layout: Layout) -> Structure:
    """rkllm_createDefaultParam() copied into the family's RKLLMParam."""
    buffer = lib.rkllm_createDefaultParam()
    param = layout.Param()
    ctypes.memmove(ctypes.addressof(param), ctypes.addressof(buffer), ctypes.sizeof(param))
    return param
