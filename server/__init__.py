"""OpenAI-compatible HTTP server over vLLM's AsyncLLM (``mod-serve serve``).

vLLM does the work (tokenizer, chat template, sampling, detokenization, logprobs, usage); this
package owns the HTTP surface: routes, API key, OpenAI-style errors, disconnect handling,
``/health``, ``/metrics`` with MoD gauges, and the command line.
"""
