#!/usr/bin/env bash
# The commands of docs/deploy.md, in its order: a region of two gateways (hospital A's, hospital B's), an XMPP
# server (Prosody, or ejabberd with SERVER=ejabberd) and B's PACS (Orthanc), from nothing to a delivered study.
# tests/e2e/test_deploy_guide.py runs it as written, and checks that every command block of the guide is here.
#
#   bash docs/deploy-region.sh all            # every step, then leaves everything running
#   bash docs/deploy-region.sh stop           # stops what it started (by PID files under $REGION)
#   bash docs/deploy-region.sh pki prosody    # single steps, in the guide's order
#
# Run it as root to have Prosody/ejabberd run as their own users (as Debian runs them); as another user
# everything runs as that user. Everything it makes lives under $REGION.
set -euo pipefail

# -- 0. Names, addresses and ports (set them for your region; the defaults try it on one machine) ----------
REGION=${REGION:-/srv/dicomgw-region}
DICOMGW_HOME=${DICOMGW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
SERVER=${SERVER:-prosody}                 # prosody | ejabberd
DOMAIN=${DOMAIN:-helsenett.example}       # the XMPP domain of the health network
XMPP_ADDRESS=${XMPP_ADDRESS:-127.0.0.1}   # where the XMPP server listens (and its SOCKS5 proxy)
C2S_PORT=${C2S_PORT:-5222}
PROXY_PORT=${PROXY_PORT:-7777}
EJABBERD_DIST_PORT=${EJABBERD_DIST_PORT:-4370}
A_DICOM_PORT=${A_DICOM_PORT:-11112}
B_DICOM_PORT=${B_DICOM_PORT:-11113}
A_WEB_PORT=${A_WEB_PORT:-8765}
PACS_DICOM_PORT=${PACS_DICOM_PORT:-4242}
PACS_HTTP_PORT=${PACS_HTTP_PORT:-8042}
A_JID="radiology.hospital-a@$DOMAIN"
B_JID="radiology.hospital-b@$DOMAIN"

dicomgw() { "$DICOMGW_HOME/.venv/bin/dicomgw" "$@"; }
as_user() {  # as_user USER CMD...: the server's own user when we are root, else ourselves
    if [ "$(id -u)" = 0 ]; then runuser -u "$1" -- "${@:2}"; else "${@:2}"; fi
}
give_to() {  # give_to USER PATH...: the server's files belong to its user
    if [ "$(id -u)" = 0 ]; then chown -R "$1:$1" "${@:2}"; fi
}
wait_for() {  # wait_for SECONDS WHAT CMD...: until CMD succeeds, or fail naming WHAT
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    local out
    until out=$("$@" 2>&1); do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timed out waiting for $what; it last said:" >&2
            printf '%s\n' "$out" | tail -n 20 >&2
            return 1
        fi
        sleep 0.5
    done
}
stop_pid() {  # SIGTERM (a clean stop: what is in flight resumes at the next start), then wait for the end
    kill -TERM "$1"
    wait "$1" 2>/dev/null || wait_for 60 "process $1 to end" sh -c "! kill -0 $1"
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
json_field() {  # one field of a command's --json output; a command that printed none (it refused: its reason is above) stops here
    python3 -c "import json, sys
try: print(json.load(sys.stdin)$1)
except (ValueError, LookupError) as exc: sys.exit('json_field: no $1 in the output of the command before (its message is above): %s' % exc)"
}
A() { dicomgw --config "$REGION/gw-a/gateway.toml" "$@"; }
B() { dicomgw --config "$REGION/gw-b/gateway.toml" "$@"; }

# -- 1. PKI: a CA for the region, the XMPP server's certificate for the domain and its proxy -------------
step_pki() {
    mkdir -p "$REGION/pki" && cd "$REGION/pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj "/CN=$DOMAIN region CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca.key -out ca.crt
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$DOMAIN" \
        -keyout "$DOMAIN.key" -out "$DOMAIN.csr"
    printf 'subjectAltName=DNS:%s,DNS:proxy.%s\nextendedKeyUsage=serverAuth\n' "$DOMAIN" "$DOMAIN" > server.ext
    openssl x509 -req -in "$DOMAIN.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
        -extfile server.ext -out "$DOMAIN.crt"
    chmod 600 ca.key "$DOMAIN.key"
}

# -- 2a. Prosody: the shipped sample with this region's names, run as the prosody user ----------------------
step_prosody() {
    mkdir -p "$REGION/prosody/certs" "$REGION/prosody/data"
    cp "$REGION/pki/$DOMAIN.crt" "$REGION/pki/$DOMAIN.key" "$REGION/prosody/certs/"
    sed -e "s|helsenett.example|$DOMAIN|g" -e "s|/etc/prosody|$REGION/prosody|g" \
        -e "s|/var/lib/prosody|$REGION/prosody/data|" -e "s|/run/prosody|$REGION/prosody|" \
        -e "s|/var/log/prosody|$REGION/prosody|g" -e "s|/opt/dicomgw|$DICOMGW_HOME|" \
        -e "s|c2s_ports = { 5222 }|c2s_ports = { $C2S_PORT }|" -e "s|proxy65_ports = { 7777 }|proxy65_ports = { $PROXY_PORT }|" \
        -e "s|interfaces = { \"\\*\" }|interfaces = { \"$XMPP_ADDRESS\" }|" \
        -e "s|proxy65_address = \"proxy.$DOMAIN\"|proxy65_address = \"$XMPP_ADDRESS\"|" \
        "$DICOMGW_HOME/conf/prosody/prosody.cfg.lua" > "$REGION/prosody/prosody.cfg.lua"
    touch "$REGION/prosody/dicomgw-groups.txt"
    give_to prosody "$REGION/prosody"
    as_user prosody prosodyctl --config "$REGION/prosody/prosody.cfg.lua" check config
}

# -- 2b. ejabberd (SERVER=ejabberd): the shipped sample, run as the ejabberd user ---------------------------
step_ejabberd() {
    mkdir -p "$REGION/ejabberd/logs" "$REGION/ejabberd/spool"
    cat "$REGION/pki/$DOMAIN.crt" "$REGION/pki/$DOMAIN.key" > "$REGION/ejabberd/server.pem"
    chmod 600 "$REGION/ejabberd/server.pem"
    sed -e "s|helsenett.example|$DOMAIN|g" -e "s|/etc/ejabberd|$REGION/ejabberd|g" \
        -e "s|port: 5222|port: $C2S_PORT|" -e "s|port: 7777|port: $PROXY_PORT|" \
        -e "s|ip: \"0.0.0.0\"|ip: \"$XMPP_ADDRESS\"|" -e "s|hostname: \"proxy.$DOMAIN\"|hostname: \"$XMPP_ADDRESS\"|" \
        "$DICOMGW_HOME/conf/ejabberd/ejabberd.yml" > "$REGION/ejabberd/ejabberd.yml"
    printf 'ERL_DIST_PORT=%s\nEJABBERD_PID_PATH=%s/ejabberd/ejabberd.pid\nINET_DIST_INTERFACE=127.0.0.1\n' \
        "$EJABBERD_DIST_PORT" "$REGION" > "$REGION/ejabberd/ejabberdctl.cfg"
    echo '{lookup, [file, native]}.' > "$REGION/ejabberd/inetrc"
    give_to ejabberd "$REGION/ejabberd"
}
ejabberdctl_region() {
    ejabberdctl --config-dir "$REGION/ejabberd" --config "$REGION/ejabberd/ejabberd.yml" \
        --ctl-config "$REGION/ejabberd/ejabberdctl.cfg" --logs "$REGION/ejabberd/logs" \
        --spool "$REGION/ejabberd/spool" --node "dicomgw-region@localhost" "$@"
}

# -- 3. Start the XMPP server ----------------------------------------------------------------------------
step_start_server() {
    if [ "$SERVER" = prosody ]; then
        as_user prosody prosody --config "$REGION/prosody/prosody.cfg.lua" -F >> "$REGION/prosody/console.log" 2>&1 &
    else
        ejabberdctl_region start
        wait_for 60 "ejabberd to answer" ejabberdctl_region status
    fi
    wait_for 60 "the XMPP server on $XMPP_ADDRESS:$C2S_PORT" port_open "$XMPP_ADDRESS" "$C2S_PORT"
}

# -- 4. One account per gateway (the password goes into the gateway's password file, mode 600) ------------
step_accounts() {
    for site in a b; do
        mkdir -p "$REGION/gw-$site"
        (umask 077 && openssl rand -base64 24 > "$REGION/gw-$site/xmpp.password")
        if [ "$SERVER" = prosody ]; then
            as_user prosody prosodyctl --config "$REGION/prosody/prosody.cfg.lua" \
                register "radiology.hospital-$site" "$DOMAIN" "$(cat "$REGION/gw-$site/xmpp.password")"
        else
            ejabberdctl_region register "radiology.hospital-$site" "$DOMAIN" "$(cat "$REGION/gw-$site/xmpp.password")"
        fi
    done
}

# -- 5. The gateways' settings: A (beside the scanners, routes to B) and B (in front of B's PACS) --------
step_gateways() {
    cp "$REGION/pki/ca.crt" "$REGION/gw-a/xmpp-ca.crt"
    cp "$REGION/pki/ca.crt" "$REGION/gw-b/xmpp-ca.crt"
    cat > "$REGION/gw-a/gateway.toml" <<EOF
base_dir = "."
[dicom]
ae_title = "GW_A"
host = "127.0.0.1"
port = $A_DICOM_PORT
allowed_calling_ae_titles = ["CT01", "MR01", "STORESCU"]
[paths]
spool_dir = "var/spool"
watch_dir = "var/incoming"
quarantine_dir = "var/quarantine"
[queue]
db_url = "sqlite:///var/queue.db"
stable_age_s = 5
[xmpp]
jid = "$A_JID/gw1"
password_file = "xmpp.password"
host = "$XMPP_ADDRESS"
port = $C2S_PORT
ca_file = "xmpp-ca.crt"
[routing]
default_destination = "radiology.hospital-b"
[[routing.rules]]
name = "trauma"
destinations = ["radiology.hospital-b"]
priority = "stat"
tags = { StudyDescription = "re:(?i)trauma" }
[web]
port = $A_WEB_PORT
EOF
    cat > "$REGION/gw-b/gateway.toml" <<EOF
base_dir = "."
[dicom]
ae_title = "GW_B"
host = "127.0.0.1"
port = $B_DICOM_PORT
[paths]
spool_dir = "var/spool"
watch_dir = ""
quarantine_dir = "var/quarantine"
[queue]
db_url = "sqlite:///var/queue.db"
[xmpp]
jid = "$B_JID/gw1"
password_file = "xmpp.password"
host = "$XMPP_ADDRESS"
port = $C2S_PORT
ca_file = "xmpp-ca.crt"
[pacs]
ae_title = "PACS_B"
host = "127.0.0.1"
port = $PACS_DICOM_PORT
[web]
port = 0
EOF
    chmod 600 "$REGION"/gw-*/gateway.toml
}

# -- 6. End-to-end identities, exchanged and pinned (read the fingerprints to each other by phone) ---------
step_keys() {
    A_FP=$(A keys init --json | json_field '["fingerprint"]')
    B_FP=$(B keys init --json | json_field '["fingerprint"]')
    A peers add "$B_JID" --name "Radiology, Hospital B" --fingerprint "$B_FP"
    B peers add "$A_JID" --name "Radiology, Hospital A" --fingerprint "$A_FP"
}

# -- 7. The region's roster: every gateway's export, merged, given to the server --------------------------
step_roster() {
    if [ "$SERVER" = prosody ]; then
        A peers export prosody > "$REGION/gw-a/roster.prosody"
        B peers export prosody > "$REGION/gw-b/roster.prosody"
        dicomgw peers export prosody --merge "$REGION"/gw-*/roster.prosody > "$REGION/prosody/dicomgw-groups.txt"
        give_to prosody "$REGION/prosody/dicomgw-groups.txt"  # read when Prosody starts: restart it after a change
    else
        A peers export ejabberd > "$REGION/gw-a/roster.ejabberd"
        B peers export ejabberd > "$REGION/gw-b/roster.ejabberd"
        dicomgw peers export ejabberd --merge "$REGION"/gw-*/roster.ejabberd > "$REGION/ejabberd/roster.sh"
        sed -e "s|^ejabberdctl |ejabberdctl_region |" "$REGION/ejabberd/roster.sh" > "$REGION/ejabberd/roster-here.sh"
        # shellcheck disable=SC1091
        source "$REGION/ejabberd/roster-here.sh"
    fi
}

# -- 8. B's PACS knows gateway B (Orthanc here: DicomModalities; your PACS: its list of AE titles) -----------
step_pacs() {
    mkdir -p "$REGION/pacs/db"
    cat > "$REGION/pacs/orthanc.json" <<EOF
{
  "Name": "PACS_B", "DicomAet": "PACS_B", "DicomPort": $PACS_DICOM_PORT, "HttpPort": $PACS_HTTP_PORT,
  "StorageDirectory": "$REGION/pacs/db", "IndexDirectory": "$REGION/pacs/db",
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "Plugins": [],
  "DicomAlwaysAllowStore": false, "DicomAlwaysAllowEcho": false,
  "DicomModalities": { "gateway-b": [ "GW_B", "127.0.0.1", $B_DICOM_PORT ] }
}
EOF
    Orthanc "$REGION/pacs/orthanc.json" >> "$REGION/pacs/orthanc.log" 2>&1 &
    echo $! > "$REGION/pacs/orthanc.pid"
    wait_for 60 "Orthanc" port_open 127.0.0.1 "$PACS_DICOM_PORT"
}

# -- 9. Start the gateways (in production: conf/dicomgw.service, one unit per gateway) -------------------
step_start_gateways() {
    for site in a b; do
        (cd "$REGION/gw-$site" && exec "$DICOMGW_HOME/.venv/bin/dicomgw" run --config gateway.toml >> gateway.log 2>&1) &
        echo $! > "$REGION/gw-$site/run.pid"
    done
    wait_for 90 "gateway A running and online" A status
    wait_for 90 "gateway B running and online" B status
    dicomgw echo "PACS_B@127.0.0.1:$PACS_DICOM_PORT" --calling-ae GW_B
}

# -- 10. The first study: a synthetic CT from "CT01" to A; it must land in B's PACS -----------------------
step_first_study() {
    dicomgw testdata "$REGION/study-1" --slices 12 --size 128 --description "CT TRAUMA HEAD"
    /usr/bin/storescu -aet CT01 -aec GW_A 127.0.0.1 "$A_DICOM_PORT" "$REGION"/study-1/*.dcm
    wait_for 180 "the study delivered (A's receipt from B)" \
        sh -c "'$DICOMGW_HOME/.venv/bin/dicomgw' --config '$REGION/gw-a/gateway.toml' queue --json | grep -q '\"delivered\"'"
    A queue
    B queue
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PACS_HTTP_PORT/statistics').read().decode())"
}

# -- 11. Operating: restart, maintenance, a transfer window, key rotation ----------------------------------
step_operate() {
    stop_pid "$(cat "$REGION/gw-a/run.pid")"
    A status || echo "A is not running, as expected"
    (cd "$REGION/gw-a" && exec "$DICOMGW_HOME/.venv/bin/dicomgw" run --config gateway.toml >> gateway.log 2>&1) &
    echo $! > "$REGION/gw-a/run.pid"
    wait_for 90 "A running again" A status

    B maintenance on --message "PACS upgrade until 14:00"
    B maintenance
    B maintenance off

    A peers edit "$B_JID" --schedule "mon-fri 18:00-07:00; sat,sun 00:00-24:00"
    A peers edit "$B_JID" --schedule ""

    NEW_B_FP=$(B keys rotate --overlap 7d --json | json_field '["fingerprint"]')
    A peers edit "$B_JID" --add-fingerprint "$NEW_B_FP"
    dicomgw testdata "$REGION/study-2" --slices 6 --size 64 --description "CT THORAX"
    /usr/bin/storescu -aet CT01 -aec GW_A 127.0.0.1 "$A_DICOM_PORT" "$REGION"/study-2/*.dcm
    wait_for 180 "the second study delivered" \
        sh -c "test \"\$('$DICOMGW_HOME/.venv/bin/dicomgw' --config '$REGION/gw-a/gateway.toml' queue --json --state delivered | grep -c '\"study_uid\"')\" = 2"
    B keys show
    A audit --limit 20
}

# -- Stop what this script started ----------------------------------------------------------------------
step_stop() {
    for pid_file in "$REGION"/gw-*/run.pid "$REGION/pacs/orthanc.pid" "$REGION/prosody/prosody.pid"; do
        if [ -f "$pid_file" ]; then kill -TERM "$(cat "$pid_file")" 2>/dev/null || true; fi
    done
    if [ "$SERVER" = ejabberd ] && [ -f "$REGION/ejabberd/ejabberd.pid" ]; then
        kill -TERM "$(cat "$REGION/ejabberd/ejabberd.pid")" 2>/dev/null || true
    fi
}

step_all() {
    step_pki
    if [ "$SERVER" = prosody ]; then  # Prosody reads accounts and the roster file when it starts
        step_prosody
        step_accounts
        step_gateways
        step_keys
        step_roster
        step_start_server
    else  # ejabberd takes accounts and roster groups through ejabberdctl, once it runs
        step_ejabberd
        step_start_server
        step_accounts
        step_gateways
        step_keys
        step_roster
    fi
    step_pacs
    step_start_gateways
    step_first_study
    step_operate
}

for step in "${@:-all}"; do
    "step_${step//-/_}"
done
