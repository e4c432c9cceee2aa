-- Room messages. (room, seq) is the identity a client sees and the order of a
-- room; id is the globally unique UUIDv7 text. ts is Unix milliseconds, UTC.
CREATE TABLE IF NOT EXISTS messages (
    room TEXT   NOT NULL,
    seq  BIGINT NOT NULL,
    id   TEXT   NOT NULL UNIQUE,
    nick TEXT   NOT NULL,
    text TEXT   NOT NULL,
    kind TEXT   NOT NULL CHECK (kind IN ('text', 'action')),
    ts   BIGINT NOT NULL,
    PRIMARY KEY (room, seq)
);
