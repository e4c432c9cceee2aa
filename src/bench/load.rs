//! The engine behind `fanout`, `rooms`, `cluster` and each step of `saturate`:
//! connect every member, join the rooms, send at a fixed aggregate rate for a
//! fixed time, then wait until every receiver has seen every sender's end
//! marker (or the drain deadline passes) and add up the accounts.
//!
//! Senders are open-loop: message `n` of sender `k` is due at
//! `t0 + k/R + n*S/R`, whatever the server does, so a slow server shows up as
//! latency rather than as a politely lower rate. The timestamp in the payload
//! is taken just before the write; how far senders fell behind their schedule
//! is reported separately (`send_lag_max_ms`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::account::{ErrorCounts, Receiver};
use super::conn::{IrcClient, Lines, READY_TIMEOUT, Rendering, TcpClient};
use super::payload::{self, Clock};
use super::procfs::Sample;
use super::report::{Latency, LoadResult, ServerUsage};
use super::sse::{SseClient, SseStream};

/// How receivers are connected.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Transport {
    /// TCP lines (text or JSON).
    Tcp,
    /// HTTP sessions reading `GET /events` (SSE); senders stay on TCP.
    Sse,
    /// Another SSE hub, for a baseline (`bench/node-sse`): members read
    /// `GET /rooms/ROOM/events`, senders are members that also
    /// `POST /rooms/ROOM/messages` (the text as the body) on a keep-alive
    /// connection of their own.
    #[value(name = "sse-peer")]
    SsePeer,
    /// An IRC server, for a baseline (`bench/ngircd`): members register,
    /// `JOIN #ROOM` and `PRIVMSG #ROOM :text`. IRC does not send a member
    /// its own messages, so a sending member expects the others' only.
    Irc,
}

impl Transport {
    /// Whether a member receives its own messages.
    fn echoes(self) -> bool {
        self != Transport::Irc
    }
}

/// One room of a plan.
#[derive(Debug, Clone)]
pub struct RoomPlan {
    /// Room name.
    pub name: String,
    /// Receiving members (with SSE receivers, senders come on top).
    pub members: usize,
    /// Members that also send.
    pub senders: usize,
}

/// Everything a load run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The rooms.
    pub rooms: Vec<RoomPlan>,
    /// Aggregate messages per second over all senders.
    pub rate: f64,
    /// How long senders send.
    pub duration: Duration,
    /// Bytes per message text (at least the stamp).
    pub size: usize,
    /// How receivers connect.
    pub transport: Transport,
    /// How TCP connections render events.
    pub rendering: Rendering,
    /// TCP addresses; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// HTTP addresses, same rule, for SSE receivers.
    pub http_targets: Vec<SocketAddr>,
    /// Connections opened at once while setting up.
    pub concurrency: usize,
    /// How long to wait for stragglers once sending stops.
    pub drain: Duration,
    /// Server processes to measure.
    pub server_pids: Vec<u32>,
}

/// One connection to open.
#[derive(Debug, Clone, Copy)]
struct Spec {
    room: usize,
    target: usize,
    transport: Transport,
    sender: Option<u32>,
}

/// What a receiving task hands back.
struct Received {
    room: usize,
    /// The member's own sender id, when it sends and does not hear itself.
    unheard: Option<u32>,
    account: Receiver,
    _writer: Option<OwnedWriteHalf>,
}

/// What a sending task hands back.
struct Sent {
    sender: u32,
    total: u64,
    lag_max_ns: u64,
    writer: OwnedWriteHalf,
}

impl Plan {
    /// Connections the plan opens, with the sender ids in order.
    fn specs(&self) -> (Vec<Spec>, Vec<usize>, Vec<usize>) {
        let mut specs = Vec::new();
        let mut sender_target = Vec::new();
        let mut room_senders = Vec::new();
        let mut index = 0usize;
        let mut next = |transport: Transport, room: usize, sends: bool, st: &mut Vec<usize>| {
            let target = index % self.targets.len().max(1);
            index += 1;
            let sender = sends.then(|| {
                st.push(target);
                (st.len() - 1) as u32
            });
            Spec {
                room,
                target,
                transport,
                sender,
            }
        };
        for (r, room) in self.rooms.iter().enumerate() {
            let senders = room.senders.min(match self.transport {
                Transport::Tcp | Transport::SsePeer | Transport::Irc => room.members,
                Transport::Sse => usize::MAX,
            });
            room_senders.push(senders);
            match self.transport {
                Transport::Tcp | Transport::SsePeer | Transport::Irc => {
                    for m in 0..room.members {
                        specs.push(next(self.transport, r, m < senders, &mut sender_target));
                    }
                }
                Transport::Sse => {
                    for _ in 0..senders {
                        specs.push(next(Transport::Tcp, r, true, &mut sender_target));
                    }
                    for _ in 0..room.members {
                        specs.push(next(Transport::Sse, r, false, &mut sender_target));
                    }
                }
            }
        }
        (specs, sender_target, room_senders)
    }
}

/// Runs `plan` once.
pub async fn run(plan: &Plan) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!plan.targets.is_empty(), "no --target to connect to");
    anyhow::ensure!(plan.rate > 0.0, "--rate must be above 0");
    let (specs, sender_target, room_senders) = plan.specs();
    let senders_total = sender_target.len();
    anyhow::ensure!(senders_total > 0, "the plan has no sender");
    let run_id: u32 = rand::random();
    let clock = Clock::new();

    // Set up every connection before anyone sends. Each starts reading as soon
    // as it is ready: a thousand joins are a million events, and a member that
    // waited for the others would be dropped as a slow consumer.
    let stop = CancellationToken::new();
    let barrier = Arc::new(Barrier::new(specs.len()));
    let sender_target = Arc::new(sender_target);
    let ctx = ReceiveContext {
        run_id,
        clock,
        stop: stop.clone(),
        barrier: barrier.clone(),
        sender_target: sender_target.clone(),
        room_senders: Arc::new(room_senders),
    };
    let opened: Vec<(Spec, JoinHandle<Received>, Option<OwnedWriteHalf>)> =
        futures::stream::iter(specs.iter().copied())
            .map(|spec| {
                let ctx = ctx.clone();
                async move {
                    let (spec, lines, writer) = open(plan, spec).await?;
                    let (keep, send) = match spec.sender {
                        Some(_) => (None, writer),
                        None => (writer, None),
                    };
                    let task = tokio::spawn(receive(ctx, spec, lines, keep));
                    anyhow::Ok((spec, task, send))
                }
            })
            .buffer_unordered(plan.concurrency.max(1))
            .try_collect()
            .await?;

    // The barrier: one line through the room(s), then wait for every member.
    let mut warmed_rooms = vec![false; plan.rooms.len()];
    let mut connections = Vec::new();
    let mut receivers = Vec::new();
    for (spec, task, writer) in opened {
        receivers.push(task);
        if let Some(mut writer) = writer {
            if !warmed_rooms[spec.room] {
                warmed_rooms[spec.room] = true;
                let warm = outgoing(plan, spec, &payload::warm(run_id));
                writer.write_all(&warm).await?;
                if !spec.transport.echoes() {
                    barrier.pass(); // it will not hear its own warm-up line
                }
            }
            connections.push((spec, writer));
        }
    }
    tokio::time::timeout(READY_TIMEOUT, barrier.wait())
        .await
        .context("not every member received the warm-up line in time")?;

    let before = sample(&plan.server_pids)?;
    let generator_before = Sample::read(std::process::id()).ok();
    let t0 = clock.now_ns() + 50_000_000;
    let end = t0 + plan.duration.as_nanos() as u64;
    let period = (senders_total as f64 / plan.rate * 1e9) as u64;

    let mut senders = Vec::new();
    for (spec, mut writer) in connections {
        let Some(id) = spec.sender else { continue };
        let size = plan.size;
        let plan = plan.clone();
        let offset = (id as f64 / plan.rate * 1e9) as u64;
        senders.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut lag_max_ns = 0;
            loop {
                let due = t0 + offset + n * period;
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(clock.at(due).into()).await;
                let now = clock.now_ns();
                lag_max_ns = lag_max_ns.max(now.saturating_sub(due));
                let text = payload::message(run_id, id, n, now, size);
                writer.write_all(&outgoing(&plan, spec, &text)).await?;
                n += 1;
            }
            let text = payload::end(run_id, id, n);
            writer.write_all(&outgoing(&plan, spec, &text)).await?;
            anyhow::Ok(Sent {
                sender: id,
                total: n,
                lag_max_ns,
                writer,
            })
        }));
    }

    let mut sent = vec![0u64; senders_total];
    let mut lag_max_ns = 0;
    let mut writers = Vec::new();
    for task in senders {
        let s = task.await.context("a sender panicked")??;
        sent[s.sender as usize] = s.total;
        lag_max_ns = lag_max_ns.max(s.lag_max_ns);
        writers.push(s.writer);
    }
    let sending_ended = clock.now_ns();
    let mut all = futures::future::join_all(receivers);
    let received = tokio::select! {
        received = &mut all => received,
        _ = tokio::time::sleep(plan.drain) => {
            stop.cancel();
            all.await
        }
    };
    let after = sample(&plan.server_pids)?;
    let generator_after = Sample::read(std::process::id()).ok();
    drop(writers);

    // Which sender is in which room, to know what each receiver should have seen.
    let mut senders_of_room: Vec<Vec<u32>> = vec![Vec::new(); plan.rooms.len()];
    for spec in &specs {
        if let Some(id) = spec.sender {
            senders_of_room[spec.room].push(id);
        }
    }
    let mut result = LoadResult {
        connections: specs.len(),
        rooms: plan.rooms.len(),
        senders: senders_total,
        rate: plan.rate,
        duration_s: plan.duration.as_secs_f64(),
        sent: sent.iter().sum(),
        ..LoadResult::default()
    };
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut reads = Some(0);
    let mut errors = ErrorCounts::default();
    let mut last_arrival = 0;
    for r in received {
        let r = r.context("a receiver panicked")?;
        for &s in &senders_of_room[r.room] {
            if r.unheard == Some(s) {
                continue;
            }
            result.expected += sent[s as usize];
            result.lost += r.account.lost_from(s, sent[s as usize]);
        }
        result.delivered += r.account.unique();
        // Reads are counted only where every receiver's are (TCP): with
        // SSE receivers the TCP senders' few reads would stand for all.
        reads = match (reads, r.account.reads) {
            (Some(total), Some(these)) => Some(total + these),
            _ => None,
        };
        result.duplicates += r.account.duplicates;
        if !r.account.done() {
            result.incomplete_receivers += 1;
        }
        errors.add(&r.account.errors);
        last_arrival = last_arrival.max(r.account.last_arrival_ns);
        local.extend_from_slice(&r.account.latencies);
        remote.extend_from_slice(&r.account.remote_latencies);
    }
    result.errors = errors;
    result.reads = reads;
    let window = last_arrival.max(end).saturating_sub(t0).max(1);
    result.deliveries_per_s = result.delivered as f64 / (window as f64 / 1e9);
    result.window_ms = window as f64 / 1e6;
    result.deliveries_per_read = result
        .reads
        .filter(|&reads| reads > 0)
        .map(|reads| result.delivered as f64 / reads as f64);
    if let (Some(b), Some(a)) = (generator_before, generator_after) {
        result.generator_cpu_ms = a.cpu_ms.saturating_sub(b.cpu_ms);
    }
    result.send_lag_max_ms = lag_max_ns as f64 / 1e6;
    result.drain_ms = last_arrival.saturating_sub(sending_ended) as f64 / 1e6;
    let mut all_latencies = local.clone();
    all_latencies.extend_from_slice(&remote);
    result.latency = Latency::of(&all_latencies);
    if plan.targets.len() > 1 {
        result.latency_same_instance = Some(Latency::of(&local));
        result.latency_cross_instance = Some(Latency::of(&remote));
    }
    if let (Some(before), Some(after)) = (before, after) {
        result.server = Some(ServerUsage::between(before, after, result.delivered));
    }
    Ok(result)
}

/// What every receiving task shares.
#[derive(Clone)]
struct ReceiveContext {
    run_id: u32,
    clock: Clock,
    stop: CancellationToken,
    barrier: Arc<Barrier>,
    sender_target: Arc<Vec<usize>>,
    room_senders: Arc<Vec<usize>>,
}

/// Counts members that have passed the warm-up line.
struct Barrier {
    left: std::sync::atomic::AtomicUsize,
    passed: tokio::sync::Notify,
}

impl Barrier {
    fn new(members: usize) -> Self {
        Barrier {
            left: members.into(),
            passed: tokio::sync::Notify::new(),
        }
    }

    fn pass(&self) {
        use std::sync::atomic::Ordering;
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.passed.notify_waiters();
        }
    }

    async fn wait(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let passed = self.passed.notified();
            if self.left.load(Ordering::Acquire) == 0 {
                return;
            }
            passed.await;
        }
    }
}

/// Reads one member's lines until every sender of its room is done (or the
/// run is stopped), keeping its accounts.
async fn receive(
    ctx: ReceiveContext,
    spec: Spec,
    mut lines: Lines,
    keep: Option<OwnedWriteHalf>,
) -> Received {
    let unheard = spec.sender.filter(|_| !spec.transport.echoes());
    let heard_senders = ctx.room_senders[spec.room] - usize::from(unheard.is_some());
    let mut account = Receiver::new(ctx.run_id, heard_senders);
    let mut carry = Vec::with_capacity(512);
    let mut warm = false;
    // The reads that completed at least one measured message: joins, the
    // warm-up line and end markers are not deliveries.
    let mut delivering_reads = 0;
    let remote = |s: u32| ctx.sender_target.get(s as usize) != Some(&spec.target);
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    while !account.done() {
        // Every line of one read arrived at the same moment.
        let mut now = None;
        let mut delivered = false;
        let read = lines.next_read(&mut carry, |line| {
            if !warm && payload::is_warm(line, ctx.run_id) {
                warm = true;
                ctx.barrier.pass();
                return;
            }
            if account.done() {
                return; // what follows the last end marker is not counted
            }
            let now = *now.get_or_insert_with(|| ctx.clock.now_ns());
            delivered |= account.on_line(line, now, remote);
        });
        let more = tokio::select! {
            biased;
            _ = &mut stopped => break,
            more = read => more,
        };
        if !matches!(more, Ok(true)) {
            break;
        }
        if delivered {
            delivering_reads += 1;
        }
    }
    account.reads = lines.reads().map(|_| delivering_reads);
    Received {
        room: spec.room,
        unheard,
        account,
        _writer: keep,
    }
}

/// Opens one connection of the plan and makes it ready.
async fn open(plan: &Plan, spec: Spec) -> anyhow::Result<(Spec, Lines, Option<OwnedWriteHalf>)> {
    let room = &plan.rooms[spec.room].name;
    let ready = async {
        match spec.transport {
            Transport::Tcp => {
                let addr = plan.targets[spec.target % plan.targets.len()];
                let c = TcpClient::join(addr, plan.rendering, room).await?;
                anyhow::Ok((spec, Lines::Tcp(c.reader), Some(c.writer)))
            }
            Transport::Sse => {
                anyhow::ensure!(!plan.http_targets.is_empty(), "no --http-target for SSE");
                let addr = plan.http_targets[spec.target % plan.http_targets.len()];
                let c = SseClient::join(addr, room).await?;
                anyhow::Ok((spec, Lines::Sse(c.stream), None))
            }
            Transport::SsePeer => {
                anyhow::ensure!(!plan.http_targets.is_empty(), "no --http-target for SSE");
                let addr = plan.http_targets[spec.target % plan.http_targets.len()];
                let stream = SseStream::open(addr, &format!("/rooms/{room}/events")).await?;
                let writer = match spec.sender {
                    Some(_) => Some(poster(addr).await?),
                    None => None,
                };
                anyhow::Ok((spec, Lines::Sse(stream), writer))
            }
            Transport::Irc => {
                let addr = plan.targets[spec.target % plan.targets.len()];
                let c = IrcClient::join(addr, room).await?;
                anyhow::Ok((spec, Lines::Tcp(c.reader), Some(c.writer)))
            }
        }
    };
    tokio::time::timeout(READY_TIMEOUT, ready)
        .await
        .with_context(|| format!("a connection to room {room} was not ready in time"))?
}

/// What a sender writes to send `text`: a line on TCP, a request to a peer.
fn outgoing(plan: &Plan, spec: Spec, text: &str) -> Vec<u8> {
    match spec.transport {
        Transport::Tcp | Transport::Sse => format!("{text}\n").into_bytes(),
        Transport::Irc => {
            let room = &plan.rooms[spec.room].name;
            format!("PRIVMSG #{room} :{text}\r\n").into_bytes()
        }
        Transport::SsePeer => {
            let room = &plan.rooms[spec.room].name;
            let mut request = format!(
                "POST /rooms/{room}/messages HTTP/1.1\r\nhost: bench\r\n\
                 content-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                text.len()
            )
            .into_bytes();
            request.extend_from_slice(text.as_bytes());
            request
        }
    }
}

/// A keep-alive connection for a peer sender's requests, which are
/// pipelined (sent on schedule, never waiting for an answer): its answers
/// are read and dropped by a task of their own.
async fn poster(addr: SocketAddr) -> anyhow::Result<OwnedWriteHalf> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("could not connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut read, write) = stream.into_split();
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut read, &mut sink).await;
    });
    Ok(write)
}

/// Reads the servers, or nothing when no PID was given.
pub fn sample(pids: &[u32]) -> anyhow::Result<Option<Sample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        Sample::read_all(pids).context("could not read the server's /proc entry")?,
    ))
}
