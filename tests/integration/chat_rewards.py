"""The reward of test_rl_chat_dataset: checks, inside the reward worker, that the record arrives
with its chat messages, answer and metadata, and scores from the metadata alone."""


def reward(record: dict, response: str) -> float:
    messages, metadata = record["prompt"], record["metadata"]
    assert [m["role"] for m in messages] == ["system", "user"], record
    assert metadata["source"] == "chat-test" and isinstance(metadata["tags"], list), record
    assert record["answer"] == str(sum(int(x) for x in messages[1]["content"][8:-1].split(" + "))), record
    return float(metadata["weight"])
