//! Writing a VM's history after its reconcile: what was applied, with its
//! spec's digest and source revision, and the verdicts of earlier changes'
//! judgements. `apply` and the watcher both write through here, so a VM's
//! history says the same whichever of them changed it.

use crate::vm::config::VmConfig;
use crate::vm::health::Verdict;
use crate::vm::history::{Applied, History};
use crate::vm::{Chain, ErrorKind, Virtstack, VmName};
use std::time::{SystemTime, UNIX_EPOCH};

/// What one reconcile of a VM has to write into its history.
#[derive(Debug, Clone, Default)]
pub struct Note<'a> {
    /// The configuration just applied (`None`: nothing was).
    pub applied: Option<&'a VmConfig>,
    /// The source revision it came from.
    pub revision: Option<String>,
    /// It was applied by a revert, away from the spec of this digest.
    pub reverted_from: Option<String>,
    /// Verdicts of judgements, by the digest of the spec judged, oldest
    /// first.
    pub verdicts: Vec<(String, Verdict)>,
}

impl Note<'_> {
    fn is_empty(&self) -> bool {
        self.applied.is_none() && self.verdicts.is_empty()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Adds `note` to `name`'s history and keeps it; returns the history as
/// written (or as read, when there was nothing to add). `None` when the VM
/// has none to read (gone, or its record unreadable) or it could not be
/// kept: logged, as a history that cannot be written never fails the change
/// it records.
pub async fn write(vs: &dyn Virtstack, name: &VmName, note: Note<'_>) -> Option<History> {
    let mut history = match vs.history(name).await {
        Ok(h) => h,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(vm = %name, "cannot read its history: {}", Chain(&e));
            return None;
        }
    };
    if note.is_empty() {
        return Some(history);
    }
    for (spec, verdict) in &note.verdicts {
        history.judged(spec, verdict);
    }
    if let Some(config) = note.applied {
        let mut entry = Applied::new(config.clone(), unix_now(), note.revision);
        entry.reverted_from = note.reverted_from;
        history.applied(entry);
    }
    if let Err(e) = vs.keep_history(name, &history).await {
        // Not kept: the caller keeps its verdicts for the next try.
        tracing::warn!(vm = %name, "cannot keep its history: {}", Chain(&e));
        return None;
    }
    Some(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtstack::fake::Fake;
    use crate::vm::Capabilities;
    use crate::vm::history::Judgement;

    #[tokio::test]
    async fn a_change_and_then_its_verdict_land_in_the_vms_record() {
        let vs = Fake::new(Capabilities::new("fake"));
        let name = VmName::new("a").expect("name");
        let config = VmConfig::default();
        assert!(write(&vs, &name, Note::default()).await.is_none(), "no VM");
        vs.insert(
            &name,
            crate::virtstack::fake::FakeVm {
                config: config.clone(),
                state: crate::vm::State::Running,
                managed: true,
            },
        );
        let note = Note {
            applied: Some(&config),
            revision: Some("abc".into()),
            ..Note::default()
        };
        let h = write(&vs, &name, note).await.expect("written");
        assert_eq!(h.entries().len(), 1);
        assert_eq!(h.entries()[0].health, Judgement::Unjudged);
        assert_eq!(vs.history(&name).await.expect("kept"), h);
        let spec = config.digest();
        let note = Note {
            verdicts: vec![(spec, Verdict::Healthy)],
            ..Note::default()
        };
        // An unjudged entry takes no verdict.
        let h = write(&vs, &name, note).await.expect("written");
        assert_eq!(h.entries()[0].health, Judgement::Unjudged);
        assert_eq!(h.entries()[0].revision.as_deref(), Some("abc"));
    }
}
