"""`vllm-emosteer`: model-path | extract | inspect | import | export | demo | serve (= `vllm serve`)."""

from __future__ import annotations

import argparse
import json
import os
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
    from .emotions import EMOTIONS
    from .extraction.extract import TEMPLATES, extract
    from .extraction.pairs import PairsError, load_pairs

    unknown = [e for e in args.emotions if e not in EMOTIONS]
    if unknown and not args.pairs:
        return _die(f"unknown emotion(s) {unknown}; known: {list(EMOTIONS)} (your own concepts: --pairs FILE)")
    try:
        pairs = load_pairs(args.pairs) if args.pairs else None
    except PairsError as exc:
        return _die(str(exc))
    model = args.model or str(model_path())
    templates = dict(TEMPLATES)
    if args.neutral_template:
        templates["neutral"] = args.neutral_template
    if args.emotion_template:
        if args.recipe == "paper" and "{emotion}" not in args.emotion_template:
            return _die("--emotion-template must contain {emotion}")
        if args.recipe in ("contrast", "learned") and "{question}" not in args.emotion_template:
            return _die("--emotion-template must contain {question} (and {emotion} or {description})")
        if args.recipe == "paper":
            templates["emotional"] = args.emotion_template
        else:
            templates["contrast"] = (("user", args.emotion_template),)
    questions = args.questions_per_emotion or (50 if args.recipe == "paper" else 100)
    given = [f"--{k.replace('_', '-')}" for k in LEARNED_FLAGS if getattr(args, k) is not None]
    if args.recipe != "learned" and given:
        return _die(f"{', '.join(given)}: only with --recipe learned")
    if args.skip_missing and (args.recipe != "contrast" or args.pairs):
        return _die("--skip-missing: only with --recipe contrast (its filter is what can leave an emotion without "
                    "a contrast)")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.recipe == "learned":
        return _extract_learned(args, model, templates, questions, pairs)
    hf_model = engine = None
    try:  # a local folder or a model id, as transformers and vLLM take them
        tokenizer = AutoTokenizer.from_pretrained(model)
        if args.engine == "transformers":
            hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
            hf_model.to(args.device)
    except (OSError, ValueError, RuntimeError) as exc:
        return _die(f"cannot load model {model}: {str(exc).splitlines()[0]}", 1)
    if args.engine == "vllm":
        engine, code = _vllm_extractor(args, model, "capture")
        if engine is None:
            return code
    try:
        bank, _ = extract(
            hf_model, tokenizer, emotions=args.emotions, recipe=args.recipe, questions_per_emotion=questions,
            hook=args.hook, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
            templates=templates, filter_pairs=not args.no_filter,
            model_name=DEFAULT_MODEL_NAME if args.model is None else Path(model).name,
            engine=engine, pairs=pairs, pairs_source=Path(args.pairs).name if args.pairs else None,
            skip_missing=args.skip_missing,
        )
    except ValueError as exc:
        return _die(str(exc), 1)
    finally:
        if engine is not None:
            engine.shutdown()
    _print_consistency(bank.recipe["consistency"])
    contrast = bank.recipe.get("contrast")
    if contrast:
        print("contrast (share of answers whose top emotion is the target; kept answers):")
        print("| emotion | emotional: NADE | emotional: MiniLM | neutral: NADE | neutral: MiniLM | kept emotional | "
              "kept neutral |\n|---|---|---|---|---|---|---|")
        for e, c in contrast.items():
            print(f"| {e} | {c['emotional_nade_hit']:.2f} | {c['emotional_minilm_hit']:.2f} | "
                  f"{c['neutral_nade_hit']:.2f} | {c['neutral_minilm_hit']:.2f} | {c['emotional_kept']}/{c['pairs']} | "
                  f"{c['neutral_kept']} |")
        for e, c in contrast.items():
            placements = ", ".join(f"{role} turn {nade:.2f} / {minilm:.2f}" for role, (nade, minilm)
                                   in c["by_placement"].items())
            print(f"  {e}: emotional answers by where the emotion was asked for (NADE / MiniLM): {placements}")
    print(f"wrote {bank.save(args.out)}: {list(bank.vectors.shape)} (layers, emotions, hidden), hook {bank.hook}, "
          f"units {bank.units}; calibrate it next: vllm-emosteer calibrate --vectors {args.out}")
    if bank.recipe.get("left_out"):
        print(f"vllm-emosteer: left out (no usable contrast, --skip-missing): {', '.join(bank.recipe['left_out'])}",
              file=sys.stderr)
    return 0


def _vllm_extractor(args, model: str, doing: str):
    """extract's engine (capture mode), or None and the exit code of its one-line refusal."""
    from .extraction.vllm_capture import VllmExtractor

    try:
        return VllmExtractor(model, args.hook, dtype=args.dtype, seed=args.seed,
                             tensor_parallel_size=args.tensor_parallel_size,
                             pipeline_parallel_size=args.pipeline_parallel_size), 0
    except Exception as exc:  # vLLM raises many types; the first line names the cause
        return None, _die(f"vLLM cannot {doing} {model}: {' '.join(str(exc).split())[:400]}", 1)


LEARNED_FLAGS = ("objective", "steps", "lr", "beta", "cap", "layers", "pairs_per_step", "micro_batch", "held_out",
                 "max_answer_tokens", "init", "keep", "evals")


def _extract_learned(args, model: str, templates: dict, questions: int, pairs) -> int:
    """extract --recipe learned: the answers (inside vLLM, or transformers on --device), then the training in
    transformers on --device (vLLM is shut down first, so a GPU holds one model at a time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .default_model import DEFAULT_MODEL_NAME
    from .extraction.extract import CONTRAST_TEMPLATES
    from .extraction.learned import Settings, check_settings, gather, summary, train

    chosen = {k: getattr(args, k) for k in LEARNED_FLAGS if getattr(args, k) is not None}
    if "layers" in chosen:
        chosen["band"] = tuple(chosen.pop("layers"))
    settings = Settings(seed=args.seed, **chosen)
    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        return _die(f"cannot load model {model}: {str(exc).splitlines()[0]}", 1)
    try:
        band = check_settings(settings, int(config.get_text_config().num_hidden_layers))
    except ValueError as exc:
        return _die(str(exc))
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        eos = None
    eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    data = dict(emotions=args.emotions, pairs=pairs, questions=questions,
                templates=templates.get("contrast", CONTRAST_TEMPLATES), filter_pairs=not args.no_filter,
                seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, eos=eos)

    def load():
        return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).to(args.device)

    try:
        if args.engine == "vllm" and (pairs is None or any(p.positive_text is None for p in pairs)):
            engine, code = _vllm_extractor(args, model, "answer with")
            if engine is None:
                return code
            try:
                training, concepts, source = gather(tokenizer, generate=engine.generate, **data)
            finally:
                engine.shutdown()
            source["decoding"] = "greedy (vLLM)"
            hf_model = load()
        else:
            hf_model = load()
            training, concepts, source = gather(tokenizer, model=hf_model, **data)
            source["decoding"] = "greedy (transformers)"
        source["max_new_tokens"] = args.max_new_tokens
        if pairs is not None:
            source["pairs_file"] = Path(args.pairs).name
        bank = train(hf_model, training, concepts, hook=args.hook, settings=settings,
                     pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                     model_name=DEFAULT_MODEL_NAME if args.model is None else Path(model).name, data=source)
    except ValueError as exc:
        return _die(str(exc), 1)
    except (OSError, RuntimeError) as exc:  # loading the model in transformers, or the device (out of memory)
        return _die(f"{model}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", 1)
    print(summary(bank))
    print(f"wrote {bank.save(args.out)}: {list(bank.vectors.shape)} (layers, concepts, hidden), hook {bank.hook}, "
          f"units {bank.units}, layers {band[0]}-{band[1]}; intensity 1.0 is the trained dose. Calibrate it next: "
          f"vllm-emosteer calibrate --vectors {args.out} --layers {band[0]} {band[1]} --out {args.out}")
    return 0


def _print_consistency(table: dict) -> None:
    bands = list(next(iter(table.values())))
    print("consistency (mean pairwise cosine of the per-pair differences; near 0: no common direction, a weak "
          "concept):")
    print("| concept | " + " | ".join(f"layers {b}" for b in bands) + " |\n|---|" + "---|" * len(bands))
    for concept, row in table.items():
        print(f"| {concept} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in row.values()) + " |")


def _bank_arg(path: str | None):
    from .vectors.bank import EmotionBank
    from .engine.options import vectors_path

    target = vectors_path(path)
    return EmotionBank.load(target), target


def cmd_inspect(args) -> int:
    from .vectors.inspect import plot, render_text, summary

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
    from .vectors.bank import model_facts
    from .vectors.interop import detect_format, import_gguf, import_paper_json

    sources = [Path(s) for s in args.src]
    for source in sources:
        if not source.exists():
            return _die(f"{source}: no such file or folder")
    fmt = args.format or detect_format(sources[0])
    config = model = None
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        model = model_facts(config, Path(args.model).name)
    if fmt == "paper-json":
        bank = import_paper_json(sources, model)
    else:
        bank = import_gguf(sources, args.emotion, model)
    if config is not None:
        bank.check_fits(config)
    print(f"wrote {bank.save(args.out)}: {fmt}, emotions {bank.emotions}, {len(bank.layers)} layers, "
          f"hidden {bank.hidden_size}, hook {bank.hook}")
    return 0


def cmd_export(args) -> int:
    from .vectors.interop import export_gguf

    bank, _ = _bank_arg(args.file)
    for path in export_gguf(bank, Path(args.gguf), args.emotion):
        print(f"wrote {path}")
    return 0


def cmd_transform(args) -> int:
    bank, _ = _bank_arg(args.file)
    if args.remove_shared:
        bank = bank.without_shared_component()
    if args.layers:
        bank = bank.select_layers(*args.layers)
    print(f"wrote {bank.save(args.out)}: {bank.recipe.get('transform', [])}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.vectors, args.intensity, args.max_tokens, args.compile, args.greedy, args.dtype)
    return 0


def _run_variants(args, vectors: str | None, variants, prompts, prototypes=None):
    """Start an engine with the plugin on `vectors`, run the variants, stop the engine."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from .default_model import model_path
    from .quality.evaluate import evaluate

    options = {"vectors": vectors, "max_intensity": 100.0, "max_dose": 100.0} if vectors else {}
    llm = LLM(model=args.model or str(model_path()), max_model_len=1024, enforce_eager=True, max_num_seqs=256,
              seed=0, additional_config={"emosteer": options})
    try:
        return evaluate(llm, variants, prompts, args.max_tokens, concepts=prototypes)
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    """Stop the engine before the interpreter exits (left to garbage collection, exit can abort)."""
    llm.llm_engine.engine_core.shutdown()


def _bands(args, bank) -> list:
    from .quality.evaluate import band_layers

    if args.layers:
        return [tuple(args.layers)]
    return [band_layers(name, bank.model.get("num_layers") or max(bank.layers) + 1) for name in args.bands]


def _sweep(args, bank, emotions, prompts, values, bands):
    """Sweep on an uncalibrated copy of the file: an intensity is then a plain dose (or alpha) on the band."""
    import tempfile

    from .quality.evaluate import sweep_variants

    with tempfile.TemporaryDirectory() as tmp:
        path = str(bank.uncalibrated().save(Path(tmp) / "uncalibrated.safetensors"))
        return _run_variants(args, path, sweep_variants(emotions, values, args.positions, bands), prompts)


def cmd_eval(args) -> int:
    from .quality.evaluate import (calibrated_rows, extra_variants, markdown, neutral_prompts, plot, prompt_variants,
                           Variant)

    bank, source = _bank_arg(args.vectors)
    emotions = args.emotions or bank.emotions
    if args.claims:
        return _eval_claims(args, bank, source, emotions)
    prompts = neutral_prompts()[: args.prompts]
    if args.prototypes:
        return _eval_concepts(args, bank, source, prompts)
    steered, why = calibrated_rows(bank.calibration, emotions, args.intensity, args.vectors or source)
    if why:
        print(f"vllm-emosteer: {why}", file=sys.stderr)
    variants = [Variant("unsteered", None)] + prompt_variants(emotions) + steered
    if args.extras:
        variants += extra_variants(emotions, args.intensity)
    result = _run_variants(args, args.vectors, variants, prompts)
    if args.alphas:
        swept = _sweep(args, bank, emotions, prompts, args.alphas, _bands(args, bank))
        result.rows += swept.rows[1:]  # its unsteered answers are the first run's (greedy, same engine settings)
    report = {"vectors": str(source), "units": bank.units, "prompts": len(prompts), "max_tokens": args.max_tokens,
              "calibration": bank.calibration, "bands": bank.bands, "rows": result.rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text(markdown(result) + "\n")
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        plot(result, emotions, out / "eval.png")
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown(result))
    return 0


def _eval_claims(args, bank, source, emotions) -> int:
    """eval --claims: the paper's four claims in one batch, a report with verdicts (quality/claims.py)."""
    import datetime
    import time

    from .quality.claims import (QUERIES, WHOLE_PROMPTS, WHOLE_TOKENS, analyse, claim_variants, claims_questions,
                                 emotional_queries)
    from .quality.claims_report import markdown as claims_markdown
    from .quality.claims_report import plot as claims_plot

    started = time.time()
    questions = claims_questions(args.prompts)
    queries = {e: emotional_queries(e, args.queries or QUERIES) for e in emotions}
    whole = questions[: args.whole_prompts or WHOLE_PROMPTS]
    variants = claim_variants(emotions, questions, queries, whole)
    result = _run_variants(args, str(source), variants, questions)
    report = analyse(result, emotions)
    report.update({
        "vectors": args.vectors or f"{source.name} (bundled)", "digest": bank.digest(),
        "model": args.model or "SmolLM2-135M-Instruct (the default model)",
        "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "minutes": (time.time() - started) / 60,
        "sizes": {"questions": len(questions), "queries": len(next(iter(queries.values()))), "whole": len(whole),
                  "whole_tokens": WHOLE_TOKENS, "max_tokens": args.max_tokens, "requests": sum(
                      len(v.prompts or questions) for v in variants)},
        "note": "this file comes from the paper recipe, which draws its questions from EmotionQuery: the suppression "
                "questions may be among them" if bank.recipe.get("recipe") == "paper" else "",
        "rows": [{k: v for k, v in r.items() if k != "examples"} for r in result.rows]})
    text = claims_markdown(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "claims.md").write_text(text)
        (out / "claims.json").write_text(json.dumps({**report, "answers": result.answers}, indent=1))
        summary = {k: report[k] for k in ("vectors", "digest", "model", "date", "expressed", "verdicts", "sizes")}
        (out / "claims-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        claims_plot(report, out / "claims.png")
    print(json.dumps(report) if args.json else text)
    print(f"{report['sizes']['requests']} requests in {report['minutes']:.1f} min", file=sys.stderr)
    return 0


def _eval_concepts(args, bank, source, prompts) -> int:
    """eval --prototypes: your own concepts, each at --intensity, scored against the sentences you gave."""
    from .quality.evaluate import Variant, concept_markdown

    try:
        prototypes = json.loads(Path(args.prototypes).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return _die(f"--prototypes {args.prototypes}: {exc}")
    if not isinstance(prototypes, dict) or not prototypes or not all(
            isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v) for v in prototypes.values()):
        return _die("--prototypes must hold a JSON object {concept: [example sentence, ...]} with non-empty lists")
    unknown = sorted(set(prototypes) - set(bank.emotions))
    if unknown:
        return _die(f"--prototypes names {unknown}, not in the vectors file {bank.emotions}")
    variants = [Variant("unsteered", None)] + [
        Variant(f"{c} {args.intensity:g}", {"emosteer": {"emotions": {c: args.intensity}}}, (c,), args.intensity,
                "calibrated") for c in prototypes]
    result = _run_variants(args, str(source), variants, prompts, prototypes)
    if args.json:
        print(json.dumps({"vectors": str(source), "prompts": len(prompts), "rows": result.rows}))
    else:
        print(concept_markdown(result))
    return 0


def cmd_calibrate(args) -> int:
    from .quality.evaluate import CALIBRATION_DISTINCT2, THRESHOLDS, markdown, neutral_prompts, recommend

    bank, source = _bank_arg(args.vectors)
    values = args.alphas or ([0.1, 0.2, 0.3, 0.4, 0.55] if bank.units == "dose" else [0.25, 0.5, 1.0, 1.5, 2.0])
    bands = _bands(args, bank)
    prompts = neutral_prompts()[: args.prompts]
    result = _sweep(args, bank, bank.emotions, prompts, values, bands)
    best = recommend(result, bank.emotions)
    print(markdown(result))
    missing = [e for e, pick in best.items() if pick is None]
    if missing:
        return _die(f"no value in {values} on bands {bands} keeps {missing} coherent; try smaller values", 1)
    bank.calibration = {e: float(pick["value"]) for e, pick in best.items()}
    bank.bands = {e: pick["band"] for e, pick in best.items() if pick["band"]}
    bank.recipe["calibration"] = {
        "prompts": len(prompts), "values": values, "bands": [list(b) for b in bands], "units": bank.units,
        "rule": "per emotion, among answers with distinct-2 >= {distinct2}, cosine to the question >= {topic} and "
                "perplexity <= {ppl_ratio}x unsteered: the best hit rate that NADE and the MiniLM prototypes agree "
                "on (the lower of the two)".format(**dict(THRESHOLDS, distinct2=CALIBRATION_DISTINCT2))}
    unit = "relative dose" if bank.units == "dose" else "alpha"
    print(f"calibration (intensity 1.0 = this {unit}, on this layer band):")
    for e in bank.emotions:
        print(f"  {e:<10} {bank.calibration[e]:g}  layers {bank.bands.get(e, 'all')}")
    print(f"wrote {bank.save(args.out or source)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-emosteer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("model-path", help="print the default model's folder (converting it once)").set_defaults(
        func=cmd_model_path)

    p = sub.add_parser("extract", help="extract emotion (or your own concepts') vectors, inside vLLM by default")
    p.add_argument("--model", help="local HF model folder or model id (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="vectors file to write (.safetensors)")
    p.add_argument("--pairs", help="your own concepts: a JSON Lines file of contrast pairs (see docs/vectors.md); "
                                   "replaces --recipe and --emotions")
    p.add_argument("--device", default="cpu", help="--engine transformers, and --recipe learned's training: where it "
                                                   "runs (cpu, cuda, cuda:1, ...)")
    p.add_argument("--recipe", choices=["contrast", "paper", "learned"], default="contrast",
                   help="contrast (default): plain vs emotion-instructed answers to neutral questions, captured "
                        "after the plain question, filtered by two scorers, units 'dose'; paper: Dong et al.'s; "
                        "learned: offsets trained on the contrast recipe's answers (or --pairs) in transformers")
    p.add_argument("--questions-per-emotion", type=int,
                   help="questions per emotion (default: all 100 for contrast, 50 for paper)")
    p.add_argument("--engine", choices=["vllm", "transformers"], default="vllm",
                   help="vllm (default): answers and capture inside vLLM (capture mode; the model is never loaded "
                        "in transformers); transformers: both in transformers, on --device (the reference)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: as vLLM's")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="--engine vllm: as vLLM's")
    p.add_argument("--no-filter", action="store_true",
                   help="contrast recipe: keep every pair (no NADE / MiniLM check of the answers)")
    p.add_argument("--skip-missing", action="store_true",
                   help="contrast recipe: write the emotions that have a usable contrast and name the ones left out "
                        "(default: stop, writing nothing)")
    p.add_argument("--hook", choices=["attn_out", "residual"], default="attn_out")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--emotions", nargs="+", default=["joy", "anger", "disgust", "fear", "sadness"])
    p.add_argument("--neutral-template", help="paper recipe: system prompt of the neutral answers")
    p.add_argument("--emotion-template",
                   help="paper recipe: system prompt of the emotional answers, with {emotion}; contrast recipe: "
                        "the user turn, with {question} and {emotion} or {description}")
    learned = p.add_argument_group("--recipe learned (training runs in transformers on --device, in --dtype)")
    learned.add_argument("--objective", help="lm (default): LM loss of the positive answers after the plain "
                                             "question (prompt distillation); bipo: raise log p(positive) - "
                                             "log p(negative) against the unsteered model")
    learned.add_argument("--steps", type=int, help="optimizer steps (default 40)")
    learned.add_argument("--lr", type=float, help="Adam learning rate (default 0.02)")
    learned.add_argument("--beta", type=float, help="bipo: the margin's scale (default 0.1)")
    learned.add_argument("--cap", type=float, help="largest relative dose |offset| / typical norm (default 0.4)")
    learned.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"),
                         help="the band trained and steered (default: the middle third of the layers)")
    learned.add_argument("--pairs-per-step", type=int, help="pairs per concept per step (default 4)")
    learned.add_argument("--micro-batch", type=int, help="sequences per forward; gradients accumulate (default 16)")
    learned.add_argument("--held-out", type=float, help="share of each concept's questions held out (default 0.2)")
    learned.add_argument("--max-answer-tokens", type=int, help="train on the first N answer tokens (default all)")
    learned.add_argument("--init", help="diffmean (default: the training pairs' mean difference) or random")
    learned.add_argument("--keep", help="best (default): per concept, the offsets of its best held-out evaluation; "
                                        "last: those of the last step")
    learned.add_argument("--evals", type=int, help="held-out evaluations during training, besides the first and the "
                                                   "last (default 4)")
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

    p = sub.add_parser("transform", help="derive a vectors file (e.g. without the component all emotions share)")
    p.add_argument("file", nargs="?", help="vectors file (default: the bundled vectors)")
    p.add_argument("--out", required=True)
    p.add_argument("--remove-shared", action="store_true", help="subtract the mean over emotions at every layer")
    p.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), help="keep only these layers")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("demo", help="the default model answering unsteered, in each emotion and a mix, in one batch")
    p.add_argument("--model")
    p.add_argument("--vectors")
    p.add_argument("--intensity", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--compile", action="store_true", help="use vLLM's compiled mode instead of eager")
    p.add_argument("--greedy", action="store_true", help="decode greedily (temperature 0) instead of sampling")
    p.add_argument("--dtype", default="auto", help="the model's dtype in vLLM (default: auto)")
    p.set_defaults(func=cmd_demo)

    bands = ["middle third", "30-70%", "middle half", "all"]
    p = sub.add_parser("eval", help="steering quality through the engine: two emotion scorers, similarity, fluency, "
                                    "repetition; against prompting")
    p.add_argument("--model")
    p.add_argument("--vectors")
    p.add_argument("--intensity", type=float, default=1.0, help="the calibrated intensity to evaluate")
    p.add_argument("--alphas", "--doses", dest="alphas", type=float, nargs="+",
                   help="also sweep these values on an uncalibrated copy: relative doses (units 'dose') or alphas")
    p.add_argument("--bands", nargs="+", choices=bands, default=["all"], help="layer bands of the sweep")
    p.add_argument("--emotions", nargs="+")
    p.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), help="sweep band, instead of --bands")
    p.add_argument("--positions", choices=["response", "all"], default="response")
    p.add_argument("--prompts", type=int, help="how many of the 64 neutral prompts (default: all; with --claims, "
                                                "of the 32 calibration never reads)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--extras", action="store_true", help="also two-emotion mixes and positions=all")
    p.add_argument("--claims", action="store_true",
                   help="the paper's four claims instead: dose-response, suppression, mixes, whole answers; a report "
                        "with a verdict per claim (claims.md, claims.json, claims.png in --out)")
    p.add_argument("--queries", type=int, help="--claims: EmotionQuery questions per emotion for suppression (20)")
    p.add_argument("--whole-prompts", type=int, help="--claims: questions for the 256-token answers (16)")
    p.add_argument("--prototypes", help="your own concepts: a JSON file {concept: [example sentence, ...]}; each "
                                        "concept is steered at --intensity and scored against its sentences")
    p.add_argument("--out", help="folder for eval.md, eval.json and eval.png")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    p.set_defaults(func=cmd_eval)

    from .quality.evaluate import CALIBRATION_PROMPTS

    p = sub.add_parser("calibrate", help="store a dose (or alpha) and a layer band per emotion in a vectors file: "
                                         "intensity 1.0 = that dose on that band")
    p.add_argument("--model")
    p.add_argument("--vectors", help="vectors file to calibrate (default: the bundled one)")
    p.add_argument("--out", help="where to write (default: overwrite --vectors)")
    p.add_argument("--alphas", "--doses", dest="alphas", type=float, nargs="+",
                   help="values to try (default: doses 0.1 0.2 0.3 0.4 0.55, or alphas 0.25 0.5 1 1.5 2)")
    p.add_argument("--bands", nargs="+", choices=bands, default=["middle third", "middle half"])
    p.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), help="one band, instead of --bands")
    p.add_argument("--positions", choices=["response", "all"], default="response")
    p.add_argument("--prompts", type=int, default=CALIBRATION_PROMPTS,
                   help="how many of the neutral prompts (the first ones; eval --claims reads only the others)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv=None) -> int:
    from .vectors.bank import BankError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after `serve` is vLLM's: `vllm serve MODEL --additional-config ...`
        from .serving.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("eval", "calibrate", "demo", "extract"):  # vLLM logs to stderr; stdout carries the results only
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        return args.func(args)
    except (BankError, FileNotFoundError) as exc:
        return _die(str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
