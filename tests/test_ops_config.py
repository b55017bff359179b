"""Configuration precedence (defaults < file < environment < flags) through the real `tracecode
serve` argument parser, value coercion, rejection of what cannot be right, and the README's
configuration table checked against server/config.py (each row a real setting, its default)."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest

from tracecode.cli import build_parser
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


# ------------------------------------------------------------- the README's configuration table

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def readme_config_rows(readme: str) -> list[tuple[str, str, str]]:
    """(setting, default, meaning) of each row of the README's "## Configuration" table."""
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for text in section.splitlines():
        cells = [c.strip() for c in text.strip().strip("|").split("|")]
        if text.startswith("|") and len(cells) == 3 and cells[0].startswith("`--"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _shown(field: dataclasses.Field, cell: str) -> bool:
    """Whether a README default cell shows the field's default: the value in backticks (numbers
    compared as numbers), on/off for a boolean, and for an empty string an empty cell or a
    parenthesised word saying what empty means, e.g. "(embedded)"."""
    default = field.default
    if isinstance(default, bool):
        return cell == ("on" if default else "off")
    if default == "":
        return cell == "" or re.fullmatch(r"\([a-z ]+\)", cell) is not None
    m = re.fullmatch(r"`([^`]*)`", cell)
    if not m:
        return False
    if isinstance(default, (int, float)):
        try:
            return float(m.group(1)) == float(default)
        except ValueError:
            return False
    return m.group(1) == default


def readme_table_problems(readme: str) -> list[str]:
    """What is wrong with the README's configuration table against server/config.py: each row
    must name `tracecode serve` flags of Config fields, once each, and show their defaults. The
    table lists the main settings in its own words (config.py's docstring says so), not all."""
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    rows = readme_config_rows(readme)
    if len(rows) < 10:
        return [f"the table has {len(rows)} rows: not found or not read"]
    problems, seen = [], set()
    for setting, default, meaning in rows:
        # "`--max-lines` / `--max-code-length`" | "`200` / `512`": one setting per part.
        flags, defaults = setting.split(" / "), default.split(" / ") if default else [""]
        if len(flags) != len(defaults) or not meaning:
            problems.append(f"row {setting}: {len(flags)} settings, {len(defaults)} defaults, meaning {meaning!r}")
            continue
        for flag, shown in zip(flags, defaults):
            m = re.fullmatch(r"`--([a-z0-9-]+)`", flag)
            name = m.group(1).replace("-", "_") if m else None
            if name not in FIELDS:
                problems.append(f"row {setting}: {flag} is no setting of server/config.py")
            elif not re.search(rf"--{m.group(1)}(?![\w-])", help_text):
                problems.append(f"row {setting}: {flag} is not a flag of tracecode serve")
            elif not _shown(FIELDS[name], shown):
                problems.append(f"row {setting}: shows {shown!r}, server/config.py's default is {FIELDS[name].default!r}")
            elif name in seen:
                problems.append(f"row {setting}: {flag} is listed twice")
            seen.add(name)
    return problems


def test_readme_configuration_table_names_real_settings_with_their_defaults():
    with open(README, encoding="utf-8") as fh:
        assert readme_table_problems(fh.read()) == []


def test_the_readme_check_catches_a_wrong_default_and_an_unknown_setting():
    with open(README, encoding="utf-8") as fh:
        readme = fh.read()
    wrong_default = readme.replace("| `--clock-skew-s` | `600` |", "| `--clock-skew-s` | `60` |")
    unknown = readme.replace("| `--timezone` |", "| `--time-zone` |")
    assert wrong_default != readme and unknown != readme
    assert readme_table_problems(wrong_default) == [
        "row `--clock-skew-s`: shows '`60`', server/config.py's default is 600"]
    assert readme_table_problems(unknown) == ["row `--time-zone`: `--time-zone` is no setting of server/config.py"]
    assert _shown(FIELDS["return_window_days"], "`10`") and not _shown(FIELDS["return_window_days"], "ten")
    assert _shown(FIELDS["redis_cluster"], "off") and not _shown(FIELDS["redis_cluster"], "on")
    assert _shown(FIELDS["redis_url"], "(embedded)") and not _shown(FIELDS["redis_url"], "`localhost`")


def test_settlement_records_must_outlive_the_return_window():
    with pytest.raises(ValueError, match="settlement_ttl_days .* must cover return_window_days"):
        serve_config(["--settlement-ttl-days", "5"], {})
    assert serve_config(["--settlement-ttl-days", "10"], {}).settlement_ttl_days == 10
