"""`vllm-emosteer`: model-path | extract | inspect | import | export | demo | serve (= `vllm serve`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _die(message: str, code: int = 2) -> int:
    print(f"vllm-emosteer: error: {message}", file=sys.stderr)
    return code


def cmd_model_path(args) -> int:
    from .default_model import model_path

    print(model_path())
    return 0


def cmd_extract(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import DEFAULT_MODEL_NAME, model_path
    from .extract import EMOTIONS, TEMPLATES, extract

    unknown = [e for e in args.emotions if e not in EMOTIONS]
    if unknown:
        return _die(f"unknown emotion(s) {unknown}; EmotionQuery has {list(EMOTIONS)}")
    model = args.model or str(model_path())
    if not Path(model).is_dir():
        return _die(f"model folder not found: {model} (no model hub here: give a local folder)")
    templates = dict(TEMPLATES)
    if args.neutral_template:
        templates["neutral"] = args.neutral_template
    if args.emotion_template:
        if "{emotion}" not in args.emotion_template:
            return _die("--emotion-template must contain {emotion}")
        templates["emotional"] = args.emotion_template
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
    bank, _ = extract(
        hf_model, tokenizer, emotions=args.emotions, questions_per_emotion=args.questions_per_emotion,
        hook=args.hook, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        templates=templates, model_name=DEFAULT_MODEL_NAME if args.model is None else Path(model).name,
    )
    print(f"wrote {bank.save(args.out)}: {list(bank.vectors.shape)} (layers, emotions, hidden), hook {bank.hook}")
    return 0


def _bank_arg(path: str | None):
    from .bank import EmotionBank
    from .options import bundled_vectors_path

    target = Path(path) if path else bundled_vectors_path()
    return EmotionBank.load(target), target


def cmd_inspect(args) -> int:
    from .inspect_bank import plot, render_text, summary

    bank, path = _bank_arg(args.file)
    info = summary(bank, path)
    if args.plot:
        plot(info, Path(args.plot))
    if args.json:
        print(json.dumps(info))
    else:
        print(render_text(info))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def cmd_import(args) -> int:
    from .bank import model_facts
    from .interop import detect_format, import_gguf, import_paper_json

    sources = [Path(s) for s in args.src]
    for source in sources:
        if not source.exists():
            return _die(f"{source}: no such file or folder")
    fmt = args.format or detect_format(sources[0])
    model = None
    if args.model:
        from transformers import AutoConfig

        model = model_facts(AutoConfig.from_pretrained(args.model), Path(args.model).name)
    if fmt == "paper-json":
        bank = import_paper_json(sources, model)
    else:
        bank = import_gguf(sources, args.emotion, model)
    if model:
        from transformers import AutoConfig

        bank.check_fits(AutoConfig.from_pretrained(args.model))
    print(f"wrote {bank.save(args.out)}: {fmt}, emotions {bank.emotions}, {len(bank.layers)} layers, "
          f"hidden {bank.hidden_size}, hook {bank.hook}")
    return 0


def cmd_export(args) -> int:
    from .interop import export_gguf

    bank, _ = _bank_arg(args.file)
    for path in export_gguf(bank, Path(args.gguf), args.emotion):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.vectors, args.intensity, args.max_tokens, args.compile)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-emosteer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("model-path", help="print the default model's folder (converting it once)").set_defaults(
        func=cmd_model_path)

    p = sub.add_parser("extract", help="extract emotion vectors (the paper's recipe) with transformers")
    p.add_argument("--model", help="local HF model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="vectors file to write (.safetensors)")
    p.add_argument("--questions-per-emotion", type=int, default=50)
    p.add_argument("--hook", choices=["attn_out", "residual"], default="attn_out")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--emotions", nargs="+", default=["joy", "anger", "disgust", "fear", "sadness"])
    p.add_argument("--neutral-template", help="system prompt of the neutral answers")
    p.add_argument("--emotion-template", help="system prompt of the emotional answers, with {emotion}")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help="metadata, per-layer norms and cosine similarities of a vectors file")
    p.add_argument("file", nargs="?", help="vectors file (default: the bundled vectors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write a PNG: norm per layer per emotion, and the cosine heatmap")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import", help="import the paper's JSON vectors or GGUF control vectors")
    p.add_argument("src", nargs="+", help="files or folders (paper: <model>_<emotion>.json; GGUF: one per emotion)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["paper-json", "gguf"])
    p.add_argument("--emotion", nargs="+", help="emotion name of each GGUF file (default: from the file name)")
    p.add_argument("--model", help="local HF model folder the vectors belong to (checked and recorded)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export a vectors file as llama.cpp / repeng GGUF control vectors")
    p.add_argument("file", nargs="?", help="vectors file (default: the bundled vectors)")
    p.add_argument("--gguf", required=True, help="output .gguf (OUT-<emotion>.gguf when several emotions)")
    p.add_argument("--emotion", nargs="+", help="emotions to export (default: all)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the default model answering unsteered, in each emotion and a mix, in one batch")
    p.add_argument("--model")
    p.add_argument("--vectors")
    p.add_argument("--intensity", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--compile", action="store_true", help="use vLLM's compiled mode instead of eager")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    from .bank import BankError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after `serve` is vLLM's: `vllm serve MODEL --additional-config ...`
        from .serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BankError, FileNotFoundError) as exc:
        return _die(str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
