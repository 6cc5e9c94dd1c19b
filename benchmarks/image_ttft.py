"""Image-to-first-token on the full-size E2B vision tower (random weights), beside text time to first token.

    python benchmarks/image_ttft.py [--quant int4] [--repeats 3] [--threads 2] [--keep DIR]

Builds a multimodal E2B stand-in without copying the text model: a directory with links to the full-size E2B
text stand-in's shards (edgegen.export.testing.realsize_pair, built on first use: ~9.3 GB), one more shard
with a random bf16 vision tower of the published E2B shape (transformers' Gemma4VisionConfig defaults:
16 layers, width 768, 16x16 patches, 3x3 pooling, 280 soft tokens an image) and a Gemma4ForConditionalGeneration
config; exports it (no verification: tests verify the graphs) and measures, interleaved, `repeats` times:
  text   a text prompt as long as the image prompt, to its first token (prefill + first token)
  image  one 1024x768 image in a chat turn: preprocessing, the vision graph, then the same prefill
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


def multimodal_e2b(text_target: Path, out: Path, seed: int = 0) -> Path:
    """A Gemma4ForConditionalGeneration checkpoint directory: the text stand-in's shards (linked) + a vision shard."""
    import numpy as np
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig

    from edgegen.export.testing import _fill_random, write_processor
    from edgegen.export.weights import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    for shard in text_target.glob("*.safetensors"):
        (out / shard.name).symlink_to(shard.resolve())
    text = Gemma4TextConfig.from_pretrained(text_target)
    config = Gemma4Config(text_config=text.to_dict(), vision_config=Gemma4VisionConfig().to_dict(), audio_config=None)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    specs = [(k, "BF16", tuple(v.shape)) for k, v in model.state_dict().items()
             if k.startswith(("model.vision_tower.", "model.embed_vision."))]
    shapes = {n: s for n, _, s in specs}
    rng = np.random.default_rng(seed)
    write_safetensors(out / "vision-00001-of-00001.safetensors", specs,
                      lambda name, write: _fill_random(name, shapes[name], rng, 0.02, write))
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    shutil.copyfile(text_target / "generation_config.json", out / "generation_config.json")
    write_processor(out, image_soft_tokens=280)  # the tokenizer and Gemma4ImageProcessor's E2B default budget
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="export the bundle here and keep it [default: a temp dir]")
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import realsize_pair
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    text_target, assistant = realsize_pair("e2b")
    scratch = Path(tempfile.mkdtemp(prefix="edgegen-image-ttft-"))
    try:
        target = multimodal_e2b(text_target, scratch / "target")
        out = args.keep or scratch / "bundle"
        if not (out / "manifest.json").is_file():
            t0 = time.monotonic()
            export_bundle(str(target), str(assistant), out, ExportOptions(quant=args.quant, verify=False, force=True))
            print(f"export {args.quant}: {time.monotonic() - t0:.0f} s", flush=True)
        bundle = Bundle(out, threads=args.threads)
        gen = Generator(bundle, draft_tokens=0)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
        turn = [{"type": "image", "image": image}, {"type": "text", "text": "What is shown in this image?"}]
        vision = bundle.vision
        patches = vision.preprocess(image)
        prompt_len = None
        text_s, image_s, prep_s, enc_s = [], [], [], []
        for i in range(args.repeats + 1):  # round 0 opens the sessions and is not counted
            gen.reset()
            t0 = time.perf_counter()
            first = next(iter(gen.chat(turn, max_new_tokens=1)))
            took = time.perf_counter() - t0
            prompt_len = first.stats.prompt_tokens
            gen.reset()
            ids = list(np.random.default_rng(i).integers(1000, 200000, prompt_len))
            t0 = time.perf_counter()
            next(iter(gen.stream_ids([2, *ids[1:]], max_new_tokens=1)))
            text_took = time.perf_counter() - t0
            t0 = time.perf_counter()
            vision.preprocess(image)
            t1 = time.perf_counter()
            vision.encode(patches)
            t2 = time.perf_counter()
            if i:
                image_s.append(took)
                text_s.append(text_took)
                prep_s.append(t1 - t0)
                enc_s.append(t2 - t1)
        result = {"quant": args.quant, "prompt_tokens": prompt_len, "soft_tokens": patches.soft_tokens,
                  "patches": int(patches.pixel_values.shape[0]), "threads": args.threads or os.cpu_count(),
                  "text_ttft_ms": [round(1000 * x) for x in text_s],
                  "image_to_first_token_ms": [round(1000 * x) for x in image_s],
                  "preprocess_ms": [round(1000 * x, 1) for x in prep_s], "encode_ms": [round(1000 * x) for x in enc_s]}
        print(json.dumps(result))
        print(f"E2B {args.quant}, {prompt_len}-token prompt ({patches.soft_tokens} soft tokens from "
              f"{result['patches']} patches): text TTFT {statistics.median(text_s) * 1000:.0f} ms, image to first "
              f"token {statistics.median(image_s) * 1000:.0f} ms (preprocess {statistics.median(prep_s) * 1000:.0f} "
              f"ms, vision graph {statistics.median(enc_s) * 1000:.0f} ms)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
