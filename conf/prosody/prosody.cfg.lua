-- Sample Prosody 0.12 configuration for a health network's XMPP server carrying dicomgw transfers.
-- Copy to /etc/prosody/prosody.cfg.lua (or pass with --config), replace the domain, and put the server's
-- certificate and key in the certificates directory below as <domain>.crt / <domain>.key, owned by the prosody
-- user (chown prosody:prosody; a root-owned key is unreadable to Prosody). Run Prosody as the prosody user
-- (systemctl start prosody; or runuser -u prosody -- prosody --config FILE -F), never as root.
-- Gateways connect with STARTTLS + SASL. docs/deploy.md walks through a region with this file.

admins = { }
pidfile = "/run/prosody/prosody.pid"
certificates = "/etc/prosody/certs"
data_path = "/var/lib/prosody"
interfaces = { "*" }
c2s_ports = { 5222 }
-- Our proxy65 variant relays with 256 KiB buffers (stock: 4 KiB); remove this line to use the stock module.
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
-- The garbage collector as Lua's own default (a new cycle once memory has doubled) instead of Prosody's (after 5 %
-- growth): every relayed proxy65 buffer becomes garbage, and with the sessions of a region in memory Prosody's
-- default spends the server's time collecting (bench/region, 500 sites: proxy65 fan-in 57-67 -> 391-464 MB/s,
-- RSS 44 -> 60 MB; 10 sites: 226-293 -> 350-444 MB/s).
gc = { mode = "incremental"; threshold = 200 }
-- In-band blocks of 64 KiB are ~87 KiB of base64 inside an <iq/>.
c2s_stanza_size_limit = 1024 * 1024

-- Each gateway sees the presence of its peers, and of no one else: one group per pair, made by
-- `dicomgw peers export prosody --merge` from every gateway's export. Restart Prosody after changing it.
groups_file = "/etc/prosody/dicomgw-groups.txt"
-- [DICOM gateways: radiology.hospital-a@helsenett.example + radiology.hospital-b@helsenett.example]
-- radiology.hospital-a@helsenett.example=Radiology, Hospital A
-- radiology.hospital-b@helsenett.example=Radiology, Hospital B

proxy65_ports = { 7777 }
proxy65_interfaces = { "*" }
-- A larger relay step costs Prosody less CPU per byte; each stream holds up to one step per direction.
proxy65_buffer_size = 262144

log = { info = "/var/log/prosody/prosody.log"; error = "/var/log/prosody/prosody.err" }

VirtualHost "helsenett.example"

Component "proxy.helsenett.example" "proxy65"
    proxy65_address = "proxy.helsenett.example"  -- a name or address every gateway can reach
    proxy65_acl = { "helsenett.example" }
