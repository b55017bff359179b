"""Configuration precedence (defaults < file < environment < flags) through the real `tracecode
serve` argument parser, value coercion, and rejection of what cannot be right."""
from __future__ import annotations

import dataclasses

import pytest

from tracecode.clients.cli import build_parser
from tracecode.server import config as cfg
from tracecode.server.config import Config


def serve_config(argv: list[str], env: dict[str, str]) -> Config:
    args = build_parser().parse_args(["serve", *argv])
    return cfg.load(vars(args), env=env, config_file=args.config)


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path):
    conf = tmp_path / "tracecode.toml"
    conf.write_text('threads = 4\nmetrics_port = 9100\ngrace_s = 3.5\nlog_json = true\ntimezone = "UTC"\n')
    env = {"TRACECODE_METRICS_PORT": "9200", "TRACECODE_GRACE_S": "7", "TRACECODE_LOG_JSON": "no"}
    c = serve_config(["--config", str(conf), "--grace-s", "12.5"], env)
    assert c.threads == 4                 # file over default
    assert c.timezone == "UTC"            # file over default
    assert c.metrics_port == 9200         # environment over file
    assert c.log_json is False            # environment over file, boolean words understood
    assert c.grace_s == 12.5              # flag over environment and file
    assert c.listen == Config().listen    # default where nobody says anything


def test_config_file_from_the_environment(tmp_path):
    conf = tmp_path / "from-env.toml"
    conf.write_text('key_prefix = "envfile"\n')
    c = serve_config([], {"TRACECODE_CONFIG": str(conf)})
    assert c.key_prefix == "envfile"


def test_boolean_flags_both_ways():
    assert serve_config(["--log-json"], {"TRACECODE_LOG_JSON": "0"}).log_json is True
    assert serve_config(["--no-log-json"], {"TRACECODE_LOG_JSON": "1"}).log_json is False


def test_every_setting_is_a_flag_an_environment_variable_and_a_file_key(tmp_path):
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    # Each field set through the environment round-trips to its own type.
    samples = {"bool": "true", "int": "7", "float": "2.5", "str": "x"}
    env = {"TRACECODE_" + f.name.upper(): samples[str(f.type)] for f in dataclasses.fields(Config)}
    c = cfg.load({}, env=env)
    for f in dataclasses.fields(Config):
        assert type(getattr(c, f.name)).__name__ == str(f.type), f.name


def test_unknown_file_keys_are_rejected(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("grace_s = 1\nno_such_setting = 1\n")  # a typo must not silently do nothing
    with pytest.raises(ValueError, match="unknown setting 'no_such_setting'"):
        serve_config(["--config", str(conf)], {})


def test_malformed_values_are_rejected_with_the_setting_named():
    with pytest.raises(ValueError, match="log_json: expected a boolean"):
        serve_config([], {"TRACECODE_LOG_JSON": "maybe"})
    with pytest.raises(ValueError):
        serve_config(["--threads", "many"], {})
