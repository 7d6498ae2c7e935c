//! Frontend ids: the key of a frontend's backend slots, and what the
//! connection table records. Stable while a frontend exists (a change of
//! its backends keeps its id), so a restarted agent takes them over from
//! the pinned Services map instead of renumbering every slot.

use std::collections::{BTreeMap, BTreeSet};

use super::Frontend;

/// Hands out frontend ids (never 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendIds {
    ids: BTreeMap<Frontend, u32>,
    /// Every id held (the values of `ids`).
    used: BTreeSet<u32>,
    /// Ids released, reused only once no fresh id is left.
    released: BTreeSet<u32>,
    /// The lowest id never handed out (0: start at 1).
    next: u32,
}

impl FrontendIds {
    /// Takes over ids already in use (the pinned map's, after a restart).
    /// An id claimed twice (a damaged map) stays with the first frontend;
    /// the other gets a new one when it is asked for.
    pub fn seed(&mut self, held: impl IntoIterator<Item = (Frontend, u32)>) {
        for (frontend, id) in held {
            if id == 0 || self.used.contains(&id) || self.ids.contains_key(&frontend) {
                continue;
            }
            self.ids.insert(frontend, id);
            self.used.insert(id);
            self.released.remove(&id);
            self.next = self.next.max(id.saturating_add(1));
        }
    }

    /// The id of `frontend`, if it has one.
    #[must_use]
    pub fn get(&self, frontend: &Frontend) -> Option<u32> {
        self.ids.get(frontend).copied()
    }

    /// The id of `frontend`, a new one if it has none. `None` only when
    /// all 2^32 - 1 ids are held.
    pub fn assign(&mut self, frontend: Frontend) -> Option<u32> {
        if let Some(&id) = self.ids.get(&frontend) {
            return Some(id);
        }
        // A fresh id first: an id released a moment ago may still be
        // named by connections of the frontend that had it.
        let id = if self.next != 0 && self.next != u32::MAX {
            let id = self.next;
            self.next += 1;
            id
        } else if self.next == 0 {
            self.next = 2;
            1
        } else {
            self.released.pop_first()?
        };
        self.ids.insert(frontend, id);
        self.used.insert(id);
        Some(id)
    }

    /// Lets every frontend `keep` says no to give its id back.
    pub fn retain(&mut self, mut keep: impl FnMut(&Frontend) -> bool) {
        let gone: Vec<(Frontend, u32)> = self
            .ids
            .iter()
            .filter(|(f, _)| !keep(f))
            .map(|(&f, &id)| (f, id))
            .collect();
        for (frontend, id) in gone {
            self.ids.remove(&frontend);
            self.used.remove(&id);
            self.released.insert(id);
        }
    }

    /// Every frontend with its id.
    #[must_use]
    pub fn all(&self) -> &BTreeMap<Frontend, u32> {
        &self.ids
    }

    #[cfg(test)]
    pub(super) fn set_next(&mut self, next: u32) {
        self.next = next;
    }
}
