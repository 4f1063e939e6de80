"""Data package: GSM8K loaders and split slicing, the generated task, SFT/generation batches."""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_assets import FIXTURES
from torch.utils.data import DataLoader

from llada_trm.data.collate import (
    SFTDataset,
    collate_batch,
    encode_answer,
    encode_example,
    encode_prompt,
    prompt_batch,
)
from llada_trm.data.disjoint import check_disjoint, question_hash
from llada_trm.data.gsm8k import (
    DataError,
    GSM8KRecord,
    extract_final_answer,
    load_gsm8k,
    parse_split,
    write_jsonl,
)
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems, is_test_question, question_split
from llada_trm.data.tokenizer import build_tokenizer, special_token_ids

FIXTURE = FIXTURES / "gsm8k_small.jsonl"
REAL_GSM8K = Path("/work/shared/data/gsm8k")


def _fixture_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------
# records and loaders
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_fixture_loads_in_order():
    records = load_gsm8k(FIXTURE)
    rows = _fixture_rows()
    assert [r.question for r in records] == [row["question"] for row in rows]
    assert [r.answer for r in records] == [row["answer"] for row in rows]
    assert all(isinstance(r, GSM8KRecord) for r in records)


def test_final_answer_is_normalised():
    records = load_gsm8k(FIXTURE)
    assert [r.final_answer for r in records] == ["3", "8", "1750", "8", "45", "16"]
    assert GSM8KRecord("q", "no marker here").final_answer is None
    assert extract_final_answer("a\n#### -1,234.5 \n") == "-1234.5"
    with pytest.raises(AttributeError):
        records[0].question = "changed"  # frozen


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("train", ("train", slice(None, None))),
        ("test[:200]", ("test", slice(None, 200))),
        ("test[-200:]", ("test", slice(-200, None))),
        ("train[10:20]", ("train", slice(10, 20))),
        ("train[:10%]", ("train", slice(None, 0.1))),
        ("train[-25%:]", ("train", slice(-0.25, None))),
        (" validation [ 5 : ] ", ("validation", slice(5, None))),
    ],
)
def test_parse_split(spec, expected):
    assert parse_split(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "train[", "train[5]", "train[1:2:3]", "train[a:b]", "train[:1.5]", "train[:150%]", "tr ain"]
)
def test_parse_split_rejects_bad_specs(spec):
    with pytest.raises(DataError, match="bad split"):
        parse_split(spec)


@pytest.mark.parametrize(
    ("split", "indices"),
    [("train[:2]", [0, 1]), ("train[-2:]", [4, 5]), ("train[1:3]", [1, 2]), ("train[:50%]", [0, 1, 2]),
     ("train[-50%:]", [3, 4, 5]), ("train", [0, 1, 2, 3, 4, 5])],
)  # fmt: skip
def test_split_slicing_on_a_file(split, indices):
    everything = load_gsm8k(FIXTURE)
    assert load_gsm8k(FIXTURE, split) == [everything[i] for i in indices]


def test_empty_selection_is_an_error():
    with pytest.raises(DataError, match="selects no records"):
        load_gsm8k(FIXTURE, "train[4:2]")


def test_directory_source_picks_the_named_split(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "test.jsonl")
    write_jsonl(load_gsm8k(FIXTURE, "train[:2]"), tmp_path / "train.jsonl")
    assert len(load_gsm8k(tmp_path, "train")) == 2
    assert load_gsm8k(tmp_path, "test[-1:]") == load_gsm8k(FIXTURE, "train[-1:]")
    with pytest.raises(DataError, match="no validation.jsonl"):
        load_gsm8k(tmp_path, "validation")


def test_write_jsonl_round_trip(tmp_path):
    records = load_gsm8k(FIXTURE)
    path = write_jsonl(records, tmp_path / "out" / "copy.jsonl")
    assert load_gsm8k(path) == records
    assert "’" in path.read_text(encoding="utf-8")  # written as UTF-8, not escaped


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    path = _write(tmp_path, [good, "", good, '{"question": "q", "answer": '])
    with pytest.raises(DataError, match=re.escape(f"{path}:4: invalid JSON")):
        load_gsm8k(path)


def test_missing_key_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    path = _write(tmp_path, [good, good, json.dumps({"question": "only a question"})])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: missing key 'answer'")):
        load_gsm8k(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('["question", "answer"]', "expected a JSON object"),
        ('{"question": 3, "answer": "a"}', "key 'question' must be a string"),
    ],
)
def test_wrong_row_types_are_errors(tmp_path, line, message):
    path = _write(tmp_path, [line])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: ") + message):
        load_gsm8k(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_gsm8k(path)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_gsm8k(tmp_path / "nope.jsonl")
    odd = tmp_path / "data.csv"
    odd.write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown file type"):
        load_gsm8k(odd)


def test_hub_name_without_local_dataset_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pass a local JSONL/parquet file"):
            load_gsm8k("openai/gsm8k", "test")
    else:  # with datasets installed the cache may or may not hold it; a miss must still be a DataError
        try:
            records = load_gsm8k("openai/gsm8k", "test[:3]")
        except DataError as err:
            assert "local" in str(err)
        else:
            assert len(records) == 3


def test_parquet_round_trip_and_sharded_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _fixture_rows()
    table = pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
    pq.write_table(table, tmp_path / "train.parquet")
    assert load_gsm8k(tmp_path / "train.parquet") == load_gsm8k(FIXTURE)
    assert load_gsm8k(tmp_path, "train[1:3]") == load_gsm8k(FIXTURE, "train[1:3]")
    # the Hugging Face repository layout: main/test-00000-of-00001.parquet
    (tmp_path / "hub" / "main").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hub" / "main" / "test-00000-of-00001.parquet")
    assert load_gsm8k(tmp_path / "hub", "test[:2]") == load_gsm8k(FIXTURE, "train[:2]")
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="missing column 'answer'"):
        load_gsm8k(tmp_path / "bad.parquet")


@pytest.mark.skipif(not (REAL_GSM8K / "test.jsonl").is_file(), reason="real GSM8K not available")
def test_real_gsm8k_smoke():
    records = load_gsm8k(REAL_GSM8K, "test")
    assert len(records) == 1319
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r.final_answer or "") for r in records)
    assert load_gsm8k(REAL_GSM8K / "test.jsonl", "test[:5]") == records[:5]


# ---------------------------------------------------------------------------------------------------------
# the generated task
# ---------------------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def _evaluate(expr: str) -> float:
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def _steps(record: GSM8KRecord) -> list[tuple[str, int]]:
    return [(expr, int(value)) for expr, value in _ANNOTATION.findall(record.answer)]


def test_annotations_are_correct_and_end_in_the_final_answer():
    problems = generate_problems(SyntheticTaskConfig(seed=3), 300)
    for record in problems:
        steps = _steps(record)
        lines = record.answer.splitlines()
        assert len(steps) == len(lines) - 1, record.answer  # one annotated line per step, then '#### n'
        for expr, value in steps:
            assert _evaluate(expr) == value, record.answer
            assert value >= 0
        assert lines[-1] == f"#### {steps[-1][1]}"
        assert record.final_answer == str(steps[-1][1])
        # each step starts from the previous result
        for (_, previous), (expr, _) in zip(steps, steps[1:], strict=False):
            assert int(re.match(r"\d+", expr).group()) == previous, record.answer


def test_generation_is_deterministic_and_prefix_stable():
    config = SyntheticTaskConfig(seed=7)
    first = generate_problems(config, 50)
    assert first == generate_problems(config, 50)
    assert generate_problems(config, 20) == first[:20]
    assert generate_problems(config, 50, seed=8) != first
    assert generate_problems(SyntheticTaskConfig(seed=8), 50) == generate_problems(config, 50, seed=8)


def test_train_and_test_never_share_a_question():
    config = SyntheticTaskConfig(seed=0, max_steps=2, max_number=12)
    train = generate_problems(config, 2000, "train")
    test = generate_problems(config, 200, "test")
    assert len({r.question for r in train}) == 2000 and len({r.question for r in test}) == 200
    assert not {r.question for r in train} & {r.question for r in test}
    assert all(is_test_question(r.question, config.test_fraction) for r in test)
    assert not any(is_test_question(r.question, config.test_fraction) for r in train)


def test_validation_and_test_are_disjoint_halves_of_the_held_out_buckets():
    config = SyntheticTaskConfig(seed=0, max_steps=2, max_number=12, max_result=100)
    train = generate_problems(config, 2000, "train")
    validation = generate_problems(config, 200, "validation")
    test = generate_problems(config, 200, "test")
    assert [question_split(r.question, config.test_fraction) for r in validation] == ["validation"] * 200
    assert [question_split(r.question, config.test_fraction) for r in test] == ["test"] * 200
    assert all(is_test_question(r.question, config.test_fraction) for r in validation)  # held out
    check = check_disjoint({"train": train, "validation": validation, "test": test})
    assert check["overlaps"] == 0 and check["problems"] == {"train": 2000, "validation": 200, "test": 200}
    # the train split is the one the embedded backbone was pre-trained on: pinned, byte for byte
    text = "\n".join(r.question + r.answer for r in train[:500])
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "acb6226e375eb1611e01c92d3ac6f7f9970920169f99472731aa31d493b12c48"
    )


def test_an_injected_overlap_is_refused_in_one_line():
    config = SyntheticTaskConfig(seed=0, max_steps=2, max_number=12, max_result=100)
    validation = generate_problems(config, 20, "validation")
    test = generate_problems(config, 20, "test")
    spaced = GSM8KRecord(question="  " + validation[3].question.upper().replace(" ", "  "), answer="")
    with pytest.raises(DataError, match=r"validation and test splits share 1 problem") as caught:
        check_disjoint({"validation": validation, "test": [*test, spaced]})
    assert len(str(caught.value).splitlines()) == 1
    assert question_hash(spaced.question) == question_hash(validation[3].question)


def test_difficulty_knobs():
    config = SyntheticTaskConfig(
        min_steps=2, max_steps=3, max_number=9, max_result=200, operations=("+", "*")
    )
    problems = generate_problems(config, 200)
    step_counts = {len(_steps(r)) for r in problems}
    assert step_counts == {2, 3}
    for record in problems:
        assert all(op in "+*" for expr, _ in _steps(record) for op in re.findall(r"[-+*/]", expr))
        assert all(int(n) <= 9 for n in re.findall(r"\d+", record.question))
        assert all(value <= 200 for _, value in _steps(record))
    single = generate_problems(SyntheticTaskConfig(min_steps=1, max_steps=1, operations=["/"]), 50)
    assert all(len(_steps(r)) == 1 and "/" in _steps(r)[0][0] for r in single)


def test_every_operation_and_step_count_appears_and_problems_stay_short():
    problems = generate_problems(SyntheticTaskConfig(), 500)
    ops = {op for r in problems for expr, _ in _steps(r) for op in re.findall(r"[-+*/]", expr)}
    assert ops == {"+", "-", "*", "/"}
    assert {len(_steps(r)) for r in problems} == {1, 2, 3, 4}
    assert max(len(r.question.split()) for r in problems) <= 60
    assert max(len(r.answer.splitlines()) for r in problems) <= 5


def test_bad_configs_and_exhausted_spaces_are_clear_errors():
    with pytest.raises(ValueError, match="min_steps"):
        SyntheticTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="operations"):
        SyntheticTaskConfig(operations=("+", "^"))
    with pytest.raises(ValueError, match="max_number"):
        SyntheticTaskConfig(max_number=1)
    with pytest.raises(ValueError, match="split"):
        generate_problems(SyntheticTaskConfig(), 3, split="dev")
    tiny = SyntheticTaskConfig(
        max_steps=1, max_number=3, operations=("+",), names=("Al", "Bo"), items=("pens",)
    )
    with pytest.raises(DataError, match="could only generate"):
        generate_problems(tiny, 1000)


# ---------------------------------------------------------------------------------------------------------
# encoding, collation, prompts
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    problems = generate_problems(SyntheticTaskConfig(seed=11), 300)
    texts = [text for r in problems for text in (r.question, r.answer)]
    return build_tokenizer(texts, vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))


def test_encode_example_layout(tokenizer):
    record = load_gsm8k(FIXTURE)[1]
    ids = special_token_ids(tokenizer)
    example = encode_example(tokenizer, record, max_length=256)
    prompt = encode_prompt(tokenizer, record.question)
    assert example["prompt_length"] == len(prompt)
    assert example["input_ids"][: len(prompt)] == prompt
    assert prompt[0] == ids.bos
    answer = example["input_ids"][len(prompt) :]
    assert answer[-2:] == [ids.eot, ids.eos]
    assert tokenizer.decode(answer[:-2]) == record.answer
    assert encode_answer(tokenizer, record.answer, end_with_eot=False)[-2:] != [ids.eot, ids.eos]


def test_overlong_examples_are_skipped_or_truncated(tokenizer):
    record = load_gsm8k(FIXTURE)[4]
    full = encode_example(tokenizer, record, max_length=512)
    n, p = len(full["input_ids"]), full["prompt_length"]
    assert encode_example(tokenizer, record, max_length=n) == full
    assert encode_example(tokenizer, record, max_length=n - 1) is None
    cut = encode_example(tokenizer, record, max_length=n - 3, overflow="truncate")
    assert cut["input_ids"] == full["input_ids"][: n - 3] and cut["prompt_length"] == p
    assert encode_example(tokenizer, record, max_length=p, overflow="truncate") is None  # no room for answer
    with pytest.raises(ValueError, match="overflow"):
        encode_example(tokenizer, record, max_length=n, overflow="wrap")


def test_collate_batch_pads_right_with_eos(tokenizer):
    ids = special_token_ids(tokenizer)
    examples = [encode_example(tokenizer, r, max_length=512) for r in load_gsm8k(FIXTURE, "train[:3]")]
    batch = collate_batch(examples, ids.pad)
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
    assert batch["prompt_lengths"].tolist() == [e["prompt_length"] for e in examples]
    assert batch["answer_lengths"].tolist() == [width - e["prompt_length"] for e in examples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert (batch["input_ids"][row, n:] == ids.eos).all()
    fixed = collate_batch(examples, ids.pad, pad_to=width + 5)
    assert fixed["input_ids"].shape == (3, width + 5)
    assert fixed["answer_lengths"].tolist() == [width + 5 - e["prompt_length"] for e in examples]
    with pytest.raises(ValueError, match="pad_to"):
        collate_batch(examples, ids.pad, pad_to=width - 1)
    with pytest.raises(ValueError, match="at least one"):
        collate_batch([], ids.pad)


def test_prompt_batch_pads_left(tokenizer):
    questions = [r.question for r in load_gsm8k(FIXTURE, "train[:3]")]
    input_ids, attention_mask = prompt_batch(tokenizer, questions)
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    assert input_ids.shape == attention_mask.shape == (3, width)
    assert attention_mask[:, -1].all()  # every prompt ends at the last column
    pad = special_token_ids(tokenizer).pad
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        assert input_ids[row, start:].tolist() == prompt
        assert (input_ids[row, :start] == pad).all() and not attention_mask[row, :start].any()
    with pytest.raises(ValueError, match="list of question"):
        prompt_batch(tokenizer, "just one string")


def test_sft_dataset_counts_and_loads(tokenizer):
    records = load_gsm8k(FIXTURE)
    lengths = [len(encode_example(tokenizer, r, max_length=512)["input_ids"]) for r in records]
    limit = sorted(lengths)[3]
    too_long = sum(n > limit for n in lengths)
    skipping = SFTDataset(tokenizer, records, max_length=limit)
    assert len(skipping) == len(records) - too_long and skipping.num_skipped == too_long
    truncating = SFTDataset(tokenizer, records, max_length=limit, overflow="truncate", pad_to=limit)
    assert len(truncating) == len(records) and truncating.num_truncated == too_long
    loader = DataLoader(truncating, batch_size=4, collate_fn=truncating.collate)
    batches = list(loader)
    assert [b["input_ids"].shape for b in batches] == [(4, limit), (2, limit)]
    assert all((b["answer_lengths"] + b["prompt_lengths"] == limit).all() for b in batches)
