"""Several Generators in threads share one Bundle (its ORT sessions) and give exactly the serial outputs.

Why this holds: `InferenceSession.run_with_iobinding` may be called from several threads at once; every
call builds its own IOBinding (bindings are never shared); each Generator owns its KV cache, draft policy
and tokenizer; the PLE table is a read-only memory map. A single Generator used by two threads at once is
refused with an EdgegenError rather than interleaving rounds in one cache.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.model import Bundle
from edgegen.runtime.sampling import Sampling

# (prompt ids, sampling, use_assistant, draft tokens): greedy and seeded sampling, plain, fused and
# step-by-step drafting, prompts past the sliding window.
JOBS = [
    ([2, 17, 42, 99, 5], Sampling(), True, 4),
    ([3, 8, 13, 21, 34, 55] * 5, Sampling(), True, 3),
    ([9, 9, 1], Sampling(), False, 0),
    ([4, 100, 200, 300], Sampling(temperature=0.9, seed=7), True, 4),
    ([11, 12, 13] * 8, Sampling(temperature=1.0, top_p=0.9, seed=3), True, 2),
    ([50, 60, 70], Sampling(temperature=0.7, seed=11), False, 0),
]
NEW_TOKENS = 40
THREADS = 6
ROUNDS = 3  # each thread runs every job several times, in a different order from its neighbours


@pytest.fixture(scope="module")
def shared(bundle_dir) -> Bundle:
    return Bundle(bundle_dir("e2b-like"), threads=1)


def run_job(gen: Generator, job) -> list[int]:
    ids, sampling, use_assistant, k = job
    gen.reset()
    return gen.generate(ids, NEW_TOKENS, sampling, use_assistant, draft_tokens=k).token_ids


def test_threads_sharing_sessions_match_serial_runs(shared: Bundle) -> None:
    serial_gen = Generator(shared)
    serial = [run_job(serial_gen, job) for job in JOBS]
    assert all(len(s) == NEW_TOKENS for s in serial)
    start = threading.Barrier(THREADS)

    def worker(offset: int) -> list[tuple[int, list[int]]]:
        gen = Generator(shared)  # one Generator per thread, one Bundle for all
        start.wait()
        order = [(offset + i) % len(JOBS) for i in range(len(JOBS))] * ROUNDS
        return [(j, run_job(gen, JOBS[j])) for j in order]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for per_thread in results:
        for j, tokens in per_thread:
            assert tokens == serial[j], f"job {j} differs when run in threads"


def test_chat_in_threads_matches_serial(shared: Bundle) -> None:
    """Multi-turn chat (KV reuse across turns) in parallel conversations."""
    turns = ["hello", "tell me more", "and then?"]

    def conversation(_: int) -> list[str]:
        gen = Generator(shared, draft_tokens=4)
        return ["".join(e.text for e in gen.chat(t, max_new_tokens=16)) for t in turns]

    serial = conversation(0)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(conversation, range(4))) == [serial] * 4


def test_one_generator_in_two_threads_is_refused(shared: Bundle) -> None:
    gen = Generator(shared)
    stream = gen.stream_ids([2, 17, 42], 30)
    next(stream)  # this thread is mid-generation
    errors: list[BaseException] = []

    def other() -> None:
        try:
            gen.generate([5, 6, 7], 4)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], EdgegenError) and "another thread" in str(errors[0])
    stream.close()  # finishing (or closing) the stream frees the Generator for any thread
    t = threading.Thread(target=lambda: errors.append(gen.generate([5, 6, 7], 4)))
    t.start()
    t.join()
    assert len(errors[1].token_ids) == 4


def test_the_same_thread_may_nest_streams(bundle_dir: Path) -> None:
    """Starting a new stream before the last one finished stays allowed in one thread (as before)."""
    gen = Generator(bundle_dir("e2b-like"))
    first = gen.stream_ids([2, 17, 42], 5)
    next(first)
    assert len(gen.generate([2, 17, 42], 5).token_ids) == 5
    first.close()


@pytest.mark.parametrize("spin", [True, False])
def test_thread_policy_reaches_every_session_and_keeps_the_tokens(bundle_dir, shared: Bundle, spin: bool) -> None:
    """Two intra-op threads that spin during a call (the default) or sleep when idle (--no-spin): each
    session carries the policy, and the tokens are the one-thread serial ones."""
    bundle = Bundle(bundle_dir("e2b-like"), threads=2, spin=spin)
    for session in (bundle.target.session, bundle.draft_round.session):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
        if spin:  # spinning ends with the call, so the target's threads never spin through a draft round
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    two, one = Generator(bundle), Generator(shared)
    for job in JOBS:
        assert run_job(two, job) == run_job(one, job)
