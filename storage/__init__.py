"""The storage layer: fencing of CephFS clients (:mod:`storage.ceph_fence`)."""

from storage.ceph_fence import (
    CephFenceError,
    CephFencer,
    CephTimeout,
    ClientIdentity,
    ClientSession,
    EvictionResult,
    MDSRank,
    admin_socket_command,
    normalize_addr,
    probe_mount,
    read_mount_client_id,
    read_mount_identity,
)

__all__ = [
    "CephFenceError",
    "CephFencer",
    "CephTimeout",
    "ClientIdentity",
    "ClientSession",
    "EvictionResult",
    "MDSRank",
    "admin_socket_command",
    "normalize_addr",
    "probe_mount",
    "read_mount_client_id",
    "read_mount_identity",
]
