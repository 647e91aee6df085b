"""What steering adds to one engine step, measured without the engine: the worker runtime's own per-step work at the
model's shape, for no request steered and for K = 1, 8, 32, 128, 256 distinct mixes over the batch.

End-to-end runs on a shared CPU (benchmarks/throughput.py --sweep) move by +-5% or more from run to run; the work
steering adds per step is far smaller, so this measures it directly, with the real `SteeringRuntime` (the same
options, bank and slots as the plugin builds from the model's config) and a batch shaped as the sweep's:
  decode   every request has one token in the step (all of them steered when steered)
  prefill  one step of --tokens prompt tokens, 128 per request ("response" positions: each request's last
           prompt token is steered)
Paths:
  eager     `prepare` (rows, the host plan) + the host plan's add at every hooked layer (`steer_eager`)
  compiled  `prepare` + a torch.compile'd stand-in of the hooked layers (a pointwise op where attention would be,
            the traced mask-and-gather add `steer_add_masked`, the residual add, an RMS norm), minus the same stand-in
            without the add: what the add costs inside Inductor's fused loops
Also: the one-off cost of admitting a steered request (parsing its spec, its coefficients, its per-slot offsets).
Each number is the best of --repeats timings of --steps steps, on this process's torch threads.

    python benchmarks/step_cost.py [--requests 256] [--tokens 4096] [--model PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import spread_specs, sweep_ks  # noqa: E402  the sweep's K values and mixes (request i: mix i % K)

PREFILL_PROMPT = 128


def runtime_for(model: str, requests: int, tokens: int):
    from transformers import AutoConfig

    from vllm_emosteer.engine.options import options_from_vllm_config
    from vllm_emosteer.engine.worker.runtime import SteeringRuntime

    hf = AutoConfig.from_pretrained(model)
    config = SimpleNamespace(additional_config={"emosteer": {}},
                             model_config=SimpleNamespace(hf_config=hf, hf_text_config=hf))
    options = options_from_vllm_config(config)
    runtime = SteeringRuntime(options, max_tokens=tokens, max_slots=min(requests, 256), device=torch.device("cpu"))
    runtime.host_plan = True
    return runtime


def batch(workload: str, requests: int, tokens: int):
    """(request ids, tokens per request, computed tokens, prompt length) of one step."""
    if workload == "decode":
        n = requests
        per_request, computed, prompt = np.ones(n, np.int32), np.full(n, 40), 32
    else:
        n = max(1, tokens // PREFILL_PROMPT)
        per_request, computed, prompt = np.full(n, PREFILL_PROMPT, np.int32), np.zeros(n, np.int64), PREFILL_PROMPT
    return [f"r{i}" for i in range(n)], per_request, computed, prompt


def best_ms(step, steps: int, repeats: int) -> float:
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e3


def stand_in(runtime, steered: bool):
    """The hooked layers as Inductor sees them: attention's place, the hook's add, the residual add, the norm."""
    from vllm_emosteer.engine.worker.ops import steer_add_masked

    bank_rows = runtime.options.steered_rows()

    def layers(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for row in bank_rows:
            attn = x * 1.0001
            if steered:
                steer_add_masked(attn, runtime.row_of_token.gpu, runtime.coeff.gpu, runtime.device_vectors, row,
                                 runtime.slot_offsets)
            residual = residual + attn
            x = (residual.float() * torch.rsqrt(residual.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
        return x

    return torch.compile(layers, dynamic=True)


def measure(args) -> dict:
    from vllm_emosteer.default_model import model_path

    model = args.model or str(model_path())
    runtime = runtime_for(model, args.requests, args.tokens)
    bank_rows = runtime.options.steered_rows()
    hidden = runtime.device_vectors.shape[-1]
    cells = ["unsteered"] + [f"K={k}" for k in sweep_ks(args.requests)]
    report = {"model": model, "hooked_layers": len(bank_rows), "hidden_size": hidden, "requests": args.requests,
              "tokens": args.tokens, "threads": torch.get_num_threads(), "steps": args.steps,
              "repeats": args.repeats, "ms_per_step": {}, "admit_ms_per_request": {}}
    for workload in ("decode", "prefill"):
        ids, per_request, computed, prompt = batch(workload, args.requests, args.tokens)
        total = int(per_request.sum())
        x = torch.randn(total, hidden).bfloat16()
        residual = torch.randn(total, hidden).bfloat16()
        compiled = {steered: stand_in(runtime, steered) for steered in (False, True)}
        rows = report["ms_per_step"].setdefault(workload, {"eager": {}, "compiled": {}})
        without = None
        for cell in cells:
            runtime.forget(list(runtime.slot_of))  # every cell admits its requests afresh
            specs = [None] * len(ids) if cell == "unsteered" else spread_specs(int(cell[2:]), len(ids))
            requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=s), num_prompt_tokens=prompt)
                        for r, s in zip(ids, specs)}
            start = time.perf_counter()
            runtime.prepare(ids, requests, per_request, computed)  # admits every request
            if cell != "unsteered":
                report["admit_ms_per_request"][f"{workload} {cell}"] = (time.perf_counter() - start) * 1e3 / len(ids)

            def eager_step():
                runtime.prepare(ids, requests, per_request, computed)
                for row in bank_rows:
                    runtime.steer_eager(x, row)

            def compiled_step(steered=True):
                runtime.prepare(ids, requests, per_request, computed)
                compiled[steered](x, residual)

            rows["eager"][cell] = best_ms(eager_step, args.steps, args.repeats)
            if without is None:
                without = best_ms(lambda: compiled_step(False), args.steps, args.repeats)
            rows["compiled"][cell] = best_ms(compiled_step, args.steps, args.repeats) - without
            print(f"[{workload}] {cell}: eager {rows['eager'][cell]:.3f} ms, compiled "
                  f"{rows['compiled'][cell]:+.3f} ms per step", file=sys.stderr)
        rows["compiled_stand_in_without_steering_ms"] = without
    return report


def print_report(report: dict) -> None:
    cells = list(report["ms_per_step"]["decode"]["eager"])
    print(f"\nSteering work per engine step, ms ({report['hooked_layers']} hooked layers, H = {report['hidden_size']}, "
          f"{report['requests']} requests, {report['threads']} threads, best of {report['repeats']} x "
          f"{report['steps']} steps):")
    print("| workload | path | " + " | ".join(cells) + " |")
    print("|---|---|" + "---|" * len(cells))
    for workload, paths in report["ms_per_step"].items():
        for path in ("eager", "compiled"):
            print(f"| {workload} | {path} | " + " | ".join(f"{paths[path][c]:.2f}" for c in cells) + " |")
    admit = report["admit_ms_per_request"]
    print(f"\nAdmitting a steered request: {min(admit.values()):.2f}-{max(admit.values()):.2f} ms each, once.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder whose config fits the vectors (default: the default model)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the prefill step (max_num_batched_tokens)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
