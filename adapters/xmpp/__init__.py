"""The XMPP edge: one agent per gateway (connection, presence), study offers (XEP-0095/0096), and the two
bytestream methods (XEP-0065 mediated SOCKS5, XEP-0047 in-band), written on slixmpp's stanza layer."""
