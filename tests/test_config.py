import pytest

from enkg_dist.config import ConfigError, apply_overrides, load_config, validate

LG = "builtin:linear_gaussian_64"


def test_default_job_is_valid_and_complete():
    cfg = load_config(None)
    assert cfg.problem.kind == "navier_stokes" and cfg.prior.kind == "learned"
    cfg = load_config(LG)
    assert cfg.problem.kind == "linear_gaussian" and cfg.problem.n == 64
    assert cfg.enkg.sampler_config().scale == cfg.enkg.scale


@pytest.mark.parametrize("data, message", [
    ({"bogus": 1}, "config error: bogus: unknown key (allowed: name, method, seed"),
    ({"enkg": {"J": 5}}, "config error: enkg.J: unknown key (allowed: ensemble_size, num_steps"),
    ({"problem": {"nn": 3}}, "config error: problem.nn: unknown key (allowed: kind, n, k, blur"),
    ({"enkg": {"step_rule": "foo"}}, "config error: enkg.step_rule: Input should be 'frobenius' or 'trace'"),
    ({"enkg": {"ensemble_size": 1}}, "config error: enkg.ensemble_size: Input should be greater than or equal to 2"),
    ({"problem": {"kind": "nope"}}, "config error: problem: Input tag 'nope'"),
    ({"problem": {"n": 30, "k": 4}}, "n=30 is not a multiple of k=4"),
])
def test_bad_configs_give_one_line_errors(data, message):
    with pytest.raises(ConfigError) as e:
        validate(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_and_yaml_errors(tmp_path):
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d=null"]) == {"a": {"b": 1, "c": [1, 2]}, "d": None}
    cfg = load_config(LG, ["enkg.ensemble_size=32", "problem.noise_std=0.5"])
    assert cfg.enkg.ensemble_size == 32 and cfg.problem.noise_std == 0.5
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["enkg.scale"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("enkg: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no builtin job 'nope' \\(have: default, linear_gaussian_64"):
        load_config("builtin:nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
