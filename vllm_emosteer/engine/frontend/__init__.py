"""The front-end process (`LLM`'s process, or each `vllm serve` API server): start-up checks, request validation,
prefix-cache keys, which requests use which vector set, and runtime changes of the vector sets."""
