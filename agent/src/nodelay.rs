//! Turns Nagle's algorithm off on the embedded broker's listening sockets.
//!
//! rumqttd never sets `TCP_NODELAY`. Its small writes to a sensor (a PUBACK, then the
//! ack watermark) then wait for the sensor's delayed TCP ACK, about 40 ms each on Linux,
//! which put publish-to-ack latency at ~90 ms and capped a device's throughput. Linux
//! accepted sockets inherit `TCP_NODELAY` from their listener, so setting it once on
//! rumqttd's listeners fixes every connection. rumqttd does not expose its sockets, so we
//! find them among this process's file descriptors by their bound address, through a
//! duplicate from `pidfd_getfd(2)` (safe API, same open socket). Linux 5.6+; elsewhere or
//! on failure this is a no-op with a warning. It goes away when the agent owns its MQTT
//! front end.

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
