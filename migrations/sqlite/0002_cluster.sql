-- Tables the poll bus uses to make instances that share this database behave
-- as one chat.

-- The ordering authority: a room's last seq, bumped in the transaction that
-- inserts the message, so seq is gap-free across instances.
CREATE TABLE IF NOT EXISTS room_seqs (
    room     TEXT   PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- Live instances: an instance whose heartbeat is older than the lease is dead,
-- and its nicks and presence no longer count.
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT   PRIMARY KEY,
    seen_at  BIGINT NOT NULL
);

-- Nick leases, cluster-wide and case-insensitive.
CREATE TABLE IF NOT EXISTS nicks (
    nick_key TEXT PRIMARY KEY,
    nick     TEXT NOT NULL,
    instance TEXT NOT NULL
);

-- Who is in which room, on which instance.
CREATE TABLE IF NOT EXISTS presence (
    room     TEXT NOT NULL,
    nick_key TEXT NOT NULL,
    nick     TEXT NOT NULL,
    instance TEXT NOT NULL,
    PRIMARY KEY (room, nick_key)
);

-- Events addressed to one instance (direct messages), taken with DELETE ... RETURNING.
CREATE TABLE IF NOT EXISTS inbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    payload  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_instance ON inbox (instance);
