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


@pytest.mark.parametrize("data, message", [
    ({"enkg": {"sigma_min": 100}}, "config error: enkg.sigma_min: must be smaller than enkg.sigma_max (80), got 100"),
    ({"enkg": {"sigma_max": 1.0, "sigma_min": 1.0}}, "enkg.sigma_min: must be smaller than enkg.sigma_max (1)"),
    ({"enkg": {"sigma_max": float("inf")}}, "config error: enkg.sigma_max: Input should be a finite number"),
    ({"problem": {"noise_std": float("nan")}}, "config error: problem.noise_std: Input should be a finite number"),
    ({"enkg": {"num_steps": 10**12}}, "config error: enkg.num_steps: Input should be less than or equal to 100000"),
    ({"problem": {"kind": "a\rb"}}, "config error: problem: Input tag 'a\\rb' found"),
])
def test_validation_gaps_of_issue_14_are_closed(data, message):
    with pytest.raises(ConfigError) as e:
        validate(data)
    assert message in str(e.value) and "\n" not in str(e.value) and "\r" not in str(e.value)


def test_empty_job_and_bad_set_values(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty .* write {} to run them on purpose"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"--set value '\\x0c' is not valid YAML"):
        load_config(LG, ["enkg.scale=\x0c"])
    with pytest.raises(ConfigError, match="has an empty part"):
        load_config(LG, ["enkg..scale=1"])
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read|not valid YAML"):
        load_config(binary)


def test_the_enkg_section_is_the_samplers_one_field_list():
    """config.EnKGSettings is built from sampler.EnKGConfig's fields (types, defaults, bounds): the job file keys are
    the dataclass's, plus the run's ensemble size and localisation, in the order job files list them."""
    import dataclasses

    from enkg_dist.config import EnKGSettings
    from enkg_dist.sampler import EnKGConfig

    names = [f.name for f in dataclasses.fields(EnKGConfig)]
    assert list(EnKGSettings.model_fields) == ["ensemble_size", *names[:-2], "localisation", *names[-2:]]
    assert all(EnKGSettings.model_fields[f.name].default == f.default for f in dataclasses.fields(EnKGConfig))
    assert EnKGSettings().sampler_config() == EnKGConfig()
    changed = validate({"enkg": {"scale": 0.5, "step_rule": "trace", "guard": None, "inflation": "rtps",
                                 "inflation_factor": 0.3, "num_steps": 7}}).enkg.sampler_config()
    assert changed == EnKGConfig(scale=0.5, step_rule="trace", guard=None, inflation="rtps", inflation_factor=0.3,
                                 num_steps=7)
    with pytest.raises(ConfigError, match="enkg.num_steps: Input should be less than or equal to 100000"):
        validate({"enkg": {"num_steps": 100_001}})  # the bound lives on the dataclass's field
