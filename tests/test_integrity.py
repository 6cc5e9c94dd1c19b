"""Untrusted bundles: nothing in a bundle reaches outside its directory, and damage is named before anything runs.

Every refused bundle here is refused before onnxruntime opens a single model (a patched InferenceSession
fails the test if it is called). The sha256 check is streamed and cached per file identity; the cache
tests count real hashing calls.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from edgegen.runtime import integrity
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import MANIFEST, load_manifest
from edgegen.runtime.model import Bundle


@pytest.fixture(scope="module")
def good(bundle_dir) -> Path:
    return bundle_dir("e2b-like")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch) -> None:
    """Each test starts with an empty "already verified" cache."""
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_sessions(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("onnxruntime opened a model of a bundle that should have been refused")

    monkeypatch.setattr("edgegen.runtime.model.ort.InferenceSession", refuse)


def copy_bundle(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    raw = json.loads((bundle / MANIFEST).read_text())
    change(raw)
    (bundle / MANIFEST).write_text(json.dumps(raw))


def relist(bundle: Path, name: str) -> None:
    """Record a changed file's size and hash, as a bundle made to look intact would."""
    path = bundle / name

    def change(raw: dict) -> None:
        raw["files"][name] = {"bytes": path.stat().st_size, "sha256": integrity.sha256_file(path)}

    edit_manifest(bundle, change)


def set_location(bundle: Path, graph: str, location: str) -> None:
    """Point every external-data entry of `graph` at `location` (weights untouched) and relist the graph."""
    model = onnx.load(str(bundle / graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (bundle / graph).write_bytes(model.SerializeToString())
    relist(bundle, graph)


def refused(bundle: Path) -> str:
    with pytest.raises(EdgegenError) as info:
        Bundle(bundle)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- the protobuf reader agrees with onnx ----------------------------------------------------------------


def test_external_locations_match_onnx(good: Path) -> None:
    for spec in load_manifest(good).graphs.values():
        model = onnx.load(str(good / spec.file), load_external_data=False)
        expected = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        assert expected and integrity.external_locations((good / spec.file).read_bytes()) == expected


def test_external_data_hidden_in_a_subgraph_constant_is_found() -> None:
    """Tensors can also sit in node attributes (Constant) and in subgraphs (If branches)."""
    def external(name: str, location: str) -> onnx.TensorProto:
        t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "4")):
            t.external_data.add(key=key, value=value)
        return t

    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    branch = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["y"], value=external("c", "/etc/x"))],
                                    "branch", [], [out])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    cond = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    graph = onnx.helper.make_graph([node], "g", [cond], [out], initializer=[external("w", "../w.bin")])
    found = integrity.external_locations(onnx.helper.make_model(graph).SerializeToString())
    assert sorted(e["location"] for e in found) == ["../w.bin", "/etc/x", "/etc/x"]


def test_garbage_graph_file_is_one_line(good: Path, tmp_path: Path, no_sessions) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    (bundle / "assistant.onnx").write_bytes(b"\xff" * 100)
    relist(bundle, "assistant.onnx")
    assert "not a valid ONNX model" in refused(bundle)


# -- paths that escape the bundle ---------------------------------------------------------------------------


def _graph_file_up(b: Path, tmp: Path) -> None:
    shutil.copy(b / "target.onnx", tmp / "target.onnx")
    edit_manifest(b, lambda raw: raw["graphs"]["target"].update(file="../target.onnx"))


def _graph_file_absolute(b: Path, tmp: Path) -> None:
    edit_manifest(b, lambda raw: raw["graphs"]["target"].update(file=str(b / "target.onnx")))


def _ple_up(b: Path, tmp: Path) -> None:
    edit_manifest(b, lambda raw: raw["model"]["ple"].update(file="../../ple.npy"))


def _chat_template_up(b: Path, tmp: Path) -> None:
    edit_manifest(b, lambda raw: raw["tokenizer"].update(chat_template="../secret.jinja"))


def _listed_file_up(b: Path, tmp: Path) -> None:
    edit_manifest(b, lambda raw: raw["files"].update({"../outside.bin": {"bytes": 1, "sha256": "0" * 64}}))


def _weights_symlink_out(b: Path, tmp: Path) -> None:
    """Same bytes, so size and hash match: only the link itself is wrong."""
    shutil.move(b / "target.weights", tmp / "target.weights")
    (b / "target.weights").symlink_to(tmp / "target.weights")


def _tokenizer_symlink_out(b: Path, tmp: Path) -> None:
    shutil.move(b / "tokenizer.json", tmp / "tokenizer.json")
    (b / "tokenizer.json").symlink_to("../tokenizer.json")


def _external_data_up(b: Path, tmp: Path) -> None:
    shutil.copy(b / "target.weights", tmp / "target.weights")
    set_location(b, "target.onnx", "../target.weights")


def _external_data_absolute(b: Path, tmp: Path) -> None:
    shutil.copy(b / "target.weights", tmp / "target.weights")
    set_location(b, "target.onnx", str(tmp / "target.weights"))


ESCAPES = {
    "graph file ../": (_graph_file_up, "outside the bundle"),
    "graph file absolute": (_graph_file_absolute, "outside the bundle"),
    "PLE table ../../": (_ple_up, "outside the bundle"),
    "chat template ../": (_chat_template_up, "outside the bundle"),
    "listed file ../": (_listed_file_up, "outside the bundle"),
    "weights symlink to outside": (_weights_symlink_out, "outside the bundle"),
    "tokenizer symlink to outside": (_tokenizer_symlink_out, "outside the bundle"),
    "external data ../": (_external_data_up, "outside the bundle"),
    "external data absolute": (_external_data_absolute, "outside the bundle"),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_escaping_path_is_refused_before_anything_opens(case: str, good: Path, tmp_path: Path, no_sessions) -> None:
    make, words = ESCAPES[case]
    bundle = copy_bundle(good, tmp_path / "d" / "bundle")
    make(bundle, tmp_path / "d")
    assert words in refused(bundle)


def test_external_data_in_an_unlisted_file_is_refused(good: Path, tmp_path: Path, no_sessions) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    shutil.copy(bundle / "target.weights", bundle / "extra.weights")
    set_location(bundle, "target.onnx", "extra.weights")
    assert "does not list" in refused(bundle)


def test_a_bundle_reached_through_a_symlink_loads(good: Path, tmp_path: Path) -> None:
    """Links are judged after resolving the bundle directory itself: no false alarm for a linked bundle."""
    link = tmp_path / "link"
    link.symlink_to(good)
    assert Bundle(link).manifest == load_manifest(good)


# -- damaged files ------------------------------------------------------------------------------------------


def _flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("name", ["target.weights", "shared.weights", "ple.npy", "tokenizer.json", "target.onnx"])
def test_one_flipped_bit_is_named(name: str, good: Path, tmp_path: Path, no_sessions) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    _flip_byte(bundle / name)
    message = refused(bundle)
    assert name in message and "sha256" in message


def test_truncated_and_missing_files_are_named(good: Path, tmp_path: Path, no_sessions) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    with (bundle / "assistant.weights").open("r+b") as fh:
        fh.truncate(100)
    message = refused(bundle)
    assert "assistant.weights" in message and "100 bytes" in message
    (bundle / "assistant.weights").unlink()
    assert "'assistant.weights' is missing" in refused(bundle)


def test_a_file_without_a_recorded_hash_is_refused(good: Path, tmp_path: Path, no_sessions) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    edit_manifest(bundle, lambda raw: raw["files"].pop("draft_round.onnx"))
    assert "not listed with a size and sha256" in refused(bundle)


# -- the hash cache -----------------------------------------------------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = integrity.sha256_file

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        calls.append(path.name)
        return real(path, chunk)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


def test_hashes_are_checked_once_per_file_change(good: Path, tmp_path: Path, hash_calls: list[str]) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    listed = set(load_manifest(bundle).files)
    Bundle(bundle)
    assert set(hash_calls) == listed  # first load: everything hashed
    hash_calls.clear()
    Bundle(bundle)
    assert hash_calls == []  # second load: sizes only
    # A change is seen even when the file keeps its size and its mtime is put back (ctime moves on).
    _flip_byte(bundle / "shared.weights", keep_mtime=True)
    assert "shared.weights" in refused(bundle)
    assert hash_calls == ["shared.weights"]


def test_hash_modes(good: Path, tmp_path: Path, hash_calls: list[str]) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    Bundle(bundle, hashes="never")
    assert hash_calls == []
    Bundle(bundle, hashes="always")
    Bundle(bundle, hashes="always")
    assert len(hash_calls) == 2 * len(load_manifest(bundle).files)
    with (bundle / "ple.npy").open("r+b") as fh:
        fh.truncate(10)
    assert "ple.npy" in refused(bundle)  # sizes are checked in every mode
    with pytest.raises(EdgegenError, match="hashes="):
        Bundle(good, hashes="sometimes")


def test_unwritable_cache_only_means_hashing_again(good: Path, tmp_path: Path, monkeypatch,
                                                   hash_calls: list[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("EDGEGEN_CACHE", str(blocker))
    Bundle(good)
    Bundle(good)
    assert len(hash_calls) == 2 * len(load_manifest(good).files)


# -- manifest fields with impossible values -----------------------------------------------------------------

BAD_FIELDS = {
    "vocab_size string": (lambda r: r["model"].update(vocab_size="big"), "model.vocab_size"),
    "negative kv_heads": (lambda r: r["model"]["kv_buffers"][0].update(kv_heads=-1), "model.kv_buffers"),
    "unknown layer kind": (lambda r: r["model"]["layer_types"].append("moe"), "model.layer_types"),
    "eos outside vocab": (lambda r: r["generation"].update(eos_token_ids=[10**9]), "generation.eos_token_ids"),
    "alias to no buffer": (lambda r: r["graphs"]["target"]["kv_aliases"].update({"present_key.0": "past_key.99"}),
                           "graphs.kv_aliases"),
    "sha256 not hex": (lambda r: r["files"]["target.onnx"].update(sha256="abc"), "files"),
    "bytes negative": (lambda r: r["files"]["target.onnx"].update(bytes=-5), "files"),
    "draft round without tokens": (
        lambda r: r["graphs"]["draft_round"].update(outputs=[o for o in r["graphs"]["draft_round"]["outputs"]
                                                             if o["name"] != "tokens"]),
        "graphs.draft_round.outputs"),
    "huge max_context": (lambda r: r["model"].update(max_context=1 << 30), "model.max_context"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_impossible_manifest_field_is_named(case: str, good: Path, tmp_path: Path) -> None:
    change, field = BAD_FIELDS[case]
    bundle = tmp_path / "b"
    bundle.mkdir()
    shutil.copy(good / MANIFEST, bundle / MANIFEST)
    edit_manifest(bundle, change)
    with pytest.raises(EdgegenError) as info:
        load_manifest(bundle)
    assert f"({field})" in str(info.value) and "\n" not in str(info.value)


def test_kv_cache_larger_than_memory_is_refused(good: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(good, tmp_path / "b")
    edit_manifest(bundle, lambda raw: raw["model"].update(max_context=1 << 24))
    edit_manifest(bundle, lambda raw: [b.update(kv_heads=4096, head_dim=16384) for b in raw["model"]["kv_buffers"]])
    assert "KV cache" in refused_cache(bundle)


def refused_cache(bundle: Path) -> str:
    with pytest.raises(EdgegenError) as info:
        Bundle(bundle).new_cache()
    return str(info.value)
