"""Bad input to the command line (config files, a checkpoint's config.json, run directories,
numeric options): one line naming the file and the field or the line, exit code 2, no traceback."""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_replay import cli, config
from routing_replay.megatron.settings import OptimizerSettings, ParallelConfig
from routing_replay.rl.settings import Clip, Correction

SHIPPED_CPU_CONFIG = Path(__file__).parents[2] / "configs" / "tiny-moe-cpu.yaml"
TINY = b"model: {tiny: qwen3_moe}\n"

BAD_CONFIGS = {
    # name: (file content, or None for no file, and what the one-line message must contain)
    "missing file": (None, ["cannot read: No such file or directory"]),
    "empty file": (b"", ["the top level must be a mapping of sections (model, rollout", "an empty document"]),
    "only comments": (b"# model: {tiny: qwen3_moe}\n", ["got an empty document"]),
    "not UTF-8": (TINY + b"run:\n  output_dir: caf\xe9\n", ["line 3: not UTF-8: byte 0xe9 at byte offset 47"]),
    "NUL character": (TINY + b"run: {output_dir: a\x00}\n", ["line 2: the character U+0000 is not allowed"]),
    "YAML syntax": (b"model: {tiny: qwen3_moe\n", ["line 2, column 1", "expected ',' or '}'"]),
    "tab indentation": (b"model:\n\ttiny: qwen3_moe\n", ["line 2, column 1", "found character '\\t'"]),
    "two documents": (TINY + b"---\nmodel: {tiny: mixtral}\n", ["line 2, column 1", "expected a single document"]),
    "top level list": (b"- model\n", ["the top level must be a mapping of sections", "got a list"]),
    "top level scalar": (b"model\n", ["the top level must be a mapping of sections", "got a string"]),
    "top level null": (b"null\n", ["got an empty document"]),
    "section not a mapping": (TINY + b"train: 3\n", ["train: must be a mapping, got an integer (line 2)"]),
    "section empty": (TINY + b"rollout:\n", ["rollout: must be a mapping, got null (line 2)"]),
    "top-level section missing": (b"train: {steps: 2}\n", ["model: Field required"]),
    "wrong type in a section": (TINY + b"train:\n  steps: ten\n",
                                ["train.steps: Input should be a valid integer, got a string (line 3)"]),
    "boolean for an integer": (TINY + b"run: {gpus: true}\n",
                               ["run.gpus: Input should be a valid integer, got a boolean"]),
    "string for a float": (TINY + b"train: {optimizer: {learning_rate: '1e-3'}}\n",
                           ["train.optimizer.learning_rate: Input should be a valid number, got a string"]),
    "NaN": (TINY + b"rollout: {top_p: .nan}\n", ["rollout.top_p: Input should be a finite number (line 2)"]),
    "wrong type in train.parallel": (TINY + b"train:\n  parallel:\n    expert: two\n",
                                     ["train.parallel.expert: Input should be a valid integer, got a string (line 4)"]),
    "train.parallel not a mapping": (TINY + b"train: {parallel: [2]}\n",
                                     ["train.parallel: must be a mapping, got a list"]),
    "wrong type in train.correction": (
        TINY + b"train:\n  correction: {mode: none, upper: high}\n",
        ["train.correction.upper: Input should be a valid number, got a string (line 3)"]),
    "wrong type in model.architecture": (
        b"model:\n  path: /nowhere\n  architecture:\n    num_layers: 48\n    hidden_size: [2048]\n",
        ["model.architecture.hidden_size: Input should be a valid integer, got a list (line 5)",
         "model.architecture.vocab_size: Field required (line 3)"]),
    "wrong type of a list item": (TINY + b"rollout:\n  sglang_args:\n    - --mem-fraction-static\n    - 0.5\n",
                                  ["rollout.sglang_args.1: Input should be a valid string, got a number (line 5)"]),
    "a string for a list": (TINY + b"rollout: {sglang_args: --flag}\n",
                                   ["rollout.sglang_args: Input should be a valid list, got a string"]),
    "wrong type in task.args": (TINY + b"task: {args: {max_operand: [4]}}\n",
                                ["task.args.max_operand: Value error, must be a number or a string, got a list"]),
    "tiny neither a kind nor a mapping": (b"model: {tiny: [qwen3_moe]}\n", [
        "model.tiny: Value error, must be a kind (qwen3_moe, qwen2_moe, mixtral, glm4_moe, deepseek_v3) or a mapping, "
        "got a list (line 1)"]),
    "tiny top_k above its experts": (b"model:\n  tiny:\n    kind: qwen3_moe\n    experts: 4\n    top_k: 8\n",
                                    ["model.tiny.top_k: Value error, top_k=8 must be at most experts=4 (line 5)"]),
    "unknown key in a tiny shape": (b"model:\n  tiny:\n    kind: qwen3_moe\n    expert: 4\n", [
        "model.tiny.expert: unknown key; allowed: kind, layers, hidden, experts, top_k, moe_intermediate_size, "
        "shared_expert, seed (line 4)"]),
    "unknown section": (TINY + b"trainer: {steps: 3}\n",
                        ["trainer: unknown key; allowed: model, rollout, train, task, run (line 2)"]),
    "unknown key": (TINY + b"train:\n  parallel: {experts: 2}\n",
                    ["train.parallel.experts: unknown key; allowed: tensor, pipeline, expert, context, data, "
                     "sequence_parallel (line 3)"]),
    "duplicate section": (TINY + b"train: {steps: 3}\nrun: {}\ntrain: {steps: 5}\n",
                          ["line 4, column 1: duplicate key 'train' (first at line 2)"]),
    "duplicate nested key": (TINY + b"train:\n  parallel:\n    expert: 2\n    data: 2\n    expert: 4\n",
                             ["line 6, column 5: duplicate key 'expert' (first at line 4)"]),
    "duplicate key in a flow mapping": (b"model: {tiny: qwen3_moe, tiny: mixtral}\n",
                                        ["line 1, column 26: duplicate key 'tiny' (first at line 1)"]),
    "key that is not a string": (TINY + b"on: 3\n", ["line 2, column 1: the key 'on' reads as a boolean"]),
    "set tag": (TINY + b"rollout: {sglang_args: !!set {a, b}}\n", ["line 2, column 24: !!set has no place"]),
    "binary tag": (b"model: {path: !!binary L3Bh}\n", ["line 1, column 15: !!binary has no place"]),
    "explicit tag on a bad value": (TINY + b"train: {steps: !!int ten}\n",
                                    ["line 2, column 16: 'ten' is not a valid !!int"]),
    "Python tag": (b"model: !!python/object:os.system {}\n", ["line 1, column 8", "could not determine a constructor"]),
    "undefined alias": (TINY + b"train: *base\n", ["line 2, column 8: found undefined alias 'base'"]),
    "missing base": (b"# a variant\nextends: base.yaml\n" + TINY,
                     ["extends (line 2): ", "/base.yaml: cannot read: No such file or directory"]),
    "extends not a path": (TINY + b"extends: {path: base.yaml}\n",
                           ["extends: must be the path of a YAML file (relative to this one), got a mapping (line 2)"]),
    "extends itself": (b"extends: job.yaml\n", ["extends cycle: ", "/job.yaml -> "]),
}


def single_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_the_field_or_line_and_exit_code_2(tmp_path, capsys, name):
    content, expected = BAD_CONFIGS[name]
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content)
    for dry_run in (["--dry-run"], []):
        assert cli.main(["train", "--config", str(path), *dry_run]) == 2
        err = single_line_error(capsys)
        assert err.startswith(f"config error: {path}: ")
        for part in expected:
            assert part in err


def test_a_directory_as_config_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path), "--dry-run"]) == 2
    assert single_line_error(capsys) == f"config error: {tmp_path}: cannot read: Is a directory\n"


@pytest.mark.parametrize(
    ("config_json", "message"),
    [
        (None, "model.architecture is required: {dir}/config.json is not on this machine"),
        (b'{"num_hidden_layers": 2', "{dir}/config.json: cannot read as JSON: Expecting ',' delimiter"),
        (b"\xff{}", "{dir}/config.json: cannot read as JSON: 'utf-8' codec can't decode byte 0xff"),
        (b"[1, 2]", "{dir}/config.json: the top level must be a JSON object"),
        (b'{"hidden_size": 64}', "{dir}/config.json: not a Hugging Face MoE config (unsupported model type None"),
        (b'{"model_type": "qwen3_moe", "hidden_size": 64}',
         "{dir}/config.json: no 'num_hidden_layers' (set model.architecture instead)"),
        (json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 0, "num_key_value_heads": 1,
                     "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "vocab_size": 512}).encode(), "{dir}/config.json: not a Hugging Face MoE config"),
        (json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                     "num_experts": 8, "num_experts_per_tok": "2", "moe_intermediate_size": 32,
                     "vocab_size": 512}).encode(), "{dir}/config.json: top_k: Input should be a valid integer"),
    ],
    ids=["absent", "not JSON", "not UTF-8", "not an object", "no model type", "missing key", "zero heads",
         "string for an integer"],
)
def test_a_bad_checkpoint_config_json_is_a_config_error(tmp_path, capsys, config_json, message):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    if config_json is not None:
        (checkpoint / "config.json").write_bytes(config_json)
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{path: '{checkpoint}'}}\n")
    assert cli.main(["train", "--config", str(job), "--dry-run"]) == 2
    assert message.format(dir=checkpoint) in single_line_error(capsys)


def test_yaml_1_1_surprises_are_read_as_written(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {tiny: qwen3_moe}\ntrain: {optimizer: {learning_rate: 1e-5}}\n"
                    "run: {output_dir: 2024-01-31}\n")
    cfg = config.load(path)
    assert cfg.train.optimizer.learning_rate == 1e-5  # YAML 1.1 reads an exponent without a dot as a string
    assert cfg.run.output_dir == "2024-01-31"  # not datetime.date(2024, 1, 31)


def test_merge_keys_still_work_and_explicit_keys_override_them(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {tiny: qwen3_moe}\ntrain:\n  <<: {steps: 3, mini_batches: 2}\n  steps: 4\n")
    cfg = config.load(path)
    assert (cfg.train.steps, cfg.train.mini_batches) == (4, 2)


def metrics_run(tmp_path, text: str) -> Path:
    (tmp_path / "metrics.jsonl").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("make_run_dir", "message"),
    [
        (lambda tmp: tmp / "no-such-run", "{run}/metrics.jsonl does not exist: is {run} a run directory?"),
        (lambda tmp: tmp, "{run}/metrics.jsonl does not exist"),
        (lambda tmp: metrics_run(tmp, '{"step": 0, "reward/mean": 0.1}\n{"step": 1, "reward/me'),
         "{run}/metrics.jsonl, line 2: not JSON: Unterminated string"),
        (lambda tmp: metrics_run(tmp, '{"step": 0, "reward/mean": 0.1}\n\n[1, 2]\n'),
         "{run}/metrics.jsonl, line 3: not a metrics record"),
        (lambda tmp: metrics_run(tmp, '{"reward/mean": 0.1}\n'), "{run}/metrics.jsonl, line 1: not a metrics record"),
        (lambda tmp: metrics_run(tmp, '{"step": 0, "reward/mean": "high"}\n'),
         "{run}/metrics.jsonl, line 1: not a metrics record"),
    ],
    ids=["missing run directory", "no metrics.jsonl", "truncated line", "not an object", "no step", "not a number"],
)
def test_plot_of_a_missing_or_corrupt_run_exits_2_naming_the_file_and_line(tmp_path, capsys, make_run_dir, message):
    run_dir = make_run_dir(tmp_path)
    assert cli.main(["plot", str(run_dir)]) == 2
    assert f"routing-replay plot: {message.format(run=run_dir)}" in single_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["capture-demo", "--requests", "-3"], "argument --requests: -3 is not a positive integer"),
        (["capture-demo", "--requests", "0"], "argument --requests: 0 is not a positive integer"),
        (["capture-demo", "--new-tokens", "many"], "argument --new-tokens: 'many' is not an integer"),
        (["capture-demo", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ],
)
def test_numeric_options_are_checked_by_argparse(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subcommands.choices.items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for action in parser._actions:
            assert action.help, (name, action.dest)
            for option in action.option_strings:
                assert option in text, (name, option)


def test_installed_entry_point_exits_2_without_a_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(TINY + b"train:\n  parallel:\n    expert: 2\n    expert: 4\n")
    entry_point = Path(sys.executable).parent / "routing-replay"
    out = subprocess.run([str(entry_point), "train", "--config", str(path), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr == f"config error: {path}: line 5, column 5: duplicate key 'expert' (first at line 4)\n"


# Keys the schema knows, so that generated documents reach the nested sections too.
SCHEMA_KEYS = sorted({name for section in (config.JobConfig, config.ModelSection, config.TinyModel,
                                           config.Architecture, config.RolloutSection, config.TaskSection,
                                           config.RunSection)
                      for name in section.model_fields}
                     | {field.name for section in (config.TrainSection, ParallelConfig, OptimizerSettings, Clip,
                                                   Correction)
                        for field in dataclasses.fields(section)} | {config.EXTENDS})
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["qwen3_moe", "R3", "truncate", "token", "disk"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_or_config_error(path: Path) -> None:
    try:
        assert isinstance(config.load(path), config.JobConfig)
    except config.ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_load_or_raise_config_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    load_or_config_error(path)


@FUZZ
@given(value=YAML_VALUES)
def test_arbitrary_yaml_values_load_or_raise_config_error(tmp_path, value):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump({"model": {"tiny": "qwen3_moe"}, **value} if isinstance(value, dict) else value))
    load_or_config_error(path)


@FUZZ
@given(position=st.integers(0, len(SHIPPED_CPU_CONFIG.read_bytes())), inserted=st.binary(min_size=1, max_size=8))
def test_a_shipped_config_with_bytes_inserted_loads_or_raises_config_error(tmp_path, position, inserted):
    text = SHIPPED_CPU_CONFIG.read_bytes()
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text[:position] + inserted + text[position:])
    load_or_config_error(path)
