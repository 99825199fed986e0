"""util.py: configuration from plain dicts, parsers, formatting."""

from __future__ import annotations

import ipaddress

import pytest

from tnet import util
from tnet.util import ConfigError, load_config


def test_defaults_are_the_seeds():
    config = load_config({"HOST_NAME": "h", "TEMP_DIR": "/t"})
    assert config.event_socket == "./run/tnet/events"
    assert config.command_socket == "./run/tnet/commands"
    assert config.broadcast_port == 0xC0DE == 49374
    assert config.receive_port == 0xC00D == 49165
    assert config.save_dir == "Downloads"
    assert config.report_progress_in is False and config.report_progress_out is False
    assert config.bind_address == "0.0.0.0"
    assert config.broadcast_addresses == ()
    assert config.accept == "auto" and config.allow_from == ()


def test_every_variable_is_read():
    config = load_config({
        "EVENT_SOCKET": "/e", "COMMAND_SOCKET": "/c", "BROADCAST_PORT": "0x10", "RECEIVE_PORT": "1000",
        "FILE_SAVE_DIR": "/d", "REPORT_PROGRESS_IN": "1", "REPORT_PROGRESS_OUT": "1",
        "BIND_ADDRESS": "127.0.0.2", "BROADCAST_ADDRESS": "127.255.255.255, 10.0.0.255", "TEMP_DIR": "/t",
        "HOST_NAME": "box", "IDLE_TIMEOUT": "5", "HANDSHAKE_TIMEOUT": "2.5", "MAX_CONNECTIONS": "10",
        "ACCEPT": "ask", "ASK_TIMEOUT": "9", "ALLOW_FROM": "10.0.0.0/8,192.168.1.7", "LOG_LEVEL": "debug",
    })
    assert (config.event_socket, config.command_socket) == ("/e", "/c")
    assert (config.broadcast_port, config.receive_port) == (16, 1000)
    assert config.broadcast_addresses == ("127.255.255.255", "10.0.0.255")
    assert config.report_progress_in and config.report_progress_out
    assert (config.idle_timeout, config.handshake_timeout, config.ask_timeout) == (5.0, 2.5, 9.0)
    assert config.max_connections == 10 and config.accept == "ask" and config.log_level == "debug"
    assert config.allows("10.1.2.3") and config.allows("192.168.1.7") and not config.allows("192.168.1.8")


def test_historical_command_socket_spelling():
    assert load_config({"COMMAND_SOKET": "/old"}).command_socket == "/old"
    assert load_config({"COMMAND_SOKET": "/old", "COMMAND_SOCKET": "/new"}).command_socket == "/new"


@pytest.mark.parametrize("var,value", [
    ("RECEIVE_PORT", "0"), ("RECEIVE_PORT", "65536"), ("RECEIVE_PORT", "http"), ("BROADCAST_PORT", "-1"),
    ("BIND_ADDRESS", "300.1.1.1"), ("BIND_ADDRESS", "::1"), ("BROADCAST_ADDRESS", "a,b"),
    ("BROADCAST_ADDRESS", ","), ("REPORT_PROGRESS_IN", "maybe"), ("IDLE_TIMEOUT", "0"),
    ("IDLE_TIMEOUT", "soon"), ("ACCEPT", "always"), ("ALLOW_FROM", "10.0.0.0/33"), ("MAX_CONNECTIONS", "0"),
    ("HOST_NAME", "a\x1bb"), ("HOST_NAME", "h" * 65), ("LOG_LEVEL", "loud"),
])
def test_bad_values_name_the_variable(var, value):
    with pytest.raises(ConfigError) as info:
        load_config({var: value})
    assert var in str(info.value)


def test_port_limits_at_n_and_n_plus_one():
    assert util.parse_port("P", "65535") == 65535 and util.parse_port("P", "1") == 1
    for bad in ("65536", "0"):
        with pytest.raises(ConfigError):
            util.parse_port("P", bad)


def test_broadcast_targets_prefer_the_configured_list():
    config = load_config({"BROADCAST_ADDRESS": "127.255.255.255"})
    assert util.broadcast_targets(config) == ("127.255.255.255",)


def test_interface_broadcasts_are_broadcast_addresses():
    for address in util.interface_broadcasts():  # whatever this machine has; may be none
        assert ipaddress.IPv4Address(address) != ipaddress.IPv4Address("0.0.0.0")
        assert not ipaddress.IPv4Address(address).is_loopback


def test_broadcast_falls_back_to_the_limited_broadcast(monkeypatch):
    monkeypatch.setattr(util, "interface_broadcasts", lambda: [])
    assert util.broadcast_targets(load_config({})) == ("255.255.255.255",)


def test_human_formatting():
    assert util.human_size(0) == "0 B"
    assert util.human_size(1536) == "1.5 KiB"
    assert util.human_size(5 * 1024**3) == "5.0 GiB"
    assert util.human_rate(2 * 1024**2, 2) == "1.0 MiB/s"
    assert util.human_duration(59) == "59s" and util.human_duration(61) == "1m01s"
    assert util.human_duration(3 * 3600 + 120) == "3h02m"


def test_printable_escapes_terminal_control():
    assert util.printable("a\x1b[31mb\nc\x07") == "a\\x1b[31mb\\nc\\x07"
    assert util.printable("naïve ✓") == "naïve ✓"
    assert util.printable("\u202e") == "\\u202e"


def test_peers_are_addresses_with_an_optional_port_defaulting_to_our_broadcast_port():
    config = load_config({"PEERS": " 10.0.2.7, 10.0.3.9:4000 ,,10.0.2.7", "BROADCAST_PORT": "5000"})
    assert config.peers == (("10.0.2.7", 5000), ("10.0.3.9", 4000))  # the duplicate merged
    assert load_config({"PEERS": "10.0.2.7"}).peers == (("10.0.2.7", 0xC0DE),)
    assert load_config({}).peers == () and load_config({"PEERS": " "}).peers == ()
    assert config.lists("10.0.3.9") and not config.lists("10.0.3.10")


@pytest.mark.parametrize("value,says", [
    ("nas.local", "host names are not looked up"), ("nas.local:49374", "host names are not looked up"),
    ("localhost", "'localhost' is not an IPv4 address"), ("10.0.0.1:0", "1 to 65535"),
    ("10.0.0.1:65536", "1 to 65535"), ("10.0.0.1:port", "not a number"), ("::1", "not an IPv4 address"),
    ("224.0.0.1", "not one host's address"), ("0.0.0.0", "not one host's address"),
    ("255.255.255.255", "not one host's address"), ("10.0.0.300", "not an IPv4 address"),
])
def test_bad_peers_are_refused_with_a_clear_message(value, says):
    with pytest.raises(ConfigError) as info:
        load_config({"PEERS": value})
    assert str(info.value).startswith("PEERS=") and says in str(info.value)


def test_peers_limit_at_n_and_n_plus_one():
    many = [f"10.{i // 250}.{i % 250}.1" for i in range(util.MAX_STATIC_PEERS + 1)]
    assert len(load_config({"PEERS": ",".join(many[:-1])}).peers) == util.MAX_STATIC_PEERS
    with pytest.raises(ConfigError):
        load_config({"PEERS": ",".join(many)})


def test_allow_from_lists_a_requester_only_when_set():
    assert not load_config({}).lists("10.9.9.9")  # ALLOW_FROM unset takes everyone's files, lists no one
    assert load_config({"ALLOW_FROM": "10.9.0.0/16"}).lists("10.9.9.9")


def test_state_dir_follows_state_dir_then_xdg_state_home_then_home():
    assert load_config({"STATE_DIR": "/s", "XDG_STATE_HOME": "/x"}).state_dir == "/s"
    assert load_config({"XDG_STATE_HOME": "/x", "HOME": "/h"}).state_dir == "/x/tnet"
    assert load_config({"XDG_STATE_HOME": "rel", "HOME": "/h"}).state_dir == "/h/.local/state/tnet"
    assert load_config({"HOME": "/h"}).state_dir == "/h/.local/state/tnet"


def test_history_max_defaults_to_ten_thousand_and_is_bounded():
    assert load_config({}).history_max == 10_000
    assert load_config({"HISTORY_MAX": "1"}).history_max == 1
    assert load_config({"HISTORY_MAX": str(util.MAX_HISTORY_MAX)}).history_max == util.MAX_HISTORY_MAX
    for bad in ("0", str(util.MAX_HISTORY_MAX + 1), "lots"):
        with pytest.raises(ConfigError) as info:
            load_config({"HISTORY_MAX": bad})
        assert "HISTORY_MAX" in str(info.value)
def test_localsend_is_off_by_default_and_its_variables_are_read():
    config = load_config({"HOST_NAME": "box", "TEMP_DIR": "/t", "HOME": "/h"})
    assert config.localsend is False and config.localsend_port == 53317 and config.localsend_https is True
    assert config.alias == "box" and config.localsend_pin is None
    assert config.state_dir == "/h/.local/state/tnet"
    config = load_config({"HOST_NAME": "box", "LOCALSEND": "1", "LOCALSEND_PORT": "4000", "LOCALSEND_ALIAS": "Büro",
                          "LOCALSEND_HTTPS": "0", "LOCALSEND_PIN": "1234", "STATE_DIR": "/s"})
    assert (config.localsend, config.localsend_port, config.alias) == (True, 4000, "Büro")
    assert (config.localsend_https, config.localsend_pin, config.state_dir) == (False, "1234", "/s")


@pytest.mark.parametrize("var, value", [
    ("LOCALSEND", "maybe"), ("LOCALSEND_PORT", "0"), ("LOCALSEND_PORT", "65536"),
    ("LOCALSEND_ALIAS", "a\u202eb"), ("LOCALSEND_ALIAS", "x" * 129), ("LOCALSEND_PIN", "1\n2"),
    ("LOCALSEND_PIN", "9" * 65), ("LOCALSEND_HTTPS", "2"),
])
def test_bad_localsend_values_name_their_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        load_config({var: value})


def test_limits_of_alias_and_pin_at_n():
    config = load_config({"LOCALSEND_ALIAS": "x" * 128, "LOCALSEND_PIN": "9" * 64})
    assert len(config.alias) == 128 and len(config.localsend_pin or "") == 64


def test_the_state_dir_helper_follows_the_same_rule():
    assert util.state_dir_path({"STATE_DIR": "/s", "XDG_STATE_HOME": "/x"}) == "/s"
    assert util.state_dir_path({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == "/x/tnet"
    assert util.state_dir_path({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == "/h/.local/state/tnet"


def test_every_localsend_variable_is_in_both_tables():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for var in ("STATE_DIR", "LOCALSEND", "LOCALSEND_PORT", "LOCALSEND_ALIAS", "LOCALSEND_HTTPS", "LOCALSEND_PIN"):
        assert f"| `{var}` |" in readme, var
        assert f"\n{var} " in util.__doc__, var
