"""vllm-emosteer: per-request emotion steering for vLLM (Emotion Vectors, Dong et al., arXiv 2502.04075)."""

__version__ = "0.1.0"
__all__ = ["SetUpdateError", "SteeringError", "load_set", "register", "steer", "unload_set"]


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; vLLM calls it in every process."""
    from .engine.plugin import install

    install()


def __getattr__(name):
    # Lazy, so that the kernel, op and hooks import without vLLM (the GPU check machine has none).
    if name in ("steer", "SteeringError"):
        from .engine import spec

        return getattr(spec, name)
    if name in ("load_set", "unload_set", "SetUpdateError"):
        from .engine.frontend import set_changes as updates

        return getattr(updates, name)
    raise AttributeError(name)
