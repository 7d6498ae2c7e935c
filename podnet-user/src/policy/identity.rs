//! Numeric identities of pod label sets: pods with the same namespace and
//! labels share one number, stable while any pod has that label set.

use std::collections::{BTreeMap, BTreeSet};

use podnet_common::policy::{IDENTITY_FIRST_CIDR_SET, IDENTITY_FIRST_POD};
use serde::{Deserialize, Serialize};

/// What a pod identity stands for: a namespace and a pod label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityLabels {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Pod identities across compiles. A label set keeps its number while some
/// pod has it; the number of a label set no longer in use is freed, but
/// new label sets take numbers from a counter that only goes up (wrapping
/// to the first free number only once the range is exhausted), so a freed
/// number is not handed out again soon: a peer still holding the old
/// number in a map being updated does not meet a new label set under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<IdentityLabels, u32>,
    by_number: BTreeMap<u32, IdentityLabels>,
    next: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            by_labels: BTreeMap::new(),
            by_number: BTreeMap::new(),
            next: IDENTITY_FIRST_POD,
        }
    }
}

impl IdentityAllocator {
    /// Numbers already in use (an agent restarted from its pinned maps):
    /// each label set keeps its number. A number outside the pod range, or
    /// a label set or number already held, is skipped (the first wins).
    pub fn seed(&mut self, existing: impl IntoIterator<Item = (IdentityLabels, u32)>) {
        for (labels, number) in existing {
            if !(IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR_SET).contains(&number)
                || self.by_labels.contains_key(&labels)
                || self.by_number.contains_key(&number)
            {
                continue;
            }
            self.by_labels.insert(labels.clone(), number);
            self.by_number.insert(number, labels);
            self.next = self.next.max(number.saturating_add(1));
        }
    }

    /// The number a label set has, if any.
    pub fn identity_of(&self, labels: &IdentityLabels) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The label set a number stands for.
    pub fn labels_of(&self, number: u32) -> Option<&IdentityLabels> {
        self.by_number.get(&number)
    }

    /// How many label sets hold a number.
    pub fn len(&self) -> usize {
        self.by_labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_labels.is_empty()
    }

    /// The number of `labels`, allocating one when it has none; `None` only
    /// when every pod identity is taken.
    pub fn allocate(&mut self, labels: &IdentityLabels) -> Option<u32> {
        if let Some(number) = self.identity_of(labels) {
            return Some(number);
        }
        let number = self.free_number()?;
        self.by_labels.insert(labels.clone(), number);
        self.by_number.insert(number, labels.clone());
        self.next = number + 1;
        Some(number)
    }

    fn free_number(&self) -> Option<u32> {
        let range = IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR_SET;
        if range.contains(&self.next) && !self.by_number.contains_key(&self.next) {
            return Some(self.next);
        }
        // Exhausted (or the counter's number is taken): the first gap from
        // the counter on, then from the start.
        let start = self.next.clamp(IDENTITY_FIRST_POD, IDENTITY_FIRST_CIDR_SET);
        first_gap(&self.by_number, start, IDENTITY_FIRST_CIDR_SET)
            .or_else(|| first_gap(&self.by_number, IDENTITY_FIRST_POD, start))
    }

    /// Frees the numbers of the label sets not in `used`.
    pub fn retain(&mut self, used: &BTreeSet<&IdentityLabels>) {
        self.by_labels.retain(|labels, _| used.contains(labels));
        self.by_number.retain(|_, labels| used.contains(labels));
    }
}

/// The first number in `[from, to)` not in `taken`.
fn first_gap(taken: &BTreeMap<u32, IdentityLabels>, from: u32, to: u32) -> Option<u32> {
    let mut candidate = from;
    for &number in taken.range(from..to).map(|(n, _)| n) {
        if number != candidate {
            break;
        }
        candidate += 1;
    }
    (candidate < to).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(namespace: &str, value: &str) -> IdentityLabels {
        IdentityLabels {
            namespace: namespace.to_owned(),
            labels: [("pod".to_owned(), value.to_owned())].into(),
        }
    }

    #[test]
    fn numbers_are_stable_freed_and_not_reused_at_once() {
        let mut identities = IdentityAllocator::default();
        let a = identities.allocate(&labels("x", "a"));
        let b = identities.allocate(&labels("x", "b"));
        assert_eq!(a, Some(IDENTITY_FIRST_POD));
        assert_eq!(b, Some(IDENTITY_FIRST_POD + 1));
        assert_eq!(identities.allocate(&labels("x", "a")), a);
        let keep = labels("x", "b");
        identities.retain(&[&keep].into());
        assert_eq!(identities.identity_of(&labels("x", "a")), None);
        assert_eq!(identities.labels_of(IDENTITY_FIRST_POD + 1), Some(&keep));
        // The freed number is not the next one handed out.
        assert_eq!(
            identities.allocate(&labels("x", "c")),
            Some(IDENTITY_FIRST_POD + 2)
        );
        assert_eq!(identities.len(), 2);
    }

    #[test]
    fn seeding_keeps_numbers_and_skips_conflicts() {
        let mut identities = IdentityAllocator::default();
        identities.seed([
            (labels("x", "a"), 1000),
            (labels("x", "b"), 1000),
            (labels("x", "c"), 5),
            (labels("x", "a"), 1001),
            (labels("x", "d"), IDENTITY_FIRST_CIDR_SET),
        ]);
        assert_eq!(identities.identity_of(&labels("x", "a")), Some(1000));
        assert_eq!(identities.identity_of(&labels("x", "b")), None);
        assert_eq!(identities.identity_of(&labels("x", "c")), None);
        assert_eq!(identities.identity_of(&labels("x", "d")), None);
        assert_eq!(identities.allocate(&labels("x", "b")), Some(1001));
    }

    #[test]
    fn an_exhausted_counter_wraps_to_the_first_gap() {
        let mut identities = IdentityAllocator::default();
        identities.seed([
            (labels("x", "last"), IDENTITY_FIRST_CIDR_SET - 1),
            (labels("x", "first"), IDENTITY_FIRST_POD),
        ]);
        assert_eq!(
            identities.allocate(&labels("x", "new")),
            Some(IDENTITY_FIRST_POD + 1)
        );
        assert_eq!(
            first_gap(&BTreeMap::new(), IDENTITY_FIRST_POD, IDENTITY_FIRST_POD),
            None
        );
    }
}
