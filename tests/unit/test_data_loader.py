"""Batches: shuffle by (seed, epoch), disjoint DP shards, exact resume, packing == padding content."""

import json

import pytest
import torch

from tulu.data import (IGNORE_INDEX, BatchLoader, DataState, block_causal_mask, build_tiny_tokenizer,
                       load_preference_dataset, load_sft_dataset, make_synthetic, plan_packs)

MAX_LEN = 96


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sft")
    src = make_synthetic("sft", 40, seed=0, out_path=d / "sft.jsonl")
    return load_sft_dataset(src, tok, max_length=MAX_LEN, cache_dir=d / "cache")


@pytest.fixture(scope="module")
def pref(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("pref")
    src = make_synthetic("preference", 24, seed=0, out_path=d / "pref.jsonl")
    return load_preference_dataset(src, tok, max_length=MAX_LEN, cache_dir=d / "cache")


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _real_tokens(batches):
    """All real (non-pad) tokens in order, with their labels."""
    toks, labs = [], []
    for b in batches:
        m = b["attention_mask"].bool()
        toks.append(b["tokens"][m])
        labs.append(b["labels"][m])
    return torch.cat(toks), torch.cat(labs)


def test_batch_has_fixed_shape_and_consistent_masks(sft, tok):
    b = next(iter(BatchLoader(sft, batch_size=4, seed=0)))
    assert set(b) == {"tokens", "labels", "loss_mask", "attention_mask", "position_ids", "document_ids"}
    for v in b.values():
        assert v.shape == (4, MAX_LEN)
    assert torch.equal(b["loss_mask"], b["labels"] != IGNORE_INDEX)
    assert not (b["loss_mask"] & (b["attention_mask"] == 0)).any()
    assert (b["tokens"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    trained = b["tokens"][0][b["loss_mask"][0]].tolist()
    assert tok.decode(trained).endswith("<|endoftext|>") and "<|user|>" not in tok.decode(trained)


def test_packing_and_padding_give_the_same_per_token_loss_mask_content(sft):
    padded = BatchLoader(sft, batch_size=1, seed=7, num_epochs=1)
    packed = BatchLoader(sft, batch_size=1, seed=7, pack=True, num_epochs=1)
    pad_batches, pack_batches = list(padded), list(packed)
    assert len(pack_batches) < len(pad_batches) == len(sft)
    pad_tok, pad_lab = _real_tokens(pad_batches)
    pack_tok, pack_lab = _real_tokens(pack_batches)
    assert torch.equal(pad_tok, pack_tok)
    assert torch.equal(pad_lab, pack_lab)


def test_packed_rows_keep_document_boundaries(sft):
    loader = BatchLoader(sft, batch_size=2, seed=0, pack=True)
    b = next(iter(loader))
    rows = loader.rows_at(DataState(0, 0))
    lengths = sft.dataset["length"]
    for r, row in enumerate(rows):
        assert len(row) > 1  # ~45-token samples, 96-token rows: two per row
        docs = b["document_ids"][r]
        for d, sample in enumerate(row):
            pos = b["position_ids"][r][docs == d]
            assert torch.equal(pos, torch.arange(lengths[sample]))
            first = (docs == d).nonzero()[0].item()
            assert b["labels"][r, first] == IGNORE_INDEX  # a document never starts inside a loss span
    mask = block_causal_mask(b["document_ids"])
    assert mask.shape == (2, 1, MAX_LEN, MAX_LEN)
    d = b["document_ids"][0]
    i = (d == 1).nonzero()[0].item()          # first token of the second document
    assert mask[0, 0, i, i] and not mask[0, 0, i, :i].any()
    assert mask[0, 0, i + 1, i]


def test_plan_packs_keeps_order_and_fits():
    packs = plan_packs([3, 4, 2, 5, 1], 6)
    assert packs == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="more than max_length"):
        plan_packs([7], 6)


@pytest.mark.parametrize("pack", [False, True])
def test_shuffle_is_deterministic_by_seed_and_differs_across_epochs(sft, pack):
    a = BatchLoader(sft, batch_size=1, seed=1, pack=pack)
    b = BatchLoader(sft, batch_size=1, seed=1, pack=pack)
    c = BatchLoader(sft, batch_size=1, seed=2, pack=pack)
    assert a.epoch_rows(0) == b.epoch_rows(0) and a.epoch_rows(1) == b.epoch_rows(1)
    assert a.epoch_rows(0) != a.epoch_rows(1)
    assert a.epoch_rows(0) != c.epoch_rows(0)
    flat0 = sorted(i for row in a.epoch_rows(0) for i in row)
    assert flat0 == list(range(len(sft)))
    _same(_take(a, 5), _take(b, 5))


@pytest.mark.parametrize("pack", [False, True])
def test_dp_shards_are_disjoint_and_cover_the_epoch(sft, pack):
    dp_size, bs = 4, 2
    loaders = [BatchLoader(sft, batch_size=bs, seed=3, dp_rank=r, dp_size=dp_size, pack=pack) for r in range(dp_size)]
    steps = loaders[0].steps_in_epoch(0)
    assert all(ld.steps_in_epoch(0) == steps for ld in loaders)
    seen = []
    for step in range(steps):
        state = DataState(0, step * bs * dp_size)
        per_rank = [[i for row in ld.rows_at(state) for i in row] for ld in loaders]
        for r in range(dp_size):
            for q in range(r + 1, dp_size):
                assert not set(per_rank[r]) & set(per_rank[q])
        seen += [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen))
    all_rows = loaders[0].epoch_rows(0)
    dropped = all_rows[steps * bs * dp_size:]
    assert len(dropped) < bs * dp_size  # only a last incomplete global batch is dropped
    assert sorted(seen + [i for row in dropped for i in row]) == list(range(len(sft)))
    # the batches the ranks actually iterate are the rows above
    first = [next(iter(ld)) for ld in loaders]
    for r, ld in enumerate(loaders):
        assert torch.equal(first[r]["tokens"], ld.batch_at(DataState(0, 0))["tokens"])
        assert ld.state == DataState(0, bs * dp_size)


def test_padded_dp_with_divisible_epoch_covers_every_sample(sft):
    loaders = [BatchLoader(sft, batch_size=5, seed=0, dp_rank=r, dp_size=2, num_epochs=1) for r in range(2)]
    assert loaders[0].steps_in_epoch(0) == 4  # 40 samples / (5 x 2)
    tokens = [b["tokens"] for ld in loaders for b in ld]
    assert len(tokens) == 8
    rows = {tuple(t.tolist()) for batch in tokens for t in batch}
    assert len(rows) == len(set(tuple(r) for r in sft.dataset["input_ids"]))


@pytest.mark.parametrize("pack,dp_rank,dp_size", [(False, 0, 1), (True, 1, 2), (False, 2, 3)])
def test_resume_from_saved_data_state_yields_identical_next_batches(sft, tmp_path, pack, dp_rank, dp_size):
    kw = dict(batch_size=2, seed=11, dp_rank=dp_rank, dp_size=dp_size, pack=pack)
    uninterrupted = BatchLoader(sft, **kw)
    steps = uninterrupted.steps_in_epoch(0)
    # stop mid-epoch-1 so the resumed stream also crosses an epoch boundary later
    first = _take(uninterrupted, steps + 1)
    (tmp_path / "data_state.json").write_text(json.dumps(uninterrupted.state_dict()))
    expected = _take(uninterrupted, 2 * steps)

    resumed = BatchLoader(sft, **kw)
    resumed.load_state_dict(json.loads((tmp_path / "data_state.json").read_text()))
    assert resumed.state == DataState(1, 2 * dp_size)
    _same(_take(resumed, 2 * steps), expected)
    also = BatchLoader(sft, **kw, state=DataState(1, 2 * dp_size))
    _same(_take(also, 3), expected[:3])
    assert len(first) == steps + 1


def test_state_at_end_of_epoch_moves_to_next_epoch(sft):
    loader = BatchLoader(sft, batch_size=3, seed=0)  # 40 rows: 13 steps, 1 row dropped
    assert loader.steps_in_epoch(0) == 13
    _take(loader, 13)
    assert loader.state == DataState(1, 0)
    assert BatchLoader(sft, batch_size=3, seed=0, state=DataState(0, 39)).state == DataState(1, 0)
    assert loader.total_steps(2) == 26


def test_num_epochs_stops_iteration(sft):
    loader = BatchLoader(sft, batch_size=8, seed=0, num_epochs=2)
    assert len(list(loader)) == 10 and loader.state == DataState(2, 0)


def test_preference_batches_align_chosen_and_rejected(pref, tok):
    loader = BatchLoader(pref, batch_size=3, seed=5, dp_rank=1, dp_size=2)
    b = next(iter(loader))
    assert b["tokens"].shape == (6, MAX_LEN)
    ids = [i for row in loader.rows_at(DataState(0, 0)) for i in row]
    for k, sample in enumerate(ids):
        row = pref.dataset[sample]
        for half, side in ((0, "chosen"), (1, "rejected")):
            r = half * 3 + k
            n = len(row[f"{side}_input_ids"])
            assert b["tokens"][r, :n].tolist() == row[f"{side}_input_ids"]
            assert b["labels"][r, :n].tolist() == row[f"{side}_labels"]
        chosen = tok.decode(b["tokens"][k][b["attention_mask"][k].bool()])
        rejected = tok.decode(b["tokens"][3 + k][b["attention_mask"][3 + k].bool()])
        prompt = chosen.split("<|assistant|>")[0]
        assert rejected.startswith(prompt) and chosen != rejected


def test_preference_data_refuses_packing(pref):
    with pytest.raises(ValueError, match="packing is for SFT"):
        BatchLoader(pref, batch_size=2, seed=0, pack=True)


def test_too_little_data_for_one_global_batch_is_a_clear_error(sft):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(sft, batch_size=16, seed=0, dp_size=4)
