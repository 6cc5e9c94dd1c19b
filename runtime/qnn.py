"""The qnn profile's host side (static shapes, QDQ): what the host does around the graphs that
export/graphs.py builds with static shapes (their IO: runtime/manifest.py).

The NPU graph has fixed shapes and no position arithmetic, so the host does three things per call:
  - RoPE cos/sin rows for the call's positions (frequencies from the manifest);
  - an additive mask per layer kind: causal, sliding window, and only the cache rows that are valid;
  - the K/V rows: the target returns the S new rows of each store layer and the host writes the valid
    ones into its numpy buffers. Rolling back rejected drafts stays a length change (`StaticCache.trim`).
The target runs S = k+1 rows per call (verify of fewer rows and decode pad the rest; padded rows are
computed and dropped), its prefill graph P rows (prompts in chunks of P). The assistant runs one row per
call, the fused (greedy) round k steps of one row. Graphs whose IO is quantized (the QDQ export moves the boundary
Q/DQ to the host) are fed and read through their encodings.

Sessions are opened and run like every other graph's (runtime/model.py: open_session, GraphSession.run),
and the graphs are the same Target, Assistant and DraftRound: `StaticTarget` changes only how one call of at
most S (prefill: P) rows is fed (Target.forward splits longer ones), `StaticAssistant` and `StaticDraftRound`
how a draft step or round is, so the loop runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.kv import KVCache
from edgegen.runtime.manifest import (
    HIDDEN,
    INPUT_IDS,
    LAST_HIDDEN,
    LOGITS,
    PER_LAYER_INPUTS,
    PROJECTED_HIDDEN,
    TOKEN,
    GraphSpec,
    KVBuffer,
    Manifest,
    buffer_of,
    mask_input,
    mask_kind,
    rope_inputs,
    value_buffer,
)
from edgegen.runtime.model import Assistant, DraftRound, GraphSession, Target

PAD_ID = 0


Encoding = tuple  # (scale float32, zero point, integer dtype) of a tensor a QDQ graph takes quantized


def quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """As QuantizeLinear: round half to even, saturate."""
    scale, zero, dtype = enc
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, enc: Encoding) -> np.ndarray:
    scale, zero, _ = enc
    return (q.astype(np.float32) - np.float32(zero)) * scale


def encodings(manifest: Manifest, graph: str) -> dict[str, Encoding]:
    return {k: (np.float32(v["scale"]), v["zero_point"], np.dtype(v["dtype"]))
            for k, v in manifest.static.get("quantized_io", {}).get(graph, {}).items()}


class StaticCache(KVCache):
    """K/V buffers in host memory, one pair per store (non-shared) target layer; `length` rows are valid.
    Rollback (`trim`, `reset`) is KVCache's: only the length changes.

    A buffer with an encoding is kept quantized, in the encoding both graphs take it in (the export gives
    them one), so a call feeds it as it is and a step quantizes only the rows it writes."""

    def __init__(self, buffers: list[KVBuffer], max_context: int, quantized: dict[str, Encoding] | None = None,
                 rows: int = 0):
        """rows: the query rows of the target graph (S), the most one call writes (max_rows)."""
        self.max_context = max_context
        self.max_rows = rows
        self.length = 0
        self.encoding: dict[str, Encoding] = {}
        self.values: dict[str, np.ndarray] = {}
        for b in buffers:
            for name in (b.name, value_buffer(b.name)):
                shape = (1, b.kv_heads, max_context, b.head_dim)
                enc = (quantized or {}).get(name)
                if enc is None:
                    self.values[name] = np.zeros(shape, np.float32)
                else:
                    self.encoding[name] = enc
                    self.values[name] = np.full(shape, enc[1], enc[2])  # the zero point encodes 0.0

    def reusable(self, length: int) -> int:
        """Every position below the length stays held (no ring buffers): any prefix can be resumed."""
        return length

    def write(self, new: dict[str, np.ndarray], rows: int) -> None:
        """Put the first `rows` rows of each new-rows output (float; manifest.new_kv) at positions length.. ."""
        a = self.length
        for name, value in new.items():
            buffer = buffer_of(name)
            rows_in = value[:, :, :rows]
            enc = self.encoding.get(buffer)
            self.values[buffer][:, :, a:a + rows] = rows_in if enc is None else quantize(rows_in, enc)
        self.length = a + rows

    def inputs(self, graph) -> dict[str, np.ndarray]:
        """The buffers `graph` takes, in the encoding it takes each in (its `quantized`; float where none)."""
        return {name: self.feed(name, graph.quantized.get(name)) for name in self.values if name in graph.input_names}

    def feed(self, name: str, enc: Encoding | None) -> np.ndarray:
        """The buffer as a graph that takes it in `enc` (None: float) needs it."""
        value, have = self.values[name], self.encoding.get(name)
        if have == enc:
            return value
        as_float = value if have is None else dequantize(value, have)
        return as_float if enc is None else quantize(as_float, enc)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values.values())


def attention_mask(sliding: bool, window: int, past: int, query_pos: np.ndarray, max_context: int,
                   new_rows: int, value: float) -> np.ndarray:
    """[1, 1, R, max_context + new_rows] additive mask: 0 where a query may look, `value` elsewhere.

    Cache column j is visible to the query at position p when j < past (and p - j < window for sliding
    layers); new column c (position past + c) when it is not after the query (and within the window)."""
    p = query_pos[:, None]
    reach = window if sliding else max_context + new_rows
    j = np.arange(max_context)[None, :]
    ok_past = (j < past) & (p - j < reach)
    c = past + np.arange(new_rows)[None, :]
    ok_new = (c <= p) & (p - c < reach)
    ok = np.concatenate([ok_past, ok_new], axis=1)
    return np.where(ok, np.float32(0), np.float32(value)).astype(np.float32)[None, None]


class Rope:
    """cos/sin rows [1, R, 1, d] for positions, in HF's cat(freqs, freqs) layout (as graphs.rope_tables)."""

    def __init__(self, inv_freq: dict[str, list[float]], tag: str):
        self.inv = {k.split(".", 1)[1]: np.asarray(v, np.float32) for k, v in inv_freq.items()
                    if k.startswith(tag + ".")}

    def feeds(self, positions: np.ndarray, kinds) -> dict[str, np.ndarray]:
        out = {}
        for kind in kinds:
            freqs = positions.astype(np.float32)[:, None] * self.inv[kind][None, :]
            emb = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
            cos, sin = rope_inputs(kind)
            out[cos], out[sin] = np.cos(emb), np.sin(emb)
        return out


def _graph_kinds(spec: GraphSpec) -> list[str]:
    return [mask_kind(t.name) for t in spec.inputs if mask_kind(t.name)]


class HostWork:
    """What the host does around one qnn-profile graph: RoPE rows and masks for the call's positions, and
    the boundary quantization of the IO the graph takes or gives quantized (see export/qnn.py)."""

    def __init__(self, spec: GraphSpec, manifest: Manifest, graph: str, tag: str):
        """graph: its name in the manifest; tag: whose RoPE frequencies it uses (target or assistant)."""
        m = manifest.model
        self.window, self.max_context = m.sliding_window, m.max_context
        self.mask_value = float(manifest.static.get("mask_value", -100.0))
        self.kinds = _graph_kinds(spec)
        self.rope = Rope(manifest.static["inv_freq"], tag)
        self.quantized = encodings(manifest, graph)

    def position_feeds(self, past: int, query_pos: np.ndarray, rope_pos: np.ndarray, new_rows: int) -> dict:
        feeds = self.rope.feeds(rope_pos, self.kinds)
        for kind in self.kinds:
            feeds[mask_input(kind)] = attention_mask(kind == "sliding_attention", self.window, past, query_pos,
                                                     self.max_context, new_rows, self.mask_value)
        return feeds

    def draft_feeds(self, cache: StaticCache, token: int, hidden: np.ndarray) -> dict:
        """A draft step's inputs: every step of a round sits at the constant position P = cache.length and
        reads the accepted rows [0, P)."""
        p = cache.length
        feeds = self.position_feeds(p, np.array([p - 1]), np.array([p]), 0)
        feeds[TOKEN] = np.array([[token]], np.int64)
        feeds[HIDDEN] = np.asarray(hidden, np.float32).reshape(1, 1, -1)
        return feeds

    def run(self, graph: GraphSession, feeds: dict, cache: StaticCache) -> dict[str, np.ndarray]:
        """graph.run (the one way graphs run) between the boundary quantize and dequantize; the K/V buffers
        come from StaticCache.inputs, in the encoding this graph takes."""
        for name, enc in self.quantized.items():
            if name in feeds:
                feeds[name] = quantize(feeds[name], enc)
        out = graph.run(feeds, cache)
        for name, enc in self.quantized.items():
            if name in out:
                out[name] = dequantize(out[name], enc)
        return out


class StaticTarget(Target):
    """The target with static shapes: Target.forward splits calls into the most rows a graph takes
    (StaticCache.max_rows), each call is padded to its graph's rows and the host writes the new K/V rows of the
    real ones. Calls of more than S rows run on `prefill` (the same model with P > S query rows), when the
    bundle has it."""

    def __init__(self, session, spec: GraphSpec, manifest: Manifest, ple, name: str = "target",
                 prefill: StaticTarget | None = None):
        super().__init__(session, spec, ple)
        self.host = HostWork(spec, manifest, name, "target")
        self.quantized = self.host.quantized
        self.rows = next(t.shape[1] for t in spec.inputs if t.name == INPUT_IDS)
        self.prefill = prefill

    def _forward(self, cache: StaticCache, ids: np.ndarray, logits_to_keep: int, soft=None):
        self._soft_feeds(soft)  # static graphs take no soft tokens: refused with one line
        n, past = ids.shape[1], cache.length
        if n > self.rows:
            return self.prefill._forward(cache, ids, logits_to_keep)
        ids = np.concatenate([ids, np.full((1, self.rows - n), PAD_ID, np.int64)], axis=1)
        pos = past + np.arange(self.rows)
        feeds = self.host.position_feeds(past, pos, pos, self.rows)
        feeds[INPUT_IDS] = ids
        if self.ple is not None:
            feeds[PER_LAYER_INPUTS] = self.ple(ids)
        out = self.host.run(self, feeds, cache)
        cache.write({k: v for k, v in out.items() if buffer_of(k)}, n)
        return out[LOGITS][0, :n][-logits_to_keep:], out[LAST_HIDDEN][0, :n][-logits_to_keep:]


class StaticAssistant(Assistant):
    def __init__(self, session, spec: GraphSpec, manifest: Manifest):
        super().__init__(session, spec)
        self.host = HostWork(spec, manifest, "assistant", "assistant")
        self.quantized = self.host.quantized

    def step(self, cache: StaticCache, token: int, hidden: np.ndarray):
        """One draft step at the constant position P = cache.length over the accepted rows [0, P)."""
        out = self.host.run(self, self.host.draft_feeds(cache, token, hidden), cache)
        logits = out[LOGITS][0, 0]
        return logits, int(logits.argmax()), out[PROJECTED_HIDDEN][0, 0]


class StaticDraftRound(DraftRound):
    """The fused round with static shapes: the draft step's host inputs once for all steps. Greedy only
    (export/graphs.py build_assistant_graph says why): sampling drafts in single steps."""

    samples = False

    def __init__(self, session, spec: GraphSpec, manifest: Manifest):
        super().__init__(session, spec)
        self.host = HostWork(spec, manifest, "draft_round", "assistant")
        self.quantized = self.host.quantized

    def _call(self, cache: StaticCache, token: int, hidden: np.ndarray, inv_temperature: float,
              gumbel: np.ndarray) -> dict[str, np.ndarray]:
        return self.host.run(self, self.host.draft_feeds(cache, token, hidden), cache)


def new_cache(manifest: Manifest) -> StaticCache:
    """The host-side K/V buffers of a qnn-profile bundle: quantized as the target takes them; a call writes
    at most the prefill graph's P query rows (the target's S without one)."""
    rows = manifest.static.get("prefill_rows", manifest.static["query_rows"])
    return StaticCache(manifest.model.kv_buffers, manifest.model.max_context, encodings(manifest, "target"), int(rows))


# -- sessions ----------------------------------------------------------------------------------------------


def open_qnn(manifest: Manifest, ep: str, ple, session: Callable[..., ort.InferenceSession]):
    """(target, assistant or None, draft_round or None) for a qnn-profile bundle; `session(spec, file=...,
    options=...)` opens a graph (runtime/model.py open_session). On QNN, precompiled EP context graphs are used
    when the bundle has them, with the EP configured for their SoC (binaries are compiled for one; one
    simulator per process)."""
    if ep not in ("qnn", "cpu"):
        raise EdgegenError(f"execution provider '{ep}' cannot run a static (qnn profile) bundle; use qnn or cpu")
    binaries = manifest.static.get("context_binaries", {}) if ep == "qnn" else {}
    soc = manifest.static.get("soc_model") if binaries else None
    options = {"soc_model": soc} if soc else None

    def graph(name: str) -> ort.InferenceSession:
        return session(manifest.graphs[name], file=binaries.get(name), options=options)

    prefill = None
    if "prefill" in manifest.graphs:
        prefill = StaticTarget(graph("prefill"), manifest.graphs["prefill"], manifest, ple, "prefill")
    target = StaticTarget(graph("target"), manifest.graphs["target"], manifest, ple, prefill=prefill)
    assistant = draft_round = None
    if "assistant" in manifest.graphs:
        assistant = StaticAssistant(graph("assistant"), manifest.graphs["assistant"], manifest)
    if "draft_round" in manifest.graphs:
        draft_round = StaticDraftRound(graph("draft_round"), manifest.graphs["draft_round"], manifest)
    return target, assistant, draft_round
