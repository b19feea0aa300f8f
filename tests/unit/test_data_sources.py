"""Loading SFT and preference data from files: bad rows are counted by reason and skipped, never fatal."""

import json
import logging

import datasets
import pytest

from tulu.data import (IGNORE_INDEX, build_tiny_tokenizer, load_preference_dataset, load_sft_dataset,
                       load_source, make_synthetic)

U = {"role": "user", "content": "What is 1+1?"}
A = {"role": "assistant", "content": "1+1=2. The answer is 2."}
GOOD = {"messages": [U, A]}
BAD_SFT = [
    {"messages": []},                                                   # empty_messages
    {"messages": [{"content": "no role"}, A]},                          # missing_role
    {"messages": [{"role": "user", "content": "hi"}]},                  # no_assistant_turn
    {"messages": [U, {"role": "assistant", "content": "x" * 500}]},     # too_long
    {"messages": [U, {"role": "assistant", "content": "y" * 500}]},     # too_long
    {"messages": [{"role": "function", "content": "f"}, A]},            # unknown_role
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_bad_sft_rows_are_counted_by_reason_and_skipped_with_a_warning(tmp_path, tok, caplog):
    src = _jsonl(tmp_path / "mixed.jsonl", [GOOD] * 3 + BAD_SFT + [GOOD])
    with caplog.at_level(logging.WARNING, logger="tulu.data"):
        data = load_sft_dataset(src, tok, max_length=128, cache_dir=tmp_path / "cache")
    assert len(data) == 4
    assert data.skipped == {"empty_messages": 1, "missing_role": 1, "no_assistant_turn": 1,
                            "too_long": 2, "unknown_role": 1}
    assert "skipped 6 of 10 rows" in caplog.text and "too_long=2" in caplog.text
    for row in data.dataset:
        assert len(row["input_ids"]) == row["length"] <= 128
        assert any(lab != IGNORE_INDEX for lab in row["labels"])


def test_clean_data_reports_nothing_skipped(tmp_path, tok):
    src = make_synthetic("sft", 20, seed=0, out_path=tmp_path / "sft.jsonl")
    data = load_sft_dataset(src, tok, max_length=128, cache_dir=tmp_path / "cache")
    assert len(data) == 20 and data.skipped == {} and data.kind == "sft"
    assert data.pad_token_id == tok.pad_token_id


def test_all_rows_bad_raises_an_error_naming_the_reasons(tmp_path, tok):
    src = _jsonl(tmp_path / "bad.jsonl", BAD_SFT[:3])
    with pytest.raises(ValueError, match="every one of its 3 rows was skipped"):
        load_sft_dataset(src, tok, max_length=128, cache_dir=tmp_path / "cache")


def test_parquet_and_save_to_disk_sources_load_like_jsonl(tmp_path, tok):
    rows = [GOOD, {"messages": [{"role": "system", "content": "be brief"}, U, A]}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    from_jsonl = load_sft_dataset(_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=128, cache_dir=tmp_path / "c")
    for src in (tmp_path / "d.parquet", tmp_path / "saved"):
        data = load_sft_dataset(src, tok, max_length=128, cache_dir=tmp_path / "c")
        assert data.dataset["input_ids"] == from_jsonl.dataset["input_ids"]


def test_split_slices_are_honoured(tmp_path):
    src = make_synthetic("sft", 10, seed=0, out_path=tmp_path / "sft.jsonl")
    assert len(load_source(src, "train[:4]", tmp_path / "c")) == 4


def test_unknown_source_error_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub dataset name"):
        load_source(tmp_path / "missing" / "file.jsonl")


def test_preference_pairs_tokenize_both_sides_and_skip_bad_pairs(tmp_path, tok, caplog):
    good = {"prompt": "What is 1+1?", "chosen": [U, A],
            "rejected": [U, {"role": "assistant", "content": "1+1=3. The answer is 3."}]}
    replies_only = {"prompt": "What is 1+1?", "chosen": [A], "rejected": "It is 3."}
    bad = [
        {"prompt": "q", "chosen": [U, A]},                                           # missing rejected
        {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "z" * 300}]},  # too_long
        {"chosen": [U, A], "rejected": [U]},                                         # no assistant
    ]
    src = _jsonl(tmp_path / "pref.jsonl", [good, replies_only] + bad)
    with caplog.at_level(logging.WARNING, logger="tulu.data"):
        data = load_preference_dataset(src, tok, max_length=128, cache_dir=tmp_path / "cache")
    assert len(data) == 2 and data.kind == "preference"
    assert data.skipped == {"missing_chosen_or_rejected": 1, "no_assistant_turn": 1, "too_long": 1}
    assert "skipped 3 of 5 rows" in caplog.text
    row = data.dataset[1]
    assert tok.decode(row["rejected_input_ids"]) == "<|user|>\nWhat is 1+1?\n<|assistant|>\nIt is 3.<|endoftext|>"
    trained = [i for i, lab in zip(row["chosen_input_ids"], row["chosen_labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == A["content"] + "<|endoftext|>"
    assert row["length"] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
