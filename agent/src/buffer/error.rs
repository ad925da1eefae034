//! The buffer's errors. Storage errors keep redb's own message.

use std::path::PathBuf;

/// Errors of the buffer. Storage errors keep redb's own message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("the buffer {0} is in use by another process (is an agent running on it?)")]
    Locked(PathBuf),
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl BufferError {
    /// True when the disk is out of space (the write can succeed after making room).
    pub fn is_disk_full(&self) -> bool {
        match self {
            BufferError::Storage(redb::Error::Io(e)) => {
                e.kind() == std::io::ErrorKind::StorageFull
                    || e.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(e.raw_os_error(), Some(28 | 122))
            }
            _ => false,
        }
    }

    /// True when redb refuses further writes until the database is reopened.
    pub fn needs_reopen(&self) -> bool {
        matches!(
            self,
            BufferError::Storage(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for BufferError {
            fn from(e: $t) -> Self { BufferError::Storage(e.into()) }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::DatabaseError> for BufferError {
    fn from(e: redb::DatabaseError) -> Self {
        BufferError::Storage(e.into())
    }
}

pub(super) fn corrupt(what: &'static str, detail: impl ToString) -> BufferError {
    BufferError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}
