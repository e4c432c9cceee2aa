-- Which session of its instance holds a nick. Claims and releases match on
-- it, so a release that runs late (after the nick passed to another session
-- of the same instance) cannot free the new holder's claim.
ALTER TABLE nicks ADD COLUMN owner TEXT NOT NULL DEFAULT '';
