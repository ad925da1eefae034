//! Promise: an uplink to a slow gateway connects. A gateway that takes longer than a few
//! milliseconds to answer CONNECT (a busy broker, a slow link) still gets the backlog.
//!
//! The story (found by the fault lab's partition trial, `tests/tests/faultlab.rs`): after
//! a failover on a loaded machine, the new leader's uplinks stayed "connecting" for 87 s
//! while the gateway saw ~23 connections a second opened and closed before their CONNACK.
//! The uplink's select loop dropped rumqttc's `poll()` — which does TCP, CONNECT and
//! CONNACK inside one future — every time the buffer's head moved or its 20 ms tick
//! fired, and started a new connection on the next turn. Here every byte from the
//! gateway is delayed by 100 ms, so no CONNACK ever beats the tick: before the fix the
//! gateway received nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_tests::{Agent, AgentOptions, DeviceSpec, Fleet, Gateway};

const DELAY: Duration = Duration::from_millis(100);

/// Forwards to `upstream`; everything coming back waits `DELAY` first.
struct SlowProxy {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl SlowProxy {
    fn start(upstream: SocketAddr) -> anyhow::Result<SlowProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        let (st1, st2) = (s.clone(), s.clone());
                        std::thread::spawn(move || pump(client, server, Duration::ZERO, st1));
                        std::thread::spawn(move || pump(s2, c2, DELAY, st2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(SlowProxy {
            addr,
            connections,
            stop,
        })
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn an_uplink_connects_to_a_gateway_that_answers_slowly() -> anyhow::Result<()> {
    let mut gw = Gateway::start(&[])?;
    let proxy = SlowProxy::start(gw.mqtt_addr())?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", proxy.addr)
            .env("FOGLINE_NODE__SITE", "site-slow")
            .env("FOGLINE_NODE__ID", "edge-slow"),
    )?;
    // Steady ingest: the buffer's head moves every few milliseconds.
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..2 {
        let mut spec = DeviceSpec::json(format!("slow-{i}"), "temp", 1);
        spec.interval = Some(Duration::from_millis(2));
        spec.window = 500;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    let started = Instant::now();
    let mut stored = 0;
    while started.elapsed() < Duration::from_secs(20) {
        stored = gw.next_offset("site-slow", "edge-slow")?;
        if stored > 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = agent.status()?;
    let connections = proxy.connections.load(Ordering::SeqCst);
    eprintln!(
        "gateway holds {stored} readings after {:.1} s; {connections} connections through the \
         slow proxy; uplink {}",
        started.elapsed().as_secs_f64(),
        status["backlog"]["gateway"]
    );
    assert!(
        stored > 1000,
        "the uplink never got through to a gateway answering in {DELAY:?}: {} connections, \
         uplink {}",
        connections,
        status["backlog"]["gateway"]
    );
    assert!(
        connections <= 3,
        "{connections} connections for one uplink: connects were abandoned"
    );
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;
    Ok(())
}
