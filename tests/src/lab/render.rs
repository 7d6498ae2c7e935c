//! How a check's probes are shown (`podnet-lab check`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
};

use super::checks::Probe;

/// Sources or destinations up to which the check is drawn as a grid; a
/// larger lab gets a line per kind of probe (and its failures either way).
const MAX_GRID_ROWS: usize = 48;

/// The matrix as text: one row per source, one column per destination (a
/// summary per kind of probe in a large lab), then every failure.
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
    let distinct = |end: fn(&Probe) -> &String| -> Vec<String> {
        let names: BTreeSet<&String> = probes.iter().map(end).collect();
        names.into_iter().cloned().collect()
    };
    let mut rows = distinct(|p| &p.from);
    let mut cols = distinct(|p| &p.to);
    rows.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    cols.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let mut out = if rows.len() <= MAX_GRID_ROWS && cols.len() <= MAX_GRID_ROWS {
        grid(probes, &rows, &cols)
    } else {
        by_kind(probes)
    };
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

fn grid(probes: &[Probe], rows: &[String], cols: &[String]) -> String {
    let cells: HashMap<(&str, &str), bool> = probes
        .iter()
        .map(|p| ((p.from.as_str(), p.to.as_str()), p.ok))
        .collect();
    let width = cols
        .iter()
        .chain(rows.iter())
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4)
        + 1;
    let mut out = format!("{:width$}", "from \\ to");
    for c in cols {
        let _ = write!(out, "{c:>width$}");
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "{r:width$}");
        for c in cols {
            let cell = cells
                .get(&(r.as_str(), c.as_str()))
                .map_or("-", |&ok| if ok { "ok" } else { "FAIL" });
            let _ = write!(out, "{cell:>width$}");
        }
        out.push('\n');
    }
    out
}

/// One line per kind of probe: how many, how many failed.
fn by_kind(probes: &[Probe]) -> String {
    let mut kinds: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for p in probes {
        let entry = kinds.entry(p.kind).or_default();
        entry.0 += 1;
        entry.1 += usize::from(!p.ok);
    }
    let mut out = String::new();
    for (kind, (n, failed)) in kinds {
        let _ = writeln!(out, "{kind:<28} {n:>8} probes {failed:>6} failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(from: usize, to: usize, ok: bool) -> Probe {
        Probe {
            from: format!("node{}-pod{from}", from % 4),
            to: format!("node{}-pod{to}", to % 4),
            kind: "pod->pod cross node",
            ok,
            detail: String::new(),
        }
    }

    #[test]
    fn a_small_check_is_a_grid() {
        let probes = [probe(1, 2, true), probe(2, 1, false)];
        let out = render(&probes);
        assert!(out.starts_with("from \\ to"), "{out}");
        assert!(out.contains("ok") && out.contains("FAIL"));
        assert!(out.contains("2 checks, 1 failed"));
    }

    /// A large lab's check is summed up per kind (a 640-pod grid is
    /// unreadable), and still names every failure.
    #[test]
    fn a_large_check_is_summed_up_per_kind_with_its_failures() {
        let probes: Vec<Probe> = (0..200)
            .flat_map(|a| (0..20).map(move |b| probe(a, 200 + b, !(a == 7 && b == 3))))
            .collect();
        let out = render(&probes);
        assert!(!out.starts_with("from \\ to"), "{out}");
        assert!(
            out.contains("pod->pod cross node")
                && out.contains("4000 probes")
                && out.contains("1 failed"),
            "{out}"
        );
        assert!(out.contains("FAIL node3-pod7 -> node3-pod203"), "{out}");
    }
}
