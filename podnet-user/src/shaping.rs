//! Pod bandwidth limits: the CNI `bandwidth` capability
//! (`runtimeConfig.bandwidth`, the conventions' units: rates in bit/s,
//! bursts in bits) and the token bucket filters that enforce them.
//!
//! Where each limit is enforced (the fast path's redirects skip every
//! qdisc, so the datapath routes shaped traffic through one):
//! - **ingress** (to the pod): a tbf on the host veth's egress. The
//!   datapath delivers to such a pod with `bpf_redirect` to that egress
//!   instead of `bpf_redirect_peer` (endpoint flag
//!   `ENDPOINT_F_SHAPED_INGRESS`), so same-node, overlay, underlay and
//!   stack deliveries all queue there.
//! - **egress** (from the pod): a tbf on an ifb device of the pod's own.
//!   from_pod checks the packet as always, then hands it to the ifb
//!   (`VethEndpoint::egress_shaper_ifindex`); ifb gives it back to the
//!   host veth's receive path past TC, and the host stack routes it.
//!
//! The tbf parameters are the reference `bandwidth` plugin's (same rate,
//! buffer and limit for the same input), so its CHECK and podnet's agree
//! on what a limit looks like in the kernel.

use serde::{Deserialize, Serialize};

/// `runtimeConfig.bandwidth` as libcni passes it. Zero means "no limit";
/// a rate needs a burst and the other way round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// bit/s into the pod.
    #[serde(default)]
    pub ingress_rate: u64,
    /// bits.
    #[serde(default)]
    pub ingress_burst: u64,
    /// bit/s out of the pod.
    #[serde(default)]
    pub egress_rate: u64,
    /// bits.
    #[serde(default)]
    pub egress_burst: u64,
}

/// How long a packet may wait in a tbf before it is dropped (the reference
/// plugin's `latencyInMillis`), in microseconds.
const LATENCY_US: u64 = 25_000;
/// Microseconds per second (`TIME_UNITS_PER_SEC`).
const US_PER_S: f64 = 1_000_000.0;
/// Scheduler ticks per microsecond: `/proc/net/psched` gives 1000 ns per
/// µs and 64 ns per tick (`PSCHED_SHIFT` 6, fixed since Linux 2.6.25).
const TICKS_PER_US: f64 = 1000.0 / 64.0;

impl Bandwidth {
    /// Whether no limit is set.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the values as the reference plugin does, with its messages,
    /// and that the kernel would take the token bucket (it refuses one
    /// whose buffer holds no byte at the rate: "invalid argument").
    pub fn validate(&self) -> Result<(), String> {
        validate_rate_and_burst(self.ingress_rate, self.ingress_burst)?;
        validate_rate_and_burst(self.egress_rate, self.egress_burst)?;
        for tbf in [self.ingress(), self.egress()].into_iter().flatten() {
            if !tbf.kernel_accepts() {
                return Err("create qdisc: invalid argument".to_owned());
            }
        }
        Ok(())
    }

    /// The token bucket of the ingress limit, if one is set.
    #[must_use]
    pub fn ingress(&self) -> Option<Tbf> {
        Tbf::new(self.ingress_rate, self.ingress_burst)
    }

    /// The token bucket of the egress limit, if one is set.
    #[must_use]
    pub fn egress(&self) -> Option<Tbf> {
        Tbf::new(self.egress_rate, self.egress_burst)
    }

    /// Where each set limit is enforced for the pod on `host_ifname`
    /// whose shaper is `shaper_ifname` (both named by
    /// [`crate::endpoint`]): (direction, device whose root holds the tbf,
    /// the tbf). The ingress limit sits on the host veth, the egress limit
    /// on the pod's shaper.
    #[must_use]
    pub fn placements(
        &self,
        host_ifname: &str,
        shaper_ifname: &str,
    ) -> Vec<(&'static str, String, Tbf)> {
        [
            ("ingress", host_ifname.to_owned(), self.ingress()),
            ("egress", shaper_ifname.to_owned(), self.egress()),
        ]
        .into_iter()
        .filter_map(|(direction, device, tbf)| Some((direction, device, tbf?)))
        .collect()
    }
}

impl std::fmt::Display for Bandwidth {
    /// `in 100Mbit/1Mbit out -` (rate/burst per direction).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let one = |rate: u64, burst: u64| {
            if rate == 0 {
                "-".to_owned()
            } else {
                format!("{}/{}", bits(rate), bits(burst))
            }
        };
        write!(
            f,
            "in {} out {}",
            one(self.ingress_rate, self.ingress_burst),
            one(self.egress_rate, self.egress_burst)
        )
    }
}

/// `100Mbit`, `1.5Gbit`, `800bit`.
fn bits(n: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let value = n as f64;
    for (unit, scale) in [("Tbit", 1e12), ("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)] {
        if value >= scale {
            return format!("{}{unit}", trim(value / scale));
        }
    }
    format!("{n}bit")
}

fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn validate_rate_and_burst(rate: u64, burst: u64) -> Result<(), String> {
    if burst == 0 && rate != 0 {
        return Err("if rate is set, burst must also be set".to_owned());
    }
    if rate == 0 && burst != 0 {
        return Err("if burst is set, rate must also be set".to_owned());
    }
    if burst / 8 >= u64::from(u32::MAX) {
        return Err("burst cannot be more than 4GB".to_owned());
    }
    Ok(())
}

/// A tbf qdisc's parameters as the kernel holds them (`tc_tbf_qopt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    /// Bytes per second.
    pub rate_bytes: u64,
    /// The bucket, in scheduler ticks at `rate_bytes`.
    pub buffer_ticks: u32,
    /// Bytes that may queue: 25 ms at the rate plus the burst.
    pub limit_bytes: u32,
}

impl Tbf {
    /// The reference plugin's `createTBF` for `rate_bits` bit/s and
    /// `burst_bits` bits; `None` unless both are set.
    #[must_use]
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // the reference plugin's float arithmetic, saturated like Go's conversions
    pub fn new(rate_bits: u64, burst_bits: u64) -> Option<Self> {
        if rate_bits == 0 || burst_bits == 0 {
            return None;
        }
        let rate_bytes = rate_bits / 8;
        let burst_bytes = u32::try_from(burst_bits / 8).unwrap_or(u32::MAX);
        if rate_bytes == 0 {
            // Under 8 bit/s: no byte per second; the kernel refuses it.
            return Some(Self {
                rate_bytes,
                buffer_ticks: 0,
                limit_bytes: burst_bytes,
            });
        }
        let burst_us = (f64::from(burst_bytes) * US_PER_S / rate_bytes as f64) as u32;
        let buffer_ticks = (f64::from(burst_us) * TICKS_PER_US) as u32;
        let queued = (rate_bytes as f64 * LATENCY_US as f64 / US_PER_S) as u32;
        Some(Self {
            rate_bytes,
            buffer_ticks,
            limit_bytes: queued.wrapping_add(burst_bytes),
        })
    }

    /// Whether `tbf_change` takes it: the bucket must hold at least one
    /// byte at the rate (`psched_ns_t2l(rate, buffer) > 0`, Linux 6.x).
    #[must_use]
    pub fn kernel_accepts(&self) -> bool {
        let buffer_ns = u128::from(self.buffer_ticks) << 6;
        u128::from(self.rate_bytes) * buffer_ns / 1_000_000_000 > 0
    }

    /// The `TCA_TBF_PARMS` payload (`struct tc_tbf_qopt`, 36 bytes) and,
    /// for rates of 4 GB/s and more, the `TCA_TBF_RATE64` value.
    #[must_use]
    pub fn to_qopt(&self) -> ([u8; 36], Option<u64>) {
        let mut qopt = [0u8; 36];
        // struct tc_ratespec rate: cell_log, linklayer, overhead,
        // cell_align, mpu, rate. TC_LINKLAYER_ETHERNET (1): the kernel
        // computes the times itself, no rate table needed.
        qopt[1] = 1;
        let rate32 = u32::try_from(self.rate_bytes).unwrap_or(u32::MAX);
        qopt[8..12].copy_from_slice(&rate32.to_ne_bytes());
        // peakrate (12..24) stays zero: no peak rate.
        qopt[24..28].copy_from_slice(&self.limit_bytes.to_ne_bytes());
        qopt[28..32].copy_from_slice(&self.buffer_ticks.to_ne_bytes());
        // mtu (32..36): only for a peak rate.
        let rate64 = (self.rate_bytes > u64::from(u32::MAX) - 1).then_some(self.rate_bytes);
        (qopt, rate64)
    }

    /// Reads a dumped `tc_tbf_qopt` (and `TCA_TBF_RATE64`, when present).
    #[must_use]
    pub fn from_qopt(qopt: &[u8], rate64: Option<u64>) -> Option<Self> {
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(qopt.get(at..at + 4)?.try_into().ok()?))
        };
        let rate32 = u64::from(word(8)?);
        Some(Self {
            rate_bytes: rate64.map_or(rate32, |r| r.max(rate32)),
            limit_bytes: word(24)?,
            buffer_ticks: word(28)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(json: &str) -> Bandwidth {
        serde_json::from_str(json).expect("parse")
    }

    #[test]
    fn reference_messages_for_bad_pairs() {
        let cases = [
            (
                r#"{"ingressRate":1000000}"#,
                "if rate is set, burst must also be set",
            ),
            (
                r#"{"egressBurst":1000}"#,
                "if burst is set, rate must also be set",
            ),
            (
                r#"{"egressRate":1000000,"egressBurst":40000000000}"#,
                "burst cannot be more than 4GB",
            ),
            // Rates the kernel refuses (no byte fits the bucket), as the
            // reference plugin reports them.
            (
                r#"{"ingressRate":100000000000000,"ingressBurst":1000000}"#,
                "create qdisc: invalid argument",
            ),
            (
                r#"{"ingressRate":100000000,"ingressBurst":10}"#,
                "create qdisc: invalid argument",
            ),
            (
                r#"{"ingressRate":18446744073709551615,"ingressBurst":1000000}"#,
                "create qdisc: invalid argument",
            ),
        ];
        for (json, message) in cases {
            assert_eq!(bw(json).validate(), Err(message.to_owned()), "{json}");
        }
        bw(r#"{"ingressRate":1000,"ingressBurst":100000}"#)
            .validate()
            .expect("a slow limit the reference plugin takes");
        bw(r#"{"ingressRate":8,"ingressBurst":800000}"#)
            .validate()
            .expect("one byte per second, as the reference plugin takes it");
        assert!(bw("{}").is_zero());
        assert!(serde_json::from_str::<Bandwidth>(r#"{"ingressRate":-1}"#).is_err());
    }

    #[test]
    fn token_bucket_matches_the_reference_plugin() {
        // 100 Mbit/s with a 1 Mbit burst: 12.5 MB/s, a bucket of 125,000
        // bytes = 10 ms = 156,250 ticks, 25 ms of queue plus the burst.
        let tbf = Tbf::new(100_000_000, 1_000_000).expect("set");
        assert_eq!(
            tbf,
            Tbf {
                rate_bytes: 12_500_000,
                buffer_ticks: 156_250,
                limit_bytes: 312_500 + 125_000,
            }
        );
        assert!(tbf.kernel_accepts());
        let (qopt, rate64) = tbf.to_qopt();
        assert_eq!(rate64, None);
        assert_eq!(Tbf::from_qopt(&qopt, rate64), Some(tbf));
        // 40 Gbit/s = 5 GB/s: beyond the 32-bit rate field.
        let fast = Tbf::new(40_000_000_000, 80_000_000).expect("set");
        let (qopt, rate64) = fast.to_qopt();
        assert_eq!(rate64, Some(5_000_000_000));
        assert_eq!(Tbf::from_qopt(&qopt, rate64), Some(fast));
        assert_eq!(Tbf::new(0, 1000), None);
        assert_eq!(Tbf::new(1000, 0), None);
    }

    #[test]
    fn limits_print_per_direction() {
        let limits = bw(r#"{"ingressRate":100000000,"ingressBurst":1000000}"#);
        assert_eq!(limits.to_string(), "in 100Mbit/1Mbit out -");
        let limits = bw(r#"{"egressRate":1500000000,"egressBurst":15000000}"#);
        assert_eq!(limits.to_string(), "in - out 1.5Gbit/15Mbit");
    }
}
