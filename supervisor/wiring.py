"""Build the real DCS backend, runner and registrar a config names (imports are lazy)."""

from __future__ import annotations

import time

from atserver_runner.base import Runner
from leases.base import Backend, Clock
from supervisor.config import SupervisorConfig
from supervisor.registration import NodeHealth, Registrar
from supervisor.timing import build_timing


def build_backend(cfg: SupervisorConfig, clock: Clock = time.monotonic) -> Backend:
    """The configured DCS backend (etcd or Consul), with the node's request timeout."""
    timing = build_timing(cfg)
    if cfg.dcs.backend == "etcd":
        from leases.etcd import EtcdBackend

        etcd = cfg.dcs.etcd
        assert etcd is not None  # validated at load
        tls = etcd.tls
        return EtcdBackend(
            etcd.endpoints,
            cfg.dcs.prefix,
            request_timeout=timing.request_timeout,
            ca_cert=tls.ca if tls else None,
            cert_cert=tls.cert if tls else None,
            cert_key=tls.key if tls else None,
            username=etcd.username,
            password=etcd.password,
            clock=clock,
        )
    from leases.consul import ConsulBackend

    dcs = cfg.dcs.consul
    return ConsulBackend(
        cfg.dcs_consul_url,
        cfg.dcs.prefix,
        token=(dcs.token if dcs and dcs.token else cfg.consul.token),
        request_timeout=timing.request_timeout,
        lock_delay=dcs.lock_delay if dcs else 15.0,
        session_check_ttl=dcs.session_check_ttl if dcs else None,
        clock=clock,
    )


def build_runner(cfg: SupervisorConfig) -> Runner:
    """The configured runner (process or docker) for this node."""
    r = cfg.runner
    if r.kind == "process":
        from atserver_runner.process import ProcessRunner

        probe_ca = r.tls.ca if r.tls is not None else None
        return ProcessRunner(
            cfg.node.name, r.state_dir / "workloads", probe_ca=probe_ca, data_root=r.data_root
        )
    import docker

    from atserver_runner.docker import DockerRunner

    client = docker.DockerClient(base_url=r.docker_url) if r.docker_url else docker.from_env()
    assert r.image is not None  # validated at load
    tls = r.tls
    return DockerRunner(
        cfg.node.name,
        client,
        image=r.image,
        publish_host=cfg.node.address,
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        probe_ca=tls.ca if tls else None,
        data_root=r.data_root,
    )


def build_registrar(cfg: SupervisorConfig) -> Registrar:
    """The registrar on this node's Consul agent; the probe check's TTL is four probe
    intervals (it is refreshed at half of it, or at once when a result changes)."""
    return Registrar(
        cfg.consul.url,
        node=cfg.node.name,
        token=cfg.consul.token,
        service_name=cfg.consul.service_name,
        shards=cfg.consul.shards,
        probe_ttl=max(4 * cfg.timing.probe_interval, 1.0),
        deregister_critical_after=cfg.consul.deregister_critical_after,
        request_timeout=cfg.consul.request_timeout,
    )


def build_node_health(cfg: SupervisorConfig) -> NodeHealth:
    """The node's Consul node check (TTL = the renew deadline) that the session keeper
    passes: every atServer registered on the node's agent turns critical with it."""
    timing = build_timing(cfg)
    return NodeHealth(
        cfg.consul.url,
        node=cfg.node.name,
        token=cfg.consul.token,
        ttl=max(timing.renew_deadline, 1.0),
        request_timeout=min(cfg.consul.request_timeout, timing.request_timeout * 2),
    )
