"""The lab: what the demo, the tests and the benchmarks run beside the gateway, never the gateway itself.

Launchers for the real peers on loopback (``localpeers``: Prosody, Orthanc, dcmtk's storescp; ``ejabberd_peer``),
a fault-injecting relay (``netem``), synthetic studies (``synthetic``) and the demo of the whole chain (``demo``).
Imported by the CLI's ``demo`` and ``testdata`` commands, the tests and the benchmarks; no module of the running
gateway imports this package.
"""
