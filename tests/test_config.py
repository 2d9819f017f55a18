"""Configuration: embedded defaults, file and environment overrides, bad settings refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference.vocabulary import FatMethod
from node.config import ENVIRONMENT, Config, ConfigError, load_config, settings_table, to_toml
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
        # Every message names the setting, says what is wrong, shows the value and its source.
        ("", {"MUSCLENODE_PORT": "abc"}, "node.port: must be an integer, got 'abc' (from environment variable MUSCLENODE_PORT)"),
        ("[node]\nport = true\n", {}, "node.port: must be an integer, got True (from "),
        ("[node]\nport = 11.5\n", {}, "node.port: must be an integer, got 11.5 (from "),
        ("[node]\nport = 70000\n", {}, "node.port: must be a TCP port between 1 and 65535, got 70000 (from "),
        ("[nodes]\nport = 1\n", {}, "nodes: unknown setting (from "),
        ("node = 1\n", {}, "node: must be a table, got 1 (from "),
        ('[[peers]]\nae_title = "X"\ncolour = "red"\n', {}, "peers[1].colour: unknown setting (from "),
        ('[[peers]]\nae_title = "X"\n[[peers]]\nae_title = "Y"\nport = "x"\n', {}, "peers[2].port: must be an integer, got 'x' (from "),
        ("peers = 5\n", {}, "peers: must be a list, got 5 (from "),
        ("[rules]\nmodalities = [1]\n", {}, "rules.modalities[1]: must be a string, got 1 (from "),
        ("[rules]\nmax_oblique_degrees = 90\n", {}, "rules.max_oblique_degrees: must be an angle strictly between 0 and 90 degrees"),
        ("", {"MUSCLENODE_DEVICE": "gpu"}, "jobs.device: must be auto, cpu or cuda, got 'gpu' (from environment variable MUSCLENODE_DEVICE)"),
        ("", {"MUSCLENODE_WORKERS": "65"}, "jobs.workers: must be between 0 and 64, got '65' (from environment variable MUSCLENODE_WORKERS)"),
        ("", {"MUSCLENODE_LOG_LEVEL": "loud"}, "node.log_level: must be DEBUG, INFO, WARNING or ERROR, got 'loud'"),
        ("", {"MUSCLENODE_MIN_FREE_MB": "-1"}, "node.min_free_mb: must not be negative, got '-1'"),
        ("", {"MUSCLENODE_QUIET_SECONDS": "nan"}, "assembly.quiet_seconds: must be between 0 and 86400 seconds, got 'nan'"),
        ("", {"MUSCLENODE_HTTP_PORT": "70000"}, "http.port: must be 0 (off) or a TCP port between 1 and 65535"),
        ("", {"MUSCLENODE_MODEL": "no spaces please"}, "model.name: must be a model name"),
        ('[metrics]\nassume_levels = "lumbar"\n', {}, "metrics.assume_levels: must be a level range such as L1-L5"),
        ('[metrics]\nassume_levels = "L5-L1"\n', {}, "metrics.assume_levels: must be a level range such as L1-L5"),
        ('[metrics]\nassume_levels = "L9"\n', {}, "metrics.assume_levels: must be a level range such as L1-L5"),
        ('[reference]\nsite = 3\n', {}, "reference.site: must be a path, got 3 (from "),
        ('[[destinations]]\nname = "a"\nae_title = "X"\nhost = "h"\nport = 1\n' * 2, {}, "destinations: the name 'a' is used twice (from "),
        ("[tls]\nplain = false\n", {}, "tls.plain: false leaves no DICOM port while tls.enabled is false (from "),
        ("", {"MUSCLENODE_TLS": "yes"}, "tls.certificate: required when tls.enabled is true (from default)"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path: Path, text: str, environ: dict, named: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ=environ)
    assert named in str(error.value).replace(str(path), "FILE")
    if "(from " in named and named.endswith("(from "):
        assert f"(from {path})" in str(error.value)


def test_every_problem_is_named_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = "x"\n[jobs]\nworkers = -1\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={"MUSCLENODE_OPEN": "perhaps"})
    assert str(error.value).splitlines() == [
        f"node.port: must be an integer, got 'x' (from {path})",
        "node.open: must be true or false, got 'perhaps' (from environment variable MUSCLENODE_OPEN)",
        f"jobs.workers: must be between 0 and 64, got -1 (from {path})",
    ]


def test_environment_beats_file_beats_default(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = 4000\nae_title = "FILE"\n[jobs]\nworkers = 3\n')
    config = load_config(path, environ={"MUSCLENODE_PORT": "4100", "MUSCLENODE_CONFIG": "/elsewhere.toml"})
    assert (config.node.port, config.sources["node.port"]) == (4100, "environment variable MUSCLENODE_PORT")
    assert (config.node.ae_title, config.sources["node.ae_title"]) == ("FILE", str(path))
    assert (config.jobs.workers, config.sources["jobs.workers"]) == (3, str(path))
    assert (config.node.host, config.sources["node.host"]) == ("0.0.0.0", "default")
    assert config.sources["peers"] == "default"
    # The flat names that code used before the sections read the same values.
    assert (config.port, config.ae_title, config.workers, config.model_name) == (
        4100, "FILE", 3, config.model.name)


def test_without_a_file_or_environment_the_defaults_are_the_models_defaults() -> None:
    assert load_config(environ={}) == Config()
    assert Config(node={"port": "4242"}).port == 4242  # arguments are validated like any source


@pytest.mark.parametrize("method", [m.value for m in FatMethod.clustering_methods()])
def test_cluster_method_takes_every_clustering_fat_method(method: str, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[metrics]\ncluster_method = "{method}"\n')
    assert load_config(path, environ={}).metrics.cluster_method is FatMethod(method)


def test_cluster_method_refuses_a_fat_method_that_does_not_cluster(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[metrics]\ncluster_method = "dixon_ff"\n')
    names = " or ".join([", ".join(m.value for m in FatMethod.clustering_methods()[:-1]),
                         FatMethod.clustering_methods()[-1].value])
    with pytest.raises(ConfigError, match=f"^metrics.cluster_method: must be {names}, got 'dixon_ff'"):
        load_config(path, environ={})


def test_every_environment_variable_is_read_and_named_as_the_source() -> None:
    defaults = Config()
    for variable, key in ENVIRONMENT.items():
        section, name = key.split(".")
        value = getattr(getattr(defaults, section), name)
        text = {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else str(value)
        config = load_config(environ={variable: text})
        assert getattr(getattr(config, section), name) == value
        assert config.sources[key] == f"environment variable {variable}"


def test_readme_lists_every_setting_as_the_models_describe_them() -> None:
    readme = (REPO / "README.md").read_text()
    assert settings_table() in readme, (
        "README's configuration table differs from the settings' models: paste `musclenode config settings`")
    assert "musclenode: configuration error: node.port: must be an integer, got 'abc' (from environment\n" \
           "variable MUSCLENODE_PORT)" in readme


def test_serve_names_the_documented_error_exactly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MUSCLENODE_PORT": "abc", "MUSCLENODE_DATA": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "musclenode: configuration error: node.port: must be an integer, got 'abc' (from environment variable"
        " MUSCLENODE_PORT)"]


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


def test_config_show_round_trips_every_section(tmp_path: Path) -> None:
    """A file that sets something in every section, lists of tables and paths: shown, read again, equal."""
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nport = 4000\ndata = "/srv/node data"\nlog_level = "debug"\n'
        '[model]\ndirs = ["/opt/models", "~/models"]\n[jobs]\nmax_attempts = 2\n'
        '[metrics]\ncluster_method = "kmeans2"\nassume_levels = ""\n[reference]\nsite = "/srv/site.csv"\n'
        '[http]\nport = 0\n[rules]\nexclude_patterns = ["a\\\\b", "\\"quoted\\""]\n'
        '[tls]\ncertificate = "/c.pem"\nkey = "/k.pem"\n'
        '[[peers]]\nae_title = "A"\nhost = "10.0.0.1"\nport = 104\nquiet_seconds = 2.5\n'
        '[[peers]]\nae_title = "*"\nhost = "pacs.example"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.2"\nport = 11112\ntls = true\n'
    )
    config = load_config(path, environ={"MUSCLENODE_WORKERS": "0"})
    shown = to_toml(config)
    assert f"max_attempts = 2  # {path}" in shown and "workers = 0  # environment variable MUSCLENODE_WORKERS" in shown
    again = tmp_path / "again.toml"
    again.write_text(shown)
    reread = load_config(again, environ={})
    assert reread == config
    assert reread.rules.exclude_patterns == ("a\\b", '"quoted"')
    assert reread.reference.site == Path("/srv/site.csv") and reread.tls.ca is None


def test_example_configuration_is_valid() -> None:
    config = load_config(REPO / "deploy" / "musclenode.example.toml", environ={})
    assert config.peers[0].ae_title == "ORTHANC" and config.destinations[0].name == "pacs"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``musclenode ... | head``: when the reader closes the pipe, the command stops with the
    status of SIGPIPE and no traceback."""
    import subprocess
    import sys

    from tests.peers import REPO

    script = ("import sys, node.cli as cli\n"
              "cli._config_settings = lambda args: [print('x' * 100) for _ in range(20000)] and 0\n"
              "sys.exit(cli.main(['config', 'settings']))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"xxx")
    process.stdout.close()  # the reader goes away with most of the output unread
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 141, stderr.decode()
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
