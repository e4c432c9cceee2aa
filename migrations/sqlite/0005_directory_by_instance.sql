-- Reaping an instance whose lease ran out removes its nicks and memberships
-- in one transaction, by instance: without these, every reap scans both tables.
CREATE INDEX IF NOT EXISTS nicks_instance ON nicks (instance);
CREATE INDEX IF NOT EXISTS presence_instance ON presence (instance);
