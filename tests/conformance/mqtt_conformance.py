#!/usr/bin/env python3
"""MQTT 3.1.1 and MQTT 5 broker conformance checks with a third-party client (paho).

Drives any broker on HOST:PORT with Eclipse Paho (Debian's python3-paho-mqtt 1.6.1) and
checks behaviour the specifications require of a server:

  keepalive0       CONNECT with keep alive 0 is accepted and the connection works
  qos_matrix       SUBACK grants the requested QoS; delivered QoS = min(publish, granted)
  session          persistent sessions: session present, messages queued while offline
  session_restart  the same across a broker restart (--phase prepare / resume)
  retained         retain flag on delivery, deletion, Retain Handling, Retain As Published
  dollar_topics    $SYS/... is not matched by '#' or '+/...', only by filters starting '$'
  message_expiry   (5) Message Expiry Interval while a subscriber is offline
  no_local         (5) No Local subscription option
  max_packet       (5) the server honours the client's Maximum Packet Size
  topic_alias      (5) topic aliases both ways: the server offers a Topic Alias Maximum and
                   resolves the client's aliases; messages to a client that allows
                   aliases arrive on the right topic whether or not the server uses them
  alias_misuse     (5) a client that breaks the alias rules (alias 0, above the maximum,
                   an empty topic with an unknown alias) is disconnected with 0x94 / 0x82,
                   and publish/subscribe between other clients still works afterwards
  receive_maximum  (5) a client sending more unacknowledged QoS 2 publishes than the
                   server's Receive Maximum is disconnected with 0x93, others unaffected
  overlapping      (5) overlapping subscriptions: one copy at the highest granted QoS
                   with every matching Subscription Identifier, or one copy per
                   subscription with its own identifier
  properties       (5) Payload Format Indicator, Content Type, Response Topic,
                   Correlation Data and User Properties reach the subscriber unchanged
  shared_subs      (5) $share/... : delivered to one member of the group when the
                   server offers shared subscriptions, refused with 0x9E when it says
                   it does not
  server_keep_alive (5) with --max-keep-alive N: a client asking for more (or for 0)
                   gets Server Keep Alive N in the CONNACK
  sub_refused      a forbidden SUBSCRIBE gets a failure SUBACK, the connection stays up
                   (only with --forbidden-filter, --username and --password)

qos_matrix expects each SUBSCRIBE granted at the QoS asked for: the specifications let a
server grant less, but the brokers checked here support QoS 2, and a downgrade would hide
the min(publish, granted) rule this check is about.

Debian's Mosquitto 2.0.11 passes every check (`broker_conformance` keeps it so; for
sub_refused it uses the dynamic security plugin, since Mosquitto's acl_file never refuses
a SUBSCRIBE).

Each check runs once per protocol version and prints `PASS name[version]`,
`FAIL name[version]: why` or `SKIP name[version]: why`; the exit status is 1 when any
check failed, 2 on a usage error. Every wait is bounded; topics are under a random
`conf/<run>/` prefix and client ids are unique per run, so runs never meet.

    mqtt_conformance.py --host 127.0.0.1 --port 1883 [--port-v5 N] [--only CHECK ...]
    mqtt_conformance.py ... --phase prepare --state FILE   # then restart the broker
    mqtt_conformance.py ... --phase resume --state FILE
"""

import argparse
import json
import secrets
import socket
import struct
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

# Longest wait for something that must happen (loopback: it normally takes milliseconds).
WAIT = 5.0
# How long nothing may arrive for "is not delivered".
QUIET = 1.0

CHECKS = [
    "keepalive0",
    "qos_matrix",
    "session",
    "retained",
    "dollar_topics",
    "message_expiry",
    "no_local",
    "max_packet",
    "topic_alias",
    "alias_misuse",
    "receive_maximum",
    "overlapping",
    "properties",
    "shared_subs",
    "server_keep_alive",
    "sub_refused",
    "session_restart",
]
V5_ONLY = {"message_expiry", "no_local", "max_packet", "topic_alias", "alias_misuse",
           "receive_maximum", "overlapping", "properties", "shared_subs",
           "server_keep_alive"}
VERSION_NAMES = {3: "3.1.1", 5: "5"}


class CheckFailed(Exception):
    pass


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


class Message:
    def __init__(self, msg):
        self.topic = msg.topic
        self.payload = bytes(msg.payload)
        self.qos = msg.qos
        self.retain = bool(msg.retain)
        self.properties = getattr(msg, "properties", None)

    def prop(self, name):
        if self.properties is None:
            return None
        return getattr(self.properties, name, None)

    def __repr__(self):
        shown = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"..."
        return f"({self.topic} {shown!r} qos={self.qos} retain={int(self.retain)})"


class Client:
    """One paho client on its own network thread, with bounded waits for every reply."""

    def __init__(self, ctx, version, name, *, clean=True, session_expiry=None,
                 keepalive=30, max_packet=None, client_id=None, username=None,
                 password=None, topic_alias_max=None):
        self.ctx = ctx
        self.version = version
        self.name = f"{name}[{VERSION_NAMES[version]}]"
        self.cid = client_id or ctx.client_id(version)
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.max_packet = max_packet
        self.topic_alias_max = topic_alias_max
        # Topic aliases the server set for this client (paho 1.6 leaves them to us).
        self.aliases = {}
        self.aliased = 0
        if version == 5:
            self.c = mqtt.Client(client_id=self.cid, protocol=mqtt.MQTTv5,
                                 reconnect_on_failure=False)
        else:
            self.c = mqtt.Client(client_id=self.cid, clean_session=clean,
                                 protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.cond = threading.Condition()
        self.connack = None  # (reason code, session present, properties)
        self.disconnected = None  # reason, once the connection is gone
        self.disconnect_code = None
        self.subacks = {}  # mid -> [codes]
        self.received = []
        self.closing = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.started = False
        ctx.clients.append(self)

    # --- callbacks (network thread) ---

    def _on_connect(self, _c, _u, flags, rc, properties=None):
        code = rc.value if hasattr(rc, "value") else rc
        with self.cond:
            self.connack = (code, flags.get("session present", 0), properties)
            self.cond.notify_all()

    def _on_disconnect(self, _c, _u, rc, properties=None):
        with self.cond:
            self.disconnected = str(rc)
            self.disconnect_code = rc.value if hasattr(rc, "value") else rc
            self.cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, granted, properties=None):
        codes = [g.value if hasattr(g, "value") else g for g in granted]
        with self.cond:
            self.subacks[mid] = codes
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg):
        m = Message(msg)
        alias = m.prop("TopicAlias")
        with self.cond:
            if alias is not None:
                self.aliased += 1
                if m.topic:
                    self.aliases[alias] = m.topic
                else:
                    m.topic = self.aliases.get(alias, f"<unknown alias {alias}>")
            self.received.append(m)
            self.cond.notify_all()

    # --- operations (check thread) ---

    def connect(self, expect_ok=True):
        """CONNECT and wait for the CONNACK; returns (reason code, session present)."""
        props = None
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            if self.max_packet is not None:
                props.MaximumPacketSize = self.max_packet
            if self.topic_alias_max is not None:
                props.TopicAliasMaximum = self.topic_alias_max
        try:
            if self.version == 5:
                self.c.connect(self.ctx.host, self.ctx.port(5), self.keepalive,
                               clean_start=self.clean, properties=props)
            else:
                self.c.connect(self.ctx.host, self.ctx.port(3), self.keepalive)
        except OSError as e:
            raise CheckFailed(f"{self.name}: TCP connect failed: {e}")
        self.c.loop_start()
        self.started = True
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.disconnected,
                               timeout=WAIT)
            connack = self.connack
            gone = self.disconnected
        expect(connack is not None,
               f"{self.name}: no CONNACK within {WAIT} s"
               + (f" (connection closed: {gone})" if gone else ""))
        code, present, _ = connack
        if expect_ok:
            expect(code == 0, f"{self.name}: CONNACK refused the connection (code {code})")
        return code, present

    def connack_property(self, name):
        props = self.connack[2] if self.connack else None
        return getattr(props, name, None) if props is not None else None

    def subscribe(self, topic, qos=1, no_local=False, rap=False, rh=0, expect_codes=None,
                  sub_id=None):
        """SUBSCRIBE one filter and wait for its SUBACK; returns the code.

        By default the code must grant exactly `qos`."""
        if self.version == 5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap,
                                    retainHandling=rh)
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            rc, mid = self.c.subscribe(topic, options=opts, properties=props)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        expect(rc == mqtt.MQTT_ERR_SUCCESS,
               f"{self.name}: SUBSCRIBE {topic} not sent ({mqtt.error_string(rc)})")
        with self.cond:
            self.cond.wait_for(lambda: mid in self.subacks or self.disconnected,
                               timeout=WAIT)
            codes = self.subacks.get(mid)
            gone = self.disconnected
        expect(codes is not None,
               f"{self.name}: no SUBACK for {topic} within {WAIT} s"
               + (f" (connection closed: {gone})" if gone else ""))
        expect(len(codes) == 1, f"{self.name}: SUBACK for one filter has codes {codes}")
        code = codes[0]
        if expect_codes is None:
            expect(code == qos,
                   f"{self.name}: SUBACK for {topic} at QoS {qos} answered {code:#04x} "
                   f"(expected the QoS granted as requested)")
        return code

    def publish(self, topic, payload, qos=1, retain=False, expiry=None, wait=True,
                props=None):
        if self.version == 5 and expiry is not None:
            props = props or Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        expect(info.rc == mqtt.MQTT_ERR_SUCCESS,
               f"{self.name}: PUBLISH {topic} not sent ({mqtt.error_string(info.rc)})")
        if wait:
            info.wait_for_publish(timeout=WAIT)
            what = {0: "sent", 1: "acknowledged (PUBACK)", 2: "completed (PUBCOMP)"}[qos]
            expect(info.is_published(),
                   f"{self.name}: QoS {qos} PUBLISH on {topic} not {what} within {WAIT} s"
                   + (f" (connection closed: {self.disconnected})"
                      if self.disconnected else ""))
        return info

    def mark(self):
        with self.cond:
            return len(self.received)

    def wait_for(self, pred, count=1, timeout=WAIT, since=0):
        """Waits until `count` messages matching `pred` arrived (after index `since`);
        returns all the matching ones so far (possibly fewer after the timeout)."""
        def matching():
            return [m for m in self.received[since:] if pred(m)]
        with self.cond:
            self.cond.wait_for(lambda: len(matching()) >= count, timeout=timeout)
            return matching()

    def take(self, pred, count, what, since=0):
        got = self.wait_for(pred, count, WAIT, since)
        expect(len(got) >= count,
               f"{self.name}: {what}: {len(got)} of {count} messages within {WAIT} s: {got}"
               + (f" (connection closed: {self.disconnected})" if self.disconnected else ""))
        return got

    def quiet(self, pred, what, since=0, timeout=QUIET):
        """Nothing matching `pred` arrives within `timeout`."""
        got = self.wait_for(pred, 1, timeout, since)
        expect(not got, f"{self.name}: {what}: got {got}")

    def still_connected(self, what):
        with self.cond:
            gone = self.disconnected
        expect(gone is None, f"{self.name}: connection closed {what}: {gone}")

    def wait_disconnected(self, what, timeout=WAIT):
        """The server closes this connection within `timeout`; returns the reason."""
        with self.cond:
            self.cond.wait_for(lambda: self.disconnected is not None, timeout=timeout)
            gone = self.disconnected
        expect(gone is not None, f"{self.name}: still connected {timeout} s after {what}")
        return gone

    def close(self):
        if self.closing:
            return
        self.closing = True
        if self.started:
            try:
                self.c.disconnect()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self.c.loop_stop()


def on_topic(topic):
    return lambda m: m.topic == topic


class Context:
    def __init__(self, args, run=None):
        self.args = args
        self.host = args.host
        self.run = run or secrets.token_hex(4)
        self.prefix = f"conf/{self.run}"
        self.counter = 0
        self.clients = []

    def port(self, version):
        if version == 5 and self.args.port_v5:
            return self.args.port_v5
        return self.args.port

    def client_id(self, version):
        # At most 23 characters of [0-9a-zA-Z]: what every 3.1.1 server must accept.
        self.counter += 1
        return f"cf{self.run}v{version}n{self.counter:04d}"

    def topic(self, check, version, *rest):
        return "/".join([self.prefix, check, f"v{version}", *rest])

    def client(self, version, name, **kw):
        return Client(self, version, name, **kw)

    def close_all(self):
        for c in self.clients:
            c.close()
        self.clients = []


# --- the checks ---

def check_keepalive0(ctx, v):
    c = ctx.client(v, "keepalive0", keepalive=0)
    c.connect()
    t = ctx.topic("keepalive0", v)
    c.subscribe(t, 1)
    c.publish(t, b"one", 1)
    c.take(on_topic(t), 1, "own publish on a keep alive 0 connection")
    # A keep alive of 0 turns the server's timeout off: the connection must outlive a
    # silent pause and still work.
    time.sleep(1.5)
    c.still_connected("during a 1.5 s pause with keep alive 0")
    mark = c.mark()
    c.publish(t, b"two", 1)
    c.take(on_topic(t), 1, "publish after the pause", since=mark)


def check_qos_matrix(ctx, v):
    sub = ctx.client(v, "matrix-sub")
    sub.connect()
    pub = ctx.client(v, "matrix-pub")
    pub.connect()
    for g in (0, 1, 2):
        sub.subscribe(ctx.topic("qos_matrix", v, f"g{g}"), g)
    for p in (0, 1, 2):
        for g in (0, 1, 2):
            pub.publish(ctx.topic("qos_matrix", v, f"g{g}"), f"p{p}g{g}".encode(), p)
    prefix = ctx.topic("qos_matrix", v) + "/"
    got = sub.take(lambda m: m.topic.startswith(prefix), 9, "the 9 messages")
    time.sleep(0.2)  # let any duplicate arrive
    got = sub.wait_for(lambda m: m.topic.startswith(prefix), 9, 0)
    problems = []
    for p in (0, 1, 2):
        for g in (0, 1, 2):
            mine = [m for m in got if m.payload == f"p{p}g{g}".encode()]
            if len(mine) != 1:
                problems.append(f"publish QoS {p} / granted {g}: delivered {len(mine)} times")
            elif mine[0].qos != min(p, g):
                problems.append(f"publish QoS {p} / granted {g}: delivered at QoS "
                                f"{mine[0].qos}, expected {min(p, g)}")
    expect(not problems, "; ".join(problems))


def persistent(ctx, v, name, cid=None):
    if v == 5:
        return ctx.client(v, name, clean=False, session_expiry=300, client_id=cid)
    return ctx.client(v, name, clean=False, client_id=cid)


def clean_up_session(ctx, v, cid):
    """Connects `cid` with a clean session (ending the stored one): session present 0."""
    c = ctx.client(v, "clean", clean=True, session_expiry=0 if v == 5 else None, client_id=cid)
    _, present = c.connect()
    c.close()
    return present


N_QUEUED = 5


def queue_while_offline(ctx, v, check):
    """A persistent subscriber at QoS 1 goes away; 5 QoS 1 messages are published."""
    t = ctx.topic(check, v)
    p = persistent(ctx, v, "persistent")
    _, present = p.connect()
    expect(present == 0, f"{p.name}: session present 1 for a client id never seen before")
    p.subscribe(t, 1)
    p.close()
    pub = ctx.client(v, "publisher")
    pub.connect()
    for i in range(N_QUEUED):
        pub.publish(t, f"m{i}".encode(), 1)
    pub.close()
    return p.cid, t


def receive_queued(ctx, v, cid, t):
    p = persistent(ctx, v, "persistent-again", cid=cid)
    _, present = p.connect()
    expect(present == 1, f"{p.name}: CONNACK session present 0 when resuming a session")
    got = p.take(on_topic(t), N_QUEUED, "messages queued while offline")
    payloads = [m.payload.decode(errors="replace") for m in got]
    want = [f"m{i}" for i in range(N_QUEUED)]
    expect(payloads[:N_QUEUED] == want,
           f"{p.name}: queued messages arrived as {payloads}, expected {want} in order")
    bad_qos = [m for m in got if m.qos != 1]
    expect(not bad_qos, f"{p.name}: queued QoS 1 messages delivered as {bad_qos}")
    p.close()


def check_session(ctx, v):
    cid, t = queue_while_offline(ctx, v, "session")
    receive_queued(ctx, v, cid, t)
    present = clean_up_session(ctx, v, cid)
    what = "clean session 1" if v == 3 else "clean start 1"
    expect(present == 0, f"CONNACK session present 1 for a CONNECT with {what}")


def check_retained(ctx, v):
    t = ctx.topic("retained", v, "r1")
    pub = ctx.client(v, "publisher")
    pub.connect()
    a = ctx.client(v, "subscribed-before")
    a.connect()
    a.subscribe(t, 1)
    pub.publish(t, b"r1", 1, retain=True)
    got = a.take(on_topic(t), 1, "retained publish to an established subscription")
    expect(not got[0].retain,
           f"{a.name}: message for an established subscription has retain 1: {got[0]}")
    b = ctx.client(v, "subscribed-after")
    b.connect()
    b.subscribe(t, 1)
    got = b.take(on_topic(t), 1, "retained message on a new subscription")
    expect(got[0].retain and got[0].payload == b"r1",
           f"{b.name}: retained message delivered as {got[0]}, expected r1 with retain 1")
    pub.publish(t, b"", 1, retain=True)
    c = ctx.client(v, "subscribed-after-delete")
    c.connect()
    c.subscribe(t, 1)
    c.quiet(on_topic(t), "a zero-length retained publish did not delete the message")
    if v == 3:
        return
    # MQTT 5: Retain Handling and Retain As Published.
    t2 = ctx.topic("retained", v, "rh")
    pub.publish(t2, b"r2", 1, retain=True)
    d = ctx.client(v, "retain-handling-2")
    d.connect()
    d.subscribe(t2, 1, rh=2)
    d.quiet(on_topic(t2), "Retain Handling 2 sent a retained message")
    e = ctx.client(v, "retain-handling-1")
    e.connect()
    e.subscribe(t2, 1, rh=1)
    got = e.take(on_topic(t2), 1, "Retain Handling 1 on a new subscription")
    expect(got[0].retain and got[0].payload == b"r2",
           f"{e.name}: retained message delivered as {got[0]}, expected r2 with retain 1")
    mark = e.mark()
    e.subscribe(t2, 1, rh=1)
    e.quiet(on_topic(t2), "Retain Handling 1 sent the retained message again for an "
            "existing subscription", since=mark)
    mark = e.mark()
    e.subscribe(t2, 1, rh=0)
    got = e.take(on_topic(t2), 1, "Retain Handling 0 on a repeated subscription", since=mark)
    expect(got[0].retain, f"{e.name}: retained message delivered as {got[0]}")
    t3 = ctx.topic("retained", v, "rap")
    f = ctx.client(v, "retain-as-published")
    f.connect()
    f.subscribe(t3, 1, rap=True)
    pub.publish(t3, b"r3", 1, retain=True)
    got = f.take(on_topic(t3), 1, "retained publish with Retain As Published 1")
    expect(got[0].retain, f"{f.name}: Retain As Published 1 delivered {got[0]}")
    for topic in (t2, t3):
        pub.publish(topic, b"", 1, retain=True)


def check_dollar_topics(ctx, v):
    version = "$SYS/broker/version"
    for filt in (version, "$SYS/#"):
        s = ctx.client(v, f"sub {filt}")
        s.connect()
        s.subscribe(filt, 1)
        got = s.take(on_topic(version), 1, f"retained {version} on a subscription to {filt}")
        expect(got[0].retain, f"{s.name}: {version} delivered without retain: {got[0]}")
    hash_sub = ctx.client(v, "sub #")
    hash_sub.connect()
    hash_sub.subscribe("#", 1)
    plus_sub = ctx.client(v, "sub +/broker/version")
    plus_sub.connect()
    plus_sub.subscribe("+/broker/version", 1)
    # Controls: both subscriptions are live.
    pub = ctx.client(v, "publisher")
    pub.connect()
    control = f"cf{ctx.run}v{v}/broker/version"
    pub.publish(control, b"control", 1)
    hash_sub.take(on_topic(control), 1, f"a publish on {control} through '#'")
    plus_sub.take(on_topic(control), 1, f"a publish on {control} through '+/broker/version'")
    dollar = lambda m: m.topic.startswith("$")  # noqa: E731
    hash_sub.quiet(dollar, "'#' matched a topic starting with '$' (MQTT-4.7.2-1)")
    plus_sub.quiet(dollar, "'+/broker/version' matched a topic starting with '$' "
                   "(MQTT-4.7.2-1)", timeout=0.01)


def check_message_expiry(ctx, v):
    t = ctx.topic("message_expiry", v)
    p = persistent(ctx, v, "persistent")
    p.connect()
    p.subscribe(t, 1)
    p.close()
    pub = ctx.client(v, "publisher")
    pub.connect()
    pub.publish(t, b"short", 1, expiry=2)
    sent = time.monotonic()
    pub.publish(t, b"long", 1, expiry=60)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - sent)))
    back = persistent(ctx, v, "persistent-again", cid=p.cid)
    _, present = back.connect()
    expect(present == 1, f"{back.name}: session present 0 when resuming a session")
    got = back.take(lambda m: m.topic == t and m.payload == b"long", 1,
                    "the message with a 60 s expiry")
    expiry = got[0].prop("MessageExpiryInterval")
    expect(expiry is not None,
           f"{back.name}: delivered without a Message Expiry Interval (MQTT-3.3.2-6)")
    expect(0 < expiry <= 60, f"{back.name}: remaining Message Expiry Interval {expiry}")
    back.quiet(lambda m: m.payload == b"short",
               "a message whose 2 s expiry had passed was delivered", timeout=0.2)
    back.close()
    clean_up_session(ctx, v, p.cid)


def check_no_local(ctx, v):
    t1 = ctx.topic("no_local", v, "on")
    t2 = ctx.topic("no_local", v, "off")
    x = ctx.client(v, "no-local")
    x.connect()
    x.subscribe(t1, 1, no_local=True)
    x.subscribe(t2, 1)
    watcher = ctx.client(v, "watcher")
    watcher.connect()
    watcher.subscribe(t1, 1)
    x.publish(t1, b"own", 1)
    watcher.take(on_topic(t1), 1, "control: another subscriber gets the publish")
    x.quiet(on_topic(t1), "No Local 1 delivered the client's own publish")
    x.publish(t2, b"echo", 1)
    x.take(on_topic(t2), 1, "own publish without No Local")


def check_max_packet(ctx, v):
    t = ctx.topic("max_packet", v)
    m = ctx.client(v, "max-packet-256", max_packet=256)
    m.connect()
    m.subscribe(t, 1)
    pub = ctx.client(v, "publisher")
    pub.connect()
    pub.publish(t, b"B" * 1000, 1)
    pub.publish(t, b"small", 1)
    got = m.take(lambda x: x.topic == t and x.payload == b"small", 1,
                 "a small message after a too large one")
    big = [x for x in m.received if len(x.payload) > 256]
    expect(not big, f"{m.name}: got a {len(big[0].payload)}-byte payload above its "
           "Maximum Packet Size 256" if big else "")
    m.still_connected("after the server discarded a too large message")
    mark = m.mark()
    m.publish(t, b"after", 1)
    m.take(lambda x: x.payload == b"after", 1, "round trip afterwards", since=mark)


class Raw:
    """A bare MQTT 5 client on a socket, for what paho will not send (protocol errors)."""

    def __init__(self, ctx, name):
        self.name = f"{name}[5]"
        self.cid = ctx.client_id(5)
        self.s = socket.create_connection((ctx.host, ctx.port(5)), timeout=WAIT)
        self.buf = b""
        props = b""
        body = (b"\x00\x04MQTT\x05\x02\x00\x1e" + varint(len(props)) + props
                + mqtt_str(self.cid.encode()))
        self.s.sendall(b"\x10" + varint(len(body)) + body)
        kind, body = self.packet()
        expect(kind == 2 and len(body) >= 2 and body[1] == 0,
               f"{self.name}: CONNACK refused or missing: {kind} {body!r}")
        self.connack_props = parse_props(body[2:])

    def packet(self, timeout=WAIT):
        """The next packet: (type, body); (None, b"") when the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            got = split_packet(self.buf)
            if got:
                kind, body, rest = got
                self.buf = rest
                return kind, body
            left = deadline - time.monotonic()
            expect(left > 0, f"{self.name}: no packet from the server within {timeout} s")
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                return None, b""
            self.buf += chunk

    def send(self, data):
        self.s.sendall(data)

    def until_disconnect(self, what):
        """Reads until the server sends DISCONNECT or closes; returns the DISCONNECT's
        reason code (None if it just closed)."""
        while True:
            kind, body = self.packet()
            if kind is None:
                return None
            if kind == 14:
                return body[0] if body else 0

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def mqtt_str(b):
    return struct.pack(">H", len(b)) + b


def split_packet(buf):
    if len(buf) < 2:
        return None
    n, shift, at = 0, 0, 1
    while True:
        if at >= len(buf):
            return None
        b = buf[at]
        n |= (b & 0x7F) << shift
        at += 1
        if not b & 0x80:
            break
        shift += 7
    if len(buf) < at + n:
        return None
    return buf[0] >> 4, buf[at:at + n], buf[at + n:]


def parse_props(b):
    """The MQTT 5 properties of a CONNACK body after its first two bytes: {id: value} for
    the one- and two-byte and four-byte integer properties this suite reads."""
    if not b:
        return {}
    n, shift, at = 0, 0, 0
    while True:
        x = b[at]
        n |= (x & 0x7F) << shift
        at += 1
        if not x & 0x80:
            break
        shift += 7
    end = at + n
    out = {}
    sizes = {0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1, 0x21: 2, 0x22: 2, 0x13: 2,
             0x11: 4, 0x27: 4}
    while at < end:
        pid = b[at]
        at += 1
        if pid in sizes:
            size = sizes[pid]
            out[pid] = int.from_bytes(b[at:at + size], "big")
            at += size
        elif pid in (0x12, 0x1A, 0x1C, 0x1F, 0x15):  # strings
            ln = struct.unpack(">H", b[at:at + 2])[0]
            out[pid] = b[at + 2:at + 2 + ln]
            at += 2 + ln
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                ln = struct.unpack(">H", b[at:at + 2])[0]
                at += 2 + ln
        elif pid == 0x16:  # binary
            ln = struct.unpack(">H", b[at:at + 2])[0]
            at += 2 + ln
        else:
            break
    return out


def raw_publish(topic, payload, qos, pkid, props=b""):
    body = mqtt_str(topic.encode()) + (struct.pack(">H", pkid) if qos else b"")
    body += varint(len(props)) + props + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


def routing_still_works(ctx, v, check, what):
    """Plain publish/subscribe between two fresh clients."""
    t = ctx.topic(check, v, "after")
    sub = ctx.client(v, f"{check}-sub")
    sub.connect()
    sub.subscribe(t, 1)
    pub = ctx.client(v, f"{check}-pub")
    pub.connect()
    pub.publish(t, b"still routed", 1)
    sub.take(on_topic(t), 1, f"publish/subscribe between other clients {what}")


def check_topic_alias(ctx, v):
    t = ctx.topic("topic_alias", v, "in")
    sub = ctx.client(v, "subscriber")
    sub.connect()
    sub.subscribe(t, 1)
    pub = ctx.client(v, "aliaser")
    pub.connect()
    offered = pub.connack_property("TopicAliasMaximum") or 0
    expect(offered >= 1, f"{pub.name}: the server offers no topic aliases "
           f"(Topic Alias Maximum {offered})")
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    pub.publish(t, b"set", 1, props=props)
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    pub.publish("", b"used", 1, props=props)
    got = sub.take(on_topic(t), 2, "a publish that set an alias and one that used it")
    expect([m.payload for m in got] == [b"set", b"used"],
           f"{sub.name}: payloads {[m.payload for m in got]}")
    pub.still_connected("after using a topic alias")
    # To a client that allows aliases: every message arrives on its own topic.
    t2 = ctx.topic("topic_alias", v, "out")
    t3 = ctx.topic("topic_alias", v, "out2")
    rx = ctx.client(v, "alias-receiver", topic_alias_max=4)
    rx.connect()
    rx.subscribe(t2, 1)
    rx.subscribe(t3, 1)
    for i in range(3):
        sub.publish(t2, f"a{i}".encode(), 1)
        sub.publish(t3, f"b{i}".encode(), 1)
    got = rx.take(lambda m: m.topic in (t2, t3), 6, "messages to a client allowing aliases")
    for m in got:
        expect(m.payload.startswith(b"a" if m.topic == t2 else b"b"),
               f"{rx.name}: {m} arrived on the wrong topic")
    rx.still_connected("after receiving (maybe aliased) messages")


def check_alias_misuse(ctx, v):
    probe = ctx.client(v, "probe")
    probe.connect()
    offered = probe.connack_property("TopicAliasMaximum") or 0
    probe.close()
    t = ctx.topic("alias_misuse", v, "x")
    # Alias 0 is forbidden (MQTT-3.3.2-8): malformed or a protocol error; 0x94 is defined
    # for an alias above the maximum.
    cases = [(t, 0, "a topic alias of 0", (0x81, 0x82)),
             (t, offered + 1, f"alias {offered + 1} above the maximum {offered}", (0x94,))]
    if offered >= 1:
        # MQTT-3.3.2-7 makes this a protocol error; 0x94 is accepted too.
        cases.append(("", offered, "an empty topic with an alias never set", (0x82, 0x94)))
    for topic, alias, what, codes in cases:
        raw = Raw(ctx, f"misuse-{alias}")
        raw.send(raw_publish(topic, b"bad", 1, 1, b"\x23" + struct.pack(">H", alias)))
        code = raw.until_disconnect(what)
        raw.close()
        shown = "no DISCONNECT" if code is None else f"DISCONNECT {code:#04x}"
        expect(code in codes, f"{raw.name}: {what} got {shown}, expected "
               + " or ".join(f"{c:#04x}" for c in codes))
        routing_still_works(ctx, v, "alias_misuse", f"after {what}")


def check_receive_maximum(ctx, v):
    raw = Raw(ctx, "flooder")
    most = raw.connack_props.get(0x21, 65535)
    if most > 1000:
        raw.close()
        print(f"# receive_maximum: the server's Receive Maximum is {most}; "
              "sending that many is not tried", flush=True)
        return
    t = ctx.topic("receive_maximum", v)
    # QoS 2 stays unacknowledged until PUBREL, which this client never sends.
    raw.send(b"".join(raw_publish(t, b"q", 2, i + 1) for i in range(most + 1)))
    refused, code = [], None
    while True:
        kind, body = raw.packet()
        if kind is None:
            break
        if kind == 5 and len(body) >= 3 and body[2] >= 0x80:
            refused.append(struct.unpack(">H", body[:2])[0])
        if kind == 14:
            code = body[0] if body else 0
            break
        if kind == 5 and struct.unpack(">H", body[:2])[0] == most + 1:
            break
    raw.close()
    # MQTT 5 section 4.9: the receiver of too many "uses DISCONNECT with Reason Code
    # 0x93". Mosquitto 2.0.11 answers some of the excess with PUBREC 0x97 instead.
    if ctx.args.strict_receive_maximum:
        expect(code == 0x93, f"{raw.name}: {most + 1} QoS 2 publishes above the Receive "
               f"Maximum {most} got " + (f"DISCONNECT {code:#04x}" if code is not None
                                         else f"no DISCONNECT (refused: {refused})")
               + ", expected DISCONNECT 0x93")
    else:
        expect(code == 0x93 or (most + 1) in refused,
               f"{raw.name}: publish {most + 1} above the Receive Maximum {most} was "
               f"neither refused nor answered with DISCONNECT 0x93 (refused: {refused})")
    routing_still_works(ctx, v, "receive_maximum", "after a client broke its quota")


def check_overlapping(ctx, v):
    base = ctx.topic("overlapping", v)
    c = ctx.client(v, "overlap")
    c.connect()
    c.subscribe(base + "/#", 0, sub_id=1)
    c.subscribe(base + "/+", 1, sub_id=2)
    pub = ctx.client(v, "publisher")
    pub.connect()
    t = base + "/x"
    pub.publish(t, b"both", 1)
    got = c.wait_for(on_topic(t), 2, timeout=QUIET + 1)
    expect(got, f"{c.name}: nothing delivered for two overlapping subscriptions")

    def ids(m):
        x = m.prop("SubscriptionIdentifier")
        return sorted(x if isinstance(x, list) else [x]) if x is not None else []
    if len(got) == 1:
        m = got[0]
        expect(m.qos == 1, f"{c.name}: one copy at QoS {m.qos}, expected the highest "
               "granted (1)")
        expect(ids(m) == [1, 2], f"{c.name}: one copy with identifiers {ids(m)}, "
               "expected both [1, 2] (MQTT-3.3.4-3)")
    else:
        expect(len(got) == 2, f"{c.name}: {len(got)} copies for two subscriptions")
        by_id = sorted((ids(m), m.qos) for m in got)
        expect(by_id == [([1], 0), ([2], 1)],
               f"{c.name}: copies (identifiers, QoS) {by_id}, expected ([1], 0), ([2], 1)")


def check_properties(ctx, v):
    t = ctx.topic("properties", v)
    sub = ctx.client(v, "subscriber")
    sub.connect()
    sub.subscribe(t, 1)
    pub = ctx.client(v, "publisher")
    pub.connect()
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    props.ResponseTopic = ctx.topic("properties", v, "reply")
    props.CorrelationData = b"\x01\x02corr"
    props.UserProperty = [("k1", "v1"), ("k2", "v2")]
    pub.publish(t, b'{"x":1}', 1, props=props)
    m = sub.take(on_topic(t), 1, "a publish with request/response properties")[0]
    for name, want in [("PayloadFormatIndicator", 1), ("ContentType", "application/json"),
                       ("ResponseTopic", ctx.topic("properties", v, "reply")),
                       ("CorrelationData", b"\x01\x02corr")]:
        expect(m.prop(name) == want, f"{sub.name}: {name} arrived as {m.prop(name)!r}, "
               f"sent {want!r}")
    users = [tuple(x) for x in (m.prop("UserProperty") or [])]
    expect(users == [("k1", "v1"), ("k2", "v2")],
           f"{sub.name}: user properties arrived as {users}")


def check_shared_subs(ctx, v):
    t = ctx.topic("shared_subs", v)
    a = ctx.client(v, "member-a")
    a.connect()
    offered = a.connack_property("SharedSubscriptionAvailable")
    shared = f"$share/g{ctx.run}/{t}"
    if offered == 0:
        code = a.subscribe(shared, 1, expect_codes="any")
        expect(code == 0x9E, f"{a.name}: the server says it has no shared subscriptions "
               f"but answered SUBSCRIBE {shared} with {code:#04x}, expected 0x9E")
        a.still_connected("after a refused shared subscription")
        return
    b = ctx.client(v, "member-b")
    b.connect()
    a.subscribe(shared, 1)
    b.subscribe(shared, 1)
    pub = ctx.client(v, "publisher")
    pub.connect()
    pub.publish(t, b"one of you", 1)
    time.sleep(QUIET)
    got = a.wait_for(on_topic(t), 1, 0) + b.wait_for(on_topic(t), 1, 0)
    expect(len(got) == 1, f"a message to a shared subscription reached {len(got)} "
           "members of the group, expected exactly one")


def check_server_keep_alive(ctx, v):
    most = ctx.args.max_keep_alive
    for asked in (most * 6, 0):
        c = ctx.client(v, f"keepalive-{asked}", keepalive=asked)
        c.connect()
        got = c.connack_property("ServerKeepAlive")
        expect(got == most, f"{c.name}: asked for keep alive {asked} s with a server "
               f"maximum of {most} s; CONNACK Server Keep Alive {got!r}")
        c.close()


def check_sub_refused(ctx, v):
    a = ctx.args
    c = ctx.client(v, f"user {a.username}", client_id=a.username, username=a.username,
                   password=a.password)
    c.connect()
    for attempt in ("", " (again)"):
        code = c.subscribe(a.forbidden_filter, 1, expect_codes="any")
        if v == 3:
            expect(code == 0x80, f"{c.name}: SUBACK for {a.forbidden_filter}{attempt} "
                   f"answered {code:#04x}, expected 0x80")
        else:
            expect(code >= 0x80, f"{c.name}: SUBACK for {a.forbidden_filter}{attempt} "
                   f"answered {code:#04x}, expected a reason code >= 0x80")
        c.still_connected(f"after the refused SUBSCRIBE{attempt}")
    if a.allowed_topic:
        c.publish(a.allowed_topic, a.allowed_payload.encode(), 1)
    c.still_connected("after the refused SUBSCRIBE")


def prepare_restart(ctx, v, state):
    cid, t = queue_while_offline(ctx, v, "session_restart")
    state[str(v)] = {"client_id": cid, "topic": t}


def resume_restart(ctx, v, state):
    entry = state.get(str(v))
    expect(entry is not None, f"no MQTT {VERSION_NAMES[v]} entry in the state file")
    receive_queued(ctx, v, entry["client_id"], entry["topic"])
    clean_up_session(ctx, v, entry["client_id"])


CHECK_FUNCS = {
    "keepalive0": check_keepalive0,
    "qos_matrix": check_qos_matrix,
    "session": check_session,
    "retained": check_retained,
    "dollar_topics": check_dollar_topics,
    "message_expiry": check_message_expiry,
    "no_local": check_no_local,
    "max_packet": check_max_packet,
    "topic_alias": check_topic_alias,
    "alias_misuse": check_alias_misuse,
    "receive_maximum": check_receive_maximum,
    "overlapping": check_overlapping,
    "properties": check_properties,
    "shared_subs": check_shared_subs,
    "server_keep_alive": check_server_keep_alive,
    "sub_refused": check_sub_refused,
}


def run_one(ctx, name, fn, failures):
    started = time.monotonic()
    try:
        fn()
        print(f"PASS {name} ({time.monotonic() - started:.1f} s)", flush=True)
    except CheckFailed as e:
        failures.append(name)
        print(f"FAIL {name}: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - a crash in a check is a failed check
        failures.append(name)
        detail = traceback.format_exc().strip().splitlines()[-3:]
        print(f"FAIL {name}: {type(e).__name__}: {e} | {' | '.join(detail)}", flush=True)
    finally:
        ctx.close_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="MQTT port (3.1.1, and 5 too)")
    ap.add_argument("--port-v5", type=int, help="MQTT 5 port when it is not --port")
    ap.add_argument("--only", nargs="+", metavar="CHECK", choices=CHECKS,
                    help="run only these checks")
    ap.add_argument("--protocol", choices=["3.1.1", "5", "both"], default="both")
    ap.add_argument("--phase", choices=["all", "prepare", "resume"], default="all",
                    help="all: every check but session_restart; prepare / resume: the two "
                    "halves of session_restart, around a broker restart")
    ap.add_argument("--state", help="state file written by prepare, read by resume")
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--forbidden-filter", help="a filter --username may not subscribe to")
    ap.add_argument("--allowed-topic",
                    help="sub_refused: a topic --username may publish to (a QoS 1 PUBLISH "
                    "there must be acknowledged after the refusal)")
    ap.add_argument("--allowed-payload", default="1.5")
    ap.add_argument("--strict-receive-maximum", action="store_true",
                    help="receive_maximum: require DISCONNECT 0x93 as section 4.9 says "
                    "(without it a refused PUBREC for the excess passes too)")
    ap.add_argument("--max-keep-alive", type=int,
                    help="server_keep_alive: the broker's maximum keep alive in seconds")
    args = ap.parse_args()
    versions = {"3.1.1": [3], "5": [5], "both": [3, 5]}[args.protocol]
    failures = []

    if args.phase in ("prepare", "resume"):
        if not args.state:
            ap.error(f"--phase {args.phase} needs --state FILE")
        if args.phase == "prepare":
            ctx = Context(args)
            state = {"run": ctx.run}
            for v in versions:
                run_one(ctx, f"session_restart.prepare[{VERSION_NAMES[v]}]",
                        lambda: prepare_restart(ctx, v, state), failures)
            with open(args.state, "w", encoding="utf-8") as f:
                json.dump(state, f)
        else:
            with open(args.state, encoding="utf-8") as f:
                state = json.load(f)
            ctx = Context(args, run=state["run"])
            for v in versions:
                run_one(ctx, f"session_restart[{VERSION_NAMES[v]}]",
                        lambda: resume_restart(ctx, v, state), failures)
        return 1 if failures else 0

    wanted = args.only or [c for c in CHECKS if c != "session_restart"]
    if "session_restart" in wanted:
        ap.error("session_restart runs with --phase prepare, a broker restart, "
                 "then --phase resume")
    sub_refused_ready = args.forbidden_filter and args.username and args.password
    if args.only and "sub_refused" in args.only and not sub_refused_ready:
        ap.error("sub_refused needs --forbidden-filter, --username and --password")
    ctx = Context(args)
    print(f"# run {ctx.run}: topics under {ctx.prefix}/, broker {args.host}:{args.port}"
          + (f" (MQTT 5 on {args.port_v5})" if args.port_v5 else ""), flush=True)
    for name in wanted:
        for v in versions:
            full = f"{name}[{VERSION_NAMES[v]}]"
            if name in V5_ONLY and v != 5:
                continue
            if name == "sub_refused" and not sub_refused_ready:
                print(f"SKIP {full}: needs --forbidden-filter, --username and --password",
                      flush=True)
                continue
            if name == "server_keep_alive" and not args.max_keep_alive:
                print(f"SKIP {full}: needs --max-keep-alive (the broker's setting)",
                      flush=True)
                continue
            run_one(ctx, full, lambda: CHECK_FUNCS[name](ctx, v), failures)
    print(f"# {len(failures)} failed" + (f": {' '.join(failures)}" if failures else ""),
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
