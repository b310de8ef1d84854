-- Several instances on one state DB: associations with the instance that holds them (a series
-- completes on its associations' end only when none of them is still open, at any instance),
-- leased deliveries (one instance sends an outbox entry at a time), and no expected_count (no
-- sender announces a series' size in C-STORE; see service/completion.py).
ALTER TABLE series DROP COLUMN expected_count;
CREATE TABLE associations (
    association_id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION
);
CREATE INDEX associations_open ON associations(instance_id) WHERE ended_at IS NULL;
ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
ALTER TABLE outbox ADD COLUMN lease_until DOUBLE PRECISION;
