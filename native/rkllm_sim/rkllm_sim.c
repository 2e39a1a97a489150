/*
 * RKLLM simulator: a test double of librkllmrt, built once per ABI family (see rkllm.h).
 *
 * Model file: first line "RKLLM-SIM", then key=value lines:
 *   reply=<text>              generated text, one token per byte (escapes: \n \t \r \\)
 *   token_delay_ms=<int>      sleep per generated token
 *   prefill_us_per_token=<int> sleep per prefilled token
 *   max_context_len=<int>     the model's context limit (min'ed with RKLLMParam.max_context_len)
 *   crash_after_tokens=<int>  raise SIGSEGV after N generated tokens (-1 = never)
 *   fail_init=<0|1>           rkllm_init fails
 *   embd_size=<int>           hidden-layer width (default 64), also the width of image embeddings
 *
 * Multimodal input (RKLLM_INPUT_MULTIMODAL) is answered with text derived from what it received:
 * "images=N tokens=T[ size=WxH] [1@O1:C1] [2@O2:C2] ... " followed by `reply`, where Oi is the byte
 * offset of the i-th "<image>" tag in the prompt and Ci the FNV-1a 32 hash (8 hex digits) of the
 * float32 bytes of the i-th image's T x embd_size embeddings (see sim_mm_prepare).
 *
 * Behaviour the bindings depend on: rkllm_run blocks while a worker pthread delivers callbacks;
 * WAITING until a UTF-8 character is complete; FINISH (with perf on E/F) or ERROR; abort at the
 * next step; keep_history keeps a KV position; the context limit is enforced with ERROR.
 */
#define _GNU_SOURCE
#include "rkllm.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef RKLLM_SIM_VERSION
#error "define RKLLM_SIM_VERSION (e.g. \"1.2.1\")"
#endif

#define SIM_API __attribute__((visibility("default")))
#define SIM_VOCAB_SIZE 256
#define SIM_DEFAULT_EMBD 64
#define SIM_DEFAULT_CONTEXT 4096

typedef struct {
    char *reply;
    size_t reply_len;
    long token_delay_ms;
    long prefill_us_per_token;
    int max_context_len;
    long crash_after_tokens;
    int fail_init;
    int embd_size;
} SimModel;

typedef struct {
    RKLLMInputType input_type;
    char *role;
    unsigned char *bytes; /* prompt text (prompt input) */
    size_t n_bytes;
    int32_t *tokens; /* token ids (token input) */
    size_t n_tokens;
    RKLLMInferMode mode;
    int keep_history;
    int max_new_tokens;
    void *userdata;
    char *mm_reply; /* multimodal input: the reply derived from the image embeddings (sim_mm_prepare) */
} SimJob;

typedef struct {
    SimModel model;
    RKLLMParam param;
    LLMResultCallback callback;
    void *default_userdata;
    int context_limit;
    char *system_prompt;
    char *prompt_prefix;
    char *prompt_postfix;
    int kv_pos;
    int system_len;
    int last_keep_history;
    int paused;
    atomic_int abort_requested;
    atomic_int running;
    pthread_mutex_t lock;
    pthread_t worker;
    int async_worker;
    SimJob job;
    int last_status;
} SimHandle;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_us(long us) {
    if (us <= 0) {
        return;
    }
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* ---------------------------------------------------------------- model file */

static void unescape_in_place(char *s) {
    char *out = s;
    for (char *in = s; *in; in++) {
        if (*in == '\\' && in[1]) {
            in++;
            switch (*in) {
            case 'n': *out++ = '\n'; break;
            case 't': *out++ = '\t'; break;
            case 'r': *out++ = '\r'; break;
            case '\\': *out++ = '\\'; break;
            default: *out++ = '\\'; *out++ = *in; break;
            }
        } else {
            *out++ = *in;
        }
    }
    *out = '\0';
}

static int parse_model_file(const char *path, SimModel *model) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E rkllm: failed to open rkllm model file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len = getline(&line, &cap, f);
    if (len < 9 || strncmp(line, "RKLLM-SIM", 9) != 0 || (len > 9 && line[9] != '\n' && line[9] != '\r')) {
        fprintf(stderr, "E rkllm: invalid rkllm model! (%s is not a RKLLM-SIM file)\n", path);
        free(line);
        fclose(f);
        return -1;
    }
    model->reply = strdup("Hello from the RKLLM simulator.");
    model->token_delay_ms = 0;
    model->prefill_us_per_token = 0;
    model->max_context_len = SIM_DEFAULT_CONTEXT;
    model->crash_after_tokens = -1;
    model->fail_init = 0;
    model->embd_size = SIM_DEFAULT_EMBD;
    while ((len = getline(&line, &cap, f)) != -1) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = '\0';
        }
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#') {
            continue;
        }
        *eq = '\0';
        const char *key = line;
        char *value = eq + 1;
        if (strcmp(key, "reply") == 0) {
            free(model->reply);
            unescape_in_place(value);
            model->reply = strdup(value);
        } else if (strcmp(key, "token_delay_ms") == 0) {
            model->token_delay_ms = atol(value);
        } else if (strcmp(key, "prefill_us_per_token") == 0) {
            model->prefill_us_per_token = atol(value);
        } else if (strcmp(key, "max_context_len") == 0) {
            model->max_context_len = atoi(value);
        } else if (strcmp(key, "crash_after_tokens") == 0) {
            model->crash_after_tokens = atol(value);
        } else if (strcmp(key, "fail_init") == 0) {
            model->fail_init = atoi(value);
        } else if (strcmp(key, "embd_size") == 0) {
            model->embd_size = atoi(value) > 0 ? atoi(value) : SIM_DEFAULT_EMBD;
        }
    }
    model->reply_len = strlen(model->reply);
    free(line);
    fclose(f);
    return 0;
}

/* ---------------------------------------------------------------- callbacks */

static int deliver(SimHandle *h, RKLLMResult *result, void *userdata, LLMCallState state) {
#if RKLLM_SIM_AT_LEAST(E)
    return h->callback(result, userdata, state);
#else
    h->callback(result, userdata, state);
    return 0;
#endif
}

static void deliver_error(SimHandle *h, void *userdata) {
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    deliver(h, &result, userdata, RKLLM_RUN_ERROR);
}

/* Length in bytes of the UTF-8 sequence started by lead byte c (1 for invalid lead bytes). */
static size_t utf8_sequence_length(unsigned char c) {
    if (c >= 0xF0 && c <= 0xF7) return 4;
    if (c >= 0xE0) return c <= 0xEF ? 3 : 1;
    if (c >= 0xC0) return 2;
    return 1;
}

/* Deterministic hidden state of the token prefix ending at `upto`: a running hash spread over dims. */
static void hidden_row(const SimJob *job, size_t upto, int embd, float *row) {
    uint64_t hash = 1469598103934665603ULL;
    size_t n = job->input_type == RKLLM_INPUT_TOKEN ? job->n_tokens : job->n_bytes;
    for (size_t i = 0; i <= upto && i < n; i++) {
        uint64_t v = job->input_type == RKLLM_INPUT_TOKEN ? (uint64_t)(uint32_t)job->tokens[i] : job->bytes[i];
        hash = (hash ^ (v + 1)) * 1099511628211ULL;
    }
    for (int d = 0; d < embd; d++) {
        uint64_t x = hash + (uint64_t)d * 0x9E3779B97F4A7C15ULL;
        x ^= x >> 31;
        x *= 0xBF58476D1CE4E5B9ULL;
        x ^= x >> 29;
        row[d] = (float)((double)(x >> 11) / (double)(1ULL << 53)) * 2.0f - 1.0f;
    }
}

/* Tokens the runtime's own chat template adds to a prompt input (D+): prefix, postfix, and the
 * system prompt when the conversation starts. */
static size_t template_tokens(const SimHandle *h, const SimJob *job, int start) {
#if RKLLM_SIM_AT_LEAST(D)
    if (job->input_type == RKLLM_INPUT_PROMPT) {
        return strlen(h->prompt_prefix) + strlen(h->prompt_postfix) + (start == 0 ? (size_t)h->system_len : 0);
    }
#else
    (void)h;
    (void)job;
#endif
    (void)start;
    return 0;
}

static void run_hidden_or_logits(SimHandle *h, SimJob *job, size_t n_input) {
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    if (n_input == 0) {
        deliver_error(h, job->userdata);
        h->last_status = -1;
        return;
    }
    if (job->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) {
        int embd = h->model.embd_size;
        float *states = malloc(sizeof(float) * (size_t)embd * n_input);
        for (size_t i = 0; i < n_input; i++) {
            hidden_row(job, i, embd, states + i * (size_t)embd);
        }
        result.last_hidden_layer.hidden_states = states;
        result.last_hidden_layer.embd_size = embd;
        result.last_hidden_layer.num_tokens = (int)n_input;
#if RKLLM_SIM_AT_LEAST(D)
        deliver(h, &result, job->userdata, RKLLM_RUN_NORMAL);
#else
        deliver(h, &result, job->userdata, RKLLM_RUN_GET_LAST_HIDDEN_LAYER);
#endif
        free(states);
    }
#if RKLLM_SIM_AT_LEAST(D)
    else {
        float *logits = malloc(sizeof(float) * SIM_VOCAB_SIZE);
        float row[SIM_VOCAB_SIZE];
        hidden_row(job, n_input - 1, SIM_VOCAB_SIZE, row);
        memcpy(logits, row, sizeof row);
        result.logits.logits = logits;
        result.logits.vocab_size = SIM_VOCAB_SIZE;
        result.logits.num_tokens = 1;
        deliver(h, &result, job->userdata, RKLLM_RUN_NORMAL);
        free(logits);
    }
#endif
    memset(&result, 0, sizeof result);
    deliver(h, &result, job->userdata, RKLLM_RUN_FINISH);
    /* Hidden-layer / logits runs are single-turn: the conversation cache is dropped. */
    h->kv_pos = 0;
    h->last_status = 0;
}

static void run_generate(SimHandle *h, SimJob *job, size_t n_input) {
    int start = job->keep_history ? h->kv_pos : 0;
    double t0 = now_ms();
    sleep_us(h->model.prefill_us_per_token * (long)n_input);
    double t1 = now_ms();
    int pos = start + (int)n_input;
    h->kv_pos = pos;
    int max_new = job->max_new_tokens;
    long generated = 0;
    unsigned char pending[8];
    size_t n_pending = 0;
    int stopped_by_callback = 0;
    RKLLMResult result;
    const char *reply = job->mm_reply ? job->mm_reply : h->model.reply;
    size_t reply_len = job->mm_reply ? strlen(job->mm_reply) : h->model.reply_len;
    for (size_t i = 0; i < reply_len; i++) {
        if (atomic_load(&h->abort_requested)) {
            h->last_status = 0;
            return; /* aborted: no terminal callback, rkllm_run returns */
        }
        if (max_new > 0 && generated >= max_new) {
            break;
        }
        if (pos >= h->context_limit) {
            break; /* context full: stop like a length limit */
        }
        if (h->model.crash_after_tokens >= 0 && generated >= h->model.crash_after_tokens) {
            fprintf(stderr, "E rkllm: simulated crash after %ld tokens\n", generated);
            fflush(stderr);
            raise(SIGSEGV);
        }
        sleep_us(h->model.token_delay_ms * 1000);
        unsigned char byte = (unsigned char)reply[i];
        pos++;
        generated++;
        h->kv_pos = pos;
        if (n_pending == 0 || (byte & 0xC0) != 0x80) {
            n_pending = 0;
        }
        pending[n_pending++] = byte;
        memset(&result, 0, sizeof result);
        result.token_id = byte;
        LLMCallState state = RKLLM_RUN_WAITING;
        char *text = NULL;
        if (n_pending >= utf8_sequence_length(pending[0]) || n_pending >= 4) {
            text = malloc(n_pending + 1);
            memcpy(text, pending, n_pending);
            text[n_pending] = '\0';
            n_pending = 0;
            state = RKLLM_RUN_NORMAL;
        }
        result.text = text;
        int ret = deliver(h, &result, job->userdata, state);
        if (text) {
            memset(text, 0, strlen(text)); /* the pointer dies with the callback */
            free(text);
        }
        if (ret == 1) {
            stopped_by_callback = 1;
            break;
        }
    }
    double t2 = now_ms();
    h->paused = stopped_by_callback;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
#if RKLLM_SIM_AT_LEAST(E)
    result.perf.prefill_time_ms = (float)(t1 - t0);
    result.perf.prefill_tokens = (int)n_input;
    result.perf.generate_time_ms = (float)(t2 - t1);
    result.perf.generate_tokens = (int)generated;
    result.perf.memory_usage_mb = 42.0f;
#else
    (void)t0;
    (void)t1;
    (void)t2;
#endif
    if (!stopped_by_callback) {
        deliver(h, &result, job->userdata, RKLLM_RUN_FINISH);
    }
    h->last_status = 0;
}

static void *run_job(void *arg) {
    SimHandle *h = arg;
    SimJob *job = &h->job;
    size_t n_input = (job->input_type == RKLLM_INPUT_TOKEN ? job->n_tokens : job->n_bytes);
    int start = (job->mode == RKLLM_INFER_GENERATE && job->keep_history) ? h->kv_pos : 0;
    if (job->mode == RKLLM_INFER_GENERATE) {
        n_input += template_tokens(h, job, start);
    }
    h->last_keep_history = job->keep_history;
    h->paused = 0;
    if ((size_t)start + n_input > (size_t)h->context_limit ||
        (job->mode == RKLLM_INFER_GENERATE && (size_t)start + n_input >= (size_t)h->context_limit)) {
        fprintf(stderr, "E rkllm: prompt gather than max context (prompt: %zu tokens, max context: %d)\n",
                (size_t)start + n_input, h->context_limit);
        deliver_error(h, job->userdata);
        h->last_status = -1;
    } else if (job->mode == RKLLM_INFER_GENERATE) {
        if (n_input == 0) {
            fprintf(stderr, "E rkllm: empty input\n");
            deliver_error(h, job->userdata);
            h->last_status = -1;
        } else {
            run_generate(h, job, n_input);
        }
    } else {
        run_hidden_or_logits(h, job, n_input);
    }
    atomic_store(&h->abort_requested, 0);
    atomic_store(&h->running, 0);
    return NULL;
}

static void free_job(SimJob *job) {
    free(job->role);
    free(job->bytes);
    free(job->tokens);
    free(job->mm_reply);
    memset(job, 0, sizeof *job);
}

/* ---------------------------------------------------------------- multimodal input (vision) */
/* Kept apart from the text paths: sim_mm_prepare turns one RKLLM_INPUT_MULTIMODAL input into a prompt
 * job whose reply proves which embeddings arrived, in which order, at which "<image>" tag. */

#define SIM_MM_TAG "<image>"

static uint32_t sim_mm_fnv1a(const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        hash = (hash ^ p[i]) * 16777619u;
    }
    return hash;
}

static int sim_mm_fail(const char *message) {
    fprintf(stderr, "E rkllm: %s\n", message);
    return -1;
}

static int sim_mm_prepare(const SimHandle *h, SimJob *job, const RKLLMMultiModalInput *mm) {
#if RKLLM_SIM_AT_LEAST(F)
    const float *embed = mm->image.image_embed;
    size_t n_tokens = mm->image.n_image_tokens;
    size_t n_image = mm->image.n_image;
    const char *start = mm->image.image_start, *end = mm->image.image_end, *content = mm->image.image_content;
    size_t width = mm->image.image_width, height = mm->image.image_height;
    int has_count = 1, has_size = 1;
#else
    const float *embed = mm->image_embed;
    size_t n_tokens = mm->n_image_tokens;
    const char *start = h->param.img_start, *end = h->param.img_end, *content = h->param.img_content;
#if RKLLM_SIM_AT_LEAST(E)
    size_t n_image = mm->n_image;
    size_t width = mm->image_width, height = mm->image_height;
    int has_count = 1, has_size = 1;
#else
    size_t n_image = 0, width = 0, height = 0;
    int has_count = 0, has_size = 0;
#endif
#endif
    if (!mm->prompt) {
        return sim_mm_fail("multimodal input without a prompt");
    }
    if (!start || !end || !content || !*content) {
        return sim_mm_fail("image start/end/content markers are not set");
    }
    size_t tags = 0;
    for (const char *p = strstr(mm->prompt, SIM_MM_TAG); p; p = strstr(p + 1, SIM_MM_TAG)) {
        tags++;
    }
    if (!has_count) {
        n_image = tags;
    }
    if (n_image != tags) {
        fprintf(stderr, "E rkllm: n_image is %zu but the prompt has %zu <image> tags\n", n_image, tags);
        return -1;
    }
    if (tags == 0 || !embed || n_tokens == 0) {
        return sim_mm_fail("multimodal input without image embeddings");
    }
    if (has_size && (width == 0 || height == 0)) {
        return sim_mm_fail("image_width/image_height are not set");
    }
    size_t embd = (size_t)h->model.embd_size;
    size_t cap = 128 + tags * 32 + h->model.reply_len;
    char *reply = malloc(cap);
    int len = snprintf(reply, cap, "images=%zu tokens=%zu", n_image, n_tokens);
    if (has_size) {
        len += snprintf(reply + len, cap - (size_t)len, " size=%zux%zu", width, height);
    }
    size_t index = 0;
    for (const char *p = strstr(mm->prompt, SIM_MM_TAG); p; p = strstr(p + 1, SIM_MM_TAG), index++) {
        const float *block = embed + index * n_tokens * embd;
        uint32_t hash = sim_mm_fnv1a(block, sizeof(float) * n_tokens * embd);
        len += snprintf(reply + len, cap - (size_t)len, " [%zu@%zu:%08x]", index + 1, (size_t)(p - mm->prompt), hash);
    }
    snprintf(reply + len, cap - (size_t)len, ". %s", h->model.reply);
    job->mm_reply = reply;
    /* Prefill: the prompt with every tag expanded to start + n_tokens x content + end. */
    size_t prompt_len = strlen(mm->prompt);
    job->n_bytes = prompt_len - tags * strlen(SIM_MM_TAG) + tags * n_tokens;
    job->bytes = calloc(job->n_bytes + prompt_len + 1, 1);
    memcpy(job->bytes, mm->prompt, prompt_len);
    job->input_type = RKLLM_INPUT_PROMPT;
    return 0;
}

/* Copy what the caller passed: the worker must not depend on caller memory (needed for run_async). */
static int prepare_job(SimHandle *h, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    SimJob *job = &h->job;
    free_job(job);
    job->input_type = input->input_type;
#if RKLLM_SIM_AT_LEAST(E)
    job->role = strdup(input->role ? input->role : "user"); /* NULL role: treated as "user" */
#endif
    switch (input->input_type) {
    case RKLLM_INPUT_PROMPT:
        if (!input->prompt_input) {
            return -1;
        }
        job->bytes = (unsigned char *)strdup(input->prompt_input);
        job->n_bytes = strlen(input->prompt_input);
        break;
    case RKLLM_INPUT_TOKEN:
        if (!input->token_input.input_ids && input->token_input.n_tokens) {
            return -1;
        }
        job->n_tokens = input->token_input.n_tokens;
        job->tokens = malloc(sizeof(int32_t) * (job->n_tokens ? job->n_tokens : 1));
        memcpy(job->tokens, input->token_input.input_ids, sizeof(int32_t) * job->n_tokens);
        break;
    case RKLLM_INPUT_EMBED:
        job->input_type = RKLLM_INPUT_TOKEN;
        job->n_tokens = input->embed_input.n_tokens;
        job->tokens = calloc(job->n_tokens ? job->n_tokens : 1, sizeof(int32_t));
        break;
    case RKLLM_INPUT_MULTIMODAL:
        if (sim_mm_prepare(h, job, &input->multimodal_input) != 0) {
            return -1;
        }
        break;
    default:
        fprintf(stderr, "E rkllm: input type %d is not supported by the simulator\n", (int)input->input_type);
        return -1;
    }
    job->mode = infer->mode;
    if (job->mode != RKLLM_INFER_GENERATE && job->mode != RKLLM_INFER_GET_LAST_HIDDEN_LAYER
#if RKLLM_SIM_AT_LEAST(D)
        && job->mode != RKLLM_INFER_GET_LOGITS
#endif
    ) {
        fprintf(stderr, "E rkllm: invalid infer mode %d\n", (int)job->mode);
        return -1;
    }
#if RKLLM_SIM_AT_LEAST(D)
    job->keep_history = infer->keep_history ? 1 : 0;
#else
    job->keep_history = 0;
#endif
    job->max_new_tokens = h->param.max_new_tokens;
#if RKLLM_SIM_AT_LEAST(F)
    if (infer->max_new_tokens > 0) {
        job->max_new_tokens = infer->max_new_tokens;
    }
#endif
#if RKLLM_SIM_AT_LEAST(F)
    job->userdata = userdata ? userdata : h->default_userdata;
#else
    job->userdata = userdata;
#endif
    return 0;
}

static int start_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata, int wait) {
    SimHandle *h = handle;
    if (!h || !input || !infer) {
        return -1;
    }
    pthread_mutex_lock(&h->lock);
    if (atomic_load(&h->running)) {
        pthread_mutex_unlock(&h->lock);
        fprintf(stderr, "E rkllm: a task is already running on this handle\n");
        return -1;
    }
    if (h->async_worker) {
        pthread_join(h->worker, NULL);
        h->async_worker = 0;
    }
    if (prepare_job(h, input, infer, userdata) != 0) {
        pthread_mutex_unlock(&h->lock);
        return -1;
    }
    atomic_store(&h->running, 1);
    if (pthread_create(&h->worker, NULL, run_job, h) != 0) {
        atomic_store(&h->running, 0);
        pthread_mutex_unlock(&h->lock);
        return -1;
    }
    int status = 0;
    if (wait) {
        pthread_join(h->worker, NULL);
        status = h->last_status;
    } else {
        h->async_worker = 1;
    }
    pthread_mutex_unlock(&h->lock);
    return status;
}

/* ---------------------------------------------------------------- public API */

SIM_API RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
#if RKLLM_SIM_AT_LEAST(D)
    p.n_keep = -1;
#endif
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.is_async = false;
    p.extend_param.base_domain_id = 0;
#if RKLLM_SIM_AT_LEAST(D)
    p.extend_param.embed_flash = 0;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.enabled_cpus_mask = CPU4 | CPU5 | CPU6 | CPU7;
#endif
#if RKLLM_SIM_AT_LEAST(E)
    p.extend_param.n_batch = 1;
#endif
    return p;
}

#if RKLLM_SIM_AT_LEAST(F)
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    printf("I rkllm: rkllm-runtime version: %s, rknpu driver version: 0.9.8, platform: RKLLM-SIM\n",
           RKLLM_SIM_VERSION);
    fflush(stdout);
    if (!handle || !param || !callback) {
        fprintf(stderr, "E rkllm: rkllm_init: null argument\n");
        return -1;
    }
    *handle = NULL;
    if (!param->model_path) {
        fprintf(stderr, "E rkllm: rkllm_init: model_path is null\n");
        return -1;
    }
    for (size_t i = 0; i < sizeof param->extend_param.reserved; i++) {
        if (param->extend_param.reserved[i] != 0) {
            fprintf(stderr, "E rkllm: extend_param.reserved must be zero (wrong RKLLMParam layout?)\n");
            return -1;
        }
    }
#if RKLLM_SIM_AT_LEAST(E)
    if (param->extend_param.n_batch > 1) {
        fprintf(stderr, "E rkllm: the simulator supports n_batch = 1 only\n");
        return -1;
    }
#endif
    printf("I rkllm: loading rkllm model from %s\n", param->model_path);
    fflush(stdout);
    SimModel model;
    memset(&model, 0, sizeof model);
    if (parse_model_file(param->model_path, &model) != 0) {
        return -1;
    }
    if (model.fail_init) {
        fprintf(stderr, "E rkllm: simulated init failure (fail_init=1)\n");
        free(model.reply);
        return -1;
    }
#if RKLLM_SIM_AT_LEAST(F)
    if (!callback->result_callback) {
        fprintf(stderr, "E rkllm: rkllm_init: result_callback is null\n");
        free(model.reply);
        return -1;
    }
#endif
    SimHandle *h = calloc(1, sizeof *h);
    h->model = model;
    h->param = *param;
    h->param.model_path = NULL; /* the caller owns the string */
#if RKLLM_SIM_AT_LEAST(F)
    h->callback = callback->result_callback;
    h->default_userdata = callback->result_userdata;
#else
    h->callback = callback;
#endif
    h->context_limit = model.max_context_len;
    if (param->max_context_len > 0 && param->max_context_len < h->context_limit) {
        h->context_limit = param->max_context_len;
    }
    h->system_prompt = strdup("");
    h->prompt_prefix = strdup("<|im_start|>user\n");
    h->prompt_postfix = strdup("<|im_end|>\n<|im_start|>assistant\n");
    pthread_mutex_init(&h->lock, NULL);
    printf("I rkllm: rkllm-toolkit version: sim, max_context_limit: %d, npu_core_num: 3, "
           "target_platform: RKLLM-SIM, model_dtype: W8A8\n",
           model.max_context_len);
    fflush(stdout);
    *handle = h;
    return 0;
}

SIM_API int rkllm_destroy(LLMHandle handle) {
    SimHandle *h = handle;
    if (!h) {
        return -1;
    }
    atomic_store(&h->abort_requested, 1);
    pthread_mutex_lock(&h->lock);
    if (h->async_worker) {
        pthread_join(h->worker, NULL);
        h->async_worker = 0;
    }
    pthread_mutex_unlock(&h->lock);
    free_job(&h->job);
    free(h->model.reply);
    free(h->system_prompt);
    free(h->prompt_prefix);
    free(h->prompt_postfix);
    pthread_mutex_destroy(&h->lock);
    free(h);
    return 0;
}

SIM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                      void *userdata) {
    return start_run(handle, rkllm_input, rkllm_infer_params, userdata, 1);
}

SIM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                            void *userdata) {
    return start_run(handle, rkllm_input, rkllm_infer_params, userdata, 0);
}

SIM_API int rkllm_abort(LLMHandle handle) {
    SimHandle *h = handle;
    if (!h) {
        return -1;
    }
    if (atomic_load(&h->running)) {
        atomic_store(&h->abort_requested, 1);
    }
    return 0;
}

SIM_API int rkllm_is_running(LLMHandle handle) {
    SimHandle *h = handle;
    return h && atomic_load(&h->running) ? 1 : 0;
}

SIM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    if (!handle || !lora_adapter || !lora_adapter->lora_adapter_path) {
        return -1;
    }
    return access(lora_adapter->lora_adapter_path, R_OK) == 0 ? 0 : -1;
}

SIM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    if (!handle || !prompt_cache_path) {
        return -1;
    }
    return access(prompt_cache_path, R_OK) == 0 ? 0 : -1;
}

SIM_API int rkllm_release_prompt_cache(LLMHandle handle) { return handle ? 0 : -1; }

#if RKLLM_SIM_AT_LEAST(D)
static int clear_whole_cache(SimHandle *h, int keep_system_prompt) {
    h->kv_pos = keep_system_prompt ? h->system_len : 0;
    h->paused = 0;
    return 0;
}
#endif

#if RKLLM_SIM_AT_LEAST(E)
SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    SimHandle *h = handle;
    if (!h || atomic_load(&h->running)) {
        return -1;
    }
    if (!start_pos && !end_pos) {
        return clear_whole_cache(h, keep_system_prompt);
    }
    /* Ranged clearing is valid only in single-turn mode after a pause (callback returned 1). */
    if (!start_pos || !end_pos || h->last_keep_history != 0 || !h->paused) {
        fprintf(stderr, "E rkllm: ranged clear_kv_cache needs keep_history=0 and a paused run\n");
        return -1;
    }
    int start = start_pos[0];
    int end = end_pos[0];
    if (start < 0 || end < start || end > h->kv_pos) {
        fprintf(stderr, "E rkllm: clear_kv_cache range [%d, %d) outside the cache (%d)\n", start, end, h->kv_pos);
        return -1;
    }
    h->kv_pos -= end - start;
    return 0;
}

SIM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    SimHandle *h = handle;
    if (!h || !cache_sizes) {
        return -1;
    }
    cache_sizes[0] = h->kv_pos;
    return 0;
}

SIM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                     const char *tool_response_str) {
    (void)system_prompt;
    (void)tool_response_str;
    return handle && tools ? 0 : -1;
}

SIM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    return handle && cross_attn_params ? 0 : -1;
}
#elif RKLLM_SIM_AT_LEAST(D)
SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
    SimHandle *h = handle;
    if (!h || atomic_load(&h->running)) {
        return -1;
    }
    return clear_whole_cache(h, keep_system_prompt);
}
#endif

#if RKLLM_SIM_AT_LEAST(D)
SIM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                    const char *prompt_postfix) {
    SimHandle *h = handle;
    if (!h || !system_prompt || !prompt_prefix || !prompt_postfix || atomic_load(&h->running)) {
        return -1;
    }
    free(h->system_prompt);
    free(h->prompt_prefix);
    free(h->prompt_postfix);
    h->system_prompt = strdup(system_prompt);
    h->prompt_prefix = strdup(prompt_prefix);
    h->prompt_postfix = strdup(prompt_postfix);
    h->system_len = (int)strlen(system_prompt);
    return 0;
}
#endif
