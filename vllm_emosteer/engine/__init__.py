"""Steering inside vLLM: request specs, engine options, the runtime, the hooks and the op."""
