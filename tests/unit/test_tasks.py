"""Verifiable task data: deterministic by seed, disjoint splits, Ai2's RLVR schema, and SFT answers
that the project's real verifiers accept (while wrong answers, and answers that ignore the
instruction, are rejected)."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from tulu.data import sft_rows, task_rows, write_task_data
from tulu.data.tasks import TASKS, VERIFIERS, problems
from tulu.data.tasks import ifeval as ifeval_task
from tulu.data.tasks.problem import is_heldout
from tulu.rewards import RewardConfig, RewardScorer, get_verifier
from tulu.rewards.gsm8k import GSM8KVerifier
from tulu.rewards.hendrycks_math import MATHVerifier, last_boxed
from tulu.rewards.ifeval import IFEvalVerifier, parse_constraint

MAX_PROMPT_BYTES, MAX_ANSWER_BYTES, MAX_SEQ_LEN = 90, 48, 160


def _prompts(rows):
    return [r["messages"][0]["content"] for r in rows]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("difficulty", [None, {"gsm8k": {"max_operand": 6, "steps": 2}, "math": {"max_denominator": 6}}])
def test_a_careless_teachers_answers_are_rejected_and_draw_the_same_problems(task, difficulty):
    verifier = get_verifier(VERIFIERS[task])
    drawn = problems(task, "train", 2000, seed=0, stream="sft", difficulty=difficulty)
    assert all(verifier.verify(p.answer, p.ground_truth) for p in drawn)
    assert not any(verifier.verify(p.slip, p.ground_truth) for p in drawn)
    clean = sft_rows(task, 2000, seed=0, difficulty=difficulty)
    careless = sft_rows(task, 2000, seed=0, difficulty=difficulty, slip=0.3)
    assert _prompts(careless) == _prompts(clean)
    answers = [r["messages"][1]["content"] for r in careless]
    assert answers == [r["messages"][1]["content"] for r in sft_rows(task, 2000, seed=0, difficulty=difficulty, slip=0.3)]
    slipped = sum(a == p.slip for a, p in zip(answers, drawn))
    assert slipped + sum(a == p.answer for a, p in zip(answers, drawn)) == len(drawn)
    assert 0.25 < slipped / len(drawn) < 0.35
    with pytest.raises(ValueError, match="slip must be a probability"):
        sft_rows(task, 1, seed=0, slip=1.5)


def test_same_arguments_write_byte_identical_files(tmp_path):
    kw = dict(train_per_task=60, heldout_per_task=20, sft_per_task=50)
    a = write_task_data(tmp_path / "a", seed=3, **kw)
    b = write_task_data(tmp_path / "b", seed=3, **kw)
    c = write_task_data(tmp_path / "c", seed=4, **kw)
    assert set(a) == {"sft", "rlvr_train", "heldout", "readme", "card"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    for name in ("sft", "rlvr_train", "heldout"):
        assert a[name].read_bytes() != c[name].read_bytes(), name
    assert not list((tmp_path / "a").glob("*.tmp"))


@pytest.mark.parametrize("task", TASKS)
def test_rows_are_deterministic_by_seed(task):
    assert task_rows(task, "train", 100, seed=1) == task_rows(task, "train", 100, seed=1)
    assert task_rows(task, "train", 100, seed=1) != task_rows(task, "train", 100, seed=2)
    assert task_rows(task, "heldout", 50, seed=1) == task_rows(task, "heldout", 50, seed=1)
    assert sft_rows(task, 100, seed=1) == sft_rows(task, 100, seed=1)
    assert sft_rows(task, 100, seed=1) != sft_rows(task, 100, seed=2)


@pytest.mark.parametrize("task", TASKS)
def test_train_and_heldout_never_share_a_prompt_or_a_problem(task):
    train = problems(task, "train", 3000, seed=0) + problems(task, "train", 3000, seed=0, stream="sft")
    heldout = problems(task, "heldout", 300, seed=0) + problems(task, "heldout", 300, seed=5)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in heldout)
    # Stricter: the problem behind the wording is held out too, not just the sentence.
    assert {p.key for p in train}.isdisjoint(p.key for p in heldout)
    assert all(is_heldout(task, p.key) for p in heldout) and not any(is_heldout(task, p.key) for p in train)
    one_seed = problems(task, "heldout", 300, seed=0)
    assert len({p.prompt for p in one_seed}) == 300, "held-out prompts repeat"
    # The public functions draw from the same splits.
    assert set(_prompts(task_rows(task, "heldout", 300, seed=0))) == {p.prompt for p in one_seed}
    assert set(_prompts(sft_rows(task, 500, seed=0))).isdisjoint(p.prompt for p in heldout)


@pytest.mark.parametrize("task", TASKS)
def test_rlvr_rows_follow_ai2_schema_and_name_a_registered_verifier(task):
    expected = {"gsm8k": GSM8KVerifier, "math": MATHVerifier, "ifeval": IFEvalVerifier}[task]
    rows = task_rows(task, "train", 200, seed=0) + task_rows(task, "heldout", 100, seed=0)
    for row in rows:
        assert set(row) == {"messages", "ground_truth", "dataset"}
        (msg,) = row["messages"]
        assert msg["role"] == "user" and isinstance(msg["content"], str) and msg["content"]
        assert isinstance(row["ground_truth"], str) and row["ground_truth"]
        assert row["dataset"] == VERIFIERS[task]
    assert isinstance(get_verifier(VERIFIERS[task]), expected)


def test_ifeval_ground_truth_is_ai2_json_with_every_argument():
    ai2_keys = ["func_name", "N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words",
                "letter", "i", "first_word", "postscript_marker", "options", "section_splitter",
                "original_prompt"]
    funcs = Counter()
    for row in task_rows("ifeval", "train", 500, seed=0):
        gt = json.loads(row["ground_truth"])
        assert list(gt) == ai2_keys
        func_name, _ = parse_constraint(row["ground_truth"])
        funcs[func_name] += 1
    assert set(funcs) == {"validate_lowercase", "validate_frequency_capital_words", "validate_quotation",
                          "validate_end", "verify_keywords", "validate_word_constraint"}


def test_an_empty_answer_meets_only_the_lowercase_and_at_most_constraints():
    # A checker property (Ai2's and Google's), pinned so RLVR curves on ifeval are read with it in mind.
    verifier = IFEvalVerifier()
    met = {family for family, _, _, call in ifeval_task.constraints()
           if verifier.verify("", ifeval_task.ground_truth(**call))}
    assert met == {"lowercase", "at_most"}


@pytest.mark.parametrize("task", TASKS)
def test_every_sft_answer_verifies_against_its_ground_truth(task):
    verifier = get_verifier(VERIFIERS[task])
    found = problems(task, "train", 1000, seed=0, stream="sft")
    assert sft_rows(task, 1000, seed=0) == [
        {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}]}
        for p in found]
    failed = [(p.answer, p.ground_truth) for p in found if not verifier.verify(p.answer, p.ground_truth)]
    assert not failed, failed[:5]


def test_math_answers_need_the_equivalence_check():
    found = problems("math", "train", 1000, seed=0, stream="sft")
    # Boxed unsimplified (6/9 for 2/3): only math-verify's equivalence test accepts these.
    unsimplified = [p for p in found if last_boxed(p.answer) != p.ground_truth]
    # Worked down to lowest terms first: "2/9+4/9=6/9=2/3. \\boxed{\\frac{2}{3}}".
    simplified = [p for p in found if p.answer.split(". ")[0].count("=") == 2]
    assert len(unsimplified) > 100 and len(simplified) > 100
    assert MATHVerifier().verify("2/9+4/9=6/9. \\boxed{\\frac{6}{9}}", "\\frac{2}{3}")
    assert MATHVerifier().verify("\\boxed{\\frac{8}{4}}", "2")


def test_wrong_answers_are_rejected():
    gsm, math = GSM8KVerifier(), MATHVerifier()
    for p in problems("gsm8k", "train", 200, seed=0):
        value = int(p.ground_truth)
        assert not gsm.verify(p.answer.replace(f"is {value}.", f"is {value + 1}."), p.ground_truth)
        with pytest.raises(ValueError):
            gsm.verify(p.answer, "no number")
    for p in problems("math", "train", 200, seed=0):
        boxed = last_boxed(p.answer)
        wrong = p.answer.replace(f"\\boxed{{{boxed}}}", f"\\boxed{{{boxed}+1}}")
        assert wrong != p.answer and not math.verify(wrong, p.ground_truth), wrong
        assert not math.verify(p.answer.split(". ")[0], p.ground_truth), "an unboxed answer earned the reward"


def test_gsm8k_refusals_score_nothing():
    gsm = GSM8KVerifier()
    for p in problems("gsm8k", "train", 50, seed=0):
        assert not gsm.verify("I do not know.", p.ground_truth)


@pytest.mark.parametrize("topic, sentence, verb", ifeval_task.TOPICS)
def test_each_ifeval_answer_meets_only_its_own_constraint_family(topic, sentence, verb):
    verifier = IFEvalVerifier()
    cons = ifeval_task.constraints()
    gts = [ifeval_task.ground_truth(**call) for *_, call in cons]
    # The plain sentence (what a model says when it ignores the instruction) meets none.
    assert not any(verifier.verify(sentence, gt) for gt in gts)
    for family, variant, _, _ in cons:
        answer = ifeval_task.target(family, variant, sentence, verb)
        for (other_family, other_variant, _, _), gt in zip(cons, gts):
            ok = verifier.verify(answer, gt)
            if (other_family, other_variant) == (family, variant):
                assert ok, (answer, gt)
            elif other_family != family or other_family in ("end", "keyword"):
                assert not ok, f"{answer!r} also meets {other_family} {other_variant}"


@pytest.mark.parametrize("task", TASKS)
def test_chats_fit_the_tiny_models_context(task):
    from tulu.data.chat import ChatFormat
    from tulu.data.tokenizer import build_tiny_tokenizer

    found = problems(task, "train", 3000, seed=0) + problems(task, "heldout", 200, seed=0)
    assert max(len(p.prompt.encode()) for p in found) <= MAX_PROMPT_BYTES
    assert max(len(p.answer.encode()) for p in found) <= MAX_ANSWER_BYTES
    fmt = ChatFormat(build_tiny_tokenizer())
    longest = max(found, key=lambda p: len(p.prompt.encode()) + len(p.answer.encode()))
    chat = fmt.tokenize([{"role": "user", "content": longest.prompt},
                         {"role": "assistant", "content": longest.answer}])
    assert len(chat.input_ids) <= MAX_SEQ_LEN


def test_unknown_task_or_split_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown task 'mbpp'; choose one of gsm8k, math, ifeval"):
        task_rows("mbpp", "train", 1, seed=0)
    with pytest.raises(ValueError, match="unknown task 'MATH'; choose one of gsm8k, math, ifeval"):
        sft_rows("MATH", 1, seed=0)
    with pytest.raises(ValueError, match="unknown split 'test'; choose one of train, heldout"):
        task_rows("gsm8k", "test", 1, seed=0)


def test_asking_for_more_heldout_prompts_than_exist_fails_clearly(monkeypatch):
    monkeypatch.setattr("tulu.data.tasks._MAX_FRUITLESS_DRAWS", 2000)  # give up sooner: same path
    with pytest.raises(ValueError, match=r"found only \d+ distinct held-out ifeval prompts, 5000 asked"):
        task_rows("ifeval", "heldout", 5000, seed=0)


def test_written_files_mix_the_tasks_and_the_card_counts_them(tmp_path):
    paths = write_task_data(tmp_path, seed=0, train_per_task=40, heldout_per_task=30, sft_per_task=50)
    read = {name: [json.loads(line) for line in paths[name].read_text().splitlines()]
            for name in ("sft", "rlvr_train", "heldout")}
    assert Counter(r["dataset"] for r in read["rlvr_train"]) == {"gsm8k": 40, "MATH": 40, "ifeval": 40}
    assert Counter(r["dataset"] for r in read["heldout"]) == {"gsm8k": 30, "MATH": 30, "ifeval": 30}
    assert len(read["sft"]) == 150 and all(len(r["messages"]) == 2 for r in read["sft"])
    assert len({r["dataset"] for r in read["rlvr_train"][:12]}) > 1, "tasks are not shuffled together"
    held = set(_prompts(read["heldout"]))
    assert held.isdisjoint(_prompts(read["sft"])) and held.isdisjoint(_prompts(read["rlvr_train"]))
    card = json.loads(paths["card"].read_text())
    assert card["seed"] == 0
    assert card["tasks"]["math"] == {"verifier": "MATH", "sft": 50, "rlvr_train": 40, "heldout": 30}
    assert card["files"]["heldout"]["rows"] == 90
    readme = paths["readme"].read_text()
    assert "| math | MATH | 50 | 40 | 30 |" in readme and card["files"]["sft"]["sha256"] in readme


def test_a_subset_of_tasks_writes_only_those(tmp_path):
    paths = write_task_data(tmp_path, seed=0, train_per_task=5, heldout_per_task=5, sft_per_task=5,
                            tasks=["ifeval"])
    assert {json.loads(line)["dataset"] for line in paths["heldout"].read_text().splitlines()} == {"ifeval"}
    assert list(json.loads(paths["card"].read_text())["tasks"]) == ["ifeval"]
    with pytest.raises(ValueError, match="unknown task 'code'; choose one of gsm8k, math, ifeval"):
        write_task_data(tmp_path, seed=0, train_per_task=5, heldout_per_task=5, sft_per_task=5,
                        tasks=["gsm8k", "code"])


def test_scorer_scores_task_rows_by_their_dataset():
    rows, expected = [], []
    for task in TASKS:
        for p in problems(task, "train", 3, seed=0, stream="sft"):
            rows.append({"dataset": VERIFIERS[task], "ground_truth": p.ground_truth, "completion": p.answer})
            rows.append({"dataset": VERIFIERS[task], "ground_truth": p.ground_truth, "completion": "No idea."})
            expected += [1.0, 0.0]
    with RewardScorer(RewardConfig(verified_reward=1.0), workers=1, timeout_s=30.0) as scorer:
        results = scorer.score(rows)
    assert [r.error for r in results] == [None] * len(rows)
    assert [r.reward for r in results] == expected


def test_cli_writes_the_files_and_prints_their_paths(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tulu.data.tasks", str(tmp_path / "d"), "--seed", "2",
         "--train-per-task", "5", "--heldout-per-task", "4", "--sft-per-task", "6"],
        capture_output=True, text=True, check=True)
    printed = out.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == [
        "sft.jsonl", "rlvr_train.jsonl", "heldout.jsonl", "README.md", "card.json"]
    assert json.loads((tmp_path / "d" / "card.json").read_text())["files"]["sft"]["rows"] == 18


def test_difficulty_bounds_the_numbers_and_keeps_verifiable_answers():
    """Smaller operands/denominators on request; the default is the module's constant, so data
    written without `difficulty` is unchanged."""
    easy = {"gsm8k": {"max_operand": 6}, "math": {"max_denominator": 4}}
    assert problems("gsm8k", "train", 50, seed=2) == problems("gsm8k", "train", 50, seed=2,
                                                               difficulty={"gsm8k": {"max_operand": 20}})
    for p in problems("gsm8k", "train", 300, seed=2, difficulty=easy):
        op, a, b = p.key.split()
        assert (int(a) <= 6 and int(b) <= 6) if op == "+" else True
        assert (int(a) <= 9) if op == "-" else True
        assert GSM8KVerifier().verify(p.answer, p.ground_truth)
    for p in problems("math", "heldout", 10, seed=2, difficulty=easy):
        assert int(p.key.split()[-1]) <= 4
        assert MATHVerifier().verify(p.answer, p.ground_truth)
    with pytest.raises(ValueError, match="max_operand"):
        problems("gsm8k", "train", 1, seed=0, difficulty={"gsm8k": {"max_operand": 3}})


def test_two_step_word_problems_chain_facts_the_training_stories_hold():
    """steps=2: a held-out story is a new chain, and each of its two facts ("7+5=12", "12-4=8")
    is in some training answer - what a tiny model can learn, where a one-step held-out story
    asks a fact it never saw."""
    two = {"gsm8k": {"max_operand": 8, "steps": 2}}
    train = problems("gsm8k", "train", 3000, seed=1, stream="sft", difficulty=two)
    heldout = problems("gsm8k", "heldout", 200, seed=1, difficulty=two)
    assert {p.key for p in train}.isdisjoint(p.key for p in heldout)

    def facts(p):
        return p.answer.split(". The answer is")[0].split(". ")

    trained = {f for p in train for f in facts(p)}
    held_facts = [f for p in heldout for f in facts(p)]
    assert all(len(facts(p)) == 2 for p in heldout)
    assert sum(f in trained for f in held_facts) / len(held_facts) > 0.95
    for p in train[:500] + heldout:
        assert len(p.prompt.encode()) < MAX_PROMPT_BYTES and len(p.answer.encode()) < MAX_ANSWER_BYTES
        assert GSM8KVerifier().verify(p.answer, p.ground_truth)
        assert int(p.ground_truth) >= 1
    assert problems("gsm8k", "train", 50, seed=2) == problems(
        "gsm8k", "train", 50, seed=2, difficulty={"gsm8k": {"steps": 1}}), "steps=1 is the old data"
    with pytest.raises(ValueError, match="steps"):
        problems("gsm8k", "train", 1, seed=0, difficulty={"gsm8k": {"steps": 3}})
