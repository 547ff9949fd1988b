-- Sample Prosody 0.12 configuration for a health network's XMPP server carrying dicomgw transfers.
-- Copy to /etc/prosody/prosody.cfg.lua (or pass with --config), replace the domain, and provide TLS
-- certificates (prosodyctl cert import /etc/letsencrypt/live). Gateways connect with STARTTLS + SASL.

admins = { }
pidfile = "/run/prosody/prosody.pid"
-- Our proxy65 variant relays with 64 KiB buffers (stock: 4 KiB); remove this line to use the stock module.
plugin_paths = { "/opt/dicomgw/conf/prosody/plugins" }

modules_enabled = {
    "roster"; "saslauth"; "tls"; "disco"; "ping"; "smacks"; "groups"; "posix";
}
-- mod_limits would throttle c2s to a few kB/s: keep it off for gateway accounts (or list them in unlimited_jids).
modules_disabled = { "s2s"; "limits" }

c2s_require_encryption = true
authentication = "internal_hashed"
-- Bigger reads and no Nagle: what made in-band transfers fast in our measurements.
network_default_read_size = 65536
network_settings = { nagle = false }
-- In-band blocks of 64 KiB are ~87 KiB of base64 inside an <iq/>.
c2s_stanza_size_limit = 1024 * 1024

-- Gateways see each other's presence without subscription requests: one shared roster group.
groups_file = "/etc/prosody/dicomgw-groups.txt"
-- [Gateways]
-- radiology.hospital-a@helsenett.example=Hospital A radiology
-- radiology.hospital-b@helsenett.example=Hospital B radiology

proxy65_ports = { 7777 }
proxy65_interfaces = { "*" }
proxy65_buffer_size = 65536

log = { info = "/var/log/prosody/prosody.log"; error = "/var/log/prosody/prosody.err" }

VirtualHost "helsenett.example"

Component "proxy.helsenett.example" "proxy65"
    proxy65_address = "proxy.helsenett.example"  -- a name or address every gateway can reach
    proxy65_acl = { "helsenett.example" }
