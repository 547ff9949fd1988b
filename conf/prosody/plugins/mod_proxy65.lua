-- dicomgw variant of Prosody 0.12's mod_proxy65 (XEP-0065 SOCKS5 Bytestreams proxy).
-- Changes from the module Debian ships:
-- * the relay buffer is proxy65_buffer_size bytes (default 262144) instead of a hard-coded 4096, so the
--   proxy relays in 256 KiB steps rather than 4 KiB stop-and-wait (each step costs a pause, a write and a
--   resume: 200 MiB through one stream took 0.96 s of Prosody's CPU at 64 KiB, 0.37 s at 256 KiB);
-- * the two legs of a stream are linked as soon as both are connected (the initiator's activation that
--   follows is answered as done), and a client may send its SOCKS5 greeting and CONNECT request in one
--   packet. Both are announced by the disco feature urn:dicomgw:proxy65:early-link, which dicomgw gateways
--   look for: they then start their end-to-end TLS handshake on their leg at once (what a leg sends waits in
--   the proxy until the other leg is there), which saves a round trip per transfer and one per leg. Clients
--   that follow XEP-0065 to the letter see no difference: nothing is relayed that they did not send;
-- * a third leg for a stream that already has two is refused (the stock module let it replace the first);
-- * a leg whose bytes LuaSocket already holds is read again after the other leg drained (with
--   server.link alone, the tail of a stream could wait in that buffer for bytes that never came).
-- Load it by putting this folder first in plugin_paths (see prosody.cfg.lua here).
-- Original copyright and licence below (MIT/X11).
-- Prosody IM
-- Copyright (C) 2008-2011 Matthew Wild
-- Copyright (C) 2008-2011 Waqas Hussain
-- Copyright (C) 2009 Thilo Cestonaro
--
-- This project is MIT/X11 licensed. Please see the
-- COPYING file in the source package for more information.
--

module:set_global();

local jid_compare, jid_prep = require "util.jid".compare, require "util.jid".prep;
local st = require "util.stanza";
local sha1 = require "util.hashes".sha1;
local server = require "net.server";
local portmanager = require "core.portmanager";

local sessions = module:shared("sessions");
local transfers = module:shared("transfers");
local max_buffer_size = module:get_option_number("proxy65_buffer_size", 262144);

local listener = {};

-- Relay what `from` reads into `to`. Prosody 0.12's server.link pauses `from` on each read and resumes it
-- when `to` has drained, but the resume only asks epoll for readability: bytes LuaSocket had already taken
-- off the socket into its own buffer (a read of exactly the link's size that ended inside one of its 8 KiB
-- receives) stay there until more arrive, and at the end of a stream, or while the other side waits for
-- an answer, none do. So after each drain, a leg whose buffer still holds bytes is read on the next turn of
-- the loop (as server_epoll itself does after a read and after a timed pause).
local function relay(from, to)
	server.link(from, to, max_buffer_size);
	local resume = to.ondrain;
	function to:ondrain()
		resume(self);
		local sock = from.conn;
		if sock and sock.dirty and from.pausefor and sock:dirty() then
			from:pausefor(0);
		end
	end
end

local function link(transfer)
	if transfer.activated then return; end
	transfer.activated = true;
	relay(transfer.initiator, transfer.target);
	relay(transfer.target, transfer.initiator);
	transfer.target:resume();
	transfer.initiator:resume();
end

function listener.onincoming(conn, data)
	local session = sessions[conn] or {};

	local transfer = transfers[session.sha];
	if transfer and transfer.activated then -- copy data between initiator and target
		local initiator, target = transfer.initiator, transfer.target;
		(conn == initiator and target or initiator):write(data);
		return;
	end -- FIXME server.link should be doing this?

	if not session.greeting_done then
		local nmethods = data:byte(2) or 0;
		if data:byte(1) == 0x05 and nmethods > 0 and #data >= 2 + nmethods and data:sub(3, 2 + nmethods):find("%z") then
			session.greeting_done = true; -- 0x00 = 'No authentication' is supported
			sessions[conn] = session;
			conn:write("\5\0"); -- send (SOCKS version 5, No authentication)
			module:log("debug", "SOCKS5 greeting complete");
			data = data:sub(3 + nmethods); -- a pipelined CONNECT request follows in the same packet
			if #data == 0 then return; end
		else -- error, unexpected input
			conn:write("\5\255"); -- send (SOCKS version 5, no acceptable method)
			conn:close();
			module:log("debug", "Invalid SOCKS5 greeting received: %q", data:sub(1, 300));
			return;
		end
	end
	-- connection request
	--local head = string.char( 0x05, 0x01, 0x00, 0x03, 40 ); -- ( VER=5=SOCKS5, CMD=1=CONNECT, RSV=0=RESERVED, ATYP=3=DOMAIMNAME, SHA-1 size )
	if not session.sha and #data == 47 and data:sub(1,5) == "\5\1\0\3\40" and data:sub(-2) == "\0\0" then
		local sha = data:sub(6, 45);
		local existing = transfers[sha];
		if existing and existing.initiator then -- both legs are here: a third is not one of them
			conn:write("\5\2\0\3\0\0\0"); -- REP 2: connection not allowed by ruleset
			conn:close();
			module:log("debug", "Third SOCKS5 leg for session %s refused", sha);
			return;
		end
		conn:pause();
		conn:write("\5\0\0\3\40" .. sha .. "\0\0"); -- VER, REP, RSV, ATYP, BND.ADDR (sha), BND.PORT (2 Byte)
		session.sha = sha;
		if not existing then
			transfers[sha] = { target = conn };
			module:log("debug", "SOCKS5 target connected for session %s", sha);
		else -- transfers[sha].target ~= nil
			existing.initiator = conn;
			module:log("debug", "SOCKS5 initiator connected for session %s: legs linked", sha);
			link(existing); -- what either leg sent meanwhile waits in its (paused) socket and goes now
		end
	else -- error, unexpected input
		conn:write("\5\1\0\3\0\0\0"); -- VER, REP, RSV, ATYP, BND.ADDR (sha), BND.PORT (2 Byte)
		conn:close();
		module:log("debug", "Invalid SOCKS5 negotiation received: %q", data:sub(1, 300));
	end
end

function listener.ondisconnect(conn)
	local session = sessions[conn];
	if session then
		if transfers[session.sha] then
			local initiator, target = transfers[session.sha].initiator, transfers[session.sha].target;
			if initiator == conn and target ~= nil then
				target:close();
			elseif target == conn and initiator ~= nil then
				initiator:close();
			end
			transfers[session.sha] = nil;
		end
		-- Clean up any session-related stuff here
		sessions[conn] = nil;
	end
end

function module.add_host(module)
	local host, name = module:get_host(), module:get_option_string("name", "SOCKS5 Bytestreams Service");

	local proxy_address = module:get_option_string("proxy65_address", host);
	local proxy_acl = module:get_option_array("proxy65_acl");
	local proxy_open_access = module:get_option_boolean("proxy65_open_access", false);

	-- COMPAT w/pre-0.9 where proxy65_port was specified in the components section of the config
	local legacy_config = module:get_option_number("proxy65_port");
	if legacy_config then
		module:log("warn", "proxy65_port is deprecated, please put proxy65_ports = { %d } into the global section instead", legacy_config);
	end

	module:depends("disco");
	module:add_identity("proxy", "bytestreams", name);
	module:add_feature("http://jabber.org/protocol/bytestreams");
	module:add_feature("urn:dicomgw:proxy65:early-link");

	local function is_permitted(origin, stanza)
		if proxy_acl and #proxy_acl > 0 then
			local jid = stanza.attr.from;
			for _, acl in ipairs(proxy_acl) do
				if jid_compare(jid, acl) then
					return true;
				end
			end
		elseif proxy_open_access or origin.type == "c2s" then
			return true;
		end
		return false;
	end

	module:hook("iq-get/host/http://jabber.org/protocol/bytestreams:query", function(event)
		local origin, stanza = event.origin, event.stanza;

		if not is_permitted(origin, stanza) then
			module:log("warn", "Denying use of proxy for %s", stanza.attr.from);
			origin.send(st.error_reply(stanza, "auth", "forbidden"));
			return true;
		end

		local proxy_port = next(portmanager.get_active_services():search("proxy65", nil)[1] or {});
		if not proxy_port then
			module:log("warn", "Not listening on any port");
			origin.send(st.error_reply(stanza, "wait", "item-not-found", "Not listening on any port"));
			return true;
		end

		local sid = stanza.tags[1].attr.sid;
		origin.send(st.reply(stanza):tag("query", {xmlns="http://jabber.org/protocol/bytestreams", sid=sid})
			:tag("streamhost", {jid=host, host=proxy_address, port=("%d"):format(proxy_port)}));
		return true;
	end);

	module:hook("iq-set/host/http://jabber.org/protocol/bytestreams:query", function(event)
		local origin, stanza = event.origin, event.stanza;

		if not is_permitted(origin, stanza) then
			module:log("warn", "Denying use of proxy for %s", stanza.attr.from);
			origin.send(st.error_reply(stanza, "auth", "forbidden"));
			return true;
		end

		local query = stanza.tags[1];
		local sid = query.attr.sid;
		local from = stanza.attr.from;
		local to = query:get_child_text("activate");
		local prepped_to = jid_prep(to);

		local info = "sid: "..tostring(sid)..", initiator: "..tostring(from)..", target: "..tostring(prepped_to or to);
		if prepped_to and sid then
			local sha = sha1(sid .. from .. prepped_to, true);
			if not transfers[sha] then
				module:log("debug", "Activation request has unknown session id; activation failed (%s)", info);
				origin.send(st.error_reply(stanza, "modify", "item-not-found"));
			elseif not transfers[sha].initiator then
				module:log("debug", "The sender was not connected to the proxy; activation failed (%s)", info);
				origin.send(st.error_reply(stanza, "cancel", "not-allowed", "The sender (you) is not connected to the proxy"));
			--elseif not transfers[sha].target then -- can't happen, as target is set when a transfer object is created
			--	module:log("debug", "The recipient was not connected to the proxy; activation failed (%s)", info);
			--	origin.send(st.error_reply(stanza, "cancel", "not-allowed", "The recipient is not connected to the proxy"));
			else -- if transfers[sha].initiator ~= nil and transfers[sha].target ~= nil then
				module:log("debug", "Transfer activated (%s)", info);
				link(transfers[sha]); -- linked already when the second leg connected
				origin.send(st.reply(stanza));
			end
		elseif to and sid then
			module:log("debug", "Malformed activation jid; activation failed (%s)", info);
			origin.send(st.error_reply(stanza, "modify", "jid-malformed"));
		else
			module:log("debug", "Bad request; activation failed (%s)", info);
			origin.send(st.error_reply(stanza, "modify", "bad-request"));
		end
		return true;
	end);
end

module:provides("net", {
	default_port = 5000;
	listener = listener;
	multiplex = {
		pattern = "^\5";
	};
});
