//! rumqttd as the gateway's network broker: [`embed`] starts it on its own thread with its
//! listeners and returns the in-process links the gateway reads and publishes through.
//! `Broker::start` blocks forever and only logs a failed bind, so the ports are checked
//! here before and after.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fogline_agent::ops::config::MqttConfig;
use fogline_agent::router::{BrokerError, Link};
use rumqttd::{ConnectionSettings, ServerSettings};

fn settings(name: &str, listen: SocketAddr, mqtt: &MqttConfig) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: mqtt.connect_timeout_ms,
            max_payload_size: mqtt.max_packet_bytes,
            max_inflight_count: mqtt.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Waits until `addr` answers an MQTT CONNECT with a CONNACK, then disconnects politely.
/// A plain TCP probe would make rumqttd log an error, and would not tell our broker from
/// another program on the port.
fn wait_listening(addr: SocketAddr, v5: bool) -> Result<(), BrokerError> {
    let target = loopback_for(addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if probe(target, v5).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}

fn probe(target: SocketAddr, v5: bool) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const ID: &[u8] = b"fogline-probe";
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    // CONNECT: protocol name, level, clean start, keepalive 10 s, [no properties], client id.
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0x02,
        0,
        10,
    ];
    if v5 {
        body.push(0);
    }
    body.extend([0, ID.len() as u8]);
    body.extend(ID);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    stream.write_all(&packet)?;
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    if head[0] != 0x20 {
        return Err(std::io::Error::other("not an MQTT broker"));
    }
    let mut rest = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut rest)?;
    let disconnect: &[u8] = if v5 { &[0xe0, 1, 0] } else { &[0xe0, 0] };
    stream.write_all(disconnect)?;
    Ok(())
}

/// Starts rumqttd on its own thread with the listeners of `mqtt` and returns one local
/// link per `(name, filters)` in `links`, once every listener answers MQTT.
///
/// Each link subscribes to its filters before any listener opens: a client that connects
/// the moment the port opens must not publish into a broker that nobody inside listens to
/// yet (its PUBACK would promise a delivery that never happens).
pub fn embed(
    mqtt: &MqttConfig,
    bulk_filters: &[&str],
    links: &[(&str, &[&str])],
) -> Result<Vec<Link>, BrokerError> {
    let v5 = mqtt
        .listen_v5_addr()
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let listeners: Vec<SocketAddr> = std::iter::once(mqtt.listen).chain(v5).collect();
    // rumqttd only logs a failed bind, so find out first.
    for &addr in &listeners {
        TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    }
    let mut broker_config = rumqttd::Config {
        router: fogline_agent::router::router_config(mqtt.max_connections, bulk_filters),
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            settings("v4", mqtt.listen, mqtt),
        )])),
        ..Default::default()
    };
    if let Some(addr) = v5 {
        broker_config.v5 = Some(HashMap::from([(
            "v5".to_owned(),
            settings("v5", addr, mqtt),
        )]));
    }
    let mut broker = rumqttd::Broker::new(broker_config);
    let mut made = Vec::with_capacity(links.len());
    for (name, filters) in links {
        let (mut tx, rx) = broker.link(name)?;
        for filter in *filters {
            tx.subscribe(*filter)?;
        }
        made.push((tx, rx));
    }
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(format!("cannot start the broker thread: {e}")))?;
    wait_listening(mqtt.listen, false)?;
    if let Some(addr) = v5 {
        wait_listening(addr, true)?;
    }
    for &addr in &listeners {
        match nodelay::on_listeners(addr) {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                tracing::warn!(%addr, "could not find the broker's listener to turn Nagle off; acks may be delayed by ~40 ms")
            }
            Err(e) => {
                tracing::warn!(%addr, "could not turn Nagle off on the broker's listener ({e}); acks may be delayed by ~40 ms")
            }
        }
    }
    Ok(made)
}

/// Nagle off on rumqttd's listeners.
mod nodelay {

    use std::net::SocketAddr;

    /// Sets `TCP_NODELAY` on every listening TCP socket of this process bound to `addr`.
    /// Returns how many it changed.
    #[cfg(target_os = "linux")]
    pub fn on_listeners(addr: SocketAddr) -> std::io::Result<usize> {
        use rustix::net::sockopt;
        use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

        let me = pidfd_open(getpid(), PidfdFlags::empty())?;
        let mut changed = 0;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Ok(num) = entry?.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(fd) = pidfd_getfd(&me, num, PidfdGetfdFlags::empty()) else {
                continue;
            };
            let Ok(local) = rustix::net::getsockname(&fd) else {
                continue; // not a socket
            };
            let Ok(local) = SocketAddr::try_from(local) else {
                continue; // not an IP socket
            };
            if local == addr && sockopt::socket_acceptconn(&fd).unwrap_or(false) {
                sockopt::set_tcp_nodelay(&fd, true)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn on_listeners(_addr: SocketAddr) -> std::io::Result<usize> {
        Ok(0)
    }

    #[cfg(all(test, target_os = "linux"))]
    mod tests {
        use super::*;

        #[test]
        fn accepted_sockets_inherit_nodelay_from_a_listener_found_by_address() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            assert_eq!(on_listeners(addr).expect("set"), 1);
            let _client = std::net::TcpStream::connect(addr).expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            assert!(accepted.nodelay().expect("nodelay"));
        }
    }
}
