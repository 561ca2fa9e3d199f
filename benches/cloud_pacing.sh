#!/usr/bin/env bash
# Pacing against an account quota the station does not know, in one run:
# moto (valid-certificate mode) behind benches/quota_proxy.py, which lets at
# most QUOTA AttachPolicy calls through in any trailing second and answers
# the rest with ThrottlingException, as AWS does. `provline batch --register
# thing` runs N devices with AttachPolicy configured at each GUESS calls/s;
# per guess it prints devices/s, AttachPolicy calls throttled, and the
# throttled share in the first 3 s against the last 3 s (AIMD settling).
# Usage: benches/cloud_pacing.sh [N] [QUOTA] [GUESS...]
# Needs .venv with moto[server] (bash .ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
quota=${2:-5}
shift $(( $# > 2 ? 2 : $# ))
guesses=("${@:-5 15 50}")
read -r -a guesses <<< "${guesses[*]}"
python=${PROVLINE_PYTHON:-.venv/bin/python}
cargo build --quiet
bin=$PWD/target/debug/provline
work=$(mktemp -d "${TMPDIR:-/tmp}/provline-pacing.XXXXXX")
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
moto_port=$(free_port)
"$python" - "$moto_port" > "$work/moto.log" 2>&1 <<'PY' &
import sys
from moto.core.config import default_user_config
default_user_config["iot"]["use_valid_cert"] = True
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
PY
moto=$!
trap 'kill $moto ${proxy:-} 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$moto_port/moto-api/" >/dev/null && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true
{ echo serial; seq -f 'P%06.0f' 1 "$n"; } > "$work/job.csv"
"$bin" ca init --dir "$work/ca" -q
echo "AttachPolicy quota $quota/s, $n devices, --register thing"
printf '%8s %12s %10s %12s %12s\n' guess devices/s throttled "first 3 s" "last 3 s"
for guess in "${guesses[@]}"; do
    curl -s -X POST "http://127.0.0.1:$moto_port/moto-api/reset" >/dev/null
    rm -rf "$work/st" "$work/out" "$work"/l.sqlite*
    cp -r fixtures/cloud "$work/st"
    AWS_ENDPOINT_URL=http://127.0.0.1:$moto_port "$bin" -q cloud setup --config "$work/st/station-devices.toml"
    proxy_port=$(free_port)
    "$python" benches/quota_proxy.py "127.0.0.1:$proxy_port" "127.0.0.1:$moto_port" PUT /target-policies/ "$quota" "$work/attach.log" &
    proxy=$!
    sleep 0.5
    rate=$(AWS_ENDPOINT_URL=http://127.0.0.1:$proxy_port "$bin" --json batch "$work/job.csv" --ca "$work/ca" \
        --out "$work/out" --ledger "$work/l.sqlite" --register thing \
        --cloud-config "$work/st/station-devices.toml" --rate "AttachPolicy=$guess" \
        | "$python" -c 'import json,sys; print(round(json.load(sys.stdin)["devices_per_sec"], 2))')
    kill $proxy; wait $proxy 2>/dev/null || true
    "$python" - "$guess" "$rate" "$work/attach.log" <<'PY'
import collections, sys
guess, rate, log = sys.argv[1:4]
rows = [l.split() for l in open(log)]
t0 = float(rows[0][0])
sec = collections.defaultdict(lambda: [0, 0])
for t, s in rows:
    sec[int(float(t) - t0)][0 if s == "ok" else 1] += 1
ks = sorted(sec)
share = lambda ks: sum(sec[k][1] for k in ks) / max(1, sum(sum(sec[k]) for k in ks))
throttled = sum(v[1] for v in sec.values())
total = sum(sum(v) for v in sec.values())
print(f"{guess:>8} {rate:>12} {throttled:>4}/{total:<5} {share(ks[:3]):>12.1%} {share(ks[-4:-1]):>12.1%}")
PY
done
