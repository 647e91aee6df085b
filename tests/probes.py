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
    DELTAS.clear()
    return True


def steering_state(model):
    """Requests that the plugin's runtime on this worker still tracks (req_id -> slot, -1 = unsteered)."""
    return dict(model.emosteer_runtime.slot_of)


# ---- architecture tests: the plugin's hooks on and off, and the test's own reference offsets -----------------
REFERENCE = []


def hooked_modules(model):
    """Names of the modules that have forward hooks (the plugin's, when no probe is installed)."""
    return sorted(name for name, module in model.named_modules() if module._forward_hooks)


def detach_steering(model):
    runtime = model.emosteer_runtime
    for handle in runtime.handles:
        handle.remove()
    runtime.handles = []
    return True


def attach_steering(model, hook):
    """Hook the model again, at `hook`, with the bank the engine loaded (its rows stay where they were)."""
    from vllm_emosteer.engine.worker.hooks import install_hooks

    detach_steering(model)
    runtime = model.emosteer_runtime
    rows = {runtime.options.sets.layers[row]: row for row in runtime.options.steered_rows()}
    runtime.handles = install_hooks(model, runtime, hook, rows, next(model.parameters()).dtype)
    return len(runtime.handles)


def add_reference_offsets(model, module_names, offsets, index):
    """Add offsets[i] to every token of the output of module_names[i] (of a tuple output, its `index`th tensor)."""
    modules = dict(model.named_modules())
    for name, offset in zip(module_names, offsets):
        def add(_module, _args, output, offset=offset):
            x = output[index] if isinstance(output, tuple) else output
            x.add_(offset)  # computed in fp32, rounded once into x (as the plugin does)
            return output

        REFERENCE.append(modules[name].register_forward_hook(add))
    return len(REFERENCE)


def remove_reference_offsets(model):
    for handle in REFERENCE:
        handle.remove()
    REFERENCE.clear()
    return True


DELTAS = []


def capture_deltas(model, module_names, index):
    """Record, for every call of the named modules, their output tensor (of a tuple, its `index`th) before and
    after the other forward hooks (the plugin's). Taken with take_deltas, removed with remove_capture."""
    modules = dict(model.named_modules())
    for name in module_names:
        def before(module, _args, output):
            module._probe_before = (output[index] if isinstance(output, tuple) else output).detach().clone()

        def after(module, _args, output, name=name):
            x = output[index] if isinstance(output, tuple) else output
            DELTAS.append((name, module._probe_before, x.detach().clone()))

        HANDLES.append(modules[name].register_forward_hook(before, prepend=True))
        HANDLES.append(modules[name].register_forward_hook(after))
    return len(HANDLES)


def take_deltas(model):
    import pickle

    out = pickle.dumps(list(DELTAS))
    DELTAS.clear()
    return out


def steering_where(model):
    """Which model runner drives the steering and which path the add takes (the start-up log's words)."""
    return model.emosteer_runtime.where
