"""Configuration: embedded defaults, file and environment overrides, bad settings refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_config, to_toml
from tests.peers import REPO


def test_embedded_defaults_start_a_closed_local_node() -> None:
    config = load_config(environ={})
    assert (config.ae_title, config.port, config.quiet_seconds) == ("MUSCLENODE", 11112, 30.0)
    assert config.open is False
    assert config.peer_for("ANYONE", "127.0.0.1") is not None
    assert config.peer_for("ANYONE", "10.1.2.3") is None
    assert config.rules.modalities == ("MR",)


def test_file_then_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nae_title = "FROMFILE"\nport = 4000\ndata = "/srv/musclenode"\n'
        "[assembly]\nquiet_seconds = 12\n"
        '[[peers]]\nae_title = "ORTHANC"\nhost = "10.0.0.5"\nport = 4242\nquiet_seconds = 5\n'
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "10.0.0.5"\nport = 4242\n'
    )
    config = load_config(path, environ={"MUSCLENODE_PORT": "4100", "MUSCLENODE_DATA": "/data"})
    assert config.ae_title == "FROMFILE"
    assert config.port == 4100 and config.sources["node.port"] == "environment variable MUSCLENODE_PORT"
    assert config.data == Path("/data")
    assert config.quiet_seconds == 12
    assert config.quiet_seconds_for("ORTHANC", "10.0.0.5") == 5
    assert config.quiet_seconds_for("OTHER", "10.0.0.5") == 12
    assert config.peer_for("ANYONE", "127.0.0.1") is None  # a file's peers replace the default
    assert config.destinations[0].port == 4242


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "VIAENV"\n')
    assert load_config(environ={"MUSCLENODE_CONFIG": str(path)}).ae_title == "VIAENV"


@pytest.mark.parametrize(
    "text, environ, named",
    [
        ("", {"MUSCLENODE_PORT": "eleven"}, "node.port: must be an integer, got 'eleven' (from environment variable MUSCLENODE_PORT)"),
        ("[node]\nport = 70000\n", {}, "node.port: must be a TCP port"),
        ('[node]\nae_title = "A_TITLE_FAR_TOO_LONG"\n', {}, "node.ae_title: must be 1 to 16 characters"),
        ("[node]\nprot = 1\n", {}, "node.prot: unknown setting"),
        ("[assembly]\nquiet_seconds = -1\n", {}, "assembly.quiet_seconds: must be between 0 and 86400"),
        ('[rules]\nlumbar_patterns = ["(unclosed"]\n', {}, "rules.lumbar_patterns: '(unclosed' is not a valid regular expression"),
        ("[[peers]]\nhost = \"1.2.3.4\"\n", {}, "peers[1].ae_title: missing"),
        ('[[destinations]]\nname = "a"\nae_title = "X"\nhost = "h"\nport = 0\n', {}, "destinations[1].port: must be a TCP port"),
        ("[node\n", {}, "not valid TOML"),
        ("", {"MUSCLENODE_OPEN": "perhaps"}, "node.open: must be true or false"),
        ("", {"MUSCLENODE_HOST": "my host"}, "node.host: must be an IP address"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path: Path, text: str, environ: dict, named: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ=environ)
    assert named in str(error.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothere.toml"):
        load_config(tmp_path / "nothere.toml", environ={})


def test_serve_refuses_a_bad_setting_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MUSCLENODE_PORT": "0", "MUSCLENODE_DATA": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "configuration error: node.port" in result.stderr
    assert "MUSCLENODE_PORT" in result.stderr


def test_serve_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "node", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "MUSCLENODE_PORT": str(port), "MUSCLENODE_HOST": "127.0.0.1",
                 "MUSCLENODE_DATA": str(tmp_path)},
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_config_show_round_trips(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "config", "show"], cwd=REPO, capture_output=True, text=True,
        timeout=60, env={"PATH": "/usr/bin:/bin", "MUSCLENODE_AE_TITLE": "SHOWN"},
    )
    assert result.returncode == 0, result.stderr
    assert 'ae_title = "SHOWN"  # environment variable MUSCLENODE_AE_TITLE' in result.stdout
    # What config show prints is itself a valid configuration file with the same values.
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    assert load_config(shown, environ={}) == load_config(environ={"MUSCLENODE_AE_TITLE": "SHOWN"})
    assert to_toml(load_config(shown, environ={})).count("[[peers]]") == 1


def test_example_configuration_is_valid() -> None:
    config = load_config(REPO / "deploy" / "musclenode.example.toml", environ={})
    assert config.peers[0].ae_title == "ORTHANC" and config.destinations[0].name == "pacs"
