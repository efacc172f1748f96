"""Settings: load order, types, and that the README documents every one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lake.errors import BadInput
from lake.settings import SETTINGS, Settings, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_load_order_defaults_file_env_flags(tmp_path):
    toml = tmp_path / "imagelake.toml"
    toml.write_text('lake = "/from/file"\nworkers = 3\nport = 9001\nthumbnail_sizes = [32, 128]\n')
    env = {"IMAGELAKE_WORKERS": "5", "IMAGELAKE_SPARK_UI": "yes"}
    s = load_settings(config=toml, env=env, overrides={"port": 9999, "lake": None})
    assert s.lake == "/from/file"                 # file beats default, a None flag changes nothing
    assert s.workers == 5                         # environment beats file
    assert s.port == 9999                         # flag beats everything
    assert s.spark_ui is True and s.thumbnail_sizes == (32, 128)
    assert s.master == Settings().master          # untouched default
    assert s.sources == ("defaults", str(toml), "IMAGELAKE_SPARK_UI", "IMAGELAKE_WORKERS", "--port")


def test_imagelake_section_in_a_shared_toml(tmp_path):
    toml = tmp_path / "conf.toml"
    toml.write_text('[imagelake]\nmaster = "spark://h:7077"\n')
    assert load_settings(config=toml, env={}).master == "spark://h:7077"


@pytest.mark.parametrize("env, message", [
    ({"IMAGELAKE_PORT": "eighty"}, "'port' must be of type int"),
    ({"IMAGELAKE_SPARK_UI": "maybe"}, "'spark_ui' must be of type bool"),
    ({"IMAGELAKE_RUNNER": "celery"}, "runner must be"),
    ({"IMAGELAKE_WORKERS": "0"}, "'workers' must be positive"),
    ({"IMAGELAKE_THUMBNAIL_SIZES": "4"}, "thumbnail_sizes"),
])
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(BadInput, match=message):
        load_settings(env=env)


def test_unknown_key_in_file_is_refused(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text("wrokers = 2\n")
    with pytest.raises(BadInput, match="unknown setting 'wrokers'"):
        load_settings(config=toml, env={})


def test_settings_are_frozen():
    with pytest.raises(Exception):
        Settings().port = 1  # type: ignore[misc]


def test_readme_documents_every_setting_with_its_default():
    text = README.read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", text, re.M)}
    for s in SETTINGS:
        assert s.name in rows, f"README's settings table lacks {s.name}"
        default = ",".join(map(str, s.default)) if isinstance(s.default, tuple) else str(s.default)
        assert rows[s.name] == default, f"README says {s.name} defaults to {rows[s.name]}, code says {default}"


def test_readme_documents_every_table_schema():
    from lake.catalog import TABLES, markdown

    text = README.read_text()
    for name in TABLES:
        assert markdown([name]).strip() in text, \
            f"README's Tables section is out of date for {name}; paste `python -m lake.catalog` output"
