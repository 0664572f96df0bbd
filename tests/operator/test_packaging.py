"""Installing Ferry: the package's dependencies, the service unit, the Dockerfile, `ferry init`."""

from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from ferry.cli.main import main
from ferry.config import RelayConfig
from tests.harness import REPO

#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"dns": "dnspython"}


def _third_party_imports() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "ferry").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "ferry"}


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!;\[ ]", req, maxsplit=1)[0].lower()


def test_runtime_dependencies_are_exactly_what_the_package_imports() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    imported = {DISTRIBUTIONS.get(m, m).lower() for m in _third_party_imports()}
    assert declared == imported
    assert project["name"] == "ferry-relay"  # "ferry" on the index is another project
    assert project["scripts"] == {"ferry": "ferry.cli:main"}


def test_the_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {
        line.split("==")[0].lower()
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line
    }
    assert {_requirement_name(r) for r in project["dependencies"]} <= pinned
    assert "dkimpy" not in pinned  # only the tests use it


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    path = REPO / "contrib/systemd/ferry.service"
    unit.read_string(path.read_text())
    svc = unit["Service"]
    assert svc["User"] == "ferry" and svc["Restart"] == "on-failure"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert svc["StateDirectory"] == "ferry" and "/var/lib/ferry" in svc["ReadWritePaths"]
    assert svc["ExecStart"].endswith("ferry --config /etc/ferry/ferry.toml serve")
    if shutil.which("systemd-analyze"):
        # The unit's syntax, with ExecStart pointing at this checkout's ferry.
        ferry = Path(sys.executable).with_name("ferry")
        text = path.read_text().replace("/opt/ferry/bin/ferry", str(ferry))
        tmp = REPO / ".venv" / "ferry-verify.service"
        tmp.write_text(text)
        try:
            res = subprocess.run(
                ["systemd-analyze", "verify", str(tmp)], capture_output=True, text=True
            )
        finally:
            tmp.unlink()
        # Misspelt keys and bad values are only warnings ("..., ignoring."): fail on them.
        problems = [line for line in res.stderr.splitlines() if "ignoring" in line]
        assert not problems, res.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_data_volume() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/var/lib/ferry"]' in text
    assert "-c requirements.lock" in text
    # The configuration the image ships is valid.
    RelayConfig.load(REPO / "contrib/docker/ferry.toml", env={})
    hadolint = Path(sys.executable).with_name("hadolint")
    if hadolint.exists():
        res = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True)
        assert res.returncode == 0, res.stdout.decode()


def test_init_writes_a_valid_starter_config(tmp_path: Path) -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(main, ["init", str(tmp_path / "etc"), "--hostname", "mx.example.net"])
    assert res.exit_code == 0, res.output
    path = tmp_path / "etc" / "ferry.toml"
    config = RelayConfig.load(path, env={})
    assert config.server.hostname == "mx.example.net"
    assert config.queue.path == str(tmp_path / "etc" / "ferry-data")
    assert [(x.port, x.mode) for x in config.server.listen] == [(2525, "mta"), (587, "submission")]
    for step in ("user add", "dkim keygen", "dns check", "v=spf1", "_dmarc", "serve"):
        assert step in res.output, step
    assert "warning" not in res.output
    again = runner.invoke(main, ["init", str(tmp_path / "etc")])
    assert again.exit_code == 1 and "exists" in again.output
    res = runner.invoke(main, ["init", str(tmp_path / "b"), "--hostname", "localhost"])
    assert res.exit_code == 0 and "not a fully qualified domain name" in res.output


def _commands(group: click.Group, ctx: click.Context) -> list[click.Command]:
    out: list[click.Command] = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None:
            continue
        out.append(cmd)
        if isinstance(cmd, click.Group):
            out += _commands(cmd, click.Context(cmd, parent=ctx, info_name=name))
    return out


def test_help_texts_speak_to_operators() -> None:
    ctx = click.Context(main, info_name="ferry")
    texts = [main.help or ""]
    for cmd in _commands(main, ctx):
        texts.append(cmd.help or "")
        texts += [getattr(p, "help", None) or "" for p in cmd.params]
    assert len(texts) > 50
    for word in ("Zetian", "SMTPy", "seed's"):
        assert not [t for t in texts if word in t], word


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_script(shell: str) -> None:
    res = subprocess.run(
        [str(Path(sys.executable).with_name("ferry"))],
        env={"_FERRY_COMPLETE": f"{shell}_source", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "_FERRY_COMPLETE" in res.stdout
