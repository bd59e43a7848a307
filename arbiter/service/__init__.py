"""The online half: an OpenAI-compatible server that samples N candidates and returns the best by reward.

Never imports ``arbiter.training``; imports vLLM only when ``ARBITER_ENGINE=vllm``.
"""
