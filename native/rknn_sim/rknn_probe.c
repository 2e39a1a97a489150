/* Prints "<struct> <sizeof>: <member> <offset>, ..." for the rknn_api.h structs the binding mirrors. */
#include "rknn_api.h"

#include <stddef.h>
#include <stdio.h>

#define BEGIN(s) printf("%s %zu:", #s, sizeof(s))
#define FIELD(s, f, first) printf("%s %s %zu", first ? "" : ",", #f, offsetof(s, f))
#define END() printf("\n")

int main(void) {
    BEGIN(rknn_input_output_num);
    FIELD(rknn_input_output_num, n_input, 1);
    FIELD(rknn_input_output_num, n_output, 0);
    END();
    BEGIN(rknn_tensor_attr);
    FIELD(rknn_tensor_attr, index, 1);
    FIELD(rknn_tensor_attr, n_dims, 0);
    FIELD(rknn_tensor_attr, dims, 0);
    FIELD(rknn_tensor_attr, name, 0);
    FIELD(rknn_tensor_attr, n_elems, 0);
    FIELD(rknn_tensor_attr, size, 0);
    FIELD(rknn_tensor_attr, fmt, 0);
    FIELD(rknn_tensor_attr, type, 0);
    FIELD(rknn_tensor_attr, qnt_type, 0);
    FIELD(rknn_tensor_attr, fl, 0);
    FIELD(rknn_tensor_attr, zp, 0);
    FIELD(rknn_tensor_attr, scale, 0);
    FIELD(rknn_tensor_attr, w_stride, 0);
    FIELD(rknn_tensor_attr, size_with_stride, 0);
    FIELD(rknn_tensor_attr, pass_through, 0);
    FIELD(rknn_tensor_attr, h_stride, 0);
    END();
    BEGIN(rknn_sdk_version);
    FIELD(rknn_sdk_version, api_version, 1);
    FIELD(rknn_sdk_version, drv_version, 0);
    END();
    BEGIN(rknn_init_extend);
    FIELD(rknn_init_extend, ctx, 1);
    FIELD(rknn_init_extend, real_model_offset, 0);
    FIELD(rknn_init_extend, real_model_size, 0);
    FIELD(rknn_init_extend, model_buffer_fd, 0);
    FIELD(rknn_init_extend, model_buffer_flags, 0);
    FIELD(rknn_init_extend, reserved, 0);
    END();
    BEGIN(rknn_run_extend);
    FIELD(rknn_run_extend, frame_id, 1);
    FIELD(rknn_run_extend, non_block, 0);
    FIELD(rknn_run_extend, timeout_ms, 0);
    FIELD(rknn_run_extend, fence_fd, 0);
    END();
    BEGIN(rknn_output_extend);
    FIELD(rknn_output_extend, frame_id, 1);
    END();
    BEGIN(rknn_input);
    FIELD(rknn_input, index, 1);
    FIELD(rknn_input, buf, 0);
    FIELD(rknn_input, size, 0);
    FIELD(rknn_input, pass_through, 0);
    FIELD(rknn_input, type, 0);
    FIELD(rknn_input, fmt, 0);
    END();
    BEGIN(rknn_output);
    FIELD(rknn_output, want_float, 1);
    FIELD(rknn_output, is_prealloc, 0);
    FIELD(rknn_output, index, 0);
    FIELD(rknn_output, buf, 0);
    FIELD(rknn_output, size, 0);
    END();
    return 0;
}
