//! The watch: every manager keeps the change sets of its recent revisions, so that a host
//! that lost its stream resumes from the revision it has and misses nothing; a host too far
//! behind (or new) gets the whole view first. Sans-IO core ([`History`]) inside a small async
//! shell ([`WatchHub`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::state::{Change, ClusterView};
use crate::types::StateEvent;

/// How many revisions' changes a manager keeps for resuming watchers.
pub const HISTORY_REVISIONS: usize = 4096;

/// What a watcher at some revision needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Catchup {
    /// The change sets after its revision, in order, each with the revision it leads to.
    Changes(Vec<(u64, Vec<Change>)>),
    /// Its revision is older than the history: it needs the whole view.
    Snapshot,
    /// Nothing new yet (or this manager is behind the watcher): wait.
    Wait,
}

/// The change sets of revisions `(base, head]`.
#[derive(Debug, Default)]
pub struct History {
    base: u64,
    sets: VecDeque<(u64, Vec<Change>)>,
    capacity: usize,
}

impl History {
    /// Empty history at revision `base`, keeping at most `capacity` revisions.
    pub fn new(base: u64, capacity: usize) -> History {
        History { base, sets: VecDeque::new(), capacity }
    }

    /// The newest revision it knows.
    pub fn head(&self) -> u64 {
        self.sets.back().map_or(self.base, |(r, _)| *r)
    }

    /// Records what a state event says.
    pub fn record(&mut self, event: StateEvent) {
        match event {
            StateEvent::Applied { revision, changes } => {
                if revision != self.head() + 1 {
                    // A gap (cannot happen in order) or a replay: start over from here.
                    self.sets.clear();
                    self.base = revision;
                    return;
                }
                self.sets.push_back((revision, changes));
                while self.sets.len() > self.capacity {
                    if let Some((r, _)) = self.sets.pop_front() {
                        self.base = r;
                    }
                }
            }
            StateEvent::Replaced { revision } => {
                self.sets.clear();
                self.base = revision;
            }
        }
    }

    /// What a watcher at `revision` needs.
    pub fn catchup(&self, revision: u64) -> Catchup {
        if revision >= self.head() {
            return Catchup::Wait;
        }
        if revision < self.base {
            return Catchup::Snapshot;
        }
        Catchup::Changes(self.sets.iter().filter(|(r, _)| *r > revision).cloned().collect())
    }
}

/// A manager's watch: the history, fed by the state machine, and a signal when it grows.
#[derive(Debug)]
pub struct WatchHub {
    history: Mutex<History>,
    head: watch::Sender<u64>,
}

impl WatchHub {
    /// Starts a hub fed by `events` (the state machine's), on the current tokio runtime.
    pub fn start(mut events: mpsc::UnboundedReceiver<StateEvent>) -> Arc<WatchHub> {
        let hub =
            Arc::new(WatchHub { history: Mutex::new(History::new(0, HISTORY_REVISIONS)), head: watch::channel(0).0 });
        let h = Arc::clone(&hub);
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                let head = {
                    let mut history = h.history.lock().unwrap_or_else(|p| p.into_inner());
                    history.record(e);
                    history.head()
                };
                h.head.send_replace(head);
            }
        });
        hub
    }

    /// What a watcher at `revision` needs now.
    pub fn catchup(&self, revision: u64) -> Catchup {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).catchup(revision)
    }

    /// A receiver that changes when the history grows.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

/// Applies a watch stream's events to a host's view: a snapshot replaces it, changes extend
/// it. Returns false (and leaves the view alone) for changes that do not follow its revision.
pub fn follow(view: &mut ClusterView, revision: u64, snapshot: Option<ClusterView>, changes: &[Change]) -> bool {
    match snapshot {
        Some(v) => {
            *view = v;
            view.revision = revision;
            true
        }
        None if revision > view.revision => {
            view.apply_changes(revision, changes);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Change;

    fn applied(r: u64) -> StateEvent {
        StateEvent::Applied { revision: r, changes: vec![Change::NodeRemove(r)] }
    }

    #[test]
    fn resumes_from_any_revision_it_still_holds() {
        let mut h = History::new(10, 3);
        assert_eq!(h.catchup(10), Catchup::Wait);
        for r in 11..=14 {
            h.record(applied(r));
        }
        // Holds 12..=14 (capacity 3): base moved to 11.
        assert_eq!(h.catchup(14), Catchup::Wait);
        assert_eq!(h.catchup(15), Catchup::Wait, "a watcher ahead of a lagging manager waits");
        let Catchup::Changes(c) = h.catchup(12) else { panic!() };
        assert_eq!(c.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![13, 14]);
        let Catchup::Changes(c) = h.catchup(11) else { panic!() };
        assert_eq!(c.len(), 3);
        assert_eq!(h.catchup(10), Catchup::Snapshot, "too old");
        assert_eq!(h.catchup(0), Catchup::Snapshot, "a new host");
        h.record(StateEvent::Replaced { revision: 30 });
        assert_eq!(h.catchup(14), Catchup::Snapshot, "after a snapshot install the history restarts");
    }

    #[test]
    fn follow_applies_in_order_only() {
        let mut v = ClusterView { revision: 5, ..Default::default() };
        assert!(!follow(&mut v, 5, None, &[]), "an old change set is ignored");
        assert!(follow(&mut v, 6, None, &[]));
        assert_eq!(v.revision, 6);
        assert!(follow(&mut v, 3, Some(ClusterView::default()), &[]), "a snapshot always wins");
        assert_eq!(v.revision, 3);
    }
}
