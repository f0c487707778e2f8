"""Configuration parsing: the shipped example file and every kind of bad value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode.config import (
    DEFAULT_MAX_PDU,
    MAX_BATCH_LIMIT,
    PRECISIONS,
    AllowedCaller,
    ConfigError,
    DeliveryConfig,
    Device,
    HttpConfig,
    IdentityConfig,
    OtherSopClasses,
    OutOfScope,
    QueueConfig,
    RetryPolicy,
    ScopeConfig,
    UnknownRegion,
    load_config,
    parse_config,
    validate_ae_title,
)
from dicomnode.records import Destination

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "dicomnode.example.toml"


def test_example_file_parses_to_the_documented_values() -> None:
    config = load_config(EXAMPLE)
    assert config.node.ae_title == "FRACTURE_AI"
    assert config.node.bind == "127.0.0.1"
    assert config.node.port == 11112
    assert config.node.state_dir == Path("/var/lib/dicomnode")
    assert config.node.other_sop_classes is OtherSopClasses.DISCARD
    assert config.node.max_pdu == DEFAULT_MAX_PDU
    assert config.node.max_associations == 16
    assert config.study.stable_seconds == 10.0
    assert config.inference.weights == REPO / "systemd" / "ensemble_weights"
    assert config.inference.device is Device.AUTO
    assert config.inference.max_batch is None  # "auto"
    assert (config.outputs.sr, config.outputs.sc, config.outputs.gsps) == (True, True, False)
    assert config.outputs.withdraw_superseded is True
    assert config.scope == ScopeConfig()  # the example shows the defaults
    assert config.identity == IdentityConfig()
    assert config.http == HttpConfig()  # the example shows the defaults
    assert config.destinations == (Destination("PACS", "127.0.0.1", 4242),)
    assert config.allowed_callers == (AllowedCaller("MODALITY", "127.0.0.1"),)
    assert config.source == EXAMPLE
    assert config.queue == QueueConfig(
        lease_seconds=600.0, max_attempts=3, retry_initial_seconds=30.0, retry_max_seconds=3600.0
    )
    assert config.delivery == DeliveryConfig(
        retry_initial_seconds=30.0,
        retry_max_seconds=3600.0,
        give_up_after_seconds=172800.0,
        timeout_seconds=60.0,
    )
    # the example shows the defaults: a config without [queue] and [delivery] means the same
    assert parse_config({"node": {"state_dir": "s"}}, REPO).delivery == config.delivery
    assert parse_config({"node": {"state_dir": "s"}}, REPO).queue == config.queue


def test_every_key_but_state_dir_has_a_default() -> None:
    """Dropping any key of the example must still parse (all have defaults) except state_dir."""
    raw = tomllib.loads(EXAMPLE.read_text())
    for section, table in raw.items():
        if not isinstance(table, dict):
            continue
        for key in table:
            trimmed = {s: dict(t) if isinstance(t, dict) else t for s, t in raw.items()}
            del trimmed[section][key]
            if (section, key) == ("node", "state_dir"):
                with pytest.raises(ConfigError, match=r"node\.state_dir: is required"):
                    parse_config(trimmed, EXAMPLE.parent)
            else:
                parse_config(trimmed, EXAMPLE.parent)


def test_receive_processes_auto_is_one_per_usable_cpu_at_most_four() -> None:
    import os

    auto = parse_config(BASE, REPO).node.receive_processes
    assert auto == max(1, min(4, len(os.sched_getaffinity(0))))
    assert parse_config({"node": {**BASE["node"], "receive_processes": "auto"}}, REPO).node == (
        parse_config(BASE, REPO).node
    )
    assert (
        parse_config(
            {"node": {**BASE["node"], "receive_processes": 3}}, REPO
        ).node.receive_processes
        == 3
    )


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "node.toml"
    cfg.write_text('[node]\nstate_dir = "state"\n[inference]\nweights = "../w"\n')
    config = load_config(cfg)
    assert config.node.state_dir == tmp_path / "etc" / "state"
    assert config.inference.weights == tmp_path / "w"


BASE = {"node": {"state_dir": "/srv/state"}}


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("node", "port", 70000, r"node\.port: must be an integer in 0\.\.65535"),
        ("node", "port", -1, r"node\.port"),
        ("node", "port", "11112", r"node\.port"),
        ("node", "port", True, r"node\.port"),
        ("node", "receive_processes", 0, r'node\.receive_processes: must be "auto" or an integer'),
        ("node", "receive_processes", 65, r"node\.receive_processes"),
        ("node", "receive_processes", "many", r"node\.receive_processes"),
        ("node", "ae_title", "A" * 17, r"node\.ae_title: AE title is longer than 16"),
        ("node", "ae_title", "", r"node\.ae_title"),
        ("node", "ae_title", " PAD", r"node\.ae_title"),
        ("node", "ae_title", "BACK\\SLASH", r"node\.ae_title"),
        ("node", "bind", "not-an-ip", r"node\.bind: must be an IP address"),
        ("node", "other_sop_classes", "keep", r"node\.other_sop_classes: must be one of"),
        ("node", "max_pdu", 1.5, r"node\.max_pdu"),
        ("node", "max_associations", 0, r"node\.max_associations"),
        ("node", "log_level", "loud", r"node\.log_level"),
        ("node", "state_dir", 5, r"node\.state_dir: must be a string"),
        ("node", "colour", "blue", r"node: unknown key\(s\) colour"),
        ("study", "stable_seconds", 0, r"study\.stable_seconds: must be a number of seconds > 0"),
        ("study", "stable_seconds", "10", r"study\.stable_seconds"),
        ("inference", "device", "tpu", r"inference\.device"),
        ("inference", "max_batch", 0, r'inference\.max_batch: must be "auto" or an integer in 1'),
        ("inference", "max_batch", 1025, r"inference\.max_batch"),
        ("inference", "max_batch", "all", r"inference\.max_batch"),
        ("inference", "max_batch", True, r"inference\.max_batch"),
        ("outputs", "sr", "yes", r"outputs\.sr: must be true or false"),
        ("outputs", "gsps", 1, r"outputs\.gsps"),
        ("queue", "max_attempts", 0, r"queue\.max_attempts"),
        ("queue", "lease_seconds", -5, r"queue\.lease_seconds"),
        ("delivery", "retry_max_seconds", 1, r"delivery\.retry_max_seconds: must be >="),
        ("delivery", "timeout_seconds", 0, r"delivery\.timeout_seconds: must be a number of s"),
        ("delivery", "timeout_seconds", "60", r"delivery\.timeout_seconds"),
        ("queue", "retry_max_seconds", 1, r"queue\.retry_max_seconds: must be >= queue\.retry_i"),
        ("queue", "retry_initial_seconds", -1, r"queue\.retry_initial_seconds"),
        ("identity", "uid_root", "1.2.abc", r"identity\.uid_root: must be a UID root"),
        ("identity", "uid_root", "1.02.3", r"identity\.uid_root"),
        ("identity", "uid_root", "1." * 30, r"identity\.uid_root: .*at most 40"),
        ("identity", "station_name", "S" * 17, r"identity\.station_name: at most 16"),
        ("identity", "manufacturer_model_name", "", r"identity\.manufacturer_model_name"),
        ("identity", "serial", "1", r"identity: unknown key\(s\) serial"),
        ("scope", "regions", ["wrist", "elbo"], r"scope\.regions: unknown region 'elbo'"),
        ("scope", "regions", ["calibrated", "hand"], r"scope\.regions: \"calibrated\" stands"),
        ("scope", "regions", [], r"scope\.regions"),
        ("scope", "modalities", "DX", r"scope\.modalities: must be a non-empty list"),
        ("scope", "unknown_region", "guess", r"scope\.unknown_region: must be one of"),
        ("scope", "out_of_scope", "drop", r"scope\.out_of_scope: must be one of"),
        ("http", "enabled", "yes", r"http\.enabled: must be true or false"),
        ("http", "bind", "localhost", r"http\.bind: must be an IP address"),
        ("http", "port", 70000, r"http\.port: must be an integer in 0\.\.65535"),
        ("http", "work_port", -1, r"http\.work_port: must be an integer"),
        ("http", "work_port", 9811, r"http\.work_port: must differ from http\.port \(9811\)"),
        ("http", "port", 11112, r"http\.port: 11112 is node\.port, the DICOM port"),
        ("http", "tls", True, r"http: unknown key\(s\) tls"),
    ],
)
def test_bad_values_name_the_key(section: str, key: str, value: object, message: str) -> None:
    raw = {**BASE, section: {**BASE.get(section, {}), key: value}}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, Path("/etc"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nodes": {}}, r"config: unknown key\(s\) nodes"),
        ({"study": 5}, r"study: must be a table"),
        ({"destinations": {"ae_title": "X"}}, r"destinations: must be an array of tables"),
        (
            {"destinations": [{"ae_title": "PACS", "host": "h"}]},
            r"destinations\[0\]\.port: is required",
        ),
        (
            {"destinations": [{"ae_title": "PACS", "host": "h", "port": 0}]},
            r"destinations\[0\]\.port: must be an integer in 1\.\.65535",
        ),
        (
            {"destinations": [{"ae_title": "PACS", "host": "h", "port": 1, "tls": True}]},
            r"destinations\[0\]\.tls: needs a \[tls\] table",
        ),
        (
            {"destinations": [{"ae_title": "PACS", "host": "h", "port": 1, "tlz": True}]},
            r"destinations\[0\]: unknown key\(s\) tlz",
        ),
        (
            {"node": {"state_dir": "s", "tls": True}},
            r"node\.tls: needs a \[tls\] table",
        ),
        (
            {"tls": {"certificate": "missing.pem", "private_key": "missing.key"}},
            r"tls\.certificate: no such file",
        ),
        (
            {"node": {"state_dir": "s", "min_free_bytes": -1}},
            r"node\.min_free_bytes: must be an integer",
        ),
        (
            {"node": {"state_dir": "s", "network_timeout_seconds": 0}},
            r"node\.network_timeout_seconds: must be a number of seconds > 0",
        ),
        (
            {"destinations": [{"ae_title": "P", "host": "h", "port": 1}] * 2},
            r"destinations: listed twice",
        ),
        (
            {"allowed_callers": [{"ae_title": "M", "host": "pc.local"}]},
            r"allowed_callers\[0\]\.host: must be an IP address",
        ),
        (
            {"allowed_callers": [{"host": "127.0.0.1"}]},
            r"allowed_callers\[0\]\.ae_title: is required",
        ),
    ],
)
def test_bad_structure_names_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, **raw}, Path("/etc"))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_ipv6_caller_addresses_are_normalised() -> None:
    raw = {**BASE, "allowed_callers": [{"ae_title": "M", "host": "0:0:0:0:0:0:0:1"}]}
    assert parse_config(raw, Path("/etc")).allowed_callers[0].host == "::1"


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1))
def test_ae_title_accepts_exactly_short_printable_titles(title: str) -> None:
    if len(title) <= 16 and "\\" not in title:
        assert validate_ae_title(title) == title
    else:
        with pytest.raises(ValueError):
            validate_ae_title(title)


@given(st.integers(min_value=1, max_value=200))
def test_backoff_doubles_up_to_the_cap(attempts: int) -> None:
    policy = DeliveryConfig(
        retry_initial_seconds=30,
        retry_max_seconds=3600,
        give_up_after_seconds=86400,
        timeout_seconds=60,
    )
    wait = policy.backoff(attempts)
    assert 30 <= wait <= 3600
    if attempts > 1 and wait < 3600:
        assert wait == 2 * policy.backoff(attempts - 1)
    if attempts > 1:
        assert wait >= policy.backoff(attempts - 1)


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.01, max_value=1e4),
    st.floats(min_value=1.0, max_value=100.0),
)
def test_jobs_and_deliveries_back_off_by_one_formula(
    attempts: int, initial: float, factor: float
) -> None:
    cap = initial * factor
    queue = QueueConfig(
        lease_seconds=60, max_attempts=3, retry_initial_seconds=initial, retry_max_seconds=cap
    )
    delivery = DeliveryConfig(
        retry_initial_seconds=initial,
        retry_max_seconds=cap,
        give_up_after_seconds=86400,
        timeout_seconds=60,
    )
    wait = RetryPolicy(retry_initial_seconds=initial, retry_max_seconds=cap).backoff(attempts)
    assert queue.backoff(attempts) == delivery.backoff(attempts) == wait
    assert wait == min(initial * 2 ** (attempts - 1), cap)
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        queue.backoff(0)


def test_tls_private_key_readable_by_everyone_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    cert.write_text("certificate")
    key.write_text("key")
    raw = {**BASE, "tls": {"certificate": str(cert), "private_key": str(key)}}
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"tls\.private_key: .* accessible to everyone"):
        parse_config(raw, tmp_path)
    key.chmod(0o640)
    tls = parse_config(raw, tmp_path).tls
    assert tls is not None and tls.private_key == key and tls.ca_certificates is None


def test_inference_speed_keys() -> None:
    from inference.precision import PRECISIONS as INFERENCE_PRECISIONS

    assert PRECISIONS == INFERENCE_PRECISIONS
    default = parse_config(BASE, Path("/etc")).inference
    assert (default.precision, default.channels_last) == ("auto", None)
    raw = {**BASE, "inference": {"precision": "fp32", "channels_last": True}}
    chosen = parse_config(raw, Path("/etc")).inference
    assert (chosen.precision, chosen.channels_last) == ("fp32", True)
    with pytest.raises(ConfigError, match=r"inference\.precision: must be one of"):
        parse_config({**BASE, "inference": {"precision": "fp16"}}, Path("/etc"))


def test_inference_max_batch_is_auto_or_a_number() -> None:
    from inference.memory import MAX_BATCH_LIMIT as INFERENCE_LIMIT

    assert MAX_BATCH_LIMIT == INFERENCE_LIMIT
    assert parse_config(BASE, Path("/etc")).inference.max_batch is None
    for value, expected in (("auto", None), (1, 1), (8, 8), (MAX_BATCH_LIMIT, MAX_BATCH_LIMIT)):
        raw = {**BASE, "inference": {"max_batch": value}}
        assert parse_config(raw, Path("/etc")).inference.max_batch == expected


def test_scope_and_identity_keys() -> None:
    config = parse_config(
        {
            **BASE,
            "scope": {"modalities": ["dx", " cr"], "regions": ["wrist", "hand"],
                      "unknown_region": "skip", "out_of_scope": "ignore"},
            "identity": {"uid_root": "1.2.840.99999", "institution_name": "St. Elsewhere",
                         "station_name": "FRX1", "device_serial_number": "SN-7"},
        },
        Path("/etc"),
    )
    assert config.scope == ScopeConfig(
        modalities=("DX", "CR"),
        regions=("wrist", "hand"),
        unknown_region=UnknownRegion.SKIP,
        out_of_scope=OutOfScope.IGNORE,
    )
    assert config.identity == IdentityConfig(
        uid_root="1.2.840.99999.",  # normalised to end in a dot (a prefix)
        institution_name="St. Elsewhere",
        station_name="FRX1",
        device_serial_number="SN-7",
    )


def test_http_keys(tmp_path: Path) -> None:
    assert parse_config(BASE, tmp_path).http == HttpConfig(
        enabled=True, bind="127.0.0.1", port=9811, work_port=9812
    )
    raw = {**BASE, "http": {"enabled": False, "bind": "::", "port": 0, "work_port": 0}}
    http = parse_config(raw, tmp_path).http
    assert (http.enabled, http.bind, http.port, http.work_port) == (False, "::", 0, 0)
    assert (http.port_of("serve"), http.port_of("listen"), http.port_of("work")) == (0, 0, 0)
    # HTTPS needs both files; the key readable by the service only, as [tls]
    cert, key = tmp_path / "http.crt", tmp_path / "http.key"
    cert.write_text("certificate")
    key.write_text("key")
    with pytest.raises(ConfigError, match=r"http\.private_key: is required with http\.certif"):
        parse_config({**BASE, "http": {"certificate": "http.crt"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"http\.certificate: is required with http\.private"):
        parse_config({**BASE, "http": {"private_key": "http.key"}}, tmp_path)
    both = {**BASE, "http": {"certificate": "http.crt", "private_key": "http.key"}}
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"http\.private_key: .* accessible to everyone"):
        parse_config(both, tmp_path)
    key.chmod(0o600)
    http = parse_config(both, tmp_path).http
    assert (http.certificate, http.private_key) == (cert, key)
    with pytest.raises(ConfigError, match=r"http\.certificate: no such file"):
        parse_config({**BASE, "http": {"certificate": "x", "private_key": "http.key"}}, tmp_path)


# -- [queue] backend = "rabbitmq" (several hosts) -------------------------------------------------


def broker_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in ("broker.credentials", "instances.token", "ca.crt")}
    for path in files.values():
        path.write_text("x" * 32 + "\n")
        path.chmod(0o600)
    return files


def rabbit_queue(folder: Path, **changes: object) -> dict[str, object]:
    files = broker_files(folder)
    return {
        "backend": "rabbitmq",
        "url": "amqps://broker.example:5671/%2F",
        "credentials_file": str(files["broker.credentials"]),
        "ca_certificates": str(files["ca.crt"]),
        "site": "site-a",
        "delivery_limit": 4,
        "dispatch_seconds": 3600,
        "priority": [{"level": 0, "calling_ae": "ED_CR"}, {"level": 0, "station_name": "ED1"}],
        "instances": {
            "bind": "10.0.0.5",
            "port": 8443,
            "url": "https://site-a.example:8443",
            "token_file": str(files["instances.token"]),
        },
        **changes,
    }


def test_sqlite_is_the_default_backend_and_needs_no_broker() -> None:
    config = parse_config(BASE, Path("/etc"))
    assert config.queue.backend == "sqlite" and config.queue.broker is None


def test_rabbitmq_backend_reads_the_broker_the_site_and_the_instance_server(
    tmp_path: Path,
) -> None:
    config = parse_config({**BASE, "queue": rabbit_queue(tmp_path)}, Path("/etc"))
    broker = config.queue.broker
    assert config.queue.backend == "rabbitmq" and broker is not None
    assert broker.url == "amqps://broker.example:5671/%2F"
    assert broker.credentials_file == tmp_path / "broker.credentials"
    assert broker.ca_certificates == tmp_path / "ca.crt"
    assert (broker.site, broker.prefix, broker.levels, broker.default_priority) == (
        "site-a", "dicomnode", 2, 1)
    assert (broker.delivery_limit, broker.dispatch_seconds) == (4, 3600.0)
    assert [(r.level, r.calling_ae, r.station_name) for r in broker.priority] == [
        (0, "ED_CR", None), (0, None, "ED1")]
    assert broker.instances is not None and broker.instances.port == 8443
    assert broker.token_file == tmp_path / "instances.token"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"url": "http://broker:5672"}, r"queue\.url: must start with amqp:// or amqps://"),
        ({"url": "amqp://user:pw@broker:5672"}, r"queue\.url: no user or password"),
        ({"site": "site a"}, r"queue\.site: letters"),
        ({"prefix": "a b"}, r"queue\.prefix"),
        ({"delivery_limit": 0}, r"queue\.delivery_limit"),
        ({"priority": [{"level": 2, "calling_ae": "ED"}]}, r"queue\.priority\[0\]\.level"),
        ({"priority": [{"level": 0}]}, r"queue\.priority\[0\]: needs calling_ae or station"),
        ({"priority": [{"level": 0, "aet": "ED"}]}, r"queue\.priority\[0\]: unknown key"),
        ({"instances": {"url": "https://x", "token_file": "/nonexistent"}},
         r"queue\.instances\.token_file: no such file"),
        ({"backend": "kafka"}, r"queue\.backend: must be one of"),
    ],
)
def test_bad_broker_values_name_the_key(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, "queue": rabbit_queue(tmp_path, **changes)}, Path("/etc"))


def test_broker_keys_with_the_sqlite_backend_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"queue: unknown key\(s\) url"):
        parse_config({**BASE, "queue": {"url": "amqp://127.0.0.1"}}, Path("/etc"))


def test_a_credentials_file_readable_by_everyone_is_refused(tmp_path: Path) -> None:
    queue = rabbit_queue(tmp_path)
    (tmp_path / "broker.credentials").chmod(0o644)
    with pytest.raises(ConfigError, match=r"queue\.credentials_file: .* accessible to everyone"):
        parse_config({**BASE, "queue": queue}, Path("/etc"))
