//! Scraping an agent's metrics endpoint from inside its node's netns, and
//! reading samples out of the exposition.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// An HTTP answer: status code and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// `GET path` from `addr` on a thread inside the named netns (an agent
/// listens in its node's netns; loopback there is not the test's).
/// HTTP/1.0, so the server closes after the answer.
pub fn get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<HttpAnswer> {
    let path = path.to_owned();
    crate::netns::run_in(netns, move || -> anyhow::Result<HttpAnswer> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        parse_answer(&raw)
    })?
}

fn parse_answer(raw: &str) -> anyhow::Result<HttpAnswer> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in {raw:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {raw:?}"))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned());
    Ok(HttpAnswer {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// One sample line of an exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    #[must_use]
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of an exposition (comments skipped). Label values with
/// escaped quotes are not needed here and not supported.
#[must_use]
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    rest.strip_suffix('}')?
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .filter_map(|pair| {
                            let (k, v) = pair.split_once("=\"")?;
                            Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                        })
                        .collect(),
                ),
                None => (series, Vec::new()),
            };
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`;
/// `None` when there is none, an error when several match.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Option<f64>> {
    let matching: Vec<Sample> = samples(text)
        .into_iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .collect();
    match matching.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.value)),
        many => anyhow::bail!(
            "{} samples of {name} match {labels:?}: {many:?}",
            many.len()
        ),
    }
}

/// [`value`] of a sample that counts something (a counter, a gauge of
/// entries): an error unless it is a whole number.
pub fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Option<u64>> {
    value(text, name, labels)?
        .map(|v| {
            anyhow::ensure!(
                v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53),
                "{name} {labels:?} is {v}, not a count"
            );
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked above
            Ok(v as u64)
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_with_their_labels() {
        let text = "# HELP x_total X.\n# TYPE x counter\nx_total{a=\"1\",b=\"two\"} 5\nx_total{a=\"2\",b=\"two\"} 7\ny 1.5\n# EOF\n";
        assert_eq!(value(text, "x_total", &[("a", "2")]).unwrap(), Some(7.0));
        assert_eq!(value(text, "y", &[]).unwrap(), Some(1.5));
        assert_eq!(value(text, "x_total", &[("a", "3")]).unwrap(), None);
        assert!(value(text, "x_total", &[("b", "two")]).is_err());
        assert_eq!(count(text, "x_total", &[("a", "1")]).unwrap(), Some(5));
        assert!(count(text, "y", &[]).is_err());
        let answer = parse_answer(
            "HTTP/1.0 503 Service Unavailable\r\ncontent-type: text/plain\r\n\r\nnot ready: x\n",
        )
        .unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.content_type.as_deref(), Some("text/plain"));
        assert_eq!(answer.body, "not ready: x\n");
    }
}
