//! The rule every store keeps ([`join`]), and what the shipping receiver needs of a
//! store ([`LogStore`]): the embedded [`Store`] here, the gateway's PostgreSQL store there.

use std::collections::HashMap;

use super::{Applied, Key, OriginState, Store, StoreError, Trimmed, Txn, MAX_OFFSET};
use crate::buffer::block::{self, Entry};
use crate::shipping::proto::BatchFrame;

/// How a batch joins an origin's log: [`join`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Offsets `first..end` are new; the batch's first `skip` readings are stored already.
    Stored { first: u64, skip: u64, end: u64 },
    /// Nothing of it is stored, for this reason.
    Refused(Applied),
}

/// What [`join`] needs to know of a batch: where it claims to start and what its block
/// holds, read from the block's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The sender vouches that offsets from here to `first_offset` were dropped at the edge.
    pub start: u64,
    pub first_offset: u64,
    /// Offsets in the block.
    pub count: u64,
    /// A block of summaries (readings downsampled at the edge), not readings.
    pub summaries: bool,
}

impl Span {
    /// The span of a received batch; `Err(Malformed)` if its block has no header.
    pub fn of(frame: &BatchFrame<'_>) -> Result<Span, Applied> {
        Ok(Span {
            start: frame.start,
            first_offset: frame.first_offset,
            count: block::count(frame.block).map_err(|_| Applied::Malformed)?,
            summaries: block::is_summaries(frame.block),
        })
    }
}

/// The rule every store keeps: a batch is taken only if it joins the origin's log at
/// `state` without a hole — it starts at or below the watermark, or the sender vouches
/// (with `start`) that the offsets in between were dropped at the edge — and only its
/// offsets above the watermark are new. On [`Join::Stored`] `state` is advanced.
pub fn join(state: &mut OriginState, frame: &BatchFrame<'_>) -> Join {
    match Span::of(frame) {
        Ok(span) => join_span(state, &span),
        Err(why) => Join::Refused(why),
    }
}

/// [`join`] for a batch whose header was read already.
pub fn join_span(state: &mut OriginState, span: &Span) -> Join {
    let Some(end) = span.first_offset.checked_add(span.count) else {
        return Join::Refused(Applied::Implausible);
    };
    if end > MAX_OFFSET {
        return Join::Refused(Applied::Implausible);
    }
    if span.start.min(span.first_offset) > state.next {
        return Join::Refused(Applied::Gap);
    }
    if end <= state.next {
        return Join::Refused(Applied::Duplicate);
    }
    let (first, skip) = if span.first_offset < state.next {
        (state.next, state.next - span.first_offset)
    } else {
        state.skipped += span.first_offset - state.next;
        (span.first_offset, 0)
    };
    let stored = end - first;
    if span.summaries {
        state.downsampled += stored;
    } else {
        state.stored += stored;
    }
    state.next = end;
    Join::Stored { first, skip, end }
}

/// The part of a block after its first `skip` offsets, which stands for `stored` new
/// offsets; `None` if the block does not decode.
pub fn tail(bytes: &[u8], skip: u64, stored: u64) -> Option<Entry> {
    match block::decode_entry(bytes).ok()? {
        Entry::Readings(mut records) => {
            let skip = usize::try_from(skip)
                .unwrap_or(usize::MAX)
                .min(records.len());
            records.drain(..skip);
            Some(Entry::Readings(records))
        }
        // Summaries cannot be split: they stand for the offsets not yet stored (the
        // windows they share with readings stored raw count those twice).
        Entry::Summaries(mut s) => {
            s.covers = stored;
            Some(Entry::Summaries(s))
        }
    }
}

/// What the shipping receiver ([`crate::shipping::receiver`]) needs of a store: the
/// embedded [`Store`], or the gateway's PostgreSQL store. Every implementation keeps
/// [`join`]'s rule and makes a commit durable before it returns.
pub trait LogStore: Send + 'static {
    /// Work gathered for one commit.
    type Txn: Default + Send;
    /// The origins this store knows of, as of its last commit (or start).
    fn origins(&self) -> &HashMap<Key, OriginState>;
    /// Adds a batch to `txn` if it joins the origin's log (as far as this store knows
    /// it: a shared store checks again under lock at commit).
    fn apply(
        &self,
        txn: &mut Self::Txn,
        site: &str,
        origin: &str,
        frame: &BatchFrame<'_>,
    ) -> Applied;
    /// Keeps `json` as the newest aggregate of `topic`.
    fn put_aggregate(txn: &mut Self::Txn, topic: String, json: String);
    /// The newest aggregate of `topic` put in `txn`.
    fn pending_aggregate<'t>(txn: &'t Self::Txn, topic: &str) -> Option<&'t str>;
    /// The stored aggregate of `topic`, if any.
    fn aggregate(&self, topic: &str) -> Result<Option<String>, StoreError>;
    /// Every stored aggregate (to republish them retained at start-up).
    fn aggregates(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Makes `txn` durable.
    fn commit(&mut self, txn: Self::Txn) -> Result<(), StoreError>;
    /// The watermark to ack for an origin, as the store holds it now (on a shared store
    /// another gateway may have moved it since this one last looked).
    fn watermark(&mut self, site: &str, origin: &str) -> Result<u64, StoreError>;
    /// Starts measuring stored bytes per origin (for [`LogStore::trim`]).
    fn track_sizes(&mut self) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("a byte budget"))
    }
    /// Keeps every origin within `max_bytes`.
    fn trim(&mut self, _max_bytes: u64, _window_secs: u32) -> Result<Vec<Trimmed>, StoreError> {
        Err(StoreError::Unsupported("a byte budget"))
    }
}

impl LogStore for Store {
    type Txn = Txn;

    fn origins(&self) -> &HashMap<Key, OriginState> {
        Store::origins(self)
    }

    fn apply(&self, txn: &mut Txn, site: &str, origin: &str, frame: &BatchFrame<'_>) -> Applied {
        Store::apply(self, txn, site, origin, frame)
    }

    fn put_aggregate(txn: &mut Txn, topic: String, json: String) {
        Store::put_aggregate(txn, topic, json);
    }

    fn pending_aggregate<'t>(txn: &'t Txn, topic: &str) -> Option<&'t str> {
        txn.aggregate(topic)
    }

    fn aggregate(&self, topic: &str) -> Result<Option<String>, StoreError> {
        Store::aggregate(self, topic)
    }

    fn aggregates(&self) -> Result<Vec<(String, String)>, StoreError> {
        Store::aggregates(self)
    }

    fn commit(&mut self, txn: Txn) -> Result<(), StoreError> {
        Store::commit(self, txn)
    }

    fn watermark(&mut self, site: &str, origin: &str) -> Result<u64, StoreError> {
        Ok(self.next(&Txn::default(), site, origin))
    }

    fn track_sizes(&mut self) -> Result<(), StoreError> {
        Store::track_sizes(self)
    }

    fn trim(&mut self, max_bytes: u64, window_secs: u32) -> Result<Vec<Trimmed>, StoreError> {
        Store::trim(self, max_bytes, window_secs)
    }
}
