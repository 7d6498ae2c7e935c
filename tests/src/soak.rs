//! The long soak (`cargo xtask soak`): a 2-node lab under ping floods (same
//! node, cross node both ways) and a cross-node iperf3 TCP stream while
//! every agent is restarted again and again, alternately stopped (SIGTERM)
//! and killed (SIGKILL). `tests/tests/restarts.rs` is its short version.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    lab::{LabDatastore, LabGuard},
    netns::command_in,
    traffic::{LabFloods, PingResult},
};

/// Pings per second of a flood (`ping -i 0.005`).
const PINGS_PER_SECOND: f64 = 200.0;

/// What one soak measured.
#[derive(Debug)]
pub struct SoakReport {
    pub mode: String,
    pub restarts: usize,
    pub kills: usize,
    pub floods: Vec<(String, PingResult)>,
    /// Whether the iperf3 stream ran to its end without an error, and
    /// what it moved.
    pub iperf_ok: bool,
    pub iperf_bytes: u64,
    pub took: Duration,
}

impl SoakReport {
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.floods.iter().map(|(_, r)| r.sent - r.received).sum()
    }

    #[must_use]
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "soak {}: {} agent restarts ({} of them kill -9) in {:.0} s\n",
            self.mode,
            self.restarts,
            self.kills,
            self.took.as_secs_f64()
        );
        for (path, r) in &self.floods {
            let _ = writeln!(
                out,
                "  ping {path:<16} {:>8} sent {:>6} lost",
                r.sent,
                r.sent - r.received
            );
        }
        #[allow(clippy::cast_precision_loss, reason = "a figure for people")]
        let gb = self.iperf_bytes as f64 / 1e9;
        let _ = writeln!(
            out,
            "  iperf3 cross node: {} ({gb:.1} GB moved)",
            if self.iperf_ok {
                "ran through"
            } else {
                "FAILED"
            },
        );
        out
    }
}

struct Iperf {
    server: Child,
    client: Child,
}

impl Drop for Iperf {
    fn drop(&mut self) {
        for child in [&mut self.client, &mut self.server] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the soak for about `minutes` in `mode` with `restarts_per_agent`
/// restarts of each agent spread over it.
pub fn run(mode: &str, minutes: f64, restarts_per_agent: usize) -> anyhow::Result<SoakReport> {
    let mut lab = LabGuard::up(
        &format!("soak{}", &mode[..1]),
        2,
        2,
        mode,
        LabDatastore::File,
    )?;
    let pod = |name: &str| {
        lab.layout
            .pod(name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no pod {name}"))
    };
    let (b, d) = (pod("node1-pod2")?, pod("node2-pod2")?);
    let seconds = (minutes * 60.0).max(10.0);
    // Enough pings for the whole soak plus the last restart's settling.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive count far below u32::MAX"
    )]
    let count = (seconds * PINGS_PER_SECOND) as u32;
    let mut floods = LabFloods::start(&lab.layout, count)?;
    let iperf_seconds = (seconds - 5.0).max(5.0);
    let server = command_in(&d.netns, "iperf3")?
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let client = command_in(&b.netns, "iperf3")?
        .args(["-c", &d.ip.to_string(), "-J", "-t"])
        .arg(format!("{iperf_seconds:.0}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut iperf = Iperf { server, client };

    let started = Instant::now();
    let total = 2 * restarts_per_agent;
    let spacing = Duration::from_secs_f64((seconds - 5.0).max(1.0))
        / u32::try_from(total.max(1)).unwrap_or(u32::MAX);
    let (mut restarts, mut kills) = (0, 0);
    for round in 0..restarts_per_agent {
        for node in ["node1", "node2"] {
            let due = spacing * u32::try_from(restarts).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            if round % 2 == 1 {
                lab.layout.kill_agent(node)?;
                kills += 1;
            } else {
                lab.layout.stop_agent(node)?;
            }
            std::thread::sleep(Duration::from_millis(200));
            lab.layout.start_agent(node)?;
            restarts += 1;
        }
    }
    if let Some(path) = floods.ended() {
        anyhow::bail!("{path}: the flood ended before the restarts did");
    }
    let mut report = SoakReport {
        mode: mode.to_owned(),
        restarts,
        kills,
        floods: Vec::new(),
        iperf_ok: false,
        iperf_bytes: 0,
        took: Duration::ZERO,
    };
    for (path, result) in floods.finish()? {
        report.floods.push((path.to_owned(), result));
    }
    let mut json = String::new();
    if let Some(mut out) = iperf.client.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut json)?;
    }
    let status = iperf.client.wait()?;
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    report.iperf_bytes = parsed["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    report.iperf_ok = status.success() && parsed.get("error").is_none() && report.iperf_bytes > 0;
    report.took = started.elapsed();
    Ok(report)
}
