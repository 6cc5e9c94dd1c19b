"""edgegen vs onnxruntime-genai 0.18: plain greedy decode ms/token on the E2B-shaped slice, side by side.

    python benchmarks/vs_ort_genai.py [--work build/vs-genai] [--pair DIR] [--quants fp32,int4]
                                      [--contexts 64,2048] [--new-tokens 64] [--threads 2] [--repeats 3] [--json]

Needs two packages edgegen itself does not use (mobius pulls torch and transformers, so they stay out of the
`bench` extra), in the environment that has edgegen's exporter (`scripts/setup.sh`):

    pip install onnxruntime-genai==0.18.0 mobius-onnx==0.1.0

They keep the installed onnxruntime (checked: 1.32.0 stays); the script prints the versions it ran with.

Both sides decode the same random-weight Gemma 4 target, preset `e2b-slice` (real E2B per-layer sizes:
hidden 1536, 1 KV head, head_dim 256/512, PLE 256, double-wide MLP; 10 layers of which 5 KV-shared; vocab
32k; 651M parameters). Built once into --work and reused:
  pair-e2b-slice/  the HF checkpoint (`edgegen.export.testing.save_pair`), unless --pair names one
  edgegen-QUANT/   an `edgegen export` bundle; int4 is MatMulNBits, block 32, symmetric, accuracy level 0
  genai-QUANT/     a mobius-onnx graph of the same checkpoint + genai_config.json (mobius's own writer);
                   int4 through onnxruntime's MatMulNBitsQuantizer with the same block, symmetry and
                   accuracy level
genai cannot drive edgegen's own target graph: it takes the per-layer embeddings as an input gathered on the
host from ple.npy, which genai has no way to feed. mobius's graph gathers them inside.

mobius 0.1.0 + transformers 5.23 need three repairs, applied here and checked by the token comparison:
  - transformers folds `global_head_dim` into `per_layer_config` and refuses the global `head_dim` read
    that mobius makes; the config handed to mobius is allowed that read and gets `global_head_dim` back.
  - the graph declares `past_key_values.i` inputs for the KV-shared layers that nothing reads; genai
    discovers its cache layers from those names and then asks for `present.i` outputs that do not exist.
    The unused inputs are dropped.
  - the full-attention store layer's past/present are declared with head_dim 256 instead of 512; genai
    sizes each layer's cache from the declared shape. The declared dims are corrected.

Measurement, per case (quant x context): the same seeded random prompt of `context` tokens on both sides,
`--new-tokens` greedy tokens, `--threads` intra-op threads on both sides (genai otherwise keeps its defaults).
edgegen's sessions never let idle threads spin; genai's do unless --genai-spinning off. Spinning decides the
result: on an idle machine it makes genai faster, on a busy one (other processes on the cores) slower.
Each side prefills the prompt once (that run is the warm-up); every timed run then re-decodes from the
cached prompt (edgegen reuses the cached prefix, genai rewinds), so a 2k context costs one prefill per side.
Timed runs alternate edgegen, genai, genai, edgegen, ... and the medians are reported. ms/token is decode
only: (time of the last token - time of the first) / (tokens - 1) on both sides. speedup = genai ms/token
/ edgegen ms/token (goal >= 1.2). Tokens: fp32 is expected to be identical, otherwise the first divergence
is printed; int4 rounds differently on each side, so only the agreement is reported. Random weights give
nearly flat logits (top-2 gaps of 1e-2 are common), so a late fp32 divergence at long context can be rounding
(compare both to transformers before calling it a bug). edgegen's int4 bundle also stores the embedding and
per-layer-embedding tables in int4 where mobius keeps them fp32; decode reads one row of each per token, so
this changes file size and RAM, not the weight bytes streamed per token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # mobius draws a progress bar per saved tensor; read at tqdm import

from edgegen.runtime.errors import EdgegenError

REPO = Path(__file__).resolve().parent.parent
PRESET = "e2b-slice"
EXPORT_CONTEXT = 4096  # the edgegen bundles hold prompt + output up to this many tokens
INT4 = {"block_size": 32, "is_symmetric": True, "accuracy_level": 0}  # edgegen's own int4 settings
PIP_LINE = "pip install onnxruntime-genai==0.18.0 mobius-onnx==0.1.0"


class BenchError(Exception):
    """A problem the user can fix; printed as one line."""


# -- building what both sides run ----------------------------------------------------------------------
STAMP = "built-from.txt"  # in every built directory: the checkpoint it was built from


@contextmanager
def building(out: Path, source: Path):
    """Build into OUT.partial and move it to OUT only when complete: an interrupted build leaves no OUT."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / STAMP).write_text(f"{source.resolve()}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)


def built(out: Path, source: Path) -> bool:
    """Whether OUT holds a finished build of SOURCE (a build of another checkpoint is an error)."""
    if not (out / STAMP).is_file():
        return False
    if (out / STAMP).read_text().strip() != str(source.resolve()):
        raise BenchError(f"'{out}' was built from {(out / STAMP).read_text().strip()}, not {source}; "
                         "use another --work or delete it")
    return True


def ensure_pair(work: Path, pair: str | None) -> Path:
    if pair:
        path = Path(pair)
        if not (path / "target" / "config.json").is_file():
            raise BenchError(f"'{path}' has no target/config.json; give a directory written by save_pair")
        return path
    path = work / f"pair-{PRESET}"
    if not (path / "target" / "config.json").is_file():
        from edgegen.export.testing import save_pair

        print(f"building the {PRESET} pair in {path} ...", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with building(path, path) as tmp:
            save_pair(tmp, PRESET)
    return path


def ensure_edgegen(work: Path, pair: Path, quant: str) -> Path:
    out = work / f"edgegen-{quant}"
    if not built(out, pair):
        from edgegen.export.bundle import ExportOptions, export_bundle

        print(f"exporting the edgegen {quant} bundle to {out} ...", file=sys.stderr, flush=True)
        with building(out, pair) as tmp:
            export_bundle(str(pair / "target"), str(pair / "assistant"), tmp,
                          ExportOptions(quant=quant, max_context=EXPORT_CONTEXT, verify=False, force=True))
    return out


def ensure_genai(work: Path, pair: Path, quant: str) -> Path:
    out = work / f"genai-{quant}"
    if built(out, pair):
        return out
    if quant == "fp32":
        print(f"building the mobius fp32 graph in {out} ...", file=sys.stderr, flush=True)
        with building(out, pair) as tmp:
            head_dims = mobius_build(pair / "target", tmp)
            repair_for_genai(tmp / "model.onnx", head_dims)
    else:
        fp32 = ensure_genai(work, pair, "fp32")
        print(f"quantizing the mobius graph to {quant} in {out} ...", file=sys.stderr, flush=True)
        with building(out, pair) as tmp:
            quantize_genai(fp32, tmp, bits=4)
    return out


def mobius_build(target: Path, out: Path) -> list[int]:
    """mobius's `build --config DIR --ep cpu --runtime ort-genai`, through its Python API so that the
    config can be repaired first (see the module docstring). Returns each layer's head_dim."""
    import transformers
    from mobius import Gemma4Config, build_from_module, registry
    from mobius.integrations.ort_genai import write_ort_genai_config
    from safetensors.torch import load_file

    hf = transformers.AutoConfig.from_pretrained(target)
    if hf.model_type != "gemma4_text":
        raise BenchError(f"'{target}' is a {hf.model_type} checkpoint; this benchmark expects gemma4_text")
    full = [i for i, kind in enumerate(hf.layer_types) if kind == "full_attention"]
    hf.allow_global_per_layer_attribute_access = True
    hf.global_head_dim = hf.per_layer_config[full[0]].head_dim
    config = Gemma4Config.from_transformers(hf, parent_config=hf)
    module = registry.get("gemma4_text")(config)
    package = build_from_module(module, config, task="text-generation", execution_provider="cpu")
    weights = {}
    for f in sorted(target.glob("*.safetensors")):
        weights.update(load_file(f))
    package.apply_weights(module.preprocess_weights(weights))
    package.save(str(out))
    write_ort_genai_config(package, str(out), ep="cpu", local_config_dir=str(target))
    return [hf.global_head_dim if kind == "full_attention" else hf.head_dim for kind in hf.layer_types]


def repair_for_genai(model_path: Path, head_dims: list[int]) -> None:
    """Drop past inputs nothing reads (KV-shared layers) and declare each layer's cache with its real
    head_dim, which genai reads to size the cache. The weights file is not touched."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    kept = [v for v in graph.input if v.name in read]
    del graph.input[:]
    graph.input.extend(kept)
    for v in [*graph.input, *graph.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.shape.dim[3].dim_value = head_dims[int(v.name.split(".")[1])]
    onnx.save(model, str(model_path))


def quantize_genai(src: Path, out: Path, bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src / "model.onnx"))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, **INT4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    for f in src.iterdir():
        if not f.name.startswith("model.onnx") and f.name != STAMP:
            shutil.copy2(f, out / f.name)


# -- the two sides ------------------------------------------------------------------------------------
class EdgegenSide:
    name = "edgegen"

    def __init__(self, bundle: Path, threads: int):
        from edgegen.runtime.generate import Generator

        self.gen = Generator(bundle, threads=threads, draft_tokens=0)

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy ids and decode ms/token. A repeated prompt is not prefilled again: the Generator keeps
        its K/V and runs only the last prompt token."""
        events = list(self.gen.stream_ids(prompt, new_tokens, use_assistant=False))
        stats = events[-1].stats
        return [e.token_id for e in events], _per_token(stats.elapsed_s - stats.time_to_first_token_s, len(events))


class GenaiSide:
    name = "genai"

    def __init__(self, model_dir: Path, threads: int, spinning: bool = True):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(model_dir))
        options: dict = {"intra_op_num_threads": threads}
        if not spinning:  # genai passes unknown string keys on as session config entries
            options["session.intra_op.allow_spinning"] = "0"
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.generator, self.key = None, None

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy ids and decode ms/token. A repeated prompt is not prefilled again: the generator rewinds
        to the prompt minus its last token and appends that token."""
        ids = np.asarray(prompt, np.int32)
        if self.key != (tuple(prompt), new_tokens):
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
            self.generator, self.key = self.og.Generator(self.model, params), (tuple(prompt), new_tokens)
            self.generator.append_tokens(ids)
        else:
            self.generator.rewind_to(len(prompt) - 1)
            self.generator.append_tokens(ids[-1:])
        gen, out, first = self.generator, [], 0.0
        while not gen.is_done() and len(out) < new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if len(out) == 1:
                first = time.perf_counter()
        return out, _per_token(time.perf_counter() - first, len(out))


def _per_token(decode_s: float, tokens: int) -> float:
    """ms per token after the first (the first one comes out of the prefill)."""
    return 1000 * decode_s / (tokens - 1) if tokens > 1 else float("nan")


# -- one case: both sides, alternating ----------------------------------------------------------------
def run_case(sides: list, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    first = {side.name: side.decode(prompt, new_tokens)[0] for side in sides}  # prefill + warm-up
    samples: dict[str, list[float]] = {side.name: [] for side in sides}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:  # E G, G E, E G, ...
            ids, ms = side.decode(prompt, new_tokens)
            if ids != first[side.name]:
                raise BenchError(f"{side.name} decoded different tokens on a repeat of the same prompt")
            samples[side.name].append(ms)
    ours, theirs = first["edgegen"], first["genai"]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    med = {name: statistics.median(xs) for name, xs in samples.items()}
    return {
        "edgegen_ms_per_token": round(med["edgegen"], 2),
        "genai_ms_per_token": round(med["genai"], 2),
        "speedup": round(med["genai"] / med["edgegen"], 3),
        "samples_ms": {name: [round(x, 2) for x in xs] for name, xs in samples.items()},
        "tokens": {"edgegen": len(ours), "genai": len(theirs)},
        "identical": ours == theirs,
        "first_divergence": None if ours == theirs else same,
    }


# -- command line --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "build" / "vs-genai"), help="cache of built models")
    ap.add_argument("--pair", help="an existing save_pair directory of the e2b-slice preset (else built)")
    ap.add_argument("--quants", default="fp32,int4", help="comma list of fp32, int4")
    ap.add_argument("--contexts", default="64,2048", help="prompt lengths, comma list")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and case (median reported)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--genai-spinning", choices=["default", "off"], default="default",
                    help="genai's intra-op threads spin by default; edgegen's never do (off: same as edgegen)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
        args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        raise BenchError("--contexts must be a comma list of token counts, e.g. 64,2048") from None
    if not args.quants or set(args.quants) - {"fp32", "int4"}:
        raise BenchError("--quants takes fp32 and/or int4, e.g. fp32,int4")
    if not args.contexts or min(args.contexts) < 1:
        raise BenchError("--contexts must be positive token counts, e.g. 64,2048")
    if args.new_tokens < 2:
        raise BenchError("--new-tokens must be 2 or more (ms/token is measured after the first token)")
    if max(args.contexts) + args.new_tokens >= EXPORT_CONTEXT:
        raise BenchError(f"context + new tokens must stay below {EXPORT_CONTEXT}; use shorter --contexts")
    if args.threads < 1 or args.repeats < 1:
        raise BenchError("--threads and --repeats must be 1 or more")
    return args


def check_packages() -> dict:
    import importlib.metadata as md
    import importlib.util

    missing = [m for m in ("onnxruntime_genai", "mobius") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed; run: {PIP_LINE}")
    return {pkg: md.version(pkg) for pkg in ("onnxruntime", "onnxruntime-genai", "mobius-onnx", "edgegen")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    versions = check_packages()
    work = Path(args.work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot use --work '{work}' ({exc.strerror}); give a writable directory") from None
    pair = ensure_pair(work, args.pair)
    models = {q: (ensure_edgegen(work, pair, q), ensure_genai(work, pair, q)) for q in args.quants}

    rng = np.random.default_rng(args.seed)
    vocab = json.loads((pair / "target" / "config.json").read_text())["vocab_size"]
    prompts = {c: [int(t) for t in rng.integers(4, vocab, c)] for c in args.contexts}
    load_before = os.getloadavg()
    cases = []
    for quant in args.quants:
        sides = [EdgegenSide(models[quant][0], args.threads),
                 GenaiSide(models[quant][1], args.threads, spinning=args.genai_spinning == "default")]
        for context in args.contexts:
            print(f"measuring {quant}, context {context} ...", file=sys.stderr, flush=True)
            cases.append({"quant": quant, "context": context,
                          **run_case(sides, prompts[context], args.new_tokens, args.repeats)})
        del sides  # free this precision's models before loading the next
    summary = {
        "preset": PRESET, "pair": str(pair), "new_tokens": args.new_tokens, "threads": args.threads,
        "repeats": args.repeats, "genai_spinning": args.genai_spinning, "versions": versions,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "cases": cases,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        report(summary)
    return summary


def report(s: dict) -> None:
    v, m = s["versions"], s["machine"]
    print(f"{s['preset']}: plain greedy decode, {s['new_tokens']} new tokens, {s['threads']} threads, "
          f"median of {s['repeats']} alternating runs, genai spinning {s['genai_spinning']}")
    print(f"edgegen {v['edgegen']} (onnxruntime {v['onnxruntime']}) vs onnxruntime-genai {v['onnxruntime-genai']} "
          f"over mobius-onnx {v['mobius-onnx']}; {m['cpus']} CPUs, load average {m['load_before'][0]} before, "
          f"{m['load_after'][0]} after")
    print(f"{'quant':6} {'context':>7} {'edgegen ms/tok':>15} {'genai ms/tok':>13} {'speedup':>8}  tokens")
    for c in s["cases"]:
        n = min(c["tokens"].values())
        tokens = (f"identical ({n}/{n})" if c["identical"] else
                  f"first divergence at token {c['first_divergence']} ({c['first_divergence']}/{n} agree before it)")
        print(f"{c['quant']:6} {c['context']:7d} {c['edgegen_ms_per_token']:15.1f} {c['genai_ms_per_token']:13.1f} "
              f"{c['speedup']:7.2f}x  {tokens}")
    for c in s["cases"]:
        print(f"  samples {c['quant']} {c['context']}: edgegen {c['samples_ms']['edgegen']}  "
              f"genai {c['samples_ms']['genai']}")
    met = all(c["speedup"] >= 1.2 for c in s["cases"])
    print(f"goal: edgegen >= 1.2x faster than genai in every case: {'met' if met else 'not met'}")


if __name__ == "__main__":
    try:
        main()
    except (BenchError, EdgegenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
