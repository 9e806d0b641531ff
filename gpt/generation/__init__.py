"""Autoregressive generation: sampling as pure functions, two decoders and the generation API.

The modules, each importing only the ones listed before it:

- `sampling`: logit processing (penalties, temperature, top-k/top-p/min-p) and the draw (`race`), as
  pure functions of the logits; `SamplingConfig`, `SamplingPlan`, `choose_tokens`.
- `cache`: the eager decoder's KV cache (`KVCache`) and the compiled decoder's static state
  (`DecodeState`, its `LayerCache`s, and the prefill and step views the model writes through).
- `eager`: the eager `Decoder`, token by token on the growing cache.
- `compiled`: the `CompiledDecoder`, prefill and the one-token step as compiled static-shape
  functions, and the compile bookkeeping (`compile_log`).
- `api`: `make_decoder` (compiled or eager), `generate_stream`, `generate`, `generate_completions`.
- `engine`: continuous batching (`Engine`, `RequestParams`, `Request`, `Event`): a fixed set of slots kept
  busy with requests, each with its own sampling settings, seed and stop strings.

Every row of a batch has its own length in the KV cache: prompts of different lengths share a batch.

gpt/model.py (`GPT.generate`) and gpt/sample.py (the sampler CLI) use the API.
"""
from .api import Completion, StopStrings, generate, generate_completions, generate_stream, make_decoder
from .cache import DecodeState, KVCache, LayerCache
from .compiled import (CompiledDecoder, CompileEvent, compile_log, compile_unavailable_reason, decode_step, prefill,
                       prefill_bucket, prefill_length)
from .eager import Decoder
from .engine import Engine, Event, Request, RequestParams
from .sampling import (SamplingConfig, SamplingPlan, apply_frequency_presence_penalty, apply_min_p,
                       apply_repetition_penalty, apply_top_k, apply_top_p, check_sampling_value, choose_tokens,
                       choose_tokens_rows, draw_exponential, process_logits, race, record_tokens, rows_params,
                       rows_plan, sample_next, token_counts)

__all__ = ["KVCache", "LayerCache", "DecodeState", "SamplingConfig", "SamplingPlan", "Decoder", "CompiledDecoder",
           "CompileEvent", "Completion", "StopStrings", "check_sampling_value", "token_counts",
           "apply_repetition_penalty", "apply_frequency_presence_penalty", "apply_top_k", "apply_top_p",
           "apply_min_p", "process_logits", "sample_next", "draw_exponential", "race", "choose_tokens",
           "record_tokens", "compile_log", "compile_unavailable_reason", "prefill_bucket", "prefill_length",
           "prefill", "decode_step", "make_decoder", "generate_stream", "generate", "generate_completions",
           "choose_tokens_rows", "rows_plan", "rows_params", "Engine", "Event", "Request", "RequestParams"]
