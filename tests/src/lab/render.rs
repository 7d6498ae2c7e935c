//! How a check's probes are shown (`podnet-lab check`).

use std::fmt::Write as _;

use super::checks::Probe;

/// The matrix as text: one row per source, one column per destination.
#[must_use]
pub fn render(probes: &[Probe]) -> String {
    // Pods first, then nodes, then the outside host.
    let rank = |name: &str| {
        if name.contains("-pod") {
            0
        } else if name.starts_with("node") {
            1
        } else {
            2
        }
    };
    let mut rows: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    for p in probes {
        if !rows.contains(&p.from) {
            rows.push(p.from.clone());
        }
        if !cols.contains(&p.to) {
            cols.push(p.to.clone());
        }
    }
    rows.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    cols.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let width = cols
        .iter()
        .chain(rows.iter())
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4)
        + 1;
    let mut out = format!("{:width$}", "from \\ to");
    for c in &cols {
        let _ = write!(out, "{c:>width$}");
    }
    out.push('\n');
    for r in &rows {
        let _ = write!(out, "{r:width$}");
        for c in &cols {
            let cell = probes
                .iter()
                .find(|p| &p.from == r && &p.to == c)
                .map_or("-", |p| if p.ok { "ok" } else { "FAIL" });
            let _ = write!(out, "{cell:>width$}");
        }
        out.push('\n');
    }
    let failed: Vec<&Probe> = probes.iter().filter(|p| !p.ok).collect();
    let _ = write!(out, "\n{} checks, {} failed\n", probes.len(), failed.len());
    for f in failed {
        let _ = writeln!(
            out,
            "  FAIL {} -> {} ({}): {}",
            f.from, f.to, f.kind, f.detail
        );
    }
    out
}
