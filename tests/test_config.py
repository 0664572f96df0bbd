"""Configuration: TOML, FERRY_* overrides, the seed's SMTP_* variables, errors, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.config import ConfigError, RelayConfig
from tests.harness import run_cli

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
