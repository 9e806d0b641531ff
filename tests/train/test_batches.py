"""Batching on tiny synthetic shards: windows, documents (best-fit packing), rank slices, exact state
save/restore and the prefetch thread (train/data/batches.py, train/data/loader.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import DataError
from train.data.batches import DocumentSampler, WindowSampler, get_batch
from train.data.loader import BatchLoader, cropped_fraction, make_loader, resolve_batching
from train.data.shards import ShardWriter, TokenSplit, open_shard

FP = "00" * 32
SEP = 0  # the separator id ending every document in these shards


def shard(path, docs: list[list[int]]):
    """A shard of `docs`, each followed by SEP; its doc_starts are where each document begins."""
    with ShardWriter(path, np.uint16, FP) as w:
        for d in docs:
            w.add(np.array(d + [SEP]), [0])
    return open_shard(path)


def split_of(tmp_path, *shards_docs, name="train", n_bytes=0) -> TokenSplit:
    return TokenSplit(name, [shard(tmp_path / f"{name}-{i}.bin", docs) for i, docs in enumerate(shards_docs)],
                      n_bytes=n_bytes)


def random_docs(rng, n, lo=1, hi=30, base=1):
    """n documents of random lengths whose tokens name them: document k is [base + k] * length."""
    return [[base + k] * int(rng.integers(lo, hi)) for k in range(n)]


@pytest.fixture
def docs_split(tmp_path):
    rng = np.random.default_rng(0)
    return split_of(tmp_path, random_docs(rng, 40), random_docs(rng, 25, base=100), random_docs(rng, 30, base=200))


# -- windows -----------------------------------------------------------------------------------------
def test_single_shard_windows_are_exactly_the_old_formula(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 500, 3000)
    split = TokenSplit("train", [shard(tmp_path / "one.bin", [tokens.tolist()])])
    data = split.shards[0].tokens
    B, T, world = 4, 16, 3
    for rank in range(world):
        new = make_loader(split, "windows", B, T, rank=rank, world=world, seed=1337)
        old_gen = torch.Generator().manual_seed(1337)
        for _ in range(5):
            # The formula before shards, written out: the global starts, this rank's slice.
            starts = torch.randint(len(data) - T, (world * B,), generator=old_gen)[rank * B:(rank + 1) * B].numpy()
            rows = np.stack([data[s:s + T + 1] for s in starts]).astype(np.int64)
            x, y = new.next_batch()
            assert torch.equal(x, torch.from_numpy(rows[:, :-1])) and torch.equal(y, torch.from_numpy(rows[:, 1:]))
        gen = torch.Generator().manual_seed(1337)
        x0, _ = get_batch(data, B, T, "cpu", gen, shard=(rank, world))  # the old function agrees too
        assert torch.equal(x0, make_loader(split, "windows", B, T, rank=rank, world=world, seed=1337).next_batch()[0])


def test_multi_shard_windows_never_cross_a_shard_and_cover_every_shard(tmp_path):
    # Shard i holds only the token 10 + i, so a window that crossed a boundary would hold two values.
    lens = [50, 7, 200, 30]  # the 7-token shard is shorter than a row: it holds no window
    split = TokenSplit("train", [shard(tmp_path / f"s{i}.bin", [[10 + i] * (n - 1)]) for i, n in enumerate(lens)])
    T = 8
    sampler = WindowSampler(split, 64, T, seed=0)
    assert sampler.total == sum(max(n - T, 0) for n in lens)
    seen, per_shard = set(), {}
    for _ in range(50):
        shard_idx, starts = sampler.starts()
        for s, st in zip(shard_idx.tolist(), starts.tolist()):
            assert 0 <= st <= lens[s] - (T + 1), (s, st)
            per_shard.setdefault(s, set()).add(st)
    assert set(per_shard) == {0, 2, 3}
    assert per_shard[2] == set(range(200 - T))  # every start position of a shard is drawn in time
    for _ in range(20):
        for row in sampler.draw():
            values = set(row.tolist()) - {SEP}
            assert len(values) == 1 and values <= {10, 12, 13}, row
            seen |= values
    assert seen == {10, 12, 13}
    # About in proportion to each shard's start positions.
    counts = np.bincount(np.concatenate([sampler.starts()[0] for _ in range(200)]), minlength=4)
    share = counts / counts.sum()
    want = np.array([max(n - T, 0) for n in lens]) / sampler.total
    assert np.abs(share - want).max() < 0.03, (share, want)


def test_windows_errors_name_the_split_and_the_fix(tmp_path):
    split = TokenSplit("val", [shard(tmp_path / "a.bin", [[1] * 9]), shard(tmp_path / "b.bin", [[2] * 5])])
    with pytest.raises(DataError, match=r"no shard of the val split holds one window .*longest has 10.*at most 9"):
        WindowSampler(split, 2, 16)
    one = TokenSplit("val", [shard(tmp_path / "c.bin", [[1] * 9])])
    with pytest.raises(DataError, match=r"the tiny val split has 10 tokens .*smaller --block-size \(at most 9\)"):
        WindowSampler(one, 2, 16, name="the tiny val split")


# -- documents ---------------------------------------------------------------------------------------
def doc_table(split: TokenSplit) -> dict[int, list[int]]:
    """Global document id -> its tokens (separator included)."""
    out, g = {}, 0
    for s in split.shards:
        ends = np.append(s.doc_starts[1:], len(s.tokens))
        for a, b in zip(s.doc_starts, ends):
            out[g] = s.tokens[a:b].tolist()
            g += 1
    return out


def test_document_rows_start_at_documents_and_hold_whole_documents_but_the_last(docs_split):
    T, B = 24, 6
    sampler = DocumentSampler(docs_split, B, T, seed=3, buffer_docs=20)
    docs = doc_table(docs_split)
    for _ in range(30):
        plan = sampler.plan()
        rows = None
        for row in plan:
            assert sum(take for _, take in row) == T + 1
            *whole, (last_doc, last_take) = row
            assert all(take == len(docs[d]) for d, take in whole)  # every document but the last is whole
            assert last_take <= len(docs[last_doc])
    # And the tokens: each row begins with the first token of a document and reads documents from their start.
    sampler = DocumentSampler(docs_split, B, T, seed=3, buffer_docs=20)
    replay = DocumentSampler(docs_split, B, T, seed=3, buffer_docs=20)
    for _ in range(10):
        rows = sampler.draw()
        for row, plan in zip(rows, replay.plan()):
            want = sum((docs[d][:take] for d, take in plan), [])
            assert row.tolist() == want
            assert row[0] != SEP


def test_best_fit_is_deterministic_per_seed_and_differs_between_seeds(docs_split):
    def draws(seed):
        sampler = DocumentSampler(docs_split, 4, 20, seed=seed)
        return [sampler.draw() for _ in range(8)]
    a, b, c = draws(5), draws(5), draws(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_best_fit_packing_and_the_cropped_fraction_on_a_hand_built_case(tmp_path):
    # Documents (with their separator) of 3, 5, 8 and 12 tokens; rows of 10 tokens (block_size 9); a buffer
    # of four documents.
    split = split_of(tmp_path, [[1] * 2, [2] * 4, [3] * 7, [4] * 11])
    sampler = DocumentSampler(split, 1, 9, seed=0, buffer_docs=4)
    sampler.permutation(0)[:] = [0, 1, 2, 3]  # fix the order (the permutation is cached per epoch)
    # Row 1: buffer {3, 5, 8, 10 (the 12 capped at a row)}: the longest that fits whole is the 10 -> the
    # first 10 tokens of document 3, 2 cropped.
    assert sampler.plan() == [[(3, 10)]]
    assert (sampler.cropped, sampler.drawn) == (2, 12)
    # Row 2: the buffer is refilled from epoch 1's order (fixed to [0, 1, 2, 3] too): {3, 5, 8} + document 0
    # again (3). The 8 fits whole; 2 left, which nothing fits: the shortest (a 3, the later drawn) is cropped to 2.
    sampler.permutation(1)[:] = [0, 1, 2, 3]
    assert sampler.plan() == [[(2, 8), (0, 2)]]
    assert (sampler.cropped, sampler.drawn) == (2 + 1, 12 + 8 + 3)
    assert sampler.cropped_fraction == pytest.approx(3 / 23)
    assert cropped_fraction(sampler.state_dict()) == pytest.approx(3 / 23)
    # Every token drawn is in a row or counted as cropped.
    assert sampler.drawn - sampler.cropped == 2 * 10


def test_a_split_without_document_starts_is_a_clear_error(tmp_path):
    s = shard(tmp_path / "x.bin", [[1] * 20])
    bare = TokenSplit("train", [type(s)(s.path, s.tokens, np.zeros(0, np.int64))])
    with pytest.raises(DataError, match="records no document starts.*--batching windows"):
        DocumentSampler(bare, 2, 8, name="the demo train split")


def test_resolve_batching():
    assert resolve_batching("auto", "documents") == "documents"
    assert resolve_batching("auto", "position") == "windows"
    assert resolve_batching("windows", "documents") == "windows"
    assert resolve_batching("documents", "position") == "documents"


# -- both modes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["windows", "documents"])
def test_rank_slices_are_disjoint_and_together_the_one_process_batch(docs_split, mode):
    B, T, world = 3, 12, 4
    one = make_loader(docs_split, mode, world * B, T, seed=9)
    ranks = [make_loader(docs_split, mode, B, T, rank=r, world=world, seed=9) for r in range(world)]
    for _ in range(6):
        x, y = one.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    if mode == "documents":  # each rank keeps its own rows of the global schedule, and every rank's state is global
        samplers = [DocumentSampler(docs_split, B, T, rank=r, world=world, seed=9) for r in range(world)]
        plans = [s.plan() for s in samplers]
        one_s = DocumentSampler(docs_split, world * B, T, seed=9)
        assert [row for p in plans for row in p] == one_s.plan()
        assert [s.state_dict()["cursor"] for s in samplers] == [one_s.state_dict()["cursor"]] * world


@pytest.mark.parametrize("mode", ["windows", "documents"])
def test_state_save_and_restore_continue_exactly(docs_split, mode):
    ref = make_loader(docs_split, mode, 4, 16, seed=2)
    run = make_loader(docs_split, mode, 4, 16, seed=2)
    want = [ref.next_batch()[0] for _ in range(12)]
    got = [run.next_batch()[0] for _ in range(5)]
    state = run.state_dict()
    saved = torch.load(_roundtrip(state), weights_only=True)  # what a checkpoint holds
    resumed = make_loader(docs_split, mode, 4, 16, seed=777)  # the state carries the seed along
    resumed.load_state_dict(saved)
    got += [resumed.next_batch()[0] for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    if mode == "documents":
        assert resumed.cropped_fraction == ref.cropped_fraction
        assert 0 < saved["buffer"].numel() <= resumed.sampler.buffer_size  # small: document ids only


def _roundtrip(state):
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_document_state_from_another_split_is_refused(docs_split, tmp_path):
    other = split_of(tmp_path, [[1] * 5] * 7, name="other")
    state = DocumentSampler(other, 2, 8).state_dict()
    with pytest.raises(ValueError, match="7 documents"):
        DocumentSampler(docs_split, 2, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="windows batching state cannot restore documents"):
        DocumentSampler(docs_split, 2, 8).load_state_dict(WindowSampler(docs_split, 2, 8).state_dict())


@pytest.mark.parametrize("mode", ["windows", "documents"])
def test_prefetch_gives_the_same_batches_and_the_state_of_the_batches_handed_out(docs_split, mode):
    plain = make_loader(docs_split, mode, 3, 10, seed=4, prefetch=False)
    threaded = make_loader(docs_split, mode, 3, 10, seed=4, prefetch=True)
    assert threaded.prefetch and threaded._thread is None
    for step in range(8):
        a, b = plain.next_batch(), threaded.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # The thread has drawn ahead, but the state is the one after the batches handed out.
        assert _same_state(plain.state_dict(), threaded.state_dict()), step
    assert threaded._thread is not None and threaded._thread.is_alive()
    state = threaded.state_dict()
    threaded.close()  # stops the thread and rewinds the sampler to the state handed out
    assert threaded._thread is None and _same_state(threaded.sampler.state_dict(), state)
    for _ in range(3):  # it goes on (a new thread) without skipping the batches the old one had drawn
        assert torch.equal(plain.next_batch()[0], threaded.next_batch()[0])
    resumed = make_loader(docs_split, mode, 3, 10, seed=0, prefetch=True)
    resumed.load_state_dict(threaded.state_dict())
    assert torch.equal(plain.next_batch()[0], resumed.next_batch()[0])
    threaded.close()
    resumed.close()


def test_an_error_in_the_prefetch_thread_is_raised_by_next_batch(docs_split):
    loader = make_loader(docs_split, "windows", 2, 8, prefetch=True)

    def broken():
        raise DataError("the shard went away")
    loader.sampler.draw = broken
    with pytest.raises(DataError, match="went away"):
        loader.next_batch()
    assert loader._thread is None


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_loader_on_the_cpu_does_not_pin(docs_split):
    loader = BatchLoader(WindowSampler(docs_split, 2, 8), "cpu", prefetch=True)
    x, y = loader.next_batch()
    assert x.dtype == torch.int64 and x.shape == (2, 8) and not x.is_pinned() and x.is_contiguous()
    loader.close()
