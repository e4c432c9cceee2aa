-- Idempotency keys of `POST /message`. A keyed message is inserted in the
-- same transaction as its key, so the primary key below is what makes a
-- retry (on any instance) answer the first send instead of sending again.
-- Rows older than the window (10 minutes) no longer count and are pruned.
CREATE TABLE IF NOT EXISTS message_keys (
    nick_key   TEXT   NOT NULL,
    idem_key   TEXT   NOT NULL,
    room       TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (nick_key, idem_key)
);
CREATE INDEX IF NOT EXISTS message_keys_created ON message_keys (created_at);

-- room_seqs (0002) is also the local bus's reservation: the highest seq it
-- may hand out before writing a higher mark, so numbering resumes above it
-- after a crash and no seq is ever given twice.
