"""Configuration: the small TOML reader (used before Python 3.11) against
tomllib, its errors, and how files, profiles, the environment and flags
combine (README, "Configuration").

Every test passes `cwd=` and `environ=` (or sets the process environment
with monkeypatch), so the machine's own files and variables never leak in.
"""

import json
import os

import pytest

import buquet
from buquet import ConfigError, LocalStore, S3Store, _parse_toml_small, config_paths, load_config, main, parse_toml

try:
    import tomllib
except ImportError:  # Python 3.9 and 3.10: only the small reader
    tomllib = None


# ============================================================================
# The small TOML reader
# ============================================================================

VALID = {
    "the README's example": '''
[default]
bucket = "my-queue"
region = "us-east-1"
endpoint = "http://localhost:9000"   # only for non-AWS stores

[profiles.dev]                         # --profile dev, or BUQUET_PROFILE=dev
bucket = "my-queue-dev"

[worker]
shards = ["0", "1", "2", "3"]
concurrency = 8

[worker.polling]
min_interval_ms = 100
max_interval_ms = 2500

[monitor]
check_interval_secs = 60
sweep_interval_secs = 300
''',
    "comments and blank lines only": "# nothing here\n\n   # indented comment\n",
    "empty": "",
    "a hash inside strings": 'a = "x # y"\nb = \'p#q\'\n',
    "escapes": 's = "tab\\tnl\\nquote\\"back\\\\slash\\u00e9\\U0001F600"\n',
    "literal strings keep backslashes": "path = 'C:\\Users\\buquet'\n",
    "integers and floats": "a = 1\nb = -2\nc = +3\nd = 1_000\ne = 3.5\nf = -0.5e3\ng = 1e6\nh = 6.626e-34\ni = -0.0\n",
    "inf": "a = inf\nb = -inf\nc = +inf\n",
    "booleans": "t = true\nf = false\n",
    "arrays": 'a = ["0", "1"]\nb = [1, 2, 3,]\nc = []\nd = [[1, 2], ["a"]]\ne = [ true , false ]\n',
    "an array over several lines, with comments":
        'shards = [\n  "0",  # first\n  "1",\n  # a comment line\n  "2",\n]\nafter = 1\n',
    "nested arrays over several lines": "a = [\n  [1,\n   2],\n  [3],\n]\n",
    "brackets in a comment after an array": 'shards = ["0", "1"]  # not [all of them\nafter = 1\n',
    "brackets in a string in an array": 'a = ["[x", "y]"]\nafter = 1\n',
    "tables and subtables": '[a]\nx = 1\n[b]\ny = 2\n[a.c]\nz = 3\n[profiles.dev]\nbucket = "d"\n',
    "dotted keys": "worker.concurrency = 4\nworker.polling.min_interval_ms = 50\n",
    "quoted keys": '"quoted key" = 1\n\'literal\' = 2\n[profiles."my-profile"]\nbucket = "x"\n',
    "table headers with spaces and comments": '[ profiles . dev ]  # dev\nbucket = "x"\n',
    "indentation": '  [default]\n    bucket = "a"\n\t# tab comment\n',
    "windows line endings": '[default]\r\nbucket = "x"\r\nshards = [\r\n  "0",\r\n]\r\n',
    "unicode": 'name = "Zürich ☃"\n"clé" = "valeur"\n',
    "empty strings": "a = \"\"\nb = ''\n",
}


@pytest.mark.parametrize("text", VALID.values(), ids=list(VALID))
def test_small_reader_agrees_with_tomllib(text):
    small = _parse_toml_small(text, "f.toml")
    assert isinstance(small, dict)
    if tomllib is None:
        pytest.skip("no tomllib before Python 3.11: the small reader ran, nothing to compare with")
    assert small == tomllib.loads(text)


def test_small_reader_reads_the_readme_example_as_expected():
    data = _parse_toml_small(VALID["the README's example"], "f.toml")
    assert data["default"] == {"bucket": "my-queue", "region": "us-east-1", "endpoint": "http://localhost:9000"}
    assert data["profiles"] == {"dev": {"bucket": "my-queue-dev"}}
    assert data["worker"] == {"shards": ["0", "1", "2", "3"], "concurrency": 8,
                              "polling": {"min_interval_ms": 100, "max_interval_ms": 2500}}


INVALID = [
    ('[default]\nlimits = { a = 1 }\n', 2, "inline tables are not supported by the small TOML reader"),
    ('a = 1\nb = """\nline\n"""\n', 2, "multi-line strings are not supported by the small TOML reader"),
    ("a = '''x'''\n", 1, "multi-line strings are not supported by the small TOML reader"),
    ('[[workers]]\nname = "a"\n', 1, "arrays of tables are not supported by the small TOML reader"),
    ('[default]\nbucket = "a"\nbucket = "b"\n', 3, "key 'bucket' defined twice"),
    ("a b = 1\n", 1, "bad key 'a b'"),
    ("[default]\n\n= 1\n", 3, "bad key ''"),
    ("day = 1979-05-27\n", 1, "cannot read '1979-05-27'"),
    ("when = 1979-05-27T07:32:00Z\n", 1, "cannot read '1979-05-27T07:32:00Z'"),
    ("at = 07:32:00\n", 1, "cannot read '07:32:00'"),
    ("a = 1\na.b = 2\n", 2, "'a' is not a table"),
    ("a = 1\n[a]\n", 2, "'a' is not a table"),
    ("[default\n", 1, "bad table header '[default'"),
    ("bucket\n", 1, "expected key = value, got 'bucket'"),
    ("a =\n", 1, "a value is missing"),
    ('a = "open\n', 1, "unterminated string"),
    ("a = [1, 2\n", 1, "unterminated array"),
    ("a = [\n  1,\n", 1, "unterminated array"),
    ('a = "x" "y"\n', 1, "unexpected '\"y\"' after the value"),
    ('a = "\\q"\n', 1, "unknown escape \\q"),
    ("a = yes\n", 1, "cannot read 'yes'"),
    ("a = " + "[" * 5000 + "\n", 1, "arrays nested too deeply"),
    # An unclosed array is read on over the following lines: still one clear error.
    ("a = " + "[" * 5000 + "\nb = 1\n", 1, "arrays nested too deeply"),
    ('[default]\nbucket = "a"\n[default]\nregion = "b"\n', 3, "table [default] defined twice"),
    ('[profiles.dev]\n[profiles . "dev"]\n', 2, "table [profiles.dev] defined twice"),
]


@pytest.mark.parametrize("text, line, message", INVALID, ids=[m for _, _, m in INVALID])
def test_small_reader_refuses_what_it_cannot_read_naming_file_and_line(text, line, message):
    with pytest.raises(ConfigError) as info:
        _parse_toml_small(text, "conf/f.toml")
    assert str(info.value).startswith("conf/f.toml:%d: %s" % (line, message)), str(info.value)


def test_parse_toml_errors_name_the_file_on_every_python():
    with pytest.raises(ConfigError) as info:
        parse_toml("a = {\n", "conf/f.toml")
    assert str(info.value).startswith("conf/f.toml:")
    assert isinstance(info.value, buquet.BuquetError)


# ============================================================================
# Files, profiles, environment, flags
# ============================================================================


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def env(tmp_path):
    """An environment with no configuration but a user-file directory of the test's own."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def test_project_file_is_found_in_a_parent_directory(tmp_path, env):
    project = write(tmp_path / "proj" / ".buquet.toml", '[default]\nbucket = "from-parent"\n')
    deep = tmp_path / "proj" / "src" / "pkg"
    deep.mkdir(parents=True)
    config = load_config(cwd=str(deep), environ=env)
    assert config.get("bucket") == "from-parent" and config.sources["bucket"] == project
    assert config.files == [project] and config.warnings == []
    assert config_paths(str(deep), env)[1] == ("project", project)


def test_a_profile_overrides_default_chosen_by_argument_or_buquet_profile(tmp_path, env):
    write(tmp_path / ".buquet.toml", '[default]\nbucket = "main"\nregion = "us-east-1"\n'
                                     '[profiles.dev]\nbucket = "dev"\n[profiles.eu]\nregion = "eu-west-1"\n')
    cwd = str(tmp_path)
    assert load_config(cwd=cwd, environ=env).values == {"bucket": "main", "region": "us-east-1"}
    dev = load_config(profile="dev", cwd=cwd, environ=env)
    assert (dev.get("bucket"), dev.get("region"), dev.profile) == ("dev", "us-east-1", "dev")
    eu = load_config(cwd=cwd, environ=dict(env, BUQUET_PROFILE="eu"))
    assert (eu.get("bucket"), eu.get("region"), eu.profile) == ("main", "eu-west-1", "eu")
    # The argument wins over the variable.
    assert load_config(profile="dev", cwd=cwd, environ=dict(env, BUQUET_PROFILE="eu")).get("bucket") == "dev"
    missing = load_config(profile="prod", cwd=cwd, environ=env)
    assert missing.warnings == ["profile 'prod' is not defined in %s" % (tmp_path / ".buquet.toml")]


def test_environment_overrides_the_file(tmp_path, env):
    write(tmp_path / ".buquet.toml", '[default]\nbucket = "file"\nendpoint = "http://file:9000"\n'
                                     '[worker]\nshards = ["0"]\nconcurrency = 2\n')
    config = load_config(cwd=str(tmp_path), environ=dict(
        env, S3_BUCKET="env", BUQUET_SHARDS="1, 2,3", BUQUET_CONCURRENCY="6", BUQUET_NO_MONITOR="1"))
    assert (config.get("bucket"), config.sources["bucket"]) == ("env", "$S3_BUCKET")
    assert config.get("endpoint") == "http://file:9000"
    assert (config.get("shards"), config.get("concurrency"), config.get("monitor")) == (["1", "2", "3"], 6, False)
    with pytest.raises(ConfigError, match="^BUQUET_CONCURRENCY must be an integer, got 'many'$"):
        load_config(cwd=str(tmp_path), environ=dict(env, BUQUET_CONCURRENCY="many"))


def test_flags_override_the_environment(tmp_path, monkeypatch, capsys):
    write(tmp_path / ".buquet.toml", '[default]\nbucket = "file"\nregion = "eu-west-1"\n')
    explicit = write(tmp_path / "explicit.toml", '[default]\nendpoint = "http://explicit:9000"\n')
    for name in list(os.environ):
        if name.startswith(("S3_", "BUQUET_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("S3_BUCKET", "env")
    monkeypatch.setenv("S3_REGION", "us-west-2")
    monkeypatch.chdir(tmp_path)
    assert main(["--bucket", "flag", "config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["store"] == "s3://flag"
    assert shown["settings"]["bucket"] == {"value": "flag", "source": "--bucket"}
    assert shown["settings"]["region"] == {"value": "us-west-2", "source": "$S3_REGION"}
    # --config adds a file above the project's; the environment and flags still win.
    assert main(["--config", explicit, "--region", "ap-south-1", "config", "show", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["endpoint"] == {"value": "http://explicit:9000", "source": explicit}
    assert settings["bucket"] == {"value": "env", "source": "$S3_BUCKET"}
    assert settings["region"] == {"value": "ap-south-1", "source": "--region"}


def test_unknown_keys_are_warnings_and_config_validate_lists_them(tmp_path, env, monkeypatch, capsys):
    path = write(tmp_path / ".buquet.toml", 'stray = 1\n[default]\nbucket = "b"\nbukket = "typo"\n'
                                            '[worker]\nthreads = 4\n[profiles.dev]\ncolour = "blue"\n'
                                            '[telemetry]\nenabled = true\n')
    config = load_config(cwd=str(tmp_path), environ=env)
    assert config.warnings == [
        "%s: unknown top-level key stray (ignored; settings go under [default])" % path,
        "%s: unknown key default.bukket (ignored)" % path,
        "%s: unknown key worker.threads (ignored)" % path,
        "%s: unknown key telemetry.enabled (ignored)" % path,
        "%s [profiles.dev]: unknown key default.colour (ignored)" % path,
    ]
    assert config.values == {"bucket": "b"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    for name in ("BUQUET_CONFIG", "BUQUET_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["config", "validate"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["warning: " + w for w in config.warnings] + ["ok: " + path]


def test_the_originals_keys_without_effect_here_are_reported_as_such(tmp_path, env):
    path = write(tmp_path / ".buquet.toml", '[worker]\npoll_interval_ms = 500\nindex_mode = "hybrid"\n'
                                            '[worker.shard_leasing]\nenabled = true\n'
                                            '[monitor]\nsweep_mode = "continuous"\ncheck_interval_secs = 30\n')
    config = load_config(cwd=str(tmp_path), environ=env)
    suffix = "is accepted for compatibility with the original and has no effect here"
    assert config.warnings == ["%s: %s %s" % (path, key, suffix) for key in (
        "worker.poll_interval_ms", "worker.index_mode", "worker.shard_leasing.enabled", "monitor.sweep_mode")]
    assert config.values == {"monitor_interval": 30}


def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_key(tmp_path, env, monkeypatch, capsys):
    path = write(tmp_path / ".buquet.toml", "[default]\nbucket = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(cwd=str(tmp_path), environ=env)
    assert str(info.value) == "%s: default.bucket must be a string, got 3" % path
    write(tmp_path / ".buquet.toml", '[worker]\nconcurrency = true\n')
    with pytest.raises(ConfigError, match="worker.concurrency must be an integer, got True"):
        load_config(cwd=str(tmp_path), environ=env)
    write(tmp_path / ".buquet.toml", '[worker]\nshards = "0,1"\n')
    with pytest.raises(ConfigError, match="worker.shards must be an array, got '0,1'"):
        load_config(cwd=str(tmp_path), environ=env)
    # Through the command: exit 2, one line.
    write(tmp_path / ".buquet.toml", "[default]\nbucket = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err == "buquet: error: %s: default.bucket must be a string, got 3\n" % path


def test_user_file_then_project_then_explicit_file(tmp_path, env):
    user = write(tmp_path / "xdg" / "buquet" / "config.toml",
                 '[default]\nbucket = "user"\nregion = "user-region"\nendpoint = "http://user"\n')
    project = write(tmp_path / "proj" / ".buquet.toml", '[default]\nbucket = "project"\nregion = "project-region"\n')
    explicit = write(tmp_path / "elsewhere.toml", '[default]\nbucket = "explicit"\n')
    other = write(tmp_path / "other.toml", '[default]\nbucket = "other"\n')
    cwd = str(tmp_path / "proj")
    assert [role for role, _ in config_paths(cwd, env)] == ["user", "project"]

    config = load_config(cwd=cwd, environ=dict(env, BUQUET_CONFIG=explicit))
    assert config.files == [user, project, explicit]
    assert (config.get("bucket"), config.get("region"), config.get("endpoint")) == (
        "explicit", "project-region", "http://user")
    assert config.sources == {"bucket": explicit, "region": project, "endpoint": user}
    # --config (config_file=) wins over BUQUET_CONFIG.
    assert load_config(config_file=other, cwd=cwd, environ=dict(env, BUQUET_CONFIG=explicit)).get("bucket") == "other"
    assert load_config(cwd=str(tmp_path), environ=env).get("bucket") == "user"
    with pytest.raises(ConfigError, match="^config file .*missing.toml does not exist$"):
        load_config(config_file=str(tmp_path / "missing.toml"), cwd=cwd, environ=env)


def test_connect_reads_the_file_when_nothing_is_passed(tmp_path, monkeypatch, capsys):
    write(tmp_path / ".buquet.toml", '[default]\nbucket = "cfg-queue"\nendpoint = "http://127.0.0.1:9"\n'
                                     'region = "eu-central-1"\n[queue]\nshard_prefix_len = 1\n'
                                     '[profiles.local]\nlocal_dir = "here"\n')
    monkeypatch.chdir(tmp_path)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    queue = buquet.connect(environ=env)  # no request is made
    assert isinstance(queue.store, S3Store)
    assert queue.store.bucket == "cfg-queue"
    assert queue.store.client.endpoint_url == "http://127.0.0.1:9"
    assert queue.store.client.region == "eu-central-1"
    # An argument wins over the file; the environment too.
    assert buquet.connect(bucket="arg-queue", environ=env).store.bucket == "arg-queue"
    assert buquet.connect(environ=dict(env, S3_BUCKET="env-queue")).store.bucket == "env-queue"
    # A profile without a bucket of its own still inherits [default]'s.
    local = buquet.connect(profile="local", environ=env)
    assert local.store.bucket == "cfg-queue"
    assert capsys.readouterr().err == ""


def test_connect_uses_the_local_directory_from_the_file_without_a_notice(tmp_path, monkeypatch, capsys):
    write(tmp_path / ".buquet.toml", '[default]\nlocal_dir = "queue-data"\n')
    monkeypatch.chdir(tmp_path)
    queue = buquet.connect(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert isinstance(queue.store, LocalStore) and queue.store.root == str(tmp_path / "queue-data")
    assert capsys.readouterr().err == ""
    (tmp_path / ".buquet.toml").unlink()
    fallback = buquet.connect(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert fallback.store.root == str(tmp_path / ".buquet")
    assert capsys.readouterr().err == (
        "buquet: no bucket configured (S3_BUCKET); using the local directory store at .buquet\n")


# ============================================================================
# Bad configuration through the command: one line, exit 2, nothing written
# ============================================================================


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The process runs in tmp_path with no configuration of the machine's;
    returns the path of the project file (not yet written)."""
    for name in list(os.environ):
        if name.startswith(("S3_", "BUQUET_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path / ".buquet.toml"


def submit_with(capsys, tmp_path):
    """`buquet --local-dir store submit -t a`: (exit code, stdout, stderr),
    after checking that no store was written to."""
    code = main(["--local-dir", "store", "submit", "-t", "a"])
    captured = capsys.readouterr()
    written = [p for d in ("store", ".buquet") for p in (tmp_path / d).rglob("*") if p.is_file() and p.name != ".lock"]
    assert written == [] or code == 0, written
    return code, captured.out, captured.err


# Syntax: the message names the file and the line (tomllib and the small
# reader word the rest differently).
SYNTAX = [
    ("[default]\nbucket =\n", 2),
    ("[worker]\nconcurrency = 1\nconcurrency = 2\n", 3),
    ('[default]\nbucket = "a"\n[default]\nregion = "b"\n', 3),
    ("[default\n", 1),
    ("a = 1\n[a]\n", 2),
    ('[default]\nbucket = "a" "b"\n', 2),
]


@pytest.mark.parametrize("text, line", SYNTAX, ids=[t.splitlines()[-1] for t, _ in SYNTAX])
def test_a_file_that_is_not_toml_is_one_line_naming_file_and_line(project, capsys, tmp_path, text, line):
    project.write_text(text)
    code, out, err = submit_with(capsys, tmp_path)
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("buquet: error: %s:" % project)
    assert ":%d: " % line in err or "(at line %d, column " % line in err, err


# Types and shapes: whole messages, the same on every Python.
SHAPES = [
    ('[default]\nforce_path_style = "yes"\n', "default.force_path_style must be true or false, got 'yes'"),
    ('[default]\nregion = ["eu-west-1"]\n', "default.region must be a string, got ['eu-west-1']"),
    ('[worker]\ngrace_period_secs = "30s"\n', "worker.grace_period_secs must be a number, got '30s'"),
    ("[queue]\nshard_prefix_len = 1.5\n", "queue.shard_prefix_len must be an integer, got 1.5"),
    ("[default.bucket]\nname = \"q\"\n", "default.bucket must be a string, got {'name': 'q'}"),
    ("profiles = 1\n", "profiles must be a table"),
    ("[profiles]\ndev = 1\n", "profiles.dev must be a table"),
]


@pytest.mark.parametrize("text, message", SHAPES, ids=[m.split(" must")[0] for _, m in SHAPES])
def test_a_value_of_the_wrong_type_or_shape_is_one_line_naming_file_and_key(project, capsys, tmp_path, text,
                                                                             message):
    project.write_text(text)
    assert submit_with(capsys, tmp_path) == (2, "", "buquet: error: %s: %s\n" % (project, message))


def test_a_wrong_value_in_a_profile_not_in_use_is_still_an_error(project, capsys, tmp_path):
    project.write_text('[default]\nbucket = "b"\n[profiles.dev]\nbucket = 3\n')
    assert submit_with(capsys, tmp_path) == (
        2, "", "buquet: error: %s [profiles.dev]: default.bucket must be a string, got 3\n" % project)


# Values of the right type but out of range: refused where they are read,
# not clamped (a shard_prefix_len of 9 would put tasks under 4-digit shards
# without a word) nor taken as "not set" (concurrency 0).
SHARDS = "a non-empty list of hex shards such as 0, 1, a, f"
RANGES = [
    ("[queue]\nshard_prefix_len = 9\n", "queue.shard_prefix_len must be an integer 1..4, got 9"),
    ("[queue]\nshard_prefix_len = 0\n", "queue.shard_prefix_len must be an integer 1..4, got 0"),
    ("[worker]\nconcurrency = 0\n", "worker.concurrency must be an integer 1..1024, got 0"),
    ("[worker]\nconcurrency = -1\n", "worker.concurrency must be an integer 1..1024, got -1"),
    ('[worker]\nshards = ["g"]\n', "worker.shards must be %s, got ['g']" % SHARDS),
    ("[worker]\nshards = [0, 1]\n", "worker.shards must be %s, got [0, 1]" % SHARDS),
    ("[worker]\nshards = []\n", "worker.shards must be %s, got []" % SHARDS),
    ("[worker]\nheartbeat_interval_secs = 0\n",
     "worker.heartbeat_interval_secs must be a number of seconds > 0, got 0"),
    ("[worker.polling]\nmin_interval_ms = 0\n", "worker.polling.min_interval_ms must be a positive integer, got 0"),
    ("[monitor]\ncheck_interval_secs = nan\n", "monitor.check_interval_secs must be a number of seconds > 0, got nan"),
    ("[monitor]\nsweep_interval_secs = -5\n",
     "monitor.sweep_interval_secs must be a number of seconds >= 0 (0: no sweep), got -5"),
]


@pytest.mark.parametrize("text, message", RANGES, ids=[t.strip().replace("\n", " ") for t, _ in RANGES])
def test_a_value_out_of_range_is_one_line_naming_file_and_key(project, capsys, tmp_path, text, message):
    project.write_text(text)
    assert submit_with(capsys, tmp_path) == (2, "", "buquet: error: %s: %s\n" % (project, message))
    assert main(["config", "validate"]) == 2  # validate says so too, rather than "ok"
    assert capsys.readouterr().err == "buquet: error: %s: %s\n" % (project, message)


ENVIRONMENT = [
    ("BUQUET_SHARD_PREFIX_LEN", "x", "must be an integer, got 'x'"),
    ("BUQUET_POLLING_MIN_INTERVAL_MS", "fast", "must be an integer, got 'fast'"),
    ("BUQUET_POLLING_MAX_INTERVAL_MS", "1.5", "must be an integer, got '1.5'"),
    ("BUQUET_MONITOR_CHECK_INTERVAL", "soon", "must be a number of seconds, got 'soon'"),
    ("BUQUET_MONITOR_SWEEP_INTERVAL", "5m", "must be a number of seconds, got '5m'"),
    ("BUQUET_SHARD_PREFIX_LEN", "9", "must be an integer 1..4, got '9'"),
    ("BUQUET_CONCURRENCY", "0", "must be an integer 1..1024, got '0'"),
    ("BUQUET_POLLING_MIN_INTERVAL_MS", "0", "must be a positive integer, got '0'"),
    ("BUQUET_MONITOR_CHECK_INTERVAL", "nan", "must be a number of seconds > 0, got 'nan'"),
    ("BUQUET_MONITOR_SWEEP_INTERVAL", "-5", "must be a number of seconds >= 0 (0: no sweep), got '-5'"),
    ("BUQUET_SHARDS", "g", "must be %s, got 'g'" % SHARDS),
    ("BUQUET_SHARDS", "0,,1", "must be %s, got '0,,1'" % SHARDS),
    ("BUQUET_SHARDS", ",", "must be %s, got ','" % SHARDS),
    ("BUQUET_NO_MONITOR", "maybe", "must be true or false (1/0, yes/no, on/off), got 'maybe'"),
    ("S3_FORCE_PATH_STYLE", "maybe", "must be true or false (1/0, yes/no, on/off), got 'maybe'"),
]


@pytest.mark.parametrize("var, raw, message", ENVIRONMENT, ids=["%s=%s" % (v, r) for v, r, _ in ENVIRONMENT])
def test_a_malformed_environment_variable_is_a_config_error_naming_it(tmp_path, env, var, raw, message):
    with pytest.raises(ConfigError) as info:
        load_config(cwd=str(tmp_path), environ=dict(env, **{var: raw}))
    assert str(info.value) == "%s %s" % (var, message)


def test_a_malformed_environment_variable_stops_the_command_before_any_write(project, capsys, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("BUQUET_SHARD_PREFIX_LEN", "9")
    assert submit_with(capsys, tmp_path) == (
        2, "", "buquet: error: BUQUET_SHARD_PREFIX_LEN must be an integer 1..4, got '9'\n")


def test_boolean_variables_read_the_usual_spellings(tmp_path, env):
    for raw, monitor in (("1", False), ("true", False), ("YES", False), ("on", False),
                         ("0", True), ("false", True), ("no", True), ("off", True)):
        config = load_config(cwd=str(tmp_path), environ=dict(env, BUQUET_NO_MONITOR=raw))
        assert config.get("monitor", True) is monitor, raw


def test_a_missing_config_file_named_by_flag_or_variable_is_one_line(project, capsys, tmp_path, monkeypatch):
    assert main(["--config", "nowhere.toml", "config", "show"]) == 2
    assert capsys.readouterr() == ("", "buquet: error: config file nowhere.toml does not exist\n")
    monkeypatch.setenv("BUQUET_CONFIG", str(tmp_path / "gone.toml"))
    assert submit_with(capsys, tmp_path) == (
        2, "", "buquet: error: config file %s does not exist\n" % (tmp_path / "gone.toml"))


def test_a_file_that_is_not_utf8_is_one_line_naming_it(project, capsys, tmp_path):
    project.write_bytes(b'[default]\nbucket = "\xff"\n')
    code, out, err = submit_with(capsys, tmp_path)
    assert (code, out) == (2, "")
    assert err == ("buquet: error: cannot read %s: not UTF-8 text ('utf-8' codec can't decode byte 0xff in position "
                   "20: invalid start byte)\n" % project)


def test_values_nested_too_deeply_are_one_line_not_a_traceback(project, capsys, tmp_path):
    project.write_text("[default]\nbucket = " + "[" * 100000 + "\n")
    code, out, err = submit_with(capsys, tmp_path)
    assert (code, out) == (2, ""), err[-300:]
    assert err.count("\n") == 1 and err.startswith("buquet: error: %s:" % project) and "nested too deeply" in err
