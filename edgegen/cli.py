"""The `edgegen` command line. Heavy imports happen inside commands: `edgegen run` never loads torch."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.providers import EPS

# Plain help (rich_markup_mode=None): typer's rich panels read "[default: ...]" in help texts as markup and
# drop it, and print a "<bool>" value column for flags that take no value. click's own formatter does neither.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 120},
                  help="Gemma 4 speculative decoding on ONNX Runtime: export a pair, run it, measure it.")

THREADS_HELP = "Threads per session [default: onnxruntime's choice, one per physical core]"
NO_SPIN_HELP = ("Idle threads sleep instead of spinning between the operators of a model call: slower on an idle "
                "machine, kinder to other busy programs")


@app.callback()
def _root() -> None:
    """Gemma 4 speculative decoding on ONNX Runtime: export a pair, run it, measure it."""


class QuantKind(str, Enum):
    fp32 = "fp32"
    int8 = "int8"
    int4 = "int4"


# Execution providers: the names are runtime/providers.py's list (the one place that knows them).
ExportEP = Enum("ExportEP", {name: name for name in EPS}, type=str)
RunEP = Enum("RunEP", {name: name for name in ("auto", *EPS)}, type=str)


class Compute(str, Enum):
    auto = "auto"
    exact = "exact"
    int8 = "int8"


class KVDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


def _quiet_ort() -> None:
    """onnxruntime's default logger prints warnings (e.g. about a software GPU adapter) to the terminal."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


@app.command()
def export(
    target: str = typer.Option(..., "--target", help="Target model: HF id or local directory (Gemma 4 E2B/E4B)"),
    assistant: str = typer.Option(..., "--assistant", help="Assistant (drafter): HF id or local directory"),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write"),
    quant: QuantKind = typer.Option(QuantKind.fp32, "--quant", help="Target weight precision"),
    assistant_quant: QuantKind | None = typer.Option(
        None, "--assistant-quant", help="Drafter weight precision [default: fp32, or int8 for int8/int4 targets]"),
    block_size: int = typer.Option(32, "--block-size", min=16, max=256, help="Quantization block (input channels)"),
    max_context: int = typer.Option(4096, "--max-context", min=16,
                                    help="Longest prompt + generation the bundle holds (up to the model's "
                                         "max_position_embeddings, 131072 for E2B)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against PyTorch"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists"),
    ep: ExportEP = typer.Option(ExportEP.cpu, "--ep",
                                help="Export profile: cpu, qnn (static shapes, QDQ, NPU), webgpu or openvino"),
    compute: Compute = typer.Option(
        Compute.auto, "--compute",
        help="Quantized matmuls: int8 activations (fast on CPU; checked against PyTorch by top-1 agreement; "
             "speculative == plain bit for bit; at blocks over 32 the runtime pads odd calls by a row), exact "
             "(fp32 activations: matches PyTorch to ~1e-5; ~2-3x slower decode, whose calls are padded to two "
             "rows so that speculative == plain), or auto: int8 for --quant int8/int4 with --ep cpu and block "
             "size 32, 64 or 128, else exact"),
    soc_model: str | None = typer.Option(None, "--soc-model",
                                         help="qnn: precompile QNN context binaries for this SoC model number "
                                              "[default: none; the QNN EP compiles the graphs at load]"),
    kv_dtype: KVDtype = typer.Option(KVDtype.fp32, "--kv-dtype",
                                     help="K/V cache precision: fp32, or fp16 (half the cache memory; cpu profile)"),
    stats: bool = typer.Option(False, "--stats", help="Print the export's wall time and peak memory (RSS)"),
) -> None:
    """Export a target + assistant pair to a verified ONNX bundle."""
    if block_size & (block_size - 1):
        raise EdgegenError(f"--block-size {block_size} is not a power of two; use 16, 32, 64, 128 or 256")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgegen.export.bundle import STAGES, ExportOptions, check_out_dir, export_bundle

    check_out_dir(out.expanduser().absolute(), force, (target, assistant))
    opts = ExportOptions(quant.value, assistant_quant.value if assistant_quant else None, block_size, max_context,
                         not no_verify, force, ep=ep.value, soc_model=soc_model,
                         compute=compute.value, kv_dtype=kv_dtype.value)
    with Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("start", total=len(STAGES))

        def stage(name: str) -> None:
            progress.update(task, description=name, completed=STAGES.index(name))

        manifest = export_bundle(target, assistant, out, opts, stage=stage)
        progress.update(task, description="done", completed=len(STAGES))
    checks = manifest.parity.get("checks", {})
    summary = ", ".join(f"{k} {'ok' if v['passed'] else 'FAILED'}" for k, v in checks.items()) or "not verified"
    typer.echo(f"wrote {out} ({summary})")
    if stats and manifest.export:
        rss = manifest.export.get("peak_rss_mb")
        typer.echo(f"export: {manifest.export['seconds']:.1f} s, peak RSS {'n/a' if rss is None else f'{rss:.0f} MB'}")


@app.command()
def distill(
    target: str = typer.Option(..., "--target", help="Target model: HF id or local directory"),
    out: Path = typer.Option(..., "--out", help="Directory for the trained assistant (HF format)"),
    data: Path | None = typer.Option(None, "--data", help="Text file or directory [default: Python's stdlib sources]"),
    steps: int = typer.Option(2000, "--steps", min=1, help="Optimizer steps"),
    draft_tokens: int = typer.Option(4, "--draft-tokens", min=1, max=16, help="Draft steps unrolled in training"),
    seq_len: int = typer.Option(256, "--seq-len", min=16, help="Training window (tokens)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Training windows per optimizer step"),
    lr: float = typer.Option(2e-3, "--lr", min=0.0, help="Peak learning rate (AdamW; warmup, then cosine decay)"),
    hidden_size: int = typer.Option(256, "--hidden-size", min=16, help="Assistant width"),
    num_layers: int = typer.Option(4, "--layers", min=1, help="Assistant layers (the last is full attention)"),
    centroids: int = typer.Option(0, "--centroids", min=0, help="Centroid-head clusters (0 = plain lm_head)"),
    centroid_top_k: int = typer.Option(8, "--centroid-top-k", min=1, help="Clusters scored per draft step"),
    seed: int = typer.Option(0, "--seed", help="Seed for initialization, data order and sampling"),
    bursts: int = typer.Option(0, "--bursts-per-window", min=0,
                               help="Draft bursts trained per window (0 = every position)"),
    self_generated: int = typer.Option(0, "--self-generated", min=0,
                                       help="Train half of each batch on this many target-sampled sequences"),
    self_generated_temperature: float = typer.Option(
        1.0, "--self-generated-temperature", min=0.0, help="Sampling temperature of those sequences (0 = greedy)"),
    init: str | None = typer.Option(None, "--init", help="Start from this assistant (HF id or directory), e.g. the "
                                    "stock assistant when the target is a fine-tune [default: random initialization]"),
    bf16: bool = typer.Option(False, "--bf16", help="Save weights in bfloat16 (half the size)"),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore a checkpoint in OUT and start over"),
) -> None:
    """Train an assistant (MTP drafter) for a target from text; resumable, loadable by transformers."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edgegen.export.distill import DistillOptions
    from edgegen.export.distill import distill as run_distill

    opts = DistillOptions(steps=steps, draft_tokens=draft_tokens, seq_len=seq_len, batch_size=batch_size, lr=lr,
                          hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_layers=num_layers,
                          num_centroids=centroids, centroid_top_k=centroid_top_k, seed=seed,
                          save_dtype="bfloat16" if bf16 else "float32",
                          self_generated=self_generated, bursts_per_window=bursts,
                          self_generated_temperature=self_generated_temperature, init=init)
    # The bar starts with the first step, so option and loading errors print nothing but their line.
    progress = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    task = None

    def report(step: int, total: int, info: dict) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("distill", total=total, completed=step - 1, info="")
        line = f"loss {info['loss']:.3f}  ~{info['tokens_per_call']:.2f} tok/call"
        progress.update(task, completed=step, info=line)
        if not progress.console.is_terminal and (step % 50 == 0 or step == total):
            progress.console.print(f"step {step}/{total}  {line}  {info['elapsed_s'] / 60:.1f} min")

    try:
        path = run_distill(target, out, data, opts, resume=not no_resume, progress=report)
    finally:
        if task is not None:
            progress.stop()
    typer.echo(f"wrote {path}")


@app.command()
def bench(
    bundle: Path | None = typer.Argument(None, help="Bundle directory [default: the bundled demo pair]"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=2, help="Tokens generated per prompt"),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", metavar="<auto|int>",
                                     help="Tokens drafted per round: 'auto' (chosen online) or a count"),
    threads: int | None = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    no_spin: bool = typer.Option(False, "--no-spin", help=NO_SPIN_HELP),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Run the built-in prompts this many times"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write a PNG plot here (needs matplotlib) "
                                          "[default: no plot]"),
    ep: str = typer.Option("cpu", "--ep", metavar="<ep[,ep...]>",
                           help=f"Execution provider ({', '.join((*EPS, 'auto'))}), or several separated by "
                                "commas: cpu,webgpu"),
    image: list[Path] = typer.Option([], "--image", help="Image to time encoding on (repeatable; bundles with a "
                                     "vision graph) [default: a synthetic 768x1024 image]"),
) -> None:
    """Measure plain vs speculative decoding on a bundle, side by side (per execution provider); image encoding
    apart, for a bundle with a vision graph."""
    import json

    from edgegen.runtime.bench import bench as run_bench
    from edgegen.runtime.bench import bench_eps, plot

    if plot_path is not None:
        _check_plot_path(plot_path)
    eps = _bench_eps(ep)
    if bundle is None:
        from edgegen.demo import demo_bundle

        bundle = demo_bundle()
    _quiet_ort()
    if len(eps) > 1:
        if plot_path is not None:
            raise EdgegenError("--plot takes one execution provider; run bench once per --ep to plot each")
        result = bench_eps(bundle, eps, max_new_tokens=max_new_tokens, draft_tokens=draft_tokens, threads=threads,
                           repeats=repeats, spin=not no_spin)
        if as_json:
            typer.echo(json.dumps(result))
            return
        typer.echo(f"{'ep':>10} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'acceptance':>11} "
                   f"{'tok/call':>9} {'node share':>11}")
        for row in result["table"]:
            if "unavailable" in row:
                typer.echo(f"{row['ep']:>10} unavailable: {row['unavailable']}")
                continue
            typer.echo(f"{row['ep']:>10} {row['plain_tokens_per_second']:>12.1f} "
                       f"{_fmt(row['speculative_tokens_per_second'], '.1f'):>11} {_fmt(row['speedup'], '.2f'):>8} "
                       f"{_fmt(row['acceptance'], '.3f'):>11} {_fmt(row['tokens_per_target_call'], '.2f'):>9} "
                       f"{_fmt(row['min_node_share'], '.3f'):>11}")
        return
    from edgegen.runtime.adaptive import describe

    if image and len(eps) > 1:
        raise EdgegenError("--image takes one execution provider")
    result = run_bench(bundle, max_new_tokens, draft_tokens, threads, repeats=repeats, ep=eps[0], images=image or None,
                       spin=not no_spin)
    if plot_path is not None:
        plot(result, str(plot_path))
    if as_json:
        typer.echo(json.dumps(result))
        return
    shares = ", ".join(f"{f} {p['share']:.3f}" for f, p in result["placement"].items())
    typer.echo(f"ep {result['ep']} ({result['ep_reason']}); node share on it: {shares}")
    for name, m in result["modes"].items():
        typer.echo(
            f"{name:>12}: {m['tokens_per_second']:8.1f} tok/s  first token {m['time_to_first_token_ms']:.0f} ms  "
            f"prefill {m['prefill_tokens_per_second']:.0f} tok/s  {m['tokens_per_target_call']:.2f} tok/call  "
            f"split target/drafter/host {m['time_split']['target']:.2f}/{m['time_split']['drafter']:.2f}/"
            f"{m['time_split']['host']:.2f}"
        )
        if m["acceptance_by_position"]:
            typer.echo(f"{'':>14}acceptance by position {m['acceptance_by_position']}")
        if name == "speculative" and m["drafting"]:
            typer.echo(f"{'':>14}{describe(m['drafting'])}")
    for row in result.get("image", {}).get("images", []):
        typer.echo(f"{'image':>12}: {row['soft_tokens']} soft tokens ({row['patches']} patches)  preprocess "
                   f"{row['preprocess_ms']:.1f} ms  encode {row['encode_ms']:.1f} ms  image to first token "
                   f"{row['image_to_first_token_ms']:.0f} ms")
    if result.get("speedup") is not None:
        rss = result["peak_rss_mb"]
        typer.echo(f"speedup x{result['speedup']}  peak RSS {'n/a' if rss is None else f'{rss} MB'}")


def _bench_eps(ep: str) -> list[str]:
    """`--ep cpu,webgpu` -> ["cpu", "webgpu"]; each name must be known (checked before any bundle work)."""
    from edgegen.runtime.providers import check_name

    several = "or several separated by commas (e.g. cpu,webgpu)"
    names = [e.strip() for e in ep.split(",")]
    where = f"--ep '{ep}': " if "," in ep else ""
    for name in names:
        if not name:
            raise EdgegenError(f"{where}an execution provider name is empty; use one of "
                               f"{', '.join((*EPS, 'auto'))}, {several}")
        try:
            check_name(name)
        except EdgegenError as exc:
            raise EdgegenError(f"{where}{exc}, {several}") from None
    return names


def _check_plot_path(path: Path) -> None:
    """Before a long benchmark, not after it: the plot can be written, and matplotlib is there."""
    import importlib.util
    import os

    parent = path.expanduser().absolute().parent
    if path.exists() and path.is_dir():
        raise EdgegenError(f"--plot '{path}' is a directory; give a .png file name")
    if not parent.is_dir():
        raise EdgegenError(f"--plot '{path}': the directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise EdgegenError(f"--plot '{path}': cannot write to '{parent}'; choose a writable place")
    if importlib.util.find_spec("matplotlib") is None:
        raise EdgegenError("--plot needs matplotlib; pip install matplotlib")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _read_prompt(prompt: str | None, file: Path | None, chat: bool) -> str | None:
    given = sum(x is not None and x is not False for x in (prompt, file)) + int(chat)
    if given != 1:
        raise EdgegenError("give exactly one of --prompt TEXT, --file F or --chat")
    if file is not None:
        if not file.is_file():
            raise EdgegenError(f"prompt file '{file}' does not exist")
        try:
            prompt = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgegenError(f"prompt file '{file}' is not UTF-8 text") from None
    if prompt is not None and not prompt.strip():
        raise EdgegenError("the prompt is empty; give some text")
    return prompt


@app.command()
def run(
    bundle: Path | None = typer.Argument(None, help="Bundle directory [default: the bundled demo pair]"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text"),
    file: Path | None = typer.Option(None, "--file", "-f", help="Read the prompt from a UTF-8 file"),
    chat: bool = typer.Option(False, "--chat", help="Multi-turn chat on stdin (KV of earlier turns is reused)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", "--temp", help="Sampling temperature (0 = greedy)"),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)"),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling "
                                    "[default: a fresh random seed]"),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", metavar="<auto|int>",
                                     help="Tokens drafted per round: 'auto' (chosen online) or a count"),
    no_assistant: bool = typer.Option(False, "--no-assistant", help="Plain decoding with the target alone"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)"),
    threads: int | None = typer.Option(None, "--threads", "-t", min=1, help=THREADS_HELP),
    no_spin: bool = typer.Option(False, "--no-spin", help=NO_SPIN_HELP),
    stats: bool = typer.Option(False, "--stats", help="Print generation statistics to stderr"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token_ids, stats"),
    ep: RunEP = typer.Option(RunEP.cpu, "--ep", help="Execution provider; auto picks the best one available"),
    system: str | None = typer.Option(None, "--system",
                                      help="System instruction; makes the prompt a chat turn (the bundle's template)"),
    think: bool = typer.Option(False, "--think", help="Let the model reason before answering (makes the prompt a "
                               "chat turn); its thinking goes to stderr, dimmed"),
    image: list[Path] = typer.Option([], "--image", help="Image for the prompt (repeatable; makes the prompt a chat "
                                     "turn with the images before the text; bundles with a vision graph)"),
    audio: list[Path] = typer.Option([], "--audio", help="Audio clip for the prompt: WAV, 16-bit PCM mono at 16 kHz, "
                                     "up to 30 s (repeatable; makes the prompt a chat turn with the clips before "
                                     "the text; bundles with an audio graph)"),
) -> None:
    """Generate text with a bundle: speculative decoding with its assistant, streamed to the terminal.

    A prompt is continued as raw text, unless --system, --think, --image or --audio make it one chat turn. The answer
    goes to stdout; with --think the model's thinking goes to stderr (and to "thinking" in --json)."""
    import json

    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle
    from edgegen.runtime.sampling import Sampling

    text = _read_prompt(prompt, file, chat)
    sampling = Sampling(temperature, top_k, top_p, seed)
    if bundle is None:
        from edgegen.demo import demo_bundle

        bundle = demo_bundle()
    if ep is not RunEP.cpu:
        _quiet_ort()
    gen = Generator(Bundle(bundle, threads=threads, ep=ep.value, spin=not no_spin))
    if image and gen.bundle.vision is None:  # before anything runs
        raise EdgegenError(f"bundle '{gen.bundle.path}' has no vision graph, so it takes no --image; export it from "
                           "a multimodal checkpoint (Gemma4ForConditionalGeneration) with the cpu profile")
    if audio and gen.bundle.audio is None:
        raise EdgegenError(f"bundle '{gen.bundle.path}' has no audio graph, so it takes no --audio; export it from a "
                           "checkpoint with an audio tower (Gemma 4 E2B or E4B) with the cpu profile")
    if ep is RunEP.auto or stats:
        typer.echo(f"[ep {gen.bundle.ep}: {gen.bundle.ep_reason}]", err=True)
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, use_assistant=not no_assistant,
                   draft_tokens=draft_tokens)
    turn = dict(system=system, enable_thinking=think)
    if chat:
        _chat_loop(gen, {**options, **turn}, stats, think, images=list(image), audio=list(audio))
        return
    if image or audio:
        events = gen.chat(text, stop_strings=tuple(stop), images=list(image), audio=list(audio), **options, **turn)
    elif system is not None or think:
        events = gen.chat(text, stop_strings=tuple(stop), **options, **turn)
    else:
        events = gen.stream(text, stop_strings=tuple(stop), **options)
    if as_json:
        result = gen.collect(events)
        typer.echo(json.dumps({"text": result.text, "thinking": result.thinking, "token_ids": result.token_ids,
                               "ep": gen.bundle.ep, "stop_reason": result.stop_reason,
                               "stats": result.stats.as_dict()}))
        return
    _stream_out(events, stats, think)


def _stream_out(events, stats: bool, think: bool = False) -> None:
    """Write each event's answer text as it arrives (thinking to stderr, dimmed on a terminal, if asked);
    statistics to stderr at the end if asked."""
    last = None
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
    for event in events:
        if think and event.thinking:
            sys.stderr.write(f"{dim}{event.thinking}{plain}")
            sys.stderr.flush()
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    sys.stdout.write("\n")
    if stats and last is not None:
        _print_stats(last.stats, last.stop_reason)


def _print_stats(st, stop_reason: str | None) -> None:
    from edgegen.runtime.adaptive import describe

    d = st.as_dict()
    typer.echo(
        f"[{d['new_tokens']} tokens, {d['tokens_per_second']:.1f} tok/s, {d['tokens_per_target_call']:.2f} "
        f"tokens/target call, first token {1000 * d['time_to_first_token_s']:.0f} ms, "
        f"accepted {d['accepted']}/{d['drafted']} drafts, by position {d['acceptance_by_position']}, "
        f"stopped by {stop_reason}]\n"
        f"[{describe(d['drafting'])}]",
        err=True,
    )


def _chat_loop(gen, options: dict, stats: bool, think: bool = False, images: list | None = None,
               audio: list | None = None) -> None:
    """Turns from stdin; `images` and `audio` go with the first turn."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        _stream_out(gen.chat(line.strip(), images=images or (), audio=audio or (), **options), stats, think)
        images = audio = None


def main() -> None:
    """Entry point: user errors are one line on stderr and exit 2; Ctrl-C or SIGTERM exits 130 after
    cleanup (an export removes its temporary directory), without a traceback; anything else is one line
    too (see _last_resort)."""
    import signal

    interrupted = []

    def _terminate(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    # Our own handler, so an interrupt the argument parser swallows still ends with 130.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        result = app(standalone_mode=False)
    except EdgegenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the argument parser's own errors (typer vendors click: match by shape)
        name = type(exc).__name__
        if name == "NoArgsIsHelpError":  # help was printed
            sys.exit(0)
        if name == "Abort":
            typer.echo("\ninterrupted", err=True)
            sys.exit(130)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"error: {exc.format_message()} (see --help)", err=True)
            sys.exit(exc.exit_code)
        _last_resort(exc)
    if interrupted:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def _last_resort(exc: Exception) -> None:
    """Whatever escaped the checks above is still one line: the environment's fault (a file, memory) or a
    bug. EDGEGEN_DEBUG=1 shows the traceback. The tests assert that the bug branch is never reached."""
    import os

    if os.environ.get("EDGEGEN_DEBUG"):
        raise exc
    if isinstance(exc, OSError) and exc.strerror:
        where = f" '{exc.filename}'" if exc.filename else ""
        typer.echo(f"error: {exc.strerror}{where}; check the path, permissions and free space", err=True)
        sys.exit(2)
    if isinstance(exc, MemoryError):
        typer.echo("error: out of memory; use a smaller bundle, --max-context or fewer threads", err=True)
        sys.exit(2)
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    typer.echo(f"error: internal error ({type(exc).__name__}: {first}); please report it "
               "(EDGEGEN_DEBUG=1 shows the traceback)", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
