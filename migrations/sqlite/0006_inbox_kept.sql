-- A direct message waiting in an instance's inbox outlives a reap of that
-- instance until kept_until (ms since the epoch, on the database's clock): a
-- reaped instance may be stalled, not dead, and read it when it wakes. Rows
-- with no kept_until (membership news) go with the reap.
ALTER TABLE inbox ADD COLUMN kept_until BIGINT;
