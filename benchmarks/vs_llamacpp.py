"""edgegen vs llama.cpp on the same target + assistant checkpoint: decode speed, speculation, verify cost, TTFT.

    python benchmarks/vs_llamacpp.py --preset demo  [--llama-cpp build/llamacpp] [--json out.json]
    python benchmarks/vs_llamacpp.py --preset e2b-slice --threads 1,2 --rounds 3
    python benchmarks/vs_llamacpp.py --preset e2b --bundle E2B_BUNDLE      # a prebuilt edgegen bundle of it
    python benchmarks/vs_llamacpp.py --target T_DIR --assistant A_DIR    # any HF-format Gemma 4 pair

llama.cpp is built once with benchmarks/llamacpp/build.sh (see benchmarks/llamacpp/README.md); --llama-cpp
is that script's work directory. Presets: `demo` (models/demo: the trained demo pair, real acceptance),
`e2b-slice` (edgegen.export.testing.save_pair, random weights, built under --work), `e2b` (the full-size
stand-in, edgegen.export.testing.realsize_pair, cached under ~/.cache/edgegen/presets/e2b).

Built once per pair and cached under --work/<pair name>/:
  gguf-*/    target Q4_0 and assistant Q8_0 (llama.cpp's converter, then llama-quantize; the f32/bf16
             intermediate file is deleted)
  edgegen-*/ the edgegen bundle (`edgegen export` with --export-flags), unless --bundle names one

Measured per round, every configuration once, edgegen and llama.cpp jobs alternating (the order reverses
each round); medians over rounds are reported. Every job is its own process, so thread settings never leak.
  decode   greedy, each prompt then --new-tokens tokens, EOS ignored on both sides (fixed-length output);
           ms/token counts the tokens after the first one (the first comes out of the prefill). Modes:
           edgegen plain / k=K / auto; llama.cpp plain (`--spec-type none`) / MTP (`--spec-type draft-mtp
           --spec-draft-n-max K`). Both systems run with both thread policies (--policies): `default`,
           each one's own (llama.cpp's OpenMP threads spin while idle; edgegen's spin during a model call
           and stop when it returns) and `passive`, idle threads sleep (llama.cpp OMP_WAIT_POLICY=PASSIVE,
           edgegen --no-spin). Ratios compare the two systems under the same policy.
  verify   one target call on K+1 tokens ÷ one on 1 token, at the first prompt's context (medians of
           --verify-reps alternating calls; llama.cpp: LLAMA_VERIFY_BENCH in the patched example).
  ttft     time to the first token of a --ttft-tokens prompt after a warm-up (llama.cpp: llama-bench pp).
  floor    (with plain) edgegen's target step reduced to its MatMulNBits nodes (same weights, same order, one
           row, nothing else): the speed plain decoding would have if every other operator cost nothing,
           timed against the whole step in the same process (--verify-reps alternating calls). It tells
           what graph work can still gain and what only a faster int4 kernel can.
Token identity: each system's configurations against its own plain decode, and edgegen against llama.cpp.
On random-weight pairs the two systems' int4 roundings pick different tokens soon; that is reported, not
an error. Ratios are edgegen ÷ llama.cpp: for speed (tok/s) above 1 means edgegen is faster; for times
(TTFT) and verify cost below 1 means edgegen is cheaper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgegen.runtime.errors import EdgegenError

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CONVERT = HERE / "llamacpp" / "convert.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
BOS = 2


class BenchError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass
class Preset:
    prompts: int
    prompt_tokens: int
    new_tokens: int
    outtype: str  # the converter's intermediate precision (bf16 for full-size checkpoints: memory)
    # Random weights give nearly flat logits: `--compute int8` cannot pass the export's top-1 agreement
    # check on them (it measures rounding, not a broken graph), so those presets export without it.
    export_flags: str = "--quant int4 --compute int8"


RANDOM_EXPORT = "--quant int4 --compute int8 --no-verify"
PRESETS = {
    "demo": Preset(prompts=6, prompt_tokens=64, new_tokens=128, outtype="f32"),
    "e2b-slice": Preset(prompts=3, prompt_tokens=64, new_tokens=64, outtype="f32", export_flags=RANDOM_EXPORT),
    "e2b": Preset(prompts=1, prompt_tokens=64, new_tokens=48, outtype="bf16", export_flags=RANDOM_EXPORT),
}


# -- output of the llama.cpp tools --------------------------------------------------------------------
def parse_bench_lines(text: str) -> dict:
    """The BENCH_* lines of the patched llama-speculative-simple: `out_ids` (list of ids), `stats` and
    `verify` (dicts of numbers). Missing lines are missing keys."""
    out: dict = {}
    for line in text.splitlines():
        if "BENCH_" not in line:
            continue
        line = line[line.index("BENCH_"):].strip()  # the example echoes the prompt without a newline before it
        if line.startswith("BENCH_OUT_IDS:"):
            body = line.split(":", 1)[1].strip()
            out["out_ids"] = [int(x) for x in body.split(",") if x.strip()]
        elif line.startswith(("BENCH_STATS:", "BENCH_VERIFY:")):
            key = "stats" if line.startswith("BENCH_STATS:") else "verify"
            out[key] = {k: float(v) if re.search(r"[.eE]|nan|inf", v) else int(v)
                        for k, v in re.findall(r"(\w+)=(\S+)", line.split(":", 1)[1])}
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# -- building what both sides run ---------------------------------------------------------------------
STAMP = "built-from.txt"


def _built(out: Path, source: str) -> bool:
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    if stamp.read_text().strip() != source:
        raise BenchError(f"'{out}' was built from {stamp.read_text().strip()}, not {source}; "
                         "use another --work or delete it")
    return True


def _finish(tmp: Path, out: Path, source: str) -> None:
    (tmp / STAMP).write_text(source + "\n")
    tmp.rename(out)


def _partial(out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _run(cmd: list, what: str, env: dict | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BenchError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


@dataclass
class LlamaCpp:
    work: Path  # benchmarks/llamacpp/build.sh's work directory

    @property
    def bin(self) -> Path:
        return self.work / "llama.cpp" / "build" / "bin"

    def check(self) -> None:
        for tool in ("llama-speculative-simple", "llama-quantize", "llama-bench"):
            if not (self.bin / tool).is_file():
                raise BenchError(f"no {tool} in {self.bin}; build llama.cpp first: "
                                 f"bash benchmarks/llamacpp/build.sh {self.work}")
        if not (self.work / "venv" / "bin" / "python").is_file():
            raise BenchError(f"no converter venv in {self.work}/venv; "
                             f"run bash benchmarks/llamacpp/build.sh {self.work}")

    def convert(self, model_dir: Path, out: Path, outtype: str, quant: str, tmp: Path) -> None:
        raw = tmp / f"{out.stem}-{outtype}.gguf"
        env = {**os.environ, "LLAMA_CPP_DIR": str(self.work / "llama.cpp")}
        _run([self.work / "venv" / "bin" / "python", CONVERT, model_dir, "--outtype", outtype, "--outfile", raw],
             f"converting {model_dir} to GGUF", env=env)
        _run([self.bin / "llama-quantize", raw, out, quant, str(os.cpu_count() or 1)], f"quantizing {raw} to {quant}")
        raw.unlink()


def ensure_gguf(llama: LlamaCpp, work: Path, target: Path, assistant: Path, outtype: str,
                target_type: str, assistant_type: str) -> tuple[Path, Path]:
    out = work / f"gguf-{outtype}-{target_type}-{assistant_type}".lower()
    source = f"{target.resolve()} + {assistant.resolve()} ({target_type}/{assistant_type})"
    names = (f"target-{target_type.lower()}.gguf", f"assistant-{assistant_type.lower()}.gguf")
    if not _built(out, source):
        print(f"converting the pair to GGUF in {out} ...", file=sys.stderr, flush=True)
        tmp = _partial(out)
        for model_dir, name, quant in ((target, names[0], target_type), (assistant, names[1], assistant_type)):
            staged = stage_for_converter(model_dir, target, tmp / "hf")
            llama.convert(staged, tmp / name, outtype, quant, tmp)
            shutil.rmtree(staged)
        _finish(tmp, out, source)
    return out / names[0], out / names[1]


ARCHITECTURES = {"gemma4_text": "Gemma4ForCausalLM", "gemma4_assistant": "Gemma4AssistantForCausalLM",
                 "gemma4": "Gemma4ForConditionalGeneration"}


def stage_for_converter(model_dir: Path, target: Path, out: Path) -> Path:
    """A directory of links to `model_dir`'s files, as llama.cpp's converter needs it: with the tokenizer
    (the assistant ships without one; it shares the target's) and with `architectures` in config.json (the
    converter picks its model class from it; configs saved without a model, like the full-size stand-ins',
    lack it)."""
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        if (target / name).is_file() and not (out / name).exists():
            (out / name).symlink_to((target / name).resolve())
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("architectures"):
        if config.get("model_type") not in ARCHITECTURES:
            raise BenchError(f"'{model_dir}/config.json' has model_type {config.get('model_type')!r}; "
                             "expected a Gemma 4 target or assistant")
        config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def ensure_bundle(work: Path, target: Path, assistant: Path, flags: list[str]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(flags).lower()).strip("-") or "default"
    out = work / f"edgegen-{slug}"
    source = f"{target.resolve()} + {assistant.resolve()} ({' '.join(flags)})"
    if not _built(out, source):
        print(f"exporting the edgegen bundle to {out} ({' '.join(flags)}) ...", file=sys.stderr, flush=True)
        tmp = _partial(out)
        _run([sys.executable, "-m", "edgegen", "export", "--target", target, "--assistant", assistant,
              "--out", tmp, "--force", *flags], "edgegen export", cwd=REPO)
        _finish(tmp, out, source)
    return out


def resolve_pair(args) -> tuple[str, Path, Path]:
    """(name, target dir, assistant dir) from --target/--assistant, --pair or --preset."""
    if args.target or args.assistant:
        if not (args.target and args.assistant):
            raise BenchError("give both --target and --assistant (HF-format checkpoint directories)")
        target, assistant = Path(args.target), Path(args.assistant)
        name = args.name or target.resolve().parent.name or "pair"
    elif args.pair:
        target, assistant = Path(args.pair) / "target", Path(args.pair) / "assistant"
        name = args.name or Path(args.pair).resolve().name
    elif args.preset == "demo":
        target, assistant, name = REPO / "models" / "demo" / "target", REPO / "models" / "demo" / "assistant", "demo"
    elif args.preset == "e2b-slice":
        pair = Path(args.work) / "pair-e2b-slice"
        if not (pair / "built-from.txt").is_file():
            from edgegen.export.testing import save_pair

            print(f"building the e2b-slice pair in {pair} ...", file=sys.stderr, flush=True)
            tmp = _partial(pair)
            save_pair(tmp, "e2b-slice")
            _finish(tmp, pair, "save_pair(e2b-slice)")
        target, assistant, name = pair / "target", pair / "assistant", "e2b-slice"
    else:
        from edgegen.export.testing import realsize_pair

        target, assistant = realsize_pair(args.preset)
        name = args.preset
    for d in (target, assistant):
        if not (d / "config.json").is_file():
            raise BenchError(f"'{d}' has no config.json; give HF-format checkpoint directories")
    return name, target, assistant


def make_prompts(name: str, target: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """Token-id prompts, the same ids for both systems: held-out text for the demo pair (real acceptance),
    seeded random ids after <bos> for random-weight pairs."""
    import numpy as np

    if name == "demo":
        sys.path.insert(0, str(HERE))
        from demo_acceptance import heldout_prompts

        return heldout_prompts(n, length, seed)
    vocab = json.loads((target / "config.json").read_text())
    vocab = (vocab.get("text_config") or vocab)["vocab_size"]
    rng = np.random.default_rng(seed)
    return [[BOS] + [int(t) for t in rng.integers(4, vocab, length - 1)] for _ in range(n)]


# -- one job: one process ---------------------------------------------------------------------------------
@dataclass
class Job:
    system: str  # edgegen | llama.cpp
    kind: str  # plain | spec | auto | verify | ttft
    threads: int
    policy: str = "default"  # default | passive (idle threads sleep)

    def label(self, k: int) -> str:
        mode = {"plain": "plain", "spec": f"MTP k={k}" if self.system == "llama.cpp" else f"k={k}",
                "auto": "auto", "verify": "verify", "ttft": "ttft", "floor": "MatMulNBits floor"}[self.kind]
        return f"{self.system} {mode} ({self.policy})"

    @property
    def key(self) -> str:
        return f"{self.system}|{self.kind}|t{self.threads}|{self.policy}"


@dataclass
class Setup:
    bundle: Path
    target_gguf: Path
    assistant_gguf: Path
    llama: LlamaCpp
    prompts: list[list[int]]
    new_tokens: int
    draft_tokens: int
    verify_reps: int
    ttft_prompt: list[int]
    llama_args: list[str] = field(default_factory=list)  # extra llama-speculative-simple flags
    results: dict = field(default_factory=dict)  # job key -> list of per-round results


def run_edgegen(job: Job, s: Setup) -> dict:
    spec = {"bundle": str(s.bundle), "threads": job.threads, "kind": job.kind, "prompts": s.prompts,
            "new_tokens": s.new_tokens, "draft_tokens": s.draft_tokens, "verify_reps": s.verify_reps,
            "ttft_prompt": s.ttft_prompt, "spin": job.policy != "passive"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--edgegen-worker"],
                          input=json.dumps(spec), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BenchError(f"the edgegen {job.kind} job failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llama_env(policy: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(extra)
    return env


def run_llama(job: Job, s: Setup) -> dict:
    t = str(job.threads)
    if job.kind == "ttft":
        out = _run([s.llama.bin / "llama-bench", "-m", s.target_gguf, "-p", len(s.ttft_prompt), "-n", "0",
                    "-r", "1", "-t", t, "-o", "json"], "llama-bench", env=_llama_env(job.policy))
        return {"ttft_ms": json.loads(out)[0]["samples_ns"][0] / 1e6}
    spec = job.kind == "spec"
    cmd = [s.llama.bin / "llama-speculative-simple", "-m", s.target_gguf, "-t", t, "-tb", t,
           "--temp", "0", "--top-k", "1", "-p", "x"]
    cmd += s.llama_args
    if spec:
        cmd += ["-md", s.assistant_gguf, "--spec-type", "draft-mtp", "--spec-draft-n-max", str(s.draft_tokens),
                "-td", t, "-tbd", t]
    else:
        cmd += ["--spec-type", "none"]
    if job.kind == "verify":
        prompt = s.prompts[0]
        env = _llama_env(job.policy, LLAMA_PROMPT_IDS=",".join(map(str, prompt)),
                         LLAMA_VERIFY_BENCH=str(s.draft_tokens), LLAMA_VERIFY_REPS=str(s.verify_reps))
        got = parse_bench_lines(_run(cmd + ["-c", _ctx(len(prompt) + s.draft_tokens), "-n", "1"],
                                     "llama.cpp verify bench", env=env))
        if "verify" not in got:
            raise BenchError("llama-speculative-simple printed no BENCH_VERIFY line; is it built with "
                             "benchmarks/llamacpp/speculative-simple.patch?")
        v = got["verify"]
        return {"t1_ms": v["t1_ms"], "tk_ms": v["tk_ms"], "ratio": v["tk_ms"] / v["t1_ms"]}
    runs = []
    for prompt in s.prompts:
        env = _llama_env(job.policy, LLAMA_PROMPT_IDS=",".join(map(str, prompt)), LLAMA_IGNORE_EOS="1")
        got = parse_bench_lines(_run(cmd + ["-c", _ctx(len(prompt) + s.new_tokens), "-n", str(s.new_tokens)],
                                     f"llama.cpp {job.kind} decode", env=env))
        if "stats" not in got or "out_ids" not in got:
            raise BenchError("llama-speculative-simple printed no BENCH_STATS line; is it built with "
                             "benchmarks/llamacpp/speculative-simple.patch?")
        st = got["stats"]
        # a last round may accept drafts past -n; compare the first new_tokens ids, time what was generated
        runs.append({"ids": got["out_ids"][:s.new_tokens], "decode_s": st["after_first_s"],
                     "tokens_after_first": st["n_out"] - st["n_first_round"],
                     "calls": st["tgt_calls_after_first"], "drafted": st["n_drafted"], "accepted": st["n_accept"]})
    return {"runs": runs}


def _ctx(n: int) -> str:
    return str((n + 64 + 255) // 256 * 256)


# -- the edgegen side, inside its own process -----------------------------------------------------------
def edgegen_worker(spec: dict) -> dict:
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    bundle = Bundle(spec["bundle"], threads=spec["threads"], spin=spec["spin"])
    kind, k = spec["kind"], spec["draft_tokens"]
    if kind in ("verify", "floor"):
        target, vocab = bundle.target, bundle.manifest.model.vocab_size
        cache = bundle.new_cache()
        target.forward(cache, spec["prompts"][0][:-1])
        ctx = cache.length
        ids = [(100 + 37 * i) % vocab for i in range(k + 1)]  # the tokens the llama.cpp patch times

        def call(n: int) -> float:
            t = time.perf_counter()
            target.forward(cache, ids[:n], logits_to_keep=n)
            dt = time.perf_counter() - t
            cache.trim(ctx)
            return 1000 * dt

        if kind == "floor":
            return matmul_floor(spec, lambda: call(1))
        m1, mk = alternating_medians([lambda: call(1), lambda: call(k + 1)], spec["verify_reps"])
        return {"t1_ms": m1, "tk_ms": mk, "ratio": mk / m1}
    if kind == "ttft":
        gen = Generator(bundle, draft_tokens=0)
        times = []
        for _ in range(2):  # the first is the warm-up
            gen.reset()
            stats = list(gen.stream_ids(spec["ttft_prompt"], 1, use_assistant=False))[-1].stats
            times.append(stats.time_to_first_token_s)
        return {"ttft_ms": 1000 * times[-1]}
    draft = {"plain": 0, "spec": k, "auto": "auto"}[kind]
    warm = Generator(bundle, draft_tokens=k if kind != "plain" else 0)
    list(warm.stream_ids(spec["prompts"][0], 8, use_assistant=kind != "plain"))
    del warm
    gen = Generator(bundle, draft_tokens=draft)
    gen.eos_ids = set()  # fixed-length output, as LLAMA_IGNORE_EOS on the llama.cpp side
    runs = []
    for prompt in spec["prompts"]:
        gen.reset()
        events = list(gen.stream_ids(prompt, spec["new_tokens"], use_assistant=kind != "plain"))
        st = events[-1].stats
        runs.append({"ids": [e.token_id for e in events], "decode_s": st.elapsed_s - st.time_to_first_token_s,
                     "tokens_after_first": st.new_tokens - 1, "calls": st.target_calls,
                     "drafted": st.drafted, "accepted": st.accepted})
    return {"runs": runs}


def alternating_medians(calls: list, reps: int) -> list[float]:
    """Median of each call's result (ms) over `reps` turns, the calls taking turns; each runs once first."""
    for call in calls:
        call()
    samples = [[] for _ in calls]
    for _ in range(reps):
        for call, got in zip(calls, samples, strict=True):
            got.append(call())
    return [statistics.median(got) for got in samples]


def matmul_only_graph(bundle_dir: Path, out_dir: Path) -> Path:
    """The bundle's target graph with only its MatMulNBits nodes, each fed a [1, K] input of its width, all
    outputs kept; the weight files they read are hard-linked beside it (copied across file systems)."""
    import onnx
    from onnx import TensorProto, helper

    src = onnx.load(str(bundle_dir / "target.onnx"), load_external_data=False)
    inits = {t.name: t for t in src.graph.initializer}
    nodes, widths, weights = [], set(), {}
    for n in src.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        k = next(a.i for a in n.attribute if a.name == "K")
        widths.add(k)
        node = helper.make_node("MatMulNBits", [f"x{k}", *n.input[1:]], [f"y{len(nodes)}"], name=n.name,
                                domain=n.domain)
        node.attribute.extend(n.attribute)
        nodes.append(node)
        weights.update({i: inits[i] for i in n.input[1:] if i in inits})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted(widths)]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "matmul_only", inputs, outputs, list(weights.values()))
    model = helper.make_model(graph, opset_imports=list(src.opset_import))
    model.ir_version = src.ir_version
    files = {e.value for t in weights.values() for e in t.external_data if e.key == "location"}
    for name in files:  # onnxruntime refuses weights outside the model's directory
        try:
            os.link(bundle_dir / name, out_dir / name)
        except OSError:  # another file system
            shutil.copyfile(bundle_dir / name, out_dir / name)
    onnx.save(model, str(out_dir / "matmul_only.onnx"))
    return out_dir / "matmul_only.onnx"


def matmul_floor(spec: dict, step) -> dict:
    """Median ms of the whole one-row target step (`step()`) and of its MatMulNBits nodes alone, calls
    alternating. The floor graph's session holds its own prepacked copy of the target's matmul weights (E2B:
    ~1.4 GB more); it is closed before its temporary directory goes (it may map the files there)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        step_ms, floor_ms = _time_floor(matmul_only_graph(Path(spec["bundle"]), Path(tmp)), spec, step)
    return {"step_ms": step_ms, "floor_ms": floor_ms}


def _time_floor(path: Path, spec: dict, step) -> list[float]:
    import numpy as np
    import onnxruntime as ort

    from edgegen.runtime.model import session_options

    only = ort.InferenceSession(str(path), session_options(spec["threads"], spec["spin"]),
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).standard_normal((1, i.shape[1]), dtype=np.float32)
             for i in only.get_inputs()}

    def matmuls() -> float:
        t = time.perf_counter()
        only.run(None, feeds)
        return 1000 * (time.perf_counter() - t)

    return alternating_medians([step, matmuls], spec["verify_reps"])


# -- rounds and summary -----------------------------------------------------------------------------------
def jobs_for(threads: list[int], policies: list[str], measure: list[str]) -> list[list[Job]]:
    """Groups of jobs that are compared with each other, edgegen first; run group by group."""
    groups = []
    for t in threads:
        plain = ["plain", "floor"] if "floor" in measure else ["plain"]
        for e_kinds, l_kind in ((plain, "plain"), (["spec", "auto"], "spec"), (["verify"], "verify"),
                                (["ttft"], "ttft")):
            if l_kind not in measure:
                continue
            groups.append([Job("edgegen", kind, t, p) for p in policies for kind in e_kinds]
                          + [Job("llama.cpp", l_kind, t, p) for p in policies])
    return groups


def run_rounds(groups: list[list[Job]], s: Setup, rounds: int) -> None:
    for r in range(rounds):
        for group in groups:
            order = group if r % 2 == 0 else group[::-1]  # A B, B A, ...
            for job in order:
                print(f"round {r + 1}/{rounds}: {job.label(s.draft_tokens)}, {job.threads} thread(s) ...",
                      file=sys.stderr, flush=True)
                res = run_edgegen(job, s) if job.system == "edgegen" else run_llama(job, s)
                s.results.setdefault(job.key, []).append(res)


def summarize_decode(rounds: list[dict]) -> dict:
    ms = []
    for rd in rounds:
        runs = rd["runs"]
        ms.append(1000 * sum(x["decode_s"] for x in runs) / max(sum(x["tokens_after_first"] for x in runs), 1))
    last = rounds[0]["runs"]
    calls = sum(x["calls"] for x in last)
    drafted = sum(x["drafted"] for x in last)
    med = statistics.median(ms)
    return {"ms_per_token": round(med, 3), "tokens_per_second": round(1000 / med, 2),
            "samples_ms": [round(x, 3) for x in ms],
            "tokens_per_target_call": round(sum(x["tokens_after_first"] for x in last) / calls, 3) if calls else None,
            "acceptance": round(sum(x["accepted"] for x in last) / drafted, 4) if drafted else None,
            "same_ids_every_round": all([x["ids"] for x in rd["runs"]] == [x["ids"] for x in last] for rd in rounds),
            "ids": [x["ids"] for x in last]}


def identity(a: list[list[int]], b: list[list[int]]) -> dict:
    diffs = [first_difference(x, y) for x, y in zip(a, b, strict=True)]
    return {"identical_prompts": sum(d is None for d in diffs), "prompts": len(diffs), "first_difference": diffs}


def summarize(s: Setup, groups: list[list[Job]], draft_tokens: int) -> dict:
    rows = []
    for group in groups:
        for job in group:
            rounds = s.results[job.key]
            row = {"system": job.system, "kind": job.kind, "threads": job.threads, "policy": job.policy,
                   "label": job.label(draft_tokens)}
            if job.kind in ("plain", "spec", "auto"):
                row.update(summarize_decode(rounds))
            elif job.kind in ("floor", "verify"):
                row.update({key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]})
                if job.kind == "verify":
                    row["samples_ratio"] = [round(r["ratio"], 3) for r in rounds]
            else:
                row["ttft_ms"] = round(statistics.median(r["ttft_ms"] for r in rounds), 1)
                row["samples_ms"] = [round(r["ttft_ms"], 1) for r in rounds]
            rows.append(row)
    decode = [r for r in rows if "ids" in r]
    refs = {sys_: next((r for r in decode if r["system"] == sys_ and r["kind"] == "plain"), None)
            for sys_ in ("edgegen", "llama.cpp")}
    for r in decode:
        ref = refs[r["system"]]
        if ref is not None and r is not ref:
            r["vs_own_plain"] = identity(ref["ids"], r["ids"])
    cross = (identity(refs["edgegen"]["ids"], refs["llama.cpp"]["ids"])
             if refs["edgegen"] and refs["llama.cpp"] else None)
    return {"rows": rows, "cross_system": cross, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """edgegen ÷ llama.cpp, for each thread count and thread policy (both systems under the same one)."""
    out = []
    by = {(r["system"], r["kind"], r["threads"], r["policy"]): r for r in rows}
    for (system, kind, t, policy), r in by.items():
        if system != "llama.cpp":
            continue
        if kind == "plain" and ("edgegen", "plain", t, policy) in by:
            e = by[("edgegen", "plain", t, policy)]
            out.append({"what": "plain tok/s", "threads": t, "policy": policy,
                        "ratio": round(e["tokens_per_second"] / r["tokens_per_second"], 3)})
            if ("edgegen", "floor", t, policy) in by:
                floor = by[("edgegen", "floor", t, policy)]["floor_ms"]
                out.append({"what": "plain tok/s if only MatMulNBits cost time (floor)", "threads": t,
                            "policy": policy, "ratio": round(r["ms_per_token"] / floor, 3)})
        if kind == "spec":
            for ek in ("spec", "auto"):
                if ("edgegen", ek, t, policy) in by:
                    e = by[("edgegen", ek, t, policy)]
                    out.append({"what": f"{'k=K' if ek == 'spec' else 'auto'} vs MTP k=K tok/s", "threads": t,
                                "policy": policy,
                                "ratio": round(e["tokens_per_second"] / r["tokens_per_second"], 3)})
            best_e = max((by[k] for k in by if k[0] == "edgegen" and k[2] == t and k[3] == policy
                          and "tokens_per_second" in by[k]),
                         key=lambda x: x["tokens_per_second"], default=None)
            best_l = max((by[k] for k in by if k[0] == "llama.cpp" and k[2] == t and k[3] == policy
                          and "tokens_per_second" in by[k]), key=lambda x: x["tokens_per_second"], default=None)
            if best_e and best_l:
                out.append({"what": f"best tok/s ({best_e['label']} vs {best_l['label']})", "threads": t,
                            "policy": policy, "ratio": round(best_e["tokens_per_second"]
                                                             / best_l["tokens_per_second"], 3)})
        if kind == "verify" and ("edgegen", "verify", t, policy) in by:
            out.append({"what": "verify cost (K+1 ÷ 1)", "threads": t, "policy": policy,
                        "ratio": round(by[("edgegen", "verify", t, policy)]["ratio"] / r["ratio"], 3)})
        if kind == "ttft" and ("edgegen", "ttft", t, policy) in by:
            out.append({"what": "time to first token", "threads": t, "policy": policy,
                        "ratio": round(by[("edgegen", "ttft", t, policy)]["ttft_ms"] / r["ttft_ms"], 3)})
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(out: dict) -> None:
    c, m = out["config"], out["machine"]
    k = c["draft_tokens"]
    print(f"{out['pair']}: {c['prompts']} prompt(s) x {c['prompt_tokens']} tokens, {c['new_tokens']} new tokens "
          f"(greedy, EOS ignored), k={k}, medians of {c['rounds']} interleaved rounds")
    print(f"edgegen bundle {c['bundle']}; llama.cpp {Path(c['target_gguf']).name} + {Path(c['assistant_gguf']).name}")
    print(f"{m['cpu']} ({m['cpus']} CPUs); load average {m['load_before']} before, {m['load_after']} after")
    print(f"\n{'':34} {'ms/token':>9} {'tok/s':>8} {'tok/call':>9} {'accept':>7}  tokens vs own plain")
    for r in out["rows"]:
        label = f"t{r['threads']} {r['label']}"
        if "ms_per_token" in r:
            same = r.get("vs_own_plain")
            ident = ("(reference)" if same is None else
                     f"{same['identical_prompts']}/{same['prompts']} identical"
                     + ("" if same["identical_prompts"] == same["prompts"]
                        else f", first differences {same['first_difference']}"))
            if not r["same_ids_every_round"]:
                ident += "; ids changed between rounds"
            tpc = f"{r['tokens_per_target_call']:.2f}" if r["tokens_per_target_call"] else "-"
            acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
            print(f"{label:34} {r['ms_per_token']:9.2f} {r['tokens_per_second']:8.1f} {tpc:>9} {acc:>7}  {ident}")
        elif "floor_ms" in r:
            print(f"{label:34} MatMulNBits alone {r['floor_ms']:.2f} ms of a {r['step_ms']:.2f} ms target step "
                  f"({100 * r['floor_ms'] / r['step_ms']:.0f}%)")
        elif "ratio" in r:
            print(f"{label:34} verify {k + 1} tokens {r['tk_ms']:.2f} ms / 1 token {r['t1_ms']:.2f} ms "
                  f"= {r['ratio']:.2f}")
        else:
            print(f"{label:34} time to first token ({c['ttft_tokens']}-token prompt) {r['ttft_ms']:.1f} ms")
    cross = out["cross_system"]
    if cross:
        print(f"\nedgegen plain vs llama.cpp plain: {cross['identical_prompts']}/{cross['prompts']} prompts "
              f"identical; first differences {cross['first_difference']} (None: identical)")
    print("\nedgegen ÷ llama.cpp (tok/s: >1 edgegen faster; verify cost and TTFT: <1 edgegen cheaper)")
    for x in out["ratios"]:
        print(f"  t{x['threads']} {x['what'].replace('K', str(k)):58} {x['policy']:8} {x['ratio']:.2f}")


# -- command line --------------------------------------------------------------------------------------
def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} must be a comma list of numbers, e.g. 1,2") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"{flag} must be positive numbers, e.g. 1,2")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--pair", help="a directory with target/ and assistant/ (instead of --preset)")
    ap.add_argument("--target", help="target checkpoint directory (with --assistant; instead of --preset)")
    ap.add_argument("--assistant", help="assistant checkpoint directory")
    ap.add_argument("--name", help="cache name of a --pair/--target pair under --work [default: its directory]")
    ap.add_argument("--bundle", help="an edgegen bundle exported from this pair (else exported with --export-flags)")
    ap.add_argument("--export-flags", help="edgegen export flags for the bundle [default: --quant int4 "
                    "--compute int8, with --no-verify for the random-weight presets]")
    ap.add_argument("--outtype", choices=["f32", "bf16"], help="converter precision [default: per preset]")
    ap.add_argument("--target-type", default="Q4_0", help="llama.cpp target quantization [default: Q4_0]")
    ap.add_argument("--assistant-type", default="Q8_0", help="llama.cpp assistant quantization [default: Q8_0]")
    ap.add_argument("--llama-args", default="",
                    help="extra llama-speculative-simple flags, e.g. '-ctk f32 -ctv f32 -fa off' (fp32 KV cache)")
    ap.add_argument("--llama-cpp", default=str(REPO / "build" / "llamacpp"),
                    help="work directory of benchmarks/llamacpp/build.sh [default: build/llamacpp]")
    ap.add_argument("--work", default=str(REPO / "build" / "vs-llamacpp"), help="cache of converted models")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="default,passive",
                    help="thread policies, each run by both systems: default (each system's own: threads "
                         "spin) and/or passive (idle threads sleep)")
    ap.add_argument("--measure", default="plain,spec,verify,ttft",
                    help="any of plain, spec, verify, ttft, floor (floor: with plain)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, help="number of prompts [default: per preset]")
    ap.add_argument("--prompt-tokens", type=int, help="tokens per prompt [default: per preset]")
    ap.add_argument("--new-tokens", type=int, help="[default: per preset]")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--verify-reps", type=int, default=20)
    ap.add_argument("--ttft-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    args.prompts = args.prompts or p.prompts
    args.prompt_tokens = args.prompt_tokens or p.prompt_tokens
    args.new_tokens = args.new_tokens or p.new_tokens
    args.outtype = args.outtype or p.outtype
    args.threads = _int_list(args.threads, "--threads")
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not args.policies or set(args.policies) - {"default", "passive"}:
        raise BenchError("--policies takes default and/or passive, e.g. default,passive")
    args.measure = [x.strip() for x in args.measure.split(",") if x.strip()]
    if not args.measure or set(args.measure) - {"plain", "spec", "verify", "ttft", "floor"}:
        raise BenchError("--measure takes plain, spec, verify, ttft and/or floor")
    if "floor" in args.measure and "plain" not in args.measure:
        raise BenchError("--measure floor is compared with plain decoding: add plain")
    if min(args.rounds, args.prompts, args.draft_tokens, args.verify_reps, args.ttft_tokens) < 1:
        raise BenchError("--rounds, --prompts, --draft-tokens, --verify-reps and --ttft-tokens must be 1 or more")
    if args.prompt_tokens < 2 or args.new_tokens < 2:
        raise BenchError("--prompt-tokens and --new-tokens must be 2 or more")
    args.export_flags = shlex.split(args.export_flags if args.export_flags is not None else p.export_flags)
    args.llama_args = shlex.split(args.llama_args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    llama = LlamaCpp(Path(args.llama_cpp).resolve())
    llama.check()
    name, target, assistant = resolve_pair(args)
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    target_gguf, assistant_gguf = ensure_gguf(llama, work, target, assistant, args.outtype,
                                              args.target_type, args.assistant_type)
    if args.bundle:
        bundle = Path(args.bundle)
        if not (bundle / "manifest.json").is_file():
            raise BenchError(f"'{bundle}' has no manifest.json; give a bundle written by edgegen export")
    else:
        bundle = ensure_bundle(work, target, assistant, args.export_flags)
    prompts = make_prompts(name, target, args.prompts, args.prompt_tokens, args.seed)
    ttft_prompt = make_prompts("random", target, 1, args.ttft_tokens, args.seed + 1)[0]
    s = Setup(bundle, target_gguf, assistant_gguf, llama, prompts, args.new_tokens, args.draft_tokens,
              args.verify_reps, ttft_prompt, args.llama_args)
    groups = jobs_for(args.threads, args.policies, args.measure)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    run_rounds(groups, s, args.rounds)
    out = {
        "pair": name, "target": str(target), "assistant": str(assistant),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "command": "python benchmarks/vs_llamacpp.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "config": {"bundle": str(bundle), "export_flags": args.export_flags, "target_gguf": str(target_gguf),
                   "assistant_gguf": str(assistant_gguf), "prompts": args.prompts,
                   "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                   "draft_tokens": args.draft_tokens, "rounds": args.rounds, "threads": args.threads,
                   "policies": args.policies, "llama_args": args.llama_args, "ttft_tokens": args.ttft_tokens,
                   "verify_reps": args.verify_reps},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                    "wall_s": round(time.time() - t0, 1)},
        **summarize(s, groups, args.draft_tokens),
    }
    report(out)
    if args.json:
        for r in out["rows"]:
            r.pop("ids", None)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--edgegen-worker"]:
        print(json.dumps(edgegen_worker(json.loads(sys.stdin.read()))))
        sys.exit(0)
    try:
        main()
    except (BenchError, EdgegenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
