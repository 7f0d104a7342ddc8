"""dllm.serve: an OpenAI-compatible server with iteration-level batching (ORCA) and a paged
KV cache (vLLM) spread over the ranks. ``python -m dllm.serve``; see docs/serving.md.

- api.py: the HTTP endpoints (root's thread)    - scheduler.py: the batch, per iteration
- engine.py: the loop every rank runs            - chat.py, sampling.py, metrics.py
"""
