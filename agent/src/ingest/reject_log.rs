//! Rate-limited logging of refused readings.

use super::parse::Reject;

/// At most one log line per reason per interval; the count of the others goes with it.
pub struct RejectLog {
    every: std::time::Duration,
    last: std::collections::HashMap<Reject, (Option<std::time::Instant>, u64)>,
}

impl RejectLog {
    pub fn new(every: std::time::Duration) -> Self {
        RejectLog {
            every,
            last: std::collections::HashMap::new(),
        }
    }

    /// Logs a refusal of `what` (a topic, a device) unless one of the same reason was
    /// logged less than the interval ago.
    pub fn log(&mut self, reason: Reject, what: &str) {
        let now = std::time::Instant::now();
        let entry = self.last.entry(reason).or_insert((None, 0));
        if entry
            .0
            .is_some_and(|at| now.duration_since(at) < self.every)
        {
            entry.1 += 1;
            return;
        }
        tracing::warn!(
            reason = reason.as_str(),
            of = %what,
            suppressed = entry.1,
            "refused a publish: {reason}"
        );
        *entry = (Some(now), 0);
    }
}
