"""load_pair: good pairs load as the PyTorch oracle; any bad input a user can pass is one EdgegenError line.

Each bad case names what the message must say, so a message that stops naming the problem (or a case that
starts leaking a traceback) fails here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Gemma4TextModel

from edgegen.export.loading import check_pair, load_pair, read_config
from edgegen.export.testing import PRESETS, build_assistant, build_target
from edgegen.runtime.errors import EdgegenError

PairDir = Callable[..., tuple[Path, Path]]


@pytest.mark.parametrize(
    ("preset", "centroid_head", "conditional"),
    [
        ("e2b-like", True, False),
        ("e4b-like", True, False),
        ("e2b-like", True, True),  # Gemma4ForConditionalGeneration target
        ("e2b-like", False, False),  # assistant without the centroid head
    ],
)
def test_load_pair_loads_the_saved_weights(
    pair_dir: PairDir, preset: str, centroid_head: bool, conditional: bool
) -> None:
    target_dir, assistant_dir = pair_dir(preset, centroid_head=centroid_head, conditional=conditional)
    pair = load_pair(str(target_dir), str(assistant_dir), draft_tokens=3)
    expected_class = "Gemma4ForConditionalGeneration" if conditional else "Gemma4ForCausalLM"
    assert type(pair.target).__name__ == expected_class
    assert isinstance(pair.text_model, Gemma4TextModel)
    assert pair.text_config.hidden_size == PRESETS[preset].hidden_size
    assert pair.assistant.config.use_ordered_embeddings is centroid_head
    assert pair.assistant.generation_config.num_assistant_tokens == 3
    assert not pair.target.training and not pair.assistant.training
    # Weights are the saved ones, not a fresh init of keys the loader failed to match.
    built = build_target(preset, seed=0, conditional=conditional).state_dict()
    loaded = pair.target.state_dict()
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[name], built[name]) for name in built)


def _copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of a session pair directory, safe to corrupt."""
    return Path(shutil.copytree(src, tmp_path / src.parent.name / src.name))


def _edit_config(model_dir: Path, **changes: object) -> None:
    cfg_file = model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def _assistant_for(tmp_path: Path, **preset_changes: object) -> Path:
    """An assistant built for an e2b-like target that differs only in `preset_changes`."""
    out = tmp_path / "other-assistant"
    build_assistant(dataclasses.replace(PRESETS["e2b-like"], **preset_changes)).save_pretrained(out)
    return out


def _missing(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return tmp / "no-such-model", a


def _a_file(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t / "model.safetensors", a


def _no_config(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    (target / "config.json").unlink()
    return target, a


def _invalid_json(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    (target / "config.json").write_text('{"model_type": "gemma4_text",')
    return target, a


def _json_not_an_object(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    (target / "config.json").write_text("[]")
    return target, a


def _llama(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    _edit_config(target, model_type="llama")
    return target, a


def _swapped(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return a, t


def _target_as_assistant(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t, t


def _backbone_hidden(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    assistant = _copy(a, tmp)
    _edit_config(assistant, backbone_hidden_size=96)
    return t, assistant


def _e4b_assistant(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t, pair_dir("e4b-like")[1]


def _kv_heads(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t, _assistant_for(tmp, num_kv_heads=2)


def _sliding_head_dim(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t, _assistant_for(tmp, head_dim=64)


def _full_head_dim(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    return t, _assistant_for(tmp, global_head_dim=128)


def _no_safetensors(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    (target / "model.safetensors").rename(target / "model.bin")
    return target, a


def _truncated_target(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target, a


def _truncated_assistant(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    assistant = _copy(a, tmp)
    weights = assistant / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return t, assistant


def _garbage(t: Path, a: Path, tmp: Path, pair_dir: PairDir) -> tuple[Path, Path]:
    target = _copy(t, tmp)
    weights = target / "model.safetensors"
    noise = torch.randint(0, 256, (weights.stat().st_size,), generator=torch.Generator().manual_seed(0))
    weights.write_bytes(noise.to(torch.uint8).numpy().tobytes())
    return target, a


# (make the bad pair, fragments the one-line message must contain)
BAD_PAIRS: dict[str, tuple[Callable[..., tuple[Path, Path]], tuple[str, ...]]] = {
    "nonexistent path": (_missing, ("target", "no-such-model", "does not exist")),
    "path is a file": (_a_file, ("target", "model.safetensors", "is a file")),
    "no config.json": (_no_config, ("target", "no config.json")),
    "invalid json": (_invalid_json, ("target", "config.json", "not valid JSON")),
    "json not an object": (_json_not_an_object, ("target", "config.json", "not a JSON object")),
    "not gemma": (_llama, ("target", "'llama'", "not a Gemma 4 model")),
    "swapped pair": (_swapped, ("target is a Gemma 4 assistant", "gemma4_assistant", "target first")),
    "target as assistant": (_target_as_assistant, ("assistant", "gemma4_text", "not a Gemma 4 assistant")),
    "backbone hidden size": (_backbone_hidden, ("mismatched pair", "backbone_hidden_size", "96 != 128")),
    "e4b assistant on e2b": (_e4b_assistant, ("mismatched pair", "backbone_hidden_size", "160 != 128")),
    "kv heads": (_kv_heads, ("mismatched pair", "num_key_value_heads", "2 != 1")),
    "sliding head_dim": (_sliding_head_dim, ("mismatched pair", "sliding_attention head_dim", "64 != 32")),
    "full head_dim": (_full_head_dim, ("mismatched pair", "full_attention head_dim", "128 != 64")),
    "no safetensors": (_no_safetensors, ("target", "no .safetensors")),
    "truncated target": (_truncated_target, ("target", "model.safetensors", "truncated")),
    "truncated assistant": (_truncated_assistant, ("assistant", "model.safetensors", "truncated")),
    "garbage weights": (_garbage, ("target", "model.safetensors", "corrupt")),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_input_is_one_line_naming_the_problem(case: str, pair_dir: PairDir, tmp_path: Path) -> None:
    make, fragments = BAD_PAIRS[case]
    target, assistant = make(*pair_dir("e2b-like"), tmp_path, pair_dir)
    with pytest.raises(EdgegenError) as info:
        load_pair(str(target), str(assistant))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(("global_head_dim", "mismatch"), [(64, False), (128, True)])
def test_check_pair_reads_a_hand_written_global_head_dim(
    pair_dir: PairDir, global_head_dim: int, mismatch: bool
) -> None:
    """Hub configs say `global_head_dim`; configs saved by transformers say `per_layer_config`. Both count."""
    target_dir, assistant_dir = pair_dir("e2b-like")
    target_cfg, assistant_cfg = read_config(target_dir, "target"), read_config(assistant_dir, "assistant")
    text = assistant_cfg["text_config"]
    del text["per_layer_config"]
    text["global_head_dim"] = global_head_dim
    if mismatch:
        with pytest.raises(EdgegenError, match="full_attention head_dim .*: 128 != 64"):
            check_pair(target_cfg, assistant_cfg)
    else:
        check_pair(target_cfg, assistant_cfg)


@pytest.mark.parametrize(("error", "says"), [
    ("GatedRepoError", ["gated", "accept its license", "huggingface.co/google/gemma-4-E2B-it", "hf auth login",
                        "HF_TOKEN"]),
    ("RepositoryNotFoundError", ["no model of that id", "private", "hf auth login"]),
    ("LocalEntryNotFoundError", ["cannot be reached", "pass a model directory"]),
    ("ConnectionError", ["ConnectionError", "network"]),
])
def test_hub_failures_are_one_line_naming_what_to_do(monkeypatch: pytest.MonkeyPatch, error: str,
                                                      says: list[str]) -> None:
    """Instances of the hub library's own error classes, raised where snapshot_download would raise them."""
    import huggingface_hub
    import huggingface_hub.errors as hub_errors

    from edgegen.export.loading import resolve

    cls = getattr(hub_errors, error, None) or ConnectionError

    def fail(*args, **kwargs):
        raise cls.__new__(cls)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(EdgegenError) as info:
        resolve("google/gemma-4-E2B-it", "target")
    message = str(info.value)
    assert "\n" not in message and message.startswith("target 'google/gemma-4-E2B-it'")
    for part in says:
        assert part in message, message
