"""The node's configuration (node/config.py): flags > environment > TOML file > defaults; every
mistake a one-line error naming the key and where it came from; the shipped service files agree
with the daemon they run."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.__main__ import build_parser, main
from node.config import ConfigError, NodeConfig, load
from sparecycles.cli.processes import child_env

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_UNIT = ROOT / "deploy" / "systemd" / "sparecycles-node.service"
USER_UNIT = ROOT / "deploy" / "systemd" / "sparecycles-node.user.service"
EXAMPLE = ROOT / "deploy" / "node.toml"


def parse(*argv: str, env: dict[str, str] | None = None) -> NodeConfig:
    """As the daemon does: its real parser, then the config."""
    return load(vars(build_parser().parse_args(list(argv))), env or {})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_flags_beat_the_environment_which_beats_the_file_which_beats_defaults(tmp_path: Path) -> None:
    conf = write(tmp_path / "node.toml", 'slots = 3\nowner = "file-owner"\ndrain_seconds = 5\nnice = 10\n')
    env = {"SPARECYCLES_NODE_SLOTS": "2", "SPARECYCLES_NODE_OWNER": "env-owner"}

    cfg = parse("--config", str(conf), "--slots", "1", env=env)

    assert cfg.settings.slots == 1                 # flag over environment and file
    assert cfg.settings.owner == "env-owner"       # environment over file
    assert cfg.settings.drain_seconds == 5.0       # file over default
    assert cfg.settings.nice == 10
    assert cfg.settings.max_run_seconds == 600.0   # default
    assert cfg.sources["slots"] == "--slots" and cfg.sources["owner"] == "SPARECYCLES_NODE_OWNER"
    assert cfg.sources["drain_seconds"] == str(conf) and "max_run_seconds" not in cfg.sources


def test_units_paths_and_advanced_keys_are_converted(tmp_path: Path) -> None:
    conf = write(tmp_path / "etc" / "node.toml",
                 'key = "state/node.key"\ncache_quota_mb = 3\nrun_memory_mb = 2\nworker_idle_seconds = 7\n'
                 'log_level = "debug"\ncert = "/abs/node.cert"\n')

    cfg = parse("--config", str(conf), env={"SPARECYCLES_NODE_HEARTBEAT_SECONDS": "0.5",
                                            "SPARECYCLES_NODE_PREFETCH": ""})

    assert cfg.settings.key_path == tmp_path / "etc" / "state" / "node.key"  # relative to the file
    assert cfg.settings.cert_path == Path("/abs/node.cert")
    assert cfg.settings.cache_quota_bytes == 3 * 1024 * 1024
    assert cfg.settings.run_memory_bytes == 2 * 1024 * 1024
    assert cfg.settings.worker_idle_seconds == 7.0           # a NodeSettings field without a flag
    assert cfg.settings.heartbeat_seconds == 0.5
    assert cfg.settings.prefetch is None                     # an empty variable is an unset one
    assert cfg.log_level == "DEBUG"


def test_the_default_file_is_read_only_if_it_exists(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert parse(env=env).file is None

    write(tmp_path / "sparecycles" / "node.toml", "slots = 2\n")

    cfg = parse(env=env)
    assert cfg.file == tmp_path / "sparecycles" / "node.toml" and cfg.settings.slots == 2


def test_an_explicit_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing.toml does not exist \(given by --config\)"):
        parse("--config", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="SPARECYCLES_NODE_CONFIG"):
        parse(env={"SPARECYCLES_NODE_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slot = 2\n", r"node.toml: unknown key 'slot' \(did you mean 'slots'\?\)"),
        ('slots = "two"\n', r"node.toml: key 'slots' must be an integer, got 'two'"),
        ("slots = true\n", r"node.toml: key 'slots' must be an integer, got True"),
        ("slots = 0\n", r"node.toml: key 'slots' must be between 1 and 4096, got 0"),
        ("nice = 25\n", r"node.toml: key 'nice' must be between 0 and 19, got 25"),
        ("drain_seconds = \"soon\"\n", r"node.toml: key 'drain_seconds' must be a number"),
        ("key = 3\n", r"node.toml: key 'key' must be a path \(a string\), got 3"),
        ('log_level = "loud"\n', r"node.toml: key 'log_level' must be one of DEBUG, INFO, WARNING, ERROR"),
        ("slots = \n", r"node.toml: not valid TOML"),
        ('broker = "http://x"\n', r"invalid settings \(.*node.toml\): broker URL 'http://x' is not mqtt://"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    conf = write(tmp_path / "node.toml", text)

    with pytest.raises(ConfigError, match=message) as caught:
        parse("--config", str(conf))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SPARECYCLES_NODE_SLOT": "2"}, r"environment variable SPARECYCLES_NODE_SLOT: unknown key 'slot'"),
        ({"SPARECYCLES_NODE_SLOTS": "two"}, r"SPARECYCLES_NODE_SLOTS must be an integer, got 'two'"),
        ({"SPARECYCLES_NODE_DRAIN_SECONDS": "-1"}, r"SPARECYCLES_NODE_DRAIN_SECONDS must be between 0 and"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(env=env)


def test_the_daemon_exits_2_with_one_line_and_no_traceback_on_a_bad_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "node.toml", "slots = 'many'\n")

    done = subprocess.run([sys.executable, "-m", "node", "--config", str(conf), "--key", str(tmp_path / "n.key")],
                          capture_output=True, text=True, timeout=60, env=child_env())

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"sparecycles node: {conf}: key 'slots' must be an integer, got 'many'"]
    assert not (tmp_path / "n.key").exists()  # nothing started


def test_main_returns_2_for_a_bad_variable(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("SPARECYCLES_NODE_NICE", "-5")

    assert main(["--key", str(tmp_path / "n.key")]) == 2
    assert capsys.readouterr().err == "sparecycles node: SPARECYCLES_NODE_NICE must be between 0 and 19, got -5\n"


# ---- the shipped service files -------------------------------------------------------------


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_the_example_config_loads_and_the_system_unit_runs_the_daemon_with_it() -> None:
    service = unit(SYSTEM_UNIT)["Service"]
    command = service["ExecStart"].split()
    assert command[1:3] == ["node", "--config"] and command[3] == "/etc/sparecycles/node.toml"

    cfg = parse("--config", str(EXAMPLE))  # the file a volunteer copies to /etc/sparecycles/node.toml

    assert cfg.settings.key_path.parent == Path("/var/lib/sparecycles")
    assert cfg.settings.cache_dir.is_relative_to(Path("/var/cache/sparecycles"))
    assert {"/var/lib/sparecycles", "/var/cache/sparecycles"} <= set(service["ReadWritePaths"].split())
    assert service["User"] == "sparecycles" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_stopping_the_unit_drains_before_systemd_kills(path: Path) -> None:
    service = unit(path)["Service"]
    drain = parse("--config", str(EXAMPLE)).settings.drain_seconds

    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to the daemon alone: its run workers keep running while it drains
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > drain
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert (service["Nice"], service["IOSchedulingClass"], service["CPUWeight"]) == ("19", "idle", "1")


@pytest.mark.parametrize(("path", "user"), [(SYSTEM_UNIT, False), (USER_UNIT, True)], ids=["system", "user"])
def test_systemd_accepts_the_units_without_a_warning(path: Path, user: bool, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the ExecStart binary must exist for verify: point it at one that does
    text = path.read_text().replace("/usr/local/bin/sparecycles", "/bin/true").replace("%h/.local/bin/sparecycles",
                                                                                        "/bin/true")
    copy = tmp_path / "sparecycles-node.service"
    copy.write_text(text)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    done = subprocess.run([analyze, *(["--user"] if user else []), "verify", str(copy)], capture_output=True,
                          text=True, timeout=60, env={**child_env(), "XDG_RUNTIME_DIR": str(runtime)})
    if "Failed to initialize manager" in done.stderr or "Failed to lookup" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize(("text", "value"), [("false", False), ("0", False), ("no", False), ("true", True),
                                             ("on", True)])
def test_a_boolean_flag_reads_its_word(text: str, value: bool) -> None:
    # argparse's type=bool reads any non-empty string, "false" included, as True: a node told
    # `--idle-only false` kept suspending itself for other processes' CPU.
    assert parse("--idle-only", text).settings.idle_only is value


def test_a_boolean_flag_that_is_not_a_boolean_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--idle-only", "maybe")
    assert exited.value.code == 2 and "expected true or false" in capsys.readouterr().err
