//! One test body for every storage engine: SQLite always, PostgreSQL when
//! reachable.

mod common;

use std::sync::Arc;

use baby_discord::core::{Message, MessageKind, Nick, RoomName, Timestamp};
use baby_discord::store::{self, Durability, Store};

fn message(room: &str, seq: u64) -> Arc<Message> {
    Arc::new(Message {
        room: RoomName::parse(room).unwrap(),
        seq,
        id: uuid::Uuid::now_v7(),
        nick: Nick::parse("alice").unwrap(),
        text: format!("{room} #{seq} ✓"),
        kind: if seq.is_multiple_of(2) {
            MessageKind::Action
        } else {
            MessageKind::Text
        },
        ts: Timestamp(1_767_254_462_000 + seq as i64),
    })
}

fn seqs(page: &[Message]) -> Vec<u64> {
    page.iter().map(|m| m.seq).collect()
}

/// What every engine must do.
async fn exercise(store: Arc<dyn Store>) {
    let general = RoomName::parse("general").unwrap();
    let other = RoomName::parse("other").unwrap();
    assert_eq!(store.last_seq(&general).await.unwrap(), 0);
    assert!(store.page(&general, None, 10).await.unwrap().is_empty());

    let batch: Vec<_> = (1..=25).map(|s| message("general", s)).collect();
    store.append(&batch).await.unwrap();
    store.append(&[message("other", 1)]).await.unwrap();
    // A retried batch is harmless.
    store.append(&batch[20..]).await.unwrap();

    assert_eq!(store.last_seq(&general).await.unwrap(), 25);
    assert_eq!(store.last_seq(&other).await.unwrap(), 1);
    let newest = store.page(&general, None, 10).await.unwrap();
    assert_eq!(seqs(&newest), (16..=25).rev().collect::<Vec<_>>());
    assert_eq!(
        seqs(&store.page(&general, Some(16), 5).await.unwrap()),
        vec![15, 14, 13, 12, 11]
    );
    assert_eq!(
        seqs(&store.page(&general, Some(3), 100).await.unwrap()),
        vec![2, 1]
    );
    assert_eq!(
        seqs(&store.since(&general, 20, 100).await.unwrap()),
        vec![21, 22, 23, 24, 25]
    );
    assert_eq!(
        seqs(&store.since(&general, 0, 3).await.unwrap()),
        vec![1, 2, 3]
    );

    // Everything reads back exactly as written.
    let back = store.since(&general, 0, 100).await.unwrap();
    for (read, written) in back.iter().zip(&batch) {
        assert_eq!(read, written.as_ref());
    }
    store.ping().await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn sqlite_store() {
    let dir = common::temp_dir();
    for durability in [Durability::Async, Durability::Sync] {
        let url = format!(
            "sqlite://{}",
            dir.path().join(format!("{durability:?}.db")).display()
        );
        exercise(store::open(&url, durability).await.unwrap()).await;
    }
}

#[tokio::test]
async fn postgres_store() {
    let Some(db) = common::PgDatabase::create().await else {
        return;
    };
    exercise(store::open(&db.url, Durability::Async).await.unwrap()).await;
    db.drop_now().await;
}

#[tokio::test]
async fn unknown_database_urls_are_refused_clearly() {
    let err = store::open("mysql://x", Durability::Async)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("sqlite://FILE or postgres://"),
        "{err}"
    );
}

/// Instances started together on one new file race to create it, switch it
/// to WAL and migrate it. Where waiting could deadlock, SQLite answers
/// "database is locked" at once instead of waiting out `busy_timeout`, so
/// every opener must survive losing those races, not only the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_opened_at_once_on_one_new_sqlite_file_all_open() {
    const ROUNDS: usize = 30;
    const OPENERS: usize = 6;
    let dir = common::temp_dir();
    for round in 0..ROUNDS {
        let url = format!(
            "sqlite://{}",
            dir.path().join(format!("race-{round}.db")).display()
        );
        let openers: Vec<_> = (0..OPENERS)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { store::open(&url, Durability::Async).await })
            })
            .collect();
        for opener in openers {
            let store = opener.await.unwrap().unwrap_or_else(|err| {
                panic!("round {round}: one of {OPENERS} openers failed: {err}")
            });
            store.close().await;
        }
    }
}
