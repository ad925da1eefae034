//! Sans-io cluster state machine (election and replication bookkeeping). Filled in by the site-cluster work.
#![no_std]
