"""ctypes layouts and function signatures of librknnrt's stable C API (docs/rknn-runtime-abi.md).

Only what a vision encoder needs: rknn_init, rknn_query, rknn_inputs_set, rknn_run, rknn_outputs_get,
rknn_outputs_release, rknn_destroy and, where exported, rknn_set_core_mask. `rknn_context` is a 64-bit
integer on 64-bit systems and a 32-bit one on 32-bit ARM; pointer members use ctypes' native types, so
the same classes give both layouts. tests/test_rknn_abi_layout.py checks them against the simulator's
compiled header.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_char, c_float, c_int, c_int8, c_int32, c_uint8, c_uint32, c_uint64

rknn_context = c_uint32 if ctypes.sizeof(ctypes.c_void_p) == 4 else c_uint64

MAX_DIMS = 16
MAX_NAME_LEN = 256

# rknn_query_cmd
QUERY_IN_OUT_NUM = 0
QUERY_INPUT_ATTR = 1
QUERY_OUTPUT_ATTR = 2
QUERY_SDK_VERSION = 5

# rknn_tensor_type
TENSOR_FLOAT32 = 0
TENSOR_FLOAT16 = 1
TENSOR_INT8 = 2
TENSOR_UINT8 = 3

# rknn_tensor_format
TENSOR_NCHW = 0
TENSOR_NHWC = 1
TENSOR_NC1HWC2 = 2
TENSOR_UNDEFINED = 3

# rknn_core_mask
NPU_CORE_AUTO = 0

SUCCESS = 0
ERROR_NAMES = {
    -1: "RKNN_ERR_FAIL",
    -2: "RKNN_ERR_TIMEOUT",
    -3: "RKNN_ERR_DEVICE_UNAVAILABLE",
    -4: "RKNN_ERR_MALLOC_FAIL",
    -5: "RKNN_ERR_PARAM_INVALID",
    -6: "RKNN_ERR_MODEL_INVALID",
    -7: "RKNN_ERR_CTX_INVALID",
    -8: "RKNN_ERR_INPUT_INVALID",
    -9: "RKNN_ERR_OUTPUT_INVALID",
}


class InputOutputNum(Structure):
    _fields_ = [("n_input", c_uint32), ("n_output", c_uint32)]


class TensorAttr(Structure):
    _fields_ = [
        ("index", c_uint32),
        ("n_dims", c_uint32),
        ("dims", c_uint32 * MAX_DIMS),
        ("name", c_char * MAX_NAME_LEN),
        ("n_elems", c_uint32),
        ("size", c_uint32),
        ("fmt", c_int),
        ("type", c_int),
        ("qnt_type", c_int),
        ("fl", c_int8),
        ("zp", c_int32),
        ("scale", c_float),
        ("w_stride", c_uint32),
        ("size_with_stride", c_uint32),
        ("pass_through", c_uint8),
        ("h_stride", c_uint32),
    ]


class SdkVersion(Structure):
    _fields_ = [("api_version", c_char * 256), ("drv_version", c_char * 256)]


class InitExtend(Structure):
    _fields_ = [
        ("ctx", rknn_context),
        ("real_model_offset", c_int32),
        ("real_model_size", c_uint32),
        ("model_buffer_fd", c_int32),
        ("model_buffer_flags", c_uint32),
        ("reserved", c_uint8 * 112),
    ]


class RunExtend(Structure):
    _fields_ = [
        ("frame_id", c_uint64),
        ("non_block", c_int32),
        ("timeout_ms", c_int32),
        ("fence_fd", c_int32),
    ]


class OutputExtend(Structure):
    _fields_ = [("frame_id", c_uint64)]


class Input(Structure):
    _fields_ = [
        ("index", c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", c_uint32),
        ("pass_through", c_uint8),
        ("type", c_int),
        ("fmt", c_int),
    ]


class Output(Structure):
    _fields_ = [
        ("want_float", c_uint8),
        ("is_prealloc", c_uint8),
        ("index", c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", c_uint32),
    ]


STRUCTS: dict[str, type[Structure]] = {
    "rknn_input_output_num": InputOutputNum,
    "rknn_tensor_attr": TensorAttr,
    "rknn_sdk_version": SdkVersion,
    "rknn_init_extend": InitExtend,
    "rknn_run_extend": RunExtend,
    "rknn_output_extend": OutputExtend,
    "rknn_input": Input,
    "rknn_output": Output,
}


def declare_functions(lib: ctypes.CDLL) -> None:
    """Set restype/argtypes of the functions the encoder calls (rknn_set_core_mask only if exported)."""
    signatures: dict[str, list[object]] = {
        "rknn_init": [POINTER(rknn_context), ctypes.c_void_p, c_uint32, c_uint32, POINTER(InitExtend)],
        "rknn_destroy": [rknn_context],
        "rknn_query": [rknn_context, c_int, ctypes.c_void_p, c_uint32],
        "rknn_inputs_set": [rknn_context, c_uint32, POINTER(Input)],
        "rknn_run": [rknn_context, POINTER(RunExtend)],
        "rknn_outputs_get": [rknn_context, c_uint32, POINTER(Output), POINTER(OutputExtend)],
        "rknn_outputs_release": [rknn_context, c_uint32, POINTER(Output)],
    }
    if hasattr(lib, "rknn_set_core_mask"):
        signatures["rknn_set_core_mask"] = [rknn_context, c_int]
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.restype = c_int
        function.argtypes = argtypes


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"error {code}")
