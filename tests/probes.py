"""Functions that tests run inside engine workers via `LLM.apply_model` (importable there by PYTHONPATH)."""

CAPTURED = []
HANDLES = []


def install_capture(model):
    """Record, for every attention call, (layer, positions, output before steering, output after)."""
    for index in range(model.model.start_layer, model.model.end_layer):
        attention = model.model.layers[index].self_attn

        def before(module, args, output, index=index):
            module._probe_before = output.detach().clone()

        def after(module, args, output, index=index):
            CAPTURED.append((index, args[0].detach().clone(), module._probe_before, output.detach().clone()))

        HANDLES.append(attention.register_forward_hook(before, prepend=True))
        HANDLES.append(attention.register_forward_hook(after))
    return len(HANDLES)


def take_captures(model):
    out = list(CAPTURED)
    CAPTURED.clear()
    return out


def remove_capture(model):
    for handle in HANDLES:
        handle.remove()
    HANDLES.clear()
    CAPTURED.clear()
    return True


def steering_state(model):
    """Slots still held by the plugin's runtime (there is one runner per worker)."""
    import gc

    from vllm_emosteer.runtime import SteeringRuntime

    runtimes = [o for o in gc.get_objects() if isinstance(o, SteeringRuntime)]
    return [dict(r.slot_of) for r in runtimes]
