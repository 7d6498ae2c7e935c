//! Which paths a lab check probes. A small lab gets the whole matrix
//! (every pod to every pod, every pod to every node and back); the matrix
//! grows with the square of the pods, so beyond [`FULL_MATRIX_MAX_PROBES`]
//! the check probes a sample that still covers every pod as a source and
//! as a destination, every pair of nodes (both ways, and within a node),
//! every pod with its own node and another, and a random set of pod pairs.
//! The sample is drawn from a fixed seed, so two checks of one lab probe
//! the same paths, and [`CheckPlan::describe`] states it.

use std::collections::BTreeSet;

/// Probes of the whole matrix up to which a check probes all of it (a
/// 40-pod lab: 1,560 pod pairs and 160 probes between pods and nodes).
pub const FULL_MATRIX_MAX_PROBES: usize = 2_000;
/// Random pod pairs a sampled check adds to the ones that cover every pod
/// and every node pair.
const RANDOM_POD_PAIRS: usize = 1_000;
/// Ordered node pairs a sampled check covers all of (64 nodes); beyond,
/// each node to the next of a shuffled ring (every node a source and a
/// destination) and to itself, and random node pairs while there are
/// fewer than this many.
const MAX_NODE_PAIRS: usize = 4_096;
const SEED: u64 = 0x706f_646e_6574_6c61;

/// The paths one check probes, as indices into the layout's pods and
/// nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckPlan {
    /// Pod to pod (source, destination).
    pub pod_pairs: Vec<(usize, usize)>,
    /// Pod to node.
    pub pod_to_node: Vec<(usize, usize)>,
    /// Node to pod.
    pub node_to_pod: Vec<(usize, usize)>,
    /// The whole matrix's size when this is a sample of it.
    pub sampled_from: Option<usize>,
}

/// splitmix64: a few lines instead of a dependency, and the same sequence
/// on every machine.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    fn below(&mut self, n: usize) -> usize {
        // usize is 64 bits on every target the lab runs on; the modulo's
        // bias is far below what a sample notices.
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.below(i + 1));
        }
        order
    }
}

impl CheckPlan {
    /// The plan for pods whose nodes are `pod_nodes` (pod i runs on node
    /// `pod_nodes[i]`, an index below `nodes`).
    #[must_use]
    pub fn new(pod_nodes: &[usize], nodes: usize) -> Self {
        let pods = pod_nodes.len();
        let whole = pods * pods.saturating_sub(1) + 2 * pods * nodes;
        if whole <= FULL_MATRIX_MAX_PROBES {
            let all_pairs = |a: usize, b: usize| {
                (0..a)
                    .flat_map(move |i| (0..b).map(move |j| (i, j)))
                    .collect::<Vec<_>>()
            };
            return Self {
                pod_pairs: all_pairs(pods, pods)
                    .into_iter()
                    .filter(|(a, b)| a != b)
                    .collect(),
                pod_to_node: all_pairs(pods, nodes),
                node_to_pod: all_pairs(pods, nodes)
                    .into_iter()
                    .map(|(p, n)| (n, p))
                    .collect(),
                sampled_from: None,
            };
        }
        let mut draw = Draw(SEED ^ (pods as u64) ^ ((nodes as u64) << 32));
        let mut by_node: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for (pod, &node) in pod_nodes.iter().enumerate() {
            if let Some(list) = by_node.get_mut(node) {
                list.push(pod);
            }
        }
        let mut pairs = BTreeSet::new();
        // Every pod a source and a destination: a ring in shuffled order.
        let ring = draw.shuffled(pods);
        for (i, &a) in ring.iter().enumerate() {
            pairs.insert((a, ring[(i + 1) % pods]));
        }
        // Every node pair, both ways and within a node.
        for (a, b) in node_pairs(nodes, &mut draw) {
            let (from, to) = (&by_node[a], &by_node[b]);
            if from.is_empty() || to.is_empty() {
                continue;
            }
            let src = from[draw.below(from.len())];
            let candidates: Vec<usize> = to.iter().copied().filter(|&p| p != src).collect();
            if let Some(&dst) = candidates.get(draw.below(candidates.len().max(1))) {
                pairs.insert((src, dst));
            }
        }
        for _ in 0..RANDOM_POD_PAIRS {
            let (a, b) = (draw.below(pods), draw.below(pods));
            if a != b {
                pairs.insert((a, b));
            }
        }
        // Every pod with its own node, and with one other node.
        let mut pod_to_node = Vec::with_capacity(2 * pods);
        let mut node_to_pod = Vec::with_capacity(2 * pods);
        for (pod, &own) in pod_nodes.iter().enumerate() {
            pod_to_node.push((pod, own));
            node_to_pod.push((own, pod));
            if nodes > 1 {
                let other = (own + 1 + draw.below(nodes - 1)) % nodes;
                pod_to_node.push((pod, other));
                let other = (own + 1 + draw.below(nodes - 1)) % nodes;
                node_to_pod.push((other, pod));
            }
        }
        Self {
            pod_pairs: pairs.into_iter().collect(),
            pod_to_node,
            node_to_pod,
            sampled_from: Some(whole),
        }
    }

    /// How many probes between pods and nodes the plan has.
    #[must_use]
    pub fn probes(&self) -> usize {
        self.pod_pairs.len() + self.pod_to_node.len() + self.node_to_pod.len()
    }

    /// One line saying what the plan covers.
    #[must_use]
    pub fn describe(&self) -> String {
        match self.sampled_from {
            None => format!(
                "the whole matrix: {} pod pairs, {} pod/node probes",
                self.pod_pairs.len(),
                self.pod_to_node.len() + self.node_to_pod.len()
            ),
            Some(whole) => format!(
                "a sample of {} of the matrix's {whole} probes (fixed seed): every pod as a \
                 source and a destination, every ordered node pair (up to {MAX_NODE_PAIRS}; \
                 beyond, a ring of the nodes, each node with itself and random pairs), {RANDOM_POD_PAIRS} random pod \
                 pairs drawn, every pod with its own node and one other, both ways",
                self.probes()
            ),
        }
    }
}

/// Ordered node pairs, same node included: all of them up to
/// [`MAX_NODE_PAIRS`], else a shuffled ring, each node with itself, and
/// random pairs up to [`MAX_NODE_PAIRS`] (`2 * nodes` when that is more).
fn node_pairs(nodes: usize, draw: &mut Draw) -> Vec<(usize, usize)> {
    if nodes * nodes <= MAX_NODE_PAIRS {
        return (0..nodes)
            .flat_map(|a| (0..nodes).map(move |b| (a, b)))
            .collect();
    }
    let ring = draw.shuffled(nodes);
    let mut pairs: BTreeSet<(usize, usize)> = ring
        .iter()
        .enumerate()
        .map(|(i, &a)| (a, ring[(i + 1) % nodes]))
        .collect();
    pairs.extend((0..nodes).map(|a| (a, a)));
    while pairs.len() < MAX_NODE_PAIRS {
        pairs.insert((draw.below(nodes), draw.below(nodes)));
    }
    pairs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(nodes: usize, pods_per_node: usize) -> Vec<usize> {
        (0..nodes)
            .flat_map(|n| std::iter::repeat_n(n, pods_per_node))
            .collect()
    }

    #[test]
    fn a_small_lab_gets_the_whole_matrix() {
        let pods = lab(2, 2);
        let plan = CheckPlan::new(&pods, 2);
        assert_eq!(plan.sampled_from, None);
        assert_eq!(plan.pod_pairs.len(), 4 * 3);
        assert_eq!(plan.pod_to_node.len(), 4 * 2);
        assert_eq!(plan.node_to_pod.len(), 4 * 2);
        assert!(plan.describe().starts_with("the whole matrix"));
    }

    /// The 40-node x 16-pod lab whose whole matrix (409,280 pod pairs)
    /// kept `lab check` busy for over 15 minutes.
    #[test]
    fn a_large_lab_is_sampled_and_every_pod_and_node_pair_is_covered() {
        let (nodes, per_node) = (40, 16);
        let pod_nodes = lab(nodes, per_node);
        let pods = pod_nodes.len();
        let plan = CheckPlan::new(&pod_nodes, nodes);
        assert_eq!(
            plan.sampled_from,
            Some(pods * (pods - 1) + 2 * pods * nodes)
        );
        assert!(
            plan.probes() <= 2 * FULL_MATRIX_MAX_PROBES + 4 * pods,
            "{} probes",
            plan.probes()
        );
        let sources: BTreeSet<usize> = plan.pod_pairs.iter().map(|p| p.0).collect();
        let destinations: BTreeSet<usize> = plan.pod_pairs.iter().map(|p| p.1).collect();
        assert_eq!(sources.len(), pods, "every pod a source");
        assert_eq!(destinations.len(), pods, "every pod a destination");
        let node_pairs: BTreeSet<(usize, usize)> = plan
            .pod_pairs
            .iter()
            .map(|&(a, b)| (pod_nodes[a], pod_nodes[b]))
            .collect();
        assert_eq!(node_pairs.len(), nodes * nodes, "every ordered node pair");
        assert!(plan.pod_pairs.iter().all(|(a, b)| a != b));
        for (pod, &own) in pod_nodes.iter().enumerate() {
            assert!(plan.pod_to_node.contains(&(pod, own)));
            assert!(plan.node_to_pod.contains(&(own, pod)));
            assert!(plan.pod_to_node.iter().any(|&(p, n)| p == pod && n != own));
            assert!(plan.node_to_pod.iter().any(|&(n, p)| p == pod && n != own));
        }
        assert_eq!(
            plan,
            CheckPlan::new(&pod_nodes, nodes),
            "the same sample twice"
        );
        assert!(plan.describe().starts_with("a sample of"));
    }

    /// Past 64 nodes every node is still a source and a destination and
    /// the node pairs stay bounded.
    #[test]
    fn a_very_large_lab_keeps_the_check_bounded() {
        let (nodes, per_node) = (5_000, 30);
        let pod_nodes = lab(nodes, per_node);
        let plan = CheckPlan::new(&pod_nodes, nodes);
        let pods = pod_nodes.len();
        assert!(
            plan.probes() <= pods + MAX_NODE_PAIRS.max(2 * nodes) + RANDOM_POD_PAIRS + 4 * pods,
            "{} probes",
            plan.probes()
        );
        let from: BTreeSet<usize> = plan.pod_pairs.iter().map(|&(a, _)| pod_nodes[a]).collect();
        let to: BTreeSet<usize> = plan.pod_pairs.iter().map(|&(_, b)| pod_nodes[b]).collect();
        assert_eq!((from.len(), to.len()), (nodes, nodes));
    }
}
