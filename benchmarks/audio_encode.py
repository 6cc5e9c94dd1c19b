"""Audio encoding on the full-size E2B audio tower (random weights): features and the audio graph per clip.

    python benchmarks/audio_encode.py [--quant fp32 int8] [--seconds 5 30] [--repeats 3] [--threads 2]

Writes a random bf16 checkpoint holding only the audio tower + audio embedder of the published E2B shape
(transformers' Gemma4AudioConfig defaults: 12 conformer layers, width 1024, 8 heads, 305M parameters;
embedder into E2B's text width 1536), builds the audio graph from it for each --quant, checks it once against
transformers (fp32 tower, weights rounded as the graph's) on the shortest clip, and measures, interleaved,
`repeats` times per clip length: numpy log-mel features, and the audio graph. Everything is written to a
temporary directory and removed (~0.6 GB checkpoint + 1.2 GB fp32 graph at peak).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

E2B_TEXT_HIDDEN = 1536


def audio_e2b(out: Path, seed: int = 0) -> object:
    """A checkpoint directory with the audio tower + embedder of a Gemma4ForConditionalGeneration of E2B shape
    (safetensors names as published); returns its config."""
    import numpy as np
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    from edgegen.export.testing import _fill_random, _tensor_specs
    from edgegen.export.weights import to_bfloat16, write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    text = Gemma4TextConfig(hidden_size=E2B_TEXT_HIDDEN, num_hidden_layers=1, vocab_size=262144)
    config = Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=Gemma4AudioConfig().to_dict())
    shapes = {name: shape for name, shape, _ in _tensor_specs(Gemma4ForConditionalGeneration, config)
              if name.startswith(("model.audio_tower.", "model.embed_audio."))}
    specs = [(name, "BF16", shape) for name, shape in shapes.items()]
    rng = np.random.default_rng(seed)

    def fill(name, write):
        if name.endswith(("input_min", "output_min", "input_max", "output_max")):  # finite clip bounds
            write(to_bfloat16(np.full(1, -8.0 if name.endswith("min") else 8.0, np.float32)))
        else:
            _fill_random(name, shapes[name], rng, 0.02, write)

    write_safetensors(out / "audio.safetensors", specs, fill)
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--seconds", nargs="+", type=float, default=[5.0, 30.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from edgegen.export import audio as xaudio
    from edgegen.export.graphs import PROFILES
    from edgegen.export.onnx_graph import WeightFile
    from edgegen.export.quantize import Quant
    from edgegen.export.weights import Checkpoint
    from edgegen.runtime.audio import AudioEncoder
    from edgegen.runtime.model import session_options

    scratch = Path(tempfile.mkdtemp(prefix="edgegen-audio-encode-"))
    try:
        config = audio_e2b(scratch / "ckpt")
        ckpt = Checkpoint(scratch / "ckpt")
        settings = xaudio.audio_settings(scratch / "ckpt", config)
        rng = np.random.default_rng(0)
        clips = {s: (0.3 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in args.seconds}
        results = []
        for q in args.quant:
            quant = xaudio.audio_quant(Quant(q))
            out = scratch / q
            out.mkdir()
            shared = WeightFile(out / "unused.weights")
            t0 = time.monotonic()
            g = xaudio.build_audio_graph(ckpt, config.audio_config, E2B_TEXT_HIDDEN, quant, out, shared,
                                         PROFILES["cpu"])
            g.save(out)
            g.data.close()
            shared.close()
            build_s = time.monotonic() - t0
            check = xaudio.verify_audio(ckpt, config, out, quant, settings, seconds=(min(args.seconds),))
            encoder = AudioEncoder(ort.InferenceSession(str(out / "audio.onnx"), session_options(args.threads)),
                                   settings)
            feats_s = {s: [] for s in clips}
            graph_s = {s: [] for s in clips}
            for i in range(args.repeats + 1):  # round 0 warms the session up and is not counted
                for s, clip in clips.items():
                    t0 = time.perf_counter()
                    feats = encoder.extractor(clip)
                    t1 = time.perf_counter()
                    encoder.session.run(None, {"input_features": feats[None]})
                    t2 = time.perf_counter()
                    if i:
                        feats_s[s].append(t1 - t0)
                        graph_s[s].append(t2 - t1)
            row = {"quant": quant.kind, "graph_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 2**20),
                   "build_s": round(build_s, 1), "check": check["audio_soft_tokens"],
                   "threads": args.threads or os.cpu_count(),
                   "clips": [{"seconds": s, "soft_tokens": encoder.counts([clip])[0],
                              "features_ms": [round(1000 * x, 1) for x in feats_s[s]],
                              "graph_ms": [round(1000 * x) for x in graph_s[s]]} for s, clip in clips.items()]}
            results.append(row)
            print(json.dumps(row), flush=True)
            for c in row["clips"]:
                print(f"E2B audio tower {row['quant']} ({row['graph_mb']} MB): {c['seconds']:g} s clip, "
                      f"{c['soft_tokens']} soft tokens: features {statistics.median(c['features_ms']):.1f} ms, "
                      f"graph {statistics.median(c['graph_ms']):.0f} ms; vs PyTorch {row['check']['value']:.2g}",
                      flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
