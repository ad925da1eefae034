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
    "sub_refused",
    "session_restart",
]
V5_ONLY = {"message_expiry", "no_local", "max_packet"}
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
                 password=None):
        self.ctx = ctx
        self.version = version
        self.name = f"{name}[{VERSION_NAMES[version]}]"
        self.cid = client_id or ctx.client_id(version)
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.max_packet = max_packet
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
            self.cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, granted, properties=None):
        codes = [g.value if hasattr(g, "value") else g for g in granted]
        with self.cond:
            self.subacks[mid] = codes
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg):
        with self.cond:
            self.received.append(Message(msg))
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

    def subscribe(self, topic, qos=1, no_local=False, rap=False, rh=0, expect_codes=None):
        """SUBSCRIBE one filter and wait for its SUBACK; returns the code.

        By default the code must grant exactly `qos`."""
        if self.version == 5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap,
                                    retainHandling=rh)
            rc, mid = self.c.subscribe(topic, options=opts)
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

    def publish(self, topic, payload, qos=1, retain=False, expiry=None, wait=True):
        props = None
        if self.version == 5 and expiry is not None:
            props = Properties(PacketTypes.PUBLISH)
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
            run_one(ctx, full, lambda: CHECK_FUNCS[name](ctx, v), failures)
    print(f"# {len(failures)} failed" + (f": {' '.join(failures)}" if failures else ""),
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
