#!/usr/bin/env bash
# Measures provline against its references in one run on this machine and
# prints ratios (the machine is shared, so absolute figures drift; ratios
# taken back to back hold):
#   1. provline batch vs the AWS guide's openssl command-line flow
#      (one process per step per device), P-256 devices per second;
#   2. provline bench scaling on 2 threads vs `openssl speed -multi 2 ecdsap256`.
# Usage: benches/compare.sh [OPENSSL_DEVICES] [PROVLINE_DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
openssl_n=${1:-100}
provline_n=${2:-50000}
cargo build --release --quiet
bin=target/release/provline
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The AWS guide's flow, one device at a time, with the extensions a device
# certificate needs (plain `x509 -req` would make a v1 certificate).
mkdir -p "$work/ossl"
openssl ecparam -name prime256v1 -genkey -noout -out "$work/ossl/ca.key"
openssl req -x509 -new -key "$work/ossl/ca.key" -sha256 -days 3650 -subj "/CN=compare CA" -out "$work/ossl/ca.pem" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' > "$work/ossl/ext.cnf"
start=$(date +%s.%N)
for i in $(seq 1 "$openssl_n"); do
  d="$work/ossl/dev$i"; mkdir "$d"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/private.key"
  openssl req -new -key "$d/private.key" -subj "/CN=sensor_$i/serialNumber=SN-$i" -out "$d/device.csr"
  openssl x509 -req -in "$d/device.csr" -CA "$work/ossl/ca.pem" -CAkey "$work/ossl/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$work/ossl/ext.cnf" -out "$d/cert.pem" 2>/dev/null
done
end=$(date +%s.%N)
ossl_rate=$(echo "$openssl_n / ($end - $start)" | bc -l)

# provline batch over a job of the same kind of devices.
{ echo serial; seq -f 'SN-%08.0f' 1 "$provline_n"; } > "$work/job.csv"
"$bin" ca init --dir "$work/ca" -q
prov_json=$("$bin" batch "$work/job.csv" --ca "$work/ca" --out "$work/out" --json)
prov_rate=$(echo "$prov_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices_per_sec"])')

printf 'openssl CLI flow: %8.1f devices/s (%d devices)\n' "$ossl_rate" "$openssl_n"
printf 'provline batch:   %8.1f devices/s (%d devices)\n' "$prov_rate" "$provline_n"
printf 'ratio provline/openssl CLI: %.0fx\n' "$(echo "$prov_rate / $ossl_rate" | bc -l)"

# Scaling on two threads: provline against openssl's own.
speed() { openssl speed "$@" ecdsap256 2>/dev/null | awk '/256 bits ecdsa \(nistp256\)/ {print $(NF-1)}'; }
o1=$(speed -seconds 3); o2=$(speed -seconds 3 -multi 2)
p1=$("$bin" bench --threads 1 --count 4000 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["certs_per_sec"])')
p2=$("$bin" bench --threads 2 --count 4000 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["certs_per_sec"])')
os=$(echo "$o2 / $o1" | bc -l); ps=$(echo "$p2 / $p1" | bc -l)
printf 'openssl speed ecdsap256 sign: 1 core %.0f/s, -multi 2 %.0f/s: %.2fx\n' "$o1" "$o2" "$os"
printf 'provline station-key P-256:  1 thread %.0f/s, 2 threads %.0f/s: %.2fx\n' "$p1" "$p2" "$ps"
printf 'provline scaling as a share of openssl scaling: %.0f%%\n' "$(echo "100 * $ps / $os" | bc -l)"
