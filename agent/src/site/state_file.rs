//! The election's durable state (term, vote) in `<data_dir>/election.json`, written
//! and synced before any message that depends on it is sent.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use fogline_cluster::HardState;
use serde::{Deserialize, Serialize};

use super::node_num;

/// The election's durable state, in a small file replaced atomically. Votes are kept by
/// node id (`ids` maps the state machine's numbers to them).
pub(super) struct StateFile {
    pub(super) path: PathBuf,
    pub(super) ids: HashMap<u64, String>,
}

impl fogline_cluster::Storage for StateFile {
    type Error = anyhow::Error;

    fn load(&self) -> anyhow::Result<HardState> {
        StateFile::load(self, &self.ids)
    }

    fn save(&mut self, state: &HardState) -> anyhow::Result<()> {
        StateFile::save(self, state, &self.ids)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredState {
    pub(super) term: u64,
    pub(super) voted_for: Option<String>,
}

impl StateFile {
    pub(super) fn load(&self, ids: &HashMap<u64, String>) -> anyhow::Result<HardState> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HardState::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let s: StoredState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid election state", self.path.display()))?;
        let voted_for = s.voted_for.map(|id| node_num(&id));
        if let Some(v) = voted_for {
            if !ids.contains_key(&v) {
                tracing::warn!("voted for a node no longer in the site; keeping the vote");
            }
        }
        Ok(HardState {
            term: s.term,
            voted_for,
        })
    }

    /// Writes a temporary file, syncs it, renames it over the old one, syncs the directory.
    pub(super) fn save(&self, hs: &HardState, ids: &HashMap<u64, String>) -> std::io::Result<()> {
        use std::io::Write;
        let state = StoredState {
            term: hs.term,
            voted_for: hs
                .voted_for
                .map(|v| ids.get(&v).cloned().unwrap_or_default()),
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(&state).unwrap_or_default().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn election_state_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile {
            path: dir.path().join("election.json"),
            ids: HashMap::new(),
        };
        let ids: HashMap<u64, String> = [(node_num("b"), "b".to_owned())].into();
        assert_eq!(f.load(&ids).expect("load"), HardState::default());
        let hs = HardState {
            term: 7,
            voted_for: Some(node_num("b")),
        };
        f.save(&hs, &ids).expect("save");
        assert_eq!(f.load(&ids).expect("load"), hs);
        std::fs::write(&f.path, "garbage").expect("write");
        assert!(
            f.load(&ids).is_err(),
            "a corrupt state file is an error, not a fresh vote"
        );
    }
}
