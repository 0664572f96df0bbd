"""Configuration: TOML, FERRY_* overrides, the seed's SMTP_* variables, errors, masking."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.config import ConfigError, RelayConfig
from ferry.queue.sqlite import SqliteQueue
from tests.harness import free_port, run_cli, wait_until

TOML = """
[server]
hostname = "mail.example.com"
listen = [{ address = "127.0.0.1", port = 2525, mode = "mta" },
          { address = "::1", port = 2587, mode = "submission" }]
local_domains = ["Example.COM."]
relay_networks = ["10.0.0.0/8"]
max_message_size = 1_000_000

[aliases]
"info@example.com" = ["a@gmail.com", "b@outlook.com"]

[delivery]
mode = "hybrid"
mx_port = 2526

[dns]
nameservers = ["127.0.0.1:5353"]

[[smart_hosts]]
name = "sendgrid"
host = "smtp.sendgrid.net"
username = "apikey"
password = "SG.verysecret"
"""


def test_defaults_match_the_documented_names() -> None:
    c = RelayConfig.load(None, env={})
    assert [(x.address, x.port, x.mode) for x in c.server.listen] == [("127.0.0.1", 2525, "mta")]
    assert c.server.relay_networks == ["127.0.0.0/8", "::1/128"]
    assert c.server.max_message_size == 35_000_000
    assert c.queue.path == str(Path.cwd() / "ferry-data")  # no file, no $FERRY_DATA
    assert c.server.users_file == str(Path.cwd() / "ferry-data" / "users")
    assert (c.delivery.mode, c.delivery.mx_port) == ("direct", 25)
    assert c.dns.nameservers == []


def test_toml_file(tmp_path: Path) -> None:
    p = tmp_path / "ferry.toml"
    p.write_text(TOML)
    c = RelayConfig.load(p, env={})
    assert c.server.hostname == "mail.example.com"
    assert c.server.local_domains == ["example.com"]
    assert c.server.listen[1].mode == "submission"
    assert c.aliases["info@example.com"] == ["a@gmail.com", "b@outlook.com"]
    assert c.delivery.mode == "hybrid"
    assert c.smart_hosts[0].password is not None
    assert c.smart_hosts[0].password.get_secret_value() == "SG.verysecret"


def test_ferry_env_overrides_file(tmp_path: Path) -> None:
    p = tmp_path / "ferry.toml"
    p.write_text(TOML)
    c = RelayConfig.load(
        p,
        env={
            "FERRY_DELIVERY__MODE": "relay",
            "FERRY_SERVER__MAX_MESSAGE_SIZE": "2048",
            "FERRY_SERVER__RELAY_DOMAINS": '["partner.com"]',
            "FERRY_DNS__NAMESERVERS": '["127.0.0.2"]',
        },
    )
    assert c.delivery.mode == "relay"
    assert c.server.max_message_size == 2048
    assert c.server.relay_domains == ["partner.com"]
    assert c.dns.nameservers == ["127.0.0.2"]


def test_top_level_tables_from_env() -> None:
    c = RelayConfig.load(
        None,
        env={
            "FERRY_SMART_HOSTS": '[{"name": "sg", "host": "smtp.sendgrid.net", "port": 587}]',
            "FERRY_ROUTES": '{"gmail.com": "sg"}',
            "FERRY_ALIASES": '{"info@example.com": ["a@gmail.com"]}',
            "FERRY_SERVER__LOCAL_DOMAINS": '["example.com"]',
        },
    )
    assert [h.name for h in c.smart_hosts] == ["sg"]
    assert c.routes == {"gmail.com": "sg"}
    assert c.aliases["info@example.com"] == ["a@gmail.com"]


def test_config_path_from_env(tmp_path: Path) -> None:
    p = tmp_path / "ferry.toml"
    p.write_text(TOML)
    assert (
        RelayConfig.load(None, env={"FERRY_CONFIG": str(p)}).server.hostname == "mail.example.com"
    )


def test_seed_variables() -> None:
    c = RelayConfig.load(
        None,
        env={
            "SMTP_HOSTNAME": "mail.smtpy.fr",
            "SMTP_DELIVERY_MODE": "Hybrid",
            "SMTP_ENABLE_DKIM": "false",
            "SMTP_HOST": "smtp.gmail.com",
            "SMTP_PORT": "587",
            "SMTP_USER": "me@gmail.com",
            "SMTP_PASSWORD": "app-password",
            "SMTP_USE_TLS": "true",
            "SMTP_USE_SSL": "false",
        },
    )
    assert c.server.hostname == "mail.smtpy.fr"
    assert c.delivery.mode == "hybrid"
    assert c.dkim.enabled is False
    [h] = c.smart_hosts
    assert (h.name, h.host, h.port, h.username, h.tls) == (
        "default",
        "smtp.gmail.com",
        587,
        "me@gmail.com",
        "starttls",
    )
    ssl_host = RelayConfig.load(None, env={"SMTP_HOST": "smtp.x", "SMTP_USE_SSL": "true"})
    assert (ssl_host.smart_hosts[0].port, ssl_host.smart_hosts[0].tls) == (465, "implicit")


def test_ferry_env_wins_over_seed_env() -> None:
    c = RelayConfig.load(None, env={"SMTP_DELIVERY_MODE": "relay", "FERRY_DELIVERY__MODE": "smart"})
    assert c.delivery.mode == "smart"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[server]\nlisten = [{ address = "127.0.0.1", port = 99999 }]',
            "server.listen.0.port",
            "less than or equal to 65535",
        ),
        (
            '[delivery]\nmode = "teleport"',
            "delivery.mode",
            "'direct', 'relay', 'hybrid' or 'smart'",
        ),
        ('[server]\nrelay_networks = ["10.0.0.0/33"]', "server.relay_networks", "not a network"),
        ('[server]\nhostnme = "x"', "server.hostnme", "unknown key"),
        (
            '[server]\nlisten = [{ address = "localhost" }]',
            "server.listen.0.address",
            "does not appear",
        ),
    ],
)
def test_invalid_config_names_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        RelayConfig.load(p, env={})
    assert key in str(err.value)
    assert problem in str(err.value)


def test_config_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "ferry.toml"
    good.write_text(TOML)
    res = run_cli(good, "config", "check")
    assert res.returncode == 0, res.stderr
    assert "mail.example.com" in res.stdout
    assert "SG.verysecret" not in res.stdout + res.stderr
    assert "********" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\nmode = "teleport"\n')
    res = run_cli(good, "config", "check", str(bad))
    assert res.returncode == 1
    assert "delivery.mode" in res.stderr
    assert "Traceback" not in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    res = run_cli(good, "config", "check", str(broken))
    assert res.returncode == 1
    assert "not valid TOML" in res.stderr


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "ferry.example.toml"
    c = RelayConfig.load(example, env={})
    assert c.server.listen[0].port == 2525


# --- issue 9: the configuration is the only validator ---------------------------------


def test_durations_are_seconds_and_shown_as_text(tmp_path: Path) -> None:
    p = tmp_path / "ferry.toml"
    p.write_text('[delivery]\nmessage_lifetime = "2d"\nretry_schedule = ["90s", 300, "1h30m"]\n')
    c = RelayConfig.load(p, env={})
    assert c.delivery.message_lifetime == 2 * 86400
    assert c.delivery.retry_schedule == [90, 300, 5400]
    shown = c.masked()["delivery"]
    assert (shown["message_lifetime"], shown["retry_schedule"]) == ("2d", ["1m30s", "5m", "1h30m"])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[delivery]\nmessage_lifetime = "0s"', "delivery.message_lifetime: must be more than 0"),
        ("[delivery]\nretry_schedule = []", "delivery.retry_schedule: List should have at least"),
        ('[server]\nlisten = [{port = 2600}, {port = 2600, address = "127.0.0.1"}]', "twice"),
        ('[delivery]\nsource_address = "not-an-ip"', "delivery.source_address"),
        ('[delivery]\nblock_patterns = ["(unclosed"]', "not a regular expression"),
        ('[dns]\nnameservers = ["127.0.0.1:99999"]', "dns.nameservers: bad port"),
    ],
)
def test_values_serve_would_choke_on_are_refused_at_load(
    tmp_path: Path, text: str, problem: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        RelayConfig.load(p, env={})


def test_tls_pair_is_loaded_by_the_servers_own_loader(tmp_path: Path, tls_files) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.toml"
    good.write_text(
        f'[server]\ntls_cert = "{tls_files.cert_file}"\ntls_key = "{tls_files.key_file}"\n'
    )
    assert RelayConfig.load(good, env={}).server.tls_cert == str(tls_files.cert_file)
    half = tmp_path / "half.toml"
    half.write_text(f'[server]\ntls_cert = "{tls_files.cert_file}"\n')
    with pytest.raises(ConfigError) as err:
        RelayConfig.load(half, env={})
    assert "\n  server.tls_key: needed" in str(err.value)  # the key first, as for any key
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    swapped = tmp_path / "swapped.toml"
    swapped.write_text(f'[server]\ntls_cert = "{garbage}"\ntls_key = "{tls_files.key_file}"\n')
    with pytest.raises(ConfigError, match=r"server\.tls_cert: cannot load"):
        RelayConfig.load(swapped, env={})


def test_dkim_key_files_are_parsed_at_load(tmp_path: Path) -> None:
    p = tmp_path / "ferry.toml"
    (tmp_path / "k.pem").write_text("not a key\n")
    p.write_text('[dkim]\nkeys = { "example.com" = ["k.pem"] }\n')
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        RelayConfig.load(p, env={})


def test_unknown_ferry_variables_are_errors() -> None:
    with pytest.raises(ConfigError) as err:
        RelayConfig.load(None, env={"FERRY_DELIVERY_HOLD": "true"})
    assert "FERRY_DELIVERY_HOLD: not a setting" in str(err.value)
    assert "did you mean FERRY_DELIVERY__HOLD?" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"delivery\.hld: unknown key \(from FERRY_DELIVERY__HLD\)"
    ):
        RelayConfig.load(None, env={"FERRY_DELIVERY__HLD": "true"})
    with pytest.raises(ConfigError, match="FERRY_NONSENSE: not a setting"):
        RelayConfig.load(None, env={"FERRY_NONSENSE": "1"})
    # The documented variables that are not settings, and everything not FERRY_*.
    fine = {
        "FERRY_CONFIG": "",
        "FERRY_DATA": "/tmp/ferry-test-data",
        "FERRY_EVENT_LOOP": "asyncio",
        "FERRY_VENV": ".venv",
        "FERRY_BENCH_PYFLAGS": "-X importtime",
        "FERRYMAN": "charon",
        "FERRY_DELIVERY__HOLD": "true",
    }
    c = RelayConfig.load(None, env=fine)
    assert c.delivery.hold is True
    assert c.queue.path == "/tmp/ferry-test-data"


def test_a_smart_host_cannot_be_named_like_the_direct_keyword() -> None:
    # Route keywords are case-insensitive, so a host named "Direct" could never be routed to.
    with pytest.raises(ConfigError, match=r"smart_hosts\.0\.name: .* is not 'direct'"):
        RelayConfig.load(None, env={"FERRY_SMART_HOSTS": '[{"name": "Direct", "host": "x.test"}]'})


def test_bad_seed_port_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SMTP_PORT: not a port number"):
        RelayConfig.load(None, env={"SMTP_HOST": "smtp.example.net", "SMTP_PORT": "submission"})


# Each: (file text, extra environment, what the message must say; " ... " separates
# parts that must all appear, around an absolute path). Every one of these
# used to pass `ferry config check`, or to be silently ignored.
INVALID: list[tuple[str, dict[str, str], str]] = [
    ('[delivery]\nmessage_lifetime = "forever"\n', {}, "delivery.message_lifetime: not a duration"),
    (
        '[delivery]\nretry_schedule = ["1 minute"]\n',
        {},
        "delivery.retry_schedule.0: not a duration",
    ),
    (
        '[routes]\n"example.com" = "mx:bad host"\n',
        {},
        "routes.example.com: route target 'mx:bad host'",
    ),
    (
        '[server]\ntls_cert = "missing.pem"\ntls_key = "missing.key"\n',
        {},
        "server.tls_cert: ... missing.pem: no such file",
    ),
    (
        '[[smart_hosts]]\nname = "sg"\nhost = "smtp.example.net"\npassword_file = "nope"\n',
        {},
        "smart_hosts.0.password_file: ... nope: no such file",
    ),
    (
        '[dkim]\nkeys = { "example.com" = ["gone.pem"] }\n',
        {},
        "dkim.keys.example.com.0: ... gone.pem: no such file",
    ),
    ('[server]\nhostnme = "x"\n', {}, "server.hostnme: unknown key"),
    ('[aliases]\n"not an address" = "x@y.z"\n', {}, "aliases: alias 'not an address'"),
    ('[delivery]\nbounce_sender = "postmaster"\n', {}, "delivery.bounce_sender: not an address"),
    ('[server]\nhostname = ""\n', {}, "server.hostname: '' is not a host name"),
    ('[dkim]\nselector = "my selector"\n', {}, "dkim.selector: 'my selector' is not a selector"),
    ("", {"FERRY_DELIVERY_HOLD": "true"}, "FERRY_DELIVERY_HOLD: not a setting"),
    ("", {"FERRY_DELIVERY__HLD": "true"}, "delivery.hld: unknown key (from FERRY_DELIVERY__HLD)"),
]


@pytest.mark.parametrize(
    ("text", "env", "problem"), INVALID, ids=[p.split(":")[0] for _t, _e, p in INVALID]
)
def test_config_check_and_serve_refuse_alike(
    tmp_path: Path, text: str, env: dict[str, str], problem: str
) -> None:
    cfg = tmp_path / "ferry.toml"
    # Were it accepted, serve would start (any free port, nothing delivered) and the
    # timeout would fail the test.
    cfg.write_text(text)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    environ |= {"FERRY_DELIVERY__HOLD": "true", "FERRY_SERVER__LISTEN": '[{"port": 0}]', **env}
    check = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "config", "check", str(cfg)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
        env=environ,
    )
    assert check.returncode == 1, check.stdout
    # "key: ... words": the key, then (after the absolute path) the words
    assert all(part in check.stderr for part in problem.split(" ... ")), check.stderr
    assert "Traceback" not in check.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
        env=environ,
    )
    assert serve.returncode == 1
    assert serve.stderr == check.stderr  # the same words
    assert not (tmp_path / "ferry-data").exists()  # refused before touching anything


# --- issue 11.3: one place for the data, found from anywhere --------------------------


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``ferry ARGS`` run from ``cwd`` with only the given FERRY_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")} | env
    return subprocess.run(
        [sys.executable, "-m", "ferry.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=environ,
    )


def test_relative_paths_in_a_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "relay.key").write_text("secret\n")
    p = etc / "ferry.toml"
    p.write_text(
        '[queue]\npath = "../var/ferry"\n'
        '[[smart_hosts]]\nname = "sg"\nhost = "smtp.example.net"\npassword_file = "relay.key"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = RelayConfig.load(Path("..") / "etc" / "ferry.toml", env={})
    assert c.queue.path == str(tmp_path / "var" / "ferry")
    assert c.smart_hosts[0].password_file == str(etc / "relay.key")
    # Files kept in the data directory follow it.
    assert c.server.users_file == str(tmp_path / "var" / "ferry" / "users")
    assert c.dkim.keys_dir == str(tmp_path / "var" / "ferry" / "dkim")
    # A path from the environment is relative to where ferry runs.
    c = RelayConfig.load(p, env={"FERRY_QUEUE__PATH": "spool"})
    assert c.queue.path == str(elsewhere / "spool")


def test_default_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "conf" / "ferry.toml"
    p.parent.mkdir()
    p.write_text('[server]\nhostname = "mx.example.com"\n')
    # With a config file: beside it. Without: ./ferry-data. $FERRY_DATA beats both.
    assert RelayConfig.load(p, env={}).queue.path == str(p.parent / "ferry-data")
    assert RelayConfig.load(None, env={}).queue.path == str(tmp_path / "ferry-data")
    env = {"FERRY_DATA": "spool"}
    assert RelayConfig.load(p, env=env).queue.path == str(tmp_path / "spool")
    assert RelayConfig.load(None, env=env).queue.path == str(tmp_path / "spool")
    # A path written in the file wins over $FERRY_DATA (it is only a default).
    p.write_text('[queue]\npath = "/srv/ferry"\n')
    assert RelayConfig.load(p, env=env).queue.path == "/srv/ferry"


def test_the_cli_says_which_queue_it_reads(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = conf / "ferry.toml"
    cfg.write_text('[queue]\npath = "data"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Nothing there yet: reading must say so, and must not create a queue anywhere.
    res = _cli(elsewhere, "--config", str(cfg), "queue", "stats")
    assert res.returncode == 1
    assert f"no queue exists at {conf / 'data' / 'queue.db'}" in res.stderr
    assert not (conf / "data").exists() and not (elsewhere / "ferry-data").exists()
    asyncio.run(SqliteQueue(conf / "data").close())  # what `ferry serve` makes at start
    res = _cli(elsewhere, "--config", str(cfg), "queue", "list", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert (listed["queue"], listed["messages"]) == (str(conf / "data"), [])
    res = _cli(elsewhere, "--config", str(cfg), "queue", "stats", "--json")
    assert json.loads(res.stdout)["queue"] == str(conf / "data")
    res = _cli(elsewhere, "queue", "list", FERRY_CONFIG=str(cfg))
    assert res.stdout.splitlines()[0].startswith(f"queue {conf / 'data' / 'queue.db'}: ")
    res = _cli(elsewhere, "stats", "--json", FERRY_DATA=str(conf / "data"))
    assert json.loads(res.stdout)["queue"] == str(conf / "data")


def test_config_option_before_or_after_serve(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "ferry.toml"
    cfg.write_text(
        f'[server]\nhostname = "mx.ferry.test"\nlisten = [{{ port = {port} }}]\n'
        "[delivery]\nhold = true\nworkers = 0\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    for args in (["serve", "--config", str(cfg)], ["--config", str(cfg), "serve"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=elsewhere,
            env=environ,
        )
        try:

            def listening(proc: subprocess.Popen[bytes] = proc) -> bool:
                assert proc.poll() is None, proc.communicate()[0].decode()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        return True
                except OSError:
                    return False

            wait_until(listening, 20, f"ferry {' '.join(args)} to listen")
        finally:
            proc.terminate()
            proc.communicate(timeout=20)
        # The data went beside the config file, not into the current directory.
        assert (tmp_path / "ferry-data" / "queue.db").exists()
        assert not (elsewhere / "ferry-data").exists()
