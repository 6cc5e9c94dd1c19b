"""runtime/memory.py: a loaded bundle keeps no resident pages of its weight files it does not read."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgegen.runtime import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise")


def test_released_pages_read_back_the_same_data(tmp_path) -> None:
    path = tmp_path / "w.weights"
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, np.uint8, mode="r")
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page resident
    assert memory.mapped_resident([path]) == data.nbytes
    assert memory.release_mapped([path]) == data.nbytes
    assert memory.mapped_resident([path]) == 0
    np.testing.assert_array_equal(mapped, data)  # faulted back in from the file


def test_a_mapping_written_in_place_is_left_alone(tmp_path) -> None:
    path = tmp_path / "w.weights"
    np.zeros(1 << 20, np.uint8).tofile(path)
    private = np.memmap(path, np.uint8, mode="c")  # copy-on-write: the written page is not file data
    private[:] = 7
    assert memory.release_mapped([path]) == 0
    assert memory.mapped_resident([path]) > 0
    assert (private == 7).all()


def test_an_moe_bundle_keeps_no_resident_weight_pages_after_loading(bundle_dir) -> None:
    """An MoE bundle holds most of its bytes in pre-packed expert weights (export/moe.py): after it opens, none
    of its weight files' pages stay resident beside the packed copies, and it runs."""
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    path = bundle_dir("moe-like", False, quant="int4")
    bundle = Bundle(path, threads=2)
    files = memory.weight_files(path)
    assert files and memory.mapped_resident(files) == 0
    tokens = Generator(bundle).generate([2, 10, 11, 12], max_new_tokens=8, use_assistant=False).token_ids
    assert len(tokens) >= 1


def test_no_weight_of_a_quantized_bundle_is_reshaped_or_transposed_in_a_graph(bundle_dir) -> None:
    """onnxruntime constant-folds a Reshape or Transpose of an initializer into a copy held in memory (the tied
    embedding read by GatherBlockQuantized cost 0.43 GiB per graph at 26B-A4B size): ops that need a weight in
    another shape read an alias of its bytes (Graph.alias)."""
    import onnx

    path = bundle_dir("e2b-like", True, quant="int4")
    for name in ("target", "assistant", "draft_round"):
        graph = onnx.load(str(path / f"{name}.onnx"), load_external_data=False).graph
        weights = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert weights, name
        folded = [n.input[0] for n in graph.node if n.op_type in ("Reshape", "Transpose") and n.input[0] in weights]
        assert not folded, f"{name}: {folded}"
