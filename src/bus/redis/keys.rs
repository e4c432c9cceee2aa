//! Where everything lives in Redis: key and channel names under `--cluster`.
//!
//! A room's keys share one hash tag, so one script can touch them all and a
//! Redis Cluster keeps them on one shard. The tag is not the room itself but
//! the room's *partition* (`{cluster:p7}`): the partition's persistence stream
//! then lives beside the room's keys, and the publish script can append to both
//! atomically. Rooms spread over [`PARTITIONS`] tags, which a cluster spreads
//! over its shards, like a keyed topic's partitions in Kafka.
//!
//! ```text
//! {C:pN}:seq:ROOM      string   the room's last seq (INCR)
//! {C:pN}:log:ROOM      stream   the room's recent messages, id = SEQ-0 (capped)
//! {C:pN}:room:ROOM     channel  the room's messages and joins/leaves (SPUBLISH)
//! {C:pN}:persist       stream   every message of the partition's rooms, until stored
//! {C:dir}:...          keys     the directory (nicks, members, live instances)
//! {C:i:NAME}           channel  one instance's direct messages, as they are sent
//! {C:i:NAME}:dms       stream   the same, numbered (id = N-0), capped, expiring
//! {C:i:NAME}:dm-seq    string   the inbox's last number (INCR)
//! {C:all}              channel  what every instance hears (renames)
//! ```

use crate::core::RoomName;

/// Partitions of the rooms (hash tags; persistence streams). Fixed for the
/// life of a cluster's data: changing it moves every room's keys.
pub const PARTITIONS: u32 = 16;

/// Names under one `--cluster`.
#[derive(Debug, Clone)]
pub struct Keys {
    cluster: String,
}

impl Keys {
    /// Names for `cluster`, which must be 1-64 of `A-Za-z0-9_.-` (it is part
    /// of every key, hash tags included).
    pub fn new(cluster: &str) -> Result<Keys, String> {
        let ok = (1..=64).contains(&cluster.len())
            && cluster
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(Keys {
                cluster: cluster.to_owned(),
            })
        } else {
            Err(format!(
                "--cluster {cluster:?}: use 1 to 64 of A-Z a-z 0-9 _ . -"
            ))
        }
    }

    /// The partition `room` belongs to (FNV-1a of its name).
    pub fn partition(room: &RoomName) -> u32 {
        let mut hash: u32 = 0x811c_9dc5;
        for b in room.as_str().bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        hash % PARTITIONS
    }

    fn tag(&self, partition: u32) -> String {
        format!("{{{}:p{partition}}}", self.cluster)
    }

    /// The room's seq counter.
    pub fn seq(&self, room: &RoomName) -> String {
        format!("{}:seq:{room}", self.tag(Self::partition(room)))
    }

    /// The receipt of a send made with an `Idempotency-Key` by `nick` in
    /// `room` (in the room's slot, so the publish script can read it: a key
    /// reused in another room counts as new there).
    pub fn receipt(&self, room: &RoomName, nick: &str, key: &str) -> String {
        format!(
            "{}:key:{room}:{nick}:{key}",
            self.tag(Self::partition(room))
        )
    }

    /// Which room `nick` first used an `Idempotency-Key` in (the key is the
    /// nick's, across rooms: PROTOCOL.md). In the nick's own slot: the
    /// receipt itself lives in the room's, where the publish script writes it.
    pub fn key_room(&self, nick: &str, key: &str) -> String {
        format!("{{{}:n:{nick}}}:key:{key}", self.cluster)
    }

    /// The room's capped stream of recent messages.
    pub fn log(&self, room: &RoomName) -> String {
        format!("{}:log:{room}", self.tag(Self::partition(room)))
    }

    /// The room's sharded channel.
    pub fn room_channel(&self, room: &RoomName) -> String {
        format!("{}:room:{room}", self.tag(Self::partition(room)))
    }

    /// The room a channel from [`Keys::room_channel`] names.
    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let (_, room) = channel.split_once("}:room:")?;
        RoomName::parse(room).ok()
    }

    /// The persistence stream of `partition`.
    pub fn persist(&self, partition: u32) -> String {
        format!("{}:persist", self.tag(partition))
    }

    /// An instance's own channel.
    pub fn instance_channel(&self, instance: &str) -> String {
        format!("{{{}:i:{instance}}}", self.cluster)
    }

    /// An instance's inbox: its direct messages, numbered, in the channel's slot.
    pub fn inbox(&self, instance: &str) -> String {
        format!("{}:dms", self.instance_channel(instance))
    }

    /// The counter that numbers an instance's direct messages.
    pub fn inbox_seq(&self, instance: &str) -> String {
        format!("{}:dm-seq", self.instance_channel(instance))
    }

    /// The channel every instance hears.
    pub fn all_channel(&self) -> String {
        format!("{{{}:all}}", self.cluster)
    }

    /// A directory key: all of them share one tag, so directory scripts can
    /// read several (one shard holds the directory; see the README's limits).
    pub fn dir(&self, what: &str) -> String {
        format!("{{{}:dir}}:{what}", self.cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_keys_share_one_hash_tag() {
        let keys = Keys::new("test").unwrap();
        let room = RoomName::parse("general").unwrap();
        let tag = |k: String| k[..k.find('}').unwrap() + 1].to_owned();
        let p = Keys::partition(&room);
        assert_eq!(tag(keys.seq(&room)), tag(keys.log(&room)));
        assert_eq!(tag(keys.seq(&room)), tag(keys.room_channel(&room)));
        assert_eq!(tag(keys.seq(&room)), tag(keys.persist(p)));
        assert_eq!(keys.room_of_channel(&keys.room_channel(&room)), Some(room));
    }

    #[test]
    fn cluster_names_that_would_break_hash_tags_are_refused() {
        assert!(Keys::new("a}b").is_err());
        assert!(Keys::new("").is_err());
        assert!(Keys::new("baby-discord").is_ok());
    }
}
