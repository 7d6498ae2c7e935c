//! Traffic between test namespaces, generated in-process: a TCP transfer
//! whose every byte is checked at the receiver.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::spawn_in;

fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Distinct per test process; namespaces are private, so clashes only
    // matter inside one namespace.
    20_000 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Byte `i` of the test stream: a pattern that makes reordering, loss or
/// duplication visible.
fn pattern(i: u64) -> u8 {
    #[allow(clippy::cast_possible_truncation, reason = "intentional wrap")]
    let b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    b
}

/// A receiver in `netns` on `ip`; its join handle yields how many bytes
/// arrived intact before the sender closed (an error on the first bad byte).
pub fn receiver(
    netns: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<(SocketAddrV4, JoinHandle<anyhow::Result<u64>>)> {
    let addr = SocketAddrV4::new(ip, next_port());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(netns, move || -> anyhow::Result<u64> {
        let listener = TcpListener::bind(addr)?;
        ready_tx.send(()).ok();
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(received);
            }
            for (k, byte) in buf[..n].iter().enumerate() {
                let at = received + k as u64;
                anyhow::ensure!(
                    *byte == pattern(at),
                    "byte {at} is wrong: the stream lost or reordered data"
                );
            }
            received += n as u64;
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow::anyhow!("receiver did not start"))?;
    Ok((addr, handle))
}

/// Sends `bytes` of the pattern from `netns` to `to`; returns bytes sent.
pub fn send(netns: &str, to: SocketAddrV4, bytes: u64) -> anyhow::Result<u64> {
    spawn_in(netns, move || -> anyhow::Result<u64> {
        let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 64 * 1024];
        while sent < bytes {
            let n = usize::try_from((bytes - sent).min(chunk.len() as u64))?;
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + k as u64);
            }
            stream.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        Ok(sent)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

/// A full transfer of `bytes` from `from` to `to_ip` in `to`; checks every byte.
pub fn transfer(from: &str, to: &str, to_ip: Ipv4Addr, bytes: u64) -> anyhow::Result<()> {
    let (addr, rx) = receiver(to, to_ip)?;
    let sent = send(from, addr, bytes)?;
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    anyhow::ensure!(
        sent == bytes && received == bytes,
        "sent {sent}, received {received} of {bytes}"
    );
    Ok(())
}

/// A stream that keeps sending until stopped: for "traffic keeps flowing
/// while X happens" tests.
pub struct Stream {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<anyhow::Result<u64>>,
    receiver: JoinHandle<anyhow::Result<u64>>,
}

impl Stream {
    pub fn start(from: &str, to: &str, to_ip: Ipv4Addr) -> anyhow::Result<Self> {
        let (addr, receiver) = receiver(to, to_ip)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let sender = spawn_in(from, move || -> anyhow::Result<u64> {
            let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
            // A stall longer than this is a failure, not a slow network.
            stream.set_write_timeout(Some(Duration::from_secs(10)))?;
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 16 * 1024];
            while !flag.load(Ordering::Relaxed) {
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(sent + k as u64);
                }
                stream.write_all(&chunk)?;
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(sent)
        })?;
        Ok(Self {
            stop,
            sender,
            receiver,
        })
    }

    /// Stops sending; returns (sent, received intact).
    pub fn finish(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let received = self
            .receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        Ok((sent, received))
    }
}

/// A `ping` flood (200 per second) from a namespace, counted by ping itself.
pub struct PingFlood {
    child: std::process::Child,
}

/// What a finished flood counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResult {
    pub sent: u64,
    pub received: u64,
}

impl PingFlood {
    /// Starts `count` pings to `dst` from `netns`, one every 5 ms, each
    /// waited for up to 1 s.
    pub fn start(netns: &str, dst: Ipv4Addr, count: u32) -> anyhow::Result<Self> {
        let child = crate::netns::command_in(netns, "ping")?
            .args(["-q", "-i", "0.005", "-W", "1", "-c", &count.to_string()])
            .arg(dst.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    /// Whether ping is still sending.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for ping to finish and reads its summary.
    pub fn finish(mut self) -> anyhow::Result<PingResult> {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        self.child.wait()?;
        parse_ping_summary(&out).ok_or_else(|| anyhow::anyhow!("no ping summary in {out:?}"))
    }
}

impl Drop for PingFlood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// "N packets transmitted, M received, ..." of ping's summary.
fn parse_ping_summary(out: &str) -> Option<PingResult> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(str::parse::<u64>);
    Some(PingResult {
        sent: numbers.next()?.ok()?,
        received: numbers.next()?.ok()?,
    })
}

/// Ping floods over the three paths of a two-node lab: same node
/// (node1-pod1 -> node1-pod2) and cross node both ways (node1-pod1 ->
/// node2-pod1, node2-pod1 -> node1-pod2).
pub struct LabFloods {
    floods: Vec<(&'static str, PingFlood)>,
}

impl LabFloods {
    /// Starts `count` pings on each path.
    pub fn start(layout: &crate::lab::LabLayout, count: u32) -> anyhow::Result<Self> {
        let pod = |name: &str| {
            layout
                .pod(name)
                .ok_or_else(|| anyhow::anyhow!("the lab has no pod {name}"))
        };
        let (a, b, c) = (pod("node1-pod1")?, pod("node1-pod2")?, pod("node2-pod1")?);
        Ok(Self {
            floods: vec![
                ("same node", PingFlood::start(&a.netns, b.ip, count)?),
                ("node1 -> node2", PingFlood::start(&a.netns, c.ip, count)?),
                ("node2 -> node1", PingFlood::start(&c.netns, b.ip, count)?),
            ],
        })
    }

    /// The path whose flood already ended, if any (a measurement that must
    /// cover some event needs every flood still running after it).
    pub fn ended(&mut self) -> Option<&'static str> {
        self.floods
            .iter_mut()
            .find_map(|(path, flood)| (!flood.running()).then_some(*path))
    }

    /// Waits for every flood and returns what each counted.
    pub fn finish(self) -> anyhow::Result<Vec<(&'static str, PingResult)>> {
        self.floods
            .into_iter()
            .map(|(path, flood)| Ok((path, flood.finish()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_summaries_parse() {
        let out = "--- 10.0.0.2 ping statistics ---\n\
                   6000 packets transmitted, 5987 received, 0.2% packet loss, time 30123ms\n";
        assert_eq!(
            super::parse_ping_summary(out),
            Some(super::PingResult {
                sent: 6000,
                received: 5987
            })
        );
        assert_eq!(super::parse_ping_summary("nothing"), None);
    }
}
