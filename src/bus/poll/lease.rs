//! The poll bus's leases: how the directory stays true when an instance
//! dies, stalls, or loses the database for a while.
//!
//! An instance's claims (rows of `nicks` and `presence`) count while its row
//! in `instances` exists. Every heartbeat each instance
//!
//! 1. renews its own row. If the row is gone, another instance reaped it
//!    while this one was away: it registers again and re-asserts every local
//!    claim (the hub reports them through [`Deliver::claims`]);
//! 2. reaps every instance silent for longer than [`LEASE`]: the instance
//!    row, its nicks, its memberships and its inbox (but for direct messages,
//!    kept a while: it may be stalled, not dead) go in one transaction, which
//!    also posts one `leave` per membership to every instance left. Two
//!    instances reaping at once cannot both see a row they delete, so each
//!    departure is announced exactly once.
//!
//! A starting instance takes over what a previous life under its name left,
//! but never from a running namesake, nor from one merely late: it watches
//! the name's row as a reaper would, until the row has stood still for a
//! lease (or is gone), and takes it only if it still holds what was watched.
//! Each life writes a random token into the row it holds; a namesake that
//! was stalled through such a takeover finds another life's token at its next
//! renewal and stops, rather than serve users the cluster saw leave.
//!
//! A claim is only ever taken from a *reaped* instance (a row whose instance
//! has no row in `instances`), never from one that is merely late: an
//! instance whose row survived its stall still holds everything it held, and
//! one whose row was reaped always finds out on its next heartbeat.
//!
//! What an instance wrote just before it stalled may reach the database only
//! after its lease was reaped (the process was frozen between two
//! statements, or its statements were held up on the network). A membership
//! is therefore recorded only while the instance holds the nick, and
//! announced only while it is recorded under a lease that exists: a late
//! join neither brings back a membership whose end was announced nor shows
//! a nick that another session holds by now.
//!
//! Who has been silent for a lease is judged without comparing clocks: each
//! instance watches the others' rows change, with its own monotonic clock
//! (see [`super::silence`]), and reaps a row only if it still holds the value
//! that stood still. After an outage of the database that every instance
//! saw, the first instance back does not reap the others, which are just as
//! alive and about to renew: it forgets what it saw before the outage.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::silence::{Silent, Watch};
use super::{
    Db, Existing, HEARTBEAT, InboxRow, LEASE, Member, broadcast, counted, db, move_memberships,
    now_ms, record_member, take_inbox,
};
use crate::core::ports::{BusError, Claim, Deliver, Envelope};
use crate::core::{Nick, RoomName, SessionId};

/// Claims (or memberships) per statement: three parameters each, well under
/// both engines' limits (SQLite 32,766, PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 500;
/// Memberships per announcement row in the inbox, so a reaped instance with
/// many users becomes a few rows of bounded size.
const MEMBERS_PER_ROW: usize = 500;
/// Sets `seen_at` to the writer's wall-clock time, or one more than it was
/// if that is not later: the others watch the value change (see
/// [`super::silence`]), so a clock stepped back must not freeze it.
const RENEWED: &str = "CASE WHEN $2 > instances.seen_at THEN $2 ELSE instances.seen_at + 1 END";

/// This instance's lease, kept by its heartbeat task.
pub(super) struct Lease {
    instance: String,
    /// Set when the lease was found reaped; cleared once every claim has been
    /// re-asserted, so a re-assertion cut short by an error is tried again.
    reassert: bool,
    /// What this instance has seen of the others' renewals.
    watch: Watch,
}

/// Whose claims a reap removes.
enum Reap<'a> {
    /// The instances found silent for longer than the lease, each only if
    /// its row still holds the value that stood still.
    Silent(&'a [Silent]),
    /// One instance by name: this one, at a graceful stop.
    Named(&'a str),
    /// This one, at start: what a previous life under its name left, whose
    /// row (if any) held `seen` throughout the watch. The row is then taken
    /// for this life in the same transaction, so of two instances starting
    /// under one name at once only one gets it.
    PreviousLife { name: &'a str, seen: Option<i64> },
}

/// A token for one life of an instance, new at each start.
pub(super) fn new_life() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Lease {
    /// Registers `instance`, first reaping what a previous life under the
    /// same name left (its users leave, as if it had been reaped by another).
    pub(super) async fn register(database: &Db, instance: &str) -> Result<Lease, BusError> {
        let seen = wait_out_previous_life(database, instance).await?;
        reap(
            database,
            Reap::PreviousLife {
                name: instance,
                seen,
            },
        )
        .await?;
        Ok(Lease {
            instance: instance.to_owned(),
            reassert: false,
            watch: Watch::new(LEASE),
        })
    }

    /// One heartbeat: renew, re-assert if the lease was reaped, reap others.
    /// [`BusError::Superseded`] if another life holds this instance's name.
    pub(super) async fn renew(
        &mut self,
        database: &Db,
        sink: Option<&Arc<dyn Deliver>>,
    ) -> Result<(), BusError> {
        let renewed = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE instances SET seen_at = {RENEWED} WHERE instance = $1 AND life = $3"
        )))
        .bind(self.instance.as_str())
        .bind(now_ms())
        .bind(&*database.life)
        .execute(database.run())
        .await
        .map_err(db)?
        .rows_affected();
        if renewed == 0 {
            insert(database, &self.instance).await?;
            tracing::warn!(
                instance = %self.instance,
                "this instance's lease ran out and was reaped: re-asserting its users' nicks and rooms"
            );
            self.reassert = true;
        }
        if self.reassert {
            if let Some(sink) = sink {
                reassert(database, &self.instance, sink).await?;
            }
            self.reassert = false;
        }
        Ok(())
    }

    /// Looks at every instance's row, and answers those whose value has
    /// stood still for longer than the lease: each to be reaped by
    /// [`reap_silent`] only if its row still holds that value.
    pub(super) async fn silent(&mut self, database: &Db) -> Result<Vec<Silent>, BusError> {
        let asked = Instant::now();
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT instance, seen_at FROM instances")
            .fetch_all(database.run())
            .await
            .map_err(db)?;
        Ok(self.watch.look(&self.instance, rows, asked, Instant::now()))
    }

    /// Renews, then reaps what has been silent for longer than the lease:
    /// [`Lease::renew`], [`Lease::silent`] and [`reap_silent`] in one call,
    /// for tests that step a lease by hand.
    #[cfg(test)]
    pub(super) async fn renew_and_reap(
        &mut self,
        database: &Db,
        sink: Option<&Arc<dyn Deliver>>,
    ) -> Result<(), BusError> {
        self.renew(database, sink).await?;
        let silent = self.silent(database).await?;
        reap_silent(database, &silent).await
    }

    /// Gives every claim up at a graceful stop: the others announce nothing,
    /// this instance does (its users leave at once, not after the lease).
    pub(super) async fn release(database: &Db, instance: &str) -> Result<(), BusError> {
        reap(database, Reap::Named(instance)).await
    }
}

/// Reaps the instances in `silent`, each only if its row still holds the
/// value that stood still (one renewed since the look is alive after all).
pub(super) async fn reap_silent(database: &Db, silent: &[Silent]) -> Result<(), BusError> {
    if silent.is_empty() {
        return Ok(());
    }
    reap(database, Reap::Silent(silent)).await
}

/// A row under this instance's name is a previous life that crashed, or a
/// running instance that was given the same name. Taking the latter's would
/// give its users away, so the row is watched as a reaper watches one:
/// changed, it is being renewed, and this instance refuses to start; gone,
/// the name is free; still for a whole lease, its holder is dead, or
/// stalled past its lease, and then it is fenced (it sends nothing for its
/// users) and finds out at its next renewal that it was taken over.
///
/// Returns the value the row held throughout (or `None` if there is none):
/// registering takes the row only if it still holds it.
async fn wait_out_previous_life(database: &Db, instance: &str) -> Result<Option<i64>, BusError> {
    let look = || {
        sqlx::query_scalar::<_, i64>("SELECT seen_at FROM instances WHERE instance = $1")
            .bind(instance)
            .fetch_optional(database.run())
    };
    let Some(before) = look().await.map_err(db)? else {
        return Ok(None);
    };
    // The value was written before this look was answered: it has stood
    // still for at least as long as it is found unchanged after it.
    let since = Instant::now();
    tracing::info!(
        instance,
        "this instance's name has a lease: waiting until it runs out, to tell a previous life from a running namesake"
    );
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        match look().await.map_err(db)? {
            None => return Ok(None),
            Some(now) if now != before => {
                return Err(BusError::NameTaken(instance.to_owned()));
            }
            Some(_) if since.elapsed() >= LEASE => return Ok(Some(before)),
            Some(_) => {}
        }
    }
}

/// Registers this life's row for `instance`, or renews it if another
/// heartbeat of this life (one cut short) already did.
/// [`BusError::Superseded`] if another life holds the name.
async fn insert(database: &Db, instance: &str) -> Result<(), BusError> {
    let written = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO instances (instance, seen_at, life) VALUES ($1, $2, $3)
         ON CONFLICT (instance) DO UPDATE SET seen_at = {RENEWED}
         WHERE instances.life = excluded.life"
    )))
    .bind(instance)
    .bind(now_ms())
    .bind(&*database.life)
    .execute(database.run())
    .await
    .map_err(db)?
    .rows_affected();
    if written == 0 {
        return Err(BusError::Superseded(instance.to_owned()));
    }
    Ok(())
}

/// Claims `nicks` for their sessions of `instance` in as few statements as
/// the parameter limits allow. A nick is taken if it is free, already this
/// session's, or left by a reaped instance. Returns the keys now held.
pub(super) async fn claim_nicks(
    database: &Db,
    instance: &str,
    nicks: &[(&Nick, SessionId)],
) -> Result<HashSet<String>, BusError> {
    let mut held = HashSet::with_capacity(nicks.len());
    for chunk in nicks.chunks(ROWS_PER_STATEMENT) {
        let values = placeholders(chunk.len(), |i| {
            format!("(${}, ${}, $1, ${})", 3 * i + 2, 3 * i + 3, 3 * i + 4)
        });
        let sql = format!(
            "INSERT INTO nicks (nick_key, nick, instance, owner) VALUES {values}
             ON CONFLICT (nick_key) DO UPDATE
             SET nick = excluded.nick, instance = excluded.instance, owner = excluded.owner
             WHERE (nicks.instance = excluded.instance AND nicks.owner = excluded.owner)
                OR nicks.instance NOT IN (SELECT instance FROM instances)
             RETURNING nick_key"
        );
        // Only `$N` placeholders are formatted in; every value is bound.
        let mut q = sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(sql)).bind(instance);
        for (nick, owner) in chunk {
            q = q
                .bind(nick.key().as_str().to_owned())
                .bind(nick.as_str())
                .bind(owner.to_string());
        }
        let rows = q.fetch_all(database.run()).await.map_err(db)?;
        held.extend(rows.into_iter().map(|(key,)| key));
    }
    Ok(held)
}

/// Claims again what the hub holds, after this instance's lease was reaped.
/// Memberships of nicks still held are recorded and announced (`join`); a
/// nick another session took meanwhile goes back to the hub as lost.
async fn reassert(database: &Db, instance: &str, sink: &Arc<dyn Deliver>) -> Result<(), BusError> {
    // No membership write of this instance lands between a snapshot and the
    // statements that act on it (see `Db::directory`).
    let _directory = database.directory.lock().await;
    // DMs kept for this instance while it was reaped are addressed by nick:
    // deliver them before a lost nick renames its user to a guest.
    take_inbox(database, instance, sink).await?;
    let claims = sink.claims();
    let nicks: Vec<(&Nick, SessionId)> = claims.iter().map(|c| (&c.nick, c.session)).collect();
    let held = claim_nicks(database, instance, &nicks).await?;
    let (kept, lost): (Vec<&Claim>, Vec<&Claim>) = claims
        .iter()
        .partition(|c| held.contains(c.nick.key().as_str()));
    let back: Vec<(&RoomName, &Nick)> = kept
        .iter()
        .flat_map(|c| c.rooms.iter().map(|(room, _)| (room, &c.nick)))
        .collect();
    record_presence(database, instance, &back).await?;
    for chunk in back.chunks(MEMBERS_PER_ROW) {
        let members = chunk
            .iter()
            .map(|(room, nick)| Member {
                room: room.to_string(),
                nick: nick.to_string(),
            })
            .collect();
        broadcast(database, instance, &InboxRow::Back { members }).await?;
    }
    tracing::info!(
        kept = kept.len(),
        lost = lost.len(),
        rooms = back.len(),
        "claims re-asserted"
    );
    for claim in lost {
        sink.deliver(Envelope::ClaimLost {
            session: claim.session,
            nick: claim.nick.clone(),
        });
    }
    // A session that ended, renamed, joined or left while the claims above
    // were in flight has already told the directory; what was re-asserted
    // for it from the older snapshot must not outlive it.
    let now = sink.claims();
    tidy(database, instance, &claims, &now).await?;
    // Except what reached the database while the lease was still reaped: a
    // join or rename then recorded nothing (see `while_registered`). The hub
    // has it now; record it here.
    recorded_meanwhile(database, instance, &kept, &now).await
}

/// Brings the directory up to `now`, a snapshot of the hub taken after the
/// claims in `kept` were asserted again. What reached the database while
/// the lease was still reaped recorded nothing, so:
///
/// - a session that joined rooms since has them recorded and announced;
/// - one renamed since (its rename moved no membership) has all its rooms
///   recorded under its new nick, if this instance holds it: also when its
///   old nick was lost meanwhile, or when it connected only then;
/// - one that only changed the case of its nick has its memberships written
///   the new way, announced as the rename it was.
///
/// A membership already recorded (the join or rename reached the database
/// after the claims, and announced itself) is left as it is.
async fn recorded_meanwhile(
    database: &Db,
    instance: &str,
    kept: &[&Claim],
    now: &[Claim],
) -> Result<(), BusError> {
    let mut joined = Vec::new();
    for claim in now {
        let asserted = kept
            .iter()
            .find(|k| k.session == claim.session && k.nick.key() == claim.nick.key());
        if let Some(before) = asserted.filter(|k| k.nick != claim.nick) {
            let on = database.run();
            let rooms = move_memberships(on, instance, &claim.nick.key(), &claim.nick).await?;
            if !rooms.is_empty() {
                let row = InboxRow::Renamed {
                    old: before.nick.to_string(),
                    new: claim.nick.to_string(),
                    rooms,
                };
                broadcast(database, instance, &row).await?;
            }
        }
        for (room, _) in &claim.rooms {
            if asserted.is_some_and(|k| k.rooms.iter().any(|(r, _)| r == room)) {
                continue;
            }
            let recorded =
                record_member(database.run(), instance, room, &claim.nick, Existing::Keep);
            if recorded.await? {
                joined.push(Member {
                    room: room.to_string(),
                    nick: claim.nick.to_string(),
                });
            }
        }
    }
    for chunk in joined.chunks(MEMBERS_PER_ROW) {
        let row = InboxRow::Back {
            members: chunk.to_vec(),
        };
        broadcast(database, instance, &row).await?;
    }
    Ok(())
}

/// Withdraws re-asserted claims that the hub no longer has: the nick of a
/// session that ended or renamed since `before`, and rooms it left.
async fn tidy(
    database: &Db,
    instance: &str,
    before: &[Claim],
    after: &[Claim],
) -> Result<(), BusError> {
    let now: HashMap<SessionId, &Claim> = after.iter().map(|c| (c.session, c)).collect();
    for old in before {
        // By key: a change of case keeps the claim and the memberships.
        let current = now
            .get(&old.session)
            .filter(|c| c.nick.key() == old.nick.key());
        let gone = old
            .rooms
            .iter()
            .filter(|(room, _)| current.is_none_or(|c| !c.rooms.iter().any(|(r, _)| r == room)));
        let mut left = Vec::new();
        for (room, _) in gone {
            let removed = sqlx::query(
                "DELETE FROM presence WHERE room = $1 AND nick_key = $2 AND instance = $3",
            )
            .bind(room.as_str())
            .bind(old.nick.key().as_str())
            .bind(instance)
            .execute(database.run())
            .await
            .map_err(db)?
            .rows_affected();
            if removed > 0 {
                left.push(Member {
                    room: room.to_string(),
                    nick: old.nick.to_string(),
                });
            }
        }
        if current.is_none() {
            sqlx::query("DELETE FROM nicks WHERE nick_key = $1 AND instance = $2 AND owner = $3")
                .bind(old.nick.key().as_str())
                .bind(instance)
                .bind(old.session.to_string())
                .execute(database.run())
                .await
                .map_err(db)?;
        }
        if !left.is_empty() {
            broadcast(database, instance, &InboxRow::Gone { members: left }).await?;
        }
    }
    Ok(())
}

/// Records memberships of `instance`, many rows per statement.
async fn record_presence(
    database: &Db,
    instance: &str,
    members: &[(&RoomName, &Nick)],
) -> Result<(), BusError> {
    for chunk in members.chunks(ROWS_PER_STATEMENT) {
        let values = placeholders(chunk.len(), |i| {
            format!("(${}, ${}, ${}, $1)", 3 * i + 2, 3 * i + 3, 3 * i + 4)
        });
        let sql = format!(
            "INSERT INTO presence (room, nick_key, nick, instance) VALUES {values}
             ON CONFLICT (room, nick_key) DO UPDATE
             SET nick = excluded.nick, instance = excluded.instance"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(instance);
        for (room, nick) in chunk {
            q = q
                .bind(room.as_str())
                .bind(nick.key().as_str().to_owned())
                .bind(nick.as_str());
        }
        q.execute(database.run()).await.map_err(db)?;
    }
    Ok(())
}

/// Removes the claims of the instances `which` names, in one transaction, and
/// posts their users' departures to every instance that remains (this one
/// too: its hub tells its own members). Concurrent reapers serialise on the
/// `instances` rows: whoever deletes a row announces its users, the other
/// sees nothing to delete.
async fn reap(database: &Db, which: Reap<'_>) -> Result<(), BusError> {
    // A silent instance may be stalled, not dead: the direct messages waiting
    // for it are kept until their time is up, and it reads them when it
    // wakes. A previous life's users are gone, and so are its messages.
    let now = database.clock.now_ms();
    let inbox_kept = match which {
        Reap::Silent(_) => format!(" AND (kept_until IS NULL OR kept_until < {now})"),
        Reap::Named(_) | Reap::PreviousLife { .. } => String::new(),
    };
    let mut tx = database.pool.begin().await.map_err(db)?;
    let dead: Vec<String> = match which {
        Reap::Silent(silent) => {
            let mut dead = Vec::new();
            for Silent { instance, seen_at } in silent {
                // Renewed since the look: alive after all.
                let row: Option<(String,)> = sqlx::query_as(
                    "DELETE FROM instances WHERE instance = $1 AND seen_at = $2
                     RETURNING instance",
                )
                .bind(instance.as_str())
                .bind(*seen_at)
                .fetch_optional(counted(database, &mut tx))
                .await
                .map_err(db)?;
                dead.extend(row.map(|(i,)| i));
            }
            dead
        }
        Reap::Named(name) => {
            // Its leftovers count even if its row is already gone.
            sqlx::query("DELETE FROM instances WHERE instance = $1")
                .bind(name)
                .execute(counted(database, &mut tx))
                .await
                .map_err(db)?;
            vec![name.to_owned()]
        }
        Reap::PreviousLife { name, seen } => {
            if let Some(seen) = seen {
                let taken =
                    sqlx::query("DELETE FROM instances WHERE instance = $1 AND seen_at = $2")
                        .bind(name)
                        .bind(seen)
                        .execute(counted(database, &mut tx))
                        .await
                        .map_err(db)?
                        .rows_affected();
                if taken == 0 {
                    // Renewed since the watch, or taken by a namesake that
                    // started at the same moment; or reaped by a survivor
                    // meanwhile, which leaves no row (and the leftovers are
                    // gone with it: this life goes on).
                    let row: Option<(i64,)> =
                        sqlx::query_as("SELECT seen_at FROM instances WHERE instance = $1")
                            .bind(name)
                            .fetch_optional(counted(database, &mut tx))
                            .await
                            .map_err(db)?;
                    if row.is_some() {
                        return Err(BusError::NameTaken(name.to_owned()));
                    }
                }
            }
            vec![name.to_owned()]
        }
    };
    if dead.is_empty() {
        tx.commit().await.map_err(db)?;
        return Ok(());
    }
    let list = placeholders(dead.len(), |i| format!("${}", i + 1));
    let bind_all = |sql: String| {
        let mut q = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
        for name in &dead {
            q = q.bind(name.as_str());
        }
        q
    };
    let gone: Vec<(String, String)> = bind_all(format!(
        "DELETE FROM presence WHERE instance IN ({list}) RETURNING room, nick"
    ))
    .fetch_all(counted(database, &mut tx))
    .await
    .map_err(db)?;
    for (table, kept) in [("nicks", ""), ("inbox", inbox_kept.as_str())] {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE instance IN ({list}){kept}"
        )));
        for name in &dead {
            q = q.bind(name.as_str());
        }
        q.execute(counted(database, &mut tx)).await.map_err(db)?;
    }
    // What was kept for instances that never came back, once its time is up.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM inbox WHERE kept_until < {now}
         AND instance NOT IN (SELECT instance FROM instances)"
    )))
    .execute(counted(database, &mut tx))
    .await
    .map_err(db)?;
    let members: Vec<Member> = gone
        .into_iter()
        .map(|(room, nick)| Member { room, nick })
        .collect();
    for chunk in members.chunks(MEMBERS_PER_ROW) {
        let row = InboxRow::Gone {
            members: chunk.to_vec(),
        };
        sqlx::query("INSERT INTO inbox (instance, payload) SELECT instance, $1 FROM instances")
            .bind(row.to_json())
            .execute(counted(database, &mut tx))
            .await
            .map_err(db)?;
    }
    if let Reap::PreviousLife { name, .. } = which {
        // A namesake that started at the same moment and got here first
        // has the row: this one gives way.
        let registered = sqlx::query(
            "INSERT INTO instances (instance, seen_at, life) VALUES ($1, $2, $3)
             ON CONFLICT (instance) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms())
        .bind(&*database.life)
        .execute(counted(database, &mut tx))
        .await
        .map_err(db)?
        .rows_affected();
        if registered == 0 {
            return Err(BusError::NameTaken(name.to_owned()));
        }
    }
    tx.commit().await.map_err(db)?;
    if !members.is_empty() {
        tracing::info!(instances = ?dead, memberships = members.len(), "reaped: their users left");
    }
    Ok(())
}

/// `n` comma-separated groups of placeholders, the `i`th made by `group(i)`.
/// Only `$N` placeholders are ever formatted into SQL; values are bound.
fn placeholders(n: usize, group: impl Fn(usize) -> String) -> String {
    (0..n).map(group).collect::<Vec<_>>().join(", ")
}
