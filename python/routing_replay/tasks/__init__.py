"""Tasks: prompt sources and reward functions (``module:function`` import paths in the config).

Prompts come from local files (``task.prompts``: JSONL, Parquet, or a directory of them) or from a
built-in generator. Every record is normalised to ``{"prompt", "answer", "metadata"}``: the
prompt is a string or, with ``task.chat``, a list of ``{role, content}`` messages;
``metadata`` holds the fields named by ``task.metadata_keys``.

A reward function takes that record and the response text and returns a float
(``reward(record, response) -> float``); ``record["metadata"]`` carries the sample's metadata.
Built in: ``addition`` (a verifiable task a tiny model learns on CPU) and ``math`` (a final-answer
verifier for real models, on Hugging Face's ``math_verify``).
"""

from __future__ import annotations

import glob
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RewardFn = Callable[[dict, str], float]

FILE_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
"""The formats of a directory's files, by suffix. A single file named otherwise is read as JSONL."""


def load_reward(path: str) -> RewardFn:
    """Resolves ``module:function``; errors name the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, TypeError) as exc:  # TypeError: a relative name such as ".x"
        raise ValueError(f"reward {path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn


BUILT_IN_PROMPTS = {"addition": "routing_replay.tasks.addition:prompts"}


def load_prompts(name: str, path: str | None, seed: int, count: int = 4096,
                 args: Mapping[str, object] | None = None, *, prompt_key: str = "prompt",
                 answer_key: str = "answer", metadata_keys: Sequence[str] = (), chat: bool = False) -> list[dict]:
    """The task's prompt records, each ``{"prompt": str | list[dict], "answer": ..., "metadata": {...}}``.

    With ``path`` (``task.prompts``): a JSONL file, a Parquet file, a ``datasets`` ``save_to_disk``
    Arrow file, a directory of such files (``*.jsonl``, ``*.parquet``, ``*.arrow``, read in name
    order), or a glob pattern of files. Each record must have ``prompt_key`` (a string, or with
    ``chat`` a list of ``{role, content}`` messages), ``answer_key`` and every ``metadata_keys``
    field; errors name the file, the line (JSONL, from 1) or row (Arrow/Parquet, from 0) and the key.

    Without ``path``: the built-in generator ``name`` (``count`` records from ``seed``)."""
    keys = _Keys(prompt_key, answer_key, tuple(metadata_keys), chat)
    if path is not None:
        records = [keys.record(where, raw) for where, raw in _raw_records(path, keys)]
        if not records:
            raise ValueError(f"{path}: no prompts")
        return records
    if name not in BUILT_IN_PROMPTS:
        raise ValueError(f"task {name!r} has no built-in prompts; set task.prompts to a JSONL or Parquet file or a "
                         f"directory of them (built in: {sorted(BUILT_IN_PROMPTS)})")
    if (prompt_key, answer_key, tuple(metadata_keys)) != ("prompt", "answer", ()):
        raise ValueError(f"task {name!r}: task.prompt_key, task.answer_key and task.metadata_keys apply to the "
                         "records of task.prompts; the built-in generator has fixed keys")
    module, _, attr = BUILT_IN_PROMPTS[name].partition(":")
    generated = getattr(importlib.import_module(module), attr)(count, seed, **dict(args or {}))
    return [keys.record(f"task {name!r}: record {i}", raw) for i, raw in enumerate(generated)]


class _Keys:
    def __init__(self, prompt: str, answer: str, metadata: tuple[str, ...], chat: bool) -> None:
        self.prompt, self.answer, self.metadata, self.chat = prompt, answer, metadata, chat

    def columns(self) -> list[str]:
        return list(dict.fromkeys([self.prompt, self.answer, *self.metadata]))

    def record(self, where: str, raw: Any) -> dict:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a record must be a JSON object, not {type(raw).__name__}")
        self._require(where, raw, self.prompt, "task.prompt_key")
        prompt = self._prompt(where, raw[self.prompt])
        for key in (self.answer, *self.metadata):
            self._require(where, raw, key, "task.answer_key" if key == self.answer else "task.metadata_keys")
        return {"prompt": prompt, "answer": raw[self.answer], "metadata": {key: raw[key] for key in self.metadata}}

    @staticmethod
    def _require(where: str, raw: dict, key: str, option: str) -> None:
        if raw.get(key) is None:
            state = "is null" if key in raw else "is missing"
            raise ValueError(f"{where}: {key!r} ({option}) {state}; the record's keys: {sorted(raw)}")

    def _prompt(self, where: str, prompt: Any) -> str | list[dict]:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list | tuple) and not self.chat:
            raise ValueError(f"{where}: {self.prompt!r} is a list (chat messages?): set task.chat: true to render "
                             "it with the tokenizer's chat template")
        if not isinstance(prompt, list | tuple):
            raise ValueError(f"{where}: a record needs a string {self.prompt!r} (or, with task.chat, a list of "
                             f"{{role, content}} messages), not {type(prompt).__name__}")
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: {self.prompt!r} message {i} needs a string 'role' and 'content': "
                                 f"{message!r}")
        if not prompt:
            raise ValueError(f"{where}: {self.prompt!r} is an empty message list")
        return [dict(message) for message in prompt]


def prompt_files(path: str) -> list[Path]:
    """The files ``task.prompts`` names: itself, a directory's supported files, or a glob's matches."""
    if any(c in path for c in "*?[") and not Path(path).exists():
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"{path}: no file matches")
        return files
    root = Path(path)
    if root.is_dir():
        if (root / "dataset_dict.json").exists():
            splits = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ValueError(f"{path} is a datasets DatasetDict: set task.prompts to one split's directory "
                             f"(one of {splits})")
        listed = _saved_data_files(root)
        files = listed or sorted(p for p in root.iterdir() if p.is_file() and p.suffix in FILE_FORMATS)
        if not files:
            raise ValueError(f"{path}: a directory without {'/'.join(f'*{s}' for s in FILE_FORMATS)} files")
        return files
    if not root.is_file():
        raise ValueError(f"{path}: no such file or directory")
    return [root]


def _saved_data_files(root: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` directory, in its ``state.json``'s order
    (its ``cache-*.arrow`` files are not data)."""
    state = root / "state.json"
    if not state.is_file():
        return []
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state}: not a datasets state.json (no '_data_files' filenames): {exc}") from None
    return [root / name for name in names]


def _raw_records(path: str, keys: _Keys) -> Iterator[tuple[str, Any]]:
    for file in prompt_files(path):
        kind = FILE_FORMATS.get(file.suffix, "jsonl")
        if kind == "jsonl":
            yield from _jsonl(file)
        else:
            yield from _table(file, kind, keys)


def _jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not JSON: {exc}") from None
            yield f"{file}:{number}", record


def _table(file: Path, kind: str, keys: _Keys) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file or of an Arrow file (``datasets``' ``save_to_disk`` writes Arrow
    streams) as Python values."""
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(file).names
            _require_columns(file, names, keys)
            table = pq.read_table(file, columns=keys.columns())
        else:
            try:
                with pa.memory_map(str(file)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(file)) as source:
                    table = pa.ipc.open_file(source).read_all()
            _require_columns(file, table.column_names, keys)
            table = table.select(keys.columns())
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{file}: not a readable {kind} file: {exc}") from None
    for row, record in enumerate(table.to_pylist()):
        yield f"{file}: row {row}", record


def _require_columns(file: Path, names: Sequence[str], keys: _Keys) -> None:
    for key, option in ((keys.prompt, "task.prompt_key"), (keys.answer, "task.answer_key"),
                        *((key, "task.metadata_keys") for key in keys.metadata)):
        if key not in names:
            raise ValueError(f"{file}: no column {key!r} ({option}); the columns: {list(names)}")


# ---- rendering -------------------------------------------------------------------------------------


def check_chat_template(tokenizer, chat: bool, records: Sequence[Mapping[str, Any]] = (),
                        source: str = "the model's tokenizer") -> None:
    """Checked once when the job starts: with ``chat`` the tokenizer must have a chat template, and
    the first record must render (a template may refuse, e.g., a system message)."""
    if not chat:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"task.chat is true but {source} has no chat template (tokenizer_config.json's "
                         "'chat_template'): use a chat model's tokenizer or set task.chat: false")
    if records:
        try:
            prompt_token_ids(tokenizer, records[0], chat=True)
        except Exception as exc:
            raise ValueError(f"the chat template of {source} cannot render the first prompt "
                             f"{records[0]['prompt']!r}: {exc}") from exc


def prompt_token_ids(tokenizer, record: Mapping[str, Any], chat: bool) -> list[int]:
    """The token ids of a record's prompt, as the engines see it.

    Without ``chat``: the tokenizer's encoding of the string (with its special tokens, e.g. a BOS).
    With ``chat``: the chat template applied to the messages (a string prompt is one user message)
    with the assistant's generation prompt, then encoded without further special tokens (what
    ``apply_chat_template(..., tokenize=True)`` does)."""
    prompt = record["prompt"]
    if not chat:
        if not isinstance(prompt, str):
            raise ValueError("a list of chat messages as the prompt needs task.chat: true")
        return list(tokenizer(prompt).input_ids)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
