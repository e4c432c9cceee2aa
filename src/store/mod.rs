//! Storage of room messages: one implementation per engine of the core's
//! [`Store`] port.
//!
//! SQLite is the default (a file, nothing to install); PostgreSQL is for
//! instances that share a database across hosts. SQL lives in `migrations/`, one
//! folder per engine, applied on start. This is also where sqlx's errors become
//! the core's engine-neutral [`StoreError`].

pub(crate) mod keys;
mod postgres;
mod rows;
mod seqs;
mod sqlite;
mod writer;

use std::str::FromStr;
use std::sync::Arc;

pub use crate::core::ports::{Durability, IDEMPOTENCY_WINDOW, Store, StoreError, WriterStats};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use writer::{Writer, WriterTask};

/// Opens the store a `--db` URL names, creating and migrating it as needed.
pub async fn open(url: &str, durability: Durability) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
        return Ok(Arc::new(SqliteStore::open(options, durability).await?));
    }
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
        return Ok(Arc::new(PostgresStore::open(options).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_owned()))
}

impl From<sqlx::Error> for StoreError {
    /// Sorts a sqlx error into the core's two kinds: a failed connection, or
    /// none free in time, says the database is not answering (the bus's gate
    /// then refuses at once instead of waiting on it); anything else is one
    /// statement refused.
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::NotAnswering(Box::new(err)),
            err => StoreError::Refused(Box::new(err)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(Box::new(err))
    }
}

#[cfg(test)]
mod tests {
    use crate::core::ports::BusError;

    /// The gate shuts on a failed connection and stays open for a refused
    /// statement: the sorting above decides which.
    #[test]
    fn connection_failures_are_unreachable_refusals_are_not() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        for err in [sqlx::Error::Io(io), sqlx::Error::PoolTimedOut] {
            let shown = err.to_string();
            let err = BusError::Store(err.into());
            assert!(err.is_unreachable(), "{err}");
            assert_eq!(
                err.to_string(),
                format!("storage is not answering: database error: {shown}")
            );
        }
        let refused = BusError::Store(sqlx::Error::RowNotFound.into());
        assert!(!refused.is_unreachable(), "{refused}");
    }
}
