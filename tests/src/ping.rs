//! A pinger that counts exactly: ICMP echo requests at a fixed interval from
//! a namespace, every reply matched to its request by sequence number.
//! `ping(8)` stopped with a signal counts the request still in flight as
//! lost, so "0 lost" could not be asserted with it; this one stops sending,
//! then waits for the outstanding replies.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, sendto,
        setsockopt, socket, sockopt,
    },
    time::TimeVal,
};

/// How long [`Pinger::finish`] waits for the last replies.
const LINGER: Duration = Duration::from_secs(2);

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Default)]
pub struct PingReport {
    pub sent: u64,
    pub received: u64,
    /// When (since the start) each lost request was sent.
    pub lost_at: Vec<Duration>,
    /// The slowest reply.
    pub max_rtt: Duration,
    pub interval: Duration,
    pub duration: Duration,
}

impl PingReport {
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// `sent N, lost M (first losses at ...), max rtt R`.
    #[must_use]
    pub fn summary(&self) -> String {
        let first: Vec<String> = self
            .lost_at
            .iter()
            .take(5)
            .map(|t| format!("{:.2}s", t.as_secs_f64()))
            .collect();
        format!(
            "{} pings every {} ms over {:.1} s: {} lost{}, max rtt {:.1} ms",
            self.sent,
            self.interval.as_millis(),
            self.duration.as_secs_f64(),
            self.lost(),
            if first.is_empty() {
                String::new()
            } else {
                format!(" (sent at {} ...)", first.join(", "))
            },
            self.max_rtt.as_secs_f64() * 1000.0
        )
    }
}

/// Pings `target` from `netns` every `interval` until [`Pinger::finish`].
pub struct Pinger {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<PingReport>>,
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

fn echo_request(id: u16, seq: u16) -> [u8; 24] {
    let mut packet = [0u8; 24];
    packet[0] = 8; // echo request
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..].copy_from_slice(b"podnet-test-ping");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The sequence number of an echo reply from `target` with `id` in a raw
/// IPv4 packet.
fn echo_reply_seq(packet: &[u8], target: Ipv4Addr, id: u16) -> Option<u16> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    (src == target
        && *icmp.first()? == 0
        && u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]) == id)
        .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

impl Pinger {
    pub fn start(netns: &str, target: Ipv4Addr, interval: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let (stop_flag, sent_count, received_count) =
            (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&received));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = crate::netns::spawn_in(netns, move || -> anyhow::Result<PingReport> {
            // Created on the namespace's thread: the socket belongs to the
            // pod's netns.
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )?;
            setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 2_000))?;
            ready_tx.send(()).ok();
            let id = u16::try_from(std::process::id() & 0xffff)?
                ^ u16::try_from(target.to_bits() & 0xffff)?;
            let to = SockaddrIn::from(std::net::SocketAddrV4::new(target, 0));
            let start = Instant::now();
            let mut sent_at: Vec<Instant> = Vec::new();
            let mut replied: Vec<bool> = Vec::new();
            let mut report = PingReport {
                interval,
                ..PingReport::default()
            };
            let mut next_send = start;
            let mut stopped_at: Option<Instant> = None;
            let mut buf = [0u8; 1500];
            loop {
                let now = Instant::now();
                if stopped_at.is_none() && stop_flag.load(Ordering::Relaxed) {
                    stopped_at = Some(now);
                }
                match stopped_at {
                    None if now >= next_send => {
                        let n = sent_at.len();
                        let packet = echo_request(id, u16::try_from(n & 0xffff)?);
                        // A send that fails (no route) is a lost ping, not
                        // a failed test.
                        let _ = sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty());
                        sent_at.push(now);
                        replied.push(false);
                        sent_count.fetch_add(1, Ordering::Relaxed);
                        next_send += interval;
                    }
                    Some(at) if replied.iter().all(|r| *r) || now.duration_since(at) > LINGER => {
                        break;
                    }
                    _ => {}
                }
                let Ok((len, _)) = recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) else {
                    continue;
                };
                let Some(seq) = echo_reply_seq(&buf[..len], target, id) else {
                    continue;
                };
                // The newest request with this 16-bit sequence number.
                let newest = sent_at.len().saturating_sub(1);
                let back = (newest & 0xffff).wrapping_sub(usize::from(seq)) & 0xffff;
                let Some(n) = newest.checked_sub(back) else {
                    continue;
                };
                if !replied[n] {
                    replied[n] = true;
                    received_count.fetch_add(1, Ordering::Relaxed);
                    report.max_rtt = report.max_rtt.max(sent_at[n].elapsed());
                }
            }
            report.sent = sent_at.len() as u64;
            report.received = replied.iter().filter(|r| **r).count() as u64;
            report.lost_at = sent_at
                .iter()
                .zip(&replied)
                .filter(|(_, r)| !**r)
                .map(|(t, _)| t.duration_since(start))
                .collect();
            report.duration = stopped_at.unwrap_or_else(Instant::now) - start;
            Ok(report)
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow::anyhow!("the pinger did not start"))?;
        Ok(Self {
            stop,
            sent,
            received,
            thread,
        })
    }

    /// (sent, received) so far; replies to the last requests may still be
    /// on their way.
    #[must_use]
    pub fn progress(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Stops sending, waits for the outstanding replies, and reports.
    pub fn finish(self) -> anyhow::Result<PingReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the pinger panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_matched() {
        let request = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&request),
            0,
            "a packet with its checksum sums to 0"
        );
        // The reply as the kernel returns it on a raw socket: IPv4 header,
        // then the ICMP message with type 0.
        let mut reply = vec![
            0x45, 0, 0, 44, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 2, 10, 244, 0, 2,
        ];
        let mut icmp = request.to_vec();
        icmp[0] = 0;
        reply.extend(icmp);
        let target = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(echo_reply_seq(&reply, target, 0x1234), Some(7));
        assert_eq!(
            echo_reply_seq(&reply, target, 0x1235),
            None,
            "another pinger's"
        );
        assert_eq!(
            echo_reply_seq(&reply, Ipv4Addr::new(10, 244, 1, 3), 0x1234),
            None,
            "another host's"
        );
        assert_eq!(
            echo_reply_seq(&reply[..22], target, 0x1234),
            None,
            "cut short"
        );
    }
}
