"""`edgegen bench`: plain vs speculative decoding on one bundle, measured side by side in one run.

Reports tokens/s, time to first token, prefill tokens/s, acceptance by draft position, tokens per target
call, peak RSS and the split of decode time between target, drafter and host code. `bench_eps` runs the
same measurement on several execution providers, one after the other, and adds a per-EP table (with the
share of graph nodes each EP got).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgegen.runtime.loop import Stats, TokenLoop
from edgegen.runtime.model import Bundle
from edgegen.runtime.osinfo import peak_rss_mb
from edgegen.runtime.tokenizer import TextTokenizer

BENCH_PROMPTS = (
    "def parse_args(argv=None):\n    \"\"\"Parse the command line.\"\"\"\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "The standard library provides modules for file handling, networking and text processing. ",
)


@dataclass
class ModeResult:
    name: str
    tokens: int
    decode_s: float
    ttft_s: list[float]
    prefill_tps: list[float]
    stats: list[Stats]

    def as_dict(self) -> dict:
        drafted = np.sum([_pad(s.drafted_by_position, 16) for s in self.stats], axis=0)
        accepted = np.sum([_pad(s.accepted_by_position, 16) for s in self.stats], axis=0)
        calls = sum(s.target_calls for s in self.stats)
        target = sum(s.target_s - s.prefill_s for s in self.stats)
        draft = sum(s.draft_s for s in self.stats)
        host = max(self.decode_s - target - draft, 0.0)
        hist = np.sum([_pad(s.accepted_hist, 17) for s in self.stats], axis=0)
        total_drafted = sum(s.drafted for s in self.stats)
        return {
            "mode": self.name,
            "tokens": self.tokens,
            "tokens_per_second": round((self.tokens - len(self.stats)) / self.decode_s, 3) if self.decode_s else 0,
            "time_to_first_token_ms": round(1000 * float(np.median(self.ttft_s)), 2),
            "prefill_tokens_per_second": round(float(np.median(self.prefill_tps)), 1),
            "tokens_per_target_call": round((self.tokens - len(self.stats)) / calls, 4) if calls else 0,
            "acceptance": round(sum(s.accepted for s in self.stats) / total_drafted, 4) if total_drafted else None,
            "acceptance_by_position": [round(float(a / d), 4) for a, d in zip(accepted, drafted, strict=True) if d],
            "accepted_length_histogram": [int(x) for x in np.trim_zeros(hist, "b")],
            "drafting": self.stats[-1].drafting if self.stats else {},  # the policy's state after the last prompt
            "time_split": {"target": round(target / self.decode_s, 4) if self.decode_s else 0,
                           "drafter": round(draft / self.decode_s, 4) if self.decode_s else 0,
                           "host": round(host / self.decode_s, 4) if self.decode_s else 0},
        }


def _pad(xs: list[int], n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[: min(len(xs), n)] = xs[:n]
    return out


def run_mode(loop: TokenLoop, name: str, prompts: list[list[int]], max_new_tokens: int, use_assistant: bool,
             draft_tokens: int | str) -> ModeResult:
    stats, ttft, prefill, tokens, decode = [], [], [], 0, 0.0
    for ids in prompts:
        loop.reset()
        t0 = time.perf_counter()
        n, last = 0, None
        for token in loop.stream_ids(ids, max_new_tokens, use_assistant=use_assistant, draft_tokens=draft_tokens):
            n += 1
            last = token.stats
        total = time.perf_counter() - t0
        stats.append(last)
        ttft.append(last.time_to_first_token_s)
        prefill.append(len(ids) / last.prefill_s if last.prefill_s else 0.0)
        tokens += n
        decode += total - last.time_to_first_token_s
    return ModeResult(name, tokens, decode, ttft, prefill, stats)


def bench_images(bundle: Bundle, images: list | None = None, repeats: int = 3) -> dict | None:
    """Image encoding, apart from decoding (a bundle with a vision graph): per image the medians over `repeats`
    of preprocessing (decode, resize, patchify) and of the vision graph, and image-to-first-token: both plus
    the prefill of a one-turn chat prompt holding the image, up to its first token. Without `images`, one
    synthetic 768x1024 photo-sized image. None for a bundle without a vision graph."""
    vision = bundle.vision
    if vision is None:
        return None
    from edgegen.runtime.generate import Generator

    if not images:
        from PIL import Image

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))]
    gen = Generator(bundle, draft_tokens=0)
    rows = []
    for image in images:
        prep, enc, first = [], [], []
        for _ in range(repeats + 1):  # the first round warms the session up and is not counted
            t0 = time.perf_counter()
            patches = vision.preprocess(image)
            t1 = time.perf_counter()
            vision.encode(patches)
            t2 = time.perf_counter()
            gen.reset()
            next(iter(gen.chat([{"type": "image", "image": image}, {"type": "text", "text": "Describe this."}],
                               max_new_tokens=1)))
            first.append(time.perf_counter() - t2 + (t2 - t0))
            prep.append(t1 - t0)
            enc.append(t2 - t1)
        rows.append({"soft_tokens": patches.soft_tokens, "patches": int(patches.pixel_values.shape[0]),
                     "preprocess_ms": round(1000 * float(np.median(prep[1:])), 2),
                     "encode_ms": round(1000 * float(np.median(enc[1:])), 2),
                     "image_to_first_token_ms": round(1000 * float(np.median(first[1:])), 2)})
    return {"images": rows}


def bench(bundle_path, max_new_tokens: int = 128, draft_tokens: int | str = "auto", threads: int | None = None,
          prompts: list[str] | None = None, repeats: int = 1, ep: str = "cpu", images: list | None = None,
          spin: bool = True) -> dict:
    bundle = Bundle(bundle_path, threads=threads, ep=ep, report_placement=True, spin=spin)
    loop = TokenLoop(bundle, draft_tokens=draft_tokens)
    tok = TextTokenizer(bundle.path, bundle.manifest.tokenizer)
    ids = [tok.encode(p) for p in (prompts or BENCH_PROMPTS)] * repeats
    run_mode(loop, "warmup", ids[:1], 8, True, draft_tokens)  # first runs pay one-time allocation costs
    modes = {"plain": run_mode(loop, "plain", ids, max_new_tokens, False, 0)}
    if bundle.has_assistant:
        modes["speculative"] = run_mode(loop, "speculative", ids, max_new_tokens, True, draft_tokens)
    result = {"bundle": str(bundle_path), "max_new_tokens": max_new_tokens, "prompts": len(ids),
              "draft_tokens": draft_tokens, "spin": spin, "ep": bundle.ep, "ep_reason": bundle.ep_reason,
              "ep_profile": bundle.manifest.ep_profile, "placement": bundle.placement_report(),
              "modes": {k: v.as_dict() for k, v in modes.items()},
              "peak_rss_mb": peak_rss_mb()}
    image = bench_images(bundle, images)
    if image is not None:
        result["image"] = image
        result["peak_rss_mb"] = peak_rss_mb()
    if "speculative" in result["modes"]:
        plain = result["modes"]["plain"]["tokens_per_second"]
        spec = result["modes"]["speculative"]["tokens_per_second"]
        result["speedup"] = round(spec / plain, 3) if plain else None
    return result


def bench_eps(bundle_path, eps: list[str], **options) -> dict:
    """`bench` on each EP in turn; "table" has one row per EP: tokens/s, acceptance, node share. An EP that
    cannot run on this machine (not installed, no device) gets a row with the reason instead of numbers."""
    from edgegen.runtime.errors import EdgegenError
    from edgegen.runtime.providers import check_name, devices

    runs, unavailable = {}, {}
    for ep in eps:
        if check_name(ep) not in ("auto", "cpu"):
            try:
                devices(ep)
            except EdgegenError as exc:
                unavailable[ep] = str(exc)
                continue
        r = bench(bundle_path, ep=ep, **options)
        runs[r["ep"] if ep == "auto" else ep] = r
    table = []
    for name, r in runs.items():
        plain, spec = r["modes"]["plain"], r["modes"].get("speculative", {})
        shares = [p["share"] for p in r["placement"].values()]
        table.append({"ep": name, "plain_tokens_per_second": plain["tokens_per_second"],
                      "speculative_tokens_per_second": spec.get("tokens_per_second"),
                      "speedup": r.get("speedup"), "acceptance": spec.get("acceptance"),
                      "tokens_per_target_call": spec.get("tokens_per_target_call"),
                      "min_node_share": min(shares) if shares else None})
    if not runs:
        raise EdgegenError("; ".join(unavailable.values()))
    table += [{"ep": name, "unavailable": why} for name, why in unavailable.items()]
    return {"bundle": str(bundle_path), "eps": runs, "table": table}


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from edgegen.runtime.errors import EdgegenError

        raise EdgegenError("--plot needs matplotlib; pip install matplotlib") from None
    modes = result["modes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(modes)
    axes[0].bar(names, [modes[m]["tokens_per_second"] for m in names], color=["#888", "#2a7"][: len(names)])
    axes[0].set_title("decode tokens/s")
    split = [modes[m]["time_split"] for m in names]
    bottom = np.zeros(len(names))
    for part, color in (("target", "#36c"), ("drafter", "#2a7"), ("host", "#c63")):
        vals = np.array([s[part] for s in split])
        axes[1].bar(names, vals, bottom=bottom, label=part, color=color)
        bottom += vals
    axes[1].set_title("share of decode time")
    axes[1].legend()
    acc = modes.get("speculative", {}).get("acceptance_by_position", [])
    axes[2].bar([str(i + 1) for i in range(len(acc))], acc, color="#2a7")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("acceptance by draft position")
    fig.suptitle(f"{result['bundle']}  (speedup x{result.get('speedup')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
