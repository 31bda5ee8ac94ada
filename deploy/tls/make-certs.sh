#!/usr/bin/env bash
# A private CA and the broker's TLS certificate for a fedasync-iot fleet (openssl CLI).
#
# Meant for testing and small fleets that trust one broker: the CA key signs everything, so keep
# ca.key offline (or at least off the broker) once the server certificate is made. Bigger
# deployments should issue from their own PKI; Mosquitto only needs ca.crt/server.crt/server.key.
#
#   deploy/tls/make-certs.sh --host broker.example.lan [--ip 192.168.1.10] [--out DIR]
#                            [--client NAME ...] [--days N] [--renew] [--no-localhost]
#
# Idempotent: an existing CA is reused (devices keep trusting it), an existing server or client
# certificate is kept unless --renew. Keys are EC P-256, written with mode 0600.
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --host NAME      DNS name of the broker (repeatable; the first is also the CN)
  --ip ADDR        IP address of the broker (repeatable)
  --out DIR        output directory (default: ./fedasync-certs)
  --client NAME    also issue a client certificate CN=NAME (repeatable; for require_certificate)
  --days N         validity of server/client certificates (default 825; the CA gets 3650)
  --renew          reissue the server/client certificates even if they exist (CA kept)
  --no-localhost   leave localhost / 127.0.0.1 / ::1 out of the server certificate
EOF
}

die() { echo "make-certs: $*" >&2; exit 2; }

out=./fedasync-certs
days=825
renew=0
localhost=1
hosts=()
ips=()
clients=()
while [ $# -gt 0 ]; do
    case "$1" in
        --host) [ $# -ge 2 ] || die "--host needs a value"; hosts+=("$2"); shift 2 ;;
        --ip) [ $# -ge 2 ] || die "--ip needs a value"; ips+=("$2"); shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
        --client) [ $# -ge 2 ] || die "--client needs a value"; clients+=("$2"); shift 2 ;;
        --days) [ $# -ge 2 ] || die "--days needs a value"; days=$2; shift 2 ;;
        --renew) renew=1; shift ;;
        --no-localhost) localhost=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

command -v openssl >/dev/null 2>&1 || die "openssl is not installed (apt-get install openssl)"
case "$days" in ''|*[!0-9]*) die "--days must be a number of days" ;; esac
name_re='^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$'
for h in ${hosts[@]+"${hosts[@]}"}; do
    [[ $h =~ $name_re ]] || die "--host $h is not a DNS name"
done
for a in ${ips[@]+"${ips[@]}"}; do
    [[ $a =~ ^[0-9A-Fa-f.:]+$ ]] || die "--ip $a is not an IP address"
done
for c in ${clients[@]+"${clients[@]}"}; do
    [[ $c =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "--client $c: use 1-64 of A-Z a-z 0-9 _ . -"
done
if [ ${#hosts[@]} -eq 0 ] && [ ${#ips[@]} -eq 0 ]; then
    [ "$localhost" = 1 ] || die "give --host and/or --ip (the name devices use for the broker)"
    echo "make-certs: no --host/--ip given: the certificate is good for localhost only" >&2
fi

mkdir -p "$out" "$out/clients"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# --- CA -----------------------------------------------------------------------------------------
if [ -s "$out/ca.key" ] && [ -s "$out/ca.crt" ]; then
    echo "kept     $out/ca.crt (existing CA)"
else
    newkey "$out/ca.key"
    cat > "$work/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[dn]
CN = fedasync-iot fleet CA
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl req -x509 -new -config "$work/ca.cnf" -key "$out/ca.key" -sha256 -days 3650 \
        -set_serial "$(serial)" -out "$out/ca.crt"
    chmod 0644 "$out/ca.crt"
    echo "created  $out/ca.crt and $out/ca.key (private CA, 10 years)"
fi

# sign NAME CN EXTENSIONS: $out/NAME.key + $out/NAME.crt signed by the CA
sign() {
    local base=$1 cn=$2 ext=$3
    newkey "$base.key"
    openssl req -new -key "$base.key" -subj "/CN=$cn" -out "$work/req.csr"
    printf '%s\n' "$ext" > "$work/ext.cnf"
    openssl x509 -req -in "$work/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -set_serial "$(serial)" -sha256 -days "$days" -extfile "$work/ext.cnf" -extensions ext \
        -out "$base.crt" 2>/dev/null
    chmod 0644 "$base.crt"
}

# --- server -----------------------------------------------------------------------------------
san=()
for h in ${hosts[@]+"${hosts[@]}"}; do san+=("DNS:$h"); done
for a in ${ips[@]+"${ips[@]}"}; do san+=("IP:$a"); done
if [ "$localhost" = 1 ]; then san+=("DNS:localhost" "IP:127.0.0.1" "IP:::1"); fi
san_list=$(IFS=,; echo "${san[*]}")
cn=${hosts[0]:-${ips[0]:-localhost}}
if [ "$renew" = 0 ] && [ -s "$out/server.key" ] && [ -s "$out/server.crt" ]; then
    echo "kept     $out/server.crt (existing; --renew to reissue)"
else
    sign "$out/server" "$cn" "[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san_list
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always"
    echo "created  $out/server.crt and $out/server.key (CN=$cn, $san_list, $days days)"
fi

# --- clients (optional) -----------------------------------------------------------------------
for c in ${clients[@]+"${clients[@]}"}; do
    if [ "$renew" = 0 ] && [ -s "$out/clients/$c.key" ] && [ -s "$out/clients/$c.crt" ]; then
        echo "kept     $out/clients/$c.crt"
        continue
    fi
    sign "$out/clients/$c" "$c" "[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always"
    echo "created  $out/clients/$c.crt and $out/clients/$c.key (CN=$c)"
done

openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null \
    || die "the server certificate does not verify against the CA"

cat <<EOF

Files are in $out. On the broker host:
  install -d -m 0755 /etc/mosquitto/certs
  install -m 0644 $out/ca.crt $out/server.crt /etc/mosquitto/certs/
  install -m 0640 -o root -g mosquitto $out/server.key /etc/mosquitto/certs/server.key
  systemctl reload mosquitto      # Mosquitto rereads certfile/keyfile on SIGHUP
On each device: copy $out/ca.crt to /etc/fedasync/ca.crt (the agent's ca_file).
Keep $out/ca.key off the broker and the devices.
EOF
