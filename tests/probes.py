"""Functions that tests run inside engine workers via `LLM.apply_model` (importable there by PYTHONPATH)."""

CAPTURED = []
HANDLES = []


def install_capture(model):
    """Record, for every attention call, (layer, positions, output before steering, output after)."""
    for index in range(model.model.start_layer, model.model.end_layer):
        attention = model.model.layers[index].self_attn

        def before(module, args, output, index=index):
            module._probe_before = output.detach().clone()

        def after(module, args, kwargs, output, index=index):
            positions = kwargs["positions"] if "positions" in kwargs else args[0]
            CAPTURED.append((index, positions.detach().clone(), module._probe_before, output.detach().clone()))

        HANDLES.append(attention.register_forward_hook(before, prepend=True))
        HANDLES.append(attention.register_forward_hook(after, with_kwargs=True))
    return len(HANDLES)


def take_captures(model):
    """Pickled, because vLLM's RPC encoder does not round-trip tensors nested in tuples."""
    import pickle

    out = pickle.dumps(list(CAPTURED))
    CAPTURED.clear()
    return out


def remove_capture(model):
    for handle in HANDLES:
        handle.remove()
    HANDLES.clear()
    CAPTURED.clear()
    return True


def steering_state(model):
    """Requests that the plugin's runtime on this worker still tracks (req_id -> slot, -1 = unsteered)."""
    return dict(model.emosteer_runtime.slot_of)
