"""Images in, speculative text out: the multimodal preset, the soft-token prefill, the vision tower graph,
the numpy/Pillow image processor and the image interfaces, each against transformers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from edgegen.runtime import manifest as names  # noqa: E402
from edgegen.runtime.generate import Generator  # noqa: E402
from edgegen.runtime.model import Bundle  # noqa: E402
from edgegen.runtime.prompt import SoftTokens, soft_rows  # noqa: E402

IMAGE, BOI, EOI, PAD = 258880, 255999, 258882, 0  # the real tokenizer's <|image|>, <|image>, <image|>, <pad>


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf(mm_pair):
    """transformers' target and assistant of the multimodal preset."""
    from edgegen.export.loading import load_pair

    pair = load_pair(str(mm_pair[0]), str(mm_pair[1]))
    return pair.target, pair.assistant


def _image_prompt(n: int, before: list[int], after: list[int]) -> tuple[list[int], int]:
    """Ids with one image of n soft tokens between `before` and `after`; the first placeholder's index."""
    ids = [*before, BOI, *[IMAGE] * n, EOI, *after]
    return ids, len(before) + 1


def _hf_image_features(embeddings: np.ndarray) -> dict:
    """mm_encoder_outputs for transformers' Gemma4Model: the soft tokens as the image tower's output."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=[torch.from_numpy(embeddings)])}


def _hf_greedy(hf, ids: list[int], features: dict, max_new: int, assisted: bool) -> list[int]:
    target, assistant = hf
    extra = {"assistant_model": assistant} if assisted else {}
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              mm_encoder_outputs=features, max_new_tokens=max_new, do_sample=False, **extra)
    return out[0, len(ids):].tolist()


def test_prefill_with_soft_tokens_matches_transformers(mm_bundle, hf) -> None:
    bundle = Bundle(mm_bundle, threads=1)
    hidden = bundle.manifest.model.hidden_size
    emb = np.random.default_rng(0).standard_normal((9, hidden)).astype(np.float32)
    ids, start = _image_prompt(9, [2, 105, 1000, 2000], [3000, 106, 105, 4000])
    soft = [SoftTokens(start, emb, "x")]
    with torch.no_grad():
        ref = hf[0](input_ids=torch.tensor([ids]), mm_encoder_outputs=_hf_image_features(emb)).logits[0].numpy()
    logits, _ = bundle.target.forward(bundle.new_cache(), ids, len(ids), soft=soft_rows(soft, 0, len(ids)), pad_id=PAD)
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    plain, _ = bundle.target.forward(bundle.new_cache(), ids, len(ids))  # the placeholders' own embeddings
    assert np.abs(plain - ref).max() > 0.1


@pytest.mark.parametrize(("k", "before", "n"), [(3, 3, 12), ("auto", 3, 12), (2, 200, 90)])
def test_speculative_with_soft_tokens_equals_transformers_and_plain(mm_bundle, hf, k, before: int, n: int) -> None:
    """The last case's prompt (~300 tokens) is prefilled in two calls (the ring buffers' row limit, 240 here),
    the boundary inside the soft tokens."""
    gen = Generator(Bundle(mm_bundle, threads=1))
    emb = np.random.default_rng(1).standard_normal((n, gen.bundle.manifest.model.hidden_size)).astype(np.float32)
    text = [int(t) for t in np.random.default_rng(5).integers(1000, 200000, before - 1)]
    ids, start = _image_prompt(n, [2, *text], [8000, 106, 105])
    assert before + n < 240 or start < gen.cache.max_rows < start + n
    soft = [SoftTokens(start, emb, "y")]
    ours = gen.generate(ids, 12, draft_tokens=k, soft=soft).token_ids
    gen.reset()
    plain = gen.generate(ids, 12, use_assistant=False, soft=soft).token_ids
    features = _hf_image_features(emb)
    assert ours == plain == _hf_greedy(hf, ids, features, len(ours), assisted=True)
    assert ours == _hf_greedy(hf, ids, features, len(ours), assisted=False)


def test_soft_tokens_kv_is_reused_only_for_the_same_content(mm_bundle) -> None:
    gen = Generator(Bundle(mm_bundle, threads=1))
    hidden = gen.bundle.manifest.model.hidden_size
    emb = np.random.default_rng(2).standard_normal((6, hidden)).astype(np.float32)
    ids, start = _image_prompt(6, [2, 105], [500, 106])
    first = gen.generate(ids, 4, soft=[SoftTokens(start, emb, "a")])
    follow = [*ids, *first.token_ids, 106, 105, 600]
    again = gen.generate(follow, 3, soft=[SoftTokens(start, emb, "a")])
    assert again.stats.reused_tokens == len(ids) + len(first.token_ids) - 1  # up to the last generated id
    other = gen.generate(follow, 3, soft=[SoftTokens(start, emb[::-1].copy(), "b")])
    assert other.stats.reused_tokens == start  # the same ids, another image: its K/V is recomputed
    fresh = Generator(gen.bundle).generate(follow, 3, soft=[SoftTokens(start, emb[::-1].copy(), "b")])
    assert other.token_ids == fresh.token_ids


def test_text_calls_feed_no_soft_rows_and_text_bundles_take_none(mm_bundle, bundle_dir) -> None:
    spec = Bundle(mm_bundle).manifest.graphs["target"]
    assert {names.SOFT_ROWS, names.SOFT_EMBEDS} <= {t.name for t in spec.inputs}
    text = Bundle(bundle_dir("e2b-like"))
    assert not text.target.takes_soft_tokens
    gen = Generator(text)
    from edgegen.runtime.errors import EdgegenError

    with pytest.raises(EdgegenError, match="takes no image or audio embeddings"):
        gen.generate([2, 3, 4], 2, soft=[SoftTokens(1, np.zeros((1, 128), np.float32), "z")])


def test_multimodal_preset_keeps_the_e2b_tower_structure(mm_pair) -> None:
    from transformers import AutoConfig, Gemma4AudioConfig, Gemma4VisionConfig

    from edgegen.export.testing import IMAGE_SOFT_TOKENS, load_processor

    target_dir, _ = mm_pair
    cfg = AutoConfig.from_pretrained(target_dir)
    published_vision, published_audio = Gemma4VisionConfig(), Gemma4AudioConfig()
    for field in ("patch_size", "pooling_kernel_size", "hidden_activation", "rope_parameters", "model_type"):
        assert getattr(cfg.vision_config, field) == getattr(published_vision, field), field
    for field in ("conv_kernel_size", "attention_chunk_size", "attention_context_left", "attention_logit_cap",
                  "hidden_act", "use_clipped_linears", "model_type"):
        assert getattr(cfg.audio_config, field) == getattr(published_audio, field), field
    assert cfg.vision_config.use_clipped_linears and cfg.text_config.use_bidirectional_attention is None
    assert cfg.vision_config.hidden_size < published_vision.hidden_size
    processor = load_processor(target_dir)
    assert processor.image_token_id == cfg.image_token_id and processor.audio_token_id == cfg.audio_token_id
    assert processor.image_processor.max_soft_tokens == IMAGE_SOFT_TOKENS


# -- images: preprocessing, the vision graph, prompts ------------------------------------------------------


def _images(tmp_path: Path) -> list:
    """Synthetic images of different sizes, aspect ratios and modes (files and Pillow images)."""
    from PIL import Image

    rng = np.random.default_rng(7)

    def noise(h: int, w: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    smooth = np.clip(np.add.outer(np.arange(300), np.arange(420)) // 3, 0, 255).astype(np.uint8)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(noise(333, 500)).save(jpeg, quality=90)
    rgba = tmp_path / "alpha.png"
    Image.fromarray(noise(97, 211, 4)).save(rgba)
    return [jpeg, rgba, Image.fromarray(noise(48, 48)), Image.fromarray(noise(640, 90)),  # tiny, very tall
            Image.fromarray(np.stack([smooth] * 3, -1)), Image.fromarray(noise(1200, 1600)),  # smooth, large
            Image.fromarray(noise(31, 700)).convert("P"), Image.fromarray(noise(150, 120, 1))]  # palette, grey


def test_preprocessing_matches_transformers_image_processor(mm_pair, tmp_path) -> None:
    from PIL import Image

    from edgegen.export.loading import load_pair
    from edgegen.export.testing import load_processor
    from edgegen.export.vision import processor_settings
    from edgegen.runtime.vision import preprocess

    processor = load_processor(mm_pair[0]).image_processor
    settings = processor_settings(load_pair(str(mm_pair[0]), str(mm_pair[1])))
    sizes = set()
    for image in _images(tmp_path):
        ref = processor(images=[Image.open(image) if isinstance(image, Path) else image], return_tensors="np")
        ours = preprocess(image, settings)
        n = ours.pixel_values.shape[0]
        assert ref["num_soft_tokens_per_image"][0] == ours.soft_tokens
        assert np.abs(ref["pixel_values"][0, :n] - ours.pixel_values).max() <= 1e-6
        assert (ref["image_position_ids"][0, :n] == ours.positions).all()
        assert (ref["image_position_ids"][0, n:] == -1).all()  # the rest is the processor's padding
        sizes.add((ours.positions[:, 0].max() + 1, ours.positions[:, 1].max() + 1))
    assert len(sizes) >= 5  # patch grids of different shapes


def test_image_prompt_ids_and_output_equal_transformers(mm_bundle, mm_pair, hf, tmp_path) -> None:
    """Raw prompts: the ids equal Gemma4Processor's; greedy speculative == transformers' assisted generate ==
    plain decoding."""
    from edgegen.export.testing import load_processor

    processor = load_processor(mm_pair[0])
    gen = Generator(Bundle(mm_bundle, threads=1))
    images = _images(tmp_path)[:2]
    prompt = "Compare <|image|> with <|image|>: which"
    inputs = processor(text=prompt, images=[_pil(i) for i in images], return_tensors="pt")
    result = gen.generate(prompt, 10, images=images, draft_tokens=3)
    assert _prompt_ids(gen, prompt, images) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf[0].generate(**inputs, assistant_model=hf[1], max_new_tokens=len(result.token_ids), do_sample=False)
    assert result.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()
    gen.reset()
    assert gen.generate(prompt, 10, images=images, use_assistant=False).token_ids == result.token_ids
    assert result.stats.image_encode_s > 0


def _pil(image):
    from PIL import Image

    return Image.open(image) if isinstance(image, Path) else image


def _prompt_ids(gen: Generator, prompt: str, images: list) -> list[int]:
    vision = gen.bundle.vision
    return gen.tokenizer.encode(vision.expand(prompt, [vision.preprocess(i) for i in images]))


def test_chat_with_image_parts_equals_transformers_and_reuses_kv(mm_bundle, mm_pair, hf, tmp_path) -> None:
    from edgegen.export.testing import load_processor

    processor = load_processor(mm_pair[0])
    image = _images(tmp_path)[0]
    gen = Generator(Bundle(mm_bundle, threads=1))
    turn = [{"type": "image", "image": str(image)}, {"type": "text", "text": "What is shown?"}]
    first = gen.collect(gen.chat(turn, 8, draft_tokens=3))
    messages = [{"role": "user", "content": [{"type": "image", "image": _pil(image)},
                                             {"type": "text", "text": "What is shown?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert first.stats.prompt_tokens == n
    with torch.no_grad():
        ref = hf[0].generate(**inputs, assistant_model=hf[1], max_new_tokens=len(first.token_ids), do_sample=False)
    assert first.token_ids == ref[0, n:].tolist()
    second = gen.collect(gen.chat("And the colours?", 4))
    image_end = inputs["input_ids"][0].tolist().index(EOI) + 1
    # The image's K/V are not recomputed (the prompts part where the template drops the first turn's empty
    # thinking channel, after the image)
    assert second.stats.reused_tokens >= image_end
    assert second.stats.image_encode_s == 0.0  # nor the image: its soft tokens are cached


# -- bad input: one line each, nothing else runs -----------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-images")
    good = root / "good.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(good)
    out = {"good": good, "missing": root / "missing.png", "corrupt": root / "corrupt.jpg",
           "truncated": root / "truncated.jpg", "huge": root / "huge.png", "float": root / "float.tiff",
           "16-bit": root / "deep.png", "empty": root / "empty.png"}
    out["corrupt"].write_bytes(np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    Image.new("1", (9000, 8000)).save(out["huge"])  # 72 Mpx, a few KB on disk
    Image.new("F", (64, 64)).save(out["float"])
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(out["16-bit"])
    out["empty"].write_bytes(b"")
    return out


IMAGE_ERRORS = {  # image -> words of its one-line error
    "missing": "cannot read image", "corrupt": "not an image Pillow can decode", "truncated": "damaged or truncated",
    "huge": "more than the 64 Mpx", "float": "convert the image to 8-bit RGB", "16-bit": "convert the image to 8-bit",
    "empty": "not an image Pillow can decode",
}


@pytest.mark.parametrize("case", list(IMAGE_ERRORS))
def test_api_bad_image_is_one_error_line(mm_bundle, bad_images, case: str) -> None:
    from edgegen.runtime.errors import EdgegenError

    gen = Generator(Bundle(mm_bundle, threads=1))
    with pytest.raises(EdgegenError, match=IMAGE_ERRORS[case]) as err:
        gen.generate("Look: <|image|>", 3, images=[bad_images[case]])
    assert "\n" not in str(err.value)
    assert gen.processed == []  # nothing ran
    with pytest.raises(EdgegenError, match=IMAGE_ERRORS[case]):
        list(gen.chat("What is it?", 3, images=[bad_images["good"], bad_images[case]]))
    assert gen.messages == [] and gen.processed == []  # the turn that never ran is not in the conversation


def test_api_image_prompt_mistakes(mm_bundle, bundle_dir, bad_images) -> None:
    from edgegen.runtime.errors import EdgegenError

    gen = Generator(Bundle(mm_bundle, threads=1))
    good = bad_images["good"]
    with pytest.raises(EdgegenError, match=re.escape("has 2 <|image|> placeholder(s) for 1 image(s)")):
        gen.generate("<|image|> and <|image|>", 3, images=[good])
    with pytest.raises(EdgegenError, match="this bundle holds 512"):
        gen.generate("Many: " + "<|image|>" * 9, 3, images=[good] * 9)  # 9 x (60 + 2) tokens > 512
    with pytest.raises(EdgegenError, match="has no vision graph"):
        Generator(bundle_dir("e2b-like")).generate("<|image|>", 3, images=[good])
    assert gen.processed == []


def _edgegen(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgegen", *args], capture_output=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", ["truncated", "too many", "no vision graph"])  # the rest: the API test above
def test_cli_bad_image_is_one_error_line(mm_bundle, bundle_dir, bad_images, case: str) -> None:
    images = [bad_images["good"]] * 9 if case == "too many" else [bad_images.get(case, bad_images["good"])]
    bundle = bundle_dir("e2b-like") if case == "no vision graph" else mm_bundle
    proc = _edgegen("run", str(bundle), "-p", "What is shown?", "-n", "3",
                    *(arg for image in images for arg in ("--image", str(image))))
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0 and "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:"), stderr
    assert proc.stdout == b""  # nothing was generated


def test_cli_run_and_bench_with_an_image(mm_bundle, bad_images) -> None:
    import json

    proc = _edgegen("run", str(mm_bundle), "--image", str(bad_images["good"]), "-p", "What is shown?", "-n", "4",
                    "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) >= 1 and out["stats"]["image_encode_s"] > 0
    proc = _edgegen("bench", str(mm_bundle), "-n", "4", "--image", str(bad_images["good"]), "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["image"]["images"]
    assert row["soft_tokens"] > 0 and 0 < row["encode_ms"] < row["image_to_first_token_ms"]


def test_quantized_exports_get_an_int8_vision_graph_within_its_bound(mm_pair, tmp_path) -> None:
    """The tower of an int8/int4 export (the preset's text model is too narrow for MatMulNBits blocks, so the
    graph is built alone) is int8, and its soft tokens stay within the export's SNR bound of PyTorch's."""
    from edgegen.export.graphs import PROFILES
    from edgegen.export.loading import load_pair
    from edgegen.export.onnx_graph import WeightFile
    from edgegen.export.quantize import Quant
    from edgegen.export.vision import MIN_VISION_SQNR_DB, build_vision_graph, verify_vision, vision_quant

    quant = vision_quant(Quant("int4"))
    assert quant.kind == "int8" and vision_quant(Quant("fp32")).kind == "fp32"
    pair = load_pair(str(mm_pair[0]), str(mm_pair[1]))
    shared = WeightFile(tmp_path / "shared.weights")
    graph = build_vision_graph(pair, quant, tmp_path, shared, PROFILES["cpu"])
    graph.save(tmp_path)
    graph.data.close()
    shared.close()
    report = verify_vision(pair, tmp_path / "vision.onnx", quant)
    assert report["vision_soft_tokens"]["passed"] and report["vision_sqnr_db"] >= MIN_VISION_SQNR_DB
    assert report["vision_max_rel_diff"] > 1e-5  # int8 weights really are in the graph


def test_vision_files_are_covered_by_the_integrity_check(mm_bundle, tmp_path) -> None:
    import shutil

    from edgegen.runtime.errors import EdgegenError

    damaged = Path(shutil.copytree(mm_bundle, tmp_path / "damaged"))
    data = bytearray((damaged / "vision.weights").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "vision.weights").write_bytes(bytes(data))
    with pytest.raises(EdgegenError, match="vision.weights"):
        Bundle(damaged, hashes="always")
