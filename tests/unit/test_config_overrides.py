"""Configuration composition: ``extends: BASE.yaml``, ``--set KEY=VALUE`` overrides and ``--print-config``."""

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_replay import cli, config
from routing_replay.orchestration import experiment

CONFIGS = Path(__file__).parents[2] / "configs"
BEFORE = Path(__file__).parent / "data" / "configs-before-extends.json"
TINY = "model: {tiny: qwen3_moe}\n"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def message_of(path: Path, **kwargs) -> str:
    with pytest.raises(config.ConfigError) as error:
        config.load(path, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


# --- the shipped configurations -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(json.loads(BEFORE.read_text())))
def test_configs_built_on_extends_resolve_to_the_values_of_the_files_they_replaced(name):
    # BEFORE: the values written in each file before it became a base plus a variant (defaults added since
    # then apply to both sides).
    written = json.loads(BEFORE.read_text())[name]
    assert config.load(CONFIGS / name) == config.JobConfig.model_validate(written)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b-r3.yaml", "qwen3-30b-a3b-r2.yaml", "qwen3-30b-a3b-on-policy.yaml"])
def test_the_30b_variants_are_their_base_and_a_few_keys(name):
    lines = [line for line in (CONFIGS / name).read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "extends: qwen3-30b-a3b.yaml" and len(lines) <= 4


# --- extends ------------------------------------------------------------------------------------------------


def test_extends_merges_mappings_key_by_key_and_replaces_lists_and_scalars(tmp_path):
    write(tmp_path, "base.yaml", "model: {tiny: {kind: qwen3_moe, layers: 4, experts: 16}}\n"
          "rollout: {engines: 2, sglang_args: [--a, --b], temperature: 0.5}\n"
          "train: {steps: 7, parallel: {expert: 2, data: 2}, correction: {mode: mask, upper: 3.0}}\n"
          "task: {args: {max_operand: 9, x: 1}}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nrollout: {sglang_args: [--c]}\n"
                  "train: {parallel: {data: 4}, correction: {upper: 1.5}}\ntask: {args: {x: 2}}\n")
    cfg = config.load(child)
    assert cfg.model.tiny.layers == 4 and cfg.model.tiny.experts == 16  # untouched sections come from the base
    assert (cfg.rollout.engines, cfg.rollout.temperature, cfg.rollout.sglang_args) == (2, 0.5, ["--c"])  # list replaced
    assert (cfg.train.steps, cfg.train.parallel.expert, cfg.train.parallel.data) == (7, 2, 4)  # nested merge
    assert (cfg.train.correction.mode, cfg.train.correction.upper) == ("mask", 1.5)
    assert cfg.task.args == {"max_operand": 9, "x": 2}


def test_a_scalar_replaces_a_mapping_and_null_resets_a_field(tmp_path):
    write(tmp_path, "base.yaml", "model: {path: /x, architecture: null, tiny: null}\nrun: {wandb: {project: p}}\n")
    child = write(tmp_path, "child.yaml",
                  "extends: base.yaml\nmodel: {path: null, tiny: mixtral}\nrun: {wandb: null}\n")
    cfg = config.load(child)
    assert (cfg.model.path, cfg.model.tiny.kind, cfg.run.wandb) == (None, "mixtral", None)
    write(tmp_path, "tiny.yaml", "model: {tiny: {kind: qwen3_moe, layers: 4}}\n")
    kind = write(tmp_path, "kind.yaml", "extends: tiny.yaml\nmodel: {tiny: mixtral}\n")
    assert config.load(kind).model.tiny.layers == 2  # the kind alone: the default shape, not the base's


def test_extends_chains_each_path_relative_to_its_file(tmp_path):
    write(tmp_path, "c.yaml", TINY + "train: {steps: 3, mini_batches: 2, replay: R2}\n")
    write(tmp_path, "sub/b.yaml", "extends: ../c.yaml\ntrain: {steps: 4, mini_batches: 8}\n")
    a = write(tmp_path, "a.yaml", "# the top file\nextends: sub/b.yaml\ntrain: {steps: 5}\n")
    train = config.load(a).train
    assert (train.steps, train.mini_batches, train.replay) == (5, 8, "R2")
    assert config.load(write(tmp_path, "abs.yaml", f"extends: {tmp_path / 'sub/b.yaml'}\n")).train.steps == 4


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": "extends: a.yaml\n"}, "{d}/a.yaml: extends cycle: {d}/a.yaml -> {d}/a.yaml"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": TINY + "extends: sub/c.yaml\n",
          "sub/c.yaml": "extends: ../a.yaml\n"},
         "{d}/a.yaml: extends cycle: {d}/a.yaml -> {d}/b.yaml -> {d}/sub/c.yaml -> {d}/sub/../a.yaml"),
    ],
    ids=["itself", "three files"],
)
def test_an_extends_cycle_is_refused_naming_the_chain(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path, name, text)
    assert message_of(tmp_path / "a.yaml") == message.format(d=tmp_path)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (None, "{d}/a.yaml: extends (line 2): {d}/base.yaml: cannot read: No such file or directory"),
        (TINY + "train: {steps: 1, steps: 2}\n",
         "{d}/a.yaml: extends (line 2): {d}/base.yaml: line 2, column 19: duplicate key 'steps' (first at line 2)"),
        (TINY + "train:\n\tsteps: 1\n", "{d}/a.yaml: extends (line 2): {d}/base.yaml: line 3, column 1:"),
        ("- 1\n", "{d}/a.yaml: extends (line 2): {d}/base.yaml: the top level must be a mapping of sections (model, "
         "rollout, train, task, run), got a list"),
        ("", "{d}/a.yaml: extends (line 2): {d}/base.yaml: the top level must be a mapping of sections (model, "
         "rollout, train, task, run), got an empty document"),
        ("extends: [x.yaml]\n", "{d}/a.yaml: extends (line 2): {d}/base.yaml: extends: must be the path of a YAML "
         "file (relative to this one), got a list (line 1)"),
        ("extends: ''\n", "{d}/base.yaml: extends: must be the path of a YAML file (relative to this one), got an "
         "empty string (line 1)"),
        ("extends:\n", "{d}/base.yaml: extends: must be the path of a YAML file (relative to this one), got null"),
        ('extends: "x\\0.yaml"\n', "{d}/base.yaml: extends: must be the path of a YAML file (relative to this one), "
         "got a NUL character (line 1)"),
        ("extends: loop\n", "{d}/a.yaml: extends (line 2): {d}/base.yaml: extends (line 1): {d}/loop: cannot read: "
         "Too many levels of symbolic links"),
    ],
    ids=["missing", "duplicate key", "tab", "list", "empty", "extends a list", "extends empty", "extends null",
         "extends a NUL", "symlink loop"],
)
def test_an_unreadable_or_malformed_base_names_both_files_and_the_line(tmp_path, base, message):
    if base is not None:
        write(tmp_path, "base.yaml", base)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    a = write(tmp_path, "a.yaml", "# child\nextends: base.yaml\n")
    assert message.format(d=tmp_path) in message_of(a)


def test_a_bad_value_names_the_file_and_line_it_came_from(tmp_path):
    write(tmp_path, "base.yaml", TINY + "train:\n  steps: 0\n  replay: R3\n  parallel: {expertt: 2}\n")
    write(tmp_path, "mid.yaml", "extends: base.yaml\ntrain:\n  replay: R4\n")
    top = write(tmp_path, "top.yaml", "extends: mid.yaml\nrollout:\n  engines: zero\n")
    assert message_of(top) == (
        f"{top}: rollout.engines: Input should be a valid integer, got a string (line 3); "
        f"train.parallel.expertt: unknown key; allowed: tensor, pipeline, expert, context, data, sequence_parallel "
        f"({tmp_path}/base.yaml, line 5); "
        f"train.replay: Input should be 'none', 'R2' or 'R3' ({tmp_path}/mid.yaml, line 3); "
        f"train.steps: Input should be greater than or equal to 1 ({tmp_path}/base.yaml, line 3)")


def test_extends_in_a_section_is_an_unknown_key(tmp_path):
    path = write(tmp_path, "a.yaml", TINY + "train: {extends: x.yaml}\n")
    assert "train.extends: unknown key; allowed: parallel" in message_of(path)


def test_extends_works_for_the_experiment_schema(tmp_path):
    write(tmp_path, "job.yaml", TINY)
    write(tmp_path, "base.yaml", "job: job.yaml\ngrid: {replay: [R3], mini_batches: [2], seeds: [0], steps: 3}\n")
    spec, job = experiment.load(write(tmp_path, "exp.yaml", "extends: base.yaml\ngrid: {seeds: [1, 2]}\n"))
    assert (spec.grid.replay, spec.grid.seeds, spec.grid.steps) == (["R3"], [1, 2], 3)
    assert job.model.tiny.kind == "qwen3_moe"
    bad = write(tmp_path, "bad.yaml", "extends: base.yaml\ngrid: {replay: [R4]}\n")
    assert message_of(bad, schema=experiment.ExperimentConfig) == (
        f"{bad}: grid.replay.0: Input should be 'none', 'R2' or 'R3' (line 2)")


# --- --set ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("train.steps=12", "train.steps", 12),
        ("train.optimizer.learning_rate=1.0e-6", "train.optimizer.learning_rate", 1e-6),
        ("train.optimizer.learning_rate=1e-6", "train.optimizer.learning_rate", 1e-6),  # a number, as in a file
        ("train.optimizer.learning_rate=3", "train.optimizer.learning_rate", 3.0),  # an integer for a float
        ("train.optimizer.distributed=true", "train.optimizer.distributed", True),
        ("train.steps=7", "train.optimizer.total_steps", 7),  # the schedule spans the job's optimizer steps
        ("train.clip.high=.inf", "train.clip.high", float("inf")),  # no upper clipping
        ("train.correction.mode=mask", "train.correction.mode", "mask"),
        ("train.replay=R2", "train.replay", "R2"),
        ("train.parallel.expert=2", "train.parallel.expert", 2),
        ("rollout.sglang_args=[--tp-size, '2']", "rollout.sglang_args", ["--tp-size", "2"]),
        ("rollout.sglang_args=[]", "rollout.sglang_args", []),
        ("task.args={max_operand: 9, name: x}", "task.args", {"max_operand": 9, "name": "x"}),
        ("task.prompts=/data/a=b.jsonl", "task.prompts", "/data/a=b.jsonl"),  # the first = splits
        ("run.output_dir=2024-01-31", "run.output_dir", "2024-01-31"),  # a date is the text written
        ("run.output_dir='007'", "run.output_dir", "007"),
        ("task.prompts=", "task.prompts", None),
        ("task.prompts=null", "task.prompts", None),
        ("model.tiny={kind: mixtral, layers: 3}", "model.tiny.layers", 3),
        (" train.steps =4", "train.steps", 4),
    ],
)
def test_set_is_typed_and_validated_like_the_file(tmp_path, override, field, value):
    path = write(tmp_path, "job.yaml", TINY + "task: {prompts: /p.jsonl}\n")
    obj = config.load(path, overrides=[override])
    for part in field.split("."):
        obj = getattr(obj, part)
    assert obj == value and type(obj) is type(value)


def test_set_applies_after_extends_in_order_and_merges_mappings(tmp_path):
    write(tmp_path, "base.yaml", TINY + "train: {steps: 3, parallel: {expert: 2, data: 2}}\nrollout: {engines: 2}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain: {steps: 4}\n")
    cfg = config.load(child, overrides=["train.steps=5", "train.parallel={data: 4}", "train.steps=6", "run.seed=3"])
    assert (cfg.train.steps, cfg.train.parallel.expert, cfg.train.parallel.data) == (6, 2, 4)
    assert (cfg.rollout.engines, cfg.run.seed) == (2, 3)
    # a new subsection: run.wandb is null by default
    assert config.load(child, overrides=["run.wandb.project=p"]).run.wandb.project == "p"
    # the same configuration as writing the values in the file
    written = write(tmp_path, "written.yaml", TINY + "train: {steps: 6, parallel: {expert: 2, data: 4}}\n"
                    "rollout: {engines: 2}\nrun: {seed: 3}\n")
    assert cfg == config.load(written)


def test_set_replaces_a_scalar_with_a_mapping_and_null_resets(tmp_path):
    path = write(tmp_path, "job.yaml", "model: {path: /x}\n")
    cfg = config.load(path, overrides=["model.path=null", "model.tiny.kind=qwen2_moe", "model.tiny.layers=3"])
    assert (cfg.model.path, cfg.model.tiny.kind, cfg.model.tiny.layers) == (None, "qwen2_moe", 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.replay=R9"], "{p}: --set train.replay=R9: train.replay: Input should be 'none', 'R2' or 'R3'"),
        (["train.replayy=R2"], "{p}: --set train.replayy=R2: train.replayy: unknown key; allowed: parallel, "
         "mini_batches, micro_batch_size, optimizer, recompute"),
        # keys of earlier schemas name their new place
        (["train.learning_rate=1.0e-6"], "{p}: --set train.learning_rate=1.0e-6: train.learning_rate: unknown key: now "
         "train.optimizer.learning_rate"),
        (["train.clip_high=0.3"], "{p}: --set train.clip_high=0.3: train.clip_high: unknown key: now train.clip.high"),
        (["train.distributed_optimizer=true"], "{p}: --set train.distributed_optimizer=true: "
         "train.distributed_optimizer: unknown key: now train.optimizer.distributed"),
        (["trainer.steps=2"], "{p}: --set trainer.steps=2: trainer: unknown key; allowed: model, rollout, train, task, "
         "run"),
        (["train.parallel.experts=2"], "{p}: --set train.parallel.experts=2: train.parallel.experts: unknown key; "
         "allowed: tensor, pipeline, expert, context, data, sequence_parallel"),
        (["train.steps='4'"], "{p}: --set train.steps='4': train.steps: Input should be a valid integer, got a string"),
        (["train.steps=true"], "{p}: --set train.steps=true: train.steps: Input should be a valid integer, got a "
         "boolean"),
        (["train.steps=0"], "{p}: --set train.steps=0: train.steps: Input should be greater than or equal to 1"),
        (["train.steps.x=1"], "{p}: --set train.steps.x=1: train.steps: Input should be a valid integer, got a "
         "mapping"),
        (["train.optimizer.learning_rate=.nan"], "{p}: --set train.optimizer.learning_rate=.nan: "
         "train.optimizer.learning_rate: Input should be a finite number"),
        (["train.correction={mode: clip}"], "{p}: --set train.correction={{mode: clip}}: train.correction.mode: Input "
         "should be 'none', 'truncate' or 'mask'"),
        (["rollout.sglang_args=--flag"], "{p}: --set rollout.sglang_args=--flag: rollout.sglang_args: Input should be "
         "a valid list, got a string"),
        (["rollout.sglang_args.0=x"], "{p}: --set rollout.sglang_args.0=x: rollout.sglang_args: Input should be a "
         "valid list, got a mapping"),
        (["train=3"], "{p}: --set train=3: train: must be a mapping, got an integer"),
        (["model.path=/x"],
         "{p}: --set model.path=/x: model: Value error, set exactly one of model.path and model.tiny"),
        (["run.wandb.mode=offline"], "{p}: --set run.wandb.mode=offline: run.wandb.project: Field required"),
        (["extends=other.yaml"], "{p}: --set extends=other.yaml: extends: unknown key; allowed: model"),
        (["train.steps=2", "train.parallel.data=x", "train.steps=0"],
         "{p}: --set train.parallel.data=x: train.parallel.data: Input should be a valid integer, got a string; "
         "--set train.steps=0: train.steps: Input should be greater than or equal to 1"),
        (["train.optimizer.min_learning_rate=1.0"], "{p}: --set train.optimizer.min_learning_rate=1.0: "
         "train.optimizer.min_learning_rate: Value error, min_learning_rate=1.0 must be at most learning_rate=1e-05"),
        # an error in the file is still named by its line
        (["train.steps=2", "rollout.engines=0"], "{p}: --set rollout.engines=0: rollout.engines: Input should be "
         "greater than or equal to 1; train.micro_batch_size: Input should be greater than or equal to 1 (line 2)"),
    ],
)
def test_a_bad_override_is_named(tmp_path, overrides, message):
    path = write(tmp_path, "job.yaml", TINY + "train: {micro_batch_size: 0}\n" if "rollout.engines=0" in overrides
                 else TINY)
    assert message.format(p=path) in message_of(path, overrides=overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.replay", "--set train.replay: expected KEY=VALUE with a dotted KEY, e.g. --set train.replay=R2"),
        ("", "--set : expected KEY=VALUE"),
        ("=R2", "--set =R2: the key '' must be names joined by dots, e.g. train.parallel.expert"),
        ("train..replay=R2", "--set train..replay=R2: the key 'train..replay' must be names joined by dots"),
        ("train.=R2", "--set train.=R2: the key 'train.' must be names joined by dots"),
        ("train.parallel={expert: 2", "--set train.parallel={expert: 2: line 1, column 11: while parsing a flow "
         "mapping: expected ',' or '}'"),
        ("task.args={a: 1, a: 2}", "--set task.args={a: 1, a: 2}: line 1, column 8: duplicate key 'a'"),
        ("rollout.sglang_args=!!set {a}", "--set rollout.sglang_args=!!set {a}: line 1, column 1: !!set has no place"),
        ("train.steps=!!int x", "'x' is not a valid !!int"),
        ("train.steps=[1\n", "--set train.steps=[1\\n: line 2, column 1: while parsing a flow sequence"),
    ],
)
def test_a_malformed_override_is_refused_before_the_file_is_read(tmp_path, override, message):
    assert message in message_of(tmp_path / "absent.yaml", overrides=[override])


def test_cli_set_errors_exit_2_on_one_line(tmp_path, capsys):
    path = write(tmp_path, "job.yaml", TINY)
    for argv in (["--set", "train.replay=R9"], ["--set", "train.replay"], ["--set", "train.replay=R2", "--set", "x=1"]):
        assert cli.main(["train", "--config", str(path), *argv, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("config error: ") and err.count("\n") == 1 and "--set " in err, err
    assert cli.main(["train", "--config", str(path), "--set", "train.replay=R2", "--set", "train.steps=3",
                     "--dry-run"]) == 0
    assert "replay R2" in capsys.readouterr().out


OVERRIDE_TEXT = st.text(st.characters(codec="utf-8"), max_size=30) | st.builds(
    "{}={}".format, st.sampled_from(["train.steps", "train", "model.tiny", "rollout.sglang_args", "task.args", "x.y"]),
    st.text(max_size=20))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(OVERRIDE_TEXT, max_size=3))
def test_arbitrary_overrides_load_or_raise_a_one_line_config_error(tmp_path, overrides):
    path = tmp_path / "job.yaml"
    path.write_text(TINY)
    try:
        assert isinstance(config.load(path, overrides=overrides), config.JobConfig)
    except config.ConfigError as exc:
        assert "\n" not in str(exc) and (str(exc).startswith(f"{path}: --set ") or str(exc).startswith("--set ")
                                         or str(exc).startswith(f"{path}: ")), str(exc)


# --- --print-config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_print_config_prints_every_field_and_reads_back_to_the_same_config(tmp_path, capsys, name):
    overrides = ["train.steps=3", "rollout.sglang_args=[--x, '1']", "task.args={max_operand: 2, s: 'on'}"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert cli.main(["train", "--config", str(CONFIGS / name), *sets, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"# {CONFIGS / name} --set train.steps=3 --set ")
    printed = write(tmp_path, "printed.yaml", captured.out)
    expected = config.load(CONFIGS / name, overrides=overrides)
    assert config.load(printed) == expected
    assert not any(line.startswith("extends") for line in captured.out.splitlines())
    # every field, defaults included, in schema order
    data = config._parse_yaml(printed, captured.out)[0]
    assert list(data) == list(config.JobConfig.model_fields)
    for section, fields in data.items():
        schema = type(getattr(expected, section))  # a model, or a settings dataclass (train)
        names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) \
            else schema.model_fields
        assert list(fields) == list(names)
    # but the schedule's length, which the job derives
    assert "total_steps" not in data["train"]["optimizer"]
    assert expected.train.optimizer.total_steps == 3 * expected.train.mini_batches


def test_print_config_needs_no_checkpoint_and_applies_output_dir(tmp_path, capsys):
    path = write(tmp_path, "job.yaml", "model: {path: /nowhere}\n")  # the dry run needs model.architecture
    assert cli.main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"output_dir: {tmp_path / 'out'}\n" in out and "  path: /nowhere\n" in out
    assert cli.main(["train", "--config", str(path), "--dry-run"]) == 2


def test_print_config_escapes_a_newline_in_the_command(tmp_path, capsys):
    path = write(tmp_path, "job.yaml", TINY)
    assert cli.main(["train", "--config", str(path), "--set", "run.output_dir=a\nb", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"# {path} --set run.output_dir=a\\nb: ")
    assert config.load(write(tmp_path, "printed.yaml", out)).run.output_dir == "a b"  # YAML folds a plain newline
