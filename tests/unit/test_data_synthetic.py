"""Synthetic arithmetic data: deterministic by seed, correct answers, Ai2's RLVR schema."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tulu.data import make_synthetic, synthetic_rows
from tulu.data.synthetic import REFUSALS


@pytest.mark.parametrize("kind", ["sft", "preference", "rlvr"])
def test_synthetic_generators_are_deterministic_by_seed(kind, tmp_path):
    a = make_synthetic(kind, 50, seed=3, out_path=tmp_path / "a.jsonl")
    b = make_synthetic(kind, 50, seed=3, out_path=tmp_path / "b.jsonl")
    c = make_synthetic(kind, 50, seed=4, out_path=tmp_path / "c.jsonl")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert len(a.read_text().splitlines()) == 50


def test_sft_rows_are_correct_arithmetic_chats():
    for row in synthetic_rows("sft", 100, seed=0):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", user["content"]).groups())
        assert assistant["content"] == f"{a}+{b}={a + b}. The answer is {a + b}."


def test_preference_rows_pair_a_correct_with_a_wrong_sum_or_a_refusal():
    kinds = set()
    for row in synthetic_rows("preference", 100, seed=0):
        assert row["chosen"][0] == row["rejected"][0] and row["prompt"] == row["chosen"][0]["content"]
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", row["prompt"]).groups())
        good = row["chosen"][1]["content"]
        bad = row["rejected"][1]["content"]
        assert good.endswith(f"The answer is {a + b}.")
        wrong = re.search(r"The answer is (-?\d+)\.", bad)
        if wrong:
            assert int(wrong.group(1)) != a + b
            kinds.add("wrong sum")
        else:
            assert bad in REFUSALS
            kinds.add("refusal")
    assert kinds == {"wrong sum", "refusal"}


def test_rlvr_rows_follow_ai2_schema():
    for row in synthetic_rows("rlvr", 100, seed=0):
        assert set(row) == {"messages", "ground_truth", "dataset"}
        assert row["dataset"] == "gsm8k" and isinstance(row["ground_truth"], str)
        (msg,) = row["messages"]
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", msg["content"]).groups())
        assert msg["role"] == "user" and row["ground_truth"] == str(a + b)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sft, preference, rlvr"):
        synthetic_rows("dpo", 1, seed=0)


def test_cli_writes_the_same_file_as_the_function(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cli.jsonl"
    subprocess.run([sys.executable, "-m", "tulu.data.synthetic", "rlvr", "7", "--seed", "5", "--out", str(out)],
                   check=True, cwd=root, capture_output=True)
    assert out.read_bytes() == make_synthetic("rlvr", 7, 5, tmp_path / "fn.jsonl").read_bytes()
    assert json.loads(out.read_text().splitlines()[0])["dataset"] == "gsm8k"
