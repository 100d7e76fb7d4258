"""`sparecycles` argument handling: every documented form parses, process commands receive their
arguments untouched, and expected failures end in a message and an exit code, not a traceback."""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sparecycles.cli.main import DEFAULT_COORDINATOR, build_parser, main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_submit_parses_every_option() -> None:
    args = build_parser().parse_args([
        "submit", "model.onnx", "inputs.npz", "--coordinator", "http://10.0.0.5:8080", "--replicas", "3",
        "--task-size", "64", "--final", "argmax", "--timeout", "90", "-o", "out.npz",
    ])

    assert (args.command, args.model, args.inputs) == ("submit", "model.onnx", "inputs.npz")
    assert args.output == "out.npz"
    assert (args.coordinator, args.replicas, args.task_size, args.final, args.timeout) == (
        "http://10.0.0.5:8080", 3, 64, "argmax", 90.0)


def test_submit_options_default_to_none_so_the_coordinator_decides() -> None:
    args = build_parser().parse_args(["submit", "m.onnx", "i.npz", "--output", "o.npz"])

    assert (args.replicas, args.task_size, args.final, args.timeout) == (None, None, None, None)


@pytest.mark.parametrize(
    "bad", [["--replicas", "0"], ["--task-size", "x"], ["--final", "mean"], ["--timeout", "-1"]]
)
def test_submit_rejects_bad_option_values_with_exit_2(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["submit", "m.onnx", "i.npz", "-o", "o.npz", *bad])

    assert code == 2
    err = capsys.readouterr().err
    # one line that names the command, the option and where help is (protocol/cliparse.py)
    assert err.count("\n") == 1 and err.startswith("sparecycles submit: error: argument ") and "--help" in err


def test_submit_without_output_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "m.onnx", "i.npz"]) == 2
    assert "-o/--output" in capsys.readouterr().err


def test_coordinator_url_defaults_to_the_environment_then_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARECYCLES_COORDINATOR", raising=False)
    assert build_parser().parse_args(["status", "j1"]).coordinator == DEFAULT_COORDINATOR == "http://127.0.0.1:8080"

    monkeypatch.setenv("SPARECYCLES_COORDINATOR", "http://coord.example:9000")
    assert build_parser().parse_args(["ledger", "balances"]).coordinator == "http://coord.example:9000"


def test_status_and_ledger_forms_parse() -> None:
    parser = build_parser()

    status = parser.parse_args(["status", "j42", "--coordinator", "http://h:1", "--json"])
    balances = parser.parse_args(["ledger", "balances", "--coordinator", "http://h:1", "--json"])
    history = parser.parse_args(["ledger", "history", "nodeabc", "--coordinator", "http://h:1"])
    verify = parser.parse_args(["ledger", "verify", "--coordinator", "http://h:1"])

    assert (status.command, status.job, status.json) == ("status", "j42", True)
    assert (balances.ledger_command, balances.json, balances.coordinator) == ("balances", True, "http://h:1")
    assert (history.ledger_command, history.node, history.json) == ("history", "nodeabc", False)
    assert (verify.command, verify.ledger_command) == ("ledger", "verify")


@pytest.mark.parametrize(
    ("command", "rest"),
    [
        ("coordinator", ["--broker", "mqtt://127.0.0.1:1883", "--db", "sqlite:///tmp/c.db", "--http",
                         "127.0.0.1:8080", "--replicas", "2"]),
        ("node", ["--broker", "mqtt://h:1883", "--coordinator", "http://h:8080", "--key", "k.key", "--owner",
                  "alice", "--slots", "4"]),
        ("broker", ["--listen", "127.0.0.1:1883"]),
        ("demo", []),
        ("coordinator", ["--help"]),
        ("node", ["-h", "--", "x y", "--owner=bob"]),
    ],
)
def test_process_commands_keep_their_arguments_intact(command: str, rest: list[str]) -> None:
    args = build_parser().parse_args([command, *rest])

    assert args.command == command
    assert args.args == rest


@pytest.mark.parametrize(
    ("command", "module"),
    [("coordinator", "coordinator.__main__"), ("node", "node.__main__"), ("broker", "sparecycles.cli.broker"),
     ("demo", "sparecycles.cli.demo")],
)
def test_main_forwards_process_commands_to_their_entry_point(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        received.append(argv)
        return 7

    fake = types.ModuleType(module)
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module, fake)

    code = main([command, "--help", "--db", "sqlite:///a b.db"])

    assert code == 7
    assert received == [["--help", "--db", "sqlite:///a b.db"]]


def test_a_forwarded_entry_point_returning_none_means_success(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("sparecycles.cli.demo")
    fake.main = lambda argv: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sparecycles.cli.demo", fake)

    assert main(["demo"]) == 0


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "submit" in err and "ledger" in err


def test_ledger_without_a_subcommand_says_which_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger"]) == 2
    assert "balances" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "coordinator" in capsys.readouterr().out


def test_submit_with_a_missing_model_exits_2_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 2), np.float32))

    code = main(["submit", str(tmp_path / "missing.onnx"), str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "o.npz")])

    err = capsys.readouterr().err
    assert code == 2
    assert "model file" in err and "missing.onnx" in err and "not found" in err
    assert "Traceback" not in err


def test_submit_with_missing_inputs_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"model")

    code = main(["submit", str(tmp_path / "m.onnx"), str(tmp_path / "nope.npz"),
                 "-o", str(tmp_path / "o.npz")])

    assert code == 2
    assert "inputs file" in capsys.readouterr().err


def test_submit_with_inputs_that_are_not_npz_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"model")
    (tmp_path / "in.csv").write_text("1,2,3\n")

    code = main(["submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.csv"), "-o", str(tmp_path / "o.npz")])

    assert code == 2
    assert "not a .npz file" in capsys.readouterr().err


def test_submit_to_a_missing_output_directory_exits_2_before_contacting_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"model")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 2), np.float32))

    code = main(["submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "no" / "o.npz"), "--coordinator", f"http://127.0.0.1:{free_port()}"])

    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["ledger", "balances"], ["ledger", "balances", "--json"], ["ledger", "history", "n1"],
     ["ledger", "verify"], ["status", "j1"]],
)
def test_an_unreachable_coordinator_exits_3_with_how_to_start_one(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    code = main([*argv, "--coordinator", url])

    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == ""
    assert url in captured.err and "sparecycles coordinator" in captured.err
    assert "Traceback" not in captured.err


def test_submit_to_an_unreachable_coordinator_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"model")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 2), np.float32))

    code = main(["submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"),
                 "--coordinator", f"http://127.0.0.1:{free_port()}"])

    assert code == 3
    assert "is the coordinator running" in capsys.readouterr().err


def test_a_missing_entry_point_module_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sparecycles.cli.demo", None)  # makes `import cli.demo` fail as if absent

    code = main(["demo"])

    err = capsys.readouterr().err
    assert code == 2
    assert "cannot import sparecycles.cli.demo" in err and "pip install" in err
