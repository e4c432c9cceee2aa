-- Which life of an instance holds its row: a random token each start picks.
-- An instance that renews a row whose life is not its own was taken over by
-- a namesake while it was away, and stops instead of serving beside it.
ALTER TABLE instances ADD COLUMN life TEXT NOT NULL DEFAULT '';
