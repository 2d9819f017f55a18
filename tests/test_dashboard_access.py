"""The dashboard's access rules: roles, passwords, the proxy header, sessions, CSRF tokens, and
no patient identifier in any address.

The rules are checked one by one, then through the application itself (Starlette's test client)
on a real data folder: a real MR file stored and indexed, a job with results and deliveries.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from starlette.testclient import TestClient

from node.config import ConfigError, DashboardSettings, Destination, load_config
from node.dashboard.access import (
    Authenticator, LoginThrottle, Sessions, allowed, hash_password, safe_next, trusted_proxy,
)
from node.dashboard.app import SESSION_COOKIE, Hooks, create_app
from node.operations.health import health_report
from node.operations.state import NodeState
from node.service import record_for_file
from node.storage.store import InstanceStore
from tests.dicomfiles import sample

PASSWORDS = {"olga": "operator secret 1", "vera": "viewer secret 2"}
HASHES = {name: hash_password(password) for name, password in PASSWORDS.items()}


def _settings(**changes) -> DashboardSettings:
    users = [{"name": "olga", "role": "operator", "password_hash": HASHES["olga"]},
             {"name": "vera", "role": "viewer", "password_hash": HASHES["vera"]},
             {"name": "sso-sam", "role": "operator"}]
    return DashboardSettings.model_validate({"users": users, **changes})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the rules, one by one --------------------------------------------------------------------------


def test_roles() -> None:
    assert allowed("viewer", "read") and not allowed("viewer", "retry") and not allowed("viewer", "resend")
    assert all(allowed("operator", p) for p in ("read", "retry", "resend"))
    assert not allowed("admin", "read") and not allowed("", "read")


def test_passwords_and_unknown_users() -> None:
    auth = Authenticator(_settings())
    assert auth.check_password("olga", PASSWORDS["olga"]).role == "operator"
    assert auth.check_password("olga", PASSWORDS["vera"]) is None
    assert auth.check_password("nobody", PASSWORDS["olga"]) is None
    # A user without a password hash logs in only through the proxy header.
    assert auth.check_password("sso-sam", "") is None and auth.check_password("sso-sam", "x") is None
    assert HASHES["olga"].startswith("$argon2id$")


def test_proxy_header_is_believed_only_from_trusted_proxies() -> None:
    auth = Authenticator(_settings(proxy_header="X-Remote-User", trusted_proxies=["10.1.2.0/24"]))
    assert auth.from_proxy("10.1.2.7", {"X-Remote-User": "sso-sam"}).name == "sso-sam"
    assert auth.from_proxy("10.1.3.7", {"X-Remote-User": "sso-sam"}) is None
    assert auth.from_proxy("10.1.2.7", {"X-Remote-User": "stranger"}) is None
    assert auth.from_proxy("10.1.2.7", {}) is None
    assert auth.from_proxy("testclient", {"X-Remote-User": "sso-sam"}) is None
    assert Authenticator(_settings()).from_proxy("10.1.2.7", {"X-Remote-User": "sso-sam"}) is None
    assert trusted_proxy("::1", ("::1",)) and not trusted_proxy(None, ("0.0.0.0/0",))


def test_sessions_time_out_when_idle_and_in_any_case() -> None:
    clock = Clock()
    sessions = Sessions(idle_seconds=1800, max_seconds=4 * 3600, clock=clock)
    user = _settings().user("vera")
    session = sessions.create(user, "password")
    clock.now += 1700
    assert sessions.get(session.id) is session            # used: idle time starts again
    clock.now += 1700
    assert sessions.get(session.id, touch=False) is session  # looked at by a live update: not use
    clock.now += 200
    assert sessions.get(session.id) is None                # 1900 s since the last use
    other = sessions.create(user, "password")
    for _ in range(9):
        clock.now += 1700
        sessions.get(other.id)
    assert sessions.get(other.id) is None                  # past four hours, however busy
    assert sessions.get("") is None and sessions.get("made-up") is None


def test_failed_logins_are_limited_per_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(limit=5, window=900, clock=clock)
    for _ in range(5):
        assert throttle.allowed("10.0.0.1")
        throttle.failed("10.0.0.1")
    assert not throttle.allowed("10.0.0.1") and throttle.allowed("10.0.0.2")
    clock.now += 901
    assert throttle.allowed("10.0.0.1")


def test_after_login_only_paths_of_this_site() -> None:
    assert safe_next("/jobs/3") == "/jobs/3"
    for bad in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "", None, "jobs", "/login?next=/x"):
        assert safe_next(bad) == "/"


def test_settings_name_the_setting_and_its_source(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[dashboard]\nport = 9000\n[[dashboard.users]]\nname = "a"\nrole = "admin"\n')
    with pytest.raises(ConfigError, match=r"dashboard\.users\[1\]\.role: .*viewer.*operator.* \(from .*node\.toml\)"):
        load_config(path, environ={}).dashboard
    path.write_text('[dashboard]\n[[dashboard.users]]\nname = "a"\nrole = "viewer"\npassword_hash = "secret"\n')
    with pytest.raises(ConfigError, match=r"dashboard\.users\[1\]\.password_hash: must be an argon2 hash") as error:
        load_config(path, environ={}).dashboard
    assert "secret" not in str(error.value)
    path.write_text('[dashboard]\nproxy_header = "X-Remote-User"\n')
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(path, environ={}).dashboard
    path.write_text('[dashboard]\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match=r"dashboard\.colour: "):
        load_config(path, environ={}).dashboard
    with pytest.raises(ConfigError, match=r"dashboard\.port: .* \(from environment variable MUSCLENODE_DASHBOARD_PORT\)"):
        load_config(None, environ={"MUSCLENODE_DASHBOARD_PORT": "abc"}).dashboard
    assert load_config(None, environ={"MUSCLENODE_DASHBOARD_PORT": "0"}).dashboard.port == 0
    example = load_config(Path(__file__).parents[1] / "deploy" / "musclenode.example.toml", environ={}).dashboard
    assert example.port == 8090 and not example.enabled
    path.write_text('[dashboard]\nport = 9000\n')
    assert load_config(path, environ={}).dashboard.port == 9000


def test_the_dashboard_runs_only_with_a_way_to_log_in() -> None:
    assert not DashboardSettings().enabled
    assert not DashboardSettings.model_validate({"users": [{"name": "x", "role": "viewer"}]}).enabled
    assert _settings().enabled and not _settings(port=0).enabled
    assert DashboardSettings(proxy_header="X-User", trusted_proxies=("127.0.0.1",)).enabled


# -- through the application ----------------------------------------------------------------------


class Node:
    """A data folder with one real MR instance indexed, a done job with results, and deliveries
    that wait for a destination."""

    def __init__(self, folder: Path, settings: DashboardSettings, clock: Clock) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config = load_config(None, environ={"MUSCLENODE_DATA": str(folder / "data")})
        self.config = self.config.model_copy(update={"dashboard": settings, "destinations": (
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1),)})
        store = InstanceStore(self.config.data)
        source = Path(sample("explicit VR little endian"))
        self.dataset = dcmread(source, stop_before_pixels=True)
        path = store.path_for(self.dataset.StudyInstanceUID, self.dataset.SeriesInstanceUID,
                              self.dataset.SOPInstanceUID)
        store.write(path, [source.read_bytes()])
        self.state = NodeState(self.config)
        relative = str(path.relative_to(store.root))
        self.state.index.add_instance(record_for_file(path, relative), None, "STORESCU", "127.0.0.1")
        self.state.index.record_decisions([{
            "series_uid": self.dataset.SeriesInstanceUID, "version": 1, "selected": True, "kind": "t2",
            "role": "t2", "grouping": "t2:1", "reason": "axial T2 of the lumbar spine"}])
        job = self.state.jobs.submit("t2:1", "t2", self.dataset.StudyInstanceUID,
                                     {"t2": self.dataset.SeriesInstanceUID}, {self.dataset.SeriesInstanceUID: 1})
        self.state.jobs.claim("w0")
        result_path = self.config.data / "results" / "1.2.3" / "1.2.3.4.dcm"
        store.write(result_path, [source.read_bytes()])
        self.state.jobs.finish(job.id, {"files": 1, "seconds": 3.2, "steps": {"read": 0.2, "inference": 3.0},
                                        "measurements": [{"study": self.dataset.StudyInstanceUID, "muscle": "multifidus",
                                                          "side": "left", "mean_csa_mm2": 812.5}],
                                        "quality": {"verdict": "usable", "excluded slices": 0}})
        self.state.exports.add(job.id, [("1.2.3.4", "1.2.840.10008.5.1.4.1.1.66.4", "results/1.2.3/1.2.3.4.dcm",
                                         "seg")], self.config.destinations)
        self.state.exports.mark_failed([d.id for d in self.state.exports.for_job(job.id)], "connection refused")
        self.job = job.id
        self.woken: list[str] = []
        hooks = Hooks(health=lambda: health_report(
            listening=True, free_bytes=5 * 2**30, min_free_bytes=2**30, jobs=self.state.jobs.counts(),
            deliveries=self.state.exports.counts(), last_association=None),
            wake_workers=lambda: self.woken.append("workers"), wake_exporter=lambda: self.woken.append("exporter"))
        self.app = create_app(self.config, settings, self.state, hooks, b"k" * 32, clock=clock)

    def client(self, address: str = "testclient") -> TestClient:
        return TestClient(self.app, client=(address, 50000), follow_redirects=False)

    def identifiers(self) -> list[str]:
        return [str(self.dataset.PatientID), str(self.dataset.PatientName), str(self.dataset.StudyInstanceUID),
                str(self.dataset.SeriesInstanceUID)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(tmp_path: Path, clock: Clock):
    made = Node(tmp_path, _settings(proxy_header="X-Remote-User", trusted_proxies=["10.9.9.9"]), clock)
    yield made
    made.state.close()


def _login(client: TestClient, user: str, password: str | None = None):
    form = client.get("/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
    return client.post("/login", data={"user": user, "password": password or PASSWORDS[user], "nonce": nonce,
                                       "next": "/jobs"})


def _csrf(page_text: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page_text).group(1)


def test_every_page_needs_a_login(node: Node) -> None:
    client = node.client()
    for path in ("/", "/studies", "/jobs", f"/jobs/{node.job}", "/deliveries", "/health", "/config",
                 f"/jobs/{node.job}/files/1", f"/jobs/{node.job}/measurements.csv"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    assert client.get("/jobs?fragment=1").status_code == 401
    assert client.get("/events").status_code == 401
    page = client.get("/login?next=/jobs")
    assert page.status_code == 200 and 'name="password"' in page.text
    assert str(node.dataset.PatientName).split("^")[0] not in page.text
    assert client.post("/deliveries/send-now", data={"destination": "pacs"}).status_code == 401


def test_login_wrong_password_and_forged_login_form(node: Node, caplog) -> None:
    client = node.client()
    caplog.set_level(logging.INFO, logger="musclenode.audit")
    assert _login(client, "vera", "wrong").status_code == 401
    assert SESSION_COOKIE not in client.cookies
    forged = client.post("/login", data={"user": "vera", "password": PASSWORDS["vera"], "nonce": "made-up"})
    assert forged.status_code == 403 and SESSION_COOKIE not in client.cookies
    refused = [r.fields for r in caplog.records if r.name == "musclenode.audit"]
    assert [f["reason"] for f in refused] == ["wrong user name or password", "invalid login form token"]
    response = _login(client, "vera")
    assert response.status_code == 303 and response.headers["location"] == "/jobs"


def test_viewer_reads_but_may_not_act(node: Node, caplog) -> None:
    client = node.client()
    _login(client, "vera")
    page = client.get(f"/jobs/{node.job}")
    assert page.status_code == 200
    assert "Retry now" not in page.text and "Run this job again" not in page.text and "Resend" not in page.text
    assert "usable" in page.text and "812.5" in page.text and "connection refused" in page.text
    caplog.set_level(logging.INFO, logger="musclenode.audit")
    # A viewer's valid token does not make the action allowed.
    token = _csrf(page.text)
    response = client.post("/deliveries/send-now", data={"csrf": token, "destination": "pacs"})
    assert response.status_code == 403
    assert node.woken == []
    record = next(r.fields for r in caplog.records if r.name == "musclenode.audit")
    assert record["event"] == "dashboard action refused" and record["user"] == "vera"


def test_operator_actions_need_the_session_token(node: Node, caplog) -> None:
    client = node.client()
    _login(client, "olga")
    page = client.get("/deliveries")
    assert "Retry now" in page.text
    caplog.set_level(logging.INFO, logger="musclenode.audit")
    for forged in ({"destination": "pacs"}, {"destination": "pacs", "csrf": "made-up"}):
        assert client.post("/deliveries/send-now", data=forged).status_code == 403
    cross_site = client.post("/deliveries/send-now", data={"destination": "pacs", "csrf": _csrf(page.text)},
                             headers={"Origin": "https://evil.example"})
    assert cross_site.status_code == 403
    assert node.woken == [] and all(d.not_before > 0 for d in node.state.exports.for_job(node.job))
    response = client.post("/deliveries/send-now", data={"destination": "pacs", "csrf": _csrf(page.text)})
    assert response.status_code == 303 and node.woken == ["exporter"]
    assert all(d.not_before == 0 for d in node.state.exports.for_job(node.job))
    events = [(r.fields["event"], r.fields["user"], r.fields.get("reason")) for r in caplog.records
              if r.name == "musclenode.audit"]
    assert events[-1] == ("dashboard retry deliveries", "olga", None)
    assert [e[2] for e in events[:3]] == ["missing or invalid CSRF token"] * 2 + ["request from another site"]
    # Resend goes only to a configured destination or one the results went to.
    token = _csrf(client.get(f"/jobs/{node.job}").text)
    assert client.post("/deliveries/resend", data={"csrf": token, "job": node.job,
                                                   "destination": "EVIL@203.0.113.9:104"}).status_code == 400
    assert client.post("/deliveries/resend", data={"csrf": token, "job": node.job,
                                                   "destination": "pacs"}).status_code == 303
    assert len(node.state.exports.for_job(node.job)) == 2


def test_sessions_end_and_live_updates_do_not_keep_them(node: Node, clock: Clock) -> None:
    client = node.client()
    _login(client, "vera")
    clock.now += 20 * 60
    assert client.get("/jobs?fragment=1").status_code == 200
    clock.now += 20 * 60
    assert client.get("/jobs?fragment=1").status_code == 401
    assert client.get("/jobs").headers["location"].startswith("/login")
    _login(client, "vera")
    token = _csrf(client.get("/jobs").text)
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert client.get("/jobs").status_code == 303


def test_single_sign_on_header_only_from_the_proxy(node: Node) -> None:
    assert node.client("10.9.9.8").get("/jobs", headers={"X-Remote-User": "sso-sam"}).status_code == 303
    via_proxy = node.client("10.9.9.9")
    assert via_proxy.get("/jobs", headers={"X-Remote-User": "stranger"}).status_code == 303
    page = via_proxy.get("/jobs", headers={"X-Remote-User": "sso-sam"})
    assert page.status_code == 200 and "sso-sam" in page.text
    # The proxy's session is good only with the proxy's word on each request.
    assert via_proxy.get("/jobs").status_code == 303


def test_no_patient_identifier_in_any_address(node: Node) -> None:
    client = node.client()
    _login(client, "olga")
    seen, queue, pages = set(), ["/studies"], []
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        response = client.get(path)
        if response.headers.get("content-type", "").startswith("text/html"):
            pages.append(response.text)
            queue += [p for p in re.findall(r'(?:href|src|action)="(/[^"]*)"', response.text)
                      if not p.startswith(("/static", "/logout")) and p not in seen]
    assert any(f"/studies/" in p for p in seen) and f"/jobs/{node.job}" in seen
    addresses = " ".join(seen) + " " + " ".join(re.findall(r'(?:href|src|action|data-fragment)="([^"]*)"', " ".join(pages)))
    for identifier in node.identifiers():
        assert identifier not in addresses
    # Logged in, the patient's name is shown.
    assert any(str(node.dataset.PatientName).split("^")[0] in page for page in pages)


def test_configuration_page_hides_secrets(node: Node) -> None:
    client = node.client()
    _login(client, "vera")
    page = client.get("/config")
    assert page.status_code == 200 and "[dashboard]" in page.text and "min_free_mb" in page.text
    assert "$argon2" not in page.text and "(hidden)" in page.text


def test_downloads_and_summary_page(node: Node) -> None:
    client = node.client()
    _login(client, "vera")
    download = client.get(f"/jobs/{node.job}/files/1")
    assert download.status_code == 200 and download.headers["content-type"] == "application/dicom"
    assert download.content[128:132] == b"DICM"
    assert f'filename="job-{node.job}-seg-1.dcm"' in download.headers["content-disposition"]
    rows = client.get(f"/jobs/{node.job}/measurements.csv")
    assert rows.status_code == 200 and rows.text.splitlines()[0] == "study,muscle,side,mean_csa_mm2"
    assert client.get(f"/jobs/{node.job}/files/99").status_code == 404
    assert client.get(f"/jobs/{node.job}/summary/1.png").status_code == 404  # a SEG, not a summary page


def test_hash_password_command_and_config_show(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.peers import REPO

    made = subprocess.run([sys.executable, "-m", "node", "dashboard", "hash-password"], input="s3cret words\n",
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert made.returncode == 0, made.stderr
    hashed = made.stdout.strip()
    path = tmp_path / "node.toml"
    path.write_text(f'[dashboard]\nport = 9001\n[[dashboard.users]]\nname = "ann"\nrole = "viewer"\n'
                    f'password_hash = "{hashed}"\n')
    settings = load_config(path, environ={}).dashboard
    assert Authenticator(settings).check_password("ann", "s3cret words").name == "ann"
    empty = subprocess.run([sys.executable, "-m", "node", "dashboard", "hash-password"], input="\n",
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert empty.returncode == 1 and "empty" in empty.stderr
    shown = subprocess.run([sys.executable, "-m", "node", "--config", str(path), "config", "show"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert shown.returncode == 0 and "[dashboard]" in shown.stdout and "port = 9001" in shown.stdout
    again = tmp_path / "shown.toml"
    again.write_text(shown.stdout)
    assert load_config(again, environ={}).dashboard == settings
