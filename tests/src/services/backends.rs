//! The Service's backends and clients: the server that runs in a pod
//! (`podnet-lab serve`) and the TCP and UDP queries that probe it.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::NAMESPACE;
use crate::netns::run_in;

/// The backend server (`podnet-lab serve`), run inside a pod's netns until
/// killed, on every port of `tcp_ports` and `udp_ports` (the demo Service's
/// backends serve one of each; the NetworkPolicy e2e model's pods 80 and 81
/// of both). TCP: per connection a line `<name> <peer ip>:<peer port>`, then
/// an echo of everything until EOF. UDP: per datagram a reply from the same
/// socket, `<name> <peer ip>:<peer port> ` followed by the datagram.
pub fn serve(name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !tcp_ports.is_empty() || !udp_ports.is_empty(),
        "serve {name}: no port to serve"
    );
    // Every socket is bound before anything is served: a port taken fails
    // the server at once, not halfway.
    let listeners = tcp_ports
        .iter()
        .map(|port| {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, *port))
                .with_context(|| format!("binding TCP port {port}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let udp_sockets = udp_ports
        .iter()
        .map(|port| {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, *port))
                .with_context(|| format!("binding UDP port {port}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("serve {name}: tcp {tcp_ports:?}, udp {udp_ports:?} on 0.0.0.0");
    let mut threads = Vec::new();
    for udp in udp_sockets {
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || serve_udp(&udp, &name)));
    }
    for listener in listeners {
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || accept_tcp(&listener, &name)));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn accept_tcp(listener: &TcpListener, name: &str) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    if let Err(e) = serve_tcp(stream, &name) {
                        eprintln!("serve {name}: tcp connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("serve {name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_tcp(mut stream: TcpStream, name: &str) -> anyhow::Result<()> {
    let peer = stream.peer_addr()?;
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    let mut reader = stream.try_clone()?;
    std::io::copy(&mut reader, &mut stream)?;
    Ok(())
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                let mut reply = format!("{name} {peer} ").into_bytes();
                reply.extend_from_slice(&buf[..len]);
                if let Err(e) = socket.send_to(&reply, peer) {
                    eprintln!("serve {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("serve {name}: udp receive: {e}");
                // Not a busy loop if the error repeats.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `<name> <ip>:<port>` as the server writes it.
fn parse_hello(text: &str) -> anyhow::Result<(String, SocketAddrV4)> {
    let (name, addr) = text
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("unexpected greeting {text:?}"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("unexpected address in greeting {text:?}"))?;
    Ok((name.to_owned(), addr))
}

/// The greeting line, read a byte at a time so nothing after it (echoed
/// data) is consumed.
pub fn read_greeting(stream: &mut TcpStream) -> anyhow::Result<(String, SocketAddrV4)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 {
        let n = stream.read(&mut byte).context("reading the greeting")?;
        anyhow::ensure!(
            n == 1,
            "connection closed before the greeting ({} bytes)",
            line.len()
        );
        if byte[0] == b'\n' {
            return parse_hello(&String::from_utf8_lossy(&line));
        }
        line.push(byte[0]);
    }
    anyhow::bail!("greeting too long")
}

fn connect(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr.into(), timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Connects to `addr` from inside `netns` and returns who answered: the
/// backend's name and the source address the backend saw.
pub fn tcp_query(
    netns: &str,
    addr: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddrV4)> {
    run_in(netns, move || {
        let mut stream = connect(addr, timeout)?;
        read_greeting(&mut stream).with_context(|| format!("TCP to {addr}"))
    })?
}

/// A DNS query for `demo.default.svc.cluster.local` A: the server does not
/// parse it, but the bytes on the wire look like what pods send to a DNS
/// Service.
pub fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags: recursion desired; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["demo", NAMESPACE, "svc", "cluster", "local"] {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    // Root, QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends a DNS-shaped datagram to `addr` from inside `netns` and returns
/// who answered (backend name, the source address the backend saw). The
/// socket is connected, as a resolver's is: a reply from any other address
/// than `addr` (an un-NATed reply straight from a backend) is not accepted.
pub fn udp_query(
    netns: &str,
    addr: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddrV4)> {
    run_in(netns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket
            .connect(addr)
            .with_context(|| format!("connecting UDP to {addr}"))?;
        let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(0x5a5a);
        let query = dns_query(id);
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        // A few tries: the first datagram can be lost while neighbours are
        // resolved along the path.
        let mut last_err = anyhow::anyhow!("no reply from {addr} within {timeout:?}");
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            socket.set_read_timeout(Some(left.min(timeout / 3).max(Duration::from_millis(50))))?;
            socket
                .send(&query)
                .with_context(|| format!("UDP to {addr}"))?;
            match socket.recv(&mut buf) {
                Ok(len) => return parse_udp_reply(&buf[..len], &query),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    // E.g. ECONNREFUSED from an ICMP error; retry until the
                    // deadline, the path may still be settling.
                    last_err = anyhow::Error::new(e).context(format!("UDP from {addr}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Err(last_err)
    })?
}

pub fn parse_udp_reply(reply: &[u8], query: &[u8]) -> anyhow::Result<(String, SocketAddrV4)> {
    // `<name> <addr> <payload>`: the payload may hold any byte, so split on
    // the first two spaces only.
    let mut parts = reply.splitn(3, |b| *b == b' ');
    let name = parts.next().context("empty reply")?;
    let addr = parts.next().context("no address in the reply")?;
    let payload = parts.next().unwrap_or_default();
    anyhow::ensure!(
        payload == query,
        "the reply does not echo the query ({} bytes back)",
        payload.len()
    );
    parse_hello(&format!(
        "{} {}",
        String::from_utf8_lossy(name),
        String::from_utf8_lossy(addr)
    ))
}

/// Connect and read timeout of a [`TcpSession`].
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// A long-lived TCP connection to a backend (through a Service or not).
/// The socket belongs to the netns it was opened in, so the session can be
/// used from any thread afterwards.
pub struct TcpSession {
    stream: TcpStream,
    /// The backend that answered.
    pub backend: String,
    /// The source address the backend saw.
    pub seen_as: SocketAddrV4,
}

/// Opens a [`TcpSession`] to `addr` from inside `netns`.
pub fn tcp_session(netns: &str, addr: SocketAddrV4) -> anyhow::Result<TcpSession> {
    run_in(netns, move || {
        let mut stream = connect(addr, SESSION_TIMEOUT)?;
        let (backend, seen_as) =
            read_greeting(&mut stream).with_context(|| format!("TCP to {addr}"))?;
        Ok(TcpSession {
            stream,
            backend,
            seen_as,
        })
    })?
}

impl TcpSession {
    /// Sends `msg` and checks that exactly it comes back.
    pub fn echo(&mut self, msg: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(msg)
            .with_context(|| format!("writing to the session with {}", self.backend))?;
        let mut back = vec![0u8; msg.len()];
        self.stream
            .read_exact(&mut back)
            .with_context(|| format!("reading the echo from {}", self.backend))?;
        anyhow::ensure!(back == msg, "{} echoed something else", self.backend);
        Ok(())
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }
}

/// A long-lived UDP flow to a Service (DNS-shaped): one connected socket,
/// so every query has the same 5-tuple, as a resolver's retries or a
/// streaming client's datagrams do. Usable from any thread.
pub struct UdpSession {
    socket: UdpSocket,
    addr: SocketAddrV4,
}

/// Opens a [`UdpSession`] to `addr` from inside `netns`.
pub fn udp_session(netns: &str, addr: SocketAddrV4) -> anyhow::Result<UdpSession> {
    run_in(netns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket
            .connect(addr)
            .with_context(|| format!("connecting UDP to {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(UdpSession { socket, addr })
    })?
}

impl UdpSession {
    /// Sends one query (a few tries, a datagram may be lost) and returns
    /// the backend that answered.
    pub fn ask(&self) -> anyhow::Result<String> {
        let query = dns_query(0x4242);
        let mut buf = vec![0u8; 2048];
        let mut last_err = anyhow::anyhow!("no answer from {}", self.addr);
        for _ in 0..6 {
            self.socket
                .send(&query)
                .with_context(|| format!("UDP to {}", self.addr))?;
            match self.socket.recv(&mut buf) {
                Ok(len) => return parse_udp_reply(&buf[..len], &query).map(|(name, _)| name),
                Err(e) => {
                    last_err = anyhow::Error::new(e).context(format!("UDP from {}", self.addr));
                }
            }
        }
        Err(last_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_reply_parses() {
        let query = dns_query(7);
        let mut reply = b"node1-pod1 10.244.0.3:40000 ".to_vec();
        reply.extend_from_slice(&query);
        let (name, addr) = parse_udp_reply(&reply, &query).unwrap();
        assert_eq!(name, "node1-pod1");
        assert_eq!(addr, "10.244.0.3:40000".parse().unwrap());
        assert!(parse_udp_reply(b"x 1.2.3.4:5 other", &query).is_err());
    }
}
