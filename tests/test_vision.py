"""Images in, speculative text out: the multimodal preset, the soft-token prefill, the vision tower graph,
the numpy/Pillow image processor and the image interfaces, each against transformers."""

from __future__ import annotations

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
def mm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgegen.export.testing import save_multimodal_pair

    return save_multimodal_pair(tmp_path_factory.mktemp("multimodal"))


@pytest.fixture(scope="module")
def mm_bundle(mm_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal preset exported (fp32, verified) once for this module."""
    from edgegen.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("mm-bundle") / "bundle"
    export_bundle(str(mm_pair[0]), str(mm_pair[1]), out, ExportOptions(max_context=512))
    return out


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


@pytest.mark.parametrize("k", [3, "auto"])
def test_speculative_with_soft_tokens_equals_transformers_and_plain(mm_bundle, hf, k) -> None:
    gen = Generator(Bundle(mm_bundle, threads=1))
    emb = np.random.default_rng(1).standard_normal((12, gen.bundle.manifest.model.hidden_size)).astype(np.float32)
    ids, start = _image_prompt(12, [2, 105, 7000], [8000, 106, 105])
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
