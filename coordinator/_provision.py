"""Broker accounts for devices and the coordinator (``fedasync-coordinator provision-device``).

Each device logs in to Mosquitto with username = its device id and a random password; the
shipped ACL (deploy/mosquitto/fedasync.acl) then confines it to its own topics. Provisioning:

1. checks the name (the device-id rules of the wire format: 1-64 of ``A-Z a-z 0-9 _ . -``),
2. generates a strong random password (256 bits, URL-safe so it fits in a broker URL as is),
3. adds or replaces the name in the Mosquitto password file, keeping every other line,
4. renders the agent's TOML config (or, for the coordinator, a systemd EnvironmentFile) with
   the credentials, written with mode 0600.

The password file entry is written from Python in Mosquitto 2.0's own format,
``name:$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512 over the UTF-8
password with a 12-byte random salt, 101 iterations (mosquitto_passwd's default; the password is
256 random bits, so the iteration count adds nothing against guessing but costs the broker CPU
on every CONNECT). Writing it ourselves rather than running ``mosquitto_passwd -b`` keeps the
password off a command line (readable by every local user in /proc) and makes the update atomic
(temp file, fsync, rename; mosquitto_passwd rewrites the file in place), and provisioning works on
a machine without Mosquitto. tests/test_deploy.py proves Mosquitto accepts these entries and that
entries written by mosquitto_passwd are kept and still work.

Mosquitto reads the file only at start and on SIGHUP (``systemctl reload mosquitto``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fedasync_iot.models import (
    BrokerAddress,
    ConfigError,
    Topics,
    WireError,
    atomic_write,
    broker_urls,
    validate_id,
)

PBKDF2_ITERATIONS = 101  # Mosquitto 2.0's PW_DEFAULT_ITERATIONS
SALT_BYTES = 12  # Mosquitto 2.0's SALT_LEN
COORDINATOR_USER = "coordinator"  # the `user` block of deploy/mosquitto/fedasync.acl
DEFAULT_PASSWD_FILE = "/etc/mosquitto/fedasync.passwd"  # noqa: S105 - a path
# Where the agent looks for things on the device (deploy/raspberry-pi/install.sh, the unit).
DEVICE_CA_FILE = "/etc/fedasync/ca.crt"
DEVICE_STATE_DIR = "/var/lib/fedasync-agent"
ROLES = ("device", "coordinator")


def generate_password() -> str:
    """256 random bits in URL-safe base64: no character needs quoting in a broker URL."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """The password-file hash Mosquitto 2.0 writes: ``$7$<iterations>$<salt>$<hash>``."""
    if iterations < 1:
        raise ConfigError("iterations must be >= 1")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches a ``$7$`` (PBKDF2-SHA512) hash; False for any other form."""
    parts = encoded.strip().split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def _line_user(line: str) -> str | None:
    """The username of a password-file line (Mosquitto splits at the first ':')."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    return line.split(":", 1)[0].strip()


def read_users(path: Path) -> dict[str, str]:
    """username -> hash of every entry in a Mosquitto password file."""
    users: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            user = _line_user(line)
            if user:
                users[user] = line.split(":", 1)[1].strip() if ":" in line else ""
    return users


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory, so two provisioning runs never interleave."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mosquitto_gid() -> int | None:
    """The mosquitto group's id when we run as root and it exists (the broker reads as it)."""
    if os.geteuid() != 0:
        return None
    try:
        import grp

        return grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return None


def write_file_atomic(path: Path, data: bytes, *, mode: int, like: Path | None = None,
                      gid: int | None = None) -> None:
    """Write `data` to `path` atomically (`models._files.atomic_write`: fsync'd, renamed).

    The new file gets `mode`, or the mode and owner of `like` when that file exists (replacing
    /etc/mosquitto/fedasync.passwd must not make it unreadable to the broker).
    """
    try:
        st = os.stat(like) if like is not None else None
    except FileNotFoundError:
        st = None
    if st is None:
        atomic_write(path, data, mode=mode, owner=None if gid is None else (-1, gid))
        return
    keep = (st.st_uid, st.st_gid)
    try:
        atomic_write(path, data, mode=st.st_mode & 0o7777,
                     owner=None if keep == (os.geteuid(), os.getegid()) else keep)
    except PermissionError as exc:
        if exc.filename is not None:  # the directory or the rename, not the chown
            raise
        raise ConfigError(f"cannot keep the owner of {like} (uid {st.st_uid}, gid "
                          f"{st.st_gid}): run as root or as its owner") from exc


def set_password(path: Path, username: str, password: str, *,
                 iterations: int = PBKDF2_ITERATIONS) -> bool:
    """Add `username` to the password file or replace its entry; True when it was new.

    Every other line is kept byte for byte. A new file is created 0640 (group mosquitto when run
    as root), an existing one keeps its mode and owner.
    """
    if not username or ":" in username or any(c in username for c in "\r\n"):
        raise ConfigError(f"invalid broker username {username!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"directory {path.parent} does not exist (is Mosquitto installed?)")
    entry = f"{username}:{hash_password(password, iterations=iterations)}"
    try:
        with _locked_dir(path.parent):
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            out: list[str] = []
            found = False
            for line in lines:
                if _line_user(line) == username:
                    if not found:
                        out.append(entry)
                    found = True  # a duplicate entry of the same user is dropped
                else:
                    out.append(line)
            if not found:
                out.append(entry)
            write_file_atomic(path, ("\n".join(out) + "\n").encode(), mode=0o640, like=path,
                              gid=_mosquitto_gid())
    except OSError as exc:
        raise ConfigError(f"cannot update the password file {path}: {exc}") from exc
    return not found


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these values)."""
    return json.dumps(value)


def _validate_name(name: str, role: str) -> str:
    try:
        validate_id(name, "name")
    except WireError as exc:
        raise ConfigError(str(exc).replace("name must", "the device name must"),
                          key="name") from exc
    if role == "device" and name == COORDINATOR_USER:
        raise ConfigError(f"{COORDINATOR_USER!r} is the coordinator's account; give the device "
                          "another name, or use --role coordinator", key="name")
    return name


def broker_with_credentials(broker: str, username: str, password: str) -> str:
    """`broker` (``mqtt[s]://host[:port]``, no credentials) with ``user:password@`` added."""
    address = BrokerAddress.parse(broker)
    if address.username is not None or address.password is not None:
        raise ConfigError("give --broker without credentials; provisioning adds them",
                          key="broker")
    host = f"[{address.host}]" if ":" in address.host else address.host
    scheme = "mqtts" if address.tls else "mqtt"
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{address.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Provisioned:
    """What one provisioning did: the account, its config text and where things went."""

    name: str
    role: str
    password: str
    broker_url: str  # with credentials; several comma-separated (a cluster's nodes)
    config_text: str  # agent TOML (device) or systemd EnvironmentFile (coordinator)
    config_path: Path | None
    passwd_file: Path
    added: bool  # False: an existing entry's password was replaced


def agent_config_toml(*, device_id: str, broker_url: str, fleet: str, ca_file: str | None,
                      public_keys: Sequence[str]) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# fedasync-agent config for device {device_id}, made by "
        f"`fedasync-coordinator provision-device` on {stamp}.",
        "# It holds the device's broker password: install it on the device as "
        "/etc/fedasync/agent.toml,",
        "# mode 0640, owner root, group fedasync-agent "
        "(deploy/raspberry-pi/install.sh --config FILE does that).",
        f"device_id = {_toml_str(device_id)}",
        "broker = " + (_toml_str(broker_url) if "," not in broker_url else  # failover list
                       "[" + ", ".join(_toml_str(u) for u in broker_url.split(",")) + "]"),
    ]
    if ca_file:
        lines.append(f"ca_file = {_toml_str(ca_file)}  # the fleet CA (make-certs.sh: ca.crt)")
    lines += [
        f"fleet = {_toml_str(fleet)}",
        f"state_dir = {_toml_str(DEVICE_STATE_DIR)}  # the unit passes --state-dir too",
        f"data = {_toml_str(DEVICE_STATE_DIR + '/data')}  # training data: .csv/.npz files",
    ]
    if public_keys:
        keys = ", ".join(_toml_str(k) for k in public_keys)
        lines.append(f"coordinator_public_keys = [{keys}]  # refuse models not signed by these")
    else:
        lines.append('# coordinator_public_keys = ["/etc/fedasync/coordinator.pub"]  '
                     "# refuse unsigned models")
    return "\n".join(lines) + "\n"


def coordinator_env(*, broker_url: str, ca_file: str | None) -> str:
    lines = [
        "# fedasync-coordinator broker credentials (systemd EnvironmentFile, mode 0600, root).",
        "# FEDASYNC_* variables override the TOML config; see deploy/systemd.",
        f"FEDASYNC_BROKER={broker_url}",
    ]
    if ca_file:
        lines.append(f"FEDASYNC_CA_FILE={ca_file}")
    return "\n".join(lines) + "\n"


def provision(
    name: str,
    *,
    role: str = "device",
    passwd_file: Path = Path(DEFAULT_PASSWD_FILE),
    broker: str | None = None,
    fleet: str = "default",
    ca_file: str | None = None,
    public_keys: Sequence[str] = (),
    out_dir: Path | None = None,
    password: str | None = None,
) -> Provisioned:
    """Create or reset the broker account `name` and render the config that uses it."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}", key="role")
    _validate_name(name, role)
    Topics(fleet)  # validates the fleet name
    if broker is None:
        broker = ("mqtt://127.0.0.1:1883" if role == "coordinator"
                  else f"mqtts://{socket.getfqdn()}:8883")
    urls = broker_urls(broker)  # several: a cluster's nodes, each with the same account
    schemes = {BrokerAddress.parse(u).tls for u in urls}
    if len(schemes) != 1:
        raise ConfigError("give --broker URLs of one scheme (all mqtts:// or all mqtt://): "
                          "the client has one CA setting for all of them", key="broker")
    tls = schemes.pop()
    if tls and ca_file is None and role == "device":
        ca_file = DEVICE_CA_FILE
    if not tls:
        ca_file = None
    password = generate_password() if password is None else password
    url = ",".join(broker_with_credentials(u, name, password) for u in urls)
    if role == "device":
        text = agent_config_toml(device_id=name, broker_url=url, fleet=fleet, ca_file=ca_file,
                                 public_keys=public_keys)
        file_name = f"{name}.toml"
    else:
        text = coordinator_env(broker_url=url, ca_file=ca_file)
        file_name = f"{name}.env"
    # The account first: a config whose password the broker does not know is worse than none.
    added = set_password(Path(passwd_file), name, password)
    path = None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / file_name
            write_file_atomic(path, text.encode(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write the config to {out_dir}: {exc}") from exc
    return Provisioned(name=name, role=role, password=password, broker_url=url,
                       config_text=text, config_path=path, passwd_file=Path(passwd_file),
                       added=added)


# -- CLI (fedasync-coordinator provision-device) ---------------------------------------------

def add_provision_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "provision-device",
        help="create or reset a device's (or the coordinator's) broker account",
        description="Generate a random password, add/replace NAME in the Mosquitto password "
                    "file (atomically, other entries kept) and print the agent config that "
                    "uses it (with --out also write it, mode 0600). Then reload Mosquitto: "
                    "systemctl reload mosquitto.")
    p.add_argument("name", help="device id (= MQTT username), or 'coordinator' with --role")
    p.add_argument("--role", choices=ROLES, default="device",
                   help="device (default): agent TOML; coordinator: an EnvironmentFile with "
                        "FEDASYNC_BROKER for fedasync-coordinator.service")
    p.add_argument("--passwd", type=Path, default=Path(DEFAULT_PASSWD_FILE),
                   help=f"Mosquitto password file (default {DEFAULT_PASSWD_FILE})")
    p.add_argument("--broker", help="broker URL as the client will see it, without "
                                    "credentials (default: mqtts://<this host's FQDN>:8883 for "
                                    "a device, mqtt://127.0.0.1:1883 for the coordinator); "
                                    "several, comma-separated, for a cluster's nodes: the "
                                    "config lists them all to fail over between")
    p.add_argument("--fleet", default="default", help="fleet name (default: default)")
    p.add_argument("--ca-file", help=f"CA path on the client for mqtts:// (device default "
                                     f"{DEVICE_CA_FILE})")
    p.add_argument("--public-key", action="append", default=[], metavar="PATH",
                   help="coordinator public key path on the device (repeatable), e.g. "
                        "/etc/fedasync/coordinator.pub")
    p.add_argument("--out", type=Path, help="also write NAME.toml / NAME.env here (mode 0600)")
    p.set_defaults(func=_cli, log_level="WARNING", log_format="text")


def _cli(args: argparse.Namespace) -> int:
    if args.role == "coordinator" and args.name != COORDINATOR_USER:
        print(f"warning: the shipped ACL grants coordinator rights to user "
              f"{COORDINATOR_USER!r} only; add a `user {args.name}` block for this account",
              file=sys.stderr)
    result = provision(args.name, role=args.role, passwd_file=args.passwd, broker=args.broker,
                       fleet=args.fleet, ca_file=args.ca_file,
                       public_keys=tuple(args.public_key), out_dir=args.out)
    sys.stdout.write(result.config_text)
    sys.stdout.flush()
    done = "added" if result.added else "replaced the password of"
    where = "to" if result.added else "in"
    print(f"\n{done} {result.name!r} {where} {result.passwd_file}", file=sys.stderr)
    if result.config_path is not None:
        print(f"wrote {result.config_path} (mode 0600)", file=sys.stderr)
    if result.role == "device":
        print("on the device: install it as /etc/fedasync/agent.toml (install.sh --config "
              "FILE), next to the fleet CA and the coordinator's public key", file=sys.stderr)
    else:
        print("install it as /etc/fedasync/coordinator.env (mode 0600, root): "
              "fedasync-coordinator.service reads it", file=sys.stderr)
    print("then make Mosquitto reread the password file: systemctl reload mosquitto "
          "(or kill -HUP <mosquitto pid>)", file=sys.stderr)
    return 0
