#!/usr/bin/env python3
"""Set up and check a Ceph cluster over one librados connection, for the ``ceph`` role.

The role builds the cluster by hand (no cephadm, no container registry): ``monmaptool`` and
``ceph-mon --mkfs``, ``ceph-osd --mkfs``, the daemons as services. What needs the monitors
goes through this script, run on a monitor host with the admin keyring: one librados
connection per call (the ``ceph`` CLI costs 0.7-3 s per command on a small machine), every
step idempotent, and every result one JSON line on stdout with ``changed`` for Ansible.

    cephctl.py --conf C --keyring K wait-quorum --mons 5 --timeout 120
    cephctl.py --conf C --keyring K bootstrap SPEC.json     # daemon and client keys, OSD ids
    cephctl.py --conf C --keyring K setup SPEC.json         # stretch mode, pools, fs, data root
    cephctl.py --conf C --keyring K wait-health --timeout 300
    cephctl.py --conf C --keyring K running-versions        # every daemon's running version
    cephctl.py --conf C --keyring K before-restart KIND ID  # noout / fail the active MDS
    cephctl.py --conf C --keyring K after-restart KIND ID --timeout 300
    cephctl.py binary-versions                              # the installed daemons' versions

Exit codes: 0 done, 1 a step failed or timed out (the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DAEMON_KINDS = ("mon", "mgr", "osd", "mds")


class CephError(RuntimeError):
    """A command answered with an error (``errno`` positive), or a wait ran out of time."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class Cluster:
    """One librados connection as the admin entity, with JSON mon/mgr commands."""

    def __init__(self, conf: str, name: str, keyring: str, timeout: float) -> None:
        import rados  # type: ignore[import-not-found]

        deadline = time.monotonic() + timeout
        while True:
            handle = rados.Rados(
                conffile=conf,
                name=name,
                conf={"keyring": keyring, "client_mount_timeout": "10"},
            )
            try:
                handle.connect()
            except rados.Error as exc:
                handle.shutdown()
                if time.monotonic() > deadline:
                    raise CephError(
                        f"cannot connect to the monitors within {timeout:g}s: {exc}"
                    ) from None
                time.sleep(1.0)
                continue
            self.rados = handle
            return

    def close(self) -> None:
        self.rados.shutdown()

    def mon(self, prefix: str, inbuf: bytes = b"", **args: Any) -> Any:
        """A mon command's parsed JSON answer (or its status text when it has none)."""
        return _parsed(*self._send(self.rados.mon_command, prefix, inbuf, format="json", **args))

    def mgr(self, prefix: str, **args: Any) -> Any:
        return _parsed(*self._send(self.rados.mgr_command, prefix, b"", format="json", **args))

    def mon_raw(self, prefix: str, **args: Any) -> bytes:
        """A mon command whose answer is binary (``osd getcrushmap``)."""
        return self._send(self.rados.mon_command, prefix, b"", **args)[0]

    @staticmethod
    def _send(
        send: Callable[..., Any], prefix: str, inbuf: bytes, **args: Any
    ) -> tuple[bytes, str]:
        ret, out, outs = send(json.dumps({"prefix": prefix, **args}), inbuf)
        if ret != 0:
            raise CephError(f"{prefix} {json.dumps(args)}: errno {-ret}: {outs}", -ret)
        return bytes(out), str(outs)


def _parsed(out: bytes, outs: str) -> Any:
    if not out:
        return outs
    try:
        return json.loads(out)
    except ValueError:
        return out.decode(errors="replace")


def wait_for(
    check: Callable[[], str | None], timeout: float, what: str, interval: float = 1.0
) -> None:
    """Poll ``check`` (None when satisfied, else why not) until it passes or time runs out."""
    deadline = time.monotonic() + timeout
    why: str | None = "not checked yet"
    while time.monotonic() < deadline:
        try:
            why = check()
        except CephError as exc:
            why = str(exc)
        if why is None:
            return
        time.sleep(interval)
    raise CephError(f"{what}: not within {timeout:g}s: {why}")


# --- keys and OSD ids ----------------------------------------------------------------------


def ensure_entity(c: Cluster, entity: str, caps: dict[str, str]) -> tuple[str, bool]:
    """The key of ``entity``, created with ``caps`` or corrected to them; (key, changed)."""
    flat = [part for svc in sorted(caps) for part in (svc, caps[svc])]
    try:
        found = c.mon("auth get", entity=entity)
    except CephError as exc:
        if exc.errno != 2:  # ENOENT: no such entity yet
            raise
        c.mon("auth get-or-create", entity=entity, caps=flat)
        return str(c.mon("auth get", entity=entity)[0]["key"]), True
    record = found[0]
    if dict(record.get("caps", {})) != caps:
        c.mon("auth caps", entity=entity, caps=flat)
        return str(record["key"]), True
    return str(record["key"]), False


def osd_id(c: Cluster, uuid: str) -> tuple[int, bool]:
    """The id of the OSD with ``uuid``, allocated with ``osd new`` if there is none yet."""
    for osd in c.mon("osd dump")["osds"]:
        if osd.get("uuid") == uuid:
            return int(osd["osd"]), False
    answer = c.mon("osd new", uuid=uuid)
    value = answer.get("osdid") if isinstance(answer, dict) else answer
    return int(str(value).strip()), True


def bootstrap(c: Cluster, spec: dict[str, Any]) -> dict[str, Any]:
    """Keys for ``spec['entities']`` ({entity: caps}), and for every OSD of ``spec['osds']``
    ({uuid: host}) an id and its ``osd.<id>`` key with ``spec['osd_caps']``."""
    changed = False
    keys: dict[str, str] = {}
    ids: dict[str, int] = {}
    for uuid in sorted(spec.get("osds", {})):
        ident, new = osd_id(c, uuid)
        ids[uuid] = ident
        changed |= new
        keys[f"osd.{ident}"], new = ensure_entity(c, f"osd.{ident}", spec["osd_caps"])
        changed |= new
    for entity, caps in sorted(spec.get("entities", {}).items()):
        keys[entity], new = ensure_entity(c, entity, caps)
        changed |= new
    return {"changed": changed, "keys": keys, "osd_ids": ids}


# --- the cluster layout ------------------------------------------------------------------


def _crush_buckets(c: Cluster) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in c.mon("osd crush dump")["buckets"]}


def _stretch_rule_text(name: str, rule_id: int, sites: list[str], per_site: int) -> str:
    steps = "".join(
        f"\tstep take {site}\n\tstep chooseleaf firstn {per_site} type host\n\tstep emit\n"
        for site in sites
    )
    return (
        f"rule {name} {{\n\tid {rule_id}\n\ttype replicated\n\tmin_size 1\n\tmax_size 10\n"
        f"{steps}}}\n"
    )


def add_stretch_rule(c: Cluster, name: str, sites: list[str], per_site: int) -> None:
    """Add a rule putting ``per_site`` copies on distinct hosts of each site (crushtool)."""
    crushtool = shutil.which("crushtool") or "/usr/bin/crushtool"
    rule_id = 1 + max((r["rule_id"] for r in c.mon("osd crush rule dump")), default=-1)
    with tempfile.TemporaryDirectory(prefix="cephctl-crush-") as tmp:
        binary, text, compiled = (Path(tmp) / n for n in ("map.bin", "map.txt", "new.bin"))
        binary.write_bytes(c.mon_raw("osd getcrushmap"))
        subprocess.run([crushtool, "-d", str(binary), "-o", str(text)], check=True, timeout=30)
        text.write_text(text.read_text() + _stretch_rule_text(name, rule_id, sites, per_site))
        done = subprocess.run(
            [crushtool, "-c", str(text), "-o", str(compiled)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise CephError(f"crushtool -c: {done.stderr.strip()}")
        c.mon("osd setcrushmap", inbuf=compiled.read_bytes())


def _mons(c: Cluster) -> dict[str, Any]:
    return c.mon("mon dump")


def _location_of(mon: dict[str, Any]) -> str:
    loc = mon.get("crush_location", "")
    if isinstance(loc, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(loc.items()))
    return str(loc).strip("{}")


def _pools(c: Cluster) -> dict[str, dict[str, Any]]:
    return {p["pool_name"]: p for p in c.mon("osd dump")["pools"]}


def _stretch_enabled(c: Cluster) -> bool:
    return bool(c.mon("osd dump").get("stretch_mode", {}).get("stretch_mode_enabled"))


def health(c: Cluster) -> dict[str, Any]:
    return c.mon("health")


def _pgs_clean(c: Cluster) -> str | None:
    stat = c.mgr("pg stat")
    stat = stat.get("pg_summary", stat)
    states = {s["name"]: s["num"] for s in stat.get("num_pg_by_state", [])}
    total = int(stat.get("num_pgs", 0))
    if total == 0 or states.get("active+clean", 0) != total:
        return f"PGs not all active+clean: {states} of {total}"
    return None


def _healthy(c: Cluster) -> str | None:
    h = health(c)
    if h.get("status") != "HEALTH_OK":
        checks = {k: v.get("summary", {}).get("message") for k, v in h.get("checks", {}).items()}
        return f"{h.get('status')}: {checks}"
    return _pgs_clean(c)


def wait_healthy(c: Cluster, timeout: float) -> None:
    wait_for(lambda: _healthy(c), timeout, "HEALTH_OK with every PG active+clean")


def ensure_data_root(c: Cluster, fs_name: str, path: str, namespace: str, mode: int) -> bool:
    """``path`` on the fs with ``mode`` and its file data in RADOS namespace ``namespace``
    (what the node keys' OSD caps are limited to). Returns whether anything changed."""
    import cephfs  # type: ignore[import-not-found]

    fs = cephfs.LibCephFS(rados_inst=c.rados)
    fs.mount(filesystem_name=fs_name.encode())
    changed = False
    try:
        try:
            st = fs.stat(path.encode())
        except cephfs.ObjectNotFound:
            fs.mkdirs(path.encode(), mode)
            st = fs.stat(path.encode())
            changed = True
        if st.st_mode & 0o7777 != mode:
            fs.chmod(path.encode(), mode)
            changed = True
        attr = "ceph.dir.layout.pool_namespace"
        try:
            current = bytes(fs.getxattr(path.encode(), attr)).decode()
        except cephfs.Error:
            current = ""
        if current != namespace:
            fs.setxattr(path.encode(), attr, namespace.encode(), 0)
            changed = True
    finally:
        fs.shutdown()
    return changed


def setup(c: Cluster, spec: dict[str, Any]) -> dict[str, Any]:
    """The cluster-wide layout, each step only when it is missing: mutes, the connectivity
    election, mon locations, the stretch rule, pools, the file system, stretch mode, the
    data root. Waits for every OSD in its site first and for HEALTH_OK at the end."""
    done: list[str] = []
    timeout = float(spec.get("timeout", 300))
    sites: list[str] = list(spec["sites"])
    osds = int(spec["osds"])

    def osds_placed() -> str | None:
        stat = c.mon("osd stat")
        if int(stat["num_up_osds"]) < osds or int(stat["num_in_osds"]) < osds:
            return f"{stat['num_up_osds']} up / {stat['num_in_osds']} in of {osds} OSDs"
        buckets = _crush_buckets(c)
        missing = [s for s in sites if buckets.get(s, {}).get("type_name") != "datacenter"]
        return f"datacenter buckets missing: {missing}" if missing else None

    wait_for(osds_placed, timeout, "every OSD up and in its datacenter")

    muted = {m.get("code") for m in health(c).get("mutes", [])}
    for code in spec.get("mute", []):
        if code not in muted:
            c.mon("health mute", code=code, sticky=True)
            done.append(f"muted {code}")

    monmap = _mons(c)
    if spec.get("stretch", True) and int(monmap.get("election_strategy", 1)) != 3:
        c.mon("mon set election_strategy", strategy="connectivity")
        done.append("election strategy connectivity")
    for mon in monmap["mons"]:
        want = spec["mon_locations"].get(mon["name"])
        if want is not None and _location_of(mon) != f"datacenter={want}":
            c.mon("mon set_location", name=mon["name"], args=[f"datacenter={want}"])
            done.append(f"mon {mon['name']} in datacenter {want}")

    def mons_located() -> str | None:
        # set_location returns before every mon applied the new monmap, and
        # enable_stretch_mode then failed with "Could not find location entry for
        # datacenter on monitor aws-1" (seen once in the local rollout test).
        for mon in _mons(c)["mons"]:
            want = spec["mon_locations"].get(mon["name"])
            if want is not None and _location_of(mon) != f"datacenter={want}":
                return f"mon {mon['name']} is at {_location_of(mon) or 'no location'} yet"
        return None

    wait_for(mons_located, float(spec.get("timeout", 180)), "the monitors' locations")

    tiebreaker = spec["tiebreaker"]
    # The witness may be far away: it votes, but never leads (as in Ceph's own stretch tests).
    leads = tiebreaker not in str(_mons(c).get("disallowed_leaders", ""))
    if spec.get("stretch", True) and leads and not _stretch_enabled(c):
        c.mon("mon add disallowed_leader", name=tiebreaker)
        done.append(f"mon {tiebreaker} never leader")

    rule = spec["rule"]
    if rule not in c.mon("osd crush rule ls"):
        add_stretch_rule(c, rule, sites, int(spec["copies_per_site"]))
        done.append(f"crush rule {rule}")

    fs_name = spec["fs_name"]
    meta, data = f"cephfs.{fs_name}.meta", f"cephfs.{fs_name}.data"
    for pool in (meta, data):
        if pool not in _pools(c):
            pg_num = int(spec["pg_num"])
            c.mon("osd pool create", pool=pool, pg_num=pg_num, pgp_num=pg_num)
            done.append(f"pool {pool}")
    if not _stretch_enabled(c):  # in stretch mode the mons keep rule and sizes themselves
        rule_id = {r["rule_name"]: r["rule_id"] for r in c.mon("osd crush rule dump")}[rule]
        for pool in (meta, data):
            current = _pools(c)[pool]
            if int(current["crush_rule"]) != int(rule_id):
                c.mon("osd pool set", pool=pool, var="crush_rule", val=rule)
                done.append(f"pool {pool} on {rule}")
            for var in ("size", "min_size"):
                if int(current[var]) != int(spec[var]):
                    c.mon("osd pool set", pool=pool, var=var, val=str(spec[var]))
                    done.append(f"pool {pool} {var} {spec[var]}")
    if fs_name not in {f["name"] for f in c.mon("fs ls")}:
        c.mon("fs new", fs_name=fs_name, metadata=meta, data=data)
        done.append(f"file system {fs_name}")
    if spec.get("stretch", True) and not _stretch_enabled(c):

        def stretch_enabled() -> str | None:
            # A mon that has not applied the located monmap yet answers EINVAL ("Could not
            # find location entry"): asked again, a later one has.
            if _stretch_enabled(c):
                return None
            c.mon(
                "mon enable_stretch_mode", tiebreaker_mon=tiebreaker,
                new_crush_rule=rule, dividing_bucket="datacenter",
            )  # fmt: skip
            return None

        wait_for(stretch_enabled, float(spec.get("timeout", 180)), "stretch mode")
        done.append(f"stretch mode (tiebreaker mon.{tiebreaker})")

    def fs_active() -> str | None:
        for fs in c.mon("fs dump")["filesystems"]:
            if fs["mdsmap"]["fs_name"] == fs_name:
                states = [i["state"] for i in fs["mdsmap"]["info"].values()]
                return None if "up:active" in states else f"MDS states {states}"
        return f"no file system {fs_name}"

    wait_for(fs_active, timeout, f"an active MDS for {fs_name}")
    if ensure_data_root(
        c, fs_name, spec["data_root"], spec["data_namespace"], int(str(spec["data_root_mode"]), 8)
    ):
        done.append(f"data root {spec['data_root']}")
    wait_healthy(c, timeout)
    return {"changed": bool(done), "done": done}


# --- rolling restarts ----------------------------------------------------------------------


def _version(text: str) -> str:
    """``ceph version 16.2.15 (618f...) pacific (stable)`` -> ``16.2.15 (618f...)``."""
    parts = text.split()
    return " ".join(parts[2:4]) if len(parts) >= 4 and parts[:2] == ["ceph", "version"] else text


def running_versions(c: Cluster) -> dict[str, str]:
    """``mon.aws-1`` -> the version that daemon runs (from its metadata)."""
    out: dict[str, str] = {}
    for kind in DAEMON_KINDS:
        for meta in c.mon(f"{kind} metadata"):
            ident = meta.get("name", meta.get("id"))
            if kind == "osd":
                ident = meta.get("id")
            if ident is not None and "ceph_version" in meta:
                out[f"{kind}.{ident}"] = _version(str(meta["ceph_version"]))
    return out


def binary_versions() -> dict[str, str]:
    """The version of each installed daemon binary on this host (no cluster needed)."""
    out: dict[str, str] = {}
    for kind in DAEMON_KINDS:
        path = shutil.which(f"ceph-{kind}")
        if path is None:
            continue
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode == 0:
            out[kind] = _version(done.stdout.strip())
    return out


def local_osds(osd_dir: Path) -> list[int]:
    """The ids of the OSDs whose data directories are below ``osd_dir`` (their whoami)."""
    ids = []
    for whoami in sorted(osd_dir.glob("*/whoami")):
        text = whoami.read_text().strip()
        if text.isdigit():
            ids.append(int(text))
    return sorted(ids)


def _active_mds(c: Cluster) -> list[str]:
    return [
        i["name"]
        for fs in c.mon("fs dump")["filesystems"]
        for i in fs["mdsmap"]["info"].values()
        if i["state"] == "up:active"
    ]


def before_restart(c: Cluster, kind: str, ident: str, timeout: float) -> dict[str, Any]:
    """Wait for HEALTH_OK; then for an OSD set ``noout`` (a restart is not a failure to
    recover from); for the active MDS ``mds fail`` it, so a standby takes over now instead of
    after the beacon grace."""
    wait_healthy(c, timeout)
    done = []
    if kind == "osd":
        c.mon("osd set", key="noout")
        done.append("noout set")
    if kind == "mds" and ident in _active_mds(c):
        c.mon("mds fail", role_or_gid=ident)
        done.append(f"mds.{ident} failed over")
    return {"changed": bool(done), "done": done}


def after_restart(c: Cluster, kind: str, ident: str, timeout: float) -> dict[str, Any]:
    """Wait until the restarted daemon is back (in quorum, up, available), unset ``noout``
    after an OSD, then wait for HEALTH_OK."""

    def back() -> str | None:
        if kind == "mon":
            quorum = c.mon("quorum_status").get("quorum_names", [])
            return None if ident in quorum else f"mon.{ident} not in quorum {quorum}"
        if kind == "osd":
            up = [o["osd"] for o in c.mon("osd dump")["osds"] if o["up"] == 1]
            return None if int(ident) in up else f"osd.{ident} not up"
        if kind == "mgr":
            dump = c.mon("mgr dump")
            names = [dump.get("active_name")] + [s["name"] for s in dump.get("standbys", [])]
            return None if ident in names else f"mgr.{ident} not active or standby ({names})"
        dump = c.mon("fs dump")
        names = [s["name"] for s in dump.get("standbys", [])]
        names += [i["name"] for fs in dump["filesystems"] for i in fs["mdsmap"]["info"].values()]
        return None if ident in names else f"mds.{ident} not in the fs map ({names})"

    wait_for(back, timeout, f"{kind}.{ident} back")
    done = [f"{kind}.{ident} back"]
    if kind == "osd":
        c.mon("osd unset", key="noout")
        done.append("noout unset")
    wait_healthy(c, timeout)
    return {"changed": kind == "osd", "done": done}


# --- command line ------------------------------------------------------------------------


def _load(spec: str) -> dict[str, Any]:
    data = json.loads(Path(spec).read_text() if not spec.lstrip().startswith("{") else spec)
    if not isinstance(data, dict):
        raise CephError("the spec must be a JSON object")
    return data


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cephctl.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--conf", default="/etc/ceph/ceph.conf")
    ap.add_argument("--name", default="client.admin")
    ap.add_argument("--keyring", default="/etc/ceph/ceph.client.admin.keyring")
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("wait-quorum")
    q.add_argument("--mons", type=int, required=True)
    q.add_argument("--timeout", type=float, default=120.0)
    for name in ("bootstrap", "setup"):
        sub.add_parser(name).add_argument("spec", help="a JSON object, or a file holding one")
    h = sub.add_parser("wait-health")
    h.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("running-versions")
    b = sub.add_parser("binary-versions")
    b.add_argument("--osd-dir", type=Path, help="also list the OSDs whose data is below it")
    for name in ("before-restart", "after-restart"):
        r = sub.add_parser(name)
        r.add_argument("kind", choices=DAEMON_KINDS)
        r.add_argument("ident")
        r.add_argument("--timeout", type=float, default=300.0)
    ns = ap.parse_args(argv)
    if ns.command == "binary-versions":
        osds = local_osds(ns.osd_dir) if ns.osd_dir is not None else []
        print(json.dumps({"changed": False, "versions": binary_versions(), "osds": osds}))
        return 0
    try:
        c = Cluster(ns.conf, ns.name, ns.keyring, ns.connect_timeout)
    except CephError as exc:
        print(f"cephctl.py {ns.command}: {exc}", file=sys.stderr)
        return 1
    try:
        result: dict[str, Any]
        if ns.command == "wait-quorum":

            def quorum() -> str | None:
                names = c.mon("quorum_status").get("quorum_names", [])
                return None if len(names) >= ns.mons else f"quorum {names}"

            wait_for(quorum, ns.timeout, f"{ns.mons} monitors in quorum")
            result = {"changed": False}
        elif ns.command == "bootstrap":
            result = bootstrap(c, _load(ns.spec))
        elif ns.command == "setup":
            result = setup(c, _load(ns.spec))
        elif ns.command == "wait-health":
            wait_healthy(c, ns.timeout)
            result = {"changed": False, "health": health(c).get("status")}
        elif ns.command == "running-versions":
            result = {"changed": False, "versions": running_versions(c)}
        elif ns.command == "before-restart":
            result = before_restart(c, ns.kind, ns.ident, ns.timeout)
        else:
            result = after_restart(c, ns.kind, ns.ident, ns.timeout)
    except (CephError, subprocess.SubprocessError, OSError) as exc:
        print(f"cephctl.py {ns.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        c.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
