/*
 * Prints sizeof / offsetof / member size of every struct and field of rkllm.h for the family it is
 * compiled for. Output lines:  "<Struct> <sizeof>"  and  "<Struct>.<field> <offset> <size>".
 * Used by tests/test_rkllm_abi_layout.py to check the ctypes layouts against the C compiler.
 */
#include "rkllm.h"

#include <stdio.h>

#define STRUCT(t) printf("%s %zu\n", #t, sizeof(t))
#define FIELD(t, f) printf("%s.%s %zu %zu\n", #t, #f, offsetof(t, f), sizeof(((t *)0)->f))

int main(void) {
    STRUCT(RKLLMExtendParam);
    FIELD(RKLLMExtendParam, base_domain_id);
#if RKLLM_SIM_AT_LEAST(D)
    FIELD(RKLLMExtendParam, embed_flash);
    FIELD(RKLLMExtendParam, enabled_cpus_num);
    FIELD(RKLLMExtendParam, enabled_cpus_mask);
#endif
#if RKLLM_SIM_AT_LEAST(E)
    FIELD(RKLLMExtendParam, n_batch);
    FIELD(RKLLMExtendParam, use_cross_attn);
#endif
    FIELD(RKLLMExtendParam, reserved);

    STRUCT(RKLLMParam);
    FIELD(RKLLMParam, model_path);
    FIELD(RKLLMParam, max_context_len);
    FIELD(RKLLMParam, max_new_tokens);
    FIELD(RKLLMParam, top_k);
#if RKLLM_SIM_AT_LEAST(D)
    FIELD(RKLLMParam, n_keep);
#endif
    FIELD(RKLLMParam, top_p);
    FIELD(RKLLMParam, temperature);
    FIELD(RKLLMParam, repeat_penalty);
    FIELD(RKLLMParam, frequency_penalty);
    FIELD(RKLLMParam, presence_penalty);
    FIELD(RKLLMParam, mirostat);
    FIELD(RKLLMParam, mirostat_tau);
    FIELD(RKLLMParam, mirostat_eta);
    FIELD(RKLLMParam, skip_special_token);
#if RKLLM_SIM_AT_LEAST(F)
    FIELD(RKLLMParam, ignore_eos_token);
#endif
    FIELD(RKLLMParam, is_async);
#if !RKLLM_SIM_AT_LEAST(F)
    FIELD(RKLLMParam, img_start);
    FIELD(RKLLMParam, img_end);
    FIELD(RKLLMParam, img_content);
#endif
    FIELD(RKLLMParam, extend_param);

    STRUCT(RKLLMLoraAdapter);
    FIELD(RKLLMLoraAdapter, lora_adapter_path);
    FIELD(RKLLMLoraAdapter, lora_adapter_name);
    FIELD(RKLLMLoraAdapter, scale);

    STRUCT(RKLLMEmbedInput);
    FIELD(RKLLMEmbedInput, embed);
    FIELD(RKLLMEmbedInput, n_tokens);

    STRUCT(RKLLMTokenInput);
    FIELD(RKLLMTokenInput, input_ids);
    FIELD(RKLLMTokenInput, n_tokens);

    STRUCT(RKLLMMultiModalInput);
    FIELD(RKLLMMultiModalInput, prompt);
#if RKLLM_SIM_AT_LEAST(F)
    FIELD(RKLLMMultiModalInput, image);
    FIELD(RKLLMMultiModalInput, image.image_embed);
    FIELD(RKLLMMultiModalInput, image.n_image_tokens);
    FIELD(RKLLMMultiModalInput, image.n_image);
    FIELD(RKLLMMultiModalInput, image.image_start);
    FIELD(RKLLMMultiModalInput, image.image_end);
    FIELD(RKLLMMultiModalInput, image.image_content);
    FIELD(RKLLMMultiModalInput, image.image_width);
    FIELD(RKLLMMultiModalInput, image.image_height);
    FIELD(RKLLMMultiModalInput, video);
    FIELD(RKLLMMultiModalInput, video.video_embed);
    FIELD(RKLLMMultiModalInput, video.n_frame_tokens);
    FIELD(RKLLMMultiModalInput, video.n_frame_per_video);
    FIELD(RKLLMMultiModalInput, video.n_video);
    FIELD(RKLLMMultiModalInput, video.video_start);
    FIELD(RKLLMMultiModalInput, video.video_end);
    FIELD(RKLLMMultiModalInput, video.video_content);
    FIELD(RKLLMMultiModalInput, video.frame_width);
    FIELD(RKLLMMultiModalInput, video.frame_height);
#else
    FIELD(RKLLMMultiModalInput, image_embed);
    FIELD(RKLLMMultiModalInput, n_image_tokens);
#if RKLLM_SIM_AT_LEAST(E)
    FIELD(RKLLMMultiModalInput, n_image);
    FIELD(RKLLMMultiModalInput, image_width);
    FIELD(RKLLMMultiModalInput, image_height);
#endif
#endif

    STRUCT(RKLLMInput);
#if RKLLM_SIM_AT_LEAST(E)
    FIELD(RKLLMInput, role);
    FIELD(RKLLMInput, enable_thinking);
#endif
    FIELD(RKLLMInput, input_type);
    FIELD(RKLLMInput, prompt_input);
    FIELD(RKLLMInput, embed_input);
    FIELD(RKLLMInput, token_input);
    FIELD(RKLLMInput, multimodal_input);

    STRUCT(RKLLMLoraParam);
    FIELD(RKLLMLoraParam, lora_adapter_name);

    STRUCT(RKLLMPromptCacheParam);
    FIELD(RKLLMPromptCacheParam, save_prompt_cache);
    FIELD(RKLLMPromptCacheParam, prompt_cache_path);

#if RKLLM_SIM_AT_LEAST(E)
    STRUCT(RKLLMCrossAttnParam);
    FIELD(RKLLMCrossAttnParam, encoder_k_cache);
    FIELD(RKLLMCrossAttnParam, encoder_v_cache);
    FIELD(RKLLMCrossAttnParam, encoder_mask);
    FIELD(RKLLMCrossAttnParam, encoder_pos);
    FIELD(RKLLMCrossAttnParam, num_tokens);
#endif

#if RKLLM_SIM_AT_LEAST(F)
    STRUCT(RKLLMSamplingParam);
    FIELD(RKLLMSamplingParam, top_k);
    FIELD(RKLLMSamplingParam, top_p);
    FIELD(RKLLMSamplingParam, temperature);
    FIELD(RKLLMSamplingParam, repeat_penalty);
    FIELD(RKLLMSamplingParam, frequency_penalty);
    FIELD(RKLLMSamplingParam, presence_penalty);
    FIELD(RKLLMSamplingParam, mirostat);
    FIELD(RKLLMSamplingParam, mirostat_tau);
    FIELD(RKLLMSamplingParam, mirostat_eta);
#endif

    STRUCT(RKLLMInferParam);
    FIELD(RKLLMInferParam, mode);
    FIELD(RKLLMInferParam, lora_params);
    FIELD(RKLLMInferParam, prompt_cache_params);
#if RKLLM_SIM_AT_LEAST(F)
    FIELD(RKLLMInferParam, sampling_params);
#endif
#if RKLLM_SIM_AT_LEAST(D)
    FIELD(RKLLMInferParam, keep_history);
#endif
#if RKLLM_SIM_AT_LEAST(F)
    FIELD(RKLLMInferParam, max_new_tokens);
#endif

    STRUCT(RKLLMResultLastHiddenLayer);
    FIELD(RKLLMResultLastHiddenLayer, hidden_states);
    FIELD(RKLLMResultLastHiddenLayer, embd_size);
    FIELD(RKLLMResultLastHiddenLayer, num_tokens);

#if RKLLM_SIM_AT_LEAST(D)
    STRUCT(RKLLMResultLogits);
    FIELD(RKLLMResultLogits, logits);
    FIELD(RKLLMResultLogits, vocab_size);
    FIELD(RKLLMResultLogits, num_tokens);
#endif

#if RKLLM_SIM_AT_LEAST(E)
    STRUCT(RKLLMPerfStat);
    FIELD(RKLLMPerfStat, prefill_time_ms);
    FIELD(RKLLMPerfStat, prefill_tokens);
    FIELD(RKLLMPerfStat, generate_time_ms);
    FIELD(RKLLMPerfStat, generate_tokens);
    FIELD(RKLLMPerfStat, memory_usage_mb);
#endif

    STRUCT(RKLLMResult);
    FIELD(RKLLMResult, text);
    FIELD(RKLLMResult, token_id);
    FIELD(RKLLMResult, last_hidden_layer);
#if RKLLM_SIM_AT_LEAST(D)
    FIELD(RKLLMResult, logits);
#endif
#if RKLLM_SIM_AT_LEAST(E)
    FIELD(RKLLMResult, perf);
#endif

#if RKLLM_SIM_AT_LEAST(F)
    STRUCT(RKLLMCallback);
    FIELD(RKLLMCallback, result_callback);
    FIELD(RKLLMCallback, result_userdata);
    FIELD(RKLLMCallback, tokenizer_callback);
    FIELD(RKLLMCallback, tokenizer_userdata);
    FIELD(RKLLMCallback, embed_callback);
    FIELD(RKLLMCallback, embed_userdata);
#endif

#if RKLLM_SIM_AT_LEAST(E)
    /* Multi-batch: rkllm_run reads RKLLMInput[n_batch], the callback gets RKLLMResult[n_batch].
     * "array <struct> <n> <sizeof the array> <offset of a member of the last element>" */
    {
        RKLLMInput inputs[4];
        RKLLMResult results[4];
        printf("array RKLLMInput 4 %zu %td\n", sizeof inputs,
               (char *)&inputs[3].token_input.n_tokens - (char *)inputs);
        printf("array RKLLMResult 4 %zu %td\n", sizeof results, (char *)&results[3].token_id - (char *)results);
    }
#endif
    return 0;
}
