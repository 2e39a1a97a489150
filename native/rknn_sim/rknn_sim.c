/*
 * RKNN runtime simulator: a test double of librknnrt for a vision encoder (rknn_api.h subset).
 *
 * Model file: first line "RKNN-SIM", then key=value lines:
 *   width=<int> height=<int>   input size (NHWC, 3 channels; default 448x448)
 *   n_tokens=<int>             output tokens per image (default 16)
 *   embed_dim=<int>            output width per token (default 64)
 *   input_type=uint8|float32   the model's input tensor type (default uint8)
 *   run_delay_ms=<int>         sleep in rknn_run
 *   fail_init=<0|1>            rknn_init fails
 *   crash_on_run=<0|1>         rknn_run raises SIGSEGV (fault tests)
 *
 * The output is a deterministic function of the input pixels: token t covers the input rows
 * [t*H/T, (t+1)*H/T) and, for channel c = d % 3, embedding[t][d] = mean(band, c) / 256 + 0.001 * (d / 3)
 * (computed in double, rounded to float once), so a test can predict it exactly.
 */
#define _GNU_SOURCE
#include "rknn_api.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SIM_API __attribute__((visibility("default")))
#define SIM_MAGIC 0x524b4e4eu

typedef struct {
    uint32_t magic;
    uint32_t width;
    uint32_t height;
    uint32_t n_tokens;
    uint32_t embed_dim;
    rknn_tensor_type input_type;
    long run_delay_ms;
    int crash_on_run;
    void *input; /* the last input as given (copied, like the runtime copies it to NPU memory) */
    size_t input_size;
    rknn_tensor_type given_type;
    rknn_tensor_format given_fmt;
    int have_input;
    float *output;
    int have_output;
    rknn_core_mask core_mask;
} SimEncoder;

static void sleep_ms(long ms) {
    if (ms <= 0) {
        return;
    }
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static SimEncoder *encoder_of(rknn_context context) {
    SimEncoder *e = (SimEncoder *)(uintptr_t)context;
    return e && e->magic == SIM_MAGIC ? e : NULL;
}

static int parse_model(const char *text, size_t size, SimEncoder *e) {
    if (size < 8 || strncmp(text, "RKNN-SIM", 8) != 0) {
        fprintf(stderr, "E RKNN: failed to load model: invalid rknn model (not an RKNN-SIM file)\n");
        return RKNN_ERR_MODEL_INVALID;
    }
    e->width = 448;
    e->height = 448;
    e->n_tokens = 16;
    e->embed_dim = 64;
    e->input_type = RKNN_TENSOR_UINT8;
    int fail_init = 0;
    char *copy = strndup(text, size);
    char *save = NULL;
    for (char *line = strtok_r(copy, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        char *eq = strchr(line, '=');
        if (!eq) {
            continue;
        }
        *eq = '\0';
        const char *key = line;
        const char *value = eq + 1;
        long number = atol(value);
        if (strcmp(key, "width") == 0 && number > 0) {
            e->width = (uint32_t)number;
        } else if (strcmp(key, "height") == 0 && number > 0) {
            e->height = (uint32_t)number;
        } else if (strcmp(key, "n_tokens") == 0 && number > 0) {
            e->n_tokens = (uint32_t)number;
        } else if (strcmp(key, "embed_dim") == 0 && number > 0) {
            e->embed_dim = (uint32_t)number;
        } else if (strcmp(key, "input_type") == 0) {
            e->input_type = strcmp(value, "float32") == 0 ? RKNN_TENSOR_FLOAT32 : RKNN_TENSOR_UINT8;
        } else if (strcmp(key, "run_delay_ms") == 0) {
            e->run_delay_ms = number;
        } else if (strcmp(key, "crash_on_run") == 0) {
            e->crash_on_run = (int)number;
        } else if (strcmp(key, "fail_init") == 0) {
            fail_init = (int)number;
        }
    }
    free(copy);
    if (fail_init) {
        fprintf(stderr, "E RKNN: simulated init failure (fail_init=1)\n");
        return RKNN_ERR_FAIL;
    }
    return RKNN_SUCC;
}

static int read_file(const char *path, char **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E RKNN: failed to open rknn model %s: %s\n", path, strerror(errno));
        return RKNN_ERR_MODEL_INVALID;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
    }
    fclose(f);
    *data = buf;
    *size = len;
    return RKNN_SUCC;
}

SIM_API int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend) {
    (void)flag;
    (void)extend;
    printf("I RKNN: [00:00:00.000] RKNN Runtime Information, librknnrt version: 2.3.2 (rknn-sim)\n");
    printf("I RKNN: [00:00:00.000] RKNN Driver Information, version: 0.9.8\n");
    fflush(stdout);
    if (!context || !model) {
        fprintf(stderr, "E RKNN: rknn_init: null argument\n");
        return RKNN_ERR_PARAM_INVALID;
    }
    *context = 0;
    char *data = NULL;
    size_t len = size;
    int rc;
    if (size == 0) { /* `model` is a file path */
        rc = read_file((const char *)model, &data, &len);
        if (rc != RKNN_SUCC) {
            return rc;
        }
    } else {
        data = malloc(size);
        memcpy(data, model, size);
    }
    SimEncoder *e = calloc(1, sizeof *e);
    rc = parse_model(data, len, e);
    free(data);
    if (rc != RKNN_SUCC) {
        free(e);
        return rc;
    }
    e->magic = SIM_MAGIC;
    e->input = malloc(sizeof(float) * (size_t)e->width * e->height * 3);
    e->output = malloc(sizeof(float) * (size_t)e->n_tokens * e->embed_dim);
    *context = (rknn_context)(uintptr_t)e;
    return RKNN_SUCC;
}

SIM_API int rknn_destroy(rknn_context context) {
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    e->magic = 0;
    free(e->input);
    free(e->output);
    free(e);
    return RKNN_SUCC;
}

static void fill_input_attr(const SimEncoder *e, rknn_tensor_attr *attr) {
    memset(attr, 0, sizeof *attr);
    attr->index = 0;
    attr->n_dims = 4;
    attr->dims[0] = 1;
    attr->dims[1] = e->height;
    attr->dims[2] = e->width;
    attr->dims[3] = 3;
    snprintf(attr->name, sizeof attr->name, "pixel_values");
    attr->n_elems = e->width * e->height * 3;
    attr->size = attr->n_elems * (e->input_type == RKNN_TENSOR_FLOAT32 ? 4 : 1);
    attr->fmt = RKNN_TENSOR_NHWC;
    attr->type = e->input_type;
    attr->qnt_type = RKNN_TENSOR_QNT_NONE;
    attr->scale = 1.0f;
    attr->w_stride = e->width;
    attr->size_with_stride = attr->size;
    attr->h_stride = e->height;
}

static void fill_output_attr(const SimEncoder *e, rknn_tensor_attr *attr) {
    memset(attr, 0, sizeof *attr);
    attr->index = 0;
    attr->n_dims = 3;
    attr->dims[0] = 1;
    attr->dims[1] = e->n_tokens;
    attr->dims[2] = e->embed_dim;
    snprintf(attr->name, sizeof attr->name, "image_embeds");
    attr->n_elems = e->n_tokens * e->embed_dim;
    attr->size = attr->n_elems * 4;
    attr->fmt = RKNN_TENSOR_UNDEFINED;
    attr->type = RKNN_TENSOR_FLOAT32;
    attr->qnt_type = RKNN_TENSOR_QNT_NONE;
    attr->scale = 1.0f;
    attr->size_with_stride = attr->size;
}

SIM_API int rknn_query(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size) {
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    if (!info) {
        return RKNN_ERR_PARAM_INVALID;
    }
    switch (cmd) {
    case RKNN_QUERY_IN_OUT_NUM: {
        if (size < sizeof(rknn_input_output_num)) {
            return RKNN_ERR_PARAM_INVALID;
        }
        rknn_input_output_num *num = info;
        num->n_input = 1;
        num->n_output = 1;
        return RKNN_SUCC;
    }
    case RKNN_QUERY_INPUT_ATTR:
    case RKNN_QUERY_OUTPUT_ATTR: {
        rknn_tensor_attr *attr = info;
        if (size < sizeof(rknn_tensor_attr) || attr->index != 0) {
            return RKNN_ERR_PARAM_INVALID;
        }
        if (cmd == RKNN_QUERY_INPUT_ATTR) {
            fill_input_attr(e, attr);
        } else {
            fill_output_attr(e, attr);
        }
        return RKNN_SUCC;
    }
    case RKNN_QUERY_SDK_VERSION: {
        if (size < sizeof(rknn_sdk_version)) {
            return RKNN_ERR_PARAM_INVALID;
        }
        rknn_sdk_version *version = info;
        memset(version, 0, sizeof *version);
        snprintf(version->api_version, sizeof version->api_version, "2.3.2 (rknn-sim)");
        snprintf(version->drv_version, sizeof version->drv_version, "0.9.8");
        return RKNN_SUCC;
    }
    default:
        return RKNN_ERR_PARAM_INVALID;
    }
}

SIM_API int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask) {
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    e->core_mask = core_mask;
    return RKNN_SUCC;
}

SIM_API int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    if (n_inputs != 1 || !inputs || inputs[0].index != 0 || !inputs[0].buf) {
        fprintf(stderr, "E RKNN: rknn_inputs_set: expected one input with index 0\n");
        return RKNN_ERR_PARAM_INVALID;
    }
    const rknn_input *in = &inputs[0];
    size_t n = (size_t)e->width * e->height * 3;
    size_t element = in->type == RKNN_TENSOR_FLOAT32 ? 4 : in->type == RKNN_TENSOR_UINT8 ? 1 : 0;
    if (element == 0 || (in->fmt != RKNN_TENSOR_NHWC && in->fmt != RKNN_TENSOR_NCHW)) {
        fprintf(stderr, "E RKNN: rknn_inputs_set: unsupported input type %d / format %d\n", (int)in->type,
                (int)in->fmt);
        return RKNN_ERR_INPUT_INVALID;
    }
    if (in->size != n * element) {
        fprintf(stderr, "E RKNN: rknn_inputs_set: input size %u, the model expects %zu bytes\n", in->size,
                n * element);
        return RKNN_ERR_INPUT_INVALID;
    }
    memcpy(e->input, in->buf, in->size);
    e->input_size = in->size;
    e->given_type = in->type;
    e->given_fmt = in->fmt;
    e->have_input = 1;
    e->have_output = 0;
    return RKNN_SUCC;
}

SIM_API int rknn_run(rknn_context context, rknn_run_extend *extend) {
    (void)extend;
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    if (!e->have_input) {
        fprintf(stderr, "E RKNN: rknn_run: no input set\n");
        return RKNN_ERR_INPUT_INVALID;
    }
    if (e->crash_on_run) {
        fprintf(stderr, "E RKNN: simulated crash in rknn_run\n");
        fflush(stderr);
        raise(SIGSEGV);
    }
    sleep_ms(e->run_delay_ms);
    uint32_t T = e->n_tokens, D = e->embed_dim, H = e->height, W = e->width;
    size_t hw = (size_t)W * H;
    int is_float = e->given_type == RKNN_TENSOR_FLOAT32, nchw = e->given_fmt == RKNN_TENSOR_NCHW;
    for (uint32_t t = 0; t < T; t++) {
        uint32_t row0 = (uint32_t)((uint64_t)t * H / T);
        uint32_t row1 = (uint32_t)((uint64_t)(t + 1) * H / T);
        if (row1 <= row0) {
            row1 = row0 + 1;
        }
        double sum[3] = {0.0, 0.0, 0.0};
        for (uint32_t c = 0; c < 3; c++) {
            for (size_t p = (size_t)row0 * W; p < (size_t)row1 * W; p++) {
                size_t i = nchw ? c * hw + p : p * 3 + c;
                sum[c] += is_float ? (double)((const float *)e->input)[i] : (double)((const uint8_t *)e->input)[i];
            }
        }
        double count = (double)(row1 - row0) * W;
        for (uint32_t d = 0; d < D; d++) {
            double mean = sum[d % 3] / count;
            e->output[(size_t)t * D + d] = (float)(mean / 256.0 + 0.001 * (double)(d / 3));
        }
    }
    e->have_output = 1;
    return RKNN_SUCC;
}

SIM_API int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
                             rknn_output_extend *extend) {
    (void)extend;
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    if (n_outputs != 1 || !outputs || outputs[0].index != 0) {
        return RKNN_ERR_PARAM_INVALID;
    }
    if (!e->have_output) {
        fprintf(stderr, "E RKNN: rknn_outputs_get: rknn_run has not produced an output\n");
        return RKNN_ERR_OUTPUT_INVALID;
    }
    size_t bytes = sizeof(float) * (size_t)e->n_tokens * e->embed_dim;
    rknn_output *out = &outputs[0];
    if (out->is_prealloc) {
        if (!out->buf || out->size < bytes) {
            fprintf(stderr, "E RKNN: rknn_outputs_get: preallocated buffer of %u bytes, %zu needed\n", out->size,
                    bytes);
            return RKNN_ERR_PARAM_INVALID;
        }
        memcpy(out->buf, e->output, bytes);
    } else {
        out->buf = malloc(bytes);
        memcpy(out->buf, e->output, bytes);
        out->size = (uint32_t)bytes;
    }
    return RKNN_SUCC;
}

SIM_API int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    SimEncoder *e = encoder_of(context);
    if (!e) {
        return RKNN_ERR_CTX_INVALID;
    }
    for (uint32_t i = 0; i < n_outputs; i++) {
        if (!outputs[i].is_prealloc && outputs[i].buf) {
            free(outputs[i].buf);
            outputs[i].buf = NULL;
        }
    }
    return RKNN_SUCC;
}
