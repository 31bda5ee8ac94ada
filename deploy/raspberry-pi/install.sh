#!/usr/bin/env bash
# Install the fedasync-iot agent on a Raspberry Pi (64-bit Raspberry Pi OS) or any Debian-like
# Linux: a venv under --prefix, /etc/fedasync/agent.toml, a system user and the systemd unit.
#
#   sudo deploy/raspberry-pi/install.sh --config pi-01.toml          # from provision-device
#   sudo deploy/raspberry-pi/install.sh --device-id pi-01 \
#        --broker 'mqtts://pi-01:PASSWORD@broker.lan:8883' --ca-file /etc/fedasync/ca.crt \
#        --public-key /etc/fedasync/coordinator.pub
#   sudo deploy/raspberry-pi/install.sh --upgrade [--source PATH_OR_SPEC]   # newer version
#
# Idempotent: a second run with the same arguments changes nothing. An existing agent.toml is
# never overwritten, an installed package is kept unless --upgrade.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/../.." && pwd)

usage() {
    cat <<EOF
Usage: install.sh [options]

Where things go:
  --prefix DIR           install root (default /opt/fedasync-agent); the venv is DIR/venv
  --source PATH_OR_SPEC  what to pip install: a checkout or wheel/sdist path (installed with the
                         [agent] extra), or a full requirement such as 'fedasync-iot[agent]==0.1.0'
                         (default: the checkout this script is in, $repo_dir)
  --python PY            Python >= 3.10 to build the venv from (default python3)
  --user NAME            system user of the service (default fedasync-agent)
  --no-systemd           no user, no unit, no root needed: config goes to DIR/etc/agent.toml
                         and state to DIR/state (for a manual run, or a test)

The config (written only if it does not exist yet):
  --config FILE          install this agent TOML (from fedasync-coordinator provision-device)
  --device-id ID         or build it from these: the device id (= broker username)
  --broker URL           mqtts://ID:PASSWORD@HOST:8883
  --fleet NAME           fleet name (default "default")
  --ca-file PATH         the fleet CA on this device, e.g. /etc/fedasync/ca.crt
  --public-key PATH      the coordinator's public key on this device (repeatable)
  --data DIR             training data directory (default STATE/data)

pip:
  --upgrade              reinstall/upgrade the package even if it is installed (then restart)
  --pip-args 'ARGS'      extra pip arguments, e.g. '--no-index --find-links /media/usb/wheels'
  --system-site-packages give the venv access to the system's packages (e.g. apt's numpy)
  --no-pip               create the venv but install nothing into it (tests)
EOF
}

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $1" >&2; exit "${2:-2}"; }

prefix=/opt/fedasync-agent
source_spec=""
python=python3
svc_user=fedasync-agent
systemd=1
config_file=""
device_id=""
broker=""
fleet=default
ca_file=""
public_keys=()
data_dir=""
upgrade=0
pip_args=""
site_packages=0
no_pip=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix|--source|--python|--user|--config|--device-id|--broker|--fleet|--ca-file|\
        --public-key|--data|--pip-args)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --prefix) prefix=$2 ;;
                --source) source_spec=$2 ;;
                --python) python=$2 ;;
                --user) svc_user=$2 ;;
                --config) config_file=$2 ;;
                --device-id) device_id=$2 ;;
                --broker) broker=$2 ;;
                --fleet) fleet=$2 ;;
                --ca-file) ca_file=$2 ;;
                --public-key) public_keys+=("$2") ;;
                --data) data_dir=$2 ;;
                --pip-args) pip_args=$2 ;;
            esac
            shift 2 ;;
        --no-systemd) systemd=0; shift ;;
        --upgrade) upgrade=1; shift ;;
        --system-site-packages) site_packages=1; shift ;;
        --no-pip) no_pip=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# --- can this machine run the agent? ------------------------------------------------------------
refuse_32bit() {
    die "this is a 32-bit ARM system ($1). onnxruntime publishes no wheels for 32-bit ARM, so the
agent cannot run here. Install Raspberry Pi OS (64-bit) (Raspberry Pi 3, 4, 5, Zero 2 W, 400)
and run this script again." 3
}
# FEDASYNC_FAKE_ARCH is for tests only: it stands in for `uname -m` and the Python's word size.
arch=${FEDASYNC_FAKE_ARCH:-$(uname -m)}
case "$arch" in
    armv6l|armv7l|armv8l|armhf|arm) refuse_32bit "uname -m: $arch" ;;
    aarch64|arm64|x86_64|amd64) ;;
    *) say "warning: untested architecture $arch; continuing" ;;
esac

command -v "$python" >/dev/null 2>&1 || die "no $python: install Python >= 3.10 (apt-get install python3 python3-venv)"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    found=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")
    die "the agent needs Python >= 3.10; $python is $found (Raspberry Pi OS 12 \"bookworm\" has 3.11)"
fi
if [ -z "${FEDASYNC_FAKE_ARCH:-}" ]; then
    # A 64-bit kernel under a 32-bit userland reports aarch64: the Python's word size tells.
    bits=$("$python" -c 'import struct; print(struct.calcsize("P") * 8)')
    case "$arch:$bits" in arm*:32|aarch64:32) refuse_32bit "$arch kernel, 32-bit userland" ;; esac
fi
"$python" -c 'import venv' 2>/dev/null || die "Python's venv module is missing: apt-get install python3-venv"
if [ "$no_pip" = 0 ]; then
    "$python" -c 'import ensurepip' 2>/dev/null || die "Python's ensurepip is missing: apt-get install python3-venv"
fi

# --- where things go ------------------------------------------------------------------------------
case "$prefix" in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
venv=$prefix/venv
if [ "$systemd" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "installing the service needs root: run with sudo (or pass --no-systemd)"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: pass --no-systemd and start the agent yourself"
    conf_dir=/etc/fedasync
    state_dir=/var/lib/fedasync-agent
    unit_src=$script_dir/../systemd/fedasync-agent.service
    [ -f "$unit_src" ] || die "missing $unit_src (run the script from a fedasync-iot checkout)"
else
    conf_dir=$prefix/etc
    state_dir=$prefix/state
fi
data_dir=${data_dir:-$state_dir/data}
conf=$conf_dir/agent.toml
changed=0

# --- system user ----------------------------------------------------------------------------------
if [ "$systemd" = 1 ]; then
    if id -u "$svc_user" >/dev/null 2>&1; then
        say "kept     user $svc_user"
    else
        useradd --system --user-group --home-dir "$state_dir" --no-create-home \
            --shell /usr/sbin/nologin --comment "fedasync-iot agent" "$svc_user"
        say "created  user $svc_user"
    fi
fi

# --- venv and package -------------------------------------------------------------------------------
mkdir -p "$prefix"
if [ -x "$venv/bin/python" ]; then
    say "kept     venv $venv"
else
    venv_args=()
    [ "$site_packages" = 1 ] && venv_args+=(--system-site-packages)
    [ "$no_pip" = 1 ] && venv_args+=(--without-pip)
    "$python" -m venv ${venv_args[@]+"${venv_args[@]}"} "$venv"
    say "created  venv $venv"
    changed=1
fi

installed_version() {
    "$venv/bin/python" -I -c 'import importlib.metadata as m; print(m.version("fedasync-iot"))' 2>/dev/null || true
}
if [ "$no_pip" = 1 ]; then
    say "skipped  pip install (--no-pip)"
else
    current=$(installed_version)
    if [ -n "$current" ] && [ "$upgrade" = 0 ]; then
        say "kept     fedasync-iot $current (pass --upgrade to reinstall)"
    else
        if [ -z "$source_spec" ]; then
            [ -f "$repo_dir/pyproject.toml" ] || die "no --source given and $repo_dir is not a fedasync-iot checkout"
            source_spec=$repo_dir
        fi
        if [ -e "$source_spec" ]; then
            requirement="${source_spec}[agent]"  # a checkout, wheel or sdist: add the extra
        else
            requirement=$source_spec  # a requirement spec: used as given
        fi
        say "installing $requirement into $venv (a few minutes on a Pi)"
        # shellcheck disable=SC2086  # pip_args is a list of words on purpose
        "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade $pip_args "$requirement"
        "$venv/bin/fedasync-agent" --help >/dev/null || die "the installed fedasync-agent does not run"
        "$venv/bin/python" -I -c 'import onnxruntime, sklearn, psutil' \
            || die "the agent's dependencies (onnxruntime, scikit-learn, psutil) do not import"
        say "installed fedasync-iot $(installed_version)"
        changed=1
    fi
fi

# --- config ---------------------------------------------------------------------------------------
check_config() {  # the agent's own loader, when the package is installed
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -I -c 'import fedasync_iot.agent' 2>/dev/null; then
        "$venv/bin/python" -I -c 'import sys; from pathlib import Path; from fedasync_iot.agent import load_config; load_config(Path(sys.argv[1]))' "$1" \
            || die "$2 is not a valid agent config (see the message above)"
    fi
}
toml_str() {  # a TOML basic string; refuses what would need escaping
    case "$1" in *'"'*|*\\*|*$'\n'*|*$'\r'*|*$'\t'*) die "unsupported character in: $1" ;; esac
    printf '"%s"' "$1"
}
install -d -m 0755 "$conf_dir"
if [ -e "$conf" ]; then
    check_config "$conf" "$conf"
    say "kept     $conf (existing; edit it, or remove it to write a new one)"
else
    tmp=$(mktemp "$conf_dir/.agent.toml.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    if [ -n "$config_file" ]; then
        [ -f "$config_file" ] || die "--config $config_file does not exist"
        cat "$config_file" > "$tmp"
    else
        [ -n "$device_id" ] || die "no $conf yet: give --config FILE, or --device-id and --broker"
        [ -n "$broker" ] || die "no $conf yet: give --broker mqtts://ID:PASSWORD@HOST:8883 too"
        if ! [[ $device_id =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || [ "$device_id" = . ] || [ "$device_id" = .. ]; then
            die "--device-id must be 1-64 characters of A-Z a-z 0-9 _ . -"
        fi
        [[ $fleet =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "--fleet must be 1-64 characters of A-Z a-z 0-9 _ . -"
        case "$broker" in mqtt://*|mqtts://*) ;; *) die "--broker must start with mqtt:// or mqtts://" ;; esac
        case "$broker" in mqtt://*) say "warning: --broker is not TLS (mqtts://): the password crosses the network in clear" ;; esac
        {
            echo "# fedasync-agent config, written by deploy/raspberry-pi/install.sh"
            echo "device_id = $(toml_str "$device_id")"
            echo "broker = $(toml_str "$broker")"
            [ -n "$ca_file" ] && echo "ca_file = $(toml_str "$ca_file")"
            echo "fleet = $(toml_str "$fleet")"
            echo "state_dir = $(toml_str "$state_dir")"
            echo "data = $(toml_str "$data_dir")"
            if [ ${#public_keys[@]} -gt 0 ]; then
                keys=""
                for k in "${public_keys[@]}"; do keys="$keys${keys:+, }$(toml_str "$k")"; done
                echo "coordinator_public_keys = [$keys]"
            else
                echo '# coordinator_public_keys = ["/etc/fedasync/coordinator.pub"]  # refuse unsigned models'
            fi
        } > "$tmp"
    fi
    if [ "$systemd" = 1 ]; then
        chown "root:$svc_user" "$tmp"
        chmod 0640 "$tmp"
    else
        chmod 0600 "$tmp"
    fi
    check_config "$tmp" "${config_file:-the config from these arguments}"
    mv "$tmp" "$conf"
    trap - EXIT
    say "wrote    $conf (it holds the broker password: mode $( [ "$systemd" = 1 ] && echo "0640 root:$svc_user" || echo 0600 ))"
    changed=1
fi
# Files the config names (the CA, the public keys) must be on this device before the agent runs.
named=$(grep -E '^[[:space:]]*(ca_file|coordinator_public_keys)[[:space:]]*=' "$conf" \
    | grep -oE '"[^"]+"' | tr -d '"' || true)
while IFS= read -r f; do
    [ -z "$f" ] || [ -e "$f" ] || say "warning: $f (named in $conf) does not exist yet: copy it here"
done <<< "$named"

# --- state and data directories -------------------------------------------------------------------
if [ "$systemd" = 1 ]; then
    install -d -m 0750 -o "$svc_user" -g "$svc_user" "$state_dir"
    install -d -m 0750 -o "$svc_user" -g "$svc_user" "$data_dir"
else
    mkdir -p "$state_dir" "$data_dir"
fi

# --- systemd unit ---------------------------------------------------------------------------------
if [ "$systemd" = 1 ]; then
    unit=/etc/systemd/system/fedasync-agent.service
    rendered=$(sed -e "s#/opt/fedasync-agent#$prefix#g" -e "s#^User=fedasync-agent#User=$svc_user#" \
        -e "s#^Group=fedasync-agent#Group=$svc_user#" "$unit_src")
    if [ -f "$unit" ] && [ "$(cat "$unit")" = "$rendered" ]; then
        say "kept     $unit"
    else
        printf '%s\n' "$rendered" > "$unit"
        systemctl daemon-reload
        say "wrote    $unit"
        changed=1
    fi
    systemctl enable --quiet fedasync-agent.service
    if [ "$changed" = 1 ]; then
        systemctl restart fedasync-agent.service
        say "(re)started fedasync-agent: journalctl -u fedasync-agent -f"
    else
        systemctl start fedasync-agent.service
        say "nothing changed; fedasync-agent is enabled and started"
    fi
else
    say "no systemd unit (--no-systemd); run the agent with:"
    say "  $venv/bin/fedasync-agent --config $conf --state-dir $state_dir run"
fi
say "put training data (.csv with a label column, or .npz) in $data_dir"
