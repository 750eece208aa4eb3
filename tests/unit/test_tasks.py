"""Task data: prompts from JSONL, Parquet, Arrow and directories of them, with configurable keys,
chat messages and metadata; chat rendering; the math_verify reward; metadata reaching rewards."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routing_replay.orchestration.rewards import RewardWorker
from routing_replay.tasks import check_chat_template, load_prompts, prompt_token_ids
from routing_replay.tasks import math as math_task

CHAT = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 3 + 4?"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from routing_replay.tiny_models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_jsonl_with_configured_keys_and_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1 + 1 =", "solution": 2, "level": 3, "tags": ["a"], "x": 0})
                    + "\n\n" + json.dumps({"question": "2 + 2 =", "solution": "4", "level": 1, "tags": []}) + "\n")
    records = load_prompts("mine", str(path), seed=0, prompt_key="question", answer_key="solution",
                           metadata_keys=["level", "tags"])
    assert records == [{"prompt": "1 + 1 =", "answer": 2, "metadata": {"level": 3, "tags": ["a"]}},
                       {"prompt": "2 + 2 =", "answer": "4", "metadata": {"level": 1, "tags": []}}]


def test_parquet_chat_messages_and_metadata_become_python_values(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [
        {"messages": CHAT, "answer": "7", "difficulty": 2, "extra": {"source": "s", "ids": [1, 2]}, "unused": 1.5},
        {"messages": CHAT[1:], "answer": "7", "difficulty": 5, "extra": {"source": "t", "ids": []}, "unused": 0.0},
    ])
    records = load_prompts("mine", str(path), seed=0, prompt_key="messages", metadata_keys=["difficulty", "extra"],
                           chat=True)
    assert records[0] == {"prompt": CHAT, "answer": "7", "metadata": {"difficulty": 2,
                                                                     "extra": {"source": "s", "ids": [1, 2]}}}
    assert records[1]["prompt"] == CHAT[1:] and records[1]["metadata"]["difficulty"] == 5
    json.dumps(records)  # plain Python values
    # A string prompt is allowed with chat (rendered as one user message).
    path = write_parquet(tmp_path / "plain.parquet", [{"prompt": "hi", "answer": "x"}])
    assert load_prompts("mine", str(path), seed=0, chat=True)[0]["prompt"] == "hi"


def test_a_directory_is_read_in_file_name_order_across_formats(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "train-00001-of-00002.parquet", [{"prompt": "c", "answer": "3"}])
    write_parquet(data / "train-00000-of-00002.parquet", [{"prompt": "a", "answer": "1"},
                                                          {"prompt": "b", "answer": "2"}])
    write_jsonl(data / "zz-extra.jsonl", [{"prompt": "d", "answer": "4"}])
    (data / "README.md").write_text("not data")
    assert [r["prompt"] for r in load_prompts("mine", str(data), seed=0)] == ["a", "b", "c", "d"]
    # A glob picks files (e.g. one split of a hub dataset's data/ folder).
    assert [r["prompt"] for r in load_prompts("mine", str(data / "train-*.parquet"), seed=0)] == ["a", "b", "c"]


def test_a_datasets_save_to_disk_directory_of_arrow_streams(tmp_path):
    """``datasets.Dataset.save_to_disk`` writes ``data-*.arrow`` (Arrow IPC streams) with
    ``dataset_info.json`` and ``state.json``; a ``DatasetDict`` adds a folder per split."""
    split = tmp_path / "dd" / "train"
    split.mkdir(parents=True)
    table = pa.Table.from_pylist([{"prompt": CHAT, "answer": "7", "id": 0}, {"prompt": CHAT, "answer": "8", "id": 1}])
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (split / "dataset_info.json").write_text("{}")
    (split / "cache-0123abcd.arrow").write_bytes(b"a datasets cache file: not data")
    records = load_prompts("mine", str(split), seed=0, metadata_keys=["id"], chat=True)
    assert [(r["answer"], r["metadata"]) for r in records] == [("7", {"id": 0}), ("8", {"id": 1})]
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"dd is a datasets DatasetDict: set task.prompts to one split's directory "
                                         r"\(one of \['train'\]\)"):
        load_prompts("mine", str(tmp_path / "dd"), seed=0)


def test_every_error_names_the_file_the_line_or_row_and_the_key(tmp_path):
    def fails(match, path, **keys):
        with pytest.raises(ValueError, match=match):
            load_prompts("mine", str(path), seed=0, **keys)

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"\n')
    fails(r"p.jsonl:2: not JSON", jsonl)
    write_jsonl(jsonl, [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    fails(r"p.jsonl:2: 'prompt' \(task.prompt_key\) is missing; the record's keys: \['answer', 'question'\]", jsonl)
    write_jsonl(jsonl, [{"prompt": "a"}])
    fails(r"p.jsonl:1: 'answer' \(task.answer_key\) is missing", jsonl)
    write_jsonl(jsonl, [{"prompt": "a", "answer": None}])
    fails(r"p.jsonl:1: 'answer' \(task.answer_key\) is null", jsonl)
    write_jsonl(jsonl, [{"prompt": "a", "answer": "1", "level": 1}, {"prompt": "b", "answer": "2"}])
    fails(r"p.jsonl:2: 'level' \(task.metadata_keys\) is missing", jsonl, metadata_keys=["level"])
    write_jsonl(jsonl, [{"prompt": 3, "answer": "1"}])
    fails(r"p.jsonl:1: a record needs a string 'prompt' \(or, with task.chat, a list of", jsonl)
    write_jsonl(jsonl, [["a", "1"]])
    fails(r"p.jsonl:1: a record must be a JSON object, not list", jsonl)
    write_jsonl(jsonl, [{"prompt": CHAT, "answer": "7"}])
    fails(r"p.jsonl:1: 'prompt' is a list \(chat messages\?\): set task.chat: true", jsonl)
    write_jsonl(jsonl, [{"prompt": [{"role": "user"}], "answer": "7"}])
    fails(r"p.jsonl:1: 'prompt' message 0 needs a string 'role' and 'content'", jsonl, chat=True)
    write_jsonl(jsonl, [{"prompt": [], "answer": "7"}])
    fails(r"p.jsonl:1: 'prompt' is an empty message list", jsonl, chat=True)

    parquet = write_parquet(tmp_path / "t.parquet", [{"q": "a", "answer": "1", "level": 1},
                                                     {"q": "b", "answer": "2", "level": None}])
    fails(r"t.parquet: no column 'prompt' \(task.prompt_key\); the columns: \['q', 'answer', 'level'\]", parquet)
    fails(r"t.parquet: no column 'solution' \(task.answer_key\)", parquet, prompt_key="q", answer_key="solution")
    fails(r"t.parquet: no column 'topic' \(task.metadata_keys\)", parquet, prompt_key="q", metadata_keys=["topic"])
    fails(r"t.parquet: row 1: 'level' \(task.metadata_keys\) is null", parquet, prompt_key="q", metadata_keys=["level"])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    fails(r"broken.parquet: not a readable parquet file", tmp_path / "broken.parquet")

    fails(r"missing.jsonl: no such file or directory", tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    fails(r"empty: a directory without \*.jsonl/\*.parquet/\*.arrow files", tmp_path / "empty")
    fails(r"nothing-\*.parquet: no file matches", tmp_path / "nothing-*.parquet")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    fails(r"blank.jsonl: no prompts", tmp_path / "blank.jsonl")


def test_built_in_prompts_are_normalised_and_refuse_file_keys():
    records = load_prompts("addition", None, seed=1, count=5, args={"max_operand": 9})
    assert all(set(r) == {"prompt", "answer", "metadata"} and r["metadata"] == {} for r in records)
    with pytest.raises(ValueError, match="task.prompt_key, task.answer_key and task.metadata_keys apply to the "
                                         "records of task.prompts"):
        load_prompts("addition", None, seed=1, metadata_keys=["level"])


def test_chat_rendering_is_the_chat_template_applied_by_hand(tokenizer):
    by_hand = ("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
               "<|im_start|>assistant\n")
    ids = prompt_token_ids(tokenizer, {"prompt": CHAT}, chat=True)
    assert ids == tokenizer(by_hand, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == by_hand
    assert ids == list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])
    # A string prompt with chat is one user message; without chat the plain encoding is unchanged.
    assert prompt_token_ids(tokenizer, {"prompt": "What is 3 + 4?"}, chat=True) == \
        prompt_token_ids(tokenizer, {"prompt": CHAT[1:]}, chat=True)
    assert prompt_token_ids(tokenizer, {"prompt": "What is 3 + 4?"}, chat=False) == \
        tokenizer("What is 3 + 4?").input_ids
    with pytest.raises(ValueError, match="needs task.chat: true"):
        prompt_token_ids(tokenizer, {"prompt": CHAT}, chat=False)


def test_chat_needs_a_tokenizer_with_a_template_that_renders_the_prompts(tokenizer):
    check_chat_template(tokenizer, True, [{"prompt": CHAT}])
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        check_chat_template(tokenizer, False)  # not needed without chat
        with pytest.raises(ValueError, match="task.chat is true but the tokenizer of m has no chat template"):
            check_chat_template(tokenizer, True, source="the tokenizer of m")
        tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
                                   "{% endif %}")
        with pytest.raises(ValueError, match="cannot render the first prompt .*no system"):
            check_chat_template(tokenizer, True, [{"prompt": CHAT}])
    finally:
        tokenizer.chat_template = template


@pytest.mark.parametrize(("answer", "response", "expected"), [
    ("0.5", "so the answer is \\boxed{1/2}", 1.0),
    ("0.5", "$\\boxed{\\frac{1}{2}}$", 1.0),
    ("3/4", "so the result is \\boxed{\\frac{3}{4}}", 1.0),
    (3, "Solving, x = 3", 1.0),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", 1.0),
    ("1200", "the total is 1,200.", 1.0),
    ("x+1", "\\boxed{1+x}", 1.0),
    ("3", "Solving, x = 4", 0.0),
    ("0.5", "\\boxed{\\frac{1}{3}}", 0.0),
    ("2", "I do not know", 0.0),
    ("2", "", 0.0),
])
def test_math_reward_verifies_the_final_answer_with_math_verify(answer, response, expected):
    assert math_task.reward({"answer": answer, "metadata": {}}, response) == expected


def test_math_reward_works_off_the_main_thread():
    """math_verify's signal-based timeout only works on the main thread: elsewhere it runs without."""
    out = []
    thread = threading.Thread(target=lambda: out.append([math_task.reward({"answer": "0.5"}, "\\boxed{1/2}"),
                                                         math_task.reward({"answer": "3"}, "x = 4")]))
    thread.start()
    thread.join(60)
    assert out == [[1.0, 0.0]]


def metadata_reward(record, response):
    return float(record["metadata"]["weight"]) * len(response)


def test_reward_workers_pass_the_record_with_its_metadata(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1", "weight": 2},
                                              {"prompt": "b", "answer": "2", "weight": 0.5}])
    records = load_prompts("mine", str(path), seed=0, metadata_keys=["weight"])
    worker = RewardWorker(f"{__name__}:metadata_reward")
    assert worker.score(records, ["xyz", "xy"]) == [6.0, 1.0]
