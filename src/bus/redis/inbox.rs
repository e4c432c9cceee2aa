//! Direct messages between instances, which nothing else keeps.
//!
//! A DM goes to the instance that holds its recipient's nick. Pub/sub alone
//! delivers at most once: a DM published while that instance's subscriber
//! is reconnecting, or dropped because its reader fell behind, would be gone
//! while its sender had been shown it as sent. So the script that publishes
//! a DM ([`script::DM`]) also appends it to the recipient instance's inbox, a
//! capped stream, under the next number of the inbox's counter (id `N-0`).
//!
//! The instance delivers its inbox in number order, whichever way a DM
//! comes: a number it has delivered is skipped, and one past the next makes
//! it read the inbox from where it is. It also reads the inbox after every
//! reconnect, and compares the counter with what it has delivered at every
//! heartbeat, so even a lost *last* DM arrives within a heartbeat. That same
//! look renews the inbox's expiry: a dead instance's inbox goes ten minutes
//! after its last heartbeat, while a stalled one finds its DMs when it wakes.
//!
//! An inbox Redis lost (a restart without its data) or let expire (an
//! instance cut off for ten minutes) is made again by the next DM, numbered
//! from 1, which the instance would take for numbers it had delivered. So
//! each making of the inbox has a generation, a random token the channel
//! carries with every number: a new one starts the instance's count again.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use tokio::sync::Mutex;

use super::history::Entry;
use super::keys::Keys;
use super::rooms::unreachable;
use super::script::{self, Lua};
use super::wire::{Addressed, DmWire, InboxAt, seq_of_id};
use crate::core::ports::{BusError, Deliver, Envelope};
use crate::core::{DirectMessage, Nick};

/// How long an inbox outlives its instance's last heartbeat (as DMs are kept
/// for a stalled instance on the poll bus).
const KEPT: Duration = Duration::from_secs(600);
/// DMs an inbox holds (approximately): past this, the oldest unread go.
const CAP: u64 = 10_000;
/// Entries read per round trip when catching up.
const PAGE: u64 = 256;

/// Sends DMs to any instance's inbox.
pub struct Post {
    keys: Keys,
    script: Lua,
}

impl Post {
    pub fn new(keys: Keys) -> Post {
        Post {
            keys,
            script: Lua::new(script::DM),
        }
    }

    /// Queues `dm` for `to` on `instance`, whose life `life` holds that nick.
    pub async fn send(
        &self,
        cmd: &Client,
        instance: &str,
        life: Option<&str>,
        dm: &DirectMessage,
        to: &Nick,
    ) -> Result<(), BusError> {
        let _: u64 = self
            .script
            .call(
                cmd,
                vec![
                    self.keys.inbox_seq(instance),
                    self.keys.inbox(instance),
                    self.keys.instance_channel(instance),
                ],
                vec![
                    DmWire::encode(dm, to, life),
                    CAP.to_string(),
                    KEPT.as_millis().to_string(),
                    format!("{:016x}", rand::random::<u64>()),
                ],
            )
            .await
            .map_err(unreachable)?;
        Ok(())
    }
}

/// This instance's own inbox.
pub struct Inbox {
    /// This life's token: the inbox is the name's, and a DM for another life
    /// of it (a namesake's) is passed over.
    life: String,
    counter: String,
    stream: String,
    beat: Lua,
    /// Where delivery stands. Held while delivering, so that the channel and
    /// a catch-up never hand one DM over twice or out of order.
    cursor: Mutex<Cursor>,
}

/// The last DM delivered: its inbox's generation (none before the first
/// DM) and its number.
#[derive(Debug, Default)]
struct Cursor {
    generation: Option<String>,
    delivered: u64,
}

impl Cursor {
    /// Whether DM `at` comes after this cursor: a number past the last one
    /// delivered, or any number of another generation (where the count
    /// starts again).
    fn is_before(&self, at: &InboxAt) -> bool {
        self.generation.as_deref() != Some(at.generation.as_str()) || at.n > self.delivered
    }

    /// Moves to generation `generation`, if that is another: nothing of it is
    /// delivered yet.
    fn enter(&mut self, generation: &str) {
        if self.generation.as_deref() != Some(generation) {
            if self.generation.is_some() {
                tracing::warn!(
                    "redis bus: the DM inbox was made anew (Redis lost it, or it expired)"
                );
            }
            self.generation = Some(generation.to_owned());
            self.delivered = 0;
        }
    }
}

impl Inbox {
    /// The inbox of life `life` of `instance`, starting after what it holds:
    /// those DMs were for the sessions of a previous life under this name,
    /// which are gone.
    pub async fn open(
        cmd: &Client,
        keys: &Keys,
        instance: &str,
        life: &str,
    ) -> Result<Inbox, BusError> {
        let counter = keys.inbox_seq(instance);
        let (generation, n): (Option<String>, Option<u64>) = cmd
            .hmget(&counter, vec!["gen", "n"])
            .await
            .map_err(unreachable)?;
        Ok(Inbox {
            life: life.to_owned(),
            counter,
            stream: keys.inbox(instance),
            beat: Lua::new(script::INBOX_BEAT),
            cursor: Mutex::new(Cursor {
                generation,
                delivered: n.unwrap_or(0),
            }),
        })
    }

    /// A DM at `at`, as the channel brought it.
    pub async fn offer(&self, cmd: &Client, at: InboxAt, dm: Addressed, sink: &dyn Deliver) {
        let mut cursor = self.cursor.lock().await;
        if !cursor.is_before(&at) {
            return; // a catch-up got it first
        }
        cursor.enter(&at.generation);
        if at.n > cursor.delivered + 1 {
            // The channel lost some: read them, this one included.
            self.read(cmd, &mut cursor, sink).await;
            return;
        }
        cursor.delivered = at.n;
        self.hand_over(dm, sink);
    }

    /// Delivers `dm` if it is for this life.
    fn hand_over(&self, dm: Addressed, sink: &dyn Deliver) {
        if dm.is_for(&self.life) {
            sink.deliver(Envelope::Dm(Arc::new(dm.dm)));
        } else {
            tracing::debug!("redis bus: a DM for a namesake's user passed over");
        }
    }

    /// Delivers whatever the inbox holds past what was delivered (after a
    /// reconnect, or a reader that fell behind).
    pub async fn catch_up(&self, cmd: &Client, sink: &dyn Deliver) {
        if let Err(err) = self.beat(cmd, sink).await {
            // Read again at the next reconnect or heartbeat.
            tracing::warn!(cause = %err, "redis bus: could not read the DM inbox");
        }
    }

    /// Renews the inbox's expiry and, if a DM was numbered that was not
    /// delivered (its publication lost), reads it.
    pub async fn beat(&self, cmd: &Client, sink: &dyn Deliver) -> Result<(), BusError> {
        let (generation, n): (Option<String>, Option<u64>) = self
            .beat
            .call(
                cmd,
                vec![self.counter.clone(), self.stream.clone()],
                vec![KEPT.as_millis().to_string()],
            )
            .await
            .map_err(unreachable)?;
        let (Some(generation), Some(n)) = (generation, n) else {
            return Ok(()); // no DM since the inbox was last made
        };
        let at = InboxAt { generation, n };
        let mut cursor = self.cursor.lock().await;
        if cursor.is_before(&at) {
            cursor.enter(&at.generation);
            self.read(cmd, &mut cursor, sink).await;
        }
        Ok(())
    }

    /// Reads and delivers the inbox after the cursor, page by page.
    async fn read(&self, cmd: &Client, cursor: &mut Cursor, sink: &dyn Deliver) {
        loop {
            let after = cursor.delivered;
            let entries: Vec<Entry> = match cmd
                .xrange(&self.stream, format!("({after}"), "+", Some(PAGE))
                .await
            {
                Ok(entries) => entries,
                Err(err) => {
                    // Read again at the next reconnect or heartbeat.
                    tracing::warn!(cause = %err, "redis bus: could not read the DM inbox");
                    return;
                }
            };
            let count = entries.len() as u64;
            for (id, fields) in entries {
                let Some(n) = seq_of_id(&id) else { continue };
                if n > cursor.delivered + 1 {
                    tracing::warn!(
                        lost = n - cursor.delivered - 1,
                        "redis bus: DMs trimmed from the inbox before they were read"
                    );
                }
                cursor.delivered = n;
                match fields.get("d").and_then(|json| DmWire::decode(json)) {
                    Some(dm) => self.hand_over(dm, sink),
                    None => tracing::warn!(n, "redis bus: unreadable DM skipped"),
                }
            }
            if count < PAGE {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::bus::redis::directory::tests::redis;
    use crate::core::Timestamp;
    use crate::core::ports::Claim;

    /// Keeps the texts of the DMs it is handed.
    #[derive(Default)]
    struct Texts(StdMutex<Vec<String>>);

    impl Deliver for Texts {
        fn deliver(&self, envelope: Envelope) {
            if let Envelope::Dm(dm) = envelope {
                self.0.lock().unwrap().push(dm.text.clone());
            }
        }

        fn claims(&self) -> Vec<Claim> {
            Vec::new()
        }
    }

    impl Texts {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn dm(text: &str) -> DirectMessage {
        DirectMessage {
            id: uuid::Uuid::now_v7(),
            from: Nick::parse("alice").unwrap(),
            to: Nick::parse("carol").unwrap(),
            text: text.into(),
            ts: Timestamp(0),
        }
    }

    /// `dm(text)` as the channel brings it to life `LIFE`.
    fn heard(text: &str) -> Addressed {
        Addressed {
            dm: dm(text),
            life: Some(LIFE.to_owned()),
        }
    }

    /// The life of `i2` in these tests.
    const LIFE: &str = "00000000000000aa";

    async fn open(cmd: &Client, keys: &Keys) -> Inbox {
        Inbox::open(cmd, keys, "i2", LIFE).await.unwrap()
    }

    /// A cluster name of its own, and its keys.
    fn keys(test: &str) -> Keys {
        let suffix: u32 = rand::random();
        Keys::new(&format!("t-inbox-{test}-{suffix:08x}")).unwrap()
    }

    async fn forget(cmd: &Client, keys: &Keys) {
        let _: u64 = cmd
            .del(vec![keys.inbox("i2"), keys.inbox_seq("i2")])
            .await
            .unwrap();
    }

    /// Sends each of `texts` to carol on life `life` of `i2`, in order.
    async fn post_to(cmd: &Client, post: &Post, life: &str, texts: &[&str]) {
        let carol = Nick::parse("carol").unwrap();
        for text in texts {
            post.send(cmd, "i2", Some(life), &dm(text), &carol)
                .await
                .unwrap();
        }
    }

    /// Sends each of `texts` to carol on `i2`, in order.
    async fn post_all(cmd: &Client, post: &Post, texts: &[&str]) {
        post_to(cmd, post, LIFE, texts).await;
    }

    /// The generation of `i2`'s inbox.
    async fn generation_of(cmd: &Client, keys: &Keys) -> String {
        cmd.hget(keys.inbox_seq("i2"), "gen").await.unwrap()
    }

    fn at(generation: &str, n: u64) -> InboxAt {
        InboxAt {
            generation: generation.to_owned(),
            n,
        }
    }

    #[tokio::test]
    async fn the_channel_and_the_inbox_deliver_each_dm_once_in_order() {
        let Some(cmd) = redis().await else { return };
        let keys = keys("order");
        let post = Post::new(keys.clone());
        let inbox = open(&cmd, &keys).await;
        let sink = Texts::default();
        post_all(&cmd, &post, &["one", "two", "three"]).await;
        let generation = generation_of(&cmd, &keys).await;
        // The channel lost "one" and "two": "three" reads them first.
        inbox
            .offer(&cmd, at(&generation, 3), heard("three"), &sink)
            .await;
        assert_eq!(sink.take(), ["one", "two", "three"]);
        // "two" comes late on the channel, and a catch-up runs: nothing twice.
        inbox
            .offer(&cmd, at(&generation, 2), heard("two"), &sink)
            .await;
        inbox.catch_up(&cmd, &sink).await;
        assert_eq!(sink.take(), Vec::<String>::new());
        // The last DM's publication is lost: the heartbeat's look reads it.
        post_all(&cmd, &post, &["four"]).await;
        inbox.beat(&cmd, &sink).await.unwrap();
        assert_eq!(sink.take(), ["four"]);
        forget(&cmd, &keys).await;
    }

    #[tokio::test]
    async fn an_inbox_redis_lost_numbers_again_and_is_delivered_again() {
        let Some(cmd) = redis().await else { return };
        let keys = keys("lost");
        let post = Post::new(keys.clone());
        let inbox = open(&cmd, &keys).await;
        let sink = Texts::default();
        post_all(&cmd, &post, &["one", "two"]).await;
        let old = generation_of(&cmd, &keys).await;
        inbox.offer(&cmd, at(&old, 2), heard("two"), &sink).await;
        assert_eq!(sink.take(), ["one", "two"]);
        // Redis restarts without its data: the next DMs are 1 and 2 again.
        forget(&cmd, &keys).await;
        post_all(&cmd, &post, &["three", "four"]).await;
        let new = generation_of(&cmd, &keys).await;
        assert_ne!(new, old);
        inbox.offer(&cmd, at(&new, 1), heard("three"), &sink).await;
        assert_eq!(sink.take(), ["three"]);
        // "four" went unpublished: the heartbeat's look finds it.
        inbox.beat(&cmd, &sink).await.unwrap();
        assert_eq!(sink.take(), ["four"]);
        // Lost again, and nothing on the channel at all.
        forget(&cmd, &keys).await;
        post_all(&cmd, &post, &["five"]).await;
        inbox.beat(&cmd, &sink).await.unwrap();
        assert_eq!(sink.take(), ["five"]);
        forget(&cmd, &keys).await;
    }

    #[tokio::test]
    async fn a_new_life_starts_after_what_the_inbox_holds_and_renews_it() {
        let Some(cmd) = redis().await else { return };
        let keys = keys("life");
        let post = Post::new(keys.clone());
        post_all(&cmd, &post, &["for the last life"]).await;
        let inbox = open(&cmd, &keys).await;
        let sink = Texts::default();
        inbox.beat(&cmd, &sink).await.unwrap();
        assert_eq!(sink.take(), Vec::<String>::new());
        post_all(&cmd, &post, &["for this one"]).await;
        inbox.catch_up(&cmd, &sink).await;
        assert_eq!(sink.take(), ["for this one"]);
        let ttl: i64 = cmd.pttl(keys.inbox("i2")).await.unwrap();
        assert!(ttl > 0 && ttl <= KEPT.as_millis() as i64, "ttl {ttl}");
        forget(&cmd, &keys).await;
    }

    /// A namesake took `i2`'s name over while this life was frozen: DMs for
    /// its users land in the same inbox and on the same channel, and this
    /// life must pass them over, whichever way they come.
    #[tokio::test]
    async fn a_dm_for_another_life_of_the_name_is_passed_over() {
        let Some(cmd) = redis().await else { return };
        let keys = keys("namesake");
        let post = Post::new(keys.clone());
        let inbox = open(&cmd, &keys).await;
        let sink = Texts::default();
        post_to(&cmd, &post, "00000000000000bb", &["for the namesake"]).await;
        post_all(&cmd, &post, &["for this life"]).await;
        inbox.beat(&cmd, &sink).await.unwrap();
        assert_eq!(sink.take(), ["for this life"]);
        post_to(&cmd, &post, "00000000000000bb", &["again"]).await;
        let generation = generation_of(&cmd, &keys).await;
        let namesake_s = Addressed {
            dm: dm("again"),
            life: Some("00000000000000bb".into()),
        };
        inbox
            .offer(&cmd, at(&generation, 3), namesake_s, &sink)
            .await;
        assert_eq!(sink.take(), Vec::<String>::new());
        forget(&cmd, &keys).await;
    }
}
