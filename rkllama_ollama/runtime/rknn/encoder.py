"""A vision encoder resident in the runner: one rknn context, created at model load, used for every
image until the model is unloaded (the runner exits or loads another model).

`encode(pixels)` takes an array already prepared for the encoder's input tensor (runtime/vision.py:
size, layout, type) and returns its embeddings as a float32 (tokens, width) array; the runtime writes
them straight into that array (a preallocated output).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from rkllama_ollama.runtime.base import RuntimeFailure
from rkllama_ollama.runtime.rkllm.session import capture_native_output
from rkllama_ollama.runtime.rknn import abi
from rkllama_ollama.runtime.rknn.library import open_library

log = logging.getLogger(__name__)

_DTYPES = {abi.TENSOR_UINT8: np.uint8, abi.TENSOR_FLOAT32: np.float32, abi.TENSOR_FLOAT16: np.float16}


class EncoderFailure(RuntimeFailure):
    """The RKNN runtime refused the encoder model or failed on an image."""


@dataclass(frozen=True)
class EncoderShape:
    """What the encoder model takes and gives, as the runtime reports it (rknn_query)."""

    width: int
    height: int
    channels_last: bool  # NHWC (True) or NCHW
    dtype: type  # numpy dtype of the input tensor: uint8 (normalisation inside the model) or float
    n_tokens: int  # embeddings per image
    embed_dim: int  # width of one embedding
    tensor_type: int  # rknn_tensor_type of the input (the runtime's code for `dtype`)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3) if self.channels_last else (3, self.height, self.width)


def _shape_of(input_attr: abi.TensorAttr, output_attr: abi.TensorAttr, path: str) -> EncoderShape:
    dims = [int(input_attr.dims[i]) for i in range(input_attr.n_dims)]
    if len(dims) != 4 or dims[0] != 1:
        raise EncoderFailure(f"the vision encoder {path} has an input of shape {dims}; expected [1, H, W, 3]")
    if input_attr.fmt == abi.TENSOR_NCHW:
        channels_last, (channels, height, width) = False, dims[1:]
    else:
        channels_last, (height, width, channels) = True, dims[1:]
    if channels != 3:
        raise EncoderFailure(f"the vision encoder {path} takes {channels} channels; expected 3 (RGB)")
    dtype = _DTYPES.get(int(input_attr.type))
    if dtype is None:
        raise EncoderFailure(f"the vision encoder {path} has an unsupported input type {input_attr.type}")
    out_dims = [int(output_attr.dims[i]) for i in range(output_attr.n_dims)]
    embed_dim = out_dims[-1] if out_dims else 0
    n_elems = int(output_attr.n_elems)
    if embed_dim <= 0 or n_elems % embed_dim:
        raise EncoderFailure(f"the vision encoder {path} has an output of shape {out_dims}")
    return EncoderShape(
        width, height, channels_last, dtype, n_elems // embed_dim, embed_dim, int(input_attr.type)
    )


class RknnEncoder:
    """One rknn context for a vision encoder model (.rknn). Not thread-safe: one caller at a time."""

    def __init__(self, model_path: str, *, library_path: str | None = None, core_mask: int = 0) -> None:
        self._lib = open_library(library_path)
        self.path = model_path
        started = time.perf_counter()
        context = abi.rknn_context(0)
        output: list[str] = []
        with capture_native_output(output):
            rc = self._lib.rknn_init(ctypes.byref(context), os.fsencode(model_path), 0, 0, None)
        for line in output:
            log.info("rknn: %s", line)
        if rc != abi.SUCCESS or not context.value:
            errors = [line for line in output if line.startswith("E ")]
            detail = "; ".join(errors[-3:]) if errors else abi.error_name(rc)
            raise EncoderFailure(f"could not load the vision encoder {model_path}: {detail}")
        self._context = context
        try:
            self.shape = self._query_shape()
            if core_mask and hasattr(self._lib, "rknn_set_core_mask"):
                self._check(self._lib.rknn_set_core_mask(context, core_mask), "rknn_set_core_mask")
            self.runtime_version = self._sdk_version()
        except BaseException:
            self.close()
            raise
        self.init_ms = (time.perf_counter() - started) * 1e3
        shape = self.shape
        log.info(
            "vision encoder initialised path=%s input=%dx%d %s %s output=%d tokens x %d in %.1f ms "
            "(librknnrt %s)",
            model_path,
            shape.width,
            shape.height,
            "NHWC" if shape.channels_last else "NCHW",
            np.dtype(shape.dtype).name,
            shape.n_tokens,
            shape.embed_dim,
            self.init_ms,
            self.runtime_version,
        )

    def _check(self, rc: int, what: str) -> None:
        if rc != abi.SUCCESS:
            raise EncoderFailure(f"{what} failed on the vision encoder ({abi.error_name(rc)})")

    def _query(self, command: int, info: ctypes.Structure, what: str) -> None:
        rc = self._lib.rknn_query(self._context, command, ctypes.byref(info), ctypes.sizeof(info))
        self._check(rc, f"rknn_query({what})")

    def _query_shape(self) -> EncoderShape:
        counts = abi.InputOutputNum()
        self._query(abi.QUERY_IN_OUT_NUM, counts, "IN_OUT_NUM")
        if counts.n_input != 1 or counts.n_output < 1:
            raise EncoderFailure(
                f"the vision encoder {self.path} has {counts.n_input} inputs and {counts.n_output} outputs; "
                "expected one image input"
            )
        input_attr = abi.TensorAttr(index=0)
        self._query(abi.QUERY_INPUT_ATTR, input_attr, "INPUT_ATTR")
        output_attr = abi.TensorAttr(index=0)
        self._query(abi.QUERY_OUTPUT_ATTR, output_attr, "OUTPUT_ATTR")
        return _shape_of(input_attr, output_attr, self.path)

    def _sdk_version(self) -> str:
        version = abi.SdkVersion()
        rc = self._lib.rknn_query(
            self._context, abi.QUERY_SDK_VERSION, ctypes.byref(version), ctypes.sizeof(version)
        )
        return version.api_version.decode("utf-8", "replace") if rc == abi.SUCCESS else "unknown"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """The embeddings of one prepared image: float32 array (n_tokens, embed_dim)."""
        if not self._context.value:
            raise EncoderFailure("the vision encoder is closed")
        shape = self.shape
        if pixels.shape != shape.input_shape or pixels.dtype != shape.dtype or not pixels.flags.c_contiguous:
            raise EncoderFailure(
                f"image array {pixels.shape} {pixels.dtype} does not match the encoder input "
                f"{shape.input_shape} {np.dtype(shape.dtype).name}"
            )
        tensor = abi.Input(
            index=0,
            buf=pixels.ctypes.data,
            size=pixels.nbytes,
            pass_through=0,
            type=shape.tensor_type,
            fmt=abi.TENSOR_NHWC if shape.channels_last else abi.TENSOR_NCHW,
        )
        self._check(self._lib.rknn_inputs_set(self._context, 1, ctypes.byref(tensor)), "rknn_inputs_set")
        self._check(self._lib.rknn_run(self._context, None), "rknn_run")
        embeddings = np.empty((shape.n_tokens, shape.embed_dim), dtype=np.float32)
        output = abi.Output(
            want_float=1, is_prealloc=1, index=0, buf=embeddings.ctypes.data, size=embeddings.nbytes
        )
        self._check(
            self._lib.rknn_outputs_get(self._context, 1, ctypes.byref(output), None), "rknn_outputs_get"
        )
        self._lib.rknn_outputs_release(self._context, 1, ctypes.byref(output))
        return embeddings

    def close(self) -> None:
        context, self._context = self._context, abi.rknn_context(0)
        if context.value:
            self._lib.rknn_destroy(context)
