"""Jinja2 templates of the admin web page (``adapters.web``), kept in the package so that an install carries
them; autoescaped (patient names, errors and peer texts are data, never markup)."""

from __future__ import annotations

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{{ refresh_s }}">
<title>dicomgw - {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { background: #17324d; color: #fff; padding: .6em 1em; display: flex; gap: 2em; align-items: baseline; }
header a { color: #cfe3ff; text-decoration: none; } header strong { font-size: 1.1em; }
main { padding: 1em; } h2 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: .9em; } td, th { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } .num { text-align: right; } .err { color: #a40000; }
.state { font-weight: 600; } .stat { background: #c00; color: #fff; padding: 0 .35em; border-radius: 3px; font-size: .8em; }
.bar { width: 140px; height: .8em; background: #e5e9ef; display: inline-block; vertical-align: middle; }
.bar span { display: block; height: 100%; background: #2c7be5; }
.ok { color: #14733a; } .bad { color: #a40000; font-weight: 600; } .banner { background: #fff3cd; padding: .5em 1em; }
code { font-size: .85em; }
</style></head><body>
<header><strong>dicomgw</strong><span>{{ own_jid }}</span>
<nav><a href="/">Queue</a> &nbsp; <a href="/peers">Peers</a> &nbsp; <a href="/stats">Statistics</a> &nbsp; <a href="/metrics">Metrics</a></nav>
<small>read-only, refreshes every {{ refresh_s }} s</small></header>
{% if outage %}<div class="banner bad" id="outage">{{ outage }}</div>{% endif %}
{% block banner %}{% endblock %}
<main>{% block main %}{% endblock %}</main></body></html>
"""

INDEX = """{% extends "base.html" %}
{% block banner %}{% if maintenance %}<div class="banner" id="maintenance">Maintenance: {{ maintenance }}</div>{% endif %}{% endblock %}
{% block main %}
<p id="processes">Gateway: <span class="{{ 'ok' if xmpp.running else 'bad' }}">{{ 'running' if xmpp.running else 'not running' }}</span>
{% for p in xmpp.processes %}<br><small>{{ p.owner }}: {{ p.summary }}</small>{% endfor %}</p>
<p id="xmpp">XMPP: <span class="{{ 'ok' if xmpp.state == 'online' else 'bad' }}">{{ xmpp.state }}</span>
{% if xmpp.server %} to {{ xmpp.server }}{% endif %}{% if xmpp.tls_version %}, {{ xmpp.tls_version }}{% endif %}
{% if xmpp.last_error %} <span class="err">last error: {{ xmpp.last_error }}</span>{% endif %}</p>
{% if spool %}<p id="spool">Spool: {% if spool.error %}<span class="bad">free space cannot be read ({{ spool.error }})</span>
{% else %}<span class="{{ 'bad' if spool.low else 'ok' }}">{{ spool.free }} MB free</span>, {{ spool.reserve }} MB kept for
this site's modalities{% if spool.low %}: <span class="err">peers' studies are refused until there is room</span>{% endif %}{% endif %}</p>{% endif %}
<h2>Queue by state</h2>
<table id="by-state"><tr><th>State</th><th class="num">Outgoing</th><th class="num">Incoming</th></tr>
{% for row in by_state %}<tr><td class="state">{{ row.state }}</td><td class="num">{{ row.out }}</td><td class="num">{{ row['in'] }}</td></tr>
{% else %}<tr><td colspan="3">the queue is empty</td></tr>{% endfor %}</table>
<h2>In flight</h2>
<table id="in-flight"><tr><th>Study</th><th>Patient</th><th>Peer</th><th>State</th><th>Progress</th><th>Method</th></tr>
{% for u in in_flight %}<tr><td><a href="/study/{{ u.study_uid }}">{{ u.description or u.study_uid }}</a>
{% if u.priority == 'stat' %} <span class="stat">STAT</span>{% endif %}</td><td>{{ u.patient }}</td>
<td>{{ '→' if u.direction == 'out' else '←' }} {{ u.peer }}</td><td class="state">{{ u.state }}</td>
<td><span class="bar"><span style="width: {{ u.percent }}%"></span></span> {{ u.percent }} %{% if u.awaiting %}: {{ u.awaiting }}{% endif %}</td><td>{{ u.method }}</td></tr>
{% else %}<tr><td colspan="6">nothing is moving</td></tr>{% endfor %}</table>
<h2>Latest</h2>
<table id="recent"><tr><th>Unit</th><th>Study</th><th>Patient</th><th>Modality</th><th class="num">Instances</th><th class="num">MB</th>
<th>Peer</th><th>Priority</th><th>State</th><th>Since (UTC)</th><th>Note</th></tr>
{% for u in recent %}<tr><td>{{ u.unit_id }}</td><td><a href="/study/{{ u.study_uid }}">{{ u.description or u.study_uid }}</a></td>
<td>{{ u.patient }}</td><td>{{ u.modalities }}</td><td class="num">{{ u.instances }}</td><td class="num">{{ u.mb }}</td>
<td>{{ '→' if u.direction == 'out' else '←' }} {{ u.peer or '-' }}</td><td>{% if u.priority == 'stat' %}<span class="stat">STAT</span>{% else %}routine{% endif %}</td>
<td class="state">{{ u.state }}</td><td>{{ u.changed }}</td>
<td class="err">{{ u.error }}{% if u.next_try and u.state in ('waiting-peer', 'waiting-window', 'queued') %} (next try {{ u.next_try }}){% endif %}</td></tr>
{% endfor %}</table>
{% endblock %}
"""

STUDY = """{% extends "base.html" %}
{% block main %}
<h2>Study {{ study.study_uid }}</h2>
<p>{{ study.patient }} ({{ study.patient_id }}) - {{ study.description }}</p>
{% for u in study.units %}
<h2 id="unit-{{ u.unit_id }}">Unit {{ u.unit_id }}: <span class="state">{{ u.state }}</span>
{% if u.priority == 'stat' %}<span class="stat">STAT</span>{% endif %}
{{ '→' if u.direction == 'out' else '←' }} {{ u.peer or '-' }}</h2>
<p>{{ u.instances }} instance(s), {{ u.mb }} MB, {{ u.modalities }}{% if u.rule %}, routed by {{ u.rule }}{% endif %};
<span class="bar"><span style="width: {{ u.percent }}%"></span></span> {{ u.percent }} %{% if u.awaiting %}: {{ u.awaiting }}{% endif %}
{% if u.error %}<br><span class="err">{{ u.error }}</span>{% endif %}</p>
<table class="transfers"><tr><th>Started (UTC)</th><th>Direction</th><th>Peer</th><th>Method</th><th class="num">Offset</th>
<th class="num">Bytes</th><th>Outcome</th><th>Error</th></tr>
{% for t in u.transfers %}<tr><td>{{ t.started_at[:19] }}</td><td>{{ t.direction }}</td><td>{{ t.peer_jid }}</td><td>{{ t.method }}</td>
<td class="num">{{ t.offset_bytes }}</td><td class="num">{{ t.bytes }}</td><td>{{ t.outcome }}</td><td class="err">{{ t.error or '' }}</td></tr>
{% else %}<tr><td colspan="8">no transfer attempt</td></tr>{% endfor %}</table>
<table class="audit"><tr><th>At (UTC)</th><th>Event</th><th>Move</th><th>Detail</th></tr>
{% for e in u.audit %}<tr><td>{{ e.at[:19] }}</td><td>{{ e.event }}</td>
<td>{% if e.to_state %}{{ e.from_state or '' }} → {{ e.to_state }}{% endif %}</td><td>{{ e.detail }}</td></tr>{% endfor %}</table>
{% endfor %}
{% if study.mpps %}<h2>Performed Procedure Steps (MPPS)</h2>
<table id="mpps"><tr><th>Updated (UTC)</th><th>Modality</th><th>Step</th><th>Status</th><th class="num">Instances</th><th>Reason</th><th>Applied</th></tr>
{% for m in study.mpps %}<tr><td>{{ m.updated_at }}</td><td>{{ m.modality }}</td><td>{{ m.uid }}</td><td>{{ m.status }}</td>
<td class="num">{{ m.instances }}</td><td>{{ m.reason }}</td><td>{{ 'yes' if m.settled else 'not yet' }}</td></tr>{% endfor %}</table>{% endif %}
{% if study.commitments %}<h2>Storage Commitment</h2>
<table id="commitments"><tr><th>Requested (UTC)</th><th>Modality</th><th>Transaction</th><th class="num">Instances</th>
<th>State</th><th class="num">Committed</th><th class="num">Failed</th><th>Reported (UTC)</th><th>Last error</th></tr>
{% for c in study.commitments %}<tr><td>{{ c.requested_at }}</td><td>{{ c.modality }}</td><td>{{ c.transaction }}</td>
<td class="num">{{ c.of_this_study }} of {{ c.instances }}</td><td>{{ c.state }}{% if c.event_type %} (event {{ c.event_type }}){% endif %}</td>
<td class="num">{{ c.committed }}</td><td class="num">{{ c.failed }}</td><td>{{ c.reported_at }}</td><td class="err">{{ c.error }}</td></tr>{% endfor %}
</table>{% endif %}
{% endblock %}
"""

PEERS = """{% extends "base.html" %}
{% block main %}
<h2>Peers</h2>
<table id="peers"><tr><th>JID</th><th>Name</th><th>Presence</th><th>Directions</th><th class="num">Max concurrent</th>
<th>Transfer windows</th><th>Serves</th><th>Pinned certificate SHA-256</th></tr>
{% for p in peers %}<tr><td>{{ p.jid }}</td><td>{{ p.name or '' }}</td>
<td class="{{ 'ok' if p.presence == 'available' else 'bad' }}">{{ p.presence }}</td><td>{{ p.directions }}</td>
<td class="num">{{ p.max_concurrent }}</td><td>{{ p.schedule or 'always' }}</td><td>{{ p.destinations | join(', ') }}</td>
<td><code>{{ p.fingerprint or 'none: nothing is exchanged' }}</code></td></tr>
{% else %}<tr><td colspan="8">no peer: dicomgw peers add JID --fingerprint SHA256</td></tr>{% endfor %}</table>
{% endblock %}
"""

STATS = """{% extends "base.html" %}
{% block main %}
<h2>Transfers in the last {{ stats.hours | round(1) }} h</h2>
{% set s = stats.summary %}
<table id="summary"><tr><th>T (s)</th><th>N</th><th>S</th><th>F</th><th>Success rate</th><th>MTBF (s)</th><th>Running</th><th>Suspended for STAT</th></tr>
<tr><td class="num">{{ s.T_s }}</td><td class="num">{{ s.N }}</td><td class="num">{{ s.S }}</td><td class="num">{{ s.F }}</td>
<td class="num">{{ s.success_rate if s.success_rate is not none else '-' }}</td><td class="num">{{ s.mtbf_s if s.mtbf_s is not none else '-' }}</td>
<td class="num">{{ s.running }}</td><td class="num">{{ s.suspended }}</td></tr></table>
<h2>Throughput per transfer (MB/s)</h2>
{{ chart | safe }}
<h2>By method</h2>
<table><tr><th>Method</th><th class="num">Transfers</th><th class="num">Study MB</th><th class="num">MB/s</th><th class="num">Wire MB</th><th class="num">Compression</th></tr>
{% for m, v in s.by_method.items() %}<tr><td>{{ m }}</td><td class="num">{{ v.transfers }}</td><td class="num">{{ v.mb }}</td><td class="num">{{ v.mb_s }}</td><td class="num">{{ v.wire_mb }}</td><td class="num">{{ '%.2fx' % v.compression if v.compression else '-' }}</td></tr>{% endfor %}</table>
<h2>Failures</h2>
<table>{% for kind, n in s.failures.items() %}<tr><td>{{ kind }}</td><td class="num">{{ n }}</td></tr>{% else %}<tr><td>none</td></tr>{% endfor %}</table>
{% endblock %}
"""

MISSING = """{% extends "base.html" %}
{% block main %}<p>No study {{ what }} in this gateway's queue.</p>{% endblock %}
"""

TEMPLATES = {"base.html": BASE, "index.html": INDEX, "study.html": STUDY, "peers.html": PEERS, "stats.html": STATS,
             "missing.html": MISSING}
