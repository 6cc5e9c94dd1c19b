"""Images in, speculative text out: the multimodal preset, the soft-token prefill, the vision tower graph,
the numpy/Pillow image processor and the image interfaces, each against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgegen.export.testing import save_multimodal_pair

    return save_multimodal_pair(tmp_path_factory.mktemp("multimodal"))


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
