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
 *   embd_size=<int>           hidden-layer width (default 64)
 *   init_fault=<kind>         a model the vendor runtime fails to load, reported the way each release
 *                             reports it (docs/board-startup.md): bad_magic ("invalid rknn llm model
 *                             magic"), npu_oom ("failed to malloc npu memory"), load_error ("load model
 *                             file error"). 1.1.x prints the line and still returns 0 (bad_magic and
 *                             npu_oom with a handle whose first rkllm_run aborts, load_error with a NULL
 *                             handle); 1.3.0 raises SIGSEGV on npu_oom; everything else returns -1.
 *   target_platform=<soc>     the SoC the model was converted for (e.g. rk3588); loading fails with
 *                             "target_platform does not match" when RKLLM_SIM_PLATFORM names another
 *
 * The machine, from the environment (read by rkllm_init):
 *   RKLLM_SIM_NPU=absent       the NPU device cannot be opened: 1.2.0+ print "failed to open rknpu
 *                              module" / "failed to open rknn device" / "Device is not available" and NO
 *                              version banner (the banner carries the driver version, read from the
 *                              device), then fail; 1.1.x prints the banner and the same lines and
 *                              returns 0 with a NULL handle
 *   RKLLM_SIM_DRIVER=<x.y.z>   the RKNPU driver version in the banner (default 0.9.8); below 0.9.7 a
 *                              "driver version is too low" warning is printed
 *   RKLLM_SIM_PLATFORM=<soc>   the platform in the banner (default RKLLM-SIM)
 *   reply_ids=<id,id,...>     generated token ids of a tokenized model (replaces the byte tokens of
 *                             `reply`): what a real runtime emits, ids of the model's own vocabulary
 *   reply_pieces=<hex,hex,...> the bytes each of those tokens decodes to, hex-encoded, one per id
 *                             (a byte-level BPE token may hold part of a UTF-8 character)
 *   eos_id=<int>              end-of-turn token: sampled after the reply, it ends the run without a
 *                             callback (skip_special_token) but stays in the KV cache (-1 = none)
 *   reply_by_input=<0|1>      the reply depends on what the model read: `reply` cut short and followed
 *                             by " #<hash>" (see input_reply), one token per byte; replaces reply_ids
 *   batch_step_percent=<int>  multi-batch: each active element beyond the first adds this % of
 *                             token_delay_ms to a step (default 0)
 *
 * A C simulator cannot run a Hugging Face tokenizer, so the test/bench tooling tokenizes the reply
 * with the model's tokenizer and writes reply_ids/reply_pieces/eos_id (tests/rkllm_support/sim.py).
 * Without reply_ids every byte of `reply` is one generated token (id = byte value) and no
 * end-of-turn token is held.
 *
 * Multimodal input (RKLLM_INPUT_MULTIMODAL) is answered with text derived from what it received:
 * "images=N tokens=T[ size=WxH] [1@O1:C1] [2@O2:C2] ... " followed by `reply`, where Oi is the byte
 * offset of the i-th "<image>" tag in the prompt and Ci the FNV-1a 32 hash (8 hex digits) of the
 * float32 bytes of the i-th image's T x embd_size embeddings (see sim_mm_prepare).
 *
 * Behaviour the bindings depend on: rkllm_run blocks while a worker pthread delivers callbacks;
 * WAITING until a UTF-8 character is complete; FINISH (with perf on E/F) or ERROR; abort at the
 * next step; keep_history keeps a KV cache whose token contents are tracked; the context limit is
 * enforced with ERROR.
 *
 * Multi-batch (E/F): extend_param.n_batch up to 16 (more than 8 draws a warning); rkllm_run then reads
 * n_batch RKLLMInput and the callback gets n_batch RKLLMResult per step (see the multi-batch section).
 *
 * Prompt-cache files (all families): RKLLMInferParam.prompt_cache_params {save_prompt_cache=1, path}
 * writes the KV cache as it stands after the run's prefill (history + this input) to the file;
 * rkllm_load_prompt_cache reads one back (refused from another runtime version) and the next run that
 * starts from an empty KV cache prefills only what follows the longest common prefix of its input and
 * the file's tokens (perf.prefill_tokens counts those); rkllm_release_prompt_cache forgets it.
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
#define SIM_MAX_BATCH 16         /* extend_param.n_batch accepted up to this */
#define SIM_RECOMMENDED_BATCH 8  /* what the vendor documentation recommends at most */

/* The version literal sits in .rodata on its own, as in the vendor's library (whose banner format
 * string takes the version as a %s argument): a reader can find it without running rkllm_init. */
#ifndef RKLLM_SIM_HIDE_VERSION
static const char SIM_RUNTIME_VERSION[] = RKLLM_SIM_VERSION;
#else /* a build whose version only the banner tells (tests of the fallback): no NUL-delimited literal */
static const char SIM_RUNTIME_VERSION_TAGGED[] = "v" RKLLM_SIM_VERSION;
#define SIM_RUNTIME_VERSION (SIM_RUNTIME_VERSION_TAGGED + 1)
#endif
static const char SIM_MIN_DRIVER[] = "0.9.7";

enum { SIM_FAULT_NONE = 0, SIM_FAULT_BAD_MAGIC, SIM_FAULT_NPU_OOM, SIM_FAULT_LOAD_ERROR };

typedef struct {
    char *reply;
    size_t reply_len;
    long token_delay_ms;
    long prefill_us_per_token;
    int max_context_len;
    long crash_after_tokens;
    int fail_init;
    int embd_size;
    int init_fault;
    char target_platform[32];
    int32_t *reply_ids; /* tokenized reply (NULL: one token per byte of `reply`) */
    unsigned char **reply_pieces;
    size_t *reply_piece_lens;
    size_t n_reply_ids;
    size_t n_reply_pieces;
    int32_t eos_id;
    int reply_by_input;     /* the reply is derived from the KV contents after prefill (input_reply) */
    long batch_step_percent; /* multi-batch: each extra active element adds this % of token_delay_ms */
} SimModel;

typedef struct {
    int32_t *tokens;
    int pos;
    int capacity;
} SimKv; /* the KV contents of one batch element (multi-batch) */

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
    int save_prompt_cache; /* RKLLMInferParam.prompt_cache_params */
    char *prompt_cache_path;
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
    int broken; /* 1.1.x "successful" init of a model that did not load: the first run aborts */
    int32_t *kv_tokens; /* contents of the KV cache: kv_pos entries */
    int kv_capacity;
    int32_t *prompt_cache; /* tokens of the loaded prompt-cache file (NULL: none) */
    int n_prompt_cache;
    int n_batch;          /* extend_param.n_batch (1 before family E) */
    SimJob *batch_jobs;   /* n_batch > 1: one job per batch element */
    SimKv *batch_kv;      /* n_batch > 1: one KV cache per batch element */
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

/* ------------------------------------------ tokenized replies, KV contents, prompt-cache files */

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* reply_ids / reply_pieces / eos_id; other keys are ignored. */
static void parse_token_reply_key(SimModel *model, const char *key, char *value) {
    if (strcmp(key, "eos_id") == 0) {
        model->eos_id = (int32_t)atol(value);
        return;
    }
    int ids = strcmp(key, "reply_ids") == 0;
    if (!ids && strcmp(key, "reply_pieces") != 0) {
        return;
    }
    size_t count = *value ? 1 : 0;
    for (const char *c = value; *c; c++) {
        count += *c == ',';
    }
    if (ids) {
        free(model->reply_ids);
        model->reply_ids = calloc(count ? count : 1, sizeof(int32_t));
        model->n_reply_ids = 0;
    } else {
        for (size_t i = 0; i < model->n_reply_pieces; i++) {
            free(model->reply_pieces[i]);
        }
        free(model->reply_pieces);
        free(model->reply_piece_lens);
        model->reply_pieces = calloc(count ? count : 1, sizeof(unsigned char *));
        model->reply_piece_lens = calloc(count ? count : 1, sizeof(size_t));
        model->n_reply_pieces = 0;
    }
    char *save = NULL;
    for (char *item = strtok_r(value, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (ids) {
            model->reply_ids[model->n_reply_ids++] = (int32_t)atol(item);
            continue;
        }
        size_t n = strlen(item) / 2;
        unsigned char *piece = malloc(n + 1);
        for (size_t i = 0; i < n; i++) {
            int hi = hex_value(item[2 * i]), lo = hex_value(item[2 * i + 1]);
            piece[i] = (unsigned char)((hi < 0 ? 0 : hi) << 4 | (lo < 0 ? 0 : lo));
        }
        piece[n] = '\0';
        model->reply_pieces[model->n_reply_pieces] = piece;
        model->reply_piece_lens[model->n_reply_pieces++] = n;
    }
}

static void free_token_reply(SimModel *model) {
    for (size_t i = 0; i < model->n_reply_pieces; i++) {
        free(model->reply_pieces[i]);
    }
    free(model->reply_pieces);
    free(model->reply_piece_lens);
    free(model->reply_ids);
    model->reply_pieces = NULL;
    model->reply_piece_lens = NULL;
    model->reply_ids = NULL;
    model->n_reply_pieces = model->n_reply_ids = 0;
}

static size_t reply_token_count(const SimModel *model) {
    return model->reply_ids ? model->n_reply_ids : model->reply_len;
}

/* Token i of the reply: its id and the bytes it decodes to. */
static void reply_token(const SimModel *model, size_t i, int32_t *id, const unsigned char **piece, size_t *len) {
    if (model->reply_ids) {
        *id = model->reply_ids[i];
        *piece = model->reply_pieces[i];
        *len = model->reply_piece_lens[i];
    } else {
        *id = (unsigned char)model->reply[i];
        *piece = (const unsigned char *)model->reply + i;
        *len = 1;
    }
}

/* Length of the longest prefix of `bytes` made of complete UTF-8 sequences (what may be shown). */
static size_t utf8_complete_length(const unsigned char *bytes, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = bytes[i];
        size_t need = c >= 0xF0 && c <= 0xF7 ? 4 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xC0 && c <= 0xDF ? 2 : 1;
        if (i + need > n) {
            break;
        }
        i += need;
    }
    return i;
}

static void kv_truncate(SimHandle *h, int n) {
    h->kv_pos = n < 0 ? 0 : (n < h->kv_pos ? n : h->kv_pos);
}

static void kv_append(SimHandle *h, int32_t id) {
    if (h->kv_pos >= h->kv_capacity) {
        int capacity = h->kv_capacity ? h->kv_capacity * 2 : 1024;
        h->kv_tokens = realloc(h->kv_tokens, sizeof(int32_t) * (size_t)capacity);
        h->kv_capacity = capacity;
    }
    h->kv_tokens[h->kv_pos++] = id;
}

/* Removes [start, end) from the KV contents (ranged rkllm_clear_kv_cache). */
__attribute__((unused)) static void kv_remove_range(SimHandle *h, int start, int end) {
    memmove(h->kv_tokens + start, h->kv_tokens + end, sizeof(int32_t) * (size_t)(h->kv_pos - end));
    h->kv_pos -= end - start;
}

/* Appends the job's input to the KV contents: token ids, or the bytes of a prompt input (the runtime's
 * own template tokens, D+, are accounted as zeros). */
static void kv_append_input(SimHandle *h, const SimJob *job, size_t template_count) {
    for (size_t i = 0; i < template_count; i++) {
        kv_append(h, 0);
    }
    if (job->input_type == RKLLM_INPUT_TOKEN) {
        for (size_t i = 0; i < job->n_tokens; i++) {
            kv_append(h, job->tokens[i]);
        }
    } else {
        for (size_t i = 0; i < job->n_bytes; i++) {
            kv_append(h, job->bytes[i]);
        }
    }
}

/* Tokens of a run starting from an empty cache that the loaded prompt cache already covers. */
static int prompt_cache_reuse(const SimHandle *h, int start, int upto) {
    if (start != 0 || !h->prompt_cache) {
        return 0;
    }
    int n = 0;
    while (n < upto && n < h->n_prompt_cache && h->prompt_cache[n] == h->kv_tokens[n]) {
        n++;
    }
    return n;
}

#define SIM_PROMPT_CACHE_MAGIC "RKLLM-SIM-PROMPT-CACHE"

static int save_prompt_cache_file(const SimHandle *h, const char *path) {
    FILE *f = fopen(path ? path : "./prompt_cache.bin", "wb");
    if (!f) {
        fprintf(stderr, "E rkllm: cannot write the prompt cache %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f, "%s %s %d\n", SIM_PROMPT_CACHE_MAGIC, SIM_RUNTIME_VERSION, h->kv_pos);
    size_t written = fwrite(h->kv_tokens, sizeof(int32_t), (size_t)h->kv_pos, f);
    int failed = fclose(f) != 0 || written != (size_t)h->kv_pos;
    return failed ? -1 : 0;
}

static int load_prompt_cache_file(SimHandle *h, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E rkllm: cannot open the prompt cache %s: %s\n", path, strerror(errno));
        return -1;
    }
    char magic[32] = {0}, version[32] = {0};
    int n = -1;
    if (fscanf(f, "%31s %31s %d", magic, version, &n) != 3 || fgetc(f) != '\n' ||
        strcmp(magic, SIM_PROMPT_CACHE_MAGIC) != 0 || n < 0) {
        fprintf(stderr, "E rkllm: %s is not a prompt cache file\n", path);
        fclose(f);
        return -1;
    }
    if (strcmp(version, SIM_RUNTIME_VERSION) != 0) {
        fprintf(stderr, "E rkllm: the prompt cache %s was saved by runtime %s\n", path, version);
        fclose(f);
        return -1;
    }
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (fread(tokens, sizeof(int32_t), (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "E rkllm: the prompt cache %s is truncated\n", path);
        free(tokens);
        fclose(f);
        return -1;
    }
    fclose(f);
    free(h->prompt_cache);
    h->prompt_cache = tokens;
    h->n_prompt_cache = n;
    return 0;
}

static void free_token_state(SimHandle *h) {
    free(h->kv_tokens);
    free(h->prompt_cache);
    h->kv_tokens = NULL;
    h->prompt_cache = NULL;
    h->kv_capacity = h->n_prompt_cache = 0;
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
    model->init_fault = SIM_FAULT_NONE;
    model->target_platform[0] = '\0';
    model->eos_id = -1;
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
        } else if (strcmp(key, "init_fault") == 0) {
            model->init_fault = strcmp(value, "bad_magic") == 0    ? SIM_FAULT_BAD_MAGIC
                                : strcmp(value, "npu_oom") == 0    ? SIM_FAULT_NPU_OOM
                                : strcmp(value, "load_error") == 0 ? SIM_FAULT_LOAD_ERROR
                                                                   : SIM_FAULT_NONE;
        } else if (strcmp(key, "target_platform") == 0) {
            snprintf(model->target_platform, sizeof model->target_platform, "%s", value);
        } else if (strcmp(key, "reply_by_input") == 0) {
            model->reply_by_input = atoi(value);
        } else if (strcmp(key, "batch_step_percent") == 0) {
            model->batch_step_percent = atol(value);
        } else if (strcmp(key, "embd_size") == 0) {
            model->embd_size = atoi(value) > 0 ? atoi(value) : SIM_DEFAULT_EMBD;
        } else {
            parse_token_reply_key(model, key, value);
        }
    }
    if (model->reply_ids && model->n_reply_pieces != model->n_reply_ids) {
        fprintf(stderr, "E rkllm: reply_ids has %zu ids but reply_pieces %zu pieces\n", model->n_reply_ids,
                model->n_reply_pieces);
        free(line);
        fclose(f);
        return -1;
    }
    model->reply_len = strlen(model->reply);
    free(line);
    fclose(f);
    return 0;
}

/* reply_by_input=1: `reply` cut short and followed by " #xxxxxxxx", both from the FNV-1a hash of the
 * KV contents after prefill (history + input). The answer depends on everything the model read, as a
 * real one does, so a test can tell whose answer is whose, and different inputs give different
 * lengths (in a multi-batch run, elements then finish at different steps). */
static char *input_reply(const SimModel *model, const int32_t *kv, int n) {
    uint32_t hash = 2166136261u;
    for (int i = 0; i < n; i++) {
        for (int b = 0; b < 4; b++) {
            hash = (hash ^ (((uint32_t)kv[i] >> (8 * b)) & 0xffu)) * 16777619u;
        }
    }
    size_t keep = model->reply_len - hash % (model->reply_len / 2 + 1);
    while (keep > 0 && keep < model->reply_len && ((unsigned char)model->reply[keep] & 0xC0) == 0x80) {
        keep--; /* never cut a UTF-8 character */
    }
    char *text = malloc(keep + 16);
    memcpy(text, model->reply, keep);
    snprintf(text + keep, 16, " #%08x", hash);
    return text;
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
    kv_truncate(h, 0);
    h->last_status = 0;
}

static void run_generate(SimHandle *h, SimJob *job, size_t n_input) {
    int start = job->keep_history ? h->kv_pos : 0;
    kv_truncate(h, start);
    size_t n_given = job->input_type == RKLLM_INPUT_TOKEN ? job->n_tokens : job->n_bytes;
    kv_append_input(h, job, n_input - n_given);
    if (h->model.reply_by_input && !job->mm_reply) {
        job->mm_reply = input_reply(&h->model, h->kv_tokens, h->kv_pos);
    }
    int reused = prompt_cache_reuse(h, start, h->kv_pos);
    long prefilled = (long)n_input - reused;
    double t0 = now_ms();
    sleep_us(h->model.prefill_us_per_token * prefilled);
    double t1 = now_ms();
    if (job->save_prompt_cache) {
        save_prompt_cache_file(h, job->prompt_cache_path);
    }
    int max_new = job->max_new_tokens;
    long generated = 0;
    unsigned char *pending = NULL;
    size_t n_pending = 0;
    int stopped_by_callback = 0;
    int ended_naturally = 1;
    RKLLMResult result;
    size_t n_reply = job->mm_reply ? strlen(job->mm_reply) : reply_token_count(&h->model);
    for (size_t i = 0; i < n_reply; i++) {
        if (atomic_load(&h->abort_requested)) {
            free(pending);
            h->last_status = 0;
            return; /* aborted: no terminal callback, rkllm_run returns */
        }
        if ((max_new > 0 && generated >= max_new) || h->kv_pos >= h->context_limit) {
            ended_naturally = 0; /* length limit or context full */
            break;
        }
        if (h->model.crash_after_tokens >= 0 && generated >= h->model.crash_after_tokens) {
            fprintf(stderr, "E rkllm: simulated crash after %ld tokens\n", generated);
            fflush(stderr);
            raise(SIGSEGV);
        }
        sleep_us(h->model.token_delay_ms * 1000);
        int32_t id;
        const unsigned char *piece;
        size_t len;
        if (job->mm_reply) { /* multimodal or input-derived answer: one token per byte of the text */
            id = (unsigned char)job->mm_reply[i];
            piece = (const unsigned char *)job->mm_reply + i;
            len = 1;
        } else {
            reply_token(&h->model, i, &id, &piece, &len);
        }
        kv_append(h, id);
        generated++;
        pending = realloc(pending, n_pending + len + 1);
        memcpy(pending + n_pending, piece, len);
        n_pending += len;
        size_t complete = utf8_complete_length(pending, n_pending);
        if (complete == 0 && n_pending >= 4) {
            complete = n_pending; /* never a character: let it through */
        }
        memset(&result, 0, sizeof result);
        result.token_id = id;
        LLMCallState state = RKLLM_RUN_WAITING;
        char *text = NULL;
        if (complete > 0) {
            text = malloc(complete + 1);
            memcpy(text, pending, complete);
            text[complete] = '\0';
            memmove(pending, pending + complete, n_pending - complete);
            n_pending -= complete;
            state = RKLLM_RUN_NORMAL;
        }
        result.text = text;
        int ret = deliver(h, &result, job->userdata, state);
        if (text) {
            memset(text, 0, complete); /* the pointer dies with the callback */
            free(text);
        }
        if (ret == 1) {
            stopped_by_callback = 1;
            ended_naturally = 0;
            break;
        }
    }
    free(pending);
    if (ended_naturally && h->model.eos_id >= 0 && h->kv_pos < h->context_limit) {
        kv_append(h, h->model.eos_id); /* the end-of-turn token was sampled and stays in the cache */
    }
    double t2 = now_ms();
    h->paused = stopped_by_callback;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
#if RKLLM_SIM_AT_LEAST(E)
    result.perf.prefill_time_ms = (float)(t1 - t0);
    result.perf.prefill_tokens = (int)prefilled;
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
    free(job->prompt_cache_path);
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
static int prepare_job(SimHandle *h, SimJob *job, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
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
    if (infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache) {
        job->save_prompt_cache = 1;
        const char *path = infer->prompt_cache_params->prompt_cache_path;
        job->prompt_cache_path = strdup(path ? path : "./prompt_cache.bin");
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

/* ---------------------------------------------------------------- multi-batch (E/F, n_batch > 1) */
/* rkllm_run reads an array of n_batch RKLLMInput; each callback gets an array of n_batch RKLLMResult
 * (one step of every element); an element that has finished reports token_id -1 and text NULL while
 * the others go on, and the run ends when all have. Each element has its own KV cache (keep_history,
 * rkllm_get_kv_cache_size and ranged rkllm_clear_kv_cache work per element). One step costs
 * token_delay_ms plus batch_step_percent % of it for each extra active element; the prefill costs
 * prefill_us_per_token for every element's tokens. */

#if RKLLM_SIM_AT_LEAST(E)
static void batch_kv_append(SimKv *kv, int32_t id) {
    if (kv->pos >= kv->capacity) {
        int capacity = kv->capacity ? kv->capacity * 2 : 1024;
        kv->tokens = realloc(kv->tokens, sizeof(int32_t) * (size_t)capacity);
        kv->capacity = capacity;
    }
    kv->tokens[kv->pos++] = id;
}

/* What can be checked of element `index`: past the end of a single struct the runtime reads whatever
 * follows it (an out-of-bounds read on the device); invalid types and NULL or oversized inputs show. */
static int batch_input_ok(const SimHandle *h, const RKLLMInput *input, int index) {
    const char *hint = index > 0 ? " (rkllm_run reads n_batch consecutive RKLLMInput: was a single one passed?)" : "";
    switch (input->input_type) {
    case RKLLM_INPUT_PROMPT:
        if (!input->prompt_input) {
            fprintf(stderr, "E rkllm: batch input %d of %d: prompt is NULL%s\n", index, h->n_batch, hint);
            return 0;
        }
        return 1;
    case RKLLM_INPUT_TOKEN:
        if (!input->token_input.input_ids || input->token_input.n_tokens == 0 ||
            input->token_input.n_tokens > (size_t)h->context_limit) {
            fprintf(stderr, "E rkllm: batch input %d of %d: %zu token ids at %p%s\n", index, h->n_batch,
                    input->token_input.n_tokens, (void *)input->token_input.input_ids, hint);
            return 0;
        }
        return 1;
    case RKLLM_INPUT_EMBED:
    case RKLLM_INPUT_MULTIMODAL:
        fprintf(stderr, "E rkllm: batch input %d of %d: input type %d is not simulated in multi-batch\n", index,
                h->n_batch, (int)input->input_type);
        return 0;
    default:
        fprintf(stderr, "E rkllm: batch input %d of %d: invalid input type %d%s\n", index, h->n_batch,
                (int)input->input_type, hint);
        return 0;
    }
}

static int prepare_batch(SimHandle *h, RKLLMInput *inputs, RKLLMInferParam *infer, void *userdata) {
    if (infer->mode == RKLLM_INFER_GET_LOGITS) {
        fprintf(stderr, "E rkllm: logits mode is not simulated in multi-batch\n");
        return -1;
    }
    for (int i = 0; i < h->n_batch; i++) {
        if (!batch_input_ok(h, &inputs[i], i) || prepare_job(h, &h->batch_jobs[i], &inputs[i], infer, userdata) != 0) {
            return -1;
        }
        if (h->batch_jobs[i].save_prompt_cache) {
            fprintf(stderr, "E rkllm: prompt-cache saving is not simulated in multi-batch\n");
            return -1;
        }
    }
    return 0;
}

static void deliver_batch(SimHandle *h, RKLLMResult *results, LLMCallState state, int *ret) {
    int r = deliver(h, results, h->batch_jobs[0].userdata, state);
    if (ret) {
        *ret = r;
    }
}

static void batch_fail(SimHandle *h, RKLLMResult *results) {
    memset(results, 0, sizeof(RKLLMResult) * (size_t)h->n_batch);
    for (int i = 0; i < h->n_batch; i++) {
        results[i].token_id = -1;
    }
    deliver_batch(h, results, RKLLM_RUN_ERROR, NULL);
    h->last_status = -1;
}

static size_t job_input_count(const SimJob *job) {
    return job->input_type == RKLLM_INPUT_TOKEN ? job->n_tokens : job->n_bytes;
}

static void run_batch_hidden(SimHandle *h, RKLLMResult *results) {
    int n = h->n_batch, embd = h->model.embd_size;
    float *states[SIM_MAX_BATCH] = {0};
    memset(results, 0, sizeof(RKLLMResult) * (size_t)n);
    for (int i = 0; i < n; i++) {
        const SimJob *job = &h->batch_jobs[i];
        size_t n_input = job_input_count(job);
        states[i] = malloc(sizeof(float) * (size_t)embd * n_input);
        for (size_t t = 0; t < n_input; t++) {
            hidden_row(job, t, embd, states[i] + t * (size_t)embd);
        }
        results[i].token_id = -1;
        results[i].last_hidden_layer.hidden_states = states[i];
        results[i].last_hidden_layer.embd_size = embd;
        results[i].last_hidden_layer.num_tokens = (int)n_input;
    }
    deliver_batch(h, results, RKLLM_RUN_NORMAL, NULL);
    for (int i = 0; i < n; i++) {
        free(states[i]);
        h->batch_kv[i].pos = 0; /* single-turn: every element's cache is dropped */
    }
    memset(results, 0, sizeof(RKLLMResult) * (size_t)n);
    deliver_batch(h, results, RKLLM_RUN_FINISH, NULL);
    h->last_status = 0;
}

typedef struct {
    size_t n_input;
    size_t n_reply;
    long generated;
    int active;
    int natural; /* ended by its reply's end (the end-of-turn token is then held) */
    unsigned char *pending;
    size_t n_pending;
} SimElement;

static void run_batch_generate(SimHandle *h, RKLLMResult *results) {
    int n = h->n_batch;
    SimElement el[SIM_MAX_BATCH];
    memset(el, 0, sizeof el);
    long total_input = 0;
    for (int i = 0; i < n; i++) {
        SimJob *job = &h->batch_jobs[i];
        int start = job->keep_history ? h->batch_kv[i].pos : 0;
        el[i].n_input = job_input_count(job) + template_tokens(h, job, start);
        if (el[i].n_input == 0 || (size_t)start + el[i].n_input >= (size_t)h->context_limit) {
            fprintf(stderr, "E rkllm: batch input %d: prompt gather than max context (prompt: %zu tokens, max context: %d)\n",
                    i, (size_t)start + el[i].n_input, h->context_limit);
            batch_fail(h, results);
            return;
        }
    }
    for (int i = 0; i < n; i++) {
        SimJob *job = &h->batch_jobs[i];
        SimKv *kv = &h->batch_kv[i];
        kv->pos = job->keep_history ? kv->pos : 0;
        for (size_t t = job_input_count(job); t < el[i].n_input; t++) {
            batch_kv_append(kv, 0); /* the runtime's own template tokens */
        }
        for (size_t t = 0; t < job_input_count(job); t++) {
            batch_kv_append(kv, job->input_type == RKLLM_INPUT_TOKEN ? job->tokens[t] : job->bytes[t]);
        }
        if (h->model.reply_by_input) {
            job->mm_reply = input_reply(&h->model, kv->tokens, kv->pos);
        }
        el[i].n_reply = job->mm_reply ? strlen(job->mm_reply) : reply_token_count(&h->model);
        el[i].active = el[i].natural = 1;
        total_input += (long)el[i].n_input;
    }
    double t0 = now_ms();
    sleep_us(h->model.prefill_us_per_token * total_input);
    double t1 = now_ms();
    int max_new = h->batch_jobs[0].max_new_tokens;
    int stopped = 0;
    for (size_t step = 0;; step++) {
        if (atomic_load(&h->abort_requested)) {
            for (int i = 0; i < n; i++) {
                free(el[i].pending);
            }
            h->last_status = 0;
            return; /* aborted: no terminal callback */
        }
        int active = 0;
        for (int i = 0; i < n; i++) {
            if (!el[i].active) {
                continue;
            }
            if (step >= el[i].n_reply) {
                el[i].active = 0;
            } else if ((max_new > 0 && el[i].generated >= max_new) || h->batch_kv[i].pos >= h->context_limit) {
                el[i].active = el[i].natural = 0;
            } else {
                active++;
            }
        }
        if (active == 0) {
            break;
        }
        if (h->model.crash_after_tokens >= 0 && (long)step >= h->model.crash_after_tokens) {
            fprintf(stderr, "E rkllm: simulated crash after %zu steps\n", step);
            fflush(stderr);
            raise(SIGSEGV);
        }
        sleep_us(h->model.token_delay_ms * 10 * (100 + h->model.batch_step_percent * (active - 1)));
        char *texts[SIM_MAX_BATCH] = {0};
        size_t lens[SIM_MAX_BATCH] = {0};
        memset(results, 0, sizeof(RKLLMResult) * (size_t)n);
        for (int i = 0; i < n; i++) {
            results[i].token_id = -1; /* finished: token_id -1, text NULL */
            if (!el[i].active) {
                continue;
            }
            SimJob *job = &h->batch_jobs[i];
            int32_t id;
            const unsigned char *piece;
            size_t len;
            if (job->mm_reply) {
                id = (unsigned char)job->mm_reply[step];
                piece = (const unsigned char *)job->mm_reply + step;
                len = 1;
            } else {
                reply_token(&h->model, step, &id, &piece, &len);
            }
            batch_kv_append(&h->batch_kv[i], id);
            el[i].generated++;
            el[i].pending = realloc(el[i].pending, el[i].n_pending + len + 1);
            memcpy(el[i].pending + el[i].n_pending, piece, len);
            el[i].n_pending += len;
            size_t complete = utf8_complete_length(el[i].pending, el[i].n_pending);
            if (complete == 0 && el[i].n_pending >= 4) {
                complete = el[i].n_pending;
            }
            results[i].token_id = id;
            if (complete > 0) { /* else text stays NULL until the character is complete */
                texts[i] = malloc(complete + 1);
                memcpy(texts[i], el[i].pending, complete);
                texts[i][complete] = '\0';
                lens[i] = complete;
                memmove(el[i].pending, el[i].pending + complete, el[i].n_pending - complete);
                el[i].n_pending -= complete;
                results[i].text = texts[i];
            }
        }
        int ret = 0;
        deliver_batch(h, results, RKLLM_RUN_NORMAL, &ret);
        for (int i = 0; i < n; i++) {
            if (texts[i]) {
                memset(texts[i], 0, lens[i]); /* the pointers die with the callback */
                free(texts[i]);
            }
        }
        if (ret == 1) {
            stopped = 1;
            break;
        }
    }
    double t2 = now_ms();
    memset(results, 0, sizeof(RKLLMResult) * (size_t)n);
    for (int i = 0; i < n; i++) {
        free(el[i].pending);
        if (!stopped && el[i].natural && h->model.eos_id >= 0 && h->batch_kv[i].pos < h->context_limit) {
            batch_kv_append(&h->batch_kv[i], h->model.eos_id);
        }
        results[i].token_id = -1;
        results[i].perf.prefill_time_ms = (float)(t1 - t0);
        results[i].perf.prefill_tokens = (int)el[i].n_input;
        results[i].perf.generate_time_ms = (float)(t2 - t1);
        results[i].perf.generate_tokens = (int)el[i].generated;
        results[i].perf.memory_usage_mb = 42.0f * (float)n;
    }
    h->paused = stopped;
    if (!stopped) {
        deliver_batch(h, results, RKLLM_RUN_FINISH, NULL);
    }
    h->last_status = 0;
}

static void *run_batch_job(void *arg) {
    SimHandle *h = arg;
    RKLLMResult results[SIM_MAX_BATCH];
    h->last_keep_history = h->batch_jobs[0].keep_history;
    h->paused = 0;
    if (h->batch_jobs[0].mode == RKLLM_INFER_GENERATE) {
        run_batch_generate(h, results);
    } else {
        run_batch_hidden(h, results);
    }
    atomic_store(&h->abort_requested, 0);
    atomic_store(&h->running, 0);
    return NULL;
}

static void free_batch(SimHandle *h) {
    for (int i = 0; h->batch_jobs && i < h->n_batch; i++) {
        free_job(&h->batch_jobs[i]);
        free(h->batch_kv[i].tokens);
    }
    free(h->batch_jobs);
    free(h->batch_kv);
    h->batch_jobs = NULL;
    h->batch_kv = NULL;
}
#endif

static int start_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata, int wait) {
    SimHandle *h = handle;
    if (!h || !input || !infer) {
        return -1;
    }
    if (h->broken) {
        fprintf(stderr, "GGML_ASSERT: the model was not loaded\n");
        fflush(stderr);
        abort();
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
    void *(*worker)(void *) = run_job;
#if RKLLM_SIM_AT_LEAST(E)
    if (h->n_batch > 1) {
        worker = run_batch_job;
        if (prepare_batch(h, input, infer, userdata) != 0) {
            pthread_mutex_unlock(&h->lock);
            return -1;
        }
    } else
#endif
        if (prepare_job(h, &h->job, input, infer, userdata) != 0) {
        pthread_mutex_unlock(&h->lock);
        return -1;
    }
    atomic_store(&h->running, 1);
    if (pthread_create(&h->worker, NULL, worker, h) != 0) {
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

static int version_below(const char *version, const char *minimum) {
    int a[3] = {0, 0, 0}, b[3] = {0, 0, 0};
    sscanf(version, "%d.%d.%d", &a[0], &a[1], &a[2]);
    sscanf(minimum, "%d.%d.%d", &b[0], &b[1], &b[2]);
    for (int i = 0; i < 3; i++) {
        if (a[i] != b[i]) {
            return a[i] < b[i];
        }
    }
    return 0;
}

static const char *env_or(const char *name, const char *fallback) {
    const char *value = getenv(name);
    return value && *value ? value : fallback;
}

static void print_device_failure(void) {
    fprintf(stderr, "E RKNN: failed to open rknpu module, need to insmod rknpu driver!\n");
    fprintf(stderr, "E RKNN: failed to open rknn device!\n");
    fprintf(stderr, "E rkllm: Device is not available\n");
}

/* A model that does not load, reported as each release reports it (see the header comment). Returns
 * the value rkllm_init returns; *handle is left NULL or set to an unusable handle. */
static int fail_loading(const SimModel *model, LLMHandle *handle) {
    const char *line = model->init_fault == SIM_FAULT_BAD_MAGIC  ? "E RKNN: invalid rknn llm model magic"
                       : model->init_fault == SIM_FAULT_NPU_OOM ? "E RKNN: failed to malloc npu memory"
                                                                : "E rkllm: load model file error";
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
#if RKLLM_SIM_AT_LEAST(F)
    if (model->init_fault == SIM_FAULT_NPU_OOM) {
        raise(SIGSEGV); /* reported for 1.3.0: a failing init crashes instead of returning -1 */
    }
#endif
#if RKLLM_SIM_AT_LEAST(D)
    (void)handle;
    return -1;
#else
    if (model->init_fault != SIM_FAULT_LOAD_ERROR) {
        SimHandle *h = calloc(1, sizeof *h);
        pthread_mutex_init(&h->lock, NULL);
        h->broken = 1;
        *handle = h;
    }
    printf("I rkllm: rkllm init success\n");
    fflush(stdout);
    return 0; /* 1.1.x: init "succeeds" although the model was not loaded */
#endif
}

#if RKLLM_SIM_AT_LEAST(F)
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    const char *driver = env_or("RKLLM_SIM_DRIVER", "0.9.8");
    const char *platform = env_or("RKLLM_SIM_PLATFORM", "RKLLM-SIM");
    int device_absent = strcmp(env_or("RKLLM_SIM_NPU", "present"), "absent") == 0;
    if (handle) {
        *handle = NULL;
    }
#if RKLLM_SIM_AT_LEAST(D)
    if (device_absent) { /* the banner needs the driver version, which needs the device */
        print_device_failure();
        return -1;
    }
#endif
    printf("I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s\n", SIM_RUNTIME_VERSION,
           device_absent ? "unknown" : driver, platform);
    fflush(stdout);
#if !RKLLM_SIM_AT_LEAST(D)
    if (device_absent) {
        print_device_failure();
        return 0; /* 1.1.x: no error code, and no handle */
    }
#endif
    if (version_below(driver, SIM_MIN_DRIVER)) {
        fprintf(stderr, "W rkllm: Warning: Your rknpu driver version is too low, please upgrade to %s\n",
                SIM_MIN_DRIVER);
    }
    if (!handle || !param || !callback) {
        fprintf(stderr, "E rkllm: rkllm_init: null argument\n");
        return -1;
    }
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
    int n_batch = 1;
#if RKLLM_SIM_AT_LEAST(E)
    n_batch = param->extend_param.n_batch ? param->extend_param.n_batch : 1;
    if (n_batch > SIM_MAX_BATCH) {
        fprintf(stderr, "E rkllm: n_batch %d is more than the maximum (%d)\n", n_batch, SIM_MAX_BATCH);
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
    if (model.init_fault != SIM_FAULT_NONE) {
        int rc = fail_loading(&model, handle);
        free(model.reply);
        return rc;
    }
    printf("I rkllm: rkllm-toolkit version: sim, max_context_limit: %d, npu_core_num: 3, "
           "target_platform: %s, model_dtype: W8A8\n",
           model.max_context_len, model.target_platform[0] ? model.target_platform : "RKLLM-SIM");
    fflush(stdout);
    if (model.target_platform[0] && getenv("RKLLM_SIM_PLATFORM") && strcasecmp(model.target_platform, platform) != 0) {
        fprintf(stderr, "E rkllm: The model target_platform does not match! (model: %s, platform: %s)\n",
                model.target_platform, platform);
        free(model.reply);
        return -1;
    }
#if RKLLM_SIM_AT_LEAST(D)
    {
        char cpus[64] = "";
        size_t used = 0;
        for (int cpu = 0; cpu < 8; cpu++) {
            if (param->extend_param.enabled_cpus_mask & (1u << cpu)) {
                used += (size_t)snprintf(cpus + used, sizeof cpus - used, "%s%d", used ? ", " : "", cpu);
            }
        }
        printf("I rkllm: Enabled cpus: [%s]\nI rkllm: Enabled cpus num: %d\n", cpus,
               (int)param->extend_param.enabled_cpus_num);
        fflush(stdout);
    }
#endif
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
    h->n_batch = n_batch;
#if RKLLM_SIM_AT_LEAST(E)
    if (n_batch > 1) {
        h->batch_jobs = calloc((size_t)n_batch, sizeof(SimJob));
        h->batch_kv = calloc((size_t)n_batch, sizeof(SimKv));
        printf("I rkllm: multi-batch: n_batch = %d, one KV cache of %d tokens per batch\n", n_batch, h->context_limit);
        fflush(stdout);
        if (n_batch > SIM_RECOMMENDED_BATCH) {
            fprintf(stderr, "W rkllm: n_batch %d is more than the recommended %d\n", n_batch, SIM_RECOMMENDED_BATCH);
        }
    }
#endif
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
#if RKLLM_SIM_AT_LEAST(E)
    free_batch(h);
#endif
    free_token_state(h);
    free_token_reply(&h->model);
    free(h->model.reply); /* NULL on a broken handle */
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
    SimHandle *h = handle;
    if (!h || !prompt_cache_path || atomic_load(&h->running)) {
        return -1;
    }
    return load_prompt_cache_file(h, prompt_cache_path);
}

SIM_API int rkllm_release_prompt_cache(LLMHandle handle) {
    SimHandle *h = handle;
    if (!h || atomic_load(&h->running)) {
        return -1;
    }
    free(h->prompt_cache);
    h->prompt_cache = NULL;
    h->n_prompt_cache = 0;
    return 0;
}

#if RKLLM_SIM_AT_LEAST(D)
static int clear_whole_cache(SimHandle *h, int keep_system_prompt) {
    kv_truncate(h, keep_system_prompt ? h->system_len : 0);
    h->paused = 0;
    return 0;
}
#endif

#if RKLLM_SIM_AT_LEAST(E)
/* Multi-batch: the whole cache of every element, or [start_pos[i], end_pos[i]) of element i. */
static int clear_batch_cache(SimHandle *h, int keep_system_prompt, const int *start_pos, const int *end_pos) {
    if (!start_pos && !end_pos) {
        for (int i = 0; i < h->n_batch; i++) {
            int keep = keep_system_prompt ? h->system_len : 0;
            h->batch_kv[i].pos = keep < h->batch_kv[i].pos ? keep : h->batch_kv[i].pos;
        }
        h->paused = 0;
        return 0;
    }
    if (!start_pos || !end_pos || h->last_keep_history != 0 || !h->paused) {
        fprintf(stderr, "E rkllm: ranged clear_kv_cache needs keep_history=0 and a paused run\n");
        return -1;
    }
    for (int i = 0; i < h->n_batch; i++) {
        if (start_pos[i] < 0 || end_pos[i] < start_pos[i] || end_pos[i] > h->batch_kv[i].pos) {
            fprintf(stderr, "E rkllm: clear_kv_cache range [%d, %d) of batch %d outside its cache (%d)\n",
                    start_pos[i], end_pos[i], i, h->batch_kv[i].pos);
            return -1;
        }
    }
    for (int i = 0; i < h->n_batch; i++) {
        SimKv *kv = &h->batch_kv[i];
        memmove(kv->tokens + start_pos[i], kv->tokens + end_pos[i], sizeof(int32_t) * (size_t)(kv->pos - end_pos[i]));
        kv->pos -= end_pos[i] - start_pos[i];
    }
    return 0;
}

SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    SimHandle *h = handle;
    if (!h || atomic_load(&h->running)) {
        return -1;
    }
    if (h->n_batch > 1) {
        return clear_batch_cache(h, keep_system_prompt, start_pos, end_pos);
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
    kv_remove_range(h, start, end);
    return 0;
}

SIM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    SimHandle *h = handle;
    if (!h || !cache_sizes) {
        return -1;
    }
    if (h->n_batch > 1) { /* the caller provides n_batch ints */
        for (int i = 0; i < h->n_batch; i++) {
            cache_sizes[i] = h->batch_kv[i].pos;
        }
        return 0;
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
