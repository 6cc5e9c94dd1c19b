"""The bundle contract (runtime.manifest): what export writes is what the runtime reads, and it is true.

Round trip through JSON; every way a manifest can be unreadable is one EdgegenError line; and for real
bundles the manifest agrees with the files beside it: graph IO, KV aliases, store layers, sizes, hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from edgegen.export.graphs import PROFILES, ring_length
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import MANIFEST, load_manifest

# (preset, target quant): fp32 for both families, and a quantized bundle (its PLE has a scales file).
BUNDLES = [("e2b-like", "fp32"), ("e4b-like", "fp32"), ("e2b-like", "int4")]


@pytest.fixture(params=BUNDLES, ids=[f"{p}-{q}" for p, q in BUNDLES])
def bundle(request, bundle_dir) -> Path:
    preset, quant = request.param
    return bundle_dir(preset, quant=quant)


def test_round_trip(bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(bundle)
    on_disk = json.loads((bundle / MANIFEST).read_text())
    assert json.loads(manifest.to_json()) == on_disk  # nothing is dropped or renamed on the way in
    (tmp_path / MANIFEST).write_text(manifest.to_json())
    assert load_manifest(tmp_path) == manifest


# -- unreadable manifests: each makes a bad bundle dir from a good manifest's JSON -----------------------


def _missing_dir(tmp: Path, good: dict) -> Path:
    return tmp / "no-such-bundle"


def _a_file(tmp: Path, good: dict) -> Path:
    path = tmp / "bundle.zip"
    path.write_bytes(b"PK")
    return path


def _no_manifest(tmp: Path, good: dict) -> Path:
    return tmp


def _write(tmp: Path, text: str) -> Path:
    (tmp / MANIFEST).write_text(text)
    return tmp


def _invalid_json(tmp: Path, good: dict) -> Path:
    return _write(tmp, json.dumps(good)[:-10])


def _json_list(tmp: Path, good: dict) -> Path:
    return _write(tmp, json.dumps([good]))


def _future_schema(tmp: Path, good: dict) -> Path:
    return _write(tmp, json.dumps({**good, "schema_version": 999}))


def _kv_buffers(**change) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, good: dict) -> Path:
        model = {**good["model"], "kv_buffers": [{**b, **change} for b in good["model"]["kv_buffers"]]}
        return _write(tmp, json.dumps({**good, "model": model}))

    return make


def _no_model(tmp: Path, good: dict) -> Path:
    return _write(tmp, json.dumps({k: v for k, v in good.items() if k != "model"}))


# (make the bad bundle, fragments the message must contain)
BAD_MANIFESTS: dict[str, tuple[Callable[[Path, dict], Path], tuple[str, ...]]] = {
    "missing dir": (_missing_dir, ("no-such-bundle", "does not exist")),
    "file instead of dir": (_a_file, ("bundle.zip", "not a directory")),
    "no manifest.json": (_no_manifest, ("no manifest.json",)),
    "invalid json": (_invalid_json, ("not valid JSON",)),
    "json list": (_json_list, ("not an edgegen manifest",)),
    "schema version 999": (_future_schema, ("999", "not supported")),
    "no model key": (_no_model, ("'model'", "re-export")),
    "kv buffer dtype": (_kv_buffers(dtype="int8"), ("model.kv_buffers", "re-export")),
    "kv ring longer than the context": (_kv_buffers(length=1 << 20), ("model.kv_buffers", "re-export")),
    "kv length neither rows nor max_context": (_kv_buffers(length="all"), ("model.kv_buffers", "re-export")),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_unreadable_manifest_is_one_line(case: str, bundle_dir, tmp_path: Path) -> None:
    make, fragments = BAD_MANIFESTS[case]
    good = json.loads((bundle_dir("e2b-like") / MANIFEST).read_text())
    with pytest.raises(EdgegenError) as info:
        load_manifest(make(tmp_path, good))
    message = str(info.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_schema_1_bundles_load_with_full_length_float32_buffers(bundle_dir, tmp_path: Path) -> None:
    """Schema 1 had no KV buffer length or dtype: such a manifest still loads, as max_context rows of
    float32 (what its graphs were exported with)."""
    good = json.loads((bundle_dir("e2b-like") / MANIFEST).read_text())
    assert good["schema_version"] == 2
    old = [{k: v for k, v in b.items() if k not in ("length", "dtype")} for b in good["model"]["kv_buffers"]]
    manifest = load_manifest(_write(tmp_path, json.dumps({**good, "schema_version": 1,
                                                          "model": {**good["model"], "kv_buffers": old}})))
    assert {(b.length, b.dtype) for b in manifest.model.kv_buffers} == {("max_context", "float32")}


# -- the manifest tells the truth about the bundle ---------------------------------------------------------


def _io(values) -> list[tuple[str, str, list]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        out.append((v.name, dtype, [d.dim_param or d.dim_value for d in t.shape.dim]))
    return out


def test_every_graph_input_and_output_is_listed(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    assert {"target", "assistant"} <= set(manifest.graphs)
    for name, spec in manifest.graphs.items():
        graph = onnx.load(str(bundle / spec.file), load_external_data=False).graph
        assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == _io(graph.input), name
        assert [(t.name, t.dtype, t.shape) for t in spec.outputs] == _io(graph.output), name


def test_graph_io_is_named_by_the_manifest_module(bundle: Path) -> None:
    """Every tensor of the graphs is one manifest.py names: an IO constant (with the dtype it gives it), a K/V
    buffer, or a present output; the name helpers invert each other."""
    from edgegen.runtime import manifest as names

    m = load_manifest(bundle)
    buffers = {n for b in m.model.kv_buffers for n in (b.name, names.value_buffer(b.name))}
    steps = [""] + [names.draft_step(i) for i in range(m.generation["draft_tokens"])]
    presents = {n for layer in range(len(m.model.layer_types)) for s in steps for n in names.present_kv(layer, s)}
    for spec in m.graphs.values():
        for t in spec.inputs + spec.outputs:
            assert t.name in names.DTYPES or t.name in buffers or t.name in presents, t.name
            assert t.name not in names.DTYPES or t.dtype == names.DTYPES[t.name], (t.name, t.dtype)
    assert names.buffer_of(names.new_kv(3)[1]) == names.past_kv(3)[1] and names.buffer_of(names.LOGITS) is None
    assert names.mask_kind(names.mask_input("full_attention")) == "full_attention" and names.mask_kind("x.y") is None
    assert names.is_buffer(names.past_kv(2)[1]) and not names.is_buffer(names.present_kv(2)[0])


def test_kv_aliases_bind_every_present_output_to_a_target_buffer(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    target_inputs = {t.name: t for t in manifest.graphs["target"].inputs}
    buffers = {b.name for b in manifest.model.kv_buffers}
    buffers |= {name.replace("past_key", "past_value") for name in buffers}
    assert buffers == {name for name in target_inputs if name.startswith("past_")}
    for name, spec in manifest.graphs.items():
        outputs = {t.name: t for t in spec.outputs}
        inputs = {t.name for t in spec.inputs}
        assert set(spec.kv_aliases) == {o for o in outputs if o.startswith("present_")}, name
        for present, past in spec.kv_aliases.items():
            assert past in target_inputs and past in inputs, f"{name}: {present} -> {past}"
            # key -> key, value -> value
            assert present.split(".")[0].replace("present", "past") == past.split(".")[0]
            assert outputs[present].shape == target_inputs[past].shape
    # The assistant owns no K/V: all it touches are the target's store buffers (and it writes none of them
    # where attention reads the buffers without rewriting rows, as the standard-op profiles do).
    stores = set(manifest.model.store_layers.values())
    assistant = manifest.graphs["assistant"]
    assert {int(t.name.split(".")[1]) for t in assistant.inputs if t.name.startswith("past_")} == stores
    assert {int(past.split(".")[1]) for past in assistant.kv_aliases.values()} <= stores
    if PROFILES[manifest.ep_profile].standard_attention:
        assert not assistant.kv_aliases


def test_kv_buffers_match_the_graph_inputs(bundle: Path) -> None:
    """Each buffer's length and dtype are the graphs' input shape and type: sliding layers' rings (the cpu
    profile at a context longer than the ring), full layers' max_context rows."""
    manifest = load_manifest(bundle)
    model = manifest.model
    for name, spec in manifest.graphs.items():
        inputs = {t.name: t for t in spec.inputs}
        for b in model.kv_buffers:
            for buffer in (b.name, b.name.replace("past_key", "past_value")):
                if buffer in inputs:
                    assert inputs[buffer].shape == [1, b.kv_heads, b.length, b.head_dim], (name, buffer)
                    assert inputs[buffer].dtype == b.dtype, (name, buffer)
    ring = ring_length(model.sliding_window)
    assert ring < model.max_context
    assert {b.length for b in model.kv_buffers} == {ring, "max_context"}
    assert all((b.length == ring) == (b.kind == "sliding_attention") for b in model.kv_buffers)


def test_store_layers_are_the_last_non_shared_layer_of_each_kind(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    cfg = json.loads((Path(manifest.source["target"]) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    kinds = cfg["layer_types"]
    non_shared = len(kinds) - cfg["num_kv_shared_layers"]
    expected = {kind: max(i for i in range(non_shared) if kinds[i] == kind) for kind in set(kinds)}
    model = manifest.model
    assert model.store_layers == expected
    assert model.layer_types == kinds
    assert model.sliding_window == cfg["sliding_window"]
    assert [(b.layer, b.kind) for b in model.kv_buffers] == [(i, kinds[i]) for i in range(non_shared)]
    # The shared layers of the target read their store layer's buffer: with GroupQueryAttention they also
    # rewrite its new rows through it (present aliases); standard-op attention only reads it.
    aliases = manifest.graphs["target"].kv_aliases
    for i in range(non_shared, len(kinds)):
        if PROFILES[manifest.ep_profile].standard_attention:
            assert f"present_key.{i}" not in aliases
        else:
            assert aliases[f"present_key.{i}"] == f"past_key.{expected[kinds[i]]}"


def test_files_have_matching_sizes_and_hashes(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    for name, info in manifest.files.items():
        data = (bundle / name).read_bytes()
        assert info["bytes"] == len(data), name
        assert info["sha256"] == hashlib.sha256(data).hexdigest(), name
    # Every file the manifest points at is listed: graphs, their weights, PLE, tokenizer.
    referenced = {spec.file for spec in manifest.graphs.values()} | set(manifest.tokenizer["files"])
    if manifest.model.ple:
        referenced |= {manifest.model.ple.file} | ({manifest.model.ple.scales_file} - {None})
    assert referenced <= set(manifest.files)

