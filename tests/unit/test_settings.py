"""Settings: the shipped sample loads as documented; bad values name their key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings
from tests.helpers import REPO


def test_shipped_sample_resolves_paths_under_the_checkout() -> None:
    settings = load_settings(REPO / "conf" / "gateway.toml", environ={})
    assert (settings.dicom.ae_title, settings.dicom.port) == ("DICOMGW", 11112)
    assert settings.paths.spool_dir == REPO / "var" / "spool"
    assert settings.paths.watch_dir == REPO / "var" / "incoming"
    assert settings.queue.db_url == f"sqlite:///{REPO / 'var' / 'queue.db'}"
    assert "STORESCU" in settings.dicom.allowed_calling_ae_titles
    assert settings.calling_ae_allowed("STORESCU") and not settings.calling_ae_allowed("NOPE")
    assert (settings.pacs.associations_per_study, settings.xmpp.s5b_idle_timeout_s) == (2, 120.0)


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"DICOMGW_DB_URL": "postgresql+psycopg://u@127.0.0.1/gw", "DICOMGW_PORT": "4242", "DICOMGW_STABLE_AGE_S": "5"}
    settings = load_settings(REPO / "conf" / "gateway.toml", environ=env)
    assert settings.queue.db_url == env["DICOMGW_DB_URL"]
    assert settings.dicom.port == 4242 and settings.queue.stable_age_s == 5.0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"', "dicom.ae_title"),
        ('[dicom]\nport = 70000', "dicom.port: 70000 is outside 0..65535"),
        ('[queue]\nstable_age_s = "soon"', "queue.stable_age_s: 'soon' is not a number"),
        ('[queue]\nassociation_pause_s = -1', "queue.association_pause_s: -1.0 is below 0.0"),
        ('[queue]\nassociation_pause_s = nan', "queue.association_pause_s: nan is not a number"),
        ('[queue]\nassociation_pause_s = "\\u0000\\u001b[2J"', "queue.association_pause_s: '.x00.x1b[2J' is not a number"),
        ('[queue]\nassociation_pause_s = ' + "9" * 1000, "queue.association_pause_s: '9999999999.* is not a finite number"),  # beyond a float
        ('[queue]\nstable_age_s = ' + "9" * 1000, "queue.stable_age_s: '9999999999.* is not a finite number"),
        ('[queue]\nassociation_pause_s = "' + "30 s " * 1000 + '"', "queue.association_pause_s: '30 s 30 s 30 s"),
        ('[queue]\nassociation_pause_s = ', "not valid TOML"),  # cut off
        ('dicom = 3', "[dicom] must be a table"),
        ("[dicom\n", "not valid TOML"),
        ('[pacs]\nassociations_per_study = 0', "pacs.associations_per_study: 0 is outside 1..16"),
        ('[xmpp]\nibb_idle_timeout_s = 0.1', "xmpp.ibb_idle_timeout_s"),
        ('[xmpp]\nibb_idle_timeout_s = "\\u0000\\u001b[2J\\u00ff"', "xmpp.ibb_idle_timeout_s"),
        ('[xmpp]\nibb_idle_timeout_s = "' + "9" * 1000 + '"', "is not a finite number"),
        ('[xmpp]\nverdict_timeout_s = inf', "xmpp.verdict_timeout_s: 'inf' is not a finite number"),
        ('[xmpp]\nibb_idle_timeout_s = nan', "xmpp.ibb_idle_timeout_s"),
        ('[paths]\nspool_reserve_mb = -1', "paths.spool_reserve_mb: -1 is outside 0..1099511627776"),
        ('[paths]\nspool_reserve_mb = 1.7', "paths.spool_reserve_mb: 1.7 is not a whole number"),
        ('[paths]\nspool_reserve_mb = true', "paths.spool_reserve_mb: True is not a whole number"),
        ('[paths]\nspool_reserve_mb = inf', "paths.spool_reserve_mb: inf is not a whole number"),
        ('[paths]\nspool_reserve_mb = nan', "paths.spool_reserve_mb: nan is not a whole number"),
        ('[paths]\nspool_reserve_mb = "lots"', "paths.spool_reserve_mb: 'lots' is not a whole number"),
        ('[paths]\nspool_reserve_mb = "\\u0000\\u001b[2J\\u00ff"', "paths.spool_reserve_mb"),
        ('[paths]\nspool_reserve_mb = ' + "9" * 1000, "paths.spool_reserve_mb: '9999"),
        ('[xmpp]\nmax_inbound = inf', "xmpp.max_inbound: inf is not a whole number"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[queue]\nassociation_pause_s = "' + "30 s " * 1000 + '"', "queue.association_pause_s: '30 s 30 s"),
        ('[queue]\nstable_age_s = ' + "9" * 1000, "queue.stable_age_s: '9999"),
        ('[dicom]\nport = ' + "9" * 1000, "dicom.port: '9999"),
        ('[paths]\nspool_reserve_mb = "' + "x" * 5000 + '"', "paths.spool_reserve_mb: 'xxxx"),
        ('[dicom]\nae_title = "' + "A" * 5000 + '"', "dicom.ae_title: 'AAAA"),
        ('[log]\nformat = "' + "j" * 5000 + '"', "log.format = 'jjjj"),
        ('[xmpp]\nservers = ["' + "h" * 5000 + '"]', "xmpp.servers[0]: 'hhhh"),
        ('[[routing.rules]]\nname = "' + "n" * 5000 + '"\ndestinations = ["ct.hospital-b"]\npriority = "soon"',
         "routing rule 'nnnn"),
        ('[[routing.rules]]\nname = "r"\ndestinations = ["ct.hospital-b"]\npriority = "' + "s" * 5000 + '"',
         "priority 'ssss"),
        ('[[routing.rules]]\nname = "r"\ndestinations = ["ct.hospital-b"]\nmodality = "re:' + "(" * 5000 + '"',
         "modality: 're:(((("),
    ],
)
def test_a_value_of_thousands_of_characters_is_named_in_one_short_message(tmp_path: Path, toml: str, named: str) -> None:
    """The refusal repeats the value's first 80 characters and says how long it is: not 5 KB of message."""
    path = tmp_path / "long.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as refused:
        load_settings(path, environ={})
    message = str(refused.value)
    assert named in message and re.search(r"\.\.\. \(\d{4,5} characters\)", message), message
    assert len(message) < 400, message


def test_a_config_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[queue]\nassociation_pause_s = 30\n# Ørland sykehus\n'.encode("latin-1"))
    with pytest.raises(SettingsError, match=r"latin1\.toml: not valid TOML: not UTF-8 at byte 35"):
        load_settings(path, environ={})


def test_an_association_may_pause_as_long_as_the_stable_age_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[queue]\nstable_age_s = 30\n')
    assert load_settings(path, environ={}).queue.association_pause_s is None  # the stable age (CompletenessService)
    path.write_text('[queue]\nstable_age_s = 30\nassociation_pause_s = 300\n')
    assert load_settings(path, environ={}).queue.association_pause_s == 300.0


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_a_key_the_gateway_does_not_read_is_refused_with_the_one_it_resembles(tmp_path: Path) -> None:
    """A typo is not a default taken silently: ``allowed_calling_ae_title`` (one letter short) would let every
    modality in, ``[xmp]`` would leave XMPP off. Keys in tables inside tables are checked too; a secret given
    both inline and as a file, or from the environment, leaves no key unread."""
    path = tmp_path / "g.toml"
    path.write_text('[dicom]\nport = 11112\nallowed_calling_ae_title = ["CT01"]\n[queue]\nstable_age = 30\n'
                    '[xmp]\njid = "radiology.hospital-a@helsenett.test"\n[web]\nport = 8080\n[web.tls]\ncert = "x"\n')
    with pytest.raises(SettingsError) as refused:
        load_settings(path, environ={})
    message = str(refused.value)
    for said in ("'dicom.allowed_calling_ae_title' (did you mean dicom.allowed_calling_ae_titles?)",
                 "'queue.stable_age' (did you mean queue.stable_age_s?)", "'[xmp]' (did you mean xmpp?)",
                 "'[web.tls]'"):
        assert said in message, message
    assert "'dicom.port'" not in message and "'web.port'" not in message
    path.write_text('[xmpp]\njid = "radiology.hospital-a@helsenett.test"\npassword = "x"\n'
                    'peers = [{ jid = "radiology.hospital-b@helsenett.test", fingerprnt = "ab" }]\n')
    path.chmod(0o600)
    with pytest.raises(SettingsError, match=r"xmpp.peers: 'radiology.hospital-b@helsenett.test': unknown key\(s\) fingerprnt"):
        load_settings(path, environ={})
    secret = tmp_path / "password"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    path.write_text(f'[xmpp]\njid = "radiology.hospital-a@helsenett.test"\npassword_file = "{secret}"\n')
    assert load_settings(path, environ={"DICOMGW_XMPP_PASSWORD": "from-env"}).xmpp.password == "from-env"
    assert load_settings(path, environ={}).xmpp.password == "s3cret"
    load_settings(REPO / "conf" / "gateway.toml", environ={"DICOMGW_XMPP_PASSWORD": "x"})  # the shipped sample


def test_a_db_url_that_is_no_database_this_gateway_can_use_is_a_configuration_error(tmp_path: Path) -> None:
    """Not a URL, a database other than SQLite or PostgreSQL, a driver this install lacks: refused by name when
    the settings load (were a SQLAlchemy ArgumentError or a ModuleNotFoundError traceback at the first query)."""
    path = tmp_path / "g.toml"
    for url, said in (("nonsense", "queue.db_url 'nonsense' is not a database URL"),
                      ("mysql://u@127.0.0.1/x", "queue.db_url: 'mysql' databases are not supported"),
                      ("postgresql+nosuchdriver://u@127.0.0.1/x", "queue.db_url: no driver for 'postgresql+nosuchdriver'")):
        path.write_text(f'[queue]\ndb_url = "{url}"\n')
        with pytest.raises(SettingsError) as refused:
            load_settings(path, environ={})
        assert said in str(refused.value) and "sqlite:///path/queue.db or postgresql+psycopg://" in str(refused.value)
    path.write_text('[queue]\ndb_url = "postgresql+psycopg://gw@127.0.0.1:5432/queue"\n')
    assert load_settings(path, environ={}).queue.db_url == "postgresql+psycopg://gw@127.0.0.1:5432/queue"


def test_a_switch_is_true_or_false_never_a_quoted_word(tmp_path: Path) -> None:
    """``require_e2e = ""`` was plaintext exchange and ``compress = "false"`` compression on (Python's bool() of a
    string): every switch takes TOML's true or false only; a routing rule's allow_burned_in too."""
    path = tmp_path / "g.toml"
    jid = 'jid = "radiology.hospital-a@helsenett.test"\npassword = "x"\n'
    for table, key, value in (("xmpp", "require_e2e", '""'), ("xmpp", "compress", '"false"'), ("xmpp", "use_tls", "0"),
                              ("pacs", "tls", '"no"'), ("pacs", "storage_commitment", '"yes"'),
                              ("dicom", "require_client_cert", '"false"')):
        path.write_text(f"[{table}]\n{jid if table == 'xmpp' else ''}{key} = {value}\n")
        path.chmod(0o600)
        with pytest.raises(SettingsError, match=rf"{table}\.{key}: .* is not true or false \(write it without quotes\)"):
            load_settings(path, environ={})
    path.write_text('[[routing.rules]]\nname = "r"\ndestination = "radiology.hospital-b"\ndeidentify = "basic"\n'
                    'allow_burned_in = "false"\n')
    with pytest.raises(SettingsError, match=r"allow_burned_in 'false' is not true or false"):
        load_settings(path, environ={})
    path.write_text(f"[xmpp]\n{jid}require_e2e = false\ncompress = true\n")
    loaded = load_settings(path, environ={}).xmpp
    assert (loaded.require_e2e, loaded.compress) == (False, True)


def test_a_config_path_that_cannot_be_read_is_named_with_the_reason(tmp_path: Path) -> None:
    """A folder, a path through a file (and, for an admin's own user, a file of root's): a configuration error
    naming the file and the reason, not a traceback."""
    folder = tmp_path / "gateway.toml"
    folder.mkdir()
    with pytest.raises(SettingsError, match=r"cannot read the config file .*gateway\.toml: Is a directory"):
        load_settings(folder, environ={})
    plain_file = tmp_path / "conf"
    plain_file.write_text("")
    with pytest.raises(SettingsError, match=r"cannot read the config file .*conf/gateway\.toml: Not a directory"):
        load_settings(plain_file / "gateway.toml", environ={})


def test_empty_watch_dir_disables_the_watched_folder(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[paths]\nwatch_dir = ""\n')
    assert load_settings(path, environ={}).paths.watch_dir is None


def test_secrets_come_from_a_private_file_and_a_readable_config_with_a_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "xmpp.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = tmp_path / "gw.toml"
    config.write_text('[xmpp]\njid = "radiology.hospital-a@net.test/gw1"\npassword_file = "xmpp.password"\n')
    config.chmod(0o644)  # no secret in it: may be readable
    assert load_settings(config, environ={}).xmpp.password == "s3cret"
    assert load_settings(config, environ={"DICOMGW_XMPP_PASSWORD": "env"}).xmpp.password == "env"
    secret.chmod(0o640)
    with pytest.raises(SettingsError, match=r"xmpp.password_file: .*xmpp.password may be read by others \(mode 640\); chmod 600 it"):
        load_settings(config, environ={})
    config.write_text('[xmpp]\njid = "radiology.hospital-a@net.test/gw1"\npassword = "inline"\n')
    with pytest.raises(SettingsError, match=r"holds a secret \(xmpp.password\) and may be read by others \(mode 644\)"):
        load_settings(config, environ={})
    config.chmod(0o600)
    assert load_settings(config, environ={}).xmpp.password == "inline"


def test_peer_pins_and_tls_settings_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    pin = "AB" * 32
    config.write_text(
        '[xmpp]\njid = "radiology.hospital-a@net.test/gw1"\nca_file = "ca.pem"\n'
        f'peers = ["radiology.hospital-b@net.test", {{ jid = "radiology.hospital-c@net.test", fingerprint = "SHA256:{pin}" }}]\n'
    )
    x = load_settings(config, environ={}).xmpp
    assert x.peers == ("radiology.hospital-b@net.test", "radiology.hospital-c@net.test")
    assert x.pin_for("radiology.hospital-c@net.test") == pin.lower() and x.pin_for("radiology.hospital-b@net.test") is None
    assert x.ca_file == tmp_path / "ca.pem" and x.require_e2e and x.identity_key_file == tmp_path / "var/identity/gateway.key"
    config.write_text('[xmpp]\npeers = [{ jid = "radiology.hospital-c@net.test", fingerprint = "12ab" }]\n')
    with pytest.raises(SettingsError, match="xmpp.peers: radiology.hospital-c@net.test: '12ab' is not a SHA-256 fingerprint"):
        load_settings(config, environ={})


def test_the_samples_commented_routing_rules_and_web_section_load(tmp_path: Path) -> None:
    """The rules shown (commented out) in conf/gateway.toml are valid when an admin uncomments them."""
    text = (REPO / "conf" / "gateway.toml").read_text()
    lines, in_rules = [], False
    for line in text.splitlines():
        if line.startswith("# [[routing.rules]]"):
            in_rules = True
        if in_rules and line.startswith("# ") and ("=" in line or line.startswith("# [[")):
            line = line[2:]
        elif in_rules and not line.startswith("#"):
            in_rules = False
        lines.append(line)
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(lines).replace('base_dir = ".."', f'base_dir = "{REPO}"'))
    settings = load_settings(config, environ={})
    assert [(r.name, r.destinations, r.priority) for r in settings.routing.rules] == [
        ("trauma", ("radiology.hospital-b", "archive.hospital-c"), "stat"),
        ("MR from the MR01 scanner", ("radiology.hospital-b",), "routine"),
        ("research", ("research.university-x",), "routine")]
    research = settings.routing.rules[-1]
    assert (research.deidentify, research.deid_options, research.allow_burned_in) == (
        "basic", ("retain_longitudinal_dates",), False)
    assert (settings.web.host, settings.web.port) == ("127.0.0.1", 8765)
    assert settings.xmpp.stat_reserve == 1


@pytest.mark.parametrize(("toml", "message"), [
    ('[web]\nport = 8765\nhost = "0.0.0.0"', "is not loopback: set auth_user"),
    ('[web]\nport = 8765\nauth_user = "admin"\nauth_password_hash = "secret"', "needs auth_password_hash"),
    ('[[routing.rules]]\nname = "x"\ndestinations = ["a.b"]\nmodality = []', "modality: no value"),
])
def test_bad_web_and_routing_settings_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        load_settings(config, environ={})


def test_xmpp_servers_are_read_in_order_and_hostile_entries_are_named(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\n'
                    'servers = ["xmpp1.helsenett.test:5222", "127.0.0.2:5223", "[::1]:5222"]\nreconnect_s = 3\n')
    xmpp = load_settings(path, environ={}).xmpp
    assert xmpp.servers == (("xmpp1.helsenett.test", 5222), ("127.0.0.2", 5223), ("::1", 5222))
    assert xmpp.reconnect_s == 3.0
    path.write_text('[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\n')
    assert load_settings(path, environ={}).xmpp.servers == ()  # then host and port, as before
    hostile = ['"xmpp1"', '"xmpp1:0"', '"xmpp1:99999"', '"xmpp1:abc"', '"xmpp 1:5222"', '"xmpp1\\n:5222"',
               '"\\u001b]0;x\\u0007:5222"', f'"{"x" * 300}:5222"', "5222", '":5222"', '"xmpp1:\u0663"', '"a/b:5222"']
    for entry in hostile:
        path.write_text(f'[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\nservers = [{entry}]\n')
        with pytest.raises(SettingsError, match=r"xmpp\.servers\[0\]: .* is not host:port"):
            load_settings(path, environ={})
    for toml in ('servers = "xmpp1:5222"', "servers = [" + ", ".join(['"h:1"'] * 65) + "]"):
        path.write_text(f'[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\n{toml}\n')
        with pytest.raises(SettingsError, match=r"xmpp\.servers: a list"):
            load_settings(path, environ={})
    path.write_text('[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\nreconnect_s = 0\n')
    with pytest.raises(SettingsError, match="xmpp.reconnect_s"):
        load_settings(path, environ={})
    for bad in ("-1", "nan", '"2 s\\u0007"', '"' + "9" * 1000 + 'x"'):  # the flow-control presence interval
        path.write_text(f'[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\npresence_min_interval_s = {bad}\n')
        with pytest.raises(SettingsError, match="xmpp.presence_min_interval_s"):
            load_settings(path, environ={})


def test_xmpp_dns_servers_are_ip_addresses_with_a_port_and_hostile_entries_are_named(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    head = '[xmpp]\njid = "radiology.hospital-a@helsenett.test/gw1"\nhost = ""\n'
    path.write_text(head + 'dns_servers = ["192.0.2.53", "127.0.0.1:5353", "[2001:db8::53]:5300", "::1"]\n')
    assert load_settings(path, environ={}).xmpp.dns_servers == ("192.0.2.53:53", "127.0.0.1:5353", "[2001:db8::53]:5300", "[::1]:53")
    path.write_text(head)
    assert load_settings(path, environ={}).xmpp.dns_servers == ()  # the system's resolvers
    hostile = ['"dns.example"', '"127.0.0.1:0"', '"127.0.0.1:99999"', '"127.0.0.1:"', '"1.2.3.4:5:6"', '"[::1"', '"[::1]x"',
               '"\\u001b]0;x\\u0007"', f'"{"1" * 1000}"', "53", '"127.0.0.1:\u0663"', '"127.0.0.1:+53"', '"127.0.0.1 "']
    for entry in hostile:
        path.write_text(head + f"dns_servers = [{entry}]\n")
        with pytest.raises(SettingsError, match=r"xmpp\.dns_servers\[0\]: .* is not an IP address with an optional :port"):
            load_settings(path, environ={})
    for toml in ('dns_servers = "127.0.0.1"', "dns_servers = [" + ", ".join(['"127.0.0.1"'] * 9) + "]"):
        path.write_text(head + toml + "\n")
        with pytest.raises(SettingsError, match=r"xmpp\.dns_servers: a list"):
            load_settings(path, environ={})
