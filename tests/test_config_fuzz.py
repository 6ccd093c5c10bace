"""Property: any job file and any --set values either validate or get a one-line error naming the problem; never a
traceback. Job files are built from the real keys (and wrong ones) with values of every YAML type, plus raw text;
the CLI's `run --dry-run` and `resume --set` are driven in-process (typer's CliRunner), so each example is cheap."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from enkg_dist import budget, runner
from enkg_dist import config as cfgmod
from enkg_dist import schema
from enkg_dist.cli import app


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the schema (through the members of unions)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for sub in schema.models_in(field.annotation):
            out += _keys(sub, f"{prefix}{name}.")
    return out


KEYS = sorted(set(_keys(cfgmod.RunConfig))) + ["enkg.J", "bogus", "problem.kind.x", "", ".", "a..b", "enkg."]
KINDS = ["linear_gaussian", "navier_stokes", "external", "gaussian", "learned", "gaussian_fit", "nope"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**15), 10**15), st.sampled_from([0, 1, 2, 64, -1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(KINDS),
                    st.text(string.printable, max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.sampled_from(KEYS), SCALARS,
                                                                            max_size=3))


def _nest(pairs: list[tuple[str, object]]) -> dict:
    data: dict = {}
    for key, value in pairs:
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p), dict) or p not in node else {}
        node[parts[-1]] = value
    return data


JOBS = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6).map(lambda p: yaml.safe_dump(_nest(p))),
    st.text(string.printable, max_size=80),  # raw text: bad YAML, scalars, lists, comments only, empty
    st.sampled_from(["", "# only a comment\n", "{}\n", "- a\n", "[[[[[[[[\n", "enkg: {sigma_min: 100}\n",
                     "enkg: {num_steps: 1000000000000}\n", "enkg: {ensemble_size: 10000000}\n",
                     "a: !!python/name:os\n"]),
)
SETS = st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1]).strip()}"),
    st.text(string.printable, max_size=20),
), max_size=3)


def _one_line(message: str) -> None:
    assert message.startswith("config error: ") and "\n" not in message and "Traceback" not in message, message


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(job=JOBS, sets=SETS)
def test_load_config_validates_or_gives_one_line(tmp_path, job, sets):
    path = tmp_path / "job.yaml"
    path.write_text(job)
    try:
        cfg = cfgmod.load_config(path, sets)
    except cfgmod.ConfigError as e:
        _one_line(str(e))
        return
    assert cfgmod.validate(yaml.safe_load(cfgmod.dump(cfg))) == cfg  # what --dry-run prints reads back
    assert runner.forward_budget(cfg)["forward_evaluations"] >= 0
    budget.describe(cfg)
    try:
        budget.check_memory(cfg, available=2**40)
    except cfgmod.ConfigError as e:
        _one_line(str(e))


@FUZZ
@given(job=JOBS, sets=SETS)
def test_the_cli_dry_run_never_shows_a_traceback(tmp_path, job, sets):
    path = tmp_path / "job.yaml"
    path.write_text(job)
    args = ["run", str(path), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 2), (args, result.exception, result.output)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
    else:
        assert "# budget:" in result.stdout and "# memory:" in result.stdout


@FUZZ
@given(sets=SETS)
def test_resume_set_accepts_the_changeable_keys_and_names_any_other(sets):
    try:
        cfgmod.check_resume_overrides(sets)
    except cfgmod.ConfigError as e:
        _one_line(str(e))
        assert "--set" in str(e)
        return
    assert all(cfgmod.may_change_on_resume(s.split("=", 1)[0].strip()) for s in sets)


@pytest.mark.parametrize("key", ["execution.num_workers", "execution.batch_size", "store.checkpoint_every",
                                 "execution.worker_resources.sim", "store.max_pending", "name"])
def test_the_keys_that_may_change_on_resume(key):
    assert cfgmod.may_change_on_resume(key)
    assert all(not cfgmod.may_change_on_resume(k) for k in ("seed", "enkg.scale", "problem.n", "store.full_every",
                                                            "execution.timeout", "dtype"))
