"""``dicomnode check-config FILE``: validate a configuration and say what the node would do.

Everything a role checks before it starts is checked here too, without starting anything: the
TOML file and every key (``dicomnode.config``), the weights' manifest (read with
``inference.manifest.read_manifest``, which resolves ``scope.regions = "calibrated"``; no weights
are loaded), the DICOM TLS files (certificate, key and CA usable together) and the HTTPS files
of ``[http]``. An error is a :class:`~dicomnode.config.ConfigError` naming the key.
"""

from __future__ import annotations

from pathlib import Path

from dicomnode import tls
from dicomnode.config import Config, ConfigError, load_config
from dicomnode.httpd import https_context
from dicomnode.scope import Scope
from inference.manifest import Manifest, ManifestError, read_manifest


def check_config(path: Path) -> list[str]:
    """Load and check the config at ``path``; the lines describing what the node would do."""
    config = load_config(path)
    try:
        manifest = read_manifest(config.inference.weights)
    except ManifestError as exc:
        raise ConfigError(f"inference.weights: {exc}") from exc
    if config.node.tls:
        tls.listener_context(config)
    if config.tls is not None and any(d.tls for d in config.destinations):
        tls.client_context(config.tls)
    https_context(config.http)
    return describe(config, manifest)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _listener_tls(config: Config) -> str:
    mode = tls.mode(config)
    if mode == "plain":
        return "plain DICOM (node.tls = false)"
    assert config.tls is not None
    clients = (
        f"client certificates required, signed by {config.tls.ca_certificates}"
        if mode == "mutual"
        else "no client certificates asked"
    )
    return f"DICOM TLS only, certificate {config.tls.certificate}; {clients}"


def _http(config: Config) -> str:
    http = config.http
    if not http.enabled:
        return "disabled (http.enabled = false)"
    scheme = "http" if http.certificate is None else "https"
    host = f"[{http.bind}]" if ":" in http.bind else http.bind

    def where(port: int) -> str:
        return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}:<any free port>"

    return (
        f"{where(http.port)} (serve, listen), {where(http.work_port)} (work): "
        "/metrics /healthz /readyz"
    )


def _queue(config: Config) -> str:
    """The queue backend and, for RabbitMQ, what this host does with it."""
    broker = config.queue.broker
    if broker is None:
        return f"sqlite in {config.node.state_dir} (one machine)"
    site = (
        f"site {broker.site}: serve publishes jobs, instances at {broker.instances.url}"
        if broker.site is not None and broker.instances is not None and broker.instances.url
        else "no site (serve needs queue.site and queue.instances.url)"
    )
    return (
        f"rabbitmq at {broker.url} (prefix {broker.prefix}, {broker.levels} priority levels, "
        f"{len(broker.priority)} rule(s), delivery limit {broker.delivery_limit}); {site}; "
        "work takes jobs from the pool"
    )


def describe(config: Config, manifest: Manifest) -> list[str]:
    """What the node would do with ``config`` and the model of ``manifest``, one fact a line."""
    node, ident = config.node, config.identity
    callers = (
        ", ".join(f"{c.ae_title} from {c.host}" for c in config.allowed_callers)
        if config.allowed_callers
        else "any calling AE title from any address"
    )
    destinations = (
        ", ".join(f"{d.key} ({'TLS' if d.tls else 'plain'})" for d in config.destinations)
        if config.destinations
        else "none (results are kept in the state directory only)"
    )
    outputs = [
        name
        for name, on in (
            ("SR", config.outputs.sr),
            ("Secondary Capture", config.outputs.sc),
            ("GSPS", config.outputs.gsps),
        )
        if on
    ]
    scope = Scope.resolve(config.scope, manifest.thresholds)
    state = node.state_dir
    keep = config.retention.keep_days
    facts = [
        ("AE title", node.ae_title),
        (
            "DICOM",
            f"{node.bind}:{node.port or '<any free port>'}; {node.receive_processes} receiving "
            f"process(es); at most {node.max_associations} associations",
        ),
        ("TLS", _listener_tls(config)),
        ("callers", callers),
        ("destinations", destinations),
        (
            "outputs",
            f"{', '.join(outputs)}; withdraw superseded results: "
            f"{_yes(config.outputs.withdraw_superseded)}",
        ),
        (
            "model",
            f"{manifest.name} {manifest.version} ({'trained' if manifest.trained else 'untrained'}"
            f", {len(manifest.members)} members) from {config.inference.weights}; device "
            f"{config.inference.device}, precision {config.inference.precision}",
        ),
        ("scope", scope.describe()),
        (
            "identity",
            f"UID root {ident.uid_root}; institution {ident.institution_name or '(none)'}; "
            f"station {ident.station_name or node.ae_title}; serial "
            f"{ident.device_serial_number or '(derived from the device UID)'}; model name "
            f"{ident.manufacturer_model_name}",
        ),
        (
            "state",
            f"{state} ({'exists' if state.is_dir() else 'will be created'}); C-STORE refused "
            f"below {node.min_free_bytes} bytes free; finished studies kept "
            f"{f'{keep} days' if keep else 'for ever'}",
        ),
        ("http", _http(config)),
        ("queue", _queue(config)),
    ]
    width = max(len(name) for name, _ in facts) + 2
    source = config.source or Path("(config)")
    return [f"{source}: valid", *(f"{name + ':':<{width}}{text}" for name, text in facts)]
