//! Log shipping, both ends: the protocol ([`proto`]: topics, batch frames, acks), the store
//! of shipped logs ([`store`]) and its writer ([`receiver`]) with its bounded queue. The
//! gateway receives site uplinks with them; every site agent receives its peers'
//! replication with them. The sending end is [`crate::uplink`].

pub mod proto;
mod queue;
pub mod receiver;
pub mod store;
