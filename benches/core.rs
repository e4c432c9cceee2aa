//! Micro-benchmarks of the hot path: the line parser, and the hub handing one
//! room message to every member (the fan-out the TCP writers then drain), so a
//! regression shows as a number (`cargo bench --bench core`).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use baby_discord::bus::{Deliver, Envelope, LocalBus};
use baby_discord::core::{
    Command, Hub, Limits, Message, MessageKind, Nick, Replies, RoomName, Timestamp, outbox, parse,
};
use baby_discord::store::{self, Durability};

fn parser(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    let lines = [
        ("say", "hello everyone, how is the benchmark going today?"),
        ("join", "/join #general"),
        ("msg", "/msg alice see you in #random"),
        ("escaped", "//etc/passwd is not a command"),
    ];
    for (name, line) in lines {
        group.bench_with_input(BenchmarkId::from_parameter(name), line, |b, line| {
            b.iter(|| parse(black_box(line), 2_000))
        });
    }
    group.finish();
}

/// A hub with `members` sessions in room `bench`, and their event queues.
fn hub_with_room(
    rt: &tokio::runtime::Runtime,
    dir: &tempfile::TempDir,
    members: usize,
) -> (Hub, Vec<outbox::Receiver>) {
    rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = store::open(&url, Durability::Async)
            .await
            .expect("a fresh SQLite file opens");
        let bus = Arc::new(LocalBus::new(store.clone(), Durability::Async));
        let limits = Limits {
            rate: 0,
            ..Limits::default()
        };
        let hub = Hub::new("bench".into(), limits, store, bus);
        let room = RoomName::parse("bench").expect("a valid room");
        let mut queues = Vec::new();
        for _ in 0..members {
            let session = hub
                .connect(None, Replies::Outbox, None)
                .await
                .expect("a session");
            hub.handle(
                session.id,
                Command::Join {
                    room: room.clone(),
                    after: None,
                },
            )
            .await;
            queues.push(session.events);
        }
        for q in &mut queues {
            while q.try_recv().is_ok() {}
        }
        (hub, queues)
    })
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("fan_out");
    for members in [10usize, 100, 1_000] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (hub, mut queues) = hub_with_room(&rt, &dir, members);
        let room = RoomName::parse("bench").expect("a valid room");
        let nick = Nick::parse("sender").expect("a valid nick");
        let mut seq = 1_000_000u64;
        group.throughput(Throughput::Elements(members as u64));
        group.bench_function(BenchmarkId::new("deliver_and_drain", members), |b| {
            b.iter(|| {
                seq += 1;
                let message = Message {
                    room: room.clone(),
                    seq,
                    id: uuid::Uuid::now_v7(),
                    nick: nick.clone(),
                    text: "a message of ordinary length for a chat room".into(),
                    kind: MessageKind::Text,
                    ts: Timestamp::now(),
                };
                hub.deliver(Envelope::Message(Arc::new(message)));
                for q in &mut queues {
                    black_box(q.try_recv().ok().map(|e| e.json().len()));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parser, fan_out);
criterion_main!(benches);
